//! A pod's egress port through a real Envoy: it reaches the HTTP services of its scope
//! by Host header (or as an HTTP proxy), answers 404 for anything outside the scope,
//! and the sidecar receives the scoped services and no others. A scope change applies
//! live.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, ensure};
use meshd_integration::apps::HttpApp;
use meshd_integration::envoy::Sidecar;
use meshd_integration::mesh::{MeshDir, PodDef, ServiceDef};
use meshd_integration::meshd::Meshd;
use meshd_integration::net::free_port;
use meshd_integration::wait::eventually;
use meshd_integration::{XdsFlavor, init_test_logging};

const WAIT: Duration = Duration::from_secs(15);

/// GET / through the egress port with `host`: (status, the app that answered).
async fn get(egress: SocketAddr, host: &str) -> anyhow::Result<(u16, Option<String>)> {
    let resp = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()?
        .get(format!("http://{egress}/"))
        .header("host", host)
        .send()
        .await
        .with_context(|| format!("GET / (Host: {host}) via {egress}"))?;
    let app = resp
        .headers()
        .get("x-app")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    Ok((resp.status().as_u16(), app))
}

/// The service clusters the sidecar of `workload` should have.
async fn clusters(meshd: &Meshd, workload: &str) -> anyhow::Result<Vec<String>> {
    let config: serde_json::Value = meshd
        .get_json(&format!("/debug/proxy-config?workload={workload}"))
        .await?;
    let cds = config["resources"]["cds"]
        .as_object()
        .context("no cds in proxy-config")?;
    Ok(cds
        .keys()
        .filter(|k| k.starts_with("outbound|"))
        .cloned()
        .collect())
}

#[tokio::test]
async fn the_egress_port_reaches_its_scope_and_nothing_else() -> anyhow::Result<()> {
    init_test_logging();
    let web_app = HttpApp::start("web-1").await?;
    let api_app = HttpApp::start("api-1").await?;
    let web = PodDef::new("shop", "web-1", "web").serves(8080, web_app.port());
    let api = PodDef::new("data", "api-1", "api").serves(9090, api_app.port());
    let port = free_port();
    // No scope of their own: meshd's --default-scope (shop).
    let client = PodDef::new("shop", "client-1", "client").egress(port, None);
    let egress = SocketAddr::from(([127, 0, 0, 1], port));
    let edge_port = free_port();
    let edge = PodDef::new("edge", "gateway-1", "gateway").egress(edge_port, None);
    let dir = MeshDir::new()?;
    dir.write(
        "mesh.yaml",
        &[
            ServiceDef::new("shop", "web").http_port(80, 8080).yaml(),
            ServiceDef::new("data", "api").http_port(8000, 9090).yaml(),
            web.yaml(),
            api.yaml(),
        ],
    )?;
    dir.write("client.yaml", &[client.yaml()])?;
    dir.write("edge.yaml", &[edge.yaml()])?;
    let meshd = Meshd::start_with(dir.path(), &["--default-scope", "shop"]).await?;
    let _web = Sidecar::for_pod(&meshd, &web, XdsFlavor::Delta).await?;
    let _api = Sidecar::for_pod(&meshd, &api, XdsFlavor::Sotw).await?;
    let _client = Sidecar::for_pod(&meshd, &client, XdsFlavor::Delta).await?;
    let _edge = Sidecar::for_pod(&meshd, &edge, XdsFlavor::Sotw).await?;

    eventually("web through the egress port", WAIT, || async {
        let got = get(egress, "web").await?;
        ensure!(got == (200, Some("web-1".into())), "{got:?}");
        Ok(())
    })
    .await?;
    for host in ["web.shop", "web.shop.svc.cluster.local", "web.shop:80"] {
        let got = get(egress, host).await?;
        ensure!(got == (200, Some("web-1".into())), "{host}: {got:?}");
    }
    // Outside the scope: Envoy has no such host, and no cluster for it.
    let got = get(egress, "api.data:8000").await?;
    ensure!(got.0 == 404, "api.data outside the scope answered {got:?}");
    let have = clusters(&meshd, "shop/client-1").await?;
    ensure!(
        have == ["outbound|80||web.shop.svc.cluster.local"],
        "the sidecar has {have:?}"
    );
    // The default scope holds for the edge pod too; there, `web` alone is no name
    // (short names are for the pod's own namespace).
    let edge_egress = SocketAddr::from(([127, 0, 0, 1], edge_port));
    eventually("web.shop from edge", WAIT, || async {
        let got = get(edge_egress, "web.shop").await?;
        ensure!(got == (200, Some("web-1".into())), "{got:?}");
        Ok(())
    })
    .await?;
    ensure!(get(edge_egress, "web").await?.0 == 404);
    ensure!(get(edge_egress, "api.data:8000").await?.0 == 404);

    // A scope of its own, live: now api.data is reachable, also as an HTTP proxy.
    let client = client.egress(port, Some("shop, data/api"));
    dir.write("client.yaml", &[client.yaml()])?;
    eventually("api.data once in scope", WAIT, || async {
        let got = get(egress, "api.data:8000").await?;
        ensure!(got == (200, Some("api-1".into())), "{got:?}");
        Ok(())
    })
    .await?;
    let via_proxy = reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(format!("http://{egress}"))?)
        .timeout(Duration::from_secs(5))
        .build()?
        .get("http://api.data.svc.cluster.local:8000/x")
        .send()
        .await?;
    ensure!(
        via_proxy.status() == 200
            && via_proxy
                .headers()
                .get("x-app")
                .and_then(|v| v.to_str().ok())
                == Some("api-1"),
        "as an HTTP proxy: {via_proxy:?}"
    );
    let have = clusters(&meshd, "shop/client-1").await?;
    ensure!(
        have == [
            "outbound|8000||api.data.svc.cluster.local",
            "outbound|80||web.shop.svc.cluster.local",
        ],
        "the sidecar has {have:?}"
    );
    Ok(())
}
