//! `admission-load`: meshd's admission webhooks under a steady load over HTTPS, as the
//! API server calls them. Starts meshd (file source) with `--webhook-address` pinned to
//! one core, then sends `--rate` AdmissionReviews per second of a Deployment's pod (two
//! containers, three probes, capture annotations) for `--seconds`. `--path /inject`:
//! the pod as written, in an empty mesh. `--path /validate`: the pod as `/inject`
//! returned it (meshd's init container and sidecar included, so recognising them is
//! part of the cost), against two Enforce WorkloadPolicies of the root namespace
//! (`restricted`, and every rule beyond it but `requireMesh`), which it keeps. Open
//! loop: each request is timed from the moment the schedule sends it,
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
    /// The webhook: /inject or /validate.
    #[arg(long, default_value = "/inject")]
    path: String,
    /// The core meshd runs on (`taskset`); the load runs on the others.
    #[arg(long, default_value_t = 0)]
    core: usize,
}

/// What `restricted` and the rules ask of a container.
fn secure(mut container: serde_json::Value) -> serde_json::Value {
    container["securityContext"] = json!({
        "runAsNonRoot": true, "allowPrivilegeEscalation": false,
        "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
        "readOnlyRootFilesystem": true,
    });
    container["resources"] = json!({"limits": {"cpu": "1", "memory": "256Mi"}});
    container
}

const POLICIES: &str = "apiVersion: security.meshd.io/v1alpha1
kind: WorkloadPolicy
metadata: {name: restricted, namespace: meshd-system}
spec: {mode: Enforce, profile: restricted}
---
apiVersion: security.meshd.io/v1alpha1
kind: WorkloadPolicy
metadata: {name: rules, namespace: meshd-system}
spec:
  mode: Enforce
  rules:
    readOnlyRootFilesystem: true
    allowedRegistries: [registry.example/]
    forbidLatestTag: true
    forbidDefaultServiceAccount: true
";

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
    let validate = match args.path.as_str() {
        "/inject" => false,
        "/validate" => true,
        other => anyhow::bail!("--path {other}: use /inject or /validate"),
    };
    let mesh = MeshDir::new()?;
    if validate {
        mesh.write_raw("policies.yaml", POLICIES)?;
    }
    let port = free_port();
    let address = format!("127.0.0.1:{port}");
    let meshd = Meshd::start_with(
        mesh.path(),
        &["--log", "warn", "--webhook-address", &address],
    )
    .await?;
    meshd.pin_to_core(args.core)?;
    let bundle = meshd.trust_bundle_pem().await?;
    let mut object = pod();
    if validate {
        for c in object["spec"]["containers"]
            .as_array_mut()
            .context("containers")?
        {
            *c = secure(c.take());
        }
        // The pod as the API server hands it to validation: after injection.
        let mut client = WebhookClient::new(address.parse()?, &bundle)?;
        let injected = client.review("/inject", "shop", "CREATE", &object).await?;
        // kube's AdmissionResponse writes the patch as an array of bytes, which the
        // API server's decoder reads as well as base64.
        let bytes: Vec<u8> = serde_json::from_value(injected["patch"].clone())
            .with_context(|| format!("no patch from /inject: {injected}"))?;
        let patch: json_patch::Patch = serde_json::from_slice(&bytes)?;
        json_patch::patch(&mut object, &patch)?;
    }
    let body = serde_json::to_vec(&review("shop", "CREATE", &object))?;

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
