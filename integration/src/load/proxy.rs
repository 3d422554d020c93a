//! One Envoy-like proxy: an ADS stream over mutual TLS (or plaintext), wildcard CDS and
//! LDS, EDS by the names of the EDS clusters, RDS by the route names the listeners'
//! connection managers ask for, SDS for its certificate and roots; it ACKs every
//! response, or NACKs what [`Nack`] says, and records every response's arrival, type,
//! size and resource names (SotW and delta alike) in its [`Timeline`].
//!
//! As Envoy does:
//! - the first requests are in the request stream before the call returns: a server may
//!   send response headers only with its first response (grpc-go does), so a client
//!   that waits for headers before its first request never gets any;
//! - a stream that fails or ends is opened again after [`Backoff`], re-sending what the
//!   proxy subscribes to: SotW, the names it had, with the version it last accepted;
//!   delta, `initial_resource_versions` of every resource it holds. What it held stays
//!   held (its config stays complete), and each reconnect is counted.
//!
//! Changes under measurement are [`Probes`]: each response is checked against every
//! probe when it arrives, and the arrival records the probes whose change it carries,
//! so a change is matched to its own push, not to the first response after it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest,
};
use envoy_types::pb::google::rpc::Status;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::backoff::Backoff;
use super::scenario::NAMESPACE;
use crate::xds_client::{CDS, ClientCert, EDS, LDS, RDS, ads_client, node};

pub const SDS: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
const SECRETS: [&str; 2] = ["default", "ROOTCA"];

/// One response as a proxy saw it.
#[derive(Debug, Clone)]
pub struct Arrival {
    pub at: Instant,
    pub type_url: &'static str,
    pub bytes: usize,
    /// Names of the resources it carried.
    pub names: Vec<String>,
    /// The [`Probes`] (by id) whose change it carried.
    pub carries: Vec<usize>,
}

/// What one proxy's streams recorded.
#[derive(Debug)]
pub struct Timeline {
    /// When it first had clusters, endpoints for every cluster, listeners, routes and
    /// secrets.
    pub complete: Option<Instant>,
    pub arrivals: Vec<Arrival>,
    /// Streams opened that failed or ended (each followed by a new one after backoff).
    pub reconnects: usize,
    /// Why the last stream that failed did.
    pub error: Option<String>,
    /// Where it stands while incomplete, for a run that stalls: `connecting`, `waiting
    /// for the first response`, or what of its config is missing.
    pub state: String,
}

impl Default for Timeline {
    fn default() -> Self {
        Timeline {
            complete: None,
            arrivals: Vec::new(),
            reconnects: 0,
            error: None,
            state: "not started".to_string(),
        }
    }
}

pub type SharedTimeline = Arc<Mutex<Timeline>>;

/// Whether a response carries a change: `(type URL, resource name, resource bytes)`
/// of each resource it holds.
pub type ProbeFn = Box<dyn Fn(&str, &str, &[u8]) -> bool + Send + Sync>;

struct Probe {
    /// Arrivals before this do not count (the change was not made yet).
    after: Instant,
    carries: ProbeFn,
}

/// The changes under measurement, shared by every stream.
#[derive(Clone, Default)]
pub struct Probes(Arc<RwLock<Vec<Arc<Probe>>>>);

impl Probes {
    /// Registers a change about to be made; returns its id and the instant it counts
    /// from (make the change right after).
    pub fn add(&self, carries: ProbeFn) -> (usize, Instant) {
        let after = Instant::now();
        let mut probes = self.0.write().expect("probes");
        probes.push(Arc::new(Probe { after, carries }));
        (probes.len() - 1, after)
    }

    fn snapshot(&self) -> Vec<Arc<Probe>> {
        self.0.read().expect("probes").clone()
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

/// Who a proxy is and how it reaches the server.
#[derive(Debug, Clone)]
pub struct ProxySpec {
    pub addr: SocketAddr,
    /// Its mesh certificate; `None`: plaintext.
    pub cert: Option<ClientCert>,
    pub pod: String,
    pub delta: bool,
    pub nack: Nack,
}

/// Runs the proxy `spec` until the task is dropped: one stream after another.
pub async fn run_proxy(spec: ProxySpec, timeline: SharedTimeline, probes: Probes) {
    let mut recorder = Recorder {
        timeline,
        probes,
        matched: HashSet::new(),
    };
    let mut held = Held::default();
    let mut backoff = Backoff::default();
    loop {
        recorder.state("connecting");
        let ended = match spec.delta {
            true => delta_stream(&spec, &mut held, &mut recorder, &mut backoff).await,
            false => sotw_stream(&spec, &mut held, &mut recorder, &mut backoff).await,
        };
        let why = match ended {
            Ok(()) => "the server ended the stream".to_string(),
            Err(e) => format!("{e:#}"),
        };
        let delay = backoff.next_delay();
        {
            let mut t = recorder.timeline.lock().expect("timeline");
            t.reconnects += 1;
            if t.complete.is_none() {
                t.state = format!("reconnecting after: {why}");
            }
            t.error = Some(why);
        }
        tokio::time::sleep(delay).await;
    }
}

/// What the proxy holds and subscribes to, across its streams.
#[derive(Default)]
struct Held {
    progress: Progress,
    /// SotW: the version last accepted, by type.
    accepted: HashMap<&'static str, String>,
    /// Delta: the version of every resource held, by type.
    versions: HashMap<&'static str, BTreeMap<String, String>>,
    /// Delta: clusters held (whether each uses EDS) and listeners (the routes each asks
    /// for).
    clusters: BTreeMap<String, bool>,
    listeners: BTreeMap<String, Vec<String>>,
    /// Delta: types a response arrived for (the first of each is never NACKed).
    seen: HashSet<&'static str>,
}

impl Held {
    /// What each type subscribes to: wildcard (empty) for CDS and LDS, names for the
    /// rest; EDS and RDS once there are names to ask for.
    fn subscriptions(&self) -> Vec<(&'static str, Vec<String>)> {
        let mut subs = vec![
            (CDS, vec![]),
            (LDS, vec![]),
            (SDS, SECRETS.map(String::from).to_vec()),
        ];
        if !self.progress.eds_wanted.is_empty() {
            subs.push((EDS, self.progress.eds_wanted.clone()));
        }
        if !self.progress.rds_wanted.is_empty() {
            subs.push((RDS, self.progress.rds_wanted.clone()));
        }
        subs
    }
}

/// Tracks which types a proxy has, to tell when its config is complete.
#[derive(Default)]
struct Progress {
    cds: bool,
    lds: bool,
    sds: bool,
    eds_wanted: Vec<String>,
    eds_have: BTreeSet<String>,
    rds_wanted: Vec<String>,
    rds_have: BTreeSet<String>,
}

impl Progress {
    fn complete(&self) -> bool {
        self.missing().is_empty()
    }

    /// What is missing, for a stalled run's report.
    fn missing(&self) -> String {
        let mut missing = Vec::new();
        for (have, name) in [(self.cds, "CDS"), (self.lds, "LDS"), (self.sds, "SDS")] {
            if !have {
                missing.push(name.to_string());
            }
        }
        for (kind, wanted, have) in [
            ("EDS", &self.eds_wanted, &self.eds_have),
            ("RDS", &self.rds_wanted, &self.rds_have),
        ] {
            let absent = wanted.iter().filter(|n| !have.contains(*n)).count();
            if absent > 0 {
                missing.push(format!("{kind} for {absent} of {}", wanted.len()));
            }
        }
        missing.join(", ")
    }
}

/// Records into a proxy's timeline.
struct Recorder {
    timeline: SharedTimeline,
    probes: Probes,
    /// Probes an arrival of this proxy already carried: later ones do not count.
    matched: HashSet<usize>,
}

impl Recorder {
    fn state(&self, state: &str) {
        let mut t = self.timeline.lock().expect("timeline");
        if t.complete.is_none() {
            t.state = state.to_string();
        }
    }

    /// A response of `type_url`, `bytes` long, carrying `resources` (name, bytes).
    fn record(
        &mut self,
        type_url: &str,
        bytes: usize,
        resources: &[(String, &[u8])],
        progress: &Progress,
    ) {
        let at = Instant::now();
        let carries: Vec<usize> = self
            .probes
            .snapshot()
            .iter()
            .enumerate()
            .filter(|(id, p)| {
                !self.matched.contains(id)
                    && at >= p.after
                    && resources
                        .iter()
                        .any(|(name, value)| (p.carries)(type_url, name, value))
            })
            .map(|(id, _)| id)
            .collect();
        self.matched.extend(carries.iter().copied());
        let mut t = self.timeline.lock().expect("timeline");
        t.arrivals.push(Arrival {
            at,
            type_url: type_name(type_url),
            bytes,
            names: resources.iter().map(|(n, _)| n.clone()).collect(),
            carries,
        });
        if t.complete.is_none() {
            if progress.complete() {
                t.complete = Some(at);
                t.state = "complete".to_string();
            } else {
                t.state = format!("missing {}", progress.missing());
            }
        }
    }
}

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

/// Field 1 of any xDS resource: every type the proxy asks for has its name there
/// (`Cluster.name`, `ClusterLoadAssignment.cluster_name`, `Listener.name`,
/// `RouteConfiguration.name`, `Secret.name`); the rest is skipped, not decoded.
#[derive(Clone, PartialEq, prost::Message)]
struct Named {
    #[prost(string, tag = "1")]
    name: String,
}

fn resource_name(value: &[u8]) -> String {
    Named::decode(value).map(|n| n.name).unwrap_or_default()
}

/// Whether a Cluster resource gets its endpoints over EDS.
fn uses_eds(cluster: &[u8]) -> bool {
    Cluster::decode(cluster).is_ok_and(|c| c.eds_cluster_config.is_some())
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

fn nack_detail() -> Option<Status> {
    Some(Status {
        code: 3,
        message: "xds-load: rejecting updates, as asked".to_string(),
        ..Default::default()
    })
}

/// The request channel of a new stream, holding `first` already: tonic sends what the
/// stream yields while it waits for the response headers.
fn channel_with<T>(first: Vec<T>) -> (mpsc::Sender<T>, ReceiverStream<T>) {
    let (tx, rx) = mpsc::channel(16 + first.len());
    for request in first {
        tx.try_send(request).expect("room for the first requests");
    }
    (tx, ReceiverStream::new(rx))
}

async fn sotw_stream(
    spec: &ProxySpec,
    held: &mut Held,
    recorder: &mut Recorder,
    backoff: &mut Backoff,
) -> anyhow::Result<()> {
    let pod = spec.pod.as_str();
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
    let first = held
        .subscriptions()
        .into_iter()
        .enumerate()
        .map(|(i, (type_url, names))| {
            let version = held.accepted.get(type_url).map_or("", String::as_str);
            request(type_url, &names, version, "", i == 0)
        })
        .collect();
    let (tx, requests) = channel_with(first);
    let mut client = ads_client(spec.addr, spec.cert.as_ref()).await?;
    recorder.state("connected, waiting for the response headers");
    let mut stream = client
        .stream_aggregated_resources(requests)
        .await?
        .into_inner();
    recorder.state("stream open, waiting for the first response");
    let secrets = SECRETS.map(String::from).to_vec();
    while let Some(resp) = stream.message().await? {
        backoff.reset();
        let bytes = resp.encoded_len();
        let type_url = type_name(&resp.type_url);
        let resources: Vec<(String, &[u8])> = resp
            .resources
            .iter()
            .map(|r| (resource_name(&r.value), r.value.as_slice()))
            .collect();
        let progress = &mut held.progress;
        if let Some(version) = held.accepted.get(type_url)
            && spec.nack == Nack::Updates
            && type_url != SDS
        {
            let subscribed = match type_url {
                EDS => progress.eds_wanted.clone(),
                RDS => progress.rds_wanted.clone(),
                _ => Vec::new(),
            };
            let mut reject = request(type_url, &subscribed, version, &resp.nonce, false);
            reject.error_detail = nack_detail();
            tx.send(reject).await?;
            recorder.record(type_url, bytes, &resources, progress);
            continue;
        }
        held.accepted.insert(type_url, resp.version_info.clone());
        let ack =
            |names: &[String]| request(type_url, names, &resp.version_info, &resp.nonce, false);
        match type_url {
            CDS => {
                progress.cds = true;
                let mut eds: Vec<String> = resources
                    .iter()
                    .filter(|(_, value)| uses_eds(value))
                    .map(|(name, _)| name.clone())
                    .collect();
                eds.sort();
                tx.send(ack(&[])).await?;
                if eds != progress.eds_wanted {
                    progress.eds_wanted = eds.clone();
                    tx.send(request(EDS, &eds, "", "", false)).await?;
                }
            }
            LDS => {
                progress.lds = true;
                tx.send(ack(&[])).await?;
                let mut rds: Vec<String> = resources
                    .iter()
                    .flat_map(|(_, value)| rds_names(value))
                    .collect();
                rds.sort();
                rds.dedup();
                if rds != progress.rds_wanted {
                    progress.rds_wanted = rds.clone();
                    tx.send(request(RDS, &rds, "", "", false)).await?;
                }
            }
            EDS => {
                progress
                    .eds_have
                    .extend(resources.iter().map(|(n, _)| n.clone()));
                tx.send(ack(&progress.eds_wanted)).await?;
            }
            RDS => {
                progress
                    .rds_have
                    .extend(resources.iter().map(|(n, _)| n.clone()));
                tx.send(ack(&progress.rds_wanted)).await?;
            }
            SDS => {
                progress.sds = true;
                tx.send(ack(&secrets)).await?;
            }
            _ => {}
        }
        recorder.record(type_url, bytes, &resources, progress);
    }
    Ok(())
}

async fn delta_stream(
    spec: &ProxySpec,
    held: &mut Held,
    recorder: &mut Recorder,
    backoff: &mut Backoff,
) -> anyhow::Result<()> {
    let pod = spec.pod.as_str();
    let subscribe = |type_url: &str, names: Vec<String>| DeltaDiscoveryRequest {
        type_url: type_url.to_string(),
        resource_names_subscribe: names,
        ..Default::default()
    };
    let ack = |type_url: &str, nonce: &str| DeltaDiscoveryRequest {
        type_url: type_url.to_string(),
        response_nonce: nonce.to_string(),
        ..Default::default()
    };
    let first = held
        .subscriptions()
        .into_iter()
        .enumerate()
        .map(|(i, (type_url, names))| DeltaDiscoveryRequest {
            node: (i == 0).then(|| node(NAMESPACE, pod, "client")),
            initial_resource_versions: held
                .versions
                .get(type_url)
                .map(|v| v.iter().map(|(n, v)| (n.clone(), v.clone())).collect())
                .unwrap_or_default(),
            ..subscribe(type_url, names)
        })
        .collect();
    let (tx, requests) = channel_with(first);
    let mut client = ads_client(spec.addr, spec.cert.as_ref()).await?;
    recorder.state("connected, waiting for the response headers");
    let mut stream = client
        .delta_aggregated_resources(requests)
        .await?
        .into_inner();
    recorder.state("stream open, waiting for the first response");
    while let Some(resp) = stream.message().await? {
        backoff.reset();
        let bytes = resp.encoded_len();
        let type_url = type_name(&resp.type_url);
        let resources: Vec<(String, &[u8])> = resp
            .resources
            .iter()
            .map(|r| {
                let value = r.resource.as_ref().map_or(&[][..], |a| a.value.as_slice());
                (r.name.clone(), value)
            })
            .collect();
        let first_of_type = held.seen.insert(type_url);
        if spec.nack == Nack::Updates && !first_of_type && type_url != SDS {
            let mut reject = ack(type_url, &resp.nonce);
            reject.error_detail = nack_detail();
            tx.send(reject).await?;
            recorder.record(type_url, bytes, &resources, &held.progress);
            continue;
        }
        tx.send(ack(type_url, &resp.nonce)).await?;
        hold(held, &resp);
        let progress = &mut held.progress;
        match type_url {
            CDS => {
                progress.cds = true;
                for (name, value) in &resources {
                    held.clusters.insert(name.clone(), uses_eds(value));
                }
                let eds: Vec<String> = (held.clusters.iter())
                    .filter(|(_, eds)| **eds)
                    .map(|(n, _)| n.clone())
                    .collect();
                let new: Vec<String> = (eds.iter())
                    .filter(|n| !progress.eds_wanted.contains(n))
                    .cloned()
                    .collect();
                progress.eds_wanted = eds;
                if !new.is_empty() {
                    tx.send(subscribe(EDS, new)).await?;
                }
            }
            LDS => {
                progress.lds = true;
                for (name, value) in &resources {
                    held.listeners.insert(name.clone(), rds_names(value));
                }
                let mut rds: Vec<String> = held.listeners.values().flatten().cloned().collect();
                rds.sort();
                rds.dedup();
                let new: Vec<String> = (rds.iter())
                    .filter(|n| !progress.rds_wanted.contains(n))
                    .cloned()
                    .collect();
                progress.rds_wanted = rds;
                if !new.is_empty() {
                    tx.send(subscribe(RDS, new)).await?;
                }
            }
            EDS => progress
                .eds_have
                .extend(resources.iter().map(|(n, _)| n.clone())),
            RDS => progress
                .rds_have
                .extend(resources.iter().map(|(n, _)| n.clone())),
            SDS => progress.sds = true,
            _ => {}
        }
        recorder.record(type_url, bytes, &resources, progress);
    }
    Ok(())
}

/// Applies an accepted delta response to what the proxy holds: resource versions, and
/// removed clusters and listeners.
fn hold(held: &mut Held, resp: &DeltaDiscoveryResponse) {
    let type_url = type_name(&resp.type_url);
    let versions = held.versions.entry(type_url).or_default();
    for r in &resp.resources {
        versions.insert(r.name.clone(), r.version.clone());
    }
    for gone in &resp.removed_resources {
        versions.remove(gone);
        match type_url {
            CDS => {
                held.clusters.remove(gone);
            }
            LDS => {
                held.listeners.remove(gone);
            }
            _ => {}
        }
    }
}
