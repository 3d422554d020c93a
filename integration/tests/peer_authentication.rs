//! PeerAuthentication with real sidecars: PERMISSIVE takes mTLS and plaintext on one
//! port, DISABLE takes plaintext and callers' sidecars follow, port-level settings
//! override the workload's, and a change applies live.

use std::time::Duration;

use anyhow::ensure;
use meshd_integration::apps::{HttpApp, http_get};
use meshd_integration::envoy::Sidecar;
use meshd_integration::mesh::{MeshDir, PodDef, ServiceDef};
use meshd_integration::meshd::Meshd;
use meshd_integration::net::free_port;
use meshd_integration::tls::{connect, raw_http_get};
use meshd_integration::wait::eventually;
use meshd_integration::xds_client::ClientCert;
use meshd_integration::{XdsFlavor, init_test_logging};

const NS: &str = "shop";
const WAIT: Duration = Duration::from_secs(15);

fn policy(name: &str, selector_app: Option<&str>, mode: &str, ports: &[(u16, &str)]) -> String {
    let mut s = format!(
        "apiVersion: security.meshd.io/v1alpha1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {NS}}}\nspec:\n  mtls: {{mode: {mode}}}\n"
    );
    if let Some(app) = selector_app {
        s.push_str(&format!("  selector: {{matchLabels: {{app: {app}}}}}\n"));
    }
    if !ports.is_empty() {
        s.push_str("  portLevelMtls:\n");
        for (p, m) in ports {
            s.push_str(&format!("    \"{p}\": {{mode: {m}}}\n"));
        }
    }
    s
}

struct Fixture {
    dir: MeshDir,
    meshd: Meshd,
    web: PodDef,
    client: PodDef,
    _apps: Vec<HttpApp>,
    _sidecars: Vec<Sidecar>,
}

/// web-1 serves two HTTP ports (8080 behind web:80, 9090 behind admin:90); client-1
/// calls both. `policies` is written before meshd starts.
async fn fixture(policies: &[String]) -> anyhow::Result<Fixture> {
    init_test_logging();
    let a = HttpApp::start("web-1").await?;
    let b = HttpApp::start("web-1-admin").await?;
    let web = PodDef::new(NS, "web-1", "web")
        .serves(8080, a.port())
        .serves(9090, b.port());
    let client = PodDef::new(NS, "client-1", "client")
        .calls("web", 80, free_port())
        .calls("admin", 90, free_port());
    let dir = MeshDir::new()?;
    let mut admin = ServiceDef::new(NS, "admin").http_port(90, 9090);
    admin.selector_app = "web".into();
    dir.write(
        "mesh.yaml",
        &[
            ServiceDef::new(NS, "web").http_port(80, 8080).yaml(),
            admin.yaml(),
            web.yaml(),
            client.yaml(),
        ],
    )?;
    if !policies.is_empty() {
        dir.write("policies.yaml", policies)?;
    }
    let meshd = Meshd::start(dir.path()).await?;
    let sidecars = vec![
        Sidecar::for_pod(&meshd, &web, XdsFlavor::Delta).await?,
        Sidecar::for_pod(&meshd, &client, XdsFlavor::Delta).await?,
    ];
    Ok(Fixture {
        dir,
        meshd,
        web,
        client,
        _apps: vec![a, b],
        _sidecars: sidecars,
    })
}

impl Fixture {
    /// Whether plaintext HTTP straight to web-1's `port` gets a 200.
    async fn plaintext_ok(&self, port: u16) -> bool {
        let Ok(mut tcp) = tokio::net::TcpStream::connect(self.web.inbound(port)).await else {
            return false;
        };
        raw_http_get(&mut tcp)
            .await
            .unwrap_or_default()
            .starts_with("HTTP/1.1 200")
    }

    /// Whether mTLS with a mesh certificate to web-1's `port` gets a 200.
    async fn mtls_ok(&self, port: u16) -> bool {
        let Ok(cert) = ClientCert::mint(&self.meshd.ca_dir(), NS, "client") else {
            return false;
        };
        match connect(self.web.inbound(port), &cert.trust_bundle_pem, Some(&cert)).await {
            Ok((mut tls, _)) => raw_http_get(&mut tls)
                .await
                .unwrap_or_default()
                .starts_with("HTTP/1.1 200"),
            Err(_) => false,
        }
    }

    /// Whether client-1's sidecar reaches upstream `i`.
    async fn via_client_ok(&self, i: usize) -> bool {
        http_get(self.client.outbound(i), "/")
            .await
            .is_ok_and(|r| r.status == 200)
    }

    async fn expect(
        &self,
        what: &str,
        port: u16,
        plaintext: bool,
        mtls: bool,
    ) -> anyhow::Result<()> {
        eventually(what, WAIT, || async {
            let (p, m) = (self.plaintext_ok(port).await, self.mtls_ok(port).await);
            ensure!(
                p == plaintext && m == mtls,
                "port {port}: plaintext {p}, mTLS {m}"
            );
            Ok(())
        })
        .await
    }
}

#[tokio::test]
async fn permissive_takes_mtls_and_plaintext_on_one_port() -> anyhow::Result<()> {
    let f = fixture(&[policy("web", Some("web"), "PERMISSIVE", &[])]).await?;
    f.expect("PERMISSIVE on 8080", 8080, true, true).await?;
    assert!(
        f.via_client_ok(0).await,
        "mesh callers use mTLS and still get through"
    );
    Ok(())
}

#[tokio::test]
async fn disable_takes_plaintext_and_mesh_callers_follow() -> anyhow::Result<()> {
    let f = fixture(&[policy("web", Some("web"), "DISABLE", &[])]).await?;
    f.expect("DISABLE on 8080", 8080, true, false).await?;
    eventually("client-1 to reach a DISABLE port", WAIT, || async {
        ensure!(f.via_client_ok(0).await, "client-1 cannot reach web");
        Ok(())
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn port_level_settings_win_and_changes_apply_live() -> anyhow::Result<()> {
    let f = fixture(&[policy(
        "web",
        Some("web"),
        "STRICT",
        &[(9090, "PERMISSIVE")],
    )])
    .await?;
    f.expect("STRICT on 8080", 8080, false, true).await?;
    f.expect("port-level PERMISSIVE on 9090", 9090, true, true)
        .await?;

    // Removing the policy: back to the mesh default, STRICT, with no restart.
    f.dir.remove("policies.yaml")?;
    f.expect("default STRICT on 9090", 9090, false, true)
        .await?;

    // A namespace-wide PERMISSIVE opens both ports to plaintext.
    f.dir.write(
        "policies.yaml",
        &[policy("default", None, "PERMISSIVE", &[])],
    )?;
    f.expect("namespace PERMISSIVE on 8080", 8080, true, true)
        .await?;
    f.expect("namespace PERMISSIVE on 9090", 9090, true, true)
        .await?;
    assert!(f.via_client_ok(0).await && f.via_client_ok(1).await);

    // A policy with a bad mode is reported and the previous one keeps applying.
    f.dir
        .write("policies.yaml", &[policy("default", None, "LOOSE", &[])])?;
    eventually("the bad policy to be reported", WAIT, || async {
        let errs = f.meshd.snapshot().await?.config_errors;
        ensure!(
            errs.iter()
                .any(|e| e.contains("spec.mtls.mode") && e.contains("\"LOOSE\"")),
            "{errs:?}"
        );
        Ok(())
    })
    .await?;
    f.expect("the last good policy still applies", 8080, true, true)
        .await?;
    Ok(())
}
