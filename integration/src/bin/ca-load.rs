//! `ca-load`: how many CSRs meshd signs per second for pods with tokens. Starts the
//! test API server and meshd (Kubernetes source) pinned to one core, creates pods
//! with ServiceAccounts, then has `--clients` concurrent callers send `Sign` requests
//! over a few HTTP/2 connections for `--seconds`, in two rounds:
//!
//! - `cached review`: every request carries the same pod's token; meshd reviews it once
//!   and then answers from its cache (checking the pod against its own view each time);
//! - `review per request`: every request carries a token meshd has not seen (minted
//!   beforehand), so each costs a TokenReview against the API server.
//!
//! Prints a table. `./scripts/bench-ca.sh` (release build).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use meshd_integration::ca_client::{self, csr_for, sign};
use meshd_integration::kube_api::{KubeApi, PodSpec};
use meshd_integration::meshd::Meshd;
use meshd_integration::net::pod_ip;

#[derive(Debug, Parser)]
struct Args {
    /// Concurrent callers.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// HTTP/2 connections they share.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Length of each round.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Distinct tokens for the review-per-request round (each is used once).
    #[arg(long, default_value_t = 2000)]
    tokens: usize,
    /// The core meshd runs on (`taskset`); the callers and the API server get the rest.
    #[arg(long, default_value_t = 0)]
    core: usize,
}

const NS: &str = "bench";
const ID: &str = "spiffe://cluster.local/ns/bench/sa/web";

struct Round {
    name: &'static str,
    signed: usize,
    failed: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let api = KubeApi::start().await?;
    api.create_namespace(NS, &[]).await?;
    api.service_account(NS, "web").await?;
    let ip = pod_ip().to_string();
    let pod = PodSpec {
        namespace: NS,
        name: "web-0",
        app: "web",
        service_account: "web",
        ip: &ip,
        ports: &[8080],
        annotations: &[],
    };
    api.pod(&pod, true).await?;
    let meshd = Meshd::start_kubernetes(&api, &["--log", "warn"]).await?;
    meshd.pin_to_core(args.core)?;

    let mut channels = Vec::new();
    for _ in 0..args.connections {
        channels.push(ca_client::client(&meshd, None).await?);
    }
    // Callers reuse CSRs: making a key costs the caller, not meshd.
    let csrs: Arc<Vec<String>> = Arc::new((0..64).map(|_| csr_for(ID).pem).collect());
    let token = api.token(NS, "web", "meshd", Some("web-0")).await?;
    // Until meshd has seen the pod.
    for _ in 0..100 {
        if sign(&mut channels[0].clone(), Some(&token), &csrs[0])
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("minting {} tokens…", args.tokens);
    let mut fresh = Vec::with_capacity(args.tokens);
    for _ in 0..args.tokens {
        fresh.push(api.token(NS, "web", "meshd", Some("web-0")).await?);
    }
    let run = |name: &'static str, tokens: Arc<Vec<String>>, reuse: bool| {
        let channels = channels.clone();
        let csrs = csrs.clone();
        let seconds = args.seconds;
        let clients = args.clients;
        async move {
            let next = Arc::new(AtomicUsize::new(0));
            let failed = Arc::new(AtomicUsize::new(0));
            let deadline = Instant::now() + Duration::from_secs(seconds);
            let start = Instant::now();
            let mut tasks = Vec::new();
            for c in 0..clients {
                let mut ca = channels[c % channels.len()].clone();
                let (tokens, csrs, next, failed) =
                    (tokens.clone(), csrs.clone(), next.clone(), failed.clone());
                tasks.push(tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    while Instant::now() < deadline {
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        let token = if reuse {
                            &tokens[0]
                        } else if let Some(t) = tokens.get(n) {
                            t
                        } else {
                            break;
                        };
                        let t0 = Instant::now();
                        match sign(&mut ca, Some(token), &csrs[n % csrs.len()]).await {
                            Ok(_) => latencies.push(t0.elapsed()),
                            Err(_) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    latencies
                }));
            }
            let mut latencies = Vec::new();
            for t in tasks {
                latencies.extend(t.await?);
            }
            let elapsed = start.elapsed();
            latencies.sort();
            anyhow::Ok(Round {
                name,
                signed: latencies.len(),
                failed: failed.load(Ordering::Relaxed),
                elapsed,
                latencies,
            })
        }
    };
    let cached = run("cached review", Arc::new(vec![token]), true).await?;
    let reviewed = run("review per request", Arc::new(fresh), false).await?;

    println!(
        "CSR signing, meshd on one core (core {}), {} callers over {} connections\n",
        args.core, args.clients, args.connections
    );
    println!("| round | signed | failed | seconds | signed/s | p50 | p99 |");
    println!("|---|---|---|---|---|---|---|");
    for r in [&cached, &reviewed] {
        let pct = |p: f64| {
            r.latencies
                .get(
                    ((r.latencies.len() as f64 * p) as usize)
                        .min(r.latencies.len().saturating_sub(1)),
                )
                .map(|d| format!("{:.1} ms", d.as_secs_f64() * 1000.0))
                .unwrap_or_else(|| "-".into())
        };
        println!(
            "| {} | {} | {} | {:.1} | {:.0} | {} | {} |",
            r.name,
            r.signed,
            r.failed,
            r.elapsed.as_secs_f64(),
            r.signed as f64 / r.elapsed.as_secs_f64(),
            pct(0.5),
            pct(0.99)
        );
    }
    Ok(())
}
