//! `xds-load`: an xDS control plane under many proxies. Writes a scenario, starts meshd
//! on it (or another server: `--server-cmd`, `--target`), opens one Envoy-like ADS
//! stream per proxy (mutual TLS, one certificate each), waits until every proxy has its
//! full config, then applies changes — one after the other, or at `--rate` per second
//! — and measures how long each takes to reach every proxy it concerns (the push that
//! carries it), and what each of those proxies received for it. Prints a table (or JSON
//! with `-o json`).
//!
//! The changes (`--kinds`, cycled):
//! - `endpoint-add`: a new backend pod for one service (its callers get new EDS);
//! - `endpoint-remove`: the oldest of those pods goes away again (once every caller
//!   has it: a pod added and removed within one debounce window is never pushed);
//! - `pod-roll`: one of a service's pods is replaced by one with a new name and IP;
//! - `service-add`: a Service nobody calls (no proxy should receive anything);
//! - `policy`: the AuthorizationPolicy on every client changes (each proxy's inbound
//!   route).
//!
//! `./scripts/bench-xds.sh --proxies 1000` (release build of meshd and of this tool).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use meshd_integration::load::measure::{self, KindReport};
use meshd_integration::load::server::Server;
use meshd_integration::load::{
    self, Applied, ChangeKind, ChangeWriter, Probes, ProxySpec, Scenario, SharedTimeline, Timeline,
};

const SERVERS: &str = "\
Servers other than meshd:
  --server-cmd CMD runs `sh -c CMD` (in a process group of its own, stopped at the end)
  with the scenario in its environment:
    XDS_LOAD_ADDRESS       127.0.0.1:<port> to serve ADS (gRPC) on
    XDS_LOAD_SCENARIO_DIR  the scenario: Kubernetes YAML in meshd's file-source layout
    XDS_LOAD_CA_DIR        the mesh CA (root-cert.pem, root-key.pem: meshd's --ca-dir)
    XDS_LOAD_SERVER_CERT   a serving certificate chain (PEM) from that CA, for the
                           DNS name `meshd` the proxies check
    XDS_LOAD_SERVER_KEY    its key (PEM)
    XDS_LOAD_TRUST_BUNDLE  the roots the proxies' client certificates chain to (PEM)
  It is measured once it accepts connections; its peak RSS and CPU are its process
  tree's, from /proc.
  --target ADDR connects to a server already running, following --scenario-dir and
  trusting --ca-dir (created there if empty); RSS and CPU only with --target-pid.
  Every change is made by rewriting files in the scenario directory: the server must
  follow them (watch the directory) as meshd's file source does. NACK and push counts
  come from meshd's metrics and are reported for meshd only.

  Example, meshd as a foreign command:
    xds-load --server-cmd 'exec meshd --config-dir \"$XDS_LOAD_SCENARIO_DIR\" \\
      --ca-dir \"$XDS_LOAD_CA_DIR\" --xds-address \"$XDS_LOAD_ADDRESS\" \\
      --admin-address 127.0.0.1:0 --health-address 127.0.0.1:0'";

#[derive(Debug, Parser)]
#[command(after_long_help = SERVERS)]
struct Args {
    /// Connected proxies (client sidecars).
    #[arg(long, default_value_t = 1000)]
    proxies: usize,
    /// Services in the mesh.
    #[arg(long, default_value_t = 100)]
    services: usize,
    /// Backend endpoints, spread over the services.
    #[arg(long, default_value_t = 1000)]
    endpoints: usize,
    /// Services each proxy calls.
    #[arg(long, default_value_t = 10)]
    upstreams: usize,
    /// xDS flavour of every stream.
    #[arg(long, value_enum, default_value_t = Flavor::Delta)]
    flavor: Flavor,
    /// Changes to measure.
    #[arg(long, default_value_t = 10)]
    changes: usize,
    /// Kinds of change, applied in turn.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "endpoint-add"
    )]
    kinds: Vec<ChangeKind>,
    /// Changes per second; 0 waits for each change to reach every proxy before the next.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Give every proxy an egress port too, reaching the services it calls
    /// (`upstreams`: scoped) or every service of the mesh (`all`: unscoped).
    #[arg(long, value_enum)]
    egress_scope: Option<EgressScopeArg>,
    /// Proxies use transparent capture: virtual listeners on 15001/15006 whose outbound
    /// chains cover --egress-scope (`upstreams`: scoped, `all` or unset: every service).
    #[arg(long)]
    transparent: bool,
    /// Proxies (the first N) that NACK every update after their initial config.
    #[arg(long, default_value_t = 0)]
    nacking_proxies: usize,
    /// How long to wait for all proxies' initial config, and for each change.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Run this command (`sh -c`) as the server instead of meshd; see below.
    #[arg(long, value_name = "CMD", conflicts_with = "target")]
    server_cmd: Option<String>,
    /// Load a server already running at ADDR (needs --scenario-dir, and --ca-dir unless
    /// --plaintext); see below.
    #[arg(long, value_name = "ADDR", requires = "scenario_dir")]
    target: Option<SocketAddr>,
    /// With --target: the server's process, for its RSS and CPU.
    #[arg(long, value_name = "PID", requires = "target")]
    target_pid: Option<u32>,
    /// Where to write the scenario (default: a temporary directory).
    #[arg(long, value_name = "DIR")]
    scenario_dir: Option<PathBuf>,
    /// With --target: the CA the server trusts (meshd's --ca-dir layout), which issues
    /// the proxies' certificates; created if the directory has none.
    #[arg(long, value_name = "DIR", requires = "target")]
    ca_dir: Option<PathBuf>,
    /// Plaintext gRPC, for a server without TLS (--server-cmd or --target only): the
    /// proxies present no certificate.
    #[arg(long)]
    plaintext: bool,
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Flavor {
    Sotw,
    Delta,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum EgressScopeArg {
    Upstreams,
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Debug, serde::Serialize)]
struct Report {
    /// What was loaded: `meshd`, `command: <CMD>` or `target <ADDR>`.
    server: String,
    flavor: String,
    /// Capture layout and what each proxy's scope covers.
    layout: String,
    proxies: usize,
    services: usize,
    endpoints: usize,
    upstreams_per_proxy: usize,
    initial_config_s: f64,
    /// What one proxy received until its config was complete, on average.
    initial_bytes_per_proxy: f64,
    /// Changes per second asked for (0: one after the other) and made.
    rate_per_s: f64,
    achieved_rate_per_s: Option<f64>,
    nacking_proxies: usize,
    changes: Vec<KindReport>,
    /// The server's process (tree), if known.
    server_peak_rss_mib: Option<f64>,
    server_rss_per_proxy_kib: Option<f64>,
    server_cpu_s: Option<f64>,
    /// From meshd's metrics (meshd only).
    pushes_per_s: Option<f64>,
    nacks: Option<f64>,
    /// Streams that failed or ended and were opened again, in all and by proxy.
    reconnects: usize,
    proxies_reconnected: usize,
    last_stream_error: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rlimit = open_file_limit();
    if rlimit < args.proxies as u64 + 256 {
        bail!(
            "the open-file limit is {rlimit}: too low for {} streams (ulimit -n)",
            args.proxies
        );
    }
    if args.plaintext && args.server_cmd.is_none() && args.target.is_none() {
        bail!("--plaintext needs --server-cmd or --target: meshd serves ADS over TLS only");
    }
    if args.target.is_some() && args.ca_dir.is_none() && !args.plaintext {
        bail!("--target needs --ca-dir (the CA the server trusts), or --plaintext");
    }
    let scenario = Scenario {
        services: args.services,
        endpoints: args.endpoints,
        proxies: args.proxies,
        upstreams: args.upstreams,
        egress: args.egress_scope.map(|e| match e {
            EgressScopeArg::Upstreams => load::EgressScope::Upstreams,
            EgressScopeArg::All => load::EgressScope::All,
        }),
        transparent: args.transparent,
    };
    let work = tempfile::Builder::new().prefix("xds-load-").tempdir()?;
    let dir = match &args.scenario_dir {
        Some(dir) => dir.clone(),
        None => work.path().join("scenario"),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("--scenario-dir {}", dir.display()))?;
    scenario.write(&dir)?;
    let (mut server, server_name) = match (&args.server_cmd, args.target) {
        (Some(command), _) => {
            eprintln!("scenario written; starting the server command");
            let server = Server::command(command, &dir, work.path()).await?;
            (server, format!("command: {command}"))
        }
        (None, Some(addr)) => {
            let ca_dir = args
                .ca_dir
                .clone()
                .unwrap_or_else(|| work.path().join("ca"));
            load::scenario::write_ca(&ca_dir, work.path())?;
            (
                Server::target(addr, &ca_dir, args.target_pid),
                format!("target {addr}"),
            )
        }
        (None, None) => {
            eprintln!("scenario written; starting meshd");
            (Server::meshd(&dir).await?, "meshd".to_string())
        }
    };
    let certs = match args.plaintext {
        true => vec![None; args.proxies],
        false => load::certificates(&server.ca_dir, args.proxies)?
            .into_iter()
            .map(Some)
            .collect(),
    };

    eprintln!("connecting {} proxies", args.proxies);
    let started = Instant::now();
    let cpu_before = server.stats.as_ref().map(|s| s.cpu_seconds());
    let timelines: Vec<SharedTimeline> = (0..args.proxies)
        .map(|_| Arc::new(Mutex::new(Timeline::default())))
        .collect();
    let probes = Probes::default();
    let proxies: Vec<tokio::task::JoinHandle<()>> = certs
        .into_iter()
        .enumerate()
        .map(|(i, cert)| {
            let spec = ProxySpec {
                addr: server.addr,
                cert,
                pod: Scenario::proxy(i),
                delta: args.flavor == Flavor::Delta,
                nack: match i < args.nacking_proxies {
                    true => load::Nack::Updates,
                    false => load::Nack::Never,
                },
            };
            tokio::spawn(load::run_proxy(spec, timelines[i].clone(), probes.clone()))
        })
        .collect();
    // Every proxy complete.
    let initial = loop {
        server.check_running()?;
        let done = measure::completed(&timelines);
        if done == args.proxies {
            let last = timelines
                .iter()
                .filter_map(|t| t.lock().expect("timeline").complete)
                .max()
                .unwrap_or(started);
            break last.saturating_duration_since(started);
        }
        if started.elapsed() > args.timeout {
            bail!(
                "{done} of {} proxies had their full config after {:?}; the others: {}",
                args.proxies,
                args.timeout,
                measure::stalled(&timelines)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("all proxies complete after {initial:?}");
    let initial_bytes: usize = timelines
        .iter()
        .map(|t| {
            let t = t.lock().expect("timeline");
            let complete = t.complete.expect("complete");
            t.arrivals
                .iter()
                .filter(|a| a.at <= complete)
                .map(|a| a.bytes)
                .sum::<usize>()
        })
        .sum();
    let pushes_before = server.metric("meshd_xds_pushes_total").await?;
    let nacks_before = server.metric("meshd_xds_nacks_total").await?;
    let changes_started = Instant::now();

    let mut writer = ChangeWriter::new(&scenario, &dir, probes.clone());
    let mut applied: Vec<Applied> = Vec::new();
    for k in 0..args.changes {
        server.check_running()?;
        let kind = args.kinds[k % args.kinds.len()];
        if args.rate > 0.0 {
            let due = changes_started + Duration::from_secs_f64(k as f64 / args.rate);
            tokio::time::sleep_until(due.into()).await;
        }
        // A pod added and removed within one debounce window is, rightly, never
        // pushed at all; so a removal waits until the pod it removes has arrived.
        if let (ChangeKind::EndpointRemove, Some(added)) = (kind, writer.next_removal()) {
            measure::wait_reached(&applied[added], &timelines, added, args.timeout).await?;
        }
        applied.push(writer.apply(kind, k)?);
        if args.rate == 0.0 {
            let last = applied.last().expect("just applied");
            measure::wait_reached(last, &timelines, k, args.timeout).await?;
            // Let the change settle before the next.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    // Changes made per second: from the first to the last, as the tool kept up.
    let achieved_rate = match (applied.first(), applied.last()) {
        (Some(first), Some(last)) if args.rate > 0.0 && applied.len() > 1 => {
            Some((applied.len() - 1) as f64 / (last.at - first.at).as_secs_f64())
        }
        _ => None,
    };
    for (k, change) in applied.iter().enumerate() {
        measure::wait_reached(change, &timelines, k, args.timeout).await?;
    }
    // Anything that would still reach uninvolved proxies.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let change_time = changes_started.elapsed();
    let since = |now: Option<f64>, before: Option<f64>| Some(now? - before?);
    let pushes = since(
        server.metric("meshd_xds_pushes_total").await?,
        pushes_before,
    );
    let nacks = since(server.metric("meshd_xds_nacks_total").await?, nacks_before);
    let mut kinds: Vec<ChangeKind> = args.kinds.clone();
    kinds.sort();
    kinds.dedup();
    let changes = kinds
        .into_iter()
        .map(|kind| {
            let of_kind: Vec<&Applied> = applied.iter().filter(|a| a.kind == kind).collect();
            measure::kind_report(kind, &of_kind, &applied, &timelines, args.rate == 0.0)
        })
        .collect();
    let (reconnects, proxies_reconnected, last_stream_error) = measure::reconnects(&timelines);
    let rss_kib = server.stats.as_ref().map(|s| s.peak_rss_kib() as f64);
    let report = Report {
        server: server_name,
        flavor: format!("{:?}", args.flavor).to_lowercase(),
        layout: format!(
            "{} capture, scope {}",
            if args.transparent {
                "transparent"
            } else {
                "explicit"
            },
            match (args.egress_scope, args.transparent) {
                (Some(EgressScopeArg::Upstreams), _) => "= its upstreams",
                (Some(EgressScopeArg::All), _) | (None, true) => "= every service",
                (None, false) => "= its upstreams, no egress port",
            }
        ),
        proxies: args.proxies,
        services: args.services,
        endpoints: args.endpoints,
        upstreams_per_proxy: args.upstreams,
        initial_config_s: initial.as_secs_f64(),
        initial_bytes_per_proxy: initial_bytes as f64 / args.proxies as f64,
        rate_per_s: args.rate,
        achieved_rate_per_s: achieved_rate,
        nacking_proxies: args.nacking_proxies,
        changes,
        server_peak_rss_mib: rss_kib.map(|k| k / 1024.0),
        server_rss_per_proxy_kib: rss_kib.map(|k| k / args.proxies as f64),
        server_cpu_s: server
            .stats
            .as_ref()
            .zip(cpu_before)
            .map(|(s, before)| s.cpu_seconds() - before),
        pushes_per_s: pushes.map(|p| p / change_time.as_secs_f64()),
        nacks,
        reconnects,
        proxies_reconnected,
        last_stream_error,
    };
    for proxy in proxies {
        proxy.abort();
    }
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Table => print_table(&report),
    }
    Ok(())
}

fn print_table(r: &Report) {
    println!(
        "xds-load on {}: {} proxies ({}, {}), {} services, {} endpoints, {} upstreams per proxy{}{}",
        r.server,
        r.proxies,
        r.flavor,
        r.layout,
        r.services,
        r.endpoints,
        r.upstreams_per_proxy,
        match r.achieved_rate_per_s {
            Some(achieved) => format!(", {} changes/s asked, {achieved:.1} made", r.rate_per_s),
            None if r.rate_per_s > 0.0 => format!(", {} changes/s", r.rate_per_s),
            None => String::new(),
        },
        if r.nacking_proxies > 0 {
            format!(", {} proxies NACKing every update", r.nacking_proxies)
        } else {
            String::new()
        }
    );
    println!("| figure | value |");
    println!("|---|---|");
    println!(
        "| every proxy has its full initial config | {:.2} s after connecting |",
        r.initial_config_s
    );
    println!(
        "| initial config, bytes per proxy | {:.0} |",
        r.initial_bytes_per_proxy
    );
    for c in &r.changes {
        println!(
            "| {:?} ×{} → all {:.0} concerned proxies have it | p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms |",
            c.kind,
            c.changes,
            c.proxies_per_change,
            c.convergence_p50_ms,
            c.convergence_p99_ms,
            c.convergence_max_ms
        );
        println!(
            "| {:?}: bytes to one concerned proxy per change / to all others | {:.0} / {} |",
            c.kind,
            c.bytes_per_proxy_per_change,
            c.bytes_to_others
                .map_or("- (overlapping changes)".to_string(), |b| b.to_string())
        );
    }
    let unknown = || "- (process unknown)".to_string();
    println!(
        "| server peak RSS | {} |",
        r.server_peak_rss_mib
            .zip(r.server_rss_per_proxy_kib)
            .map_or_else(unknown, |(m, k)| format!(
                "{m:.0} MiB ({k:.0} KiB per proxy)"
            ))
    );
    println!(
        "| server CPU (connect + changes) | {} |",
        r.server_cpu_s.map_or_else(unknown, |c| format!("{c:.1} s"))
    );
    let meshd_only = || "- (meshd only)".to_string();
    println!(
        "| pushes per second during the changes | {} |",
        r.pushes_per_s
            .map_or_else(meshd_only, |p| format!("{p:.0}"))
    );
    println!(
        "| NACKs meshd recorded | {} |",
        r.nacks.map_or_else(meshd_only, |n| format!("{n:.0}"))
    );
    println!(
        "| reconnects (proxies that reconnected) | {} ({}){} |",
        r.reconnects,
        r.proxies_reconnected,
        r.last_stream_error
            .as_ref()
            .map_or(String::new(), |e| format!(", last: {e}"))
    );
}

/// This process's soft open-file limit (`ulimit -n`); a server it starts inherits it.
fn open_file_limit() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        })
        .unwrap_or(1024)
}
