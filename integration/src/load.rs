//! Load generation for meshd's xDS server: a scenario written as a config directory,
//! and many Envoy-like ADS streams that record when each piece of config arrived.
//!
//! A [`Scenario`] is `services` HTTP services with `endpoints` backend pods spread over
//! them, and `proxies` client pods, each calling `upstreams` services (its sidecar's
//! outbound listeners and clusters). [`run_proxy`] behaves like Envoy on one stream,
//! over the same mutual TLS and identity scheme: wildcard CDS and LDS, EDS and RDS by
//! the names the clusters carry, SDS for its certificate and roots, an ACK for every
//! response; it records every response's arrival, type and size.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::xds_client::{CDS, ClientCert, EDS, LDS, RDS, client, node};

pub const NAMESPACE: &str = "load";
const SDS: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

#[derive(Debug, Clone)]
pub struct Scenario {
    pub services: usize,
    pub endpoints: usize,
    pub proxies: usize,
    pub upstreams: usize,
}

impl Scenario {
    pub fn service(i: usize) -> String {
        format!("svc{i}")
    }

    pub fn proxy(i: usize) -> String {
        format!("proxy-{i}")
    }

    /// The services proxy `i` calls.
    pub fn upstreams_of(&self, i: usize) -> Vec<usize> {
        (0..self.upstreams.min(self.services))
            .map(|k| (i * 7 + k) % self.services)
            .collect()
    }

    /// Writes the whole mesh into `dir` (one file per kind of object).
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        let mut services =
            format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NAMESPACE}}}\n");
        for s in 0..self.services {
            let _ = write!(
                services,
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {}, namespace: {NAMESPACE}}}\nspec:\n  selector: {{app: {}}}\n  ports: [{{name: http, port: 80, targetPort: 8080, appProtocol: http}}]\n",
                Self::service(s),
                Self::service(s)
            );
        }
        std::fs::write(dir.join("services.yaml"), services)?;
        let mut backends = String::new();
        for e in 0..self.endpoints {
            let _ = write!(backends, "{}", self.backend(e, e % self.services));
        }
        std::fs::write(dir.join("backends.yaml"), backends)?;
        let mut proxies = String::new();
        for p in 0..self.proxies {
            let ups: Vec<String> = self
                .upstreams_of(p)
                .iter()
                .enumerate()
                .map(|(k, s)| format!("{}:80={}", Self::service(*s), 20000 + k))
                .collect();
            let _ = write!(
                proxies,
                "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: {NAMESPACE}\n  labels: {{app: client}}\n  annotations: {{meshd.io/upstreams: \"{}\"}}\nspec:\n  serviceAccountName: client\n  containers: [{{name: app, image: app}}]\nstatus:\n  podIP: {}\n  conditions: [{{type: Ready, status: \"True\"}}]\n",
                Self::proxy(p),
                ups.join(", "),
                ip(1 << 20 | p)
            );
        }
        std::fs::write(dir.join("proxies.yaml"), proxies)?;
        Ok(())
    }

    /// Backend pod `e`, serving service `s`.
    pub fn backend(&self, e: usize, s: usize) -> String {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: backend-{e}\n  namespace: {NAMESPACE}\n  labels: {{app: {}}}\nspec:\n  serviceAccountName: {}\n  containers: [{{name: app, image: app, ports: [{{containerPort: 8080}}]}}]\nstatus:\n  podIP: {}\n  conditions: [{{type: Ready, status: \"True\"}}]\n",
            Self::service(s),
            Self::service(s),
            ip(e)
        )
    }
}

fn ip(i: usize) -> String {
    format!("10.{}.{}.{}", (i >> 16) & 0xff, (i >> 8) & 0xff, i & 0xff)
}

/// One response as a proxy saw it.
#[derive(Debug, Clone)]
pub struct Arrival {
    pub at: Instant,
    pub type_url: &'static str,
    pub bytes: usize,
    /// Names of the resources it carried.
    pub names: Vec<String>,
}

/// What one proxy's stream recorded.
#[derive(Debug, Default)]
pub struct Timeline {
    pub connected: Option<Instant>,
    /// When it first had clusters, endpoints for every cluster, listeners, routes and
    /// secrets.
    pub complete: Option<Instant>,
    pub arrivals: Vec<Arrival>,
    pub error: Option<String>,
}

pub type SharedTimeline = Arc<Mutex<Timeline>>;

fn type_name(url: &str) -> &'static str {
    match url {
        CDS => CDS,
        EDS => EDS,
        LDS => LDS,
        RDS => RDS,
        SDS => SDS,
        _ => "other",
    }
}

/// The EDS cluster names in a CDS response.
fn eds_names<'a>(resources: impl Iterator<Item = &'a [u8]>) -> Vec<String> {
    let mut names: Vec<String> = resources
        .filter_map(|b| Cluster::decode(b).ok())
        .filter(|c| c.eds_cluster_config.is_some())
        .map(|c| c.name)
        .collect();
    names.sort();
    names
}

/// Tracks which types a stream has, to tell when its config is complete.
#[derive(Default)]
struct Progress {
    cds: bool,
    lds: bool,
    sds: bool,
    eds_wanted: Vec<String>,
    eds_have: std::collections::BTreeSet<String>,
}

impl Progress {
    fn complete(&self) -> bool {
        self.cds
            && self.lds
            && self.sds
            && self.eds_wanted.iter().all(|n| self.eds_have.contains(n))
    }
}

/// One Envoy-like stream for proxy `index` until the connection ends.
pub async fn run_proxy(
    addr: SocketAddr,
    cert: ClientCert,
    pod: String,
    delta: bool,
    timeline: SharedTimeline,
) {
    let result = if delta {
        run_delta(addr, &cert, &pod, &timeline).await
    } else {
        run_sotw(addr, &cert, &pod, &timeline).await
    };
    if let Err(e) = result {
        timeline.lock().expect("timeline").error = Some(format!("{e:#}"));
    }
}

fn record(
    timeline: &SharedTimeline,
    type_url: &str,
    bytes: usize,
    names: Vec<String>,
    progress: &mut Progress,
) {
    let mut t = timeline.lock().expect("timeline");
    let at = Instant::now();
    t.arrivals.push(Arrival {
        at,
        type_url: type_name(type_url),
        bytes,
        names,
    });
    if t.complete.is_none() && progress.complete() {
        t.complete = Some(at);
    }
}

async fn run_sotw(
    addr: SocketAddr,
    cert: &ClientCert,
    pod: &str,
    timeline: &SharedTimeline,
) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel(16);
    let mut stream = client(addr, cert)
        .await?
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    timeline.lock().expect("timeline").connected = Some(Instant::now());
    let request = |type_url: &str, names: &[String], version: &str, nonce: &str, first: bool| {
        DiscoveryRequest {
            node: first.then(|| node(NAMESPACE, pod, "client")),
            type_url: type_url.to_string(),
            resource_names: names.to_vec(),
            version_info: version.to_string(),
            response_nonce: nonce.to_string(),
            ..Default::default()
        }
    };
    tx.send(request(CDS, &[], "", "", true)).await?;
    tx.send(request(LDS, &[], "", "", false)).await?;
    let secrets = vec!["default".to_string(), "ROOTCA".to_string()];
    tx.send(request(SDS, &secrets, "", "", false)).await?;
    let mut progress = Progress::default();
    while let Some(resp) = stream.message().await? {
        let bytes = resp.encoded_len();
        let names: Vec<String> = Vec::new();
        match resp.type_url.as_str() {
            CDS => {
                progress.cds = true;
                let eds = eds_names(resp.resources.iter().map(|r| r.value.as_slice()));
                tx.send(request(CDS, &[], &resp.version_info, &resp.nonce, false))
                    .await?;
                if eds != progress.eds_wanted {
                    progress.eds_wanted = eds.clone();
                    tx.send(request(EDS, &eds, "", "", false)).await?;
                    // meshd names routes after their clusters.
                    tx.send(request(RDS, &eds, "", "", false)).await?;
                }
            }
            EDS => {
                progress.eds_have = progress.eds_wanted.iter().cloned().collect();
                tx.send(request(
                    EDS,
                    &progress.eds_wanted,
                    &resp.version_info,
                    &resp.nonce,
                    false,
                ))
                .await?;
            }
            RDS => {
                tx.send(request(
                    RDS,
                    &progress.eds_wanted,
                    &resp.version_info,
                    &resp.nonce,
                    false,
                ))
                .await?;
            }
            LDS => {
                progress.lds = true;
                tx.send(request(LDS, &[], &resp.version_info, &resp.nonce, false))
                    .await?;
            }
            SDS => {
                progress.sds = true;
                tx.send(request(
                    SDS,
                    &secrets,
                    &resp.version_info,
                    &resp.nonce,
                    false,
                ))
                .await?;
            }
            _ => {}
        }
        record(timeline, &resp.type_url, bytes, names, &mut progress);
    }
    Ok(())
}

async fn run_delta(
    addr: SocketAddr,
    cert: &ClientCert,
    pod: &str,
    timeline: &SharedTimeline,
) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel(16);
    let mut stream = client(addr, cert)
        .await?
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    timeline.lock().expect("timeline").connected = Some(Instant::now());
    let subscribe = |type_url: &str, names: Vec<String>, first: bool| DeltaDiscoveryRequest {
        node: first.then(|| node(NAMESPACE, pod, "client")),
        type_url: type_url.to_string(),
        resource_names_subscribe: names,
        ..Default::default()
    };
    let ack = |type_url: &str, nonce: &str| DeltaDiscoveryRequest {
        type_url: type_url.to_string(),
        response_nonce: nonce.to_string(),
        ..Default::default()
    };
    tx.send(subscribe(CDS, vec![], true)).await?;
    tx.send(subscribe(LDS, vec![], false)).await?;
    tx.send(subscribe(
        SDS,
        vec!["default".into(), "ROOTCA".into()],
        false,
    ))
    .await?;
    let mut progress = Progress::default();
    let mut clusters: std::collections::BTreeMap<String, bool> = Default::default();
    while let Some(resp) = stream.message().await? {
        let bytes = resp.encoded_len();
        let names: Vec<String> = resp.resources.iter().map(|r| r.name.clone()).collect();
        tx.send(ack(&resp.type_url, &resp.nonce)).await?;
        match resp.type_url.as_str() {
            CDS => {
                progress.cds = true;
                for r in &resp.resources {
                    let eds = r
                        .resource
                        .as_ref()
                        .and_then(|a| Cluster::decode(a.value.as_slice()).ok())
                        .is_some_and(|c| c.eds_cluster_config.is_some());
                    clusters.insert(r.name.clone(), eds);
                }
                for gone in &resp.removed_resources {
                    clusters.remove(gone);
                }
                let eds: Vec<String> = clusters
                    .iter()
                    .filter(|(_, e)| **e)
                    .map(|(n, _)| n.clone())
                    .collect();
                let new: Vec<String> = eds
                    .iter()
                    .filter(|n| !progress.eds_wanted.contains(n))
                    .cloned()
                    .collect();
                progress.eds_wanted = eds;
                if !new.is_empty() {
                    tx.send(subscribe(EDS, new.clone(), false)).await?;
                    tx.send(subscribe(RDS, new, false)).await?;
                }
            }
            EDS => progress.eds_have.extend(names.iter().cloned()),
            LDS => progress.lds = true,
            SDS => progress.sds = true,
            _ => {}
        }
        record(timeline, &resp.type_url, bytes, names, &mut progress);
    }
    Ok(())
}

/// Issues a client certificate for every proxy (all `load/client`) from `ca_dir`.
pub fn certificates(ca_dir: &Path, count: usize) -> anyhow::Result<Vec<ClientCert>> {
    let (ca, _) = meshd_ca::store::open(
        &meshd_ca::store::CaSource::Directory(ca_dir.to_path_buf()),
        meshd_ca::CaConfig::default(),
    )
    .context("open meshd's CA")?;
    let id = ca.workload_id(NAMESPACE, "client")?;
    (0..count)
        .map(|_| ClientCert::from_issued(&ca, &ca.issue(&id)?))
        .collect()
}
