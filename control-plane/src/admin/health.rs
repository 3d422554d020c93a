//! The health port: `GET /healthz`, `GET /readyz`, `GET /metrics`, plain HTTP.
//!
//! What kubelets and Prometheus need, and nothing else: no debug output, no secrets, no
//! call that changes anything. In a cluster it listens on the pod's IP (the chart sets
//! `--health-address $(POD_IP):15021`); the admin API stays on loopback.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::sync::watch;

use super::host_check;

#[derive(Clone, Debug)]
pub struct HealthState {
    /// What the source has not listed yet; ready when empty.
    pub pending: watch::Receiver<Vec<String>>,
}

pub fn health_router(state: HealthState, local: std::net::SocketAddr) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(prometheus))
        .layer(axum::middleware::from_fn_with_state(
            local.ip().is_loopback(),
            host_check::check,
        ))
        .with_state(state)
}

/// `GET /metrics`: Prometheus/OpenMetrics text ([`crate::metrics`]).
async fn prometheus() -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        crate::metrics::metrics().encode(),
    )
}

/// `GET /readyz`: 200 once the source has its first complete view of the mesh.
async fn readyz(State(state): State<HealthState>) -> axum::response::Response {
    let pending = state.pending.borrow().clone();
    if pending.is_empty() {
        "ok\n".into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("waiting for the initial list of: {}\n", pending.join(", ")),
        )
            .into_response()
    }
}
