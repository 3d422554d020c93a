//! The ADS server: `StreamAggregatedResources` (state of the world) and
//! `DeltaAggregatedResources` (incremental) on one gRPC service.
//!
//! One task per stream. A stream task owns everything about its proxy (subscriptions,
//! nonces, what was sent and ACKed) and follows the xDS snapshot through its own `watch`
//! receiver, so there is no shared lock on the push path and a slow proxy only slows its
//! own task: `watch` hands it the newest snapshot when it is ready, skipping the ones it
//! was too slow to see. This module is the only place that builds `tonic::Status`.

use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use meshd_ca::SpiffeId;

use super::cache::XdsSnapshot;
use super::node::{IdentifyError, IdentityError, ProxyId, identify, peer_identity};
use super::resources::{ProxyResources, Resource, ResourceType};
use super::status::{ProxyHandle, ProxyRegistry, ProxyStatus, XdsFlavor};
use super::translate;
use super::{delta, sotw};
use crate::identity::CertManager;

/// Responses queued per stream before the stream task waits for the proxy to read.
const STREAM_BUFFER: usize = 8;

#[derive(Clone, Debug)]
pub struct AdsServer {
    snapshots: watch::Receiver<Arc<XdsSnapshot>>,
    registry: ProxyRegistry,
    certs: Arc<CertManager>,
}

impl AdsServer {
    pub fn new(
        snapshots: watch::Receiver<Arc<XdsSnapshot>>,
        registry: ProxyRegistry,
        certs: Arc<CertManager>,
    ) -> Self {
        Self {
            snapshots,
            registry,
            certs,
        }
    }

    fn context<T>(&self, request: &Request<T>) -> StreamContext {
        let certs = request.peer_certs();
        StreamContext {
            snapshots: self.snapshots.clone(),
            registry: self.registry.clone(),
            certs: self.certs.clone(),
            peer: peer_identity(certs.as_ref().map(|c| c.as_slice())),
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
        let ctx = self.context(&request);
        tokio::spawn(sotw::run(ctx, request.into_inner(), tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let ctx = self.context(&request);
        tokio::spawn(delta::run(ctx, request.into_inner(), tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// What a stream task starts from.
pub(crate) struct StreamContext {
    pub snapshots: watch::Receiver<Arc<XdsSnapshot>>,
    pub registry: ProxyRegistry,
    pub certs: Arc<CertManager>,
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
            tracing::warn!(node = node_id, "refused an xDS stream: {e}");
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

/// The part of a stream's state both flavours share: who the proxy is, the snapshot it
/// is on, what it should have, and its entry in the registry.
pub(crate) struct ProxyConn {
    pub id: ProxyId,
    pub snapshot: Arc<XdsSnapshot>,
    pub resources: ProxyResources,
    /// The proxy's SDS secrets, encoded when its certificate changes.
    secrets: Vec<Arc<Resource>>,
    secret_problem: Option<String>,
    pub status: ProxyHandle,
    nonce: u64,
}

impl ProxyConn {
    pub fn connect(ctx: &mut StreamContext, id: ProxyId, flavor: XdsFlavor) -> ProxyConn {
        let status = ctx.registry.register(ProxyStatus::new(
            id.node_id.clone(),
            id.workload.to_string(),
            id.identity.to_string(),
            flavor,
        ));
        tracing::info!(node = %id.node_id, workload = %id.workload, identity = %id.identity, ?flavor, "proxy connected");
        let snapshot = ctx.snapshots.borrow_and_update().clone();
        let mut conn = ProxyConn {
            id,
            snapshot,
            resources: ProxyResources::default(),
            secrets: Vec::new(),
            secret_problem: None,
            status,
            nonce: 0,
        };
        conn.refresh_secrets(&ctx.certs);
        conn
    }

    /// Fetches the proxy's secrets again (after the certificates changed): its own,
    /// verified identity's certificate and key, and the trust bundle — nothing else.
    pub fn refresh_secrets(&mut self, certs: &CertManager) {
        match certs.workload_certificate(&self.id.identity) {
            Ok(cert) => {
                self.secrets = vec![
                    Resource::encode(
                        translate::WORKLOAD_SECRET,
                        &translate::workload_secret(&cert),
                    ),
                    Resource::encode(
                        translate::ROOT_SECRET,
                        &translate::root_secret(&certs.trust_bundle()),
                    ),
                ];
                self.secret_problem = None;
            }
            Err(e) => {
                self.secrets.clear();
                self.secret_problem = Some(format!("no workload certificate: {e}"));
            }
        }
        let snapshot = self.snapshot.clone();
        self.refresh(snapshot);
    }

    /// Recomputes what the proxy should have from `snapshot` (keeping its secrets: the
    /// certificate manager is only asked when certificates change, never per snapshot).
    pub fn refresh(&mut self, snapshot: Arc<XdsSnapshot>) {
        let (mut problems, mut resources) = match snapshot.proxy_resources(&self.id.workload) {
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
