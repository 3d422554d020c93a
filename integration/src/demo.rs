//! The newcomer's first run: meshd on a config directory (the example mesh by default),
//! a real Envoy sidecar for every pod, a small app behind every inbound port, and real
//! requests through every declared upstream, printed as they happen.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context;
use meshd::model::{MeshDefaults, MeshSnapshot, Protocol};
use meshd::sources::file::FileSource;

use crate::apps::{HttpApp, TcpApp, http_get, tcp_roundtrip};
use crate::envoy::Sidecar;
use crate::meshd::{Meshd, XdsFlavor};
use crate::wait::eventually;

/// Everything the demo started; dropping it stops it all.
#[derive(Debug)]
pub struct Demo {
    pub meshd: Meshd,
    pub sidecars: Vec<Sidecar>,
    pub http_apps: Vec<HttpApp>,
    pub tcp_apps: Vec<TcpApp>,
    /// One line per request sent: `from → to: answer`.
    pub transcript: Vec<String>,
}

/// Starts the mesh in `dir` and sends `requests` requests through every upstream of
/// every pod, printing each answer.
pub async fn run(dir: &Path, flavor: XdsFlavor, requests: usize) -> anyhow::Result<Demo> {
    let mut source = FileSource::new(dir);
    let objects = source.scan();
    if let Some(e) = source.errors().first() {
        anyhow::bail!("{e}");
    }
    let snap = MeshSnapshot::build(1, MeshDefaults::default(), objects);

    println!("starting meshd on {}", dir.display());
    let meshd = Meshd::start(dir).await?;
    println!(
        "  xDS on {}, admin API on {}",
        meshd.xds_addr,
        meshd.admin_url()
    );

    let mut http_apps = Vec::new();
    let mut tcp_apps = Vec::new();
    for (key, ports) in &snap.inbound {
        let workload = &snap.workloads[key];
        for port in ports.iter() {
            let app_addr: SocketAddr = ([127, 0, 0, 1], workload.app_port(port.port)).into();
            if port.protocol.is_http() {
                http_apps.push(HttpApp::start_on(&key.name, app_addr).await?);
            } else {
                tcp_apps.push(TcpApp::start_on(&key.name, app_addr).await?);
            }
            println!(
                "  app {key} listening on {app_addr} ({})",
                format!("{:?}", port.protocol).to_lowercase()
            );
        }
    }

    let mut sidecars = Vec::new();
    for (key, workload) in &snap.workloads {
        let sidecar = Sidecar::start(
            &meshd,
            &key.namespace,
            &key.name,
            &workload.service_account,
            flavor,
        )
        .await
        .with_context(|| format!("sidecar for {key}"))?;
        println!(
            "  envoy for {key} is live (admin on 127.0.0.1:{})",
            sidecar.admin_port
        );
        sidecars.push(sidecar);
    }

    println!("sending requests through the sidecars:");
    let mut transcript = Vec::new();
    for workload in snap.workloads.values() {
        for up in &workload.upstreams {
            let Some(service) = snap.services.get(&up.service) else {
                continue;
            };
            let Some(port) = service.port(up.port) else {
                continue;
            };
            let local: SocketAddr = ([127, 0, 0, 1], up.local_port).into();
            for i in 0..requests {
                let answer = match port.protocol {
                    Protocol::Tcp => {
                        let msg = format!("hello #{i}");
                        eventually("a TCP answer", std::time::Duration::from_secs(10), || {
                            tcp_roundtrip(local, &msg)
                        })
                        .await?
                    }
                    _ => {
                        let r = eventually(
                            "an HTTP answer",
                            std::time::Duration::from_secs(10),
                            || async {
                                let r = http_get(local, "/").await?;
                                anyhow::ensure!(
                                    r.status == 200,
                                    "HTTP {}: {}",
                                    r.status,
                                    r.body.trim()
                                );
                                Ok(r)
                            },
                        )
                        .await?;
                        format!("HTTP {} from {}", r.status, r.app.as_deref().unwrap_or("?"))
                    }
                };
                let line = format!(
                    "{} → {}:{} (via {local}): {answer}",
                    workload.key, up.service, up.port
                );
                println!("  {line}");
                transcript.push(line);
            }
            if port.protocol.is_http() {
                // What the example's AuthorizationPolicies say about /admin.
                let r = http_get(local, "/admin").await?;
                let answer = match r.status {
                    403 => format!("HTTP 403: {}", r.body.trim()),
                    s => format!("HTTP {s} from {}", r.app.as_deref().unwrap_or("?")),
                };
                let line = format!(
                    "{} → {}:{} GET /admin: {answer}",
                    workload.key, up.service, up.port
                );
                println!("  {line}");
                transcript.push(line);
            }
        }
    }
    Ok(Demo {
        meshd,
        sidecars,
        http_apps,
        tcp_apps,
        transcript,
    })
}
