//! `agent-bench`: what meshd-agent costs a pod. Starts meshd (file source) on a mesh
//! of web-1 and client-1 on this machine, then:
//!
//! - `--starts` times: starts client-1's sidecar (`meshd-agent run` in local mode, as
//!   the harness runs every sidecar) and times agent start → `/healthz/ready` 200,
//!   i.e. the first certificate signed, Envoy started and its full config accepted;
//! - runs one sidecar with Envoy connected under a request loop for `--seconds`, with
//!   meshd's `--workload-cert-ttl` short enough that the agent renews several times,
//!   and reads the agent's peak RSS (`VmHWM` in /proc) and Envoy's for comparison.
//!
//! Prints a table. `./scripts/bench-agent.sh` (release build).

use std::time::Duration;

use anyhow::{Context, ensure};
use clap::Parser;
use meshd_integration::XdsFlavor;
use meshd_integration::apps::{HttpApp, Traffic, http_get};
use meshd_integration::envoy::{Sidecar, SidecarOptions};
use meshd_integration::mesh::web_and_client;
use meshd_integration::meshd::Meshd;
use meshd_integration::wait::eventually;

#[derive(Debug, Parser)]
struct Args {
    /// How many agent starts to time.
    #[arg(long, default_value_t = 10)]
    starts: usize,
    /// How long the RSS run lasts.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// meshd's --workload-cert-ttl during the RSS run (the agent renews at half).
    #[arg(long, default_value = "6s")]
    cert_ttl: String,
}

const NS: &str = "shop";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let app = HttpApp::start("web-1").await?;
    let (mesh, web, client) = web_and_client(NS, app.port())?;
    let meshd = Meshd::start_with(
        mesh.path(),
        &["--debounce", "50ms", "--workload-cert-ttl", &args.cert_ttl],
    )
    .await?;
    let _web = Sidecar::for_pod(&meshd, &web, XdsFlavor::Delta).await?;

    let mut starts = Vec::new();
    for _ in 0..args.starts {
        let options = SidecarOptions {
            wait_live: false,
            ..SidecarOptions::default()
        };
        let sidecar =
            Sidecar::start_with(&meshd, NS, "client-1", "client", XdsFlavor::Delta, options)
                .await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = sidecar.health("/healthz/ready").await {
                break;
            }
            ensure!(
                tokio::time::Instant::now() < deadline,
                "not ready within 30s:\n{}",
                sidecar.log()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        starts.push(sidecar.started_at.elapsed());
        // The outbound listener really routes (not part of the time).
        let r = http_get(client.outbound(0), "/").await?;
        ensure!(r.status == 200, "client-1 → web: {} {}", r.status, r.body);
        sidecar.stop().await?;
        // meshd sees the stream end before the next start names the same pod.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    starts.sort();

    let sidecar = Sidecar::for_pod(&meshd, &client, XdsFlavor::Delta).await?;
    eventually("traffic", Duration::from_secs(15), || async {
        ensure!(http_get(client.outbound(0), "/").await?.status == 200);
        Ok(())
    })
    .await?;
    let traffic = Traffic::start(client.outbound(0));
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    let (sent, failed) = traffic.stop().await;
    let agent_pid = sidecar.agent_pid().context("the agent exited")?;
    let envoy_pid = sidecar.envoy_pid()?;
    let agent = memory(agent_pid)?;
    let envoy = memory(envoy_pid)?;
    let renewals = sidecar
        .log()
        .lines()
        .filter(|l| l.contains("certificate signed by meshd and written"))
        .count()
        .saturating_sub(1);

    let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1000.0);
    let pct =
        |p: f64| starts[((starts.len() as f64 * p).ceil() as usize).clamp(1, starts.len()) - 1];
    println!(
        "agent start → /healthz/ready 200 (certificate signed, Envoy started, full config accepted), {} starts:",
        starts.len()
    );
    println!("| median | p90 | min | max |");
    println!("|---|---|---|---|");
    println!(
        "| {} | {} | {} | {} |",
        ms(pct(0.5)),
        ms(pct(0.9)),
        ms(starts[0]),
        ms(starts[starts.len() - 1])
    );
    println!();
    println!(
        "memory after {}s with Envoy connected, {sent} requests ({failed} failed), {renewals} renewals (--workload-cert-ttl {}):",
        args.seconds, args.cert_ttl
    );
    println!("| process | peak RSS (VmHWM) | RSS now (VmRSS) |");
    println!("|---|---|---|");
    println!("| meshd-agent | {} | {} |", mib(agent.0), mib(agent.1));
    println!(
        "| envoy (for comparison) | {} | {} |",
        mib(envoy.0),
        mib(envoy.1)
    );
    Ok(())
}

/// (VmHWM, VmRSS) of `pid`, in KiB.
fn memory(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmHWM:")?, field("VmRSS:")?))
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}
