//! `capture-bench`: the latency two transparently captured sidecars add to a request,
//! against the same request sent directly, at a fixed request rate.
//!
//! Builds a lab of network namespaces (`meshd_integration::netns`, needs root): meshd
//! in its pod; `web-1` and `client-1` meshed with `meshd.io/capture: transparent`
//! (`meshd-agent init`, Envoy as uid 1337 with `--concurrency 1`); `plain-web` and
//! `plain-client` outside the mesh. Every server is the harness' HTTP app on
//! `0.0.0.0:8080` in its pod. Then h2load (HTTP/1.1, `--rps` per connection, one
//! request in flight per connection) runs in a client pod for `--seconds`:
//! - direct: `plain-client` → `http://<plain-web IP>:8080/` (no proxy);
//! - meshed: `client-1` → `http://<web VIP>:80/`: client-1's iptables → its Envoy
//!   (15001) → mTLS over the bridge → web-1's iptables → its Envoy (15006) → the app.
//!
//! Latency is h2load's per-request time (`--log-file`: request start → end of
//! response); percentiles are computed here from every request. A warm-up second
//! before each run is not counted. Prints a table. `./scripts/bench-capture.sh`
//! (release build).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use clap::Parser;
use meshd_integration::apps::{HttpApp, http_get};
use meshd_integration::mesh::{MeshDir, PodDef, ServiceDef};
use meshd_integration::meshd::Meshd;
use meshd_integration::netns::{Lab, LabPod, require_tools};
use meshd_integration::transparent::mesh_pod;
use meshd_integration::wait::eventually;

#[derive(Debug, Parser)]
struct Args {
    /// Requests per second, in total (spread over --connections).
    #[arg(long, default_value_t = 200)]
    rate: u32,
    /// How long each run lasts.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Connections (h2load clients), each with one request in flight.
    #[arg(long, default_value_t = 4)]
    connections: u32,
}

const NS: &str = "shop";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(
        args.rate % args.connections == 0,
        "--rate must be a multiple of --connections (h2load's --rps is per connection)"
    );
    require_tools(&[("h2load", "apt-get install -y nghttp2-client")])?;
    let lab = Lab::new()?;
    let node = lab.pod("meshd")?;
    let (web, client) = (lab.pod("web-1")?, lab.pod("client-1")?);
    let (plain_web, plain_client) = (lab.pod("plain-web")?, lab.pod("plain-client")?);
    let vip = lab.vip();

    let web_def = PodDef::new(NS, "web-1", "web")
        .serves(8080, 8080)
        .transparent()
        .at(web.ip);
    let client_def = PodDef::new(NS, "client-1", "client")
        .transparent()
        .at(client.ip);
    let dir = MeshDir::new()?;
    dir.write(
        "mesh.yaml",
        &[
            ServiceDef::new(NS, "web")
                .vip(vip)
                .http_port(80, 8080)
                .yaml(),
            web_def.yaml(),
            client_def.yaml(),
        ],
    )?;
    let any = |port| SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    let _web_app = HttpApp::serve("web-1", web.netns.listen(any(8080)).await?)?;
    let _plain_app = HttpApp::serve("plain-web", plain_web.netns.listen(any(8080)).await?)?;
    let meshd = Meshd::start_in(&node, dir.path(), &["--debounce", "50ms"]).await?;
    let _web_sidecar = mesh_pod(&meshd, &web, &web_def).await?;
    let client_sidecar = mesh_pod(&meshd, &client, &client_def).await?;
    let meshed_addr = SocketAddr::from((vip, 80));
    eventually("client-1 → web VIP", Duration::from_secs(15), || {
        let netns = client.netns.clone();
        async move {
            let r = netns.run(http_get(meshed_addr, "/")).await?;
            ensure!(r.status == 200, "HTTP {}: {}", r.status, r.body);
            Ok(())
        }
    })
    .await?;

    let direct_url = format!("http://{}:8080/", plain_web.ip);
    let meshed_url = format!("http://{vip}:80/");
    let direct = run(&lab, &plain_client, &direct_url, &args).await?;
    let meshed = run(&lab, &client, &meshed_url, &args).await?;

    println!(
        "{} req/s for {} s over {} connections (HTTP/1.1, h2load --rps {}), {} build, \
         Envoy {} --concurrency 1:",
        args.rate,
        args.seconds,
        args.connections,
        args.rate / args.connections,
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        meshd_integration::tools::ENVOY_VERSION,
    );
    println!("| path | requests | failed | p50 | p90 | p99 | max |");
    println!("|---|---|---|---|---|---|---|");
    for (name, l) in [
        ("direct: pod → pod IP, no proxy", &direct),
        (
            "meshed: pod → Service VIP, 2 captured sidecars, mTLS",
            &meshed,
        ),
    ] {
        println!(
            "| {name} | {} | {} | {} | {} | {} | {} |",
            l.ok.len() + l.failed,
            l.failed,
            ms(l.percentile(0.50)),
            ms(l.percentile(0.90)),
            ms(l.percentile(0.99)),
            ms(l.percentile(1.0)),
        );
    }
    let added = |p: f64| ms(meshed.percentile(p).saturating_sub(direct.percentile(p)));
    println!(
        "| added by the sidecars | | | +{} | +{} | +{} | |",
        added(0.50),
        added(0.90),
        added(0.99)
    );
    let cluster = "cluster.outbound|80||web.shop.svc.cluster.local";
    let stat = |name: String| {
        let sidecar = &client_sidecar;
        async move { sidecar.stat(&name).await.map(Option::unwrap_or_default) }
    };
    println!(
        "client-1's Envoy: {} requests to web over {} mTLS connections ({} handshakes)",
        stat(format!("{cluster}.upstream_rq_total")).await?,
        stat(format!("{cluster}.upstream_cx_total")).await?,
        stat(format!("{cluster}.ssl.handshake")).await?,
    );
    Ok(())
}

/// Every request's latency of one h2load run, and how many failed.
struct Latencies {
    ok: Vec<Duration>,
    failed: usize,
}

impl Latencies {
    /// The `p` quantile (nearest rank) of the successful requests.
    fn percentile(&self, p: f64) -> Duration {
        let rank = (self.ok.len() as f64 * p).ceil() as usize;
        self.ok[rank.clamp(1, self.ok.len()) - 1]
    }
}

/// A warm-up second, then `--seconds` of h2load from `pod` at `url`.
async fn run(lab: &Lab, pod: &LabPod, url: &str, args: &Args) -> anyhow::Result<Latencies> {
    h2load(lab, pod, url, args, 1).await?;
    let l = h2load(lab, pod, url, args, args.seconds).await?;
    ensure!(!l.ok.is_empty(), "no request to {url} succeeded");
    Ok(l)
}

async fn h2load(
    lab: &Lab,
    pod: &LabPod,
    url: &str,
    args: &Args,
    seconds: u64,
) -> anyhow::Result<Latencies> {
    let dir = lab.tempdir("h2load")?;
    let log = dir.path().join("requests.tsv");
    let out = pod
        .netns
        .command("h2load")
        .args(["--h1", "-t", "1"])
        .args(["-c", &args.connections.to_string()])
        .args(["--rps", &(args.rate / args.connections).to_string()])
        .args(["-D", &seconds.to_string()])
        .arg("--log-file")
        .arg(&log)
        .arg(url)
        .output()
        .await
        .context("cannot run h2load")?;
    if !out.status.success() {
        bail!(
            "h2load {url} in {} failed ({}): {}{}",
            pod.name,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut latencies = Latencies {
        ok: Vec::new(),
        failed: 0,
    };
    // start (µs since epoch) \t status (-1: failed) \t µs until the end of the response
    for line in std::fs::read_to_string(&log)?.lines() {
        let fields: Vec<&str> = line.split('\t').collect();
        let (Some(status), Some(micros)) = (fields.get(1), fields.get(2)) else {
            bail!("h2load log line {line:?}: expected 3 columns");
        };
        if *status == "200" {
            latencies
                .ok
                .push(Duration::from_micros(micros.trim().parse()?));
        } else {
            latencies.failed += 1;
        }
    }
    latencies.ok.sort();
    Ok(latencies)
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}
