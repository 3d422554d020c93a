//! `meshctl authz check`: would this caller be allowed to make this request?
//!
//! The destination is a service port. It is resolved, like a caller's sidecar does, to
//! the endpoints' workloads; for each, the RBAC its inbound listener carries is built by
//! the same function ([`compile::inbound_rbac`](super::compile::inbound_rbac)) and evaluated by [`eval`](super::eval). Workloads
//! of one service can have different policies (selectors), so there is one verdict per
//! workload.

use std::collections::BTreeSet;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::compile as rbac;
use super::eval::{HttpRequest, Request, Verdict};
use crate::model::ObjectKey;
use crate::model::snapshot::MeshSnapshot;

/// `POST /debug/authz/check`
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CheckRequest {
    /// The caller's SPIFFE id; `None` (and no namespace/service account) for a
    /// plaintext caller.
    pub principal: Option<String>,
    /// Instead of `principal`: the caller's namespace and service account, made into a
    /// SPIFFE id in the mesh's trust domain.
    pub source_namespace: Option<String>,
    pub source_service_account: Option<String>,
    pub source_ip: Option<IpAddr>,
    /// The destination service, `<namespace>/<name>`.
    pub service: String,
    /// The service port (not the target port).
    pub port: u16,
    pub method: Option<String>,
    pub path: Option<String>,
    pub host: Option<String>,
    #[serde(default)]
    pub headers: Vec<(String, String)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckResponse {
    pub snapshot_version: u64,
    pub principal: Option<String>,
    pub service: String,
    pub port: u16,
    /// `true` only if every workload behind the service port allows the request.
    pub allowed: bool,
    pub workloads: Vec<WorkloadVerdict>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkloadVerdict {
    pub workload: String,
    pub target_port: u16,
    /// `http` or `tcp`: on TCP only the connection's attributes are checked.
    pub protocol: String,
    /// The policies that select this workload.
    pub policies: Vec<String>,
    #[serde(flatten)]
    pub verdict: Verdict,
}

/// Why a check has no answer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CheckError {
    #[error("give the caller as a SPIFFE id, or as namespace and service account together")]
    BadSource,
    #[error("service must be <namespace>/<name>, not {0:?}")]
    BadService(String),
    #[error("no service {0} in the mesh")]
    NoService(String),
    #[error("service {service} has no port {port} (it has {known})")]
    NoPort {
        service: String,
        port: u16,
        known: String,
    },
    #[error("service {0} port {1} has no endpoint backed by a mesh pod")]
    NoWorkloads(String, u16),
}

/// Evaluates `req` against `mesh`; `trust_domain` names callers given by namespace and
/// service account.
pub fn check(
    mesh: &MeshSnapshot,
    trust_domain: &str,
    req: &CheckRequest,
) -> Result<CheckResponse, CheckError> {
    let principal = match (
        &req.principal,
        &req.source_namespace,
        &req.source_service_account,
    ) {
        (Some(p), None, None) => Some(p.clone()),
        (None, Some(ns), Some(sa)) => Some(format!("spiffe://{trust_domain}/ns/{ns}/sa/{sa}")),
        (None, None, None) => None,
        _ => return Err(CheckError::BadSource),
    };
    let (ns, name) = req
        .service
        .split_once('/')
        .filter(|(ns, name)| !ns.is_empty() && !name.is_empty())
        .ok_or_else(|| CheckError::BadService(req.service.clone()))?;
    let key = ObjectKey::new(ns, name);
    let svc = mesh
        .services
        .get(&key)
        .ok_or_else(|| CheckError::NoService(req.service.clone()))?;
    if !svc.ports.iter().any(|p| p.port == req.port) {
        return Err(CheckError::NoPort {
            service: req.service.clone(),
            port: req.port,
            known: svc
                .ports
                .iter()
                .map(|p| p.port.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    let targets: BTreeSet<(ObjectKey, u16)> = mesh
        .service_endpoints(&key, req.port)
        .iter()
        .filter_map(|e| Some((e.workload.clone()?, e.port)))
        .collect();
    let mut workloads = Vec::new();
    for (wkey, port) in targets {
        let (Some(workload), Some(inbound)) = (
            mesh.workloads.get(&wkey),
            mesh.inbound
                .get(&wkey)
                .and_then(|ports| ports.iter().find(|p| p.port == port)),
        ) else {
            continue;
        };
        let http = inbound.protocol.is_http();
        let request = Request {
            principal: principal.clone(),
            source_ip: req.source_ip,
            port,
            http: http.then(|| HttpRequest {
                method: req.method.clone().unwrap_or_else(|| "GET".to_string()),
                path: req.path.clone().unwrap_or_else(|| "/".to_string()),
                host: req.host.clone().unwrap_or_else(|| svc.key.name.clone()),
                headers: req.headers.clone(),
            }),
        };
        let verdict = rbac::inbound_rbac(mesh, workload, inbound).evaluate(&request);
        workloads.push(WorkloadVerdict {
            workload: wkey.to_string(),
            target_port: port,
            protocol: if http { "http" } else { "tcp" }.to_string(),
            policies: mesh
                .authorization_policies_for(workload)
                .iter()
                .map(|p| format!("{} {}", p.key, p.action.as_str()))
                .collect(),
            verdict,
        });
    }
    if workloads.is_empty() {
        return Err(CheckError::NoWorkloads(req.service.clone(), req.port));
    }
    Ok(CheckResponse {
        snapshot_version: mesh.version,
        principal,
        service: req.service.clone(),
        port: req.port,
        allowed: workloads.iter().all(|w| w.verdict.allowed),
        workloads,
    })
}
