//! The pod's probe endpoint (`--health-address`, plain HTTP/1 with hyper).
//!
//! `GET /app-health/<container>/<kind>` is the app's own probe, performed by
//! [`app_probes`](crate::app_probes) whatever Envoy's stage; a path under `/app-health/`
//! that is not configured is 404, naming it.
//!
//! `GET /healthz/ready` answers 200 only when Envoy is LIVE and has accepted listeners
//! and clusters from meshd (`listener_manager.lds.update_success` and
//! `cluster_manager.cds.update_success` at least 1): Envoy turns LIVE after its
//! initial fetch times out even with no config at all, so LIVE alone would let traffic
//! in to a sidecar that cannot route it. Otherwise 503, the reason in the body. Nothing
//! secret is served here, and nothing that changes anything.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use meshd_sidecar::probes::PATH_PREFIX;

use crate::app_probes::AppProber;
use crate::envoy::admin::{EnvoyAdmin, Readiness};

/// How far the agent has got, for the probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stage {
    /// No credentials yet, so no Envoy; the last failed attempt, if any.
    WaitingForCertificate(Option<String>),
    EnvoyStarted,
}

pub const READY_PATH: &str = "/healthz/ready";

struct State {
    admin: EnvoyAdmin,
    stage: watch::Receiver<Stage>,
    apps: AppProber,
}

/// Serves probes on `listener` until the runtime ends.
pub async fn serve(
    listener: TcpListener,
    admin: EnvoyAdmin,
    stage: watch::Receiver<Stage>,
    apps: AppProber,
) {
    let state = Arc::new(State { admin, stage, apps });
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            // Out of file descriptors and the like: try again shortly.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(answer(&state, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

async fn answer(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only".into());
    }
    let path = req.uri().path();
    if path.starts_with(PATH_PREFIX) {
        return match state.apps.answer(path).await {
            Some(answer) => text(answer.status, answer.reason),
            None => text(
                StatusCode::NOT_FOUND,
                // Debug-quoted: the path is the caller's.
                format!("no app probe is configured for {path:?}"),
            ),
        };
    }
    if path != READY_PATH {
        return text(
            StatusCode::NOT_FOUND,
            format!("only {READY_PATH} and {PATH_PREFIX}<container>/<kind> are served here"),
        );
    }
    let current = state.stage.borrow().clone();
    match current {
        Stage::WaitingForCertificate(last_error) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            match last_error {
                None => "envoy not started: waiting for the first certificate from meshd".into(),
                Some(e) => format!(
                    "envoy not started: waiting for the first certificate from meshd (last attempt: {e})"
                ),
            },
        ),
        Stage::EnvoyStarted => match state.admin.readiness().await {
            Readiness::Ready => text(StatusCode::OK, "ready".into()),
            Readiness::NotReady(reason) => text(StatusCode::SERVICE_UNAVAILABLE, reason),
        },
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body + "\n")));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
