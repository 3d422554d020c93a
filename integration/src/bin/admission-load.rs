//! `admission-load`: meshd's admission webhook under a steady load over HTTPS, as the
//! API server calls it. Starts meshd (file source, an empty mesh) with
//! `--webhook-address` pinned to one core, then sends `--rate` AdmissionReviews per
//! second of a Deployment's pod (two containers, three probes, capture annotations) for
//! `--seconds`, open loop: each request is timed from the moment the schedule sends it,
//! so a slow answer delays the ones queued behind it on its connection in the figures
//! too. Requests go over `--connections`
//! kept-alive HTTPS/1.1 connections that verify meshd's certificate against the trust
//! bundle (as the API server does with caBundle). Prints a table.
//! `./scripts/bench-admission.sh` (release build).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use clap::Parser;
use meshd_integration::mesh::MeshDir;
use meshd_integration::meshd::Meshd;
use meshd_integration::net::free_port;
use meshd_integration::webhook::{WebhookClient, review};
use serde_json::json;
use tokio::sync::Mutex;

#[derive(Debug, Parser)]
struct Args {
    /// AdmissionReviews per second.
    #[arg(long, default_value_t = 100)]
    rate: u32,
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Kept-alive connections the requests are spread over.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// The webhook: /inject.
    #[arg(long, default_value = "/inject")]
    path: String,
    /// The core meshd runs on (`taskset`); the load runs on the others.
    #[arg(long, default_value_t = 0)]
    core: usize,
}

fn pod() -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": "web-7d9f8b6c5d-x2x4q", "namespace": "shop",
            "labels": {"app": "web", "pod-template-hash": "7d9f8b6c5d"},
            "annotations": {"meshd.io/exclude-outbound-ports": "5432"},
        },
        "spec": {
            "serviceAccountName": "web",
            "containers": [{
                "name": "app", "image": "registry.example/shop/web:1.4.2",
                "ports": [{"name": "http", "containerPort": 8080}, {"name": "grpc", "containerPort": 9090}],
                "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}},
                "livenessProbe": {"tcpSocket": {"port": 8080}},
                "startupProbe": {"grpc": {"port": 9090}},
            }, {"name": "log-shipper", "image": "registry.example/shipper:2"}],
        },
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(
        args.rate > 0 && args.connections > 0,
        "--rate and --connections must be positive"
    );
    let mesh = MeshDir::new()?;
    let port = free_port();
    let address = format!("127.0.0.1:{port}");
    let meshd = Meshd::start_with(
        mesh.path(),
        &["--log", "warn", "--webhook-address", &address],
    )
    .await?;
    meshd.pin_to_core(args.core)?;
    let bundle = meshd.trust_bundle_pem().await?;
    let body = serde_json::to_vec(&review("shop", "CREATE", &pod()))?;

    let mut clients = Vec::new();
    for _ in 0..args.connections {
        let mut client = WebhookClient::new(address.parse()?, &bundle)?;
        // Connected and warm before the clock starts.
        let (status, _) = client.post(&args.path, body.clone()).await?;
        ensure!(status == 200, "{} answered {status}", args.path);
        clients.push(Arc::new(Mutex::new(client)));
    }
    let total = u64::from(args.rate) * args.seconds;
    let interval = Duration::from_secs_f64(1.0 / f64::from(args.rate));
    let start = Instant::now() + Duration::from_millis(100);
    let mut tasks = Vec::new();
    for i in 0..total {
        let due = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(due.into()).await;
        // Timed from here: the timer's own slop (it fires up to a millisecond late) is
        // not meshd's, waiting behind a slow answer on the connection is.
        let woke = Instant::now();
        let client = clients[(i as usize) % clients.len()].clone();
        let (path, body) = (args.path.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let mut client = client.lock().await;
            let answer = client.post(&path, body).await;
            let ok =
                matches!(&answer, Ok((200, b)) if b.windows(14).any(|w| w == br#""allowed":true"#));
            (woke.elapsed(), ok)
        }));
    }
    let mut latencies = Vec::new();
    let mut failed = 0;
    for t in tasks {
        let (latency, ok) = t.await?;
        latencies.push(latency);
        failed += usize::from(!ok);
    }
    let elapsed = start.elapsed();
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    let ms = |d: Duration| format!("{:.2}", d.as_secs_f64() * 1000.0);
    println!(
        "| webhook | rate asked | rate achieved | requests | failed | p50 ms | p90 ms | p99 ms | max ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {} | {}/s | {:.1}/s | {} | {} | {} | {} | {} | {} |",
        args.path,
        args.rate,
        latencies.len() as f64 / elapsed.as_secs_f64(),
        latencies.len(),
        failed,
        ms(at(0.5)),
        ms(at(0.9)),
        ms(at(0.99)),
        ms(*latencies.last().context("no request")?),
    );
    meshd.terminate().await?;
    Ok(())
}
