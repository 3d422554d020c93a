//! Explicit capture on one machine: every pod has its own loopback address, and a
//! caller's sidecar connects from it, so a destination's `ipBlocks` tell callers apart.
//! Real Envoy sidecars, a real app, real RBAC.

use std::time::Duration;

use anyhow::{Context, ensure};
use meshd::authz::check::CheckResponse;
use meshd_integration::apps::{HttpApp, http_get};
use meshd_integration::envoy::Sidecar;
use meshd_integration::mesh::{MeshDir, PodDef, ServiceDef};
use meshd_integration::meshd::Meshd;
use meshd_integration::net::free_port;
use meshd_integration::wait::eventually;
use meshd_integration::{XdsFlavor, init_test_logging};

const NS: &str = "shop";
const WAIT: Duration = Duration::from_secs(15);

/// The calling sidecars connected from 127.0.0.1, whatever their pod's IP: an ALLOW by
/// `ipBlocks` admitted every local caller or none. Now `client-1`'s IP is admitted
/// and `other-1`'s refused, over HTTP and TCP, as `meshctl authz check` predicts.
#[tokio::test]
async fn ip_blocks_tell_local_callers_apart() -> anyhow::Result<()> {
    init_test_logging();
    let web_app = HttpApp::start("web-1").await?;
    let db_app = meshd_integration::apps::TcpApp::start("db-1").await?;
    let web = PodDef::new(NS, "web-1", "web").serves(8080, web_app.port());
    let db = PodDef::new(NS, "db-1", "db").serves(5432, db_app.port());
    let caller = |app: &str| {
        PodDef::new(NS, &format!("{app}-1"), app)
            .calls("web", 80, free_port())
            .calls("db", 5432, free_port())
    };
    let (client, other) = (caller("client"), caller("other"));
    let allow = |app: &str, pod: &PodDef| {
        format!(
            "apiVersion: security.meshd.io/v1alpha1\nkind: AuthorizationPolicy\n\
             metadata: {{name: {app}-from-client-ip, namespace: {NS}}}\nspec:\n  \
             selector: {{matchLabels: {{app: {app}}}}}\n  action: ALLOW\n  \
             rules: [{{from: [{{source: {{ipBlocks: [\"{}/32\"]}}}}]}}]\n",
            pod.ip
        )
    };
    let mesh = MeshDir::new()?;
    mesh.write(
        "mesh.yaml",
        &[
            ServiceDef::new(NS, "web").http_port(80, 8080).yaml(),
            ServiceDef::new(NS, "db").tcp_port(5432, 5432).yaml(),
            web.yaml(),
            db.yaml(),
            client.yaml(),
            other.yaml(),
            allow("web", &client),
            allow("db", &client),
        ],
    )?;
    let meshd = Meshd::start(mesh.path()).await?;
    let _sidecars = [
        Sidecar::for_pod(&meshd, &web, XdsFlavor::Delta).await?,
        Sidecar::for_pod(&meshd, &db, XdsFlavor::Sotw).await?,
        Sidecar::for_pod(&meshd, &client, XdsFlavor::Delta).await?,
        Sidecar::for_pod(&meshd, &other, XdsFlavor::Sotw).await?,
    ];

    eventually("client-1 to reach web", WAIT, || async {
        let r = http_get(client.outbound(0), "/").await?;
        ensure!(
            r.status == 200 && r.app.as_deref() == Some("web-1"),
            "{} {}",
            r.status,
            r.body
        );
        Ok(())
    })
    .await?;
    let r = http_get(other.outbound(0), "/").await?;
    ensure!(
        r.status == 403 && r.body.contains("rbac_access_denied_matched_policy[none]"),
        "other-1 got {} {}",
        r.status,
        r.body
    );
    let reply = meshd_integration::apps::tcp_roundtrip(client.outbound(1), "hi")
        .await
        .context("client-1 to db")?;
    ensure!(reply.contains("db-1"), "{reply}");
    ensure!(
        meshd_integration::apps::tcp_roundtrip(other.outbound(1), "hi")
            .await
            .is_err(),
        "other-1 reached db"
    );

    // meshctl authz check, given each caller's IP, agrees.
    for (pod, allowed) in [(&client, true), (&other, false)] {
        let from = format!("{NS}/{}", pod.service_account);
        let ip = pod.ip.to_string();
        let out = meshd
            .meshctl(&[
                "authz",
                "check",
                "--from-sa",
                &from,
                "--source-ip",
                &ip,
                "--to",
                "shop/web:80",
                "-o",
                "json",
            ])
            .await?;
        ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let resp: CheckResponse = serde_json::from_slice(&out.stdout)?;
        ensure!(resp.allowed == allowed, "{}: {resp:?}", pod.name);
    }
    Ok(())
}
