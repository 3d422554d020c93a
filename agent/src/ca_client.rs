//! meshd's CA service (`meshd.ca.v1.CertificateAuthority`, on the xDS port), as the
//! agent calls it.
//!
//! Every call dials afresh with the credential of the moment: the token as it is in
//! the file now, or the certificate the agent holds now (a renewal presents the
//! certificate it replaces). meshd must present its own SPIFFE id, checked against the
//! roots the agent trusts at that moment. Refusals keep meshd's reason; it is logged
//! Debug-quoted (escaped) since the agent did not write it.

use std::time::Duration;

use meshd_proto::ca::certificate_authority_client::CertificateAuthorityClient;
use meshd_proto::ca::{SignRequest, SignResponse, TrustBundle, WatchTrustBundleRequest};
use meshd_proto::{AUTHORIZATION, BEARER};
use tonic::Streaming;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

/// How long one `Sign` may take, connection included.
const SIGN_TIMEOUT: Duration = Duration::from_secs(15);
/// The longest message of meshd's the agent logs.
const MAX_LOGGED: usize = 512;

/// What proves the pod to meshd in one call.
pub enum Credential<'a> {
    /// A pod-bound ServiceAccount token (no client certificate).
    Token(&'a str),
    /// A mesh certificate and its key (mutual TLS).
    Certificate {
        chain_pem: &'a str,
        key_pem: &'a str,
    },
}

/// Why a call failed. `Display` is safe to log: meshd's words are escaped and cut,
/// and no credential is ever part of it.
#[derive(Debug)]
pub enum CallError {
    /// meshd answered with a status (or tonic made one of a transport failure).
    Status {
        code: tonic::Code,
        message: String,
        cause: Option<String>,
    },
    /// The call could not even be made (a bad trust bundle or client certificate).
    Setup(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Status {
                code,
                message,
                cause,
            } => {
                write!(f, "{code:?}: {:?}", cut(message))?;
                if let Some(cause) = cause {
                    write!(f, " ({:?})", cut(cause))?;
                }
                Ok(())
            }
            CallError::Setup(m) => f.write_str(m),
        }
    }
}

fn cut(s: &str) -> &str {
    if s.len() <= MAX_LOGGED {
        return s;
    }
    let mut end = MAX_LOGGED;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl From<tonic::Status> for CallError {
    fn from(status: tonic::Status) -> Self {
        // A transport failure hides its reason (refused, TLS) in the source chain.
        let mut causes = Vec::new();
        let mut source = std::error::Error::source(&status);
        while let Some(e) = source {
            causes.push(e.to_string());
            source = e.source();
        }
        CallError::Status {
            code: status.code(),
            message: status.message().to_string(),
            cause: (!causes.is_empty()).then(|| causes.join(": ")),
        }
    }
}

/// meshd's CA service at one address.
#[derive(Debug, Clone)]
pub struct CaClient {
    address: String,
    meshd_identity: String,
}

impl CaClient {
    pub fn new(address: String, meshd_identity: String) -> CaClient {
        CaClient {
            address,
            meshd_identity,
        }
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    fn client(
        &self,
        roots_pem: &str,
        credential: &Credential<'_>,
    ) -> Result<CertificateAuthorityClient<Channel>, CallError> {
        let client_cert = match credential {
            Credential::Token(_) => None,
            Credential::Certificate { chain_pem, key_pem } => Some((*chain_pem, *key_pem)),
        };
        let tls = meshd_proto::client::tls_config(roots_pem, &self.meshd_identity, client_cert)
            .map_err(|e| CallError::Setup(e.to_string()))?;
        let channel = meshd_proto::client::channel(&self.address, tls)
            .map_err(|e| CallError::Setup(e.to_string()))?;
        Ok(CertificateAuthorityClient::new(channel))
    }

    fn request<T>(message: T, credential: &Credential<'_>) -> Result<tonic::Request<T>, CallError> {
        let mut request = tonic::Request::new(message);
        if let Credential::Token(token) = credential {
            let mut value = MetadataValue::try_from(format!("{BEARER}{token}")).map_err(|_| {
                CallError::Setup("the token holds characters a header cannot carry".into())
            })?;
            value.set_sensitive(true);
            request.metadata_mut().insert(AUTHORIZATION, value);
        }
        Ok(request)
    }

    /// `Sign` for `csr_pem`, at meshd's lifetime for workload certificates.
    pub async fn sign(
        &self,
        roots_pem: &str,
        credential: &Credential<'_>,
        csr_pem: String,
    ) -> Result<SignResponse, CallError> {
        let mut client = self.client(roots_pem, credential)?;
        let mut request = Self::request(
            SignRequest {
                csr_pem,
                lifetime: None,
            },
            credential,
        )?;
        request.set_timeout(SIGN_TIMEOUT);
        let response = tokio::time::timeout(SIGN_TIMEOUT, client.sign(request))
            .await
            .map_err(|_| tonic::Status::deadline_exceeded("no answer within 15s"))??;
        Ok(response.into_inner())
    }

    /// Opens `WatchTrustBundle`: the bundle now, then at each change.
    pub async fn watch_trust_bundle(
        &self,
        roots_pem: &str,
        credential: &Credential<'_>,
    ) -> Result<Streaming<TrustBundle>, CallError> {
        let mut client = self.client(roots_pem, credential)?;
        let request = Self::request(WatchTrustBundleRequest {}, credential)?;
        let response = tokio::time::timeout(SIGN_TIMEOUT, client.watch_trust_bundle(request))
            .await
            .map_err(|_| tonic::Status::deadline_exceeded("no answer within 15s"))??;
        Ok(response.into_inner())
    }
}

/// A bundle as one PEM text, one root after the other, each ending in a newline.
pub fn bundle_pem(bundle: &TrustBundle) -> String {
    let mut pem = String::new();
    for root in &bundle.roots_pem {
        pem.push_str(root.trim_end());
        pem.push('\n');
    }
    pem
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meshd_s_message_is_logged_escaped_and_cut() {
        let err = CallError::from(tonic::Status::permission_denied(format!(
            "no\nforged line{}",
            "x".repeat(2000)
        )));
        let shown = err.to_string();
        assert!(
            shown.starts_with("PermissionDenied: \"no\\nforged line"),
            "{shown}"
        );
        assert!(!shown.contains('\n'));
        assert!(shown.len() < 600, "{}", shown.len());
    }
}
