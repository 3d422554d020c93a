//! Pods in network namespaces on a bridge (`meshd_integration::netns`), meshd in one of
//! them, sidecars run by meshd-agent as uid 1337 in theirs.
//!
//! The lab itself first: pods reach each other by address over the bridge, and nothing
//! it made outlives it, not even after a panic; explicit sidecars across namespaces.
//! Then transparent capture (issue #14): `meshd-agent init` in each meshed pod, Envoy as
//! uid 1337, unmodified apps dialling Service VIPs and pod addresses, each test on a
//! shop of its own ([`shop`]).
//! These tests need root (namespaces, veths, iptables) and fail without it.

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use anyhow::{Context, ensure};
use meshd_integration::apps::{HttpApp, HttpReply, TcpApp, http_get, tcp_roundtrip};
use meshd_integration::envoy::Sidecar;
use meshd_integration::init_test_logging;
use meshd_integration::mesh::{MeshDir, PodDef, ServiceDef};
use meshd_integration::meshd::Meshd;
use meshd_integration::netns::{Lab, LabPod, Netns, PROXY_UID};
use meshd_integration::transparent::{self, mesh_pod};
use meshd_integration::wait::eventually;

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
    let web = PodDef::new(NS, "web-1", "web")
        .serves(8080, app.port())
        .at(web_pod.ip);
    let client = PodDef::new(NS, "client-1", "client")
        .calls("web", 80, 9080)
        .at(client_pod.ip);
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
    let web_sidecar = mesh_pod(&meshd, &web_pod, &web).await?;
    let client_sidecar = mesh_pod(&meshd, &client_pod, &client).await?;

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

// ---------------------------------------------------------------------------------
// Transparent capture: unmodified apps, `meshd-agent init`, the virtual listeners.
// ---------------------------------------------------------------------------------

const CLIENT_ID: &str = "spiffe://cluster.local/ns/shop/sa/client";

/// The shop, every pod in its own namespace:
/// - `web-1` (transparent): HTTP on 8080 behind `web` (VIP, port 80) and TCP on 9000
///   behind `web` (port 9000); a plain HTTP app on 8090, which its annotations exclude
///   from inbound capture, and one on 8091, which no Service names. AuthorizationPolicy
///   `no-admin` denies `/admin*`. STRICT (the default).
/// - `db-1` (transparent): TCP on 5432 behind the headless Service `db`.
/// - `open-1` (transparent, PERMISSIVE): HTTP on 8080 behind `open` (VIP, port 80),
///   and an app on 8091 that no Service names.
/// - `client-1` (transparent, serves nothing): excludes outbound port 7777 and
///   `outside-2`'s address from capture.
/// - `outside-1`, `outside-2`: not in the mesh at all; HTTP apps on 8080 (and 7777).
///
/// Every app listens on `0.0.0.0:<port>` in its pod, as an unmodified app does.
struct Shop {
    _meshd: Meshd,
    _dir: MeshDir,
    web_vip: std::net::Ipv4Addr,
    open_vip: std::net::Ipv4Addr,
    web: LabPod,
    db: LabPod,
    open: LabPod,
    client: LabPod,
    outside: LabPod,
    outside2: LabPod,
    client_def: PodDef,
    web_sidecar: Sidecar,
    db_sidecar: Sidecar,
    open_sidecar: Sidecar,
    client_sidecar: Sidecar,
    apps: Apps,
    lab: Lab,
}

struct Apps {
    web: HttpApp,
    web_tcp: TcpApp,
    web_excluded: HttpApp,
    web_unnamed: HttpApp,
    db: TcpApp,
    open: HttpApp,
    open_unnamed: HttpApp,
    outside: HttpApp,
    outside_excluded_port: HttpApp,
    outside2: HttpApp,
}

async fn http_app(pod: &LabPod, name: &str, port: u16) -> anyhow::Result<HttpApp> {
    HttpApp::serve(name, pod.netns.listen(([0, 0, 0, 0], port).into()).await?)
}

async fn tcp_app(pod: &LabPod, name: &str, port: u16) -> anyhow::Result<TcpApp> {
    TcpApp::serve(name, pod.netns.listen(([0, 0, 0, 0], port).into()).await?)
}

fn policy_yaml(kind: &str, name: &str, app: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.meshd.io/v1alpha1\nkind: {kind}\nmetadata: {{name: {name}, namespace: {NS}}}\nspec:\n  selector: {{matchLabels: {{app: {app}}}}}\n{spec}"
    )
}

async fn shop(meshd_args: &[&str]) -> anyhow::Result<Shop> {
    init_test_logging();
    let lab = Lab::new()?;
    let node = lab.pod("meshd")?;
    let (web, db, open) = (lab.pod("web-1")?, lab.pod("db-1")?, lab.pod("open-1")?);
    let client = lab.pod("client-1")?;
    let (outside, outside2) = (lab.pod("outside-1")?, lab.pod("outside-2")?);
    let (web_vip, open_vip) = (lab.vip(), lab.vip());

    let web_def = PodDef::new(NS, "web-1", "web")
        .serves(8080, 8080)
        .serves(9000, 9000)
        .transparent()
        .annotate("meshd.io/exclude-inbound-ports", "8090")
        .at(web.ip);
    let db_def = PodDef::new(NS, "db-1", "db")
        .serves(5432, 5432)
        .transparent()
        .at(db.ip);
    let open_def = PodDef::new(NS, "open-1", "open")
        .serves(8080, 8080)
        .transparent()
        .at(open.ip);
    let client_def = PodDef::new(NS, "client-1", "client")
        .transparent()
        .annotate("meshd.io/exclude-outbound-ports", "7777")
        .annotate(
            "meshd.io/exclude-outbound-ip-ranges",
            &format!("{}/32", outside2.ip),
        )
        .at(client.ip);
    let dir = MeshDir::new()?;
    dir.write(
        "mesh.yaml",
        &[
            ServiceDef::new(NS, "web")
                .vip(web_vip)
                .http_port(80, 8080)
                .tcp_port(9000, 9000)
                .yaml(),
            ServiceDef::new(NS, "db")
                .headless()
                .tcp_port(5432, 5432)
                .yaml(),
            ServiceDef::new(NS, "open")
                .vip(open_vip)
                .http_port(80, 8080)
                .yaml(),
            web_def.yaml(),
            db_def.yaml(),
            open_def.yaml(),
            client_def.yaml(),
            policy_yaml(
                "AuthorizationPolicy",
                "no-admin",
                "web",
                // On a TCP port a DENY rule's paths cannot be checked, so it would
                // deny everything there: the rule names its HTTP port.
                "  action: DENY\n  rules:\n    - to: [{operation: {ports: [\"8080\"], paths: [\"/admin*\"]}}]\n",
            ),
            policy_yaml(
                "PeerAuthentication",
                "open",
                "open",
                "  mtls: {mode: PERMISSIVE}\n",
            ),
        ],
    )?;
    let apps = Apps {
        web: http_app(&web, "web-1", 8080).await?,
        web_tcp: tcp_app(&web, "web-1", 9000).await?,
        web_excluded: http_app(&web, "web-1-excluded", 8090).await?,
        web_unnamed: http_app(&web, "web-1-unnamed", 8091).await?,
        db: tcp_app(&db, "db-1", 5432).await?,
        open: http_app(&open, "open-1", 8080).await?,
        open_unnamed: http_app(&open, "open-1-unnamed", 8091).await?,
        outside: http_app(&outside, "outside-1", 8080).await?,
        outside_excluded_port: http_app(&outside, "outside-1-7777", 7777).await?,
        outside2: http_app(&outside2, "outside-2", 8080).await?,
    };
    let mut args = vec!["--debounce", "50ms"];
    args.extend_from_slice(meshd_args);
    let meshd = Meshd::start_in(&node, dir.path(), &args).await?;
    let (web_sidecar, db_sidecar, open_sidecar, client_sidecar) = tokio::try_join!(
        mesh_pod(&meshd, &web, &web_def),
        mesh_pod(&meshd, &db, &db_def),
        mesh_pod(&meshd, &open, &open_def),
        mesh_pod(&meshd, &client, &client_def),
    )?;
    // Every sidecar has the mesh as it is now: a refusal below is the config's, not a
    // listener not there yet.
    let version = meshd.snapshot().await?.version;
    for def in [&web_def, &db_def, &open_def, &client_def] {
        meshd.wait_synced(&def.node_id(), version).await?;
    }
    Ok(Shop {
        _meshd: meshd,
        _dir: dir,
        web_vip,
        open_vip,
        web,
        db,
        open,
        client,
        outside,
        outside2,
        client_def,
        web_sidecar,
        db_sidecar,
        open_sidecar,
        client_sidecar,
        apps,
        lab,
    })
}

impl Shop {
    /// What each sidecar logged beyond Envoy's start-up (access log lines, warnings),
    /// the last 30 lines each: what a failed call is explained with. Envoy writes its
    /// access log every second; this waits for that first.
    async fn logs(&self) -> String {
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let mut all = String::new();
        for sidecar in [
            &self.client_sidecar,
            &self.web_sidecar,
            &self.db_sidecar,
            &self.open_sidecar,
        ] {
            let log = sidecar.log();
            let lines: Vec<&str> = log.lines().filter(|l| !l.contains("][info][")).collect();
            all.push_str(&format!("--- {} (last 30 lines)\n", sidecar.node_id));
            for line in &lines[lines.len().saturating_sub(30)..] {
                all.push_str(line);
                all.push('\n');
            }
        }
        all
    }

    /// `result`, or its error with the sidecars' logs.
    async fn explained<T>(&self, pod: &LabPod, result: anyhow::Result<T>) -> anyhow::Result<T> {
        match result {
            Ok(v) => Ok(v),
            Err(e) => Err(e.context(format!("from {}:\n{}", pod.name, self.logs().await))),
        }
    }

    /// `GET path` at `addr` from inside `pod`; an error carries the sidecars' logs.
    async fn get(
        &self,
        pod: &LabPod,
        addr: impl Into<std::net::SocketAddr>,
        path: &str,
    ) -> anyhow::Result<HttpReply> {
        self.explained(pod, get_from(pod, addr, path).await).await
    }

    /// A GET that must answer 200 from `app`.
    async fn get_ok(
        &self,
        pod: &LabPod,
        addr: impl Into<std::net::SocketAddr>,
        path: &str,
        app: &str,
    ) -> anyhow::Result<HttpReply> {
        let reply = self.get(pod, addr, path).await?;
        self.explained(pod, ok(&reply, app)).await?;
        Ok(reply)
    }

    /// One line over TCP from inside `pod`; an error carries the sidecars' logs.
    async fn tcp(
        &self,
        pod: &LabPod,
        addr: impl Into<std::net::SocketAddr>,
        line: &str,
    ) -> anyhow::Result<String> {
        self.explained(pod, tcp_from(pod, addr, line).await).await
    }
}

/// `GET path` at `addr` from inside `pod`, as an unmodified app (root, not the proxy's
/// uid) does it.
async fn get_from(
    pod: &LabPod,
    addr: impl Into<std::net::SocketAddr>,
    path: &str,
) -> anyhow::Result<HttpReply> {
    let (addr, path) = (addr.into(), path.to_string());
    pod.netns
        .run(async move { http_get(addr, &path).await })
        .await
}

/// One line over TCP to `addr` from inside `pod`; the reply line.
async fn tcp_from(
    pod: &LabPod,
    addr: impl Into<std::net::SocketAddr>,
    line: &str,
) -> anyhow::Result<String> {
    let (addr, line) = (addr.into(), line.to_string());
    pod.netns
        .run(async move { tcp_roundtrip(addr, &line).await })
        .await
}

/// Waits for a line of `sidecar`'s log containing every one of `parts`; returns it.
async fn log_line(sidecar: &Sidecar, parts: &[&str]) -> anyhow::Result<String> {
    eventually("the access log line", WAIT, || async {
        let log = sidecar.log();
        log.lines()
            .find(|l| parts.iter().all(|p| l.contains(p)))
            .map(str::to_string)
            .with_context(|| format!("no line with {parts:?} in {}:\n{log}", sidecar.node_id))
    })
    .await
}

fn ok(reply: &HttpReply, app: &str) -> anyhow::Result<()> {
    ensure!(
        reply.status == 200 && reply.app.as_deref() == Some(app),
        "expected 200 from {app}, got {} from {:?}: {:?}",
        reply.status,
        reply.app,
        reply.body
    );
    Ok(())
}

#[tokio::test]
async fn an_unmodified_client_reaches_http_and_tcp_service_vips_over_mutual_tls()
-> anyhow::Result<()> {
    let shop = shop(&[]).await?;
    let capture = shop.lab.capture_packets().await?;

    shop.get_ok(&shop.client, (shop.web_vip, 80), "/secret-path", "web-1")
        .await?;
    let line = shop
        .tcp(&shop.client, (shop.web_vip, 9000), "secret-line")
        .await?;
    assert_eq!(line, "web-1: secret-line");
    // A plaintext request between pods, which the capture must show: it does see
    // payloads (outside-1 is not in the mesh; open-1 is PERMISSIVE).
    shop.get_ok(
        &shop.outside,
        (shop.open.ip, 8080),
        "/visible-path",
        "open-1",
    )
    .await?;
    // The capture shows plaintext payloads, and has printed all that came before.
    capture.wait_for("GET /visible-path").await?;
    let packets = capture.stop().await?;

    let to_web = format!("> {}.8080:", shop.web.ip);
    let to_web_tcp = format!("> {}.9000:", shop.web.ip);
    let headers: Vec<&str> = packets.lines().filter(|l| l.contains(" IP ")).collect();
    assert!(
        packets.contains(&to_web) && packets.contains(&to_web_tcp),
        "client-1's sidecar connects to web-1's ports 8080 and 9000 over the bridge:\n{}",
        headers.join("\n")
    );
    for secret in ["secret-path", "secret-line"] {
        let seen: Vec<&str> = packets.lines().filter(|l| l.contains(secret)).collect();
        assert!(
            seen.is_empty(),
            "{secret:?} crossed the bridge in plaintext: {seen:?}\npackets:\n{}",
            headers.join("\n")
        );
    }

    // web-1's sidecar terminated mutual TLS from client-1's identity, and handed the
    // request and the connection to the app from loopback.
    log_line(
        &shop.web_sidecar,
        &["inbound \"GET /secret-path ", "peer=", CLIENT_ID],
    )
    .await?;
    log_line(&shop.web_sidecar, &["inbound tcp", CLIENT_ID]).await?;
    let handshakes = shop
        .web_sidecar
        .stat("listener.0.0.0.0_15006.ssl.handshake")
        .await?;
    assert!(
        handshakes >= Some(2),
        "web-1 inbound TLS handshakes: {handshakes:?}"
    );
    for peer in shop
        .apps
        .web
        .peers()
        .iter()
        .chain(&shop.apps.web_tcp.peers())
    {
        assert!(
            peer.ip().is_loopback(),
            "the app is reached by its sidecar only: {peer}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn pod_ips_and_headless_services_go_through_both_sidecars() -> anyhow::Result<()> {
    let shop = shop(&[]).await?;

    // web-1's own address, as an app that looked the pod up would dial it.
    shop.get_ok(&shop.client, (shop.web.ip, 8080), "/by-pod-ip", "web-1")
        .await?;
    log_line(&shop.web_sidecar, &["inbound \"GET /by-pod-ip ", CLIENT_ID]).await?;
    // db is headless: DNS would answer db-1's address.
    let line = shop
        .tcp(&shop.client, (shop.db.ip, 5432), "select 1")
        .await?;
    assert_eq!(line, "db-1: select 1");
    log_line(&shop.db_sidecar, &["inbound tcp", CLIENT_ID]).await?;
    for peer in shop.apps.db.peers() {
        assert!(
            peer.ip().is_loopback(),
            "db-1 is reached by its sidecar only: {peer}"
        );
    }
    // Neither went out in plaintext as a destination outside the mesh.
    let passthrough = shop
        .client_sidecar
        .stat("cluster.PassthroughCluster.upstream_cx_total")
        .await?;
    assert!(
        passthrough.unwrap_or(0) == 0,
        "passed through: {passthrough:?}"
    );
    Ok(())
}

/// How many connections client-1's sidecar passed through to destinations outside the
/// mesh.
async fn passed_through(shop: &Shop) -> anyhow::Result<u64> {
    Ok(shop
        .client_sidecar
        .stat("cluster.PassthroughCluster.upstream_cx_total")
        .await?
        .unwrap_or(0))
}

#[tokio::test]
async fn outside_the_mesh_is_passed_through_under_allow_any_and_exclusions_bypass_envoy()
-> anyhow::Result<()> {
    let shop = shop(&[]).await?;

    shop.get_ok(&shop.client, (shop.outside.ip, 8080), "/", "outside-1")
        .await?;
    let outside = format!("{}:8080", shop.outside.ip);
    log_line(
        &shop.client_sidecar,
        &["outbound tcp", &outside, "not in the mesh: passed through"],
    )
    .await?;
    assert_eq!(passed_through(&shop).await?, 1);

    // Excluded from capture: an outbound port, and outside-2's address. Envoy sees
    // neither.
    shop.get_ok(&shop.client, (shop.outside.ip, 7777), "/", "outside-1-7777")
        .await?;
    shop.get_ok(&shop.client, (shop.outside2.ip, 8080), "/", "outside-2")
        .await?;
    assert_eq!(
        passed_through(&shop).await?,
        1,
        "excluded traffic reached Envoy"
    );
    for app in [&shop.apps.outside_excluded_port, &shop.apps.outside2] {
        assert_eq!(
            app.peers().iter().map(|p| p.ip()).collect::<Vec<_>>(),
            [shop.client.ip],
            "{} sees client-1 itself",
            app.name
        );
    }

    // An inbound port web-1 excludes: outside-1 reaches the app directly (a connection
    // through the sidecar would come from loopback, and STRICT would refuse it).
    shop.get_ok(&shop.outside, (shop.web.ip, 8090), "/", "web-1-excluded")
        .await?;
    assert_eq!(
        shop.apps
            .web_excluded
            .peers()
            .iter()
            .map(|p| p.ip())
            .collect::<Vec<_>>(),
        [shop.outside.ip]
    );
    Ok(())
}

#[tokio::test]
async fn registry_only_refuses_destinations_outside_the_mesh_and_names_the_reason()
-> anyhow::Result<()> {
    let shop = shop(&["--outbound-policy", "registry-only"]).await?;

    let refused = get_from(&shop.client, (shop.outside.ip, 8080), "/").await;
    assert!(refused.is_err(), "reached outside-1: {refused:?}");
    assert_eq!(shop.apps.outside.hits(), 0);
    let outside = format!("{}:8080", shop.outside.ip);
    log_line(
        &shop.client_sidecar,
        &[
            "outbound tcp",
            &outside,
            "not in the mesh: refused (outbound policy registry-only)",
        ],
    )
    .await?;
    // The mesh itself still works, and what is excluded from capture never meets
    // the policy.
    shop.get_ok(&shop.client, (shop.web_vip, 80), "/", "web-1")
        .await?;
    shop.get_ok(&shop.client, (shop.outside.ip, 7777), "/", "outside-1-7777")
        .await?;
    shop.get_ok(&shop.client, (shop.outside2.ip, 8080), "/", "outside-2")
        .await?;
    Ok(())
}

#[tokio::test]
async fn authorization_policy_denials_through_capture_name_their_rule() -> anyhow::Result<()> {
    let shop = shop(&[]).await?;

    shop.get_ok(&shop.client, (shop.web_vip, 80), "/catalog", "web-1")
        .await?;
    let hits = shop.apps.web.hits();
    for addr in [(shop.web_vip, 80), (shop.web.ip, 8080)] {
        let denied = shop.get(&shop.client, addr, "/admin/users").await?;
        assert_eq!(denied.status, 403, "{addr:?}: {denied:?}");
        assert!(
            denied
                .body
                .contains("rbac_access_denied_matched_policy[shop/no-admin#0]"),
            "{addr:?}: the denial names its rule: {:?}",
            denied.body
        );
    }
    assert_eq!(
        shop.apps.web.hits(),
        hits,
        "a denied request reached the app"
    );
    log_line(
        &shop.web_sidecar,
        &["inbound \"GET /admin/users ", "403", CLIENT_ID],
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn plaintext_from_outside_the_mesh_is_refused_by_strict_and_accepted_by_permissive()
-> anyhow::Result<()> {
    let shop = shop(&[]).await?;

    // PERMISSIVE open-1: plaintext on its Service's port and on a port no Service names,
    // both through its sidecar (which hands the unnamed port to the app from 127.0.0.6).
    shop.get_ok(&shop.outside, (shop.open.ip, 8080), "/", "open-1")
        .await?;
    shop.get_ok(&shop.outside, (shop.open.ip, 8091), "/", "open-1-unnamed")
        .await?;
    let via = |app: &HttpApp| app.peers().iter().map(|p| p.ip()).collect::<Vec<_>>();
    assert_eq!(via(&shop.apps.open), [std::net::Ipv4Addr::LOCALHOST]);
    assert_eq!(
        via(&shop.apps.open_unnamed),
        [std::net::Ipv4Addr::new(127, 0, 0, 6)]
    );
    // And mesh clients still get mutual TLS there.
    shop.get_ok(&shop.client, (shop.open_vip, 80), "/from-client", "open-1")
        .await?;
    log_line(
        &shop.open_sidecar,
        &["inbound \"GET /from-client ", CLIENT_ID],
    )
    .await?;

    // STRICT web-1 (its sidecar serves: client-1 reaches it over mTLS) refuses
    // plaintext on its Service's port and on a port no Service names.
    shop.get_ok(&shop.client, (shop.web_vip, 80), "/", "web-1")
        .await?;
    let web_hits = (shop.apps.web.hits(), shop.apps.web_unnamed.hits());
    for port in [8080, 8091] {
        let refused = get_from(&shop.outside, (shop.web.ip, port), "/").await;
        assert!(
            refused.is_err(),
            "plaintext to STRICT web-1:{port} answered: {refused:?}"
        );
    }
    assert_eq!(
        (shop.apps.web.hits(), shop.apps.web_unnamed.hits()),
        web_hits
    );
    Ok(())
}

#[tokio::test]
async fn init_twice_gives_the_same_rules_and_cleanup_leaves_none() -> anyhow::Result<()> {
    let shop = shop(&[]).await?;
    // client-1 has carried traffic through its capture.
    shop.get_ok(&shop.client, (shop.web_vip, 80), "/", "web-1")
        .await?;
    shop.get_ok(&shop.client, (shop.outside.ip, 8080), "/", "outside-1")
        .await?;
    let first = transparent::rules(&shop.client).await?;
    assert!(first.contains("MESHD_OUTPUT"), "{first}");

    transparent::init(&shop.client, &shop.client_def, &[]).await?;
    let second = transparent::rules(&shop.client).await?;
    assert_eq!(first, second, "a second init changed the rules");
    shop.get_ok(&shop.client, (shop.web_vip, 80), "/", "web-1")
        .await?;

    transparent::init(&shop.client, &shop.client_def, &["--cleanup"]).await?;
    let cleaned = transparent::rules(&shop.client).await?;
    assert!(
        !cleaned.contains("MESHD") && !cleaned.lines().any(|l| l.starts_with("-A")),
        "rules left after --cleanup:\n{cleaned}"
    );
    // Nothing reaches Envoy any more: outside-1 is reached directly.
    let before = passed_through(&shop).await?;
    shop.get_ok(&shop.client, (shop.outside.ip, 8080), "/", "outside-1")
        .await?;
    assert_eq!(passed_through(&shop).await?, before);
    Ok(())
}
