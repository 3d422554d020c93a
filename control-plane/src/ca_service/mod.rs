//! `meshd.ca.v1.CertificateAuthority` on the xDS port: how a pod gets its identity.
//!
//! A caller is one of:
//! - **a pod**, by its projected ServiceAccount token (`authorization: Bearer …`,
//!   audience `--token-audience`), Kubernetes mode only. [`token::TokenReviewer`] has
//!   the API server confirm the token, its ServiceAccount and its bound pod; then, at
//!   every call (a review may come from the cache), meshd's own view of the mesh must
//!   hold that pod, with that uid, running as that ServiceAccount. A mismatch is
//!   refused; when the review behind it is older than [`token::RECHECK_AFTER`], meshd
//!   first asks the API server again, so a deleted pod's token is soon refused with
//!   the API server's reason, and a token whose pod meshd does not see costs at most
//!   one review per that interval.
//! - **a certificate of the mesh** (mutual TLS), for renewal: it may ask for exactly the
//!   identity it already holds.
//!
//! When a token is present it decides, certificate or not. The CSR must then name the
//! caller's identity ([`meshd_ca::csr`] checks signature, key and names) and is signed
//! for at most `--workload-cert-ttl` ([`CertManager::sign_csr`]). One log line per
//! certificate (pod, identity, serial, expiry); refusals are logged (throttled) and
//! returned with a status that says which check failed.
//!
//! `WatchTrustBundle` takes the same credentials and streams the bundle, then every
//! change of it, so an agent hears of a root rotation's steps at once.

pub mod token;

use std::sync::Arc;
use std::time::Duration;

use meshd_ca::SpiffeId;
use meshd_ca::csr::{Csr, CsrError};
use meshd_proto::ca::certificate_authority_server::{
    CertificateAuthority, CertificateAuthorityServer,
};
use meshd_proto::ca::{SignRequest, SignResponse, TrustBundle, WatchTrustBundleRequest};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status};

use crate::identity::CertManager;
use crate::logging::{Escaped, Throttle};
use crate::metrics::{self, metrics};
use crate::model::{MeshSnapshot, ObjectKey};
use crate::throttled_warn;
use crate::xds::serve::node::peer_identity;
use token::{PodCaller, TokenError, TokenReviewer};

/// Refusals any peer can cause at will: at most 20 lines per 10 s.
static REFUSED: Throttle = Throttle::new(20, Duration::from_secs(10));

/// The largest Sign request: a CSR is well under 1 KiB.
const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Token authentication: the reviewer and meshd's view of the pods.
#[derive(Debug)]
pub struct PodTokens {
    pub reviewer: TokenReviewer,
    pub mesh: watch::Receiver<Arc<MeshSnapshot>>,
}

#[derive(Debug, Clone)]
pub struct CaService {
    certs: Arc<CertManager>,
    /// `None` outside Kubernetes mode: only mutual TLS renewal.
    tokens: Option<Arc<PodTokens>>,
}

/// Who is asking.
#[derive(Debug, Clone)]
enum Caller {
    Pod { id: SpiffeId, pod: PodCaller },
    Certificate(SpiffeId),
}

impl Caller {
    fn id(&self) -> &SpiffeId {
        match self {
            Caller::Pod { id, .. } | Caller::Certificate(id) => id,
        }
    }

    fn auth(&self) -> &'static str {
        match self {
            Caller::Pod { .. } => "token",
            Caller::Certificate(_) => "certificate",
        }
    }
}

/// Why a call is refused: a status code, a metric reason and the message.
#[derive(Debug)]
struct Refusal {
    code: Code,
    reason: &'static str,
    message: String,
}

impl Refusal {
    fn new(code: Code, reason: &'static str, message: impl Into<String>) -> Refusal {
        Refusal {
            code,
            reason,
            message: message.into(),
        }
    }
}

impl From<TokenError> for Refusal {
    fn from(e: TokenError) -> Refusal {
        let code = match e {
            TokenError::Unavailable(_) => Code::Unavailable,
            _ => Code::Unauthenticated,
        };
        Refusal::new(code, e.reason(), e.to_string())
    }
}

impl From<CsrError> for Refusal {
    fn from(e: CsrError) -> Refusal {
        match e {
            CsrError::WrongIdentity { .. } => {
                Refusal::new(Code::PermissionDenied, "csr_identity", e.to_string())
            }
            _ => Refusal::new(Code::InvalidArgument, "csr_invalid", e.to_string()),
        }
    }
}

impl CaService {
    pub fn new(certs: Arc<CertManager>, tokens: Option<PodTokens>) -> CaService {
        CaService {
            certs,
            tokens: tokens.map(Arc::new),
        }
    }

    pub fn into_service(self) -> CertificateAuthorityServer<CaService> {
        CertificateAuthorityServer::new(self).max_decoding_message_size(MAX_REQUEST_BYTES)
    }

    /// Who the caller is, or why it is refused (logged and counted here).
    async fn authenticate<T>(&self, request: &Request<T>, call: &str) -> Result<Caller, Status> {
        let result = self.caller(request).await;
        result.map_err(|r| self.refuse(request, call, r))
    }

    fn refuse<T>(&self, request: &Request<T>, call: &str, r: Refusal) -> Status {
        metrics()
            .ca_refused
            .get_or_create(&metrics::ReasonLabel { reason: r.reason })
            .inc();
        let peer = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        throttled_warn!(REFUSED, %peer, call, "refused a CA call: {}", Escaped(&r.message));
        Status::new(r.code, r.message)
    }

    async fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Refusal> {
        if let Some(token) = bearer(request)? {
            let Some(tokens) = &self.tokens else {
                return Err(Refusal::new(
                    Code::Unauthenticated,
                    "token_unsupported",
                    "ServiceAccount tokens are accepted only with --source kubernetes; \
                     renew with the mesh certificate you hold (mutual TLS)",
                ));
            };
            return self.pod_caller(tokens, &token).await;
        }
        let certs = request.peer_certs();
        let id = peer_identity(certs.as_ref().map(|c| c.as_slice())).map_err(|e| {
            let code = match e {
                crate::xds::serve::node::IdentityError::NoCertificate => Code::Unauthenticated,
                _ => Code::PermissionDenied,
            };
            let hint = if self.tokens.is_some() {
                "present the pod's ServiceAccount token (authorization: Bearer …) or a \
                 certificate of the mesh"
            } else {
                "present a certificate of the mesh (meshd reviews ServiceAccount tokens \
                 only with --source kubernetes)"
            };
            Refusal::new(code, "no_credential", format!("{e}: {hint}"))
        })?;
        if id.trust_domain() != self.certs.trust_domain() {
            return Err(Refusal::new(
                Code::PermissionDenied,
                "foreign_trust_domain",
                format!(
                    "the client certificate is {id}, of trust domain {:?}; this mesh is {:?}",
                    id.trust_domain(),
                    self.certs.trust_domain()
                ),
            ));
        }
        Ok(Caller::Certificate(id))
    }

    /// The pod a token speaks for, checked against meshd's view of the mesh.
    async fn pod_caller(&self, tokens: &PodTokens, token: &str) -> Result<Caller, Refusal> {
        let (mut pod, reviewed_at) = tokens.reviewer.review(token).await?;
        let mut mismatch = view_mismatch(&tokens.mesh, &pod);
        let stale = reviewed_at.elapsed().unwrap_or_default() >= token::RECHECK_AFTER;
        if mismatch.is_some() && stale {
            // The cached review may be stale (the pod deleted since): ask again, at
            // most once per RECHECK_AFTER for a token.
            tokens.reviewer.forget(token);
            pod = tokens.reviewer.review(token).await?.0;
            mismatch = view_mismatch(&tokens.mesh, &pod);
        }
        if let Some(refusal) = mismatch {
            return Err(refusal);
        }
        let id = SpiffeId::new(
            self.certs.trust_domain(),
            &pod.namespace,
            &pod.service_account,
        )
        .map_err(|e| Refusal::new(Code::PermissionDenied, "bad_identity", e.to_string()))?;
        Ok(Caller::Pod { id, pod })
    }
}

/// Whether meshd's own view holds the token's pod as the API server described it.
fn view_mismatch(mesh: &watch::Receiver<Arc<MeshSnapshot>>, pod: &PodCaller) -> Option<Refusal> {
    let key = ObjectKey::new(&pod.namespace, &pod.pod);
    let snapshot = mesh.borrow().clone();
    let Some(workload) = snapshot.workloads.get(&key) else {
        return Some(Refusal::new(
            Code::Unavailable,
            "pod_unknown",
            format!(
                "pod {key} is not in meshd's view of the mesh (yet): meshd watches only the \
                 mesh's namespaces, and a pod created a moment ago may not have reached it; \
                 retry"
            ),
        ));
    };
    if workload.uid.as_deref() != Some(pod.pod_uid.as_str()) {
        return Some(Refusal::new(
            Code::PermissionDenied,
            "pod_uid",
            format!(
                "the token is bound to pod {key} with uid {}, but that pod now has uid {}: \
                 the token's pod is gone",
                pod.pod_uid,
                workload.uid.as_deref().unwrap_or("(none)")
            ),
        ));
    }
    if workload.service_account != pod.service_account {
        return Some(Refusal::new(
            Code::PermissionDenied,
            "pod_service_account",
            format!(
                "the token is for ServiceAccount {:?}, but pod {key} runs as {:?}",
                pod.service_account, workload.service_account
            ),
        ));
    }
    None
}

/// The bearer token of the call, if it carries one.
fn bearer<T>(request: &Request<T>) -> Result<Option<String>, Refusal> {
    let Some(value) = request.metadata().get(meshd_proto::AUTHORIZATION) else {
        return Ok(None);
    };
    let malformed = || {
        Refusal::new(
            Code::Unauthenticated,
            "token_malformed",
            "the authorization metadata must be `Bearer <token>`",
        )
    };
    let text = value.to_str().map_err(|_| malformed())?;
    let token = text
        .strip_prefix(meshd_proto::BEARER)
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(malformed)?;
    Ok(Some(token.to_string()))
}

fn to_proto_bundle(trust_domain: &str, bundle: &meshd_ca::TrustBundle) -> TrustBundle {
    TrustBundle {
        trust_domain: trust_domain.to_string(),
        roots_pem: bundle.roots().to_vec(),
    }
}

type BundleStream = ReceiverStream<Result<TrustBundle, Status>>;

#[tonic::async_trait]
impl CertificateAuthority for CaService {
    async fn sign(&self, request: Request<SignRequest>) -> Result<Response<SignResponse>, Status> {
        let caller = self.authenticate(&request, "Sign").await?;
        let checked = (|| {
            let body = request.get_ref();
            let csr = Csr::from_pem(&body.csr_pem)?;
            csr.check_identity(caller.id())?;
            let ttl = match &body.lifetime {
                None => self.certs.workload_ttl(),
                Some(d) if d.seconds < 1 || d.nanos < 0 => {
                    return Err(Refusal::new(
                        Code::InvalidArgument,
                        "lifetime",
                        "lifetime must be at least 1s (or unset: meshd's --workload-cert-ttl)",
                    ));
                }
                Some(d) => Duration::new(d.seconds as u64, d.nanos as u32),
            };
            Ok((csr, ttl))
        })();
        let (csr, ttl) = checked.map_err(|r| self.refuse(&request, "Sign", r))?;
        let (signed, bundle) = self.certs.sign_csr(&csr, caller.id(), ttl).map_err(|e| {
            tracing::error!(identity = %caller.id(), "cannot sign a CSR: {e}");
            Status::internal(format!("meshd cannot sign now: {e}"))
        })?;
        metrics()
            .ca_signed
            .get_or_create(&metrics::AuthLabel {
                auth: caller.auth(),
            })
            .inc();
        let not_after = humantime::format_rfc3339_seconds(signed.not_after).to_string();
        match &caller {
            Caller::Pod { pod, .. } => tracing::info!(
                pod = %ObjectKey::new(&pod.namespace, &pod.pod),
                identity = %caller.id(),
                serial = %signed.serial_hex(),
                %not_after,
                "signed a workload certificate (ServiceAccount token)"
            ),
            Caller::Certificate(_) => tracing::info!(
                identity = %caller.id(),
                serial = %signed.serial_hex(),
                %not_after,
                "signed a workload certificate (renewal over mutual TLS)"
            ),
        }
        let since_epoch = signed
            .not_after
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Ok(Response::new(SignResponse {
            certificate_chain_pem: signed.chain_pem.clone(),
            trust_bundle: Some(to_proto_bundle(self.certs.trust_domain(), &bundle)),
            spiffe_id: caller.id().to_string(),
            serial: signed.serial_hex(),
            not_after: Some(prost_types::Timestamp {
                seconds: since_epoch.as_secs() as i64,
                nanos: 0,
            }),
        }))
    }

    type WatchTrustBundleStream = BundleStream;

    async fn watch_trust_bundle(
        &self,
        request: Request<WatchTrustBundleRequest>,
    ) -> Result<Response<BundleStream>, Status> {
        self.authenticate(&request, "WatchTrustBundle").await?;
        let certs = self.certs.clone();
        let mut changes = certs.changes();
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(async move {
            let mut sent: Option<meshd_ca::TrustBundle> = None;
            loop {
                changes.borrow_and_update();
                let bundle = certs.trust_bundle();
                if sent.as_ref() != Some(&bundle) {
                    let message = to_proto_bundle(certs.trust_domain(), &bundle);
                    if tx.send(Ok(message)).await.is_err() {
                        break;
                    }
                    sent = Some(bundle);
                }
                tokio::select! {
                    changed = changes.changed() => if changed.is_err() { break },
                    _ = tx.closed() => break,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
