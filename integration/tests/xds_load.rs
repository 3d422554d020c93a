//! `xds-load` drives any ADS server and measures exactly.
//!
//! Against a small ADS server of this file — a real tonic gRPC server over mutual TLS
//! with a fixed set of resources, standing in for a control plane that is not meshd
//! (none other is installed here) — which behaves as grpc-go servers do: no response
//! headers before its first response, so none before it has read the first request:
//! - the tool's proxies complete against it (they send their first requests before the
//!   headers);
//! - a server that never answers ends the run with an error saying how many proxies
//!   completed and what the streams saw;
//! - streams it drops once are reconnected with their subscriptions, and counted;
//! - a change is matched to the push that carries it (SotW and delta alike), not to the
//!   first response after it.
//!
//! Against meshd: `--server-cmd` running meshd as a foreign command gives the same
//! figures as the default path, with its RSS and CPU, and `--rate` reports the rate it
//! made.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address, socket_address};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain, Listener, filter};
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, Rds, http_connection_manager,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::google::protobuf::Any;
use meshd_integration::load::changes::{Applied, ChangeKind, endpoint};
use meshd_integration::load::measure::reached;
use meshd_integration::load::proxy::SDS;
use meshd_integration::load::{self, Nack, Probes, ProxySpec, SharedTimeline, Timeline};
use meshd_integration::xds_client::{CDS, EDS, LDS, RDS};
use prost::Message;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

fn cluster_name(svc: usize) -> String {
    format!("outbound|80||svc{svc}.load.svc.cluster.local")
}

fn any<M: Message>(type_url: &str, m: &M) -> Any {
    Any {
        type_url: type_url.to_string(),
        value: m.encode_to_vec(),
    }
}

/// An assignment of service `svc`'s cluster with endpoints at `addresses`.
fn assignment(svc: usize, addresses: &[&str]) -> (String, Any) {
    let lb_endpoints = addresses
        .iter()
        .map(|a| LbEndpoint {
            host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: a.to_string(),
                        port_specifier: Some(socket_address::PortSpecifier::PortValue(8080)),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            })),
            ..Default::default()
        })
        .collect();
    let cla = ClusterLoadAssignment {
        cluster_name: cluster_name(svc),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints,
            ..Default::default()
        }],
        ..Default::default()
    };
    (cluster_name(svc), any(EDS, &cla))
}

/// The server's resources at version "1": two EDS clusters, a listener whose
/// connection manager asks for route `r0`, that route, and the two secrets.
fn resources() -> Vec<(&'static str, String, Any)> {
    let mut out = Vec::new();
    for svc in 0..2 {
        let cluster = Cluster {
            name: cluster_name(svc),
            eds_cluster_config: Some(Default::default()),
            ..Default::default()
        };
        out.push((CDS, cluster_name(svc), any(CDS, &cluster)));
        let (name, cla) = assignment(svc, &["10.0.0.1"]);
        out.push((EDS, name, cla));
    }
    let hcm = HttpConnectionManager {
        route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
            route_config_name: "r0".into(),
            ..Default::default()
        })),
        ..Default::default()
    };
    let listener = Listener {
        name: "l0".into(),
        filter_chains: vec![FilterChain {
            filters: vec![Filter {
                name: "envoy.filters.network.http_connection_manager".into(),
                config_type: Some(filter::ConfigType::TypedConfig(any(
                    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    &hcm,
                ))),
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    out.push((LDS, "l0".into(), any(LDS, &listener)));
    let route = RouteConfiguration {
        name: "r0".into(),
        ..Default::default()
    };
    out.push((RDS, "r0".into(), any(RDS, &route)));
    for name in ["default", "ROOTCA"] {
        let secret = Secret {
            name: name.into(),
            ..Default::default()
        };
        out.push((SDS, name.into(), any(SDS, &secret)));
    }
    out
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Answers every subscription.
    Serve,
    /// Reads requests, sends headers, never answers.
    Silent,
    /// On the first stream of an even-numbered proxy, ends the stream (UNAVAILABLE)
    /// when it asks for routes: it needs its next stream to complete.
    DropEvenOnce,
}

/// A request as the server received it, on the `stream`-th stream of its node.
#[derive(Debug, Clone)]
struct Seen {
    node: String,
    stream: usize,
    sotw: Option<DiscoveryRequest>,
    delta: Option<DeltaDiscoveryRequest>,
}

/// A push to every stream: SotW or delta responses carrying these resources.
#[derive(Debug, Clone)]
struct Push {
    type_url: &'static str,
    resources: Vec<(String, Any)>,
}

#[derive(Clone)]
struct TestAds {
    mode: Mode,
    streams: Arc<Mutex<HashMap<String, usize>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    pushes: broadcast::Sender<Push>,
}

type Out<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

impl TestAds {
    /// Reads the first request (grpc-go sends no headers before its first response,
    /// and there is none before a request); returns the node and its stream number.
    fn open(&self, node: &str) -> usize {
        let mut streams = self.streams.lock().unwrap();
        let n = streams.entry(node.to_string()).or_default();
        *n += 1;
        *n
    }

    fn dropped(&self, node: &str, stream: usize) -> bool {
        let even = node
            .trim_start_matches("proxy-")
            .split('.')
            .next()
            .and_then(|n| n.parse::<usize>().ok())
            .is_some_and(|n| n % 2 == 0);
        self.mode == Mode::DropEvenOnce && stream == 1 && even
    }

    fn select(type_url: &str, names: &[String]) -> Vec<(String, Any)> {
        resources()
            .into_iter()
            .filter(|(t, n, _)| *t == type_url && (names.is_empty() || names.contains(n)))
            .map(|(_, n, a)| (n, a))
            .collect()
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for TestAds {
    type StreamAggregatedResourcesStream = Out<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = Out<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let mut incoming = request.into_inner();
        let first = incoming
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("no request"))?;
        let node = first.node.clone().map(|n| n.id).unwrap_or_default();
        let stream = self.open(&node);
        let (tx, rx) = mpsc::channel(64);
        let (server, mut pushes) = (self.clone(), self.pushes.subscribe());
        tokio::spawn(async move {
            let mut next = Some(first);
            let mut nonce = 0;
            loop {
                let req = match next.take() {
                    Some(r) => r,
                    None => tokio::select! {
                        r = incoming.message() => match r {
                            Ok(Some(r)) => r,
                            _ => return,
                        },
                        Ok(push) = pushes.recv() => {
                            nonce += 1;
                            let resp = DiscoveryResponse {
                                type_url: push.type_url.to_string(),
                                version_info: format!("push-{nonce}"),
                                nonce: nonce.to_string(),
                                resources: push.resources.into_iter().map(|(_, a)| a).collect(),
                                ..Default::default()
                            };
                            let _ = tx.send(Ok(resp)).await;
                            continue;
                        }
                    },
                };
                server.seen.lock().unwrap().push(Seen {
                    node: node.clone(),
                    stream,
                    sotw: Some(req.clone()),
                    delta: None,
                });
                if server.dropped(&node, stream) && req.type_url == RDS {
                    let _ = tx
                        .send(Err(Status::unavailable("dropped once, as asked")))
                        .await;
                    return;
                }
                if !req.response_nonce.is_empty() || server.mode == Mode::Silent {
                    continue;
                }
                nonce += 1;
                let resp = DiscoveryResponse {
                    type_url: req.type_url.clone(),
                    version_info: "1".into(),
                    nonce: nonce.to_string(),
                    resources: Self::select(&req.type_url, &req.resource_names)
                        .into_iter()
                        .map(|(_, a)| a)
                        .collect(),
                    ..Default::default()
                };
                let _ = tx.send(Ok(resp)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let mut incoming = request.into_inner();
        let first = incoming
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("no request"))?;
        let node = first.node.clone().map(|n| n.id).unwrap_or_default();
        let stream = self.open(&node);
        let (tx, rx) = mpsc::channel(64);
        let (server, mut pushes) = (self.clone(), self.pushes.subscribe());
        tokio::spawn(async move {
            let mut next = Some(first);
            let mut nonce = 0;
            let resource = |(name, a): (String, Any), version: &str| Resource {
                name,
                version: version.to_string(),
                resource: Some(a),
                ..Default::default()
            };
            loop {
                let req = match next.take() {
                    Some(r) => r,
                    None => tokio::select! {
                        r = incoming.message() => match r {
                            Ok(Some(r)) => r,
                            _ => return,
                        },
                        Ok(push) = pushes.recv() => {
                            nonce += 1;
                            let version = format!("push-{nonce}");
                            let resp = DeltaDiscoveryResponse {
                                type_url: push.type_url.to_string(),
                                nonce: nonce.to_string(),
                                resources: push.resources.into_iter().map(|r| resource(r, &version)).collect(),
                                ..Default::default()
                            };
                            let _ = tx.send(Ok(resp)).await;
                            continue;
                        }
                    },
                };
                server.seen.lock().unwrap().push(Seen {
                    node: node.clone(),
                    stream,
                    sotw: None,
                    delta: Some(req.clone()),
                });
                if server.dropped(&node, stream) && req.type_url == RDS {
                    let _ = tx
                        .send(Err(Status::unavailable("dropped once, as asked")))
                        .await;
                    return;
                }
                if !req.response_nonce.is_empty() || server.mode == Mode::Silent {
                    continue;
                }
                // What the client holds at this version is not sent again.
                let held = &req.initial_resource_versions;
                let resources: Vec<Resource> =
                    Self::select(&req.type_url, &req.resource_names_subscribe)
                        .into_iter()
                        .filter(|(n, _)| held.get(n).is_none_or(|v| v != "1"))
                        .map(|r| resource(r, "1"))
                        .collect();
                if resources.is_empty() {
                    continue;
                }
                nonce += 1;
                let resp = DeltaDiscoveryResponse {
                    type_url: req.type_url.clone(),
                    nonce: nonce.to_string(),
                    resources,
                    ..Default::default()
                };
                let _ = tx.send(Ok(resp)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// The test server on loopback over mutual TLS, with a CA in `ca_dir` that the tool's
/// proxies get their certificates from.
async fn serve(mode: Mode, ca_dir: &Path) -> anyhow::Result<(std::net::SocketAddr, TestAds)> {
    use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
    let files = load::scenario::write_ca(ca_dir, ca_dir)?;
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(
            std::fs::read(&files.cert)?,
            std::fs::read(&files.key)?,
        ))
        .client_ca_root(Certificate::from_pem(std::fs::read(&files.trust_bundle)?));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let ads = TestAds {
        mode,
        streams: Default::default(),
        seen: Default::default(),
        pushes: broadcast::channel(16).0,
    };
    let service = AggregatedDiscoveryServiceServer::new(ads.clone());
    tokio::spawn(
        Server::builder()
            .tls_config(tls)?
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    Ok((addr, ads))
}

/// Runs `xds-load` with `args`: (success, stdout, stderr).
async fn xds_load(args: &[&str]) -> anyhow::Result<(bool, String, String)> {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_xds-load"))
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .context("run xds-load")?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// `xds-load --target` on the test server with `--proxies 4`: its JSON report.
async fn target_run(
    mode: Mode,
    flavor: &str,
    extra: &[&str],
) -> anyhow::Result<(bool, String, String, TestAds)> {
    let dir = tempfile::tempdir()?;
    let (ca, scenario) = (dir.path().join("ca"), dir.path().join("scenario"));
    let (addr, ads) = serve(mode, &ca).await?;
    let addr = addr.to_string();
    let mut args = vec![
        "--target",
        &addr,
        "--ca-dir",
        ca.to_str().unwrap(),
        "--scenario-dir",
        scenario.to_str().unwrap(),
        "--proxies",
        "4",
        "--services",
        "2",
        "--endpoints",
        "4",
        "--changes",
        "0",
        "--flavor",
        flavor,
        "-o",
        "json",
    ];
    args.extend(extra);
    let (ok, stdout, stderr) = xds_load(&args).await?;
    Ok((ok, stdout, stderr, ads))
}

#[tokio::test]
async fn proxies_complete_against_a_server_that_sends_headers_with_its_first_response() {
    for flavor in ["sotw", "delta"] {
        let (ok, stdout, stderr, ads) = target_run(Mode::Serve, flavor, &["--timeout", "20s"])
            .await
            .unwrap();
        assert!(ok, "{flavor}: xds-load failed:\n{stderr}");
        let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(report["proxies"], 4, "{report}");
        assert_eq!(report["reconnects"], 0, "{report}");
        assert_eq!(
            ads.streams.lock().unwrap().len(),
            4,
            "{flavor}: one stream per proxy"
        );
    }
}

#[tokio::test]
async fn a_run_whose_proxies_never_complete_says_what_the_streams_saw() {
    let (ok, _, stderr, _) = target_run(Mode::Silent, "delta", &["--timeout", "3s"])
        .await
        .unwrap();
    assert!(
        !ok,
        "xds-load succeeded against a server that never answers"
    );
    assert!(
        stderr.contains("0 of 4 proxies had their full config after 3s")
            && stderr.contains("4 stream open, waiting for the first response")
            && stderr.contains("0 responses and 0 reconnects"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("0 errors") && !stderr.contains("0 stream errors"),
        "{stderr}"
    );
}

#[tokio::test]
async fn dropped_streams_reconnect_with_their_subscriptions_and_are_counted() {
    for flavor in ["sotw", "delta"] {
        let (ok, stdout, stderr, ads) =
            target_run(Mode::DropEvenOnce, flavor, &["--timeout", "20s"])
                .await
                .unwrap();
        assert!(ok, "{flavor}: xds-load failed:\n{stderr}");
        let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        // proxy-0 and proxy-2 were dropped once each.
        assert_eq!(report["reconnects"], 2, "{flavor}: {report}");
        assert_eq!(report["proxies_reconnected"], 2, "{flavor}: {report}");
        assert!(
            report["last_stream_error"]
                .as_str()
                .is_some_and(|e| e.contains("dropped once, as asked")),
            "{flavor}: {report}"
        );
        // The second stream re-sent what the proxy had: the EDS clusters by name, with
        // the version it held (SotW: version_info; delta: initial_resource_versions).
        let seen = ads.seen.lock().unwrap().clone();
        let again: Vec<&Seen> = seen
            .iter()
            .filter(|s| s.node == "proxy-0.load" && s.stream == 2)
            .collect();
        let eds = again
            .iter()
            .find(|s| {
                s.sotw.as_ref().is_some_and(|r| r.type_url == EDS)
                    || s.delta.as_ref().is_some_and(|r| r.type_url == EDS)
            })
            .unwrap_or_else(|| panic!("{flavor}: no EDS request on the second stream: {again:?}"));
        let both = vec![cluster_name(0), cluster_name(1)];
        match (&eds.sotw, &eds.delta) {
            (Some(r), _) => {
                assert_eq!(r.resource_names, both, "{flavor}");
                assert_eq!(r.version_info, "1", "{flavor}");
                assert!(r.response_nonce.is_empty(), "{flavor}");
            }
            (_, Some(r)) => {
                assert_eq!(r.resource_names_subscribe, both, "{flavor}");
                let held: HashSet<&String> = r.initial_resource_versions.keys().collect();
                assert_eq!(held, both.iter().collect(), "{flavor}");
            }
            _ => unreachable!(),
        }
        let first = again.first().expect("a second stream");
        assert!(
            first.sotw.as_ref().is_some_and(|r| r.node.is_some())
                || first.delta.as_ref().is_some_and(|r| r.node.is_some()),
            "{flavor}: the second stream's first request names the node"
        );
    }
}

/// A proxy of the run's tool on the test server, and its timeline, once complete.
async fn one_proxy(
    addr: std::net::SocketAddr,
    ca: &Path,
    delta: bool,
    probes: &Probes,
) -> (SharedTimeline, tokio::task::JoinHandle<()>) {
    let cert = load::certificates(ca, 1).unwrap().remove(0);
    let timeline: SharedTimeline = Arc::new(Mutex::new(Timeline::default()));
    let spec = ProxySpec {
        addr,
        cert: Some(cert),
        pod: "proxy-1".into(),
        delta,
        nack: Nack::Never,
    };
    let task = tokio::spawn(load::run_proxy(spec, timeline.clone(), probes.clone()));
    meshd_integration::wait::eventually("the proxy to complete", Duration::from_secs(10), || {
        let t = timeline.clone();
        async move {
            anyhow::ensure!(t.lock().unwrap().complete.is_some(), "incomplete");
            Ok(())
        }
    })
    .await
    .unwrap();
    (timeline, task)
}

#[tokio::test]
async fn each_change_is_matched_to_the_push_that_carries_it() {
    for delta in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let (addr, ads) = serve(Mode::Serve, dir.path()).await.unwrap();
        let probes = Probes::default();
        let (timeline, task) = one_proxy(addr, dir.path(), delta, &probes).await;
        // Two endpoints added to svc0 in quick succession (as at a rate).
        let change = |address: &str| {
            let (probe, at) = probes.add(endpoint(0, address.to_string(), true));
            Applied {
                kind: ChangeKind::EndpointAdd,
                at,
                concerned: vec![0],
                probe,
            }
        };
        let (first, second) = (change("10.9.0.1"), change("10.9.0.2"));
        let start = Instant::now();
        let push = |resources| {
            ads.pushes
                .send(Push {
                    type_url: EDS,
                    resources,
                })
                .unwrap();
        };
        // Another service's endpoints first (with both addresses, even), then svc0
        // with the first pod, then with both.
        push(vec![assignment(1, &["10.9.0.1", "10.9.0.2"])]);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let one = start.elapsed();
        push(vec![assignment(0, &["10.0.0.1", "10.9.0.1"])]);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let two = start.elapsed();
        push(vec![assignment(0, &["10.0.0.1", "10.9.0.1", "10.9.0.2"])]);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let timelines = [timeline];
        let at = |c: &Applied| {
            reached(c, &timelines)[0]
                .unwrap_or_else(|| panic!("delta {delta}: change not matched"))
                .0
        };
        let (a, b) = (at(&first), at(&second));
        assert!(
            a >= one && a < two,
            "delta {delta}: the first pod arrived with the second push ({one:?}..{two:?}), matched at {a:?}"
        );
        assert!(
            b >= two,
            "delta {delta}: the second pod arrived with the third push (from {two:?}), matched at {b:?}"
        );
        task.abort();
    }
}

/// Runs `xds-load` at a small scale with `extra`: its JSON report.
async fn meshd_run(extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "--proxies",
        "30",
        "--services",
        "5",
        "--endpoints",
        "30",
        "--upstreams",
        "2",
        "--kinds",
        "endpoint-add,policy",
        "--timeout",
        "60s",
        "-o",
        "json",
    ];
    args.extend(extra);
    let (ok, stdout, stderr) = xds_load(&args).await.unwrap();
    assert!(ok, "xds-load {extra:?} failed:\n{stderr}");
    serde_json::from_str(&stdout).unwrap()
}

#[tokio::test]
async fn meshd_as_a_server_command_measures_as_the_default_path_does() {
    let meshd = meshd_integration::tools::meshd_binary("meshd").unwrap();
    let command = format!(
        "exec '{}' --config-dir \"$XDS_LOAD_SCENARIO_DIR\" --ca-dir \"$XDS_LOAD_CA_DIR\" \
         --xds-address \"$XDS_LOAD_ADDRESS\" --admin-address 127.0.0.1:{} \
         --health-address 127.0.0.1:{} --debounce 100ms --log warn",
        meshd.display(),
        meshd_integration::net::free_port(),
        meshd_integration::net::free_port(),
    );
    let default = meshd_run(&["--changes", "4"]).await;
    let foreign = meshd_run(&["--changes", "4", "--server-cmd", &command]).await;
    assert_eq!(default["server"], "meshd");
    assert!(foreign["server"].as_str().unwrap().starts_with("command: "));
    for (d, f) in default["changes"]
        .as_array()
        .unwrap()
        .iter()
        .zip(foreign["changes"].as_array().unwrap())
    {
        for figure in ["kind", "changes", "proxies_per_change", "bytes_to_others"] {
            assert_eq!(d[figure], f[figure], "{figure}: {d} vs {f}");
        }
        // The same pushes (sizes within a few bytes: versions and nonces differ in length).
        let (db, fb) = (
            d["bytes_per_proxy_per_change"].as_f64().unwrap(),
            f["bytes_per_proxy_per_change"].as_f64().unwrap(),
        );
        assert!((db - fb).abs() <= 16.0, "bytes per change: {d} vs {f}");
        for r in [d, f] {
            let p99 = r["convergence_p99_ms"].as_f64().unwrap();
            assert!(p99 > 100.0 && p99 < 3000.0, "p99 {p99} ms: {r}");
        }
    }
    let initial = |r: &serde_json::Value| r["initial_bytes_per_proxy"].as_f64().unwrap();
    assert!(
        (initial(&default) - initial(&foreign)).abs() < initial(&default) / 100.0,
        "initial config: {default} vs {foreign}"
    );
    for r in [&default, &foreign] {
        assert!(r["server_peak_rss_mib"].as_f64().unwrap() > 5.0, "{r}");
        assert!(r["server_cpu_s"].as_f64().unwrap() > 0.0, "{r}");
    }
    assert!(foreign["nacks"].is_null() && default["nacks"].is_number());

    // At a rate, the rate made is reported next to the one asked for.
    let rated = meshd_run(&["--changes", "6", "--rate", "10", "--server-cmd", &command]).await;
    assert_eq!(rated["rate_per_s"], 10.0);
    let made = rated["achieved_rate_per_s"].as_f64().unwrap();
    assert!((8.0..=10.5).contains(&made), "{rated}");
}
