//! Reaching meshd over TLS: the server must present a certificate of the mesh naming
//! meshd's SPIFFE id; the client presents its own certificate when it has one (an
//! agent renewing, meshctl), or none (an agent's first `Sign`, with a token).

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tonic::transport::{Channel, Endpoint, Uri};

use meshd_ca::leaf_uri;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the trust bundle: {0}")]
    TrustBundle(String),
    #[error("the client certificate: {0}")]
    ClientCert(String),
    #[error("meshd's address {address:?}: {message}")]
    Address { address: String, message: String },
}

/// A client TLS config for meshd: trusts `roots_pem`, requires the server to be
/// `meshd_identity`, and presents `client` (chain PEM, key PEM) if given.
pub fn tls_config(
    roots_pem: &str,
    meshd_identity: &str,
    client: Option<(&str, &str)>,
) -> Result<Arc<ClientConfig>, ClientError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for der in CertificateDer::pem_slice_iter(roots_pem.as_bytes()) {
        let der = der.map_err(|e| ClientError::TrustBundle(e.to_string()))?;
        roots
            .add(der)
            .map_err(|e| ClientError::TrustBundle(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(ClientError::TrustBundle("holds no certificate".into()));
    }
    let verifier = SpiffeServerVerifier::new(roots, provider.clone(), Some(meshd_identity.into()))
        .map_err(|e| ClientError::TrustBundle(e.to_string()))?;
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::TrustBundle(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut config = match client {
        Some((chain_pem, key_pem)) => {
            let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ClientError::ClientCert(e.to_string()))?;
            let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
                .map_err(|_| ClientError::ClientCert("the key is not PEM".into()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| ClientError::ClientCert(e.to_string()))?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// A gRPC channel to meshd at `address` (host:port, the host a name or an address),
/// connecting lazily (and again after a failure) with `tls`.
pub fn channel(address: &str, tls: Arc<ClientConfig>) -> Result<Channel, ClientError> {
    let bad = |message: String| ClientError::Address {
        address: address.to_string(),
        message,
    };
    let endpoint = Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| bad(e.to_string()))?
        .connect_timeout(std::time::Duration::from_secs(5));
    let connector = tower::service_fn(move |uri: Uri| {
        let tls = tls.clone();
        async move {
            let host = uri
                .host()
                .unwrap_or_default()
                .trim_matches(['[', ']'])
                .to_string();
            let port = uri.port_u16().unwrap_or(15012);
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            // The name only fills SNI: the verifier checks the SPIFFE id.
            let name = ServerName::try_from("meshd").expect("a valid DNS name");
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    Ok(endpoint.connect_with_connector_lazy(connector))
}

/// A server certificate of the mesh: it must chain to the roots and, if `expected` is
/// given, carry exactly that SPIFFE id. The DNS name or address the client dialled
/// does not matter: mesh certificates name identities, not hosts.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    chain: Arc<rustls::client::WebPkiServerVerifier>,
    expected: Option<String>,
}

impl SpiffeServerVerifier {
    pub fn new(
        roots: rustls::RootCertStore,
        provider: Arc<rustls::crypto::CryptoProvider>,
        expected: Option<String>,
    ) -> Result<Self, rustls::client::VerifierBuilderError> {
        let chain =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()?;
        Ok(SpiffeServerVerifier { chain, expected })
    }
}

impl rustls::client::danger::ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        match self
            .chain
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Ok(_)
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) => {}
            Err(e) => return Err(e),
        }
        let Some(expected) = &self.expected else {
            return Ok(rustls::client::danger::ServerCertVerified::assertion());
        };
        match leaf_uri(end_entity) {
            Ok(uri) if uri == *expected => {
                Ok(rustls::client::danger::ServerCertVerified::assertion())
            }
            Ok(uri) => Err(rustls::Error::General(format!(
                "the server presented {uri}, expected {expected}"
            ))),
            Err(e) => Err(rustls::Error::General(format!(
                "the server's certificate: {e}"
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::client::danger::ServerCertVerifier::verify_tls12_signature(
            &*self.chain,
            message,
            cert,
            dss,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::client::danger::ServerCertVerifier::verify_tls13_signature(
            &*self.chain,
            message,
            cert,
            dss,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::client::danger::ServerCertVerifier::supported_verify_schemes(&*self.chain)
    }
}
