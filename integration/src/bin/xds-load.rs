//! `xds-load`: meshd under many proxies. Writes a scenario, starts meshd on it, opens
//! one Envoy-like ADS stream per proxy (mutual TLS, one certificate each), waits until
//! every proxy has its full config, then applies changes — one after the other, or at
//! `--rate` per second — and measures how long each takes to reach every proxy it
//! concerns, and what each of those proxies received for it. Prints a table (or JSON
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
enum ChangeKind {
    EndpointAdd,
    EndpointRemove,
    PodRoll,
    ServiceAdd,
    Policy,
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
    rate_per_s: f64,
    nacking_proxies: usize,
    changes: Vec<KindReport>,
    meshd_peak_rss_mib: f64,
    meshd_rss_per_proxy_kib: f64,
    meshd_cpu_s: f64,
    pushes_per_s: f64,
    nacks: f64,
    stream_errors: usize,
}

/// The figures of one kind of change.
#[derive(Debug, serde::Serialize)]
struct KindReport {
    kind: ChangeKind,
    changes: usize,
    /// Proxies each change concerns, on average.
    proxies_per_change: f64,
    convergence_p50_ms: f64,
    convergence_p99_ms: f64,
    convergence_max_ms: f64,
    /// What one concerned proxy received for one change.
    bytes_per_proxy_per_change: f64,
    /// What proxies the change does not concern received (should be 0); only measured
    /// when changes run one after the other (at a rate, pushes of one change overlap
    /// the next).
    bytes_to_others: Option<usize>,
}

/// One applied change and who it concerns.
struct Applied {
    kind: ChangeKind,
    at: Instant,
    /// Proxies that must receive it, and the arrival that shows they did.
    concerned: Vec<usize>,
    matches: Box<dyn Fn(&load::Arrival) -> bool>,
    /// Where each proxy's timeline stood when it was applied.
    marks: Vec<usize>,
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
        egress: args.egress_scope.map(|e| match e {
            EgressScopeArg::Upstreams => load::EgressScope::Upstreams,
            EgressScopeArg::All => load::EgressScope::All,
        }),
        transparent: args.transparent,
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
            if i < args.nacking_proxies {
                load::Nack::Updates
            } else {
                load::Nack::Never
            },
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
    let pushes_before = metric(&meshd, "meshd_xds_pushes_total").await?;
    let nacks_before = metric(&meshd, "meshd_xds_nacks_total").await?;
    let changes_started = Instant::now();

    let mut writer = ChangeWriter::new(&scenario, dir.path());
    let mut applied: Vec<Applied> = Vec::new();
    for k in 0..args.changes {
        let kind = args.kinds[k % args.kinds.len()];
        if args.rate > 0.0 {
            let due = changes_started + Duration::from_secs_f64(k as f64 / args.rate);
            tokio::time::sleep_until(due.into()).await;
        }
        // A pod added and removed within one debounce window is, rightly, never
        // pushed at all; so a removal waits until the pod it removes has arrived.
        if let (ChangeKind::EndpointRemove, Some(added)) = (kind, writer.next_removal()) {
            wait_reached(&applied[added], &timelines, added).await?;
        }
        let marks = timelines
            .iter()
            .map(|t| t.lock().expect("timeline").arrivals.len())
            .collect();
        let (concerned, matches) = writer.apply(kind, k)?;
        applied.push(Applied {
            kind,
            at: Instant::now(),
            concerned,
            matches,
            marks,
        });
        if args.rate == 0.0 {
            let last = applied.last().expect("just applied");
            wait_reached(last, &timelines, k).await?;
            // Let the change settle before the next.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    for (k, change) in applied.iter().enumerate() {
        wait_reached(change, &timelines, k).await?;
    }
    // Anything that would still reach uninvolved proxies.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pushes = metric(&meshd, "meshd_xds_pushes_total").await? - pushes_before;
    let nacks = metric(&meshd, "meshd_xds_nacks_total").await? - nacks_before;
    let change_time = changes_started.elapsed();
    let mut kinds: Vec<ChangeKind> = args.kinds.clone();
    kinds.sort();
    kinds.dedup();
    let changes = kinds
        .into_iter()
        .map(|kind| {
            let of_kind: Vec<&Applied> = applied.iter().filter(|a| a.kind == kind).collect();
            kind_report(kind, &of_kind, &applied, &timelines, args.rate == 0.0)
        })
        .collect();
    let (_, errors) = count(&timelines, |_| true);
    let rss = peak_rss_kib(pid) as f64;
    let report = Report {
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
        nacking_proxies: args.nacking_proxies,
        changes,
        meshd_peak_rss_mib: rss / 1024.0,
        meshd_rss_per_proxy_kib: rss / args.proxies as f64,
        meshd_cpu_s: cpu_seconds(pid) - cpu_before,
        pushes_per_s: pushes / change_time.as_secs_f64(),
        nacks,
        stream_errors: errors,
    };
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Table => print_table(&report),
    }
    Ok(())
}

/// Writes changes into the scenario's directory, as files meshd picks up.
struct ChangeWriter<'a> {
    scenario: &'a Scenario,
    dir: &'a std::path::Path,
    /// Files of `endpoint-add` changes not yet removed, oldest first: (file, service,
    /// index of the change).
    added: std::collections::VecDeque<(std::path::PathBuf, usize, usize)>,
}

impl<'a> ChangeWriter<'a> {
    fn new(scenario: &'a Scenario, dir: &'a std::path::Path) -> Self {
        ChangeWriter {
            scenario,
            dir,
            added: Default::default(),
        }
    }

    /// The change whose pod the next `endpoint-remove` removes.
    fn next_removal(&self) -> Option<usize> {
        self.added.front().map(|(_, _, k)| *k)
    }

    /// Applies change `k` of `kind`; returns the proxies it concerns and how to tell
    /// that one of them received it.
    #[allow(clippy::type_complexity)]
    fn apply(
        &mut self,
        kind: ChangeKind,
        k: usize,
    ) -> anyhow::Result<(Vec<usize>, Box<dyn Fn(&load::Arrival) -> bool>)> {
        let sc = self.scenario;
        let svc = (k * 13) % sc.services;
        // A fresh address for every pod a change creates.
        let address = sc.endpoints + k;
        let eds_of = |svc: usize| -> (Vec<usize>, Box<dyn Fn(&load::Arrival) -> bool>) {
            let cluster = format!("||{}.{NAMESPACE}.", Scenario::service(svc));
            // A transparent proxy without a scope of its own covers its namespace: all.
            let everyone = sc.egress == Some(load::EgressScope::All)
                || (sc.transparent && sc.egress.is_none());
            let callers = (0..sc.proxies)
                .filter(|p| everyone || sc.upstreams_of(*p).contains(&svc))
                .collect();
            let matches = move |a: &load::Arrival| {
                a.type_url.ends_with("ClusterLoadAssignment")
                    && (a.names.is_empty() || a.names.iter().any(|n| n.contains(&cluster)))
            };
            (callers, Box::new(matches))
        };
        match kind {
            ChangeKind::EndpointAdd => {
                let file = self.dir.join(format!("endpoint-{k}.yaml"));
                std::fs::write(&file, sc.backend(address, svc))?;
                self.added.push_back((file, svc, k));
                Ok(eds_of(svc))
            }
            ChangeKind::EndpointRemove => match self.added.pop_front() {
                Some((file, svc, _)) => {
                    std::fs::remove_file(file)?;
                    Ok(eds_of(svc))
                }
                None => bail!("endpoint-remove needs an endpoint-add before it (--kinds)"),
            },
            ChangeKind::PodRoll => {
                // The file holds one pod of the service: rewriting it replaces that pod
                // by one with a new name and address in one step, as a rollout does.
                let file = self.dir.join(Scenario::roll_file(svc));
                std::fs::write(&file, sc.pod(&format!("roll-{svc}-{k}"), address, svc))?;
                Ok(eds_of(svc))
            }
            ChangeKind::ServiceAdd => {
                std::fs::write(
                    self.dir.join(format!("service-{k}.yaml")),
                    format!(
                        "apiVersion: v1\nkind: Service\nmetadata: {{name: added-{k}, namespace: {NAMESPACE}}}\nspec:\n  selector: {{app: {}}}\n  ports: [{{name: http, port: 80, targetPort: 8080, appProtocol: http}}]\n",
                        Scenario::service(svc)
                    ),
                )?;
                Ok((Vec::new(), Box::new(|_: &load::Arrival| false)))
            }
            ChangeKind::Policy => {
                std::fs::write(
                    self.dir.join("policy.yaml"),
                    format!(
                        "apiVersion: security.meshd.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: clients, namespace: {NAMESPACE}}}\nspec:\n  selector: {{matchLabels: {{app: client}}}}\n  action: ALLOW\n  rules:\n    - from: [{{source: {{namespaces: [{NAMESPACE}, caller-{k}]}}}}]\n"
                    ),
                )?;
                let matches = |a: &load::Arrival| {
                    a.type_url.ends_with("RouteConfiguration")
                        && (a.names.is_empty() || a.names.iter().any(|n| n.starts_with("inbound|")))
                };
                Ok(((0..sc.proxies).collect(), Box::new(matches)))
            }
        }
    }
}

/// For each proxy `change` concerns: how long until it arrived, and its size.
fn reached(change: &Applied, timelines: &[SharedTimeline]) -> Vec<Option<(Duration, usize)>> {
    change
        .concerned
        .iter()
        .map(|p| {
            let t = timelines[*p].lock().expect("timeline");
            t.arrivals[change.marks[*p]..]
                .iter()
                .find(|a| a.at >= change.at && (change.matches)(a))
                .map(|a| (a.at - change.at, a.bytes))
        })
        .collect()
}

async fn wait_reached(
    change: &Applied,
    timelines: &[SharedTimeline],
    k: usize,
) -> anyhow::Result<()> {
    let deadline = change.at + Duration::from_secs(60);
    loop {
        let missing = reached(change, timelines)
            .iter()
            .filter(|r| r.is_none())
            .count();
        if missing == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "change {k} ({:?}) did not reach {missing} of {} proxies within 60s",
                change.kind,
                change.concerned.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn kind_report(
    kind: ChangeKind,
    of_kind: &[&Applied],
    all: &[Applied],
    timelines: &[SharedTimeline],
    sequential: bool,
) -> KindReport {
    let mut convergence: Vec<Duration> = Vec::new();
    let mut bytes: Vec<usize> = Vec::new();
    let mut bytes_to_others = 0;
    for change in of_kind {
        for (d, b) in reached(change, timelines).into_iter().flatten() {
            convergence.push(d);
            bytes.push(b);
        }
        // What proxies it does not concern received between it and the next change
        // (or the end), when no other change concerns them in that span.
        let index = all
            .iter()
            .position(|a| std::ptr::eq(a, *change))
            .expect("a change of the run");
        let until = all.get(index + 1).map(|n| n.at);
        let busy: std::collections::HashSet<usize> = all
            .iter()
            .filter(|a| !std::ptr::eq(*a, *change))
            .filter(|a| until.is_none_or(|u| a.at < u) && a.at >= change.at)
            .flat_map(|a| a.concerned.iter().copied())
            .collect();
        let concerned: std::collections::HashSet<usize> =
            change.concerned.iter().copied().collect();
        for (p, t) in timelines.iter().enumerate() {
            if concerned.contains(&p) || busy.contains(&p) {
                continue;
            }
            let t = t.lock().expect("timeline");
            for a in t.arrivals[change.marks[p]..]
                .iter()
                .filter(|a| a.at >= change.at && until.is_none_or(|u| a.at < u))
                .filter(|a| !a.type_url.ends_with("Secret"))
            {
                if std::env::var("XDS_LOAD_DEBUG").is_ok() {
                    eprintln!(
                        "{kind:?}: proxy {p} got {} {:?} {}",
                        a.type_url, a.names, a.bytes
                    );
                }
                bytes_to_others += a.bytes;
            }
        }
    }
    convergence.sort();
    let pct = |p: f64| -> f64 {
        if convergence.is_empty() {
            return 0.0;
        }
        let i = ((convergence.len() as f64 - 1.0) * p).round() as usize;
        convergence[i].as_secs_f64() * 1e3
    };
    KindReport {
        kind,
        changes: of_kind.len(),
        proxies_per_change: of_kind.iter().map(|a| a.concerned.len()).sum::<usize>() as f64
            / of_kind.len().max(1) as f64,
        convergence_p50_ms: pct(0.5),
        convergence_p99_ms: pct(0.99),
        convergence_max_ms: pct(1.0),
        bytes_per_proxy_per_change: bytes.iter().sum::<usize>() as f64 / bytes.len().max(1) as f64,
        bytes_to_others: sequential.then_some(bytes_to_others),
    }
}

fn print_table(r: &Report) {
    println!(
        "xds-load: {} proxies ({}, {}), {} services, {} endpoints, {} upstreams per proxy{}{}",
        r.proxies,
        r.flavor,
        r.layout,
        r.services,
        r.endpoints,
        r.upstreams_per_proxy,
        if r.rate_per_s > 0.0 {
            format!(", {} changes/s", r.rate_per_s)
        } else {
            String::new()
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
    println!(
        "| meshd peak RSS | {:.0} MiB ({:.0} KiB per proxy) |",
        r.meshd_peak_rss_mib, r.meshd_rss_per_proxy_kib
    );
    println!("| meshd CPU (connect + changes) | {:.1} s |", r.meshd_cpu_s);
    println!(
        "| pushes per second during the changes | {:.0} |",
        r.pushes_per_s
    );
    println!("| NACKs meshd recorded | {:.0} |", r.nacks);
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
