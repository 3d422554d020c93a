//! TLS on meshd's authenticated ports. meshd presents its own certificate from the mesh
//! CA and requires a client certificate that chains to the trust bundle:
//!
//! - [`Port::Xds`]: any mesh certificate, or none: the CA service
//!   ([`crate::ca_service`]) takes a pod's ServiceAccount token instead, so a pod
//!   with no certificate yet reaches one address. Every ADS stream still needs a
//!   verified certificate: the ADS server derives the proxy's workload identity from
//!   it and refuses a stream without one ([`crate::xds::serve::node`]).
//! - [`Port::Admin`]: only an operator's certificate
//!   (`spiffe://<td>/meshd/operator/<name>`, [`meshd_ca::OperatorId`]); a workload's is
//!   refused in the handshake (the log says why), so no request of a sidecar or a
//!   web page ever reaches the admin API.
//!
//! - [`Port::Webhook`]: no client certificate (the API server calling meshd's
//!   admission webhooks presents none); it serves only answers to AdmissionReviews,
//!   which change nothing in meshd. The API server checks meshd's certificate against
//!   the `caBundle` meshd keeps in its webhook configuration
//!   ([`crate::cluster::webhook_ca`]) and by DNS name (`<service>.<namespace>.svc`).
//!
//! Clients of mesh servers (meshctl towards the admin API, agents towards the xDS port,
//! tests towards sidecars) verify them with [`meshd_proto::client::SpiffeServerVerifier`]:
//! the chain, and the SPIFFE id rather than a DNS name.
//!
//! The handshake runs here, off the accept loop, bounded by [`HANDSHAKE_TIMEOUT`]; the
//! servers get finished TLS streams. Failed handshakes are counted
//! (`meshd_tls_handshake_failures_total{port}`) and logged through a
//! [`Throttle`](crate::logging::Throttle), so a flood of them cannot flood the log.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use meshd_ca::{OperatorId, leaf_uri};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

use crate::identity::CertManager;
use crate::logging::Throttle;
use crate::metrics::{self, metrics};
use crate::throttled_warn;

pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Which of meshd's ports, and so which client certificates it admits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    Xds,
    Admin,
    Webhook,
}

impl Port {
    pub fn name(self) -> &'static str {
        match self {
            Port::Xds => "xds",
            Port::Admin => "admin",
            Port::Webhook => "webhook",
        }
    }

    fn alpn(self) -> Vec<Vec<u8>> {
        match self {
            Port::Xds => vec![b"h2".to_vec()],
            Port::Admin => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            Port::Webhook => vec![b"http/1.1".to_vec()],
        }
    }

    fn throttle(self) -> &'static Throttle {
        static XDS: Throttle = Throttle::new(10, Duration::from_secs(10));
        static ADMIN: Throttle = Throttle::new(10, Duration::from_secs(10));
        static WEBHOOK: Throttle = Throttle::new(10, Duration::from_secs(10));
        match self {
            Port::Xds => &XDS,
            Port::Admin => &ADMIN,
            Port::Webhook => &WEBHOOK,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot set up TLS for the {port} port: {message}")]
pub struct TlsSetupError {
    port: &'static str,
    message: String,
}

/// A rustls server config for `port` from the manager's current certificate and trust
/// bundle.
pub fn server_config(
    manager: &CertManager,
    port: Port,
) -> Result<Arc<ServerConfig>, TlsSetupError> {
    let err = |e: &dyn std::fmt::Display| TlsSetupError {
        port: port.name(),
        message: e.to_string(),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for der in CertificateDer::pem_slice_iter(manager.trust_bundle().pem().as_bytes()) {
        roots.add(der.map_err(|e| err(&e))?).map_err(|e| err(&e))?;
    }
    let chain_verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    let verifier: Arc<dyn ClientCertVerifier> = match port {
        // A certificate, if presented, must verify; none is allowed for the CA service.
        Port::Xds => chain_verifier
            .allow_unauthenticated()
            .build()
            .map_err(|e| err(&e))?,
        Port::Admin => Arc::new(OperatorsOnly {
            chain: chain_verifier.build().map_err(|e| err(&e))?,
            trust_domain: manager.trust_domain().to_string(),
        }),
        // No certificate is asked for.
        Port::Webhook => Arc::new(rustls::server::NoClientAuth),
    };
    let cert = manager.server_certificate().map_err(|e| err(&e))?;
    let chain = CertificateDer::pem_slice_iter(cert.chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(&e))?;
    let key = PrivateKeyDer::from_pem_slice(cert.key.secret_pem().as_bytes())
        .map_err(|_| err(&"meshd's serving key is not PKCS#8 PEM"))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| err(&e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| err(&e))?;
    config.alpn_protocols = port.alpn();
    Ok(Arc::new(config))
}

/// The admin port's client verifier: the chain must verify, and the leaf must name an
/// operator of this trust domain.
#[derive(Debug)]
struct OperatorsOnly {
    chain: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientCertVerifier for OperatorsOnly {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.chain
            .verify_client_cert(end_entity, intermediates, now)?;
        let refused = |why: String| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
                Arc::new(NotAnOperator(why)),
            )))
        };
        let uri = leaf_uri(end_entity).map_err(refused)?;
        let id: OperatorId = uri.parse().map_err(|_| {
            refused(format!(
                "{uri:?} is not an operator id (spiffe://<trust-domain>/meshd/operator/<name>)"
            ))
        })?;
        if id.trust_domain() != self.trust_domain {
            return Err(refused(format!(
                "{id} is an operator of trust domain {:?}, this mesh is {:?}",
                id.trust_domain(),
                self.trust_domain
            )));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("not an operator certificate: {0}")]
struct NotAnOperator(String);

/// The operator a connection to the admin port authenticated as.
pub fn peer_operator(tls: &TlsStream<TcpStream>) -> Option<OperatorId> {
    let leaf = tls.get_ref().1.peer_certificates()?.first()?;
    leaf_uri(leaf).ok()?.parse().ok()
}

/// The stream [`incoming`] returns.
pub type Incoming = ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>>;

/// The next connection of `incoming` and its peer's address, for an axum listener;
/// once the acceptor has stopped, never (a server serves nothing more).
pub async fn next_connection(incoming: &mut Incoming) -> (TlsStream<TcpStream>, SocketAddr) {
    use futures::StreamExt;
    loop {
        match incoming.next().await {
            Some(Ok(tls)) => {
                if let Ok(peer) = tls.get_ref().0.peer_addr() {
                    return (tls, peer);
                }
            }
            Some(Err(_)) => continue,
            None => std::future::pending::<()>().await,
        }
    }
}

/// Accepts connections on `listener` and yields those whose TLS handshake (with a
/// client certificate `port` admits) succeeded. The config follows the manager's
/// certificate changes. Failed handshakes are counted, logged (throttled) and dropped.
pub fn incoming(
    listener: TcpListener,
    manager: Arc<CertManager>,
    port: Port,
) -> Result<Incoming, TlsSetupError> {
    let mut changes = manager.changes();
    let mut acceptor = TlsAcceptor::from(server_config(&manager, port)?);
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(port = port.name(), "accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = tx.closed() => break,
            };
            if changes.has_changed().unwrap_or(false) {
                changes.borrow_and_update();
                match server_config(&manager, port) {
                    Ok(config) => acceptor = TlsAcceptor::from(config),
                    Err(e) => tracing::error!("{e}; keeping the previous TLS config"),
                }
            }
            // Unary calls (the CA service) would otherwise wait for the peer's delayed
            // ACK (40 ms) whenever a response goes out in more than one segment.
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(port = port.name(), "cannot set TCP_NODELAY: {e}");
            }
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let failure =
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send(Ok(tls)).await;
                            return;
                        }
                        Ok(Err(e)) => format!("TLS handshake failed: {e}"),
                        Err(_) => "TLS handshake timed out".to_string(),
                    };
                metrics()
                    .handshake_failures
                    .get_or_create(&metrics::PortLabel { port: port.name() })
                    .inc();
                throttled_warn!(port.throttle(), port = port.name(), %peer, "{failure}");
            });
        }
    });
    Ok(ReceiverStream::new(rx))
}
