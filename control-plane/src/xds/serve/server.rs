//! The ADS service: `StreamAggregatedResources` (state of the world) and
//! `DeltaAggregatedResources` (incremental) on one gRPC service. It authenticates
//! nothing itself and holds no per-stream state: each call becomes one task
//! (`stream::run`) with the flavour's state machine (`sotw`, `delta`).

use std::sync::Arc;

use std::convert::Infallible;
use std::marker::PhantomData;
use std::task::{Context, Poll};

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::SERVICE_NAME;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::{BufferSettings, Codec};
use tonic::codegen::{Body, BoxFuture, Service, StdError, http};
use tonic::server::NamedService;
use tonic::{Request, Response, Status, Streaming};
use tonic_prost::{ProstDecoder, ProstEncoder};

use super::limits::{self};
use super::node::peer_identity;
use super::secrets::SecretCache;
use super::status::ProxyRegistry;
use super::stream::{self, Queued, StreamContext, StreamFlavor};
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

    /// The ADS gRPC service. Not envoy-types' generated `AggregatedDiscoveryServiceServer`:
    /// that one builds `ProstCodec::default()` for every call and offers no way to
    /// change its buffers, and those buffers are a large part of what a proxy costs
    /// (see [`AdsCodec`]). This is the same two routes with [`AdsCodec`].
    pub fn into_service(self) -> AdsService {
        AdsService {
            server: Arc::new(self),
        }
    }

    fn serve<F: StreamFlavor>(
        &self,
        request: Request<Streaming<F::Request>>,
    ) -> Response<ResponseStream<F::Response>>
    where
        Streaming<F::Request>: futures::Stream<Item = Result<F::Request, Status>> + Unpin,
    {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let ctx = self.context(&request);
        tokio::spawn(stream::run::<F>(ctx, request.into_inner(), tx));
        Response::new(futures::StreamExt::map(
            ReceiverStream::new(rx),
            unbox as fn(_) -> _,
        ))
    }
}

type ResponseStream<T> =
    futures::stream::Map<ReceiverStream<Queued<T>>, fn(Queued<T>) -> Result<T, Status>>;

// The box is the point: it is what the channel holds.
#[allow(clippy::boxed_local)]
fn unbox<T>(queued: Queued<T>) -> Result<T, Status> {
    *queued
}

const SOTW_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const DELTA_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

/// `AggregatedDiscoveryService` as a tower service: each of its two methods is one
/// [`StreamFlavor`], served through tonic's `Grpc` with [`AdsCodec`].
#[derive(Clone, Debug)]
pub struct AdsService {
    server: Arc<AdsServer>,
}

impl NamedService for AdsService {
    const NAME: &'static str = SERVICE_NAME;
}

impl<B> Service<http::Request<B>> for AdsService
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let server = self.server.clone();
        match req.uri().path() {
            SOTW_PATH => Box::pin(async move {
                Ok(grpc()
                    .streaming(Method::<sotw::SotwStream>::new(server), req)
                    .await)
            }),
            DELTA_PATH => Box::pin(async move {
                Ok(grpc()
                    .streaming(Method::<delta::DeltaStream>::new(server), req)
                    .await)
            }),
            _ => Box::pin(async { Ok(Status::unimplemented("").into_http()) }),
        }
    }
}

/// tonic's gRPC framing with meshd's codec and message size limits.
fn grpc<Req, Resp>() -> tonic::server::Grpc<AdsCodec<Resp, Req>>
where
    Req: prost::Message + Default + Send + 'static,
    Resp: prost::Message + Send + 'static,
{
    tonic::server::Grpc::new(AdsCodec(PhantomData))
        .apply_max_message_size_config(Some(limits::MAX_REQUEST_BYTES), Some(usize::MAX))
}

/// One ADS method: a stream of flavour `F`.
struct Method<F> {
    server: Arc<AdsServer>,
    flavor: PhantomData<fn() -> F>,
}

impl<F> Method<F> {
    fn new(server: Arc<AdsServer>) -> Self {
        Self {
            server,
            flavor: PhantomData,
        }
    }
}

impl<F: StreamFlavor> tonic::server::StreamingService<F::Request> for Method<F>
where
    Streaming<F::Request>: futures::Stream<Item = Result<F::Request, Status>> + Unpin,
    F::Response: Send + 'static,
{
    type Response = F::Response;
    type ResponseStream = ResponseStream<F::Response>;
    type Future = std::future::Ready<Result<Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, request: Request<Streaming<F::Request>>) -> Self::Future {
        std::future::ready(Ok(self.server.serve::<F>(request)))
    }
}

/// tonic's prost codec with smaller buffers than its defaults. tonic keeps each of a
/// stream's two buffers, at the largest size it ever reached, for the stream's life.
/// Measured at 3,000 delta streams (`bench-xds.sh`, heaptrack): peak RSS 326 → 298 MiB,
/// about 9 KiB per stream, with the same initial-config time; a proxy with 1,000
/// services (1 MB of initial config) still gets it all, in 6.2 s instead of 5.8 s for
/// 200 such proxies (within the run-to-run spread on this loaded machine).
struct AdsCodec<E, D>(PhantomData<fn() -> (E, D)>);

/// Where a stream's decode buffer starts (tonic: 8 KiB). Requests (ACKs, the first one
/// with the node) are a few hundred bytes to 2 KiB, and the buffer grows for a larger
/// one. heaptrack at 3,000 streams: 8.2 KiB per stream before, 2.5 KiB after (256
/// bytes measured the same as 1 KiB).
const DECODE_BUFFER_BYTES: usize = 1024;

/// Where a stream's encode buffer starts (tonic: 8 KiB); it grows to the largest
/// response, and that is what it keeps.
const ENCODE_BUFFER_BYTES: usize = 1024;

/// Each response is handed to h2 on its own (tonic: responses that are ready together
/// are encoded into one buffer up to 32 KiB), so the encode buffer is kept at the
/// largest response, not at the sum of those queued at connect time.
const YIELD_EVERY_RESPONSE: usize = 0;

impl<E, D> Codec for AdsCodec<E, D>
where
    E: prost::Message + Send + 'static,
    D: prost::Message + Default + Send + 'static,
{
    type Encode = E;
    type Decode = D;
    type Encoder = ProstEncoder<E>;
    type Decoder = ProstDecoder<D>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::new(
            ENCODE_BUFFER_BYTES,
            YIELD_EVERY_RESPONSE,
        ))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(BufferSettings::new(
            DECODE_BUFFER_BYTES,
            YIELD_EVERY_RESPONSE,
        ))
    }
}
