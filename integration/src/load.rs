//! Load generation for meshd's xDS server: a scenario written as a config directory,
//! and many Envoy-like ADS streams that record when each piece of config arrived.
//!
//! A [`Scenario`] is `services` HTTP services with `endpoints` backend pods spread over
//! them, and `proxies` client pods, each calling `upstreams` services (its sidecar's
//! outbound listeners and clusters) and serving HTTP on 8080 behind the Service
//! `client` (its inbound listener and route, where AuthorizationPolicies land).
//! `xds-load` writes its changes into the directory as meshd would see them from a
//! cluster.
//!
//! [`run_proxy`] behaves like Envoy on one stream, over the same mutual TLS and
//! identity scheme: wildcard CDS and LDS, EDS by the names of the EDS clusters, RDS by
//! the route names the listeners' connection managers ask for, SDS for its certificate
//! and roots; it ACKs every response, or NACKs what [`Nack`] says, and records every
//! response's arrival, type, size and resource names.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager,
};
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use envoy_types::pb::google::rpc::Status;
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
    /// Whether proxies also have an egress port, and what it reaches; in transparent
    /// capture, what the virtual outbound listener reaches (`None`: the namespace,
    /// here the whole mesh).
    pub egress: Option<EgressScope>,
    /// Proxies are `meshd.io/capture: transparent` (virtual listeners, no egress port).
    pub transparent: bool,
}

/// The scope of every proxy's egress port (`meshd.io/scope`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EgressScope {
    /// The services the proxy calls anyway: a scoped proxy.
    Upstreams,
    /// `*`: every service of the mesh, as an unscoped proxy would have.
    All,
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
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {}, namespace: {NAMESPACE}}}\nspec:\n  clusterIP: 10.96.{}.{}\n  selector: {{app: {}}}\n  ports: [{{name: http, port: 80, targetPort: 8080, appProtocol: http}}]\n",
                Self::service(s),
                s / 250,
                s % 250 + 1,
                Self::service(s)
            );
        }
        // Every client also serves HTTP on 8080, behind the Service `client`.
        let _ = write!(
            services,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: client, namespace: {NAMESPACE}}}\nspec:\n  selector: {{app: client}}\n  ports: [{{name: http, port: 80, targetPort: 8080, appProtocol: http}}]\n"
        );
        std::fs::write(dir.join("services.yaml"), services)?;
        // The first backend of each service in a file of its own (`roll-<s>.yaml`),
        // which a `pod-roll` rewrites with a pod of a new name and address.
        let mut backends = String::new();
        for e in 0..self.endpoints {
            let s = e % self.services;
            if e < self.services {
                std::fs::write(dir.join(Self::roll_file(s)), self.backend(e, s))?;
            } else {
                let _ = write!(backends, "{}", self.backend(e, s));
            }
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
            let port = match self.transparent {
                true => ", meshd.io/capture: transparent",
                false => ", meshd.io/egress-port: \"15080\"",
            };
            let egress = match self.egress {
                None if self.transparent => port.to_string(),
                None => String::new(),
                Some(EgressScope::All) => format!("{port}, meshd.io/scope: \"*\""),
                Some(EgressScope::Upstreams) => {
                    let scope: Vec<String> = self
                        .upstreams_of(p)
                        .iter()
                        .map(|s| format!("{NAMESPACE}/{}", Self::service(*s)))
                        .collect();
                    format!("{port}, meshd.io/scope: \"{}\"", scope.join(", "))
                }
            };
            let _ = write!(
                proxies,
                "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: {NAMESPACE}\n  labels: {{app: client}}\n  annotations: {{meshd.io/upstreams: \"{}\"{egress}}}\nspec:\n  serviceAccountName: client\n  containers: [{{name: app, image: app, ports: [{{containerPort: 8080}}]}}]\nstatus:\n  podIP: {}\n  conditions: [{{type: Ready, status: \"True\"}}]\n",
                Self::proxy(p),
                ups.join(", "),
                ip(1 << 20 | p)
            );
        }
        std::fs::write(dir.join("proxies.yaml"), proxies)?;
        Ok(())
    }

    /// The file holding the pod of service `s` that a `pod-roll` replaces.
    pub fn roll_file(s: usize) -> String {
        format!("roll-{s}.yaml")
    }

    /// Backend pod `e`, serving service `s`.
    pub fn backend(&self, e: usize, s: usize) -> String {
        self.pod(&format!("backend-{e}"), e, s)
    }

    /// A backend pod `name` at address number `e`, serving service `s`.
    pub fn pod(&self, name: &str, e: usize, s: usize) -> String {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {NAMESPACE}\n  labels: {{app: {}}}\nspec:\n  serviceAccountName: {}\n  containers: [{{name: app, image: app, ports: [{{containerPort: 8080}}]}}]\nstatus:\n  podIP: {}\n  conditions: [{{type: Ready, status: \"True\"}}]\n",
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

/// The route configurations a listener's HTTP connection managers ask for over RDS.
fn rds_names(listener: &[u8]) -> Vec<String> {
    let Ok(listener) = Listener::decode(listener) else {
        return Vec::new();
    };
    let mut names: Vec<String> = listener
        .filter_chains
        .iter()
        .flat_map(|c| &c.filters)
        .filter_map(|f| match &f.config_type {
            Some(
                envoy_types::pb::envoy::config::listener::v3::filter::ConfigType::TypedConfig(any),
            ) if any.type_url.ends_with(".HttpConnectionManager") => {
                HttpConnectionManager::decode(any.value.as_slice()).ok()
            }
            _ => None,
        })
        .filter_map(|hcm| match hcm.route_specifier {
            Some(http_connection_manager::RouteSpecifier::Rds(rds)) => Some(rds.route_config_name),
            _ => None,
        })
        .collect();
    names.sort();
    names.dedup();
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
    rds_wanted: Vec<String>,
    rds_have: std::collections::BTreeSet<String>,
}

impl Progress {
    fn complete(&self) -> bool {
        self.cds
            && self.lds
            && self.sds
            && self.eds_wanted.iter().all(|n| self.eds_have.contains(n))
            && self.rds_wanted.iter().all(|n| self.rds_have.contains(n))
    }
}

/// What a proxy rejects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nack {
    /// ACK everything.
    Never,
    /// NACK every response after the first of its type (secrets aside), as an Envoy
    /// does that rejects every update: it keeps its initial config.
    Updates,
}

/// One Envoy-like stream for the proxy of `pod` until the connection ends.
pub async fn run_proxy(
    addr: SocketAddr,
    cert: ClientCert,
    pod: String,
    delta: bool,
    nack: Nack,
    timeline: SharedTimeline,
) {
    let result = if delta {
        run_delta(addr, &cert, &pod, nack, &timeline).await
    } else {
        run_sotw(addr, &cert, &pod, nack, &timeline).await
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

fn nack_detail() -> Option<Status> {
    Some(Status {
        code: 3,
        message: "xds-load: rejecting updates, as asked".to_string(),
        ..Default::default()
    })
}

async fn run_sotw(
    addr: SocketAddr,
    cert: &ClientCert,
    pod: &str,
    nack: Nack,
    timeline: &SharedTimeline,
) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel(16);
    let mut stream = client(addr, cert)
        .await?
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
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
    // The last version accepted, by type.
    let mut accepted: std::collections::HashMap<String, String> = Default::default();
    while let Some(resp) = stream.message().await? {
        let bytes = resp.encoded_len();
        let names: Vec<String> = Vec::new();
        if let Some(version) = accepted.get(&resp.type_url)
            && nack == Nack::Updates
            && resp.type_url != SDS
        {
            let subscribed = match resp.type_url.as_str() {
                EDS => progress.eds_wanted.clone(),
                RDS => progress.rds_wanted.clone(),
                _ => Vec::new(),
            };
            let mut reject = request(&resp.type_url, &subscribed, version, &resp.nonce, false);
            reject.error_detail = nack_detail();
            tx.send(reject).await?;
            record(timeline, &resp.type_url, bytes, names, &mut progress);
            continue;
        }
        accepted.insert(resp.type_url.clone(), resp.version_info.clone());
        match resp.type_url.as_str() {
            CDS => {
                progress.cds = true;
                let eds = eds_names(resp.resources.iter().map(|r| r.value.as_slice()));
                tx.send(request(CDS, &[], &resp.version_info, &resp.nonce, false))
                    .await?;
                if eds != progress.eds_wanted {
                    progress.eds_wanted = eds.clone();
                    tx.send(request(EDS, &eds, "", "", false)).await?;
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
                progress.rds_have = progress.rds_wanted.iter().cloned().collect();
                tx.send(request(
                    RDS,
                    &progress.rds_wanted,
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
                let mut rds: Vec<String> = resp
                    .resources
                    .iter()
                    .flat_map(|r| rds_names(&r.value))
                    .collect();
                rds.sort();
                rds.dedup();
                if rds != progress.rds_wanted {
                    progress.rds_wanted = rds.clone();
                    tx.send(request(RDS, &rds, "", "", false)).await?;
                }
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
    nack: Nack,
    timeline: &SharedTimeline,
) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel(16);
    let mut stream = client(addr, cert)
        .await?
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
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
    let mut listeners: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    let mut seen: std::collections::HashSet<String> = Default::default();
    while let Some(resp) = stream.message().await? {
        let bytes = resp.encoded_len();
        let names: Vec<String> = resp.resources.iter().map(|r| r.name.clone()).collect();
        let first_of_type = seen.insert(resp.type_url.clone());
        if nack == Nack::Updates && !first_of_type && resp.type_url != SDS {
            let mut reject = ack(&resp.type_url, &resp.nonce);
            reject.error_detail = nack_detail();
            tx.send(reject).await?;
            record(timeline, &resp.type_url, bytes, names, &mut progress);
            continue;
        }
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
                    tx.send(subscribe(EDS, new, false)).await?;
                }
            }
            LDS => {
                progress.lds = true;
                for r in &resp.resources {
                    let routes = r
                        .resource
                        .as_ref()
                        .map(|a| rds_names(&a.value))
                        .unwrap_or_default();
                    listeners.insert(r.name.clone(), routes);
                }
                for gone in &resp.removed_resources {
                    listeners.remove(gone);
                }
                let mut rds: Vec<String> = listeners.values().flatten().cloned().collect();
                rds.sort();
                rds.dedup();
                let new: Vec<String> = rds
                    .iter()
                    .filter(|n| !progress.rds_wanted.contains(n))
                    .cloned()
                    .collect();
                progress.rds_wanted = rds;
                if !new.is_empty() {
                    tx.send(subscribe(RDS, new, false)).await?;
                }
            }
            EDS => progress.eds_have.extend(names.iter().cloned()),
            RDS => progress.rds_have.extend(names.iter().cloned()),
            SDS => progress.sds = true,
            _ => {}
        }
        record(timeline, &resp.type_url, bytes, names, &mut progress);
    }
    Ok(())
}

/// Issues a client certificate for every proxy (all `load/client`) from `ca_dir`.
pub fn certificates(ca_dir: &Path, count: usize) -> anyhow::Result<Vec<ClientCert>> {
    let ca = meshd_ca::store::open(
        &meshd_ca::store::CaSource::Directory(ca_dir.to_path_buf()),
        meshd_ca::CaConfig::default(),
    )
    .context("open meshd's CA")?;
    let id = ca.workload_id(NAMESPACE, "client")?;
    (0..count)
        .map(|_| Ok(ClientCert::from_issued(&ca, &ca.issue(&id)?)))
        .collect()
}
