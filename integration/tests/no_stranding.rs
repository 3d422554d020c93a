//! Workload identity in a cluster, end to end, and nothing strands a sidecar.
//!
//! Pods get their identity from pod-bound tokens through meshd-agent (token mode, the
//! trust bundle from the namespace's `meshd-trust-bundle` ConfigMap), against a real API
//! server, and carry mTLS traffic. Then, with short certificates, what used to leave
//! sidecars unable to reach meshd — an Envoy restarted during a root rotation, meshd
//! restarted after one, a bootstrap certificate past its expiry — is done at every
//! step, with traffic checked across each meshd restart (zero failed requests: the data
//! plane does not need meshd to carry on) and after each sidecar restart (it comes back
//! with its full config).

use std::time::Duration;

use anyhow::{Context, ensure};
use meshd::identity::RotationStatus;
use meshd_integration::apps::{HttpApp, Traffic, http_get};
use meshd_integration::envoy::{Sidecar, SidecarIdentity, SidecarOptions};
use meshd_integration::kube_api::KubeApi;
use meshd_integration::kube_shop::Shop;
use meshd_integration::mesh::web_and_client;
use meshd_integration::meshd::Meshd;
use meshd_integration::wait::eventually;
use meshd_integration::{XdsFlavor, init_test_logging};
use x509_parser::prelude::{FromDer, X509Certificate};

const WAIT: Duration = Duration::from_secs(30);
const WEB_ID: &str = "spiffe://cluster.local/ns/shop/sa/web";

async fn wait_ok(addr: std::net::SocketAddr, what: &str) -> anyhow::Result<()> {
    eventually(what, WAIT, || async {
        let r = http_get(addr, "/").await?;
        ensure!(r.status == 200, "status {}: {}", r.status, r.body);
        Ok(())
    })
    .await
}

/// Restarts meshd (kill -9) under `traffic` and requires that no request failed
/// meanwhile, and that every proxy is back.
async fn restart_meshd(meshd: &mut Meshd, traffic: &Traffic, proxies: usize) -> anyhow::Result<()> {
    let (_, failed_before) = traffic.counts();
    meshd.kill_and_restart().await?;
    eventually(
        "every proxy reconnected to the restarted meshd",
        WAIT,
        || async {
            let connected = meshd.proxies().await?.len();
            ensure!(connected == proxies, "{connected} of {proxies} proxies");
            Ok(())
        },
    )
    .await?;
    let (sent, failed) = traffic.counts();
    ensure!(
        failed == failed_before,
        "{} requests failed across the meshd restart ({sent} sent in all)",
        failed - failed_before
    );
    Ok(())
}

async fn wait_phase(meshd: &Meshd, phase: &str) -> anyhow::Result<RotationStatus> {
    eventually(&format!("rotation phase {phase}"), WAIT, || async {
        let s: RotationStatus = meshd.get_json("/ca/status").await?;
        ensure!(s.phase == phase, "at {}", s.phase);
        Ok(s)
    })
    .await
}

/// The leaf of the agent's xDS client certificate: (SPIFFE id, serial hex, public key).
fn agent_certificate(sidecar: &Sidecar) -> anyhow::Result<(String, String, Vec<u8>)> {
    let certs = sidecar.agent_dir().join("certs");
    let chain = std::fs::read_to_string(certs.join("cert-chain.pem"))?;
    let der = pem::parse_many(&chain)?
        .into_iter()
        .next()
        .context("empty chain")?
        .into_contents();
    let (_, cert) = X509Certificate::from_der(&der).map_err(|e| anyhow::anyhow!("{e}"))?;
    let serial = cert
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(certs.join("key.pem"))?)?;
    ensure!(
        key.public_key_raw() == cert.public_key().subject_public_key.data.as_ref(),
        "the key beside the certificate is not its key"
    );
    Ok((
        meshd_ca::leaf_uri(&der).map_err(anyhow::Error::msg)?,
        serial,
        key.public_key_raw().to_vec(),
    ))
}

/// Whether the agent's xDS client certificate was signed by `root_pem`'s key.
fn signed_by(sidecar: &Sidecar, root_pem: &str) -> anyhow::Result<bool> {
    let chain = std::fs::read_to_string(sidecar.agent_dir().join("certs/cert-chain.pem"))?;
    let leaf = pem::parse_many(&chain)?
        .into_iter()
        .next()
        .context("empty chain")?;
    let root = pem::parse(root_pem)?;
    let (_, leaf) =
        X509Certificate::from_der(leaf.contents()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (_, root) =
        X509Certificate::from_der(root.contents()).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(leaf.verify_signature(Some(root.public_key())).is_ok())
}

#[tokio::test]
async fn pods_get_their_identity_from_tokens_and_carry_mtls_traffic() -> anyhow::Result<()> {
    init_test_logging();
    let api = KubeApi::start().await?;
    let shop = Shop::new().await?;
    shop.create(&api, true).await?;
    let meshd = Meshd::start_kubernetes(&api, &[]).await?;
    let tokens = tempfile::tempdir()?;
    let sidecars = shop.token_sidecars(&api, &meshd, tokens.path()).await?;
    wait_ok(shop.outbound(), "client-1 → web-1 through both sidecars").await?;

    // The certificate web-1's Envoy presents to meshd: the agent's, for web's SPIFFE
    // id, signed for the agent's CSR with the pod's token — meshd never had its key.
    let (id, serial, _) = agent_certificate(&sidecars[0])?;
    assert_eq!(id, WEB_ID);
    let log = meshd.log();
    let line = log
        .lines()
        .find(|l| l.contains(&format!("serial={serial}")))
        .with_context(|| format!("meshd did not log certificate {serial}"))?;
    assert!(
        line.contains("signed a workload certificate (ServiceAccount token)")
            && line.contains("pod=shop/web-1"),
        "{line}"
    );
    let envoy_certs = sidecars[0].admin("/certs").await?;
    assert!(
        envoy_certs.contains(serial.trim_start_matches('0')),
        "Envoy does not hold certificate {serial}: {envoy_certs}"
    );
    for sidecar in &sidecars {
        let (status, body) = sidecar.health("/healthz/ready").await?;
        assert_eq!(status, 200, "{body}");
    }
    Ok(())
}

#[tokio::test]
async fn a_root_rotation_with_restarts_at_every_step_strands_no_sidecar() -> anyhow::Result<()> {
    init_test_logging();
    let api = KubeApi::start().await?;
    let shop = Shop::new().await?;
    shop.create(&api, true).await?;
    let mut meshd = Meshd::start_kubernetes(
        &api,
        &[
            "--workload-cert-ttl",
            "12s",
            "--root-rotation-grace",
            "10s",
            "--lease-duration",
            "2s",
        ],
    )
    .await?;
    let tokens = tempfile::tempdir()?;
    let mut sidecars = shop.token_sidecars(&api, &meshd, tokens.path()).await?;
    wait_ok(shop.outbound(), "traffic before the rotation").await?;
    let (_, old_serial, _) = agent_certificate(&sidecars[1])?;
    let traffic = Traffic::start(shop.outbound());

    let out = meshd.meshctl(&["ca", "rotate-root"]).await?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Each step: meshd restarts, then the client's sidecar restarts (the kubelet
    // restarting the container: agent and Envoy, the emptyDir kept) and must come back.
    for (step, phase) in [(1, "trusting-new-root"), (2, "signing-with-new-root")] {
        wait_phase(&meshd, phase).await?;
        restart_meshd(&mut meshd, &traffic, 2).await?;
        sidecars[1]
            .restart()
            .await
            .with_context(|| format!("the client's sidecar after a restart in step {step}"))?;
        wait_ok(
            shop.outbound(),
            &format!("traffic after the restarts in step {step}"),
        )
        .await?;
    }
    // The agents renewed under the new root as soon as it signed.
    eventually(
        "the client's agent holds a certificate of the new root",
        WAIT,
        || async {
            let (_, serial, _) = agent_certificate(&sidecars[1])?;
            ensure!(serial != old_serial, "still {serial}");
            Ok(())
        },
    )
    .await?;
    let (done, _) = meshd.wait_rotation_done(Duration::from_secs(60)).await?;
    assert_eq!(done.trusted_roots.len(), 1);
    // What the agents hold now chains to the one root left, before anything restarts.
    let new_root = meshd.trust_bundle_pem().await?;
    for sidecar in &sidecars {
        ensure!(
            signed_by(sidecar, &new_root)?,
            "{}'s agent holds a certificate the new root did not sign",
            sidecar.node_id
        );
    }
    // After step 3 the old root is trusted nowhere: meshd restarts, both sidecars
    // restart, and all of them find each other again.
    restart_meshd(&mut meshd, &traffic, 2).await?;
    for sidecar in &mut sidecars {
        sidecar
            .restart()
            .await
            .context("a sidecar after the rotation")?;
    }
    wait_ok(
        shop.outbound(),
        "traffic after the rotation and the restarts",
    )
    .await?;

    // Past the lifetime of every certificate issued before or during the rotation.
    tokio::time::sleep(Duration::from_secs(13)).await;
    restart_meshd(&mut meshd, &traffic, 2).await?;
    sidecars[1]
        .restart()
        .await
        .context("a sidecar after expiry")?;
    wait_ok(
        shop.outbound(),
        "traffic after every old certificate expired",
    )
    .await?;
    let (sent, failed) = traffic.stop().await;
    ensure!(sent > 100, "only {sent} requests");
    // Only the client's own restarts may fail requests: each is a few hundred ms.
    ensure!(failed < sent / 4, "{failed} of {sent} requests failed");
    Ok(())
}

/// Outside a cluster the agent starts from a `meshctl bootstrap` certificate and from
/// then on renews its own: a bootstrap certificate that has long expired no longer
/// matters, and meshd can restart.
#[tokio::test]
async fn an_expired_bootstrap_certificate_strands_no_agent_run_sidecar() -> anyhow::Result<()> {
    init_test_logging();
    let app = HttpApp::start("web-1").await?;
    let (mesh, web, client) = web_and_client("shop", app.port())?;
    let mut meshd = Meshd::start_with(mesh.path(), &["--workload-cert-ttl", "6s"]).await?;
    let short = SidecarOptions {
        identity: SidecarIdentity::BootstrapWith(vec!["--cert-ttl".into(), "4s".into()]),
        ..SidecarOptions::default()
    };
    let mut sidecars = Vec::new();
    for (pod, flavor) in [(&web, XdsFlavor::Delta), (&client, XdsFlavor::Sotw)] {
        sidecars.push(
            Sidecar::start_with(
                &meshd,
                &pod.namespace,
                &pod.name,
                &pod.service_account,
                flavor,
                short.clone(),
            )
            .await?,
        );
    }
    wait_ok(
        client.outbound(0),
        "traffic with fresh bootstrap certificates",
    )
    .await?;
    let traffic = Traffic::start(client.outbound(0));
    // The bootstrap certificates expire; without the agent, Envoy would fail
    // `certificate expired` towards the restarted meshd and never get config again.
    tokio::time::sleep(Duration::from_secs(6)).await;
    restart_meshd(&mut meshd, &traffic, 2).await?;
    for sidecar in &mut sidecars {
        sidecar
            .restart()
            .await
            .context("a sidecar after its bootstrap certificate expired")?;
    }
    wait_ok(client.outbound(0), "traffic after the restarts").await?;
    let (sent, failed) = traffic.stop().await;
    ensure!(failed < sent / 4, "{failed} of {sent} requests failed");
    Ok(())
}
