//! meshd's HTTP endpoints, on two ports:
//!
//! - the **health port** ([`health`], `--health-address`, plain HTTP): `GET /healthz`,
//!   `GET /readyz`, `GET /metrics`. Nothing there is secret or changes anything, so
//!   kubelets and Prometheus reach it without credentials.
//! - the **admin API** (this module, `--admin-address`, HTTPS with a required operator
//!   certificate, see [`crate::tls::Port::Admin`] and [`crate::operator`]): everything
//!   needed to debug a proxy's config, and the calls that change meshd's state. A
//!   connection without an operator certificate of this mesh never gets past the TLS
//!   handshake, so neither a sidecar, nor another local user, nor a web page (which
//!   cannot present the certificate) can call it.
//!
//! Admin API:
//! - `GET /debug/snapshot`: mesh snapshot version, object counts, config errors and
//!   notes, the mesh's problems (service ports that miss pods they select)
//! - `GET /debug/proxies`: every connected proxy: what was sent, ACKed, NACKed and why
//! - `GET /debug/proxy-config?workload=<ns>/<pod>`: the resources that workload's
//!   sidecar should have, by type, with their versions
//! - `POST /debug/authz/check`: the decision of every workload behind a service port
//!   for one request ([`authz_check`](crate::authz::check))
//! - `GET /ca/status`, `POST /ca/rotate-root`: the staged root rotation (logged with
//!   the operator who asked)
//! - `GET /admission/report`: every WorkloadPolicy's mode, `Accepted` and report on
//!   running pods ([`admission_report`])
//!
//! Both ports refuse requests whose `Host` is not a loopback name when they listen on
//! loopback ([`host_check`]), so a page that rebinds its DNS name to 127.0.0.1 is
//! refused. Nothing here ever contains key material.

pub mod admission_report;
pub mod health;
mod host_check;
mod listener;

pub use health::{HealthState, health_router};
pub use listener::{AdminListener, OperatorConn};

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::authz::check::{self, CheckError, CheckRequest};
use crate::identity::{CertManager, RotationError};
use crate::model::ObjectKey;
use crate::sources::SharedErrors;
use crate::xds::serve::status::{ProxyRegistry, ProxyStatus};
use crate::xds::translate::cache::XdsSnapshot;
use crate::xds::translate::resources::ResourceType;

#[derive(Clone)]
pub struct AdminState {
    pub snapshots: watch::Receiver<Arc<XdsSnapshot>>,
    pub registry: ProxyRegistry,
    pub config_errors: SharedErrors,
    /// What the source read but ignored (objects of kinds meshd does not read).
    pub config_notes: SharedErrors,
    pub certs: Arc<CertManager>,
    /// What the source has not listed yet; ready when empty.
    pub pending: watch::Receiver<Vec<String>>,
    /// Whether this replica holds the Lease (`None`: no Lease, file source).
    pub leader: Option<watch::Receiver<bool>>,
    /// Root rotation requests go to the Secret the replicas share (Kubernetes source
    /// with meshd's own root); otherwise [`CertManager`] rotates by itself.
    pub shared_rotation: Option<crate::cluster::root_rotation::Requests>,
    /// The cluster's API (Kubernetes source): the policies' status.
    pub kube: Option<kube::Client>,
}

/// The warning meshd logs at start when the admin API listens beyond loopback.
pub fn exposure_warning(admin: std::net::SocketAddr) -> Option<String> {
    (!admin.ip().is_loopback()).then(|| {
        format!(
            "the admin API listens on {admin}, beyond loopback: it still needs an operator \
             certificate, but keep it on 127.0.0.1 and reach it through a tunnel or \
             `kubectl port-forward`"
        )
    })
}

/// The admin API's routes. Serve it with [`AdminListener`], which admits operators only.
pub fn router(state: AdminState, local: std::net::SocketAddr) -> Router {
    Router::new()
        .route("/debug/snapshot", get(snapshot))
        .route("/debug/proxies", get(proxies))
        .route("/debug/proxy-config", get(proxy_config))
        .route("/debug/authz/check", axum::routing::post(authz_check))
        .route("/ca/status", get(ca_status))
        .route("/ca/rotate-root", axum::routing::post(rotate_root))
        .route("/admission/report", get(admission_report::report))
        .layer(axum::middleware::from_fn_with_state(
            local.ip().is_loopback(),
            host_check::check,
        ))
        .with_state(state)
}

/// `GET /debug/snapshot`
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotSummary {
    pub version: u64,
    pub namespaces: usize,
    pub services: usize,
    pub workloads: usize,
    pub endpoints: usize,
    /// WorkloadPolicies in force (admission).
    #[serde(default)]
    pub workload_policies: usize,
    pub connected_proxies: usize,
    pub config_errors: Vec<String>,
    /// What the config directory holds that meshd ignores (not errors).
    #[serde(default)]
    pub config_notes: Vec<String>,
    /// What is wrong in the mesh as a whole, such as a service port that reaches none
    /// of some pods it selects.
    #[serde(default)]
    pub problems: Vec<String>,
    /// Kinds whose initial list is not complete yet.
    #[serde(default)]
    pub pending: Vec<String>,
    /// Whether this replica holds the Lease (Kubernetes source only).
    #[serde(default)]
    pub leader: Option<bool>,
}

async fn snapshot(State(state): State<AdminState>) -> Json<SnapshotSummary> {
    let snap = state.snapshots.borrow().clone();
    let lines = |shared: &SharedErrors| shared.lock().unwrap_or_else(|p| p.into_inner()).clone();
    Json(SnapshotSummary {
        version: snap.version(),
        namespaces: snap.mesh.namespaces.len(),
        services: snap.mesh.services.len(),
        workloads: snap.mesh.workloads.len(),
        endpoints: snap.mesh.endpoints.values().map(|e| e.len()).sum(),
        workload_policies: snap.mesh.workload_policies.len(),
        connected_proxies: state.registry.len(),
        config_errors: lines(&state.config_errors),
        config_notes: lines(&state.config_notes),
        problems: snap.mesh.problems().map(str::to_string).collect(),
        pending: state.pending.borrow().clone(),
        leader: state.leader.as_ref().map(|l| *l.borrow()),
    })
}

async fn proxies(State(state): State<AdminState>) -> Json<Vec<ProxyStatus>> {
    Json(state.registry.list())
}

#[derive(Debug, Deserialize)]
struct ProxyConfigQuery {
    workload: String,
}

/// `GET /debug/proxy-config`
#[derive(Debug, Serialize, Deserialize)]
pub struct ProxyConfig {
    pub workload: String,
    pub snapshot_version: u64,
    /// type (`cds`, …) → resource name → version
    pub resources: BTreeMap<String, BTreeMap<String, String>>,
    pub problems: Vec<String>,
}

async fn proxy_config(
    State(state): State<AdminState>,
    Query(q): Query<ProxyConfigQuery>,
) -> impl IntoResponse {
    let Some((ns, name)) = q.workload.split_once('/') else {
        return (
            StatusCode::BAD_REQUEST,
            format!("workload must be <namespace>/<pod>, not {:?}\n", q.workload),
        )
            .into_response();
    };
    let snap = state.snapshots.borrow().clone();
    let Some((view, resources)) = snap.proxy_resources(&ObjectKey::new(ns, name)) else {
        return (
            StatusCode::NOT_FOUND,
            format!(
                "no pod {} in mesh snapshot {}\n",
                q.workload,
                snap.version()
            ),
        )
            .into_response();
    };
    let by_type = ResourceType::PUSH_ORDER
        .into_iter()
        .map(|t| {
            let set = resources
                .get(t)
                .values()
                .map(|r| (r.name.to_string(), r.version.to_string()))
                .collect();
            (t.short().to_string(), set)
        })
        .collect();
    Json(ProxyConfig {
        workload: q.workload,
        snapshot_version: snap.version(),
        resources: by_type,
        problems: view.problems,
    })
    .into_response()
}

async fn authz_check(
    State(state): State<AdminState>,
    Json(req): Json<CheckRequest>,
) -> axum::response::Response {
    let snap = state.snapshots.borrow().clone();
    match check::check(&snap.mesh, state.certs.trust_domain(), &req) {
        Ok(resp) => Json(resp).into_response(),
        Err(e @ CheckError::NoService(_)) => {
            (StatusCode::NOT_FOUND, format!("{e}\n")).into_response()
        }
        Err(e) => (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    }
}

async fn ca_status(State(state): State<AdminState>) -> impl IntoResponse {
    Json(state.certs.rotation_status())
}

async fn rotate_root(
    State(state): State<AdminState>,
    ConnectInfo(conn): ConnectInfo<OperatorConn>,
) -> axum::response::Response {
    tracing::info!(operator = %conn.operator, peer = %conn.peer, "root rotation requested");
    let started = match &state.shared_rotation {
        Some(shared) => shared.request(&state.certs).await,
        None => state.certs.start_root_rotation(),
    };
    match started {
        Ok(status) => Json(status).into_response(),
        Err(
            e @ (RotationError::InProgress(_) | RotationError::PlugIn | RotationError::Shared(_)),
        ) => (StatusCode::CONFLICT, format!("{e}\n")).into_response(),
        Err(e @ (RotationError::NotStarted(_) | RotationError::Request(_))) => {
            (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn meshd_warns_when_the_admin_api_is_not_on_loopback() {
        assert!(super::exposure_warning("127.0.0.1:15014".parse().unwrap()).is_none());
        assert!(super::exposure_warning("[::1]:15014".parse().unwrap()).is_none());
        for exposed in ["0.0.0.0:15014", "10.1.2.3:15014", "[::]:15014"] {
            let warning = super::exposure_warning(exposed.parse().unwrap());
            assert!(
                warning.is_some_and(|w| w.contains("beyond loopback")),
                "{exposed}"
            );
        }
    }
}
