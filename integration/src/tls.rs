//! A TLS client for probing sidecars directly: what certificate does a port present,
//! and does it let a given client in?

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use meshd_proto::client::SpiffeServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::xds_client::ClientCert;

/// What a server certificate says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub uri_sans: Vec<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub serial: String,
}

pub fn cert_info(der: &[u8]) -> anyhow::Result<CertInfo> {
    let (_, cert) = X509Certificate::from_der(der)?;
    let uri_sans = cert
        .subject_alternative_name()?
        .map(|s| {
            s.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(u.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let t = |ts: i64| UNIX_EPOCH + Duration::from_secs(ts.max(0) as u64);
    Ok(CertInfo {
        uri_sans,
        not_before: t(cert.validity().not_before.timestamp()),
        not_after: t(cert.validity().not_after.timestamp()),
        serial: cert.raw_serial_as_string(),
    })
}

/// Connects with TLS to `addr`, trusting `trust_bundle_pem`, presenting `client` if
/// given. Returns the stream and the server's leaf certificate.
pub async fn connect(
    addr: SocketAddr,
    trust_bundle_pem: &str,
    client: Option<&ClientCert>,
) -> anyhow::Result<(TlsStream<TcpStream>, CertInfo)> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for der in CertificateDer::pem_slice_iter(trust_bundle_pem.as_bytes()) {
        roots.add(der?)?;
    }
    // Chain only: the test checks the SAN itself.
    let verifier = SpiffeServerVerifier::new(roots, provider.clone(), None)?;
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let config = match client {
        Some(c) => builder.with_client_auth_cert(
            CertificateDer::pem_slice_iter(c.chain_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()?,
            PrivateKeyDer::from_pem_slice(c.key_pem().as_bytes())?,
        )?,
        None => builder.with_no_client_auth(),
    };
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    let tls = tokio::time::timeout(
        Duration::from_secs(5),
        TlsConnector::from(Arc::new(config)).connect(ServerName::try_from("mesh.invalid")?, tcp),
    )
    .await
    .context("TLS handshake timed out")??;
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .context("the server presented no certificate")?;
    let info = cert_info(leaf)?;
    Ok((tls, info))
}

/// Sends a plain HTTP/1.1 GET over `stream` and returns whatever came back.
pub async fn raw_http_get<S>(stream: &mut S) -> anyhow::Result<String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: probe\r\nconnection: close\r\n\r\n")
        .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf))
        .await
        .context("no answer within 5s")??;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}
