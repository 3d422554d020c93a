//! The ADS service: `StreamAggregatedResources` (state of the world) and
//! `DeltaAggregatedResources` (incremental) on one gRPC service. It authenticates
//! nothing itself and holds no per-stream state: each call becomes one task
//! (`stream::run`) with the flavour's state machine (`sotw`, `delta`).

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

use super::limits::{self};
use super::node::peer_identity;
use super::secrets::SecretCache;
use super::status::ProxyRegistry;
use super::stream::{self, Queued, StreamContext};
use super::wake::Wakers;
use super::{delta, sotw};
use crate::identity::CertManager;
use crate::xds::translate::cache::XdsSnapshot;

/// Responses queued per stream before the stream task waits for the proxy to read.
const STREAM_BUFFER: usize = 8;

#[derive(Clone, Debug)]
pub struct AdsServer {
    snapshots: watch::Receiver<Arc<XdsSnapshot>>,
    wakers: Wakers,
    registry: ProxyRegistry,
    certs: Arc<CertManager>,
    secrets: SecretCache,
}

impl AdsServer {
    /// The service over `snapshots`; starts the task that wakes the streams each
    /// snapshot concerns ([`super::wake`]), so it must be called within a runtime.
    pub fn new(
        snapshots: watch::Receiver<Arc<XdsSnapshot>>,
        registry: ProxyRegistry,
        certs: Arc<CertManager>,
    ) -> Self {
        Self {
            wakers: Wakers::follow(snapshots.clone()),
            snapshots,
            registry,
            secrets: SecretCache::new(certs.clone()),
            certs,
        }
    }

    fn context<T>(&self, request: &Request<T>) -> StreamContext {
        let certs = request.peer_certs();
        StreamContext {
            snapshots: self.snapshots.clone(),
            wakers: self.wakers.clone(),
            registry: self.registry.clone(),
            certs: self.certs.clone(),
            secrets: self.secrets.clone(),
            peer: peer_identity(certs.as_ref().map(|c| c.as_slice())),
        }
    }

    pub fn into_service(self) -> AggregatedDiscoveryServiceServer<AdsServer> {
        AggregatedDiscoveryServiceServer::new(self)
            .max_decoding_message_size(limits::MAX_REQUEST_BYTES)
            .max_encoding_message_size(usize::MAX)
    }
}

type ResponseStream<T> =
    futures::stream::Map<ReceiverStream<Queued<T>>, fn(Queued<T>) -> Result<T, Status>>;

// The box is the point: it is what the channel holds.
#[allow(clippy::boxed_local)]
fn unbox<T>(queued: Queued<T>) -> Result<T, Status> {
    *queued
}

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
        tokio::spawn(stream::run::<sotw::SotwStream>(
            ctx,
            request.into_inner(),
            tx,
        ));
        Ok(Response::new(futures::StreamExt::map(
            ReceiverStream::new(rx),
            unbox as fn(_) -> _,
        )))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let ctx = self.context(&request);
        tokio::spawn(stream::run::<delta::DeltaStream>(
            ctx,
            request.into_inner(),
            tx,
        ));
        Ok(Response::new(futures::StreamExt::map(
            ReceiverStream::new(rx),
            unbox as fn(_) -> _,
        )))
    }
}
