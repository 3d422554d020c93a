//! One ADS stream's life, shared by both flavours: identify the proxy from its first
//! request, then serve its requests, new snapshots and new certificates until it ends.
//!
//! One task per stream. A stream task owns everything about its proxy (subscriptions,
//! nonces, what was sent and ACKed). It runs only when a snapshot concerns its proxy
//! ([`super::wake`]: the index wakes it), when certificates change, or when its proxy
//! sends a request; it then computes its config from the newest snapshot, so a slow
//! proxy only slows its own task and skips the states it was too slow to see. No lock is
//! held on the push path while encoding. This module and [`super::server`] are the only
//! places that build `tonic::Status`.

use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use tokio::sync::{mpsc, watch};
use tonic::{Status, Streaming};

use meshd_ca::SpiffeId;

use super::fail_closed::FailClosed;
use super::limits::{self, LimitError, StreamEnd};
use super::node::{IdentifyError, IdentityError, ProxyId, identify};
use super::secrets::SecretCache;
use super::status::{Nack, ProxyHandle, ProxyRegistry, ProxyStatus, XdsFlavor, now_rfc3339};
use super::wake::{Subscription, Wakers};
use crate::identity::CertManager;
use crate::logging::{Escaped, Throttle};
use crate::metrics::{self, metrics};
use crate::throttled_warn;
use crate::xds::translate::cache::XdsSnapshot;
use crate::xds::translate::resources::{ProxyResources, Resource, ResourceType};
use crate::xds::translate::touched::Interest;

/// Warnings any authenticated peer can trigger at will: each kind at most 20 lines per
/// 10 s (the metrics count every one).
static REFUSED: Throttle = Throttle::new(20, std::time::Duration::from_secs(10));
static NACKS: Throttle = Throttle::new(20, std::time::Duration::from_secs(10));
static UNKNOWN_TYPES: Throttle = Throttle::new(20, std::time::Duration::from_secs(10));
static LIMITS: Throttle = Throttle::new(20, std::time::Duration::from_secs(10));

/// A response on its way to the proxy. Boxed: a tokio channel allocates its slots in
/// blocks of 32 whatever its bound, and an unboxed slot (a response or a `Status`) is
/// some 200 bytes — 6 KiB per idle stream, 60 MiB at 10,000 proxies.
pub(crate) type Queued<T> = Box<Result<T, Status>>;

/// What a stream task starts from.
pub(crate) struct StreamContext {
    pub snapshots: watch::Receiver<Arc<XdsSnapshot>>,
    pub wakers: Wakers,
    pub registry: ProxyRegistry,
    pub certs: Arc<CertManager>,
    pub secrets: SecretCache,
    /// The identity the TLS handshake verified, or why there is none.
    pub peer: Result<SpiffeId, IdentityError>,
}

impl StreamContext {
    /// Who the stream is, from the verified certificate and the first request's node.
    /// A refusal is logged with its reason and returned as the stream's status.
    pub fn identify(&self, node: Option<&Node>) -> Result<ProxyId, Status> {
        let peer = self.peer.clone().map_err(IdentifyError::from);
        let result = peer.and_then(|p| identify(node, p, self.certs.trust_domain()));
        result.map_err(|e| {
            let node_id = node.map(|n| n.id.as_str()).unwrap_or("");
            throttled_warn!(REFUSED, node = %Escaped(node_id), "refused an xDS stream: {e}");
            match e {
                IdentifyError::Node(e) => Status::invalid_argument(e.to_string()),
                IdentifyError::Identity(IdentityError::NoCertificate) => {
                    Status::unauthenticated(e.to_string())
                }
                IdentifyError::Identity(e) => Status::permission_denied(e.to_string()),
            }
        })
    }
}

/// The part of a stream's state both flavours share: who the proxy is, what it should
/// have and from which snapshot, and its entries in the registry and the wake index.
pub(crate) struct ProxyConn {
    pub id: ProxyId,
    /// The version of the snapshot [`Self::resources`] were computed from. Not the
    /// snapshot itself: a stream no change concerns would keep an old one alive.
    pub version: u64,
    snapshots: watch::Receiver<Arc<XdsSnapshot>>,
    subscription: Subscription,
    pub resources: ProxyResources,
    /// The proxy's SDS secrets, encoded when its certificate changes.
    secrets: Vec<Arc<Resource>>,
    secret_problem: Option<String>,
    /// Inbound listeners and routes the proxy rejected, served as deny-all.
    fail_closed: FailClosed,
    pub status: ProxyHandle,
    nonce: u64,
}

impl ProxyConn {
    pub fn connect(
        ctx: &mut StreamContext,
        id: ProxyId,
        flavor: XdsFlavor,
    ) -> Result<ProxyConn, LimitError> {
        let status = ctx.registry.register(ProxyStatus::new(
            id.node_id.clone(),
            id.workload.to_string(),
            id.identity.to_string(),
            flavor,
        ))?;
        tracing::info!(node = %id.node_id, workload = %id.workload, identity = %id.identity, ?flavor, "proxy connected");
        let subscription = ctx.wakers.subscribe();
        let currency = subscription.currency();
        status.update(|s| s.currency = Some(currency));
        let mut conn = ProxyConn {
            id,
            version: 0,
            snapshots: ctx.snapshots.clone(),
            subscription,
            resources: ProxyResources::default(),
            secrets: Vec::new(),
            secret_problem: None,
            fail_closed: FailClosed::default(),
            status,
            nonce: 0,
        };
        conn.refresh_secrets(&ctx.secrets);
        Ok(conn)
    }

    /// Fetches the proxy's secrets again (after the certificates changed): its own,
    /// verified identity's certificate and key, and the trust bundle — nothing else.
    pub fn refresh_secrets(&mut self, secrets: &SecretCache) {
        match secrets.secrets(&self.id.identity) {
            Ok(encoded) => {
                self.secrets = encoded.to_vec();
                self.secret_problem = None;
            }
            Err(e) => {
                self.secrets.clear();
                self.secret_problem = Some(format!("no workload certificate: {e}"));
            }
        }
        self.refresh();
    }

    /// Recomputes what the proxy should have from the newest snapshot (keeping its
    /// secrets: the certificate manager is only asked when certificates change, never
    /// per snapshot), and records in the wake index what that depends on.
    pub fn refresh(&mut self) {
        let snapshot = self.snapshots.borrow().clone();
        let computed = snapshot.proxy_resources(&self.id.workload);
        let interest = match &computed {
            Some((view, _)) => Interest::of(view),
            None => Interest::of_absent(&self.id.workload),
        };
        let (mut problems, mut resources) = match computed {
            Some((view, _))
                if view.workload.service_account != self.id.identity.service_account() =>
            {
                (
                    vec![format!(
                        "pod {} runs as service account {:?}, but the proxy authenticated as {}: \
                     serving nothing",
                        self.id.workload, view.workload.service_account, self.id.identity
                    )],
                    ProxyResources::default(),
                )
            }
            Some((view, resources)) => (view.problems, resources),
            None => (
                vec![format!(
                    "no pod {} in the mesh: serving an empty config until it appears",
                    self.id.workload
                )],
                ProxyResources::default(),
            ),
        };
        for secret in &self.secrets {
            resources.insert(ResourceType::Secret, secret.clone());
        }
        problems.extend(self.secret_problem.clone());
        self.fail_closed
            .apply(&snapshot, &self.id.workload, &mut resources);
        problems.extend(self.fail_closed.problems());
        let version = snapshot.version();
        let changed_at = snapshot.mesh.changed_at;
        self.status.update(|s| {
            if s.problems != problems {
                for p in problems.iter().filter(|p| !s.problems.contains(p)) {
                    tracing::warn!(node = %s.node_id, "{p}");
                }
                s.problems = problems;
            }
            s.snapshot_version = version;
            s.snapshot_changed_at = changed_at;
        });
        self.version = version;
        self.resources = resources;
        self.subscription.update(interest, version);
    }

    pub fn next_nonce(&mut self) -> String {
        self.nonce += 1;
        self.nonce.to_string()
    }

    /// Records the proxy's answer to response `nonce` of type `t`, which held `sent`: an
    /// ACK, or a NACK with Envoy's `error`. Only the answer to the latest response
    /// settles the type's status; a NACK of a resource that carries policy makes the
    /// proxy's config deny everything on it until a changed one is accepted
    /// ([`super::fail_closed`]).
    pub fn record_answer(
        &mut self,
        t: ResourceType,
        nonce: &str,
        error: Option<&str>,
        sent: &[Arc<Resource>],
    ) {
        let node = self.id.node_id.clone();
        let changed = match error {
            Some(message) => self.fail_closed.on_nack(t, sent, message),
            None => self.fail_closed.on_ack(&node, t, sent),
        };
        self.record_answer_status(t, nonce, error);
        if changed {
            self.refresh();
        }
    }

    fn record_answer_status(&self, t: ResourceType, nonce: &str, error: Option<&str>) {
        if let Some(message) = error {
            throttled_warn!(
                NACKS,
                node = %self.id.node_id, type = t.short(), nonce = %Escaped(nonce),
                "proxy rejected config (NACK), keeping its last accepted config: {}",
                Escaped(message)
            );
        }
        self.status.update(|s| {
            let ts = s.type_mut(t.short());
            let latest = ts.sent_nonce == nonce;
            match error {
                Some(message) => {
                    metrics()
                        .nacks
                        .get_or_create(&metrics::TypeLabel { r#type: t.short() })
                        .inc();
                    ts.pending &= !latest;
                    ts.nacked = true;
                    ts.last_nack = Some(Nack {
                        nonce: nonce.to_string(),
                        message: limits::truncate_message(message),
                        at: now_rfc3339(),
                    });
                }
                None => {
                    if latest {
                        ts.pending = false;
                        ts.nacked = false;
                    }
                    ts.acked_nonce = nonce.to_string();
                }
            }
        });
    }

    /// Records that every response for the current snapshot has been sent.
    pub fn record_pushed(&self) {
        self.status.update(|s| {
            s.pushed_version = s.snapshot_version;
            s.pushed_changed_at = s.snapshot_changed_at;
        });
    }

    /// Records a response of type `t` sent to the proxy.
    pub fn record_sent(
        &self,
        t: ResourceType,
        resources: usize,
        version: String,
        nonce: String,
        bytes: usize,
    ) {
        let label = metrics::TypeLabel { r#type: t.short() };
        metrics().pushes.get_or_create(&label).inc();
        metrics()
            .sent_bytes
            .get_or_create(&label)
            .inc_by(bytes as u64);
        self.status.update(|s| {
            let ts = s.type_mut(t.short());
            ts.resources = resources;
            ts.sent_version = version;
            ts.sent_nonce = nonce;
            ts.pending = true;
            ts.responses += 1;
        });
    }

    /// Notes a type URL meshd does not serve (once per URL); a stream may name at
    /// most [`limits::MAX_UNKNOWN_TYPES`] of them.
    pub fn record_unknown_type(&self, type_url: &str) -> Result<(), LimitError> {
        let mut result = Ok(());
        self.status.update(|s| {
            if s.unknown_type_urls.iter().any(|u| u == type_url) {
                return;
            }
            if s.unknown_type_urls.len() >= limits::MAX_UNKNOWN_TYPES {
                result = Err(LimitError::UnknownTypes);
                return;
            }
            throttled_warn!(
                UNKNOWN_TYPES,
                node = %s.node_id,
                type_url = %Escaped(type_url),
                "proxy asked for a resource type meshd does not serve; ignored"
            );
            s.unknown_type_urls.push(type_url.to_string());
        });
        result
    }
}

/// One xDS flavour's protocol state machine; [`run`] drives it.
pub(crate) trait StreamFlavor: Sized + Send + 'static {
    type Request: Send + 'static;
    type Response: Send + 'static;
    const FLAVOR: XdsFlavor;

    fn node(req: &Self::Request) -> Option<&Node>;
    fn new(conn: ProxyConn, tx: mpsc::Sender<Queued<Self::Response>>) -> Self;
    fn conn(&mut self) -> &mut ProxyConn;
    /// Handles one request (ACK/NACK bookkeeping, subscriptions) and answers it.
    /// A request past a [`limits`] bound ends the stream.
    fn on_request(
        &mut self,
        req: Self::Request,
    ) -> impl std::future::Future<Output = Result<(), StreamEnd>> + Send;
    /// Sends type `t` if the proxy's view of it is out of date.
    fn respond(
        &mut self,
        t: ResourceType,
    ) -> impl std::future::Future<Output = Result<(), StreamEnd>> + Send;
}

/// A stream's whole life: identify the proxy from its first request, then serve its
/// requests, new snapshots and new certificates until it ends.
pub(crate) async fn run<F: StreamFlavor>(
    mut ctx: StreamContext,
    mut requests: Streaming<F::Request>,
    tx: mpsc::Sender<Queued<F::Response>>,
) where
    Streaming<F::Request>: futures::Stream<Item = Result<F::Request, Status>> + Unpin,
{
    use futures::StreamExt;
    let first = match requests.next().await {
        Some(Ok(r)) => r,
        Some(Err(status)) => {
            let end = request_error(&status);
            return finish(None, end, &tx).await;
        }
        None => return log_stream_end(None, "closed by the client"),
    };
    let id = match ctx.identify(F::node(&first)) {
        Ok(id) => id,
        Err(status) => {
            let _ = tx.send(Box::new(Err(status))).await;
            return;
        }
    };
    let tx_end = tx.clone();
    let conn = match ProxyConn::connect(&mut ctx, id.clone(), F::FLAVOR) {
        Ok(conn) => conn,
        Err(limit) => return finish(Some(&id), StreamEnd::Limit(limit), &tx).await,
    };
    let mut stream = F::new(conn, tx);
    let end = serve(&mut stream, ctx, first, requests).await;
    let id = stream.conn().id.clone();
    // Free the stream's state before waiting on the proxy to take the status.
    drop(stream);
    finish(Some(&id), end, &tx_end).await;
}

/// What a failed read of the request stream means: a request over the size limit is
/// the proxy's fault and gets a status; anything else means the proxy is gone.
fn request_error(status: &Status) -> StreamEnd {
    // tonic refuses an oversized message with OUT_OF_RANGE "…too large…".
    if status.code() == tonic::Code::OutOfRange && status.message().contains("too large") {
        StreamEnd::Limit(LimitError::RequestSize)
    } else {
        StreamEnd::Gone(format!("stream error: {}", Escaped(status.message())))
    }
}

/// Ends a stream: a refused one gets `RESOURCE_EXHAUSTED` naming the limit, one
/// warning and a count in `meshd_xds_refused_streams_total`.
async fn finish<T>(id: Option<&ProxyId>, end: StreamEnd, tx: &mpsc::Sender<Queued<T>>) {
    match end {
        StreamEnd::Gone(reason) => log_stream_end(id, &reason),
        StreamEnd::Limit(limit) => {
            metrics()
                .refused_streams
                .get_or_create(&metrics::ReasonLabel {
                    reason: limit.reason(),
                })
                .inc();
            match id {
                Some(id) => throttled_warn!(
                    LIMITS,
                    node = %id.node_id, workload = %id.workload, identity = %id.identity,
                    "ended an xDS stream that sent {limit}"
                ),
                None => throttled_warn!(LIMITS, "ended an xDS stream that sent {limit}"),
            }
            let status = Status::resource_exhausted(format!(
                "meshd ended this stream: it sent {limit} (see meshd's limits)"
            ));
            let _ = tx.send(Box::new(Err(status))).await;
        }
    }
}

/// Serves until the stream ends; returns why it ended.
async fn serve<F: StreamFlavor>(
    stream: &mut F,
    ctx: StreamContext,
    first: F::Request,
    mut requests: Streaming<F::Request>,
) -> StreamEnd
where
    Streaming<F::Request>: futures::Stream<Item = Result<F::Request, Status>> + Unpin,
{
    use futures::StreamExt;
    let mut cert_changes = ctx.certs.changes();
    if let Err(e) = stream.on_request(first).await {
        return e;
    }
    stream.conn().record_pushed();
    loop {
        tokio::select! {
            req = requests.next() => match req {
                Some(Ok(req)) => {
                    if let Err(e) = stream.on_request(req).await {
                        return e;
                    }
                    stream.conn().record_pushed();
                    continue;
                }
                Some(Err(status)) => return request_error(&status),
                None => return StreamEnd::Gone("closed by the proxy".into()),
            },
            open = stream.conn().subscription.woken() => {
                if !open {
                    return StreamEnd::Gone("meshd is shutting down".into());
                }
                stream.conn().refresh();
            }
            _ = cert_changes.changed() => {
                cert_changes.borrow_and_update();
                stream.conn().refresh_secrets(&ctx.secrets);
            }
        }
        for t in ResourceType::PUSH_ORDER {
            if let Err(e) = stream.respond(t).await {
                return e;
            }
        }
        stream.conn().record_pushed();
    }
}

/// Logs why a stream ended.
pub(crate) fn log_stream_end(id: Option<&ProxyId>, reason: &str) {
    match id {
        Some(id) => {
            tracing::info!(node = %id.node_id, workload = %id.workload, reason, "proxy disconnected")
        }
        None => tracing::debug!(reason, "stream ended before identifying itself"),
    }
}
