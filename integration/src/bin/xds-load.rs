//! `xds-load`: meshd under many proxies. Writes a scenario, starts meshd on it, opens
//! one Envoy-like ADS stream per proxy (mutual TLS, one certificate each), waits until
//! every proxy has its full config, then adds endpoints one at a time and measures how
//! long each change takes to reach every proxy that calls the service. Prints a table
//! (or JSON with `-o json`).
//!
//! `./scripts/bench-xds.sh --proxies 1000` (release build of meshd and of this tool).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use meshd_integration::load::{self, NAMESPACE, Scenario, SharedTimeline, Timeline};
use meshd_integration::meshd::Meshd;

#[derive(Debug, Parser)]
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
    /// Endpoint changes to measure, one after the other.
    #[arg(long, default_value_t = 10)]
    changes: usize,
    /// How long to wait for all proxies' initial config.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Flavor {
    Sotw,
    Delta,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Debug, serde::Serialize)]
struct Report {
    flavor: String,
    proxies: usize,
    services: usize,
    endpoints: usize,
    upstreams_per_proxy: usize,
    initial_config_s: f64,
    changes: usize,
    convergence_p50_ms: f64,
    convergence_p99_ms: f64,
    convergence_max_ms: f64,
    bytes_per_proxy_per_change: f64,
    meshd_peak_rss_mib: f64,
    meshd_rss_per_proxy_kib: f64,
    meshd_cpu_s: f64,
    pushes_per_s: f64,
    stream_errors: usize,
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
    let scenario = Scenario {
        services: args.services,
        endpoints: args.endpoints,
        proxies: args.proxies,
        upstreams: args.upstreams,
    };
    let dir = tempfile::Builder::new().prefix("xds-load-").tempdir()?;
    scenario.write(dir.path())?;
    eprintln!("scenario written; starting meshd");
    let meshd = Meshd::start_with(dir.path(), &["--debounce", "100ms", "--log", "warn"]).await?;
    let pid = meshd.pid().context("meshd has no pid")?;
    let certs = load::certificates(&meshd.ca_dir(), args.proxies)?;

    eprintln!("connecting {} proxies", args.proxies);
    let started = Instant::now();
    let cpu_before = cpu_seconds(pid);
    let timelines: Vec<SharedTimeline> = (0..args.proxies)
        .map(|_| Arc::new(Mutex::new(Timeline::default())))
        .collect();
    for (i, cert) in certs.into_iter().enumerate() {
        tokio::spawn(load::run_proxy(
            meshd.xds_addr,
            cert,
            Scenario::proxy(i),
            args.flavor == Flavor::Delta,
            timelines[i].clone(),
        ));
    }
    // Every proxy complete.
    let initial = loop {
        let (done, errors) = count(&timelines, |t| t.complete.is_some());
        if done == args.proxies {
            let last = timelines
                .iter()
                .filter_map(|t| t.lock().expect("timeline").complete)
                .max()
                .expect("proxies");
            break last - started;
        }
        if started.elapsed() > args.timeout {
            bail!(
                "only {done} of {} proxies had their full config after {:?} ({errors} stream errors: {:?})",
                args.proxies,
                args.timeout,
                first_error(&timelines)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("all proxies complete after {initial:?}");
    let pushes_before = metric(&meshd, "meshd_xds_pushes_total").await?;
    let changes_started = Instant::now();

    // Endpoint changes: a new backend for one service at a time.
    let mut convergence: Vec<Duration> = Vec::new();
    let mut bytes: Vec<usize> = Vec::new();
    for k in 0..args.changes {
        let svc = (k * 13) % args.services;
        let cluster = format!("||{}.{NAMESPACE}.", Scenario::service(svc));
        let callers: Vec<usize> = (0..args.proxies)
            .filter(|p| scenario.upstreams_of(*p).contains(&svc))
            .collect();
        let marks: Vec<usize> = callers
            .iter()
            .map(|p| timelines[*p].lock().expect("timeline").arrivals.len())
            .collect();
        let t0 = Instant::now();
        std::fs::write(
            dir.path().join(format!("change-{k}.yaml")),
            scenario.backend(args.endpoints + k, svc),
        )?;
        let deadline = t0 + Duration::from_secs(30);
        let mut reached = vec![None; callers.len()];
        while reached.iter().any(Option::is_none) {
            for (i, p) in callers.iter().enumerate() {
                if reached[i].is_some() {
                    continue;
                }
                let t = timelines[*p].lock().expect("timeline");
                reached[i] = t.arrivals[marks[i]..]
                    .iter()
                    .find(|a| {
                        a.type_url.ends_with("ClusterLoadAssignment")
                            && (a.names.is_empty() || a.names.iter().any(|n| n.contains(&cluster)))
                    })
                    .map(|a| (a.at - t0, a.bytes));
            }
            if Instant::now() > deadline {
                bail!(
                    "change {k} did not reach every caller of {} within 30s",
                    Scenario::service(svc)
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for (d, b) in reached.into_iter().flatten() {
            convergence.push(d);
            bytes.push(b);
        }
        // Let the change settle before the next.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let pushes = metric(&meshd, "meshd_xds_pushes_total").await? - pushes_before;
    let change_time = changes_started.elapsed();
    convergence.sort();
    let pct = |p: f64| -> f64 {
        if convergence.is_empty() {
            return 0.0;
        }
        let i = ((convergence.len() as f64 - 1.0) * p).round() as usize;
        convergence[i].as_secs_f64() * 1e3
    };
    let (_, errors) = count(&timelines, |_| true);
    let rss = peak_rss_kib(pid) as f64;
    let report = Report {
        flavor: format!("{:?}", args.flavor).to_lowercase(),
        proxies: args.proxies,
        services: args.services,
        endpoints: args.endpoints,
        upstreams_per_proxy: args.upstreams,
        initial_config_s: initial.as_secs_f64(),
        changes: args.changes,
        convergence_p50_ms: pct(0.5),
        convergence_p99_ms: pct(0.99),
        convergence_max_ms: pct(1.0),
        bytes_per_proxy_per_change: bytes.iter().sum::<usize>() as f64 / bytes.len().max(1) as f64,
        meshd_peak_rss_mib: rss / 1024.0,
        meshd_rss_per_proxy_kib: rss / args.proxies as f64,
        meshd_cpu_s: cpu_seconds(pid) - cpu_before,
        pushes_per_s: pushes / change_time.as_secs_f64(),
        stream_errors: errors,
    };
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Table => print_table(&report),
    }
    Ok(())
}

fn print_table(r: &Report) {
    println!(
        "xds-load: {} proxies ({}), {} services, {} endpoints, {} upstreams per proxy",
        r.proxies, r.flavor, r.services, r.endpoints, r.upstreams_per_proxy
    );
    println!("| figure | value |");
    println!("|---|---|");
    println!(
        "| every proxy has its full initial config | {:.2} s after connecting |",
        r.initial_config_s
    );
    println!(
        "| one endpoint change → every caller has it ({} changes) | p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms |",
        r.changes, r.convergence_p50_ms, r.convergence_p99_ms, r.convergence_max_ms
    );
    println!(
        "| bytes sent to one proxy per endpoint change | {:.0} |",
        r.bytes_per_proxy_per_change
    );
    println!(
        "| meshd peak RSS | {:.0} MiB ({:.0} KiB per proxy) |",
        r.meshd_peak_rss_mib, r.meshd_rss_per_proxy_kib
    );
    println!("| meshd CPU (connect + changes) | {:.1} s |", r.meshd_cpu_s);
    println!(
        "| pushes per second during the changes | {:.0} |",
        r.pushes_per_s
    );
    println!("| stream errors | {} |", r.stream_errors);
}

/// (timelines where `f` holds, timelines with an error).
fn count(timelines: &[SharedTimeline], f: impl Fn(&Timeline) -> bool) -> (usize, usize) {
    let mut ok = 0;
    let mut errors = 0;
    for t in timelines {
        let t = t.lock().expect("timeline");
        ok += usize::from(f(&t));
        errors += usize::from(t.error.is_some());
    }
    (ok, errors)
}

fn first_error(timelines: &[SharedTimeline]) -> Option<String> {
    timelines
        .iter()
        .find_map(|t| t.lock().expect("timeline").error.clone())
}

async fn metric(meshd: &Meshd, name: &str) -> anyhow::Result<f64> {
    let text = meshd.metrics().await?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// meshd's user + system CPU seconds so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime is the 12th, stime 13th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// This process's soft open-file limit (`ulimit -n`); meshd inherits it.
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
