//! An in-process ADS client (tonic, the same protos as Envoy) for protocol tests and
//! load generation: it sends exactly the requests a test asks for and hands back every
//! response, so nonces, versions, ACKs and NACKs can be checked one by one.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

pub const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const RDS: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";

const RECV_TIMEOUT: Duration = Duration::from_secs(5);

/// A client certificate for the xDS port: what `meshctl bootstrap` gives a sidecar.
#[derive(Debug, Clone)]
pub struct ClientCert {
    pub chain_pem: String,
    key_pem: String,
    pub trust_bundle_pem: String,
}

impl ClientCert {
    /// Mints a certificate for `spiffe://cluster.local/ns/<namespace>/sa/<service_account>`
    /// with the CA in `ca_dir` (meshd's `--ca-dir`).
    pub fn mint(
        ca_dir: &std::path::Path,
        namespace: &str,
        service_account: &str,
    ) -> anyhow::Result<ClientCert> {
        let ca = meshd_ca::store::open(
            &meshd_ca::store::CaSource::Directory(ca_dir.to_path_buf()),
            meshd_ca::CaConfig::default(),
        )?;
        let id = ca.workload_id(namespace, service_account)?;
        Ok(Self::from_issued(&ca, &ca.issue(&id)?))
    }

    /// The certificate `issued` by `ca`.
    pub fn from_issued(
        ca: &meshd_ca::Authority,
        issued: &meshd_ca::IssuedCertificate,
    ) -> ClientCert {
        ClientCert {
            chain_pem: issued.chain_pem.clone(),
            key_pem: issued.key.secret_pem().to_string(),
            trust_bundle_pem: ca.trust_bundle().pem(),
        }
    }

    /// An operator certificate (`spiffe://cluster.local/meshd/operator/<name>`) from
    /// the CA in `ca_dir`: what `meshctl ca operator-cert` issues.
    pub fn operator(ca_dir: &std::path::Path, name: &str) -> anyhow::Result<ClientCert> {
        let (ca, _) = meshd_ca::store::open_or_create(
            &meshd_ca::store::CaSource::Directory(ca_dir.to_path_buf()),
            meshd_ca::CaConfig::default(),
        )?;
        let id = meshd_ca::OperatorId::new(&ca.config().trust_domain, name)?;
        let issued = ca.issue_operator(&id, Duration::from_secs(600))?;
        Ok(ClientCert {
            chain_pem: issued.chain_pem,
            key_pem: issued.key.secret_pem().to_string(),
            trust_bundle_pem: ca.trust_bundle().pem(),
        })
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// A certificate for the same identity from a CA this mesh does not trust.
    pub fn from_foreign_ca(
        namespace: &str,
        service_account: &str,
        trust_bundle_pem: &str,
    ) -> anyhow::Result<ClientCert> {
        let dir = tempfile::tempdir()?;
        meshd_ca::store::open_or_create(
            &meshd_ca::store::CaSource::Directory(dir.path().to_path_buf()),
            meshd_ca::CaConfig::default(),
        )?;
        let mut cert = Self::mint(dir.path(), namespace, service_account)?;
        cert.trust_bundle_pem = trust_bundle_pem.to_string();
        Ok(cert)
    }
}

/// The node a `meshctl bootstrap` sidecar of `namespace/pod` running as
/// `service_account` presents.
pub fn node(namespace: &str, pod: &str, service_account: &str) -> Node {
    let s = |v: &str| Value {
        kind: Some(Kind::StringValue(v.to_string())),
    };
    Node {
        id: format!("{pod}.{namespace}"),
        cluster: namespace.to_string(),
        metadata: Some(Struct {
            fields: [
                ("namespace".to_string(), s(namespace)),
                ("pod".to_string(), s(pod)),
                ("service_account".to_string(), s(service_account)),
            ]
            .into(),
        }),
        ..Default::default()
    }
}

pub(crate) async fn client(
    addr: SocketAddr,
    cert: &ClientCert,
) -> anyhow::Result<AggregatedDiscoveryServiceClient<tonic::transport::Channel>> {
    ads_client(addr, Some(cert)).await
}

/// An ADS client on its own connection: mutual TLS with `cert` (the server must present
/// the DNS name `meshd`, as meshd's certificate does), or plaintext without one.
pub(crate) async fn ads_client(
    addr: SocketAddr,
    cert: Option<&ClientCert>,
) -> anyhow::Result<AggregatedDiscoveryServiceClient<tonic::transport::Channel>> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let endpoint = match cert {
        Some(cert) => Endpoint::from_shared(format!("https://{addr}"))?.tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&cert.trust_bundle_pem))
                .identity(Identity::from_pem(&cert.chain_pem, &cert.key_pem))
                .domain_name("meshd"),
        )?,
        None => Endpoint::from_shared(format!("http://{addr}"))?,
    };
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("connect to the xDS server at {addr}"))?;
    Ok(AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(usize::MAX))
}

/// A state-of-the-world ADS stream.
#[derive(Debug)]
pub struct SotwClient {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: Streaming<DiscoveryResponse>,
}

impl SotwClient {
    /// Opens the stream with `cert`; the first request is sent with [`SotwClient::send`].
    pub async fn connect(addr: SocketAddr, cert: &ClientCert) -> anyhow::Result<SotwClient> {
        let (tx, rx) = mpsc::channel(16);
        let resp = client(addr, cert)
            .await?
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await?;
        Ok(SotwClient {
            tx,
            rx: resp.into_inner(),
        })
    }

    pub async fn send(&self, req: DiscoveryRequest) -> anyhow::Result<()> {
        self.tx.send(req).await.context("stream closed")
    }

    /// A request for `type_url`: `names` to subscribe, answering `last` (ACK) if given.
    pub async fn request(
        &self,
        node: Option<Node>,
        type_url: &str,
        names: &[&str],
        last: Option<&DiscoveryResponse>,
    ) -> anyhow::Result<()> {
        self.send(DiscoveryRequest {
            node,
            type_url: type_url.to_string(),
            resource_names: names.iter().map(|s| s.to_string()).collect(),
            version_info: last.map(|r| r.version_info.clone()).unwrap_or_default(),
            response_nonce: last.map(|r| r.nonce.clone()).unwrap_or_default(),
            ..Default::default()
        })
        .await
    }

    /// Rejects `resp` with `message`.
    pub async fn nack(
        &self,
        resp: &DiscoveryResponse,
        names: &[&str],
        message: &str,
    ) -> anyhow::Result<()> {
        self.send(DiscoveryRequest {
            type_url: resp.type_url.clone(),
            resource_names: names.iter().map(|s| s.to_string()).collect(),
            response_nonce: resp.nonce.clone(),
            error_detail: Some(envoy_types::pb::google::rpc::Status {
                code: 3,
                message: message.to_string(),
                details: vec![],
            }),
            ..Default::default()
        })
        .await
    }

    /// The next response, or an error if none arrives within 5 s or the stream ends.
    pub async fn recv(&mut self) -> anyhow::Result<DiscoveryResponse> {
        match tokio::time::timeout(RECV_TIMEOUT, self.rx.message()).await {
            Err(_) => bail!("no response within {RECV_TIMEOUT:?}"),
            Ok(Err(status)) => Err(status.into()),
            Ok(Ok(None)) => bail!("stream ended"),
            Ok(Ok(Some(r))) => Ok(r),
        }
    }

    /// The stream's end status, waiting up to 5 s for it.
    pub async fn recv_status(&mut self) -> anyhow::Result<tonic::Status> {
        match tokio::time::timeout(RECV_TIMEOUT, self.rx.message()).await {
            Ok(Err(status)) => Ok(status),
            other => bail!("expected the stream to fail, got {other:?}"),
        }
    }

    /// Ok if no response arrives within `quiet`.
    pub async fn expect_silence(&mut self, quiet: Duration) -> anyhow::Result<()> {
        match tokio::time::timeout(quiet, self.rx.message()).await {
            Err(_) => Ok(()),
            Ok(other) => bail!("expected no response, got {other:?}"),
        }
    }
}

/// An incremental (delta) ADS stream.
#[derive(Debug)]
pub struct DeltaClient {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: Streaming<DeltaDiscoveryResponse>,
}

impl DeltaClient {
    pub async fn connect(addr: SocketAddr, cert: &ClientCert) -> anyhow::Result<DeltaClient> {
        let (tx, rx) = mpsc::channel(16);
        let resp = client(addr, cert)
            .await?
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await?;
        Ok(DeltaClient {
            tx,
            rx: resp.into_inner(),
        })
    }

    pub async fn send(&self, req: DeltaDiscoveryRequest) -> anyhow::Result<()> {
        self.tx.send(req).await.context("stream closed")
    }

    /// Subscribes to `names` of `type_url` (empty: wildcard on a first request).
    pub async fn subscribe(
        &self,
        node: Option<Node>,
        type_url: &str,
        names: &[&str],
    ) -> anyhow::Result<()> {
        self.send(DeltaDiscoveryRequest {
            node,
            type_url: type_url.to_string(),
            resource_names_subscribe: names.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .await
    }

    pub async fn ack(&self, resp: &DeltaDiscoveryResponse) -> anyhow::Result<()> {
        self.send(DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            ..Default::default()
        })
        .await
    }

    /// The stream's end status, waiting up to 5 s for it.
    pub async fn recv_status(&mut self) -> anyhow::Result<tonic::Status> {
        match tokio::time::timeout(RECV_TIMEOUT, self.rx.message()).await {
            Ok(Err(status)) => Ok(status),
            other => bail!("expected the stream to fail, got {other:?}"),
        }
    }

    pub async fn recv(&mut self) -> anyhow::Result<DeltaDiscoveryResponse> {
        match tokio::time::timeout(RECV_TIMEOUT, self.rx.message()).await {
            Err(_) => bail!("no response within {RECV_TIMEOUT:?}"),
            Ok(Err(status)) => Err(status.into()),
            Ok(Ok(None)) => bail!("stream ended"),
            Ok(Ok(Some(r))) => Ok(r),
        }
    }

    pub async fn expect_silence(&mut self, quiet: Duration) -> anyhow::Result<()> {
        match tokio::time::timeout(quiet, self.rx.message()).await {
            Err(_) => Ok(()),
            Ok(other) => bail!("expected no response, got {other:?}"),
        }
    }
}

/// The names of the resources in a SotW response, decoded from their `Any`s.
pub fn resource_names(resp: &DiscoveryResponse) -> anyhow::Result<Vec<String>> {
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
    use envoy_types::pb::envoy::config::listener::v3::Listener;
    use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
    use prost::Message;
    resp.resources
        .iter()
        .map(|any| {
            anyhow::ensure!(
                any.type_url == resp.type_url,
                "resource type {} in a {} response",
                any.type_url,
                resp.type_url
            );
            Ok(match any.type_url.as_str() {
                CDS => Cluster::decode(any.value.as_slice())?.name,
                EDS => ClusterLoadAssignment::decode(any.value.as_slice())?.cluster_name,
                LDS => Listener::decode(any.value.as_slice())?.name,
                RDS => RouteConfiguration::decode(any.value.as_slice())?.name,
                other => bail!("unexpected type {other}"),
            })
        })
        .collect()
}
