//! Pods in network namespaces on a bridge (`meshd_integration::netns`), meshd in one of
//! them, sidecars run by meshd-agent as uid 1337 in theirs.
//!
//! The lab itself first: pods reach each other by address over the bridge, and nothing
//! it made outlives it, not even after a panic. Then a mesh across namespaces.
//! These tests need root (namespaces, veths, iptables) and fail without it.

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use anyhow::{Context, ensure};
use meshd_integration::apps::{HttpApp, TcpApp, http_get, tcp_roundtrip};
use meshd_integration::envoy::{Sidecar, SidecarOptions};
use meshd_integration::mesh::{MeshDir, PodDef, ServiceDef};
use meshd_integration::meshd::Meshd;
use meshd_integration::netns::{Lab, Netns, PROXY_UID};
use meshd_integration::wait::eventually;
use meshd_integration::{XdsFlavor, init_test_logging};

const NS: &str = "shop";
const WAIT: Duration = Duration::from_secs(15);

/// The lab's namespaces that exist now.
fn namespaces_named(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&format!("{prefix}-")))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn pods_reach_each_other_over_the_bridge_and_the_lab_leaves_nothing_behind()
-> anyhow::Result<()> {
    init_test_logging();
    let lab = Lab::new()?;
    let prefix = lab.prefix().to_string();
    let (a, b) = (lab.pod("a")?, lab.pod("b")?);
    let app = TcpApp::serve("b", b.netns.listen(b.addr(7000)).await?)?;

    let reply = a.netns.run(tcp_roundtrip(b.addr(7000), "hello")).await?;
    assert_eq!(reply, "b: hello");
    let peers = app.peers();
    assert_eq!(peers.len(), 1, "{peers:?}");
    assert_eq!(peers[0].ip(), a.ip, "b sees a's own address");
    assert_eq!(namespaces_named(&prefix).len(), 3, "bridge, a, b");
    drop((a, b, app));
    assert_eq!(namespaces_named(&prefix), [format!("{prefix}-bridge")]);
    drop(lab);
    assert_eq!(namespaces_named(&prefix), Vec::<String>::new());
    Ok(())
}

#[test]
fn a_panic_leaves_no_namespace_behind() {
    let (tx, rx) = std::sync::mpsc::channel();
    let panicked = std::thread::spawn(move || {
        let lab = Lab::new().expect("a lab");
        let _pod = lab.pod("web-1").expect("a pod");
        tx.send(lab.prefix().to_string()).expect("send");
        panic!("the test fails here");
    })
    .join();
    assert!(panicked.is_err());
    let prefix = rx.recv().expect("the lab was made");
    assert_eq!(namespaces_named(&prefix), Vec::<String>::new());
}

/// The network namespace `pid` is in, as (device, inode).
fn netns_of_process(pid: u32) -> anyhow::Result<(u64, u64)> {
    let m = std::fs::metadata(format!("/proc/{pid}/ns/net"))?;
    Ok((m.dev(), m.ino()))
}

fn netns_id(netns: &Netns) -> anyhow::Result<(u64, u64)> {
    let m = std::fs::metadata(netns.path())?;
    Ok((m.dev(), m.ino()))
}

/// The real uid of process `pid`.
fn uid_of(pid: u32) -> anyhow::Result<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .context("no Uid line")?;
    Ok(line
        .split_whitespace()
        .next()
        .context("empty Uid")?
        .parse()?)
}

/// Explicit capture across namespaces: meshd in its own pod, web-1 and client-1 in
/// theirs, client-1 calling `web:80` at its sidecar's local port; mutual TLS over the
/// bridge.
#[tokio::test]
async fn explicit_sidecars_carry_mutual_tls_between_pod_namespaces() -> anyhow::Result<()> {
    init_test_logging();
    let lab = Lab::new()?;
    let (node, web_pod, client_pod) = (lab.pod("meshd")?, lab.pod("web-1")?, lab.pod("client-1")?);
    let app = HttpApp::serve(
        "web-1",
        web_pod.netns.listen(([127, 0, 0, 1], 8081).into()).await?,
    )?;
    let mut web = PodDef::new(NS, "web-1", "web").serves(8080, app.port());
    web.ip = web_pod.ip;
    let mut client = PodDef::new(NS, "client-1", "client").calls("web", 80, 9080);
    client.ip = client_pod.ip;
    let mesh = MeshDir::new()?;
    mesh.write(
        "mesh.yaml",
        &[
            ServiceDef::new(NS, "web").http_port(80, 8080).yaml(),
            web.yaml(),
            client.yaml(),
        ],
    )?;
    let meshd = Meshd::start_in(&node, mesh.path(), &["--debounce", "50ms"]).await?;
    let in_pod = |netns: &Netns| SidecarOptions {
        netns: Some(netns.clone()),
        ..SidecarOptions::default()
    };
    let web_sidecar = Sidecar::start_with(
        &meshd,
        NS,
        "web-1",
        "web",
        XdsFlavor::Delta,
        in_pod(&web_pod.netns),
    )
    .await?;
    let client_sidecar = Sidecar::start_with(
        &meshd,
        NS,
        "client-1",
        "client",
        XdsFlavor::Delta,
        in_pod(&client_pod.netns),
    )
    .await?;

    let reply = eventually("client-1 → web:80 through both sidecars", WAIT, || {
        let netns = client_pod.netns.clone();
        async move {
            let r = netns
                .run(http_get(([127, 0, 0, 1], 9080).into(), "/"))
                .await?;
            ensure!(r.status == 200, "HTTP {}: {}", r.status, r.body);
            Ok(r)
        }
    })
    .await?;
    assert_eq!(reply.app.as_deref(), Some("web-1"));

    // Envoy runs in its pod's namespace as the proxy's uid.
    for (sidecar, pod) in [(&web_sidecar, &web_pod), (&client_sidecar, &client_pod)] {
        let envoy = sidecar.envoy_pid()?;
        assert_eq!(uid_of(envoy)?, PROXY_UID, "{}'s Envoy", pod.name);
        assert_eq!(
            netns_of_process(envoy)?,
            netns_id(&pod.netns)?,
            "{}'s Envoy is in its pod's namespace",
            pod.name
        );
    }
    // web-1's sidecar terminated mutual TLS from client-1's identity, from its address.
    let log = eventually("web-1's access log line", WAIT, || async {
        let log = web_sidecar.log();
        ensure!(log.contains("inbound \"GET / "), "no access log line yet");
        Ok(log)
    })
    .await?;
    assert!(
        log.contains("peer=spiffe://cluster.local/ns/shop/sa/client"),
        "web-1's access log:\n{log}"
    );
    let peers = app.peers();
    assert!(
        peers.iter().all(|p| p.ip().is_loopback()),
        "the app is reached by its sidecar only: {peers:?}"
    );
    let handshakes = web_sidecar
        .stat(&format!("listener.{}_8080.ssl.handshake", web_pod.ip))
        .await?;
    assert!(
        handshakes >= Some(1),
        "web-1 inbound TLS handshakes: {handshakes:?}"
    );
    Ok(())
}
