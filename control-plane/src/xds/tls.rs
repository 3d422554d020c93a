//! The xDS port's TLS: meshd presents its own certificate from the mesh CA and requires
//! a client certificate that chains to the trust bundle. The handshake runs here, off
//! the accept loop; tonic gets finished TLS streams and reads the peer certificate from
//! them, so the ADS server can derive a proxy's identity from what was verified.

use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

use crate::identity::CertManager;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
#[error("cannot set up TLS for the xDS port: {0}")]
pub struct TlsSetupError(String);

/// A rustls server config from the manager's current certificate and trust bundle.
pub fn server_config(manager: &CertManager) -> Result<Arc<ServerConfig>, TlsSetupError> {
    let err = |e: &dyn std::fmt::Display| TlsSetupError(e.to_string());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for der in CertificateDer::pem_slice_iter(manager.trust_bundle().pem().as_bytes()) {
        roots.add(der.map_err(|e| err(&e))?).map_err(|e| err(&e))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| err(&e))?;
    let cert = manager.server_certificate().map_err(|e| err(&e))?;
    let chain = CertificateDer::pem_slice_iter(cert.chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(&e))?;
    let key = PrivateKeyDer::from_pem_slice(cert.key.secret_pem().as_bytes())
        .map_err(|_| TlsSetupError("meshd's serving key is not PKCS#8 PEM".into()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| err(&e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| err(&e))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Accepts connections on `listener` and yields those whose TLS handshake (with a
/// client certificate) succeeded. Failed handshakes are logged and dropped.
pub fn incoming(
    listener: TcpListener,
    manager: Arc<CertManager>,
) -> Result<ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>>, TlsSetupError> {
    let mut changes = manager.changes();
    let mut acceptor = TlsAcceptor::from(server_config(&manager)?);
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!("xDS accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = tx.closed() => break,
            };
            if changes.has_changed().unwrap_or(false) {
                changes.borrow_and_update();
                match server_config(&manager) {
                    Ok(config) => acceptor = TlsAcceptor::from(config),
                    Err(e) => tracing::error!("{e}; keeping the previous TLS config"),
                }
            }
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => tracing::warn!(%peer, "xDS TLS handshake failed: {e}"),
                    Err(_) => tracing::warn!(%peer, "xDS TLS handshake timed out"),
                }
            });
        }
    });
    Ok(ReceiverStream::new(rx))
}
