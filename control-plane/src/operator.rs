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
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use meshd_proto::client::SpiffeServerVerifier;

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
    #[error("--admin {0}")]
    Address(String),
    #[error("{0}")]
    Request(String),
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
        let id = meshd_ca::leaf_uri(&leaf)
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

    /// A client for the admin API at `base` (`https://host:port`) of the meshd whose
    /// identity is `meshd`.
    pub fn client(&self, base: &str, meshd: &SpiffeId) -> Result<AdminClient, OperatorError> {
        let tls = |e: &dyn std::fmt::Display| OperatorError::Tls(e.to_string());
        let authority = base
            .strip_prefix("https://")
            .map(|rest| rest.trim_end_matches('/'))
            .filter(|a| !a.is_empty() && !a.contains('/'))
            .ok_or_else(|| {
                OperatorError::Address(format!(
                    "{base:?}: meshd's admin API is HTTPS, give https://<host>:<port>"
                ))
            })?
            .to_string();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for der in CertificateDer::pem_slice_iter(self.trust_bundle_pem.as_bytes()) {
            roots.add(der.map_err(|e| tls(&e))?).map_err(|e| tls(&e))?;
        }
        let verifier = Arc::new(
            SpiffeServerVerifier::new(roots, provider.clone(), Some(meshd.to_string()))
                .map_err(|e| tls(&e))?,
        );
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
        Ok(AdminClient {
            authority,
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        })
    }
}

/// HTTPS to meshd's admin API as an operator: one connection per request (the admin
/// API is called a few times per command, never on a hot path).
#[derive(Clone)]
pub struct AdminClient {
    /// `host:port`
    authority: String,
    connector: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for AdminClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminClient")
            .field("authority", &self.authority)
            .finish_non_exhaustive()
    }
}

/// An answer of the admin API.
#[derive(Debug)]
pub struct AdminResponse {
    pub status: hyper::StatusCode,
    pub body: Vec<u8>,
}

impl AdminResponse {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl AdminClient {
    /// `method path` with an optional JSON body; the whole answer.
    pub async fn request(
        &self,
        method: hyper::Method,
        path: &str,
        json: Option<Vec<u8>>,
    ) -> Result<AdminResponse, OperatorError> {
        use http_body_util::{BodyExt, Full};
        let failed = |e: &dyn std::fmt::Display| {
            OperatorError::Request(format!("https://{}{path}: {e}", self.authority))
        };
        let tcp = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::TcpStream::connect(&self.authority),
        )
        .await
        .map_err(|_| failed(&"no connection within 5s"))?
        .map_err(|e| failed(&e))?;
        // meshd is identified by its SPIFFE id, not by this name.
        let name = rustls::pki_types::ServerName::try_from("meshd").map_err(|e| failed(&e))?;
        let tls = tokio::time::timeout(Duration::from_secs(5), self.connector.connect(name, tcp))
            .await
            .map_err(|_| failed(&"TLS handshake timed out"))?
            .map_err(|e| failed(&e))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(|e| failed(&e))?;
        tokio::spawn(conn);
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "localhost");
        if json.is_some() {
            request = request.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(bytes::Bytes::from(json.unwrap_or_default())))
            .map_err(|e| failed(&e))?;
        let response = tokio::time::timeout(Duration::from_secs(30), sender.send_request(request))
            .await
            .map_err(|_| failed(&"no answer within 30s"))?
            .map_err(|e| failed(&e))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| failed(&e))?
            .to_bytes()
            .to_vec();
        Ok(AdminResponse { status, body })
    }

    /// `GET path`, decoded from JSON; a non-2xx answer is an error with its body.
    pub async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
    ) -> Result<T, OperatorError> {
        self.call_json(hyper::Method::GET, path, None::<&()>).await
    }

    /// `method path` with a JSON body, decoded from JSON; a non-2xx answer is an error.
    pub async fn call_json<T: serde::de::DeserializeOwned, B: serde::Serialize>(
        &self,
        method: hyper::Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, OperatorError> {
        let json = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| OperatorError::Request(e.to_string()))?;
        let response = self.request(method, path, json).await?;
        if !response.status.is_success() {
            return Err(OperatorError::Request(format!(
                "https://{}{path}: {}: {}",
                self.authority,
                response.status,
                response.text().trim()
            )));
        }
        serde_json::from_slice(&response.body).map_err(|e| {
            OperatorError::Request(format!(
                "https://{}{path}: unexpected answer: {e}",
                self.authority
            ))
        })
    }
}
