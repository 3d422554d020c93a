//! Operator credentials: how `meshctl` (and anything else an operator runs) proves to
//! meshd's admin API that it may debug and change meshd.
//!
//! An operator is whoever holds a client certificate for
//! `spiffe://<td>/meshd/operator/<name>` from the mesh CA ([`meshd_ca::OperatorId`]).
//! There are two ways to hold one:
//!
//! - **minted on the spot** from the CA directory ([`Credentials::mint`]): whoever can
//!   read the root key (`root-key.pem`, mode 0600) is an operator. `meshctl` does this
//!   by default with `--ca-dir`; the certificate lives 10 minutes and only in memory.
//! - **issued for later** (`meshctl ca operator-cert -o DIR`, [`Credentials::write`]):
//!   `operator-cert.pem`, `operator-key.pem` (0600) and `operator-ca.pem` (the trust
//!   bundle), for an operator who should not hold the root key, and for clusters,
//!   where the root lives in a Secret.
//!
//! The client side checks meshd too: its certificate must chain to the bundle and name
//! meshd's own identity (`spiffe://<td>/ns/<meshd namespace>/sa/meshd`), whatever host
//! name or address the admin API was reached by (a port-forward, a tunnel).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use meshd_ca::{Authority, OperatorId, PrivateKeyPem, SpiffeId};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// How long a certificate minted for one command lives.
pub const MINTED_TTL: Duration = Duration::from_secs(600);

pub const CERT_FILE: &str = "operator-cert.pem";
pub const KEY_FILE: &str = "operator-key.pem";
pub const BUNDLE_FILE: &str = "operator-ca.pem";

#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error("cannot issue an operator certificate: {0}")]
    Issue(#[from] meshd_ca::CaError),
    #[error("operator name {0}")]
    Name(#[from] meshd_ca::SpiffeIdError),
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("cannot set up TLS for the admin API: {0}")]
    Tls(String),
}

/// An operator's certificate and key, and the roots meshd's certificate must chain to.
#[derive(Debug)]
pub struct Credentials {
    pub id: OperatorId,
    chain_pem: String,
    key: PrivateKeyPem,
    trust_bundle_pem: String,
}

impl Credentials {
    /// A certificate for operator `name`, valid for `ttl`, signed by `authority`;
    /// `trust_bundle_pem` is every root meshd may serve with (during a root rotation,
    /// the next one too).
    pub fn mint(
        authority: &Authority,
        trust_bundle_pem: String,
        name: &str,
        ttl: Duration,
    ) -> Result<Credentials, OperatorError> {
        let id = OperatorId::new(&authority.config().trust_domain, name)?;
        let cert = authority.issue_operator(&id, ttl)?;
        Ok(Credentials {
            id,
            chain_pem: cert.chain_pem,
            key: cert.key,
            trust_bundle_pem,
        })
    }

    /// Reads credentials that [`Credentials::write`] wrote into `dir`.
    pub fn load(dir: &Path) -> Result<Credentials, OperatorError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|e| OperatorError::File {
                path,
                message: format!(
                    "{e} (write operator credentials with `meshctl ca operator-cert -o {}`)",
                    dir.display()
                ),
            })
        };
        let chain_pem = read(CERT_FILE)?;
        let key = PrivateKeyPem::new(read(KEY_FILE)?);
        let trust_bundle_pem = read(BUNDLE_FILE)?;
        let leaf = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .next()
            .and_then(|c| c.ok())
            .ok_or_else(|| OperatorError::File {
                path: dir.join(CERT_FILE),
                message: "holds no PEM certificate".into(),
            })?;
        let id = crate::tls::leaf_uri(&leaf)
            .and_then(|uri| uri.parse::<OperatorId>().map_err(|e| e.to_string()))
            .map_err(|message| OperatorError::File {
                path: dir.join(CERT_FILE),
                message: format!("not an operator certificate: {message}"),
            })?;
        Ok(Credentials {
            id,
            chain_pem,
            key,
            trust_bundle_pem,
        })
    }

    /// Writes the three files into `dir` (the key with mode 0600).
    pub fn write(&self, dir: &Path) -> Result<(), OperatorError> {
        std::fs::create_dir_all(dir).map_err(|e| OperatorError::File {
            path: dir.to_path_buf(),
            message: e.to_string(),
        })?;
        for (name, text, mode) in [
            (CERT_FILE, self.chain_pem.as_str(), 0o644),
            (KEY_FILE, self.key.secret_pem(), 0o600),
            (BUNDLE_FILE, self.trust_bundle_pem.as_str(), 0o644),
        ] {
            let path = dir.join(name);
            meshd_ca::store::write_file(&path, text, mode, true).map_err(|e| {
                OperatorError::File {
                    path,
                    message: e.to_string(),
                }
            })?;
        }
        Ok(())
    }

    /// An HTTPS client for the admin API of the meshd whose identity is `meshd`.
    pub fn client(&self, meshd: &SpiffeId) -> Result<reqwest::Client, OperatorError> {
        let tls = |e: &dyn std::fmt::Display| OperatorError::Tls(e.to_string());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for der in CertificateDer::pem_slice_iter(self.trust_bundle_pem.as_bytes()) {
            roots.add(der.map_err(|e| tls(&e))?).map_err(|e| tls(&e))?;
        }
        let chain = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| tls(&e))?;
        let verifier = Arc::new(MeshdOnly {
            chain,
            meshd: meshd.to_string(),
        });
        let certs = CertificateDer::pem_slice_iter(self.chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| tls(&e))?;
        let key = PrivateKeyDer::from_pem_slice(self.key.secret_pem().as_bytes())
            .map_err(|_| tls(&"the operator key is not PKCS#8 PEM"))?;
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| tls(&e))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(certs, key)
            .map_err(|e| tls(&e))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        reqwest::Client::builder()
            .tls_backend_preconfigured(config)
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| tls(&e))
    }
}

/// meshd's certificate: it chains to the bundle and names meshd's SPIFFE id. The DNS
/// name or address the client dialled does not matter.
#[derive(Debug)]
struct MeshdOnly {
    chain: Arc<WebPkiServerVerifier>,
    meshd: String,
}

impl ServerCertVerifier for MeshdOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
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
        match crate::tls::leaf_uri(end_entity) {
            Ok(uri) if uri == self.meshd => Ok(ServerCertVerified::assertion()),
            Ok(uri) => Err(rustls::Error::General(format!(
                "the admin API presented {uri}, expected meshd's identity {} (--meshd-namespace?)",
                self.meshd
            ))),
            Err(e) => Err(rustls::Error::General(format!(
                "the admin API's certificate: {e}"
            ))),
        }
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
