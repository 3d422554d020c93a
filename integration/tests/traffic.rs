//! Real traffic through real Envoy sidecars configured by meshd from a config directory:
//! client app → its sidecar → server's sidecar → server app, for HTTP and TCP, over
//! both SotW and delta xDS, with the mesh changing underneath.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, ensure};
use meshd_integration::apps::{HttpApp, TcpApp, answering_apps, http_get, tcp_roundtrip};
use meshd_integration::envoy::Sidecar;
use meshd_integration::mesh::{MeshDir, PodDef, ServiceDef};
use meshd_integration::meshd::Meshd;
use meshd_integration::net::free_port;
use meshd_integration::wait::eventually;
use meshd_integration::{XdsFlavor, init_test_logging};

const NS: &str = "shop";
const WAIT: Duration = Duration::from_secs(15);

async fn http_and_tcp_flow(flavor: XdsFlavor) -> anyhow::Result<()> {
    init_test_logging();
    let web_app = HttpApp::start("web-1").await?;
    let db_app = TcpApp::start("db-1").await?;
    let web = PodDef::new(NS, "web-1", "web").serves(8080, web_app.port());
    let db = PodDef::new(NS, "db-1", "db").serves(5432, db_app.port());
    let client = PodDef::new(NS, "client-1", "client")
        .calls("web", 80, free_port())
        .calls("db", 5432, free_port());
    let mesh = MeshDir::new()?;
    mesh.write(
        "mesh.yaml",
        &[
            ServiceDef::new(NS, "web").http_port(80, 8080).yaml(),
            ServiceDef::new(NS, "db").tcp_port(5432, 5432).yaml(),
            web.yaml(),
            db.yaml(),
            client.yaml(),
        ],
    )?;
    let meshd = Meshd::start(mesh.path()).await?;
    let web_sidecar = Sidecar::for_pod(&meshd, &web, flavor).await?;
    let db_sidecar = Sidecar::for_pod(&meshd, &db, flavor).await?;
    let _client_sidecar = Sidecar::for_pod(&meshd, &client, flavor).await?;

    let reply = eventually("HTTP through both sidecars", WAIT, || async {
        let r = http_get(client.outbound(0), "/hello").await?;
        ensure!(r.status == 200, "status {}: {}", r.status, r.body);
        Ok(r)
    })
    .await?;
    assert_eq!(reply.app.as_deref(), Some("web-1"));
    assert_eq!(reply.body, "web-1 (via proxy)\n");

    let line = eventually("TCP through both sidecars", WAIT, || async {
        tcp_roundtrip(client.outbound(1), "ping").await
    })
    .await?;
    assert_eq!(line, "db-1: ping");

    // The requests really crossed the server-side sidecars, not just the client's.
    let inbound_http = web_sidecar
        .stat("cluster.inbound|8080||.upstream_rq_total")
        .await?;
    assert!(
        inbound_http >= Some(1),
        "web-1's sidecar saw {inbound_http:?} requests"
    );
    let inbound_tcp = db_sidecar
        .stat("cluster.inbound|5432||.upstream_cx_total")
        .await?;
    assert!(
        inbound_tcp >= Some(1),
        "db-1's sidecar saw {inbound_tcp:?} connections"
    );
    assert!(web_app.hits() >= 1 && db_app.connections() >= 1);

    // meshd reports every proxy in sync with the flavour it asked for.
    let snap = meshd.snapshot().await?;
    for node in ["web-1.shop", "db-1.shop", "client-1.shop"] {
        let status = meshd.wait_synced(node, snap.version).await?;
        assert_eq!(status.flavor, flavor);
    }
    Ok(())
}

#[tokio::test]
async fn http_and_tcp_flow_through_sidecars_over_sotw() -> anyhow::Result<()> {
    http_and_tcp_flow(XdsFlavor::Sotw).await
}

#[tokio::test]
async fn http_and_tcp_flow_through_sidecars_over_delta() -> anyhow::Result<()> {
    http_and_tcp_flow(XdsFlavor::Delta).await
}

/// Endpoints and services come and go by editing files; nothing restarts.
async fn mesh_changes_live(flavor: XdsFlavor) -> anyhow::Result<()> {
    init_test_logging();
    let app1 = HttpApp::start("web-1").await?;
    let app2 = HttpApp::start("web-2").await?;
    let api_app = TcpApp::start("api-1").await?;
    let web1 = PodDef::new(NS, "web-1", "web").serves(8080, app1.port());
    let web2 = PodDef::new(NS, "web-2", "web").serves(8080, app2.port());
    let api1 = PodDef::new(NS, "api-1", "api").serves(9000, api_app.port());
    let client = PodDef::new(NS, "client-1", "client").calls("web", 80, free_port());

    let mesh = MeshDir::new()?;
    mesh.write(
        "web.yaml",
        &[
            ServiceDef::new(NS, "web").http_port(80, 8080).yaml(),
            web1.yaml(),
        ],
    )?;
    mesh.write("client.yaml", &[client.yaml()])?;
    let meshd = Meshd::start(mesh.path()).await?;
    let _s1 = Sidecar::for_pod(&meshd, &web1, flavor).await?;
    let client_sidecar = Sidecar::for_pod(&meshd, &client, flavor).await?;
    let only_web1 = eventually("web-1 to answer", WAIT, || {
        answering_apps(client.outbound(0), 1)
    })
    .await?;
    assert_eq!(only_web1, BTreeSet::from(["web-1".to_string()]));

    // A new endpoint file: web-2 starts receiving traffic.
    let _s2 = Sidecar::for_pod(&meshd, &web2, flavor).await?;
    mesh.write("web-2.yaml", &[web2.yaml()])?;
    eventually("web-2 to receive traffic", WAIT, || async {
        let seen = answering_apps(client.outbound(0), 20).await?;
        ensure!(seen.len() == 2, "only {seen:?} answered");
        Ok(())
    })
    .await?;

    // Removing it stops the traffic to it.
    let before = meshd.snapshot().await?.version;
    mesh.remove("web-2.yaml")?;
    let after = meshd.wait_snapshot_after(before).await?;
    meshd
        .wait_synced(&client_sidecar.node_id, after.version)
        .await?;
    let hits_before = app2.hits();
    let seen = answering_apps(client.outbound(0), 20).await?;
    assert_eq!(seen, BTreeSet::from(["web-1".to_string()]));
    assert_eq!(
        app2.hits(),
        hits_before,
        "web-2 got traffic after it was removed"
    );

    // A new service, and the client starts calling it: reachable without restarts.
    let api_port = free_port();
    let client = client.calls("api", 9000, api_port);
    let _s3 = Sidecar::for_pod(&meshd, &api1, flavor).await?;
    mesh.write(
        "api.yaml",
        &[
            ServiceDef::new(NS, "api").tcp_port(9000, 9000).yaml(),
            api1.yaml(),
        ],
    )?;
    mesh.write("client.yaml", &[client.yaml()])?;
    let line = eventually("the new service to answer", WAIT, || async {
        tcp_roundtrip(client.outbound(1), "hi").await
    })
    .await?;
    assert_eq!(line, "api-1: hi");

    // The old route still works, on the same Envoy process that was started first.
    assert_eq!(answering_apps(client.outbound(0), 3).await?.len(), 1);
    assert!(client_sidecar.admin("/ready").await?.contains("LIVE"));
    Ok(())
}

#[tokio::test]
async fn mesh_changes_reach_envoy_live_over_sotw() -> anyhow::Result<()> {
    mesh_changes_live(XdsFlavor::Sotw).await
}

#[tokio::test]
async fn mesh_changes_reach_envoy_live_over_delta() -> anyhow::Result<()> {
    mesh_changes_live(XdsFlavor::Delta).await
}

/// A broken file is reported, and the mesh keeps serving the last good state.
#[tokio::test]
async fn a_broken_file_keeps_traffic_flowing_and_is_reported() -> anyhow::Result<()> {
    init_test_logging();
    let app = HttpApp::start("web-1").await?;
    let web1 = PodDef::new(NS, "web-1", "web").serves(8080, app.port());
    let client = PodDef::new(NS, "client-1", "client").calls("web", 80, free_port());
    let service = ServiceDef::new(NS, "web").http_port(80, 8080).yaml();
    let mesh = MeshDir::new()?;
    mesh.write("web.yaml", &[service.clone(), web1.yaml()])?;
    mesh.write("client.yaml", &[client.yaml()])?;
    let meshd = Meshd::start(mesh.path()).await?;
    let _web = Sidecar::for_pod(&meshd, &web1, XdsFlavor::Delta).await?;
    let client_sidecar = Sidecar::for_pod(&meshd, &client, XdsFlavor::Delta).await?;
    eventually("traffic", WAIT, || answering_apps(client.outbound(0), 1)).await?;

    // A wrong field in the web service, and a file that is not YAML at all.
    mesh.write(
        "web.yaml",
        &[service.replace("port: 80", "port: eighty"), web1.yaml()],
    )?;
    mesh.write_raw("junk.yaml", "kind: [this is not closed\n")?;
    let errors = eventually("meshd to report both errors", WAIT, || async {
        let errs = meshd.snapshot().await?.config_errors;
        ensure!(errs.len() == 2, "errors so far: {errs:?}");
        Ok(errs)
    })
    .await?;
    let web_err = errors
        .iter()
        .find(|e| e.contains("web.yaml"))
        .context("web.yaml error")?;
    assert!(
        web_err.contains("document 1 (Service shop/web): spec.ports[0].port:"),
        "{web_err}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.contains("junk.yaml") && e.contains("not valid YAML"))
    );
    assert!(
        meshd.log().contains("spec.ports[0].port"),
        "the error is logged"
    );
    let status = meshd.meshctl(&["status"]).await?;
    let printed = String::from_utf8_lossy(&status.stdout);
    assert!(
        printed.contains("config error:") && printed.contains("web.yaml"),
        "{printed}"
    );

    // Traffic still flows on the last good config, and the proxy was not disturbed.
    for _ in 0..10 {
        assert_eq!(answering_apps(client.outbound(0), 1).await?.len(), 1);
    }
    let snap = meshd.snapshot().await?;
    meshd
        .wait_synced(&client_sidecar.node_id, snap.version)
        .await?;

    // Fixing the files clears the errors.
    mesh.write("web.yaml", &[service, web1.yaml()])?;
    mesh.remove("junk.yaml")?;
    eventually("errors to clear", WAIT, || async {
        let errs = meshd.snapshot().await?.config_errors;
        ensure!(errs.is_empty(), "still {errs:?}");
        Ok(())
    })
    .await?;
    Ok(())
}

/// Endpoints can also come from EndpointSlices (a service without a selector), and an
/// endpoint that turns not-ready stops receiving traffic.
#[tokio::test]
async fn endpoint_slices_drive_endpoints_and_readiness() -> anyhow::Result<()> {
    init_test_logging();
    let app = HttpApp::start("web-1").await?;
    let web1 = PodDef::new(NS, "web-1", "web").serves(8080, app.port());
    let client = PodDef::new(NS, "client-1", "client").calls("web", 80, free_port());
    let service = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
                   spec:\n  ports: [{name: http, port: 80, targetPort: 8080}]\n";
    let slice = |ready: bool| {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-abc\n  \
             namespace: shop\n  labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\n\
             ports: [{{name: http, port: 8080}}]\nendpoints:\n  - addresses: [\"{}\"]\n    \
             conditions: {{ready: {ready}}}\n    targetRef: {{kind: Pod, name: web-1}}\n",
            web1.ip
        )
    };
    let mesh = MeshDir::new()?;
    mesh.write("web.yaml", &[service.to_string(), web1.yaml(), slice(true)])?;
    mesh.write("client.yaml", &[client.yaml()])?;
    let meshd = Meshd::start(mesh.path()).await?;
    let _web = Sidecar::for_pod(&meshd, &web1, XdsFlavor::Delta).await?;
    let client_sidecar = Sidecar::for_pod(&meshd, &client, XdsFlavor::Delta).await?;
    let seen = eventually("traffic via the slice", WAIT, || {
        answering_apps(client.outbound(0), 1)
    })
    .await?;
    assert_eq!(seen, BTreeSet::from(["web-1".to_string()]));

    let before = meshd.snapshot().await?.version;
    mesh.write(
        "web.yaml",
        &[service.to_string(), web1.yaml(), slice(false)],
    )?;
    let after = meshd.wait_snapshot_after(before).await?;
    meshd
        .wait_synced(&client_sidecar.node_id, after.version)
        .await?;
    let reply = http_get(client.outbound(0), "/").await?;
    assert_eq!(
        reply.status, 503,
        "a not-ready endpoint got traffic: {reply:?}"
    );
    Ok(())
}
