//! AuthorizationPolicy enforced by real sidecars: who may call, which paths, DENY over
//! ALLOW, TCP, live changes — and denials that name the rule that denied them.

use std::time::Duration;

use anyhow::ensure;
use meshd_integration::apps::{HttpApp, TcpApp, tcp_roundtrip};
use meshd_integration::envoy::Sidecar;
use meshd_integration::mesh::{MeshDir, PodDef, ServiceDef};
use meshd_integration::meshd::Meshd;
use meshd_integration::net::free_port;
use meshd_integration::wait::eventually;
use meshd_integration::{XdsFlavor, init_test_logging};

const NS: &str = "shop";
const WAIT: Duration = Duration::from_secs(15);

struct Mesh {
    dir: MeshDir,
    meshd: Meshd,
    client: PodDef,
    other: PodDef,
    _apps: (HttpApp, TcpApp),
    _sidecars: Vec<Sidecar>,
}

async fn mesh() -> anyhow::Result<Mesh> {
    init_test_logging();
    let web_app = HttpApp::start("web-1").await?;
    let db_app = TcpApp::start("db-1").await?;
    let web = PodDef::new(NS, "web-1", "web").serves(8080, web_app.port());
    let db = PodDef::new(NS, "db-1", "db").serves(5432, db_app.port());
    let client = PodDef::new(NS, "client-1", "client")
        .calls("web", 80, free_port())
        .calls("db", 5432, free_port());
    let other = PodDef::new(NS, "other-1", "other")
        .calls("web", 80, free_port())
        .calls("db", 5432, free_port());
    let dir = MeshDir::new()?;
    dir.write(
        "mesh.yaml",
        &[
            ServiceDef::new(NS, "web").http_port(80, 8080).yaml(),
            ServiceDef::new(NS, "db").tcp_port(5432, 5432).yaml(),
            web.yaml(),
            db.yaml(),
            client.yaml(),
            other.yaml(),
        ],
    )?;
    let meshd = Meshd::start(dir.path()).await?;
    let mut sidecars = Vec::new();
    for pod in [&web, &db, &client, &other] {
        sidecars.push(Sidecar::for_pod(&meshd, pod, XdsFlavor::Delta).await?);
    }
    Ok(Mesh {
        dir,
        meshd,
        client,
        other,
        _apps: (web_app, db_app),
        _sidecars: sidecars,
    })
}

/// (status, x-meshd-denied-by, body) of a GET from `pod` to web.
async fn get(pod: &PodDef, path: &str) -> anyhow::Result<(u16, String, String)> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()?;
    let resp = client
        .get(format!("http://{}{path}", pod.outbound(0)))
        .send()
        .await?;
    let status = resp.status().as_u16();
    let denied_by = resp
        .headers()
        .get("x-meshd-denied-by")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    Ok((status, denied_by, resp.text().await?))
}

async fn expect_http(pod: &PodDef, path: &str, status: u16, denied_by: &str) -> anyhow::Result<()> {
    eventually(
        &format!("{} GET {path} → {status}", pod.name),
        WAIT,
        || async {
            let (s, by, body) = get(pod, path).await?;
            ensure!(
                s == status && by.contains(denied_by),
                "got {s} denied-by {by:?} body {body:?}"
            );
            if status == 403 {
                ensure!(
                    body.contains(denied_by),
                    "the body does not name the rule: {body:?}"
                );
            }
            Ok(())
        },
    )
    .await
}

async fn expect_tcp(pod: &PodDef, allowed: bool) -> anyhow::Result<()> {
    eventually(
        &format!("{} TCP allowed={allowed}", pod.name),
        WAIT,
        || async {
            let r = tcp_roundtrip(pod.outbound(1), "hi").await;
            ensure!(r.is_ok() == allowed, "got {r:?}");
            Ok(())
        },
    )
    .await
}

fn policy(name: &str, app: &str, action: &str, rules: &str) -> String {
    format!(
        "apiVersion: security.meshd.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {NS}}}\nspec:\n  selector: {{matchLabels: {{app: {app}}}}}\n  action: {action}\n  rules:\n{rules}"
    )
}

#[tokio::test]
async fn policies_allow_deny_and_explain_over_http_and_tcp() -> anyhow::Result<()> {
    let m = mesh().await?;
    // No policy: everything is allowed.
    expect_http(&m.client, "/", 200, "").await?;
    expect_http(&m.other, "/", 200, "").await?;
    expect_tcp(&m.other, true).await?;

    // ALLOW by principal: the other caller no longer matches any ALLOW rule.
    m.dir.write(
        "authz.yaml",
        &[policy(
            "web-callers",
            "web",
            "ALLOW",
            "    - from: [{source: {principals: [\"cluster.local/ns/shop/sa/client\"]}}]\n",
        )],
    )?;
    expect_http(&m.client, "/", 200, "").await?;
    expect_http(&m.other, "/", 403, "[none]").await?;

    // DENY wins over ALLOW and names its rule.
    m.dir.write(
        "authz.yaml",
        &[
            policy(
                "web-callers",
                "web",
                "ALLOW",
                "    - from: [{source: {principals: [\"cluster.local/ns/shop/sa/client\"]}}]\n",
            ),
            policy(
                "no-admin",
                "web",
                "DENY",
                "    - to: [{operation: {paths: [\"/admin*\"]}}]\n",
            ),
        ],
    )?;
    expect_http(&m.client, "/admin/users", 403, "shop/no-admin#0").await?;
    expect_http(&m.client, "/shop", 200, "").await?;

    // TCP: an ALLOW rule by namespace + principal.
    m.dir.write(
        "authz-db.yaml",
        &[policy(
            "db-callers",
            "db",
            "ALLOW",
            "    - from: [{source: {namespaces: [shop], principals: [\"*/sa/client\"]}}]\n",
        )],
    )?;
    expect_tcp(&m.client, true).await?;
    expect_tcp(&m.other, false).await?;

    // Removing the policies restores the default, live.
    m.dir.remove("authz.yaml")?;
    m.dir.remove("authz-db.yaml")?;
    expect_http(&m.other, "/admin", 200, "").await?;
    expect_tcp(&m.other, true).await?;

    // An invalid policy is rejected with the field named, and nothing of it applies.
    m.dir.write(
        "bad.yaml",
        &[policy(
            "bad",
            "web",
            "DENY",
            "    - from: [{source: {ipBlocks: [\"10.0.0.0/33\"]}}]\n",
        )],
    )?;
    eventually("the bad policy to be reported", WAIT, || async {
        let errs = m.meshd.snapshot().await?.config_errors;
        ensure!(
            errs.iter()
                .any(|e| e.contains("spec.rules[0].from[0].source.ipBlocks[0]")),
            "{errs:?}"
        );
        Ok(())
    })
    .await?;
    expect_http(&m.other, "/", 200, "").await?;
    Ok(())
}
