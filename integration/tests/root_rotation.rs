//! A full root rotation while traffic flows: not one request fails, and at the end the
//! sidecars present certificates from the new root and trust only it.

use std::time::Duration;

use anyhow::{Context, ensure};
use meshd_integration::apps::{HttpApp, Traffic, http_get};
use meshd_integration::envoy::Sidecar;
use meshd_integration::mesh::web_and_client;
use meshd_integration::meshd::Meshd;
use meshd_integration::tls::connect;
use meshd_integration::wait::eventually;
use meshd_integration::xds_client::ClientCert;
use meshd_integration::{XdsFlavor, init_test_logging};

const NS: &str = "shop";

#[tokio::test]
async fn a_root_rotation_under_traffic_fails_no_request() -> anyhow::Result<()> {
    init_test_logging();
    let app = HttpApp::start("web-1").await?;
    let (dir, web, client) = web_and_client(NS, app.port())?;
    let meshd = Meshd::start_with(
        dir.path(),
        &[
            "--debounce",
            "50ms",
            "--workload-cert-ttl",
            "4s",
            "--root-rotation-grace",
            "2s",
        ],
    )
    .await?;
    let _web = Sidecar::for_pod(&meshd, &web, XdsFlavor::Delta).await?;
    let _client = Sidecar::for_pod(&meshd, &client, XdsFlavor::Sotw).await?;
    eventually("traffic", Duration::from_secs(15), || async {
        ensure!(http_get(client.outbound(0), "/").await?.status == 200);
        Ok(())
    })
    .await?;
    let old_root = std::fs::read_to_string(meshd.ca_dir().join("root-cert.pem"))?;

    // Requests in a loop for the whole rotation.
    let traffic = Traffic::start(client.outbound(0));

    let out = meshd.meshctl(&["ca", "rotate-root"]).await?;
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{printed}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(printed.contains("trusting-new-root"), "{printed}");

    let (done, phases) = meshd.wait_rotation_done(Duration::from_secs(30)).await?;
    // Keep traffic going a little past the end.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (sent, failed) = traffic.stop().await;

    assert!(
        phases.contains(&"signing-with-new-root".to_string()),
        "phases seen: {phases:?}"
    );
    assert_eq!(
        done.trusted_roots.len(),
        1,
        "only the new root is trusted at the end"
    );
    assert!(sent > 100, "only {sent} requests during the rotation");
    assert_eq!(
        failed, 0,
        "requests failed during the root rotation (of {sent})"
    );

    // web-1 now presents a certificate from the new root, and the old root is gone.
    let new_root = std::fs::read_to_string(meshd.ca_dir().join("root-cert.pem"))?;
    assert_ne!(new_root, old_root);
    let probe = ClientCert::mint(&meshd.ca_dir(), NS, "client")?;
    assert_eq!(probe.trust_bundle_pem, new_root);
    let (_, server) = connect(web.inbound(8080), &new_root, Some(&probe))
        .await
        .context("web-1's certificate verifies against the new root alone")?;
    assert_eq!(server.uri_sans, ["spiffe://cluster.local/ns/shop/sa/web"]);
    assert!(
        connect(web.inbound(8080), &old_root, Some(&probe))
            .await
            .is_err(),
        "web-1's certificate still verifies against the old root"
    );
    let status = meshd.meshctl(&["ca", "status"]).await?;
    assert!(String::from_utf8_lossy(&status.stdout).contains("last rotation completed"));
    Ok(())
}
