//! The ADS server: `StreamAggregatedResources` (state of the world) and
//! `DeltaAggregatedResources` (incremental) on one gRPC service.
//!
//! One task per stream. A stream task owns everything about its proxy (subscriptions,
//! nonces, what was sent and ACKed) and follows the xDS snapshot through its own `watch`
//! receiver, so there is no shared lock on the push path and a slow proxy only slows its
//! own task: `watch` hands it the newest snapshot when it is ready, skipping the ones it
//! was too slow to see. This module is the only place that builds `tonic::Status`.

use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::cache::XdsSnapshot;
use super::node::{NodeError, ProxyId};
use super::resources::ProxyResources;
use super::status::{ProxyHandle, ProxyRegistry, ProxyStatus, XdsFlavor};
use super::{delta, sotw};

/// Responses queued per stream before the stream task waits for the proxy to read.
const STREAM_BUFFER: usize = 8;

#[derive(Clone, Debug)]
pub struct AdsServer {
    snapshots: watch::Receiver<Arc<XdsSnapshot>>,
    registry: ProxyRegistry,
}

impl AdsServer {
    pub fn new(snapshots: watch::Receiver<Arc<XdsSnapshot>>, registry: ProxyRegistry) -> Self {
        Self {
            snapshots,
            registry,
        }
    }

    pub fn into_service(self) -> AggregatedDiscoveryServiceServer<AdsServer> {
        AggregatedDiscoveryServiceServer::new(self)
            .max_decoding_message_size(16 * 1024 * 1024)
            .max_encoding_message_size(usize::MAX)
    }
}

type ResponseStream<T> = ReceiverStream<Result<T, Status>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsServer {
    type StreamAggregatedResourcesStream = ResponseStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = ResponseStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let ctx = StreamContext {
            snapshots: self.snapshots.clone(),
            registry: self.registry.clone(),
        };
        tokio::spawn(sotw::run(ctx, request.into_inner(), tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let ctx = StreamContext {
            snapshots: self.snapshots.clone(),
            registry: self.registry.clone(),
        };
        tokio::spawn(delta::run(ctx, request.into_inner(), tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// What a stream task starts from.
pub(crate) struct StreamContext {
    pub snapshots: watch::Receiver<Arc<XdsSnapshot>>,
    pub registry: ProxyRegistry,
}

impl From<NodeError> for Status {
    fn from(e: NodeError) -> Status {
        Status::invalid_argument(e.to_string())
    }
}

/// The part of a stream's state both flavours share: who the proxy is, the snapshot it
/// is on, what it should have, and its entry in the registry.
pub(crate) struct ProxyConn {
    pub id: ProxyId,
    pub snapshot: Arc<XdsSnapshot>,
    pub resources: ProxyResources,
    pub status: ProxyHandle,
    nonce: u64,
}

impl ProxyConn {
    pub fn connect(ctx: &mut StreamContext, id: ProxyId, flavor: XdsFlavor) -> ProxyConn {
        let status = ctx.registry.register(ProxyStatus::new(
            id.node_id.clone(),
            id.workload.to_string(),
            flavor,
        ));
        tracing::info!(node = %id.node_id, workload = %id.workload, ?flavor, "proxy connected");
        let snapshot = ctx.snapshots.borrow_and_update().clone();
        let mut conn = ProxyConn {
            id,
            snapshot: snapshot.clone(),
            resources: ProxyResources::default(),
            status,
            nonce: 0,
        };
        conn.refresh(snapshot);
        conn
    }

    /// Recomputes what the proxy should have from `snapshot`.
    pub fn refresh(&mut self, snapshot: Arc<XdsSnapshot>) {
        let (problems, resources) = match snapshot.proxy_resources(&self.id.workload) {
            Some((view, resources)) => (view.problems, resources),
            None => (
                vec![format!(
                    "no pod {} in the mesh: serving an empty config until it appears",
                    self.id.workload
                )],
                ProxyResources::default(),
            ),
        };
        let version = snapshot.version();
        self.status.update(|s| {
            if s.problems != problems {
                for p in problems.iter().filter(|p| !s.problems.contains(p)) {
                    tracing::warn!(node = %s.node_id, "{p}");
                }
                s.problems = problems;
            }
            s.snapshot_version = version;
        });
        self.snapshot = snapshot;
        self.resources = resources;
    }

    pub fn next_nonce(&mut self) -> String {
        self.nonce += 1;
        self.nonce.to_string()
    }

    pub fn record_unknown_type(&self, type_url: &str) {
        self.status.update(|s| {
            if !s.unknown_type_urls.iter().any(|u| u == type_url) {
                tracing::warn!(
                    node = %s.node_id,
                    type_url,
                    "proxy asked for a resource type meshd does not serve; ignored"
                );
                s.unknown_type_urls.push(type_url.to_string());
            }
        });
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
