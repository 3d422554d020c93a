//! The webhook port: TLS connections ([`crate::tls::Port::Webhook`]) served by axum.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::response::Response;
use axum::routing::post;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;

use tokio::sync::watch;

use super::{inject, validate};
use crate::identity::CertManager;
use crate::inject::InjectConfig;
use crate::metrics::{Metrics, metrics};
use crate::model::MeshSnapshot;
use crate::tls::{self, Port, TlsSetupError};

/// An AdmissionReview carries the object (etcd keeps at most 1.5 MiB) and, for
/// updates, its old version.
const BODY_LIMIT: usize = 4 << 20;

#[derive(Debug, Clone)]
pub struct WebhookState {
    /// The injection template: what `/inject` adds, and what `/validate` recognises as
    /// meshd's own containers.
    pub inject: Arc<InjectConfig>,
    /// The mesh in force (its WorkloadPolicies, namespaces, mTLS), for `/validate`.
    pub mesh: watch::Receiver<Arc<MeshSnapshot>>,
}

/// Serves the webhooks on `listener` until the runtime ends.
pub async fn serve(
    listener: TcpListener,
    certs: Arc<CertManager>,
    state: WebhookState,
) -> Result<(), TlsSetupError> {
    let connections = WebhookListener {
        connections: tls::incoming(listener, certs, Port::Webhook)?,
    };
    let app = Router::new()
        .route(inject::PATH, post(inject_review))
        .route(validate::PATH, post(validate_review))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state);
    if let Err(e) = axum::serve(connections, app).await {
        tracing::error!("webhook server failed: {e}");
    }
    Ok(())
}

async fn inject_review(State(state): State<WebhookState>, body: Bytes) -> Response {
    let started = Instant::now();
    let response = inject::handle(&state.inject, &body);
    Metrics::observe(&metrics().admission_duration, started.elapsed());
    response
}

async fn validate_review(State(state): State<WebhookState>, body: Bytes) -> Response {
    let started = Instant::now();
    let response = validate::handle(&state.inject, &state.mesh, &body);
    Metrics::observe(&metrics().admission_duration, started.elapsed());
    response
}

struct WebhookListener {
    connections: tls::Incoming,
}

impl axum::serve::Listener for WebhookListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        tls::next_connection(&mut self.connections).await
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Err(std::io::Error::other(
            "the webhook listener serves TLS connections only",
        ))
    }
}
