//! meshd-agent in local mode, end to end: real meshd, real Envoy as the agent's child,
//! real traffic. (Every other test's sidecars run through the agent as well; these
//! check what is the agent's own: whose key Envoy presents, renewal, signals, exit,
//! readiness.)

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, ensure};
use meshd_integration::apps::{HttpApp, Traffic, http_get};
use meshd_integration::envoy::{Sidecar, SidecarOptions};
use meshd_integration::mesh::{PodDef, web_and_client};
use meshd_integration::meshd::Meshd;
use meshd_integration::netns::process_alive;
use meshd_integration::wait::eventually;
use meshd_integration::{XdsFlavor, init_test_logging};
use nix::sys::signal::Signal;
use x509_parser::prelude::{FromDer, X509Certificate};

const NS: &str = "shop";
const WAIT: Duration = Duration::from_secs(15);
const WEB_ID: &str = "spiffe://cluster.local/ns/shop/sa/web";

async fn wait_http_ok(client: &PodDef) -> anyhow::Result<()> {
    eventually("HTTP through both sidecars", WAIT, || async {
        let r = http_get(client.outbound(0), "/").await?;
        ensure!(r.status == 200, "status {}: {}", r.status, r.body);
        Ok(())
    })
    .await
}

/// The serials of the certificates Envoy holds for itself (`/certs`, `cert_chain`):
/// the one it presents to meshd (from the agent's directory) and the workload
/// certificate meshd serves it over SDS. (Envoy shows both as `<inline>`.)
async fn envoy_serials(sidecar: &Sidecar) -> anyhow::Result<BTreeSet<String>> {
    let certs: serde_json::Value = serde_json::from_str(&sidecar.admin("/certs").await?)?;
    let mut serials = BTreeSet::new();
    for entry in certs["certificates"].as_array().into_iter().flatten() {
        for cert in entry["cert_chain"].as_array().into_iter().flatten() {
            let uri = cert["subject_alt_names"][0]["uri"].as_str();
            ensure!(uri == Some(WEB_ID), "envoy holds a certificate for {uri:?}");
            serials.insert(normal_serial(
                cert["serial_number"].as_str().unwrap_or_default(),
            ));
        }
    }
    Ok(serials)
}

fn normal_serial(s: &str) -> String {
    s.to_ascii_lowercase().trim_start_matches('0').to_string()
}

/// Serial and raw public key of the first certificate in `pem_file`.
fn cert_file(pem_file: &Path) -> anyhow::Result<(String, Vec<u8>)> {
    let text = std::fs::read_to_string(pem_file)?;
    let der = pem_der(&text, "CERTIFICATE")?;
    let (_, cert) = X509Certificate::from_der(&der).map_err(|e| anyhow::anyhow!("{e}"))?;
    let serial: String = cert
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok((
        normal_serial(&serial),
        cert.public_key().subject_public_key.data.to_vec(),
    ))
}

/// The raw public key of the PKCS#8 key in `key_file`.
fn key_file(key_file: &Path) -> anyhow::Result<Vec<u8>> {
    let pem = std::fs::read_to_string(key_file)?;
    let key = rcgen::KeyPair::from_pem(&pem)?;
    Ok(key.public_key_raw().to_vec())
}

fn pem_der(text: &str, tag: &str) -> anyhow::Result<Vec<u8>> {
    let block = pem::parse(text)?;
    ensure!(block.tag() == tag, "a {} block, not {tag}", block.tag());
    Ok(block.into_contents())
}

#[tokio::test]
async fn agents_carry_mtls_traffic_and_envoy_presents_the_agents_own_key() -> anyhow::Result<()> {
    init_test_logging();
    let app = HttpApp::start("web-1").await?;
    let (mesh, web, client) = web_and_client(NS, app.port())?;
    let meshd = Meshd::start(mesh.path()).await?;
    let web_sidecar = Sidecar::for_pod(&meshd, &web, XdsFlavor::Delta).await?;
    let _client_sidecar = Sidecar::for_pod(&meshd, &client, XdsFlavor::Sotw).await?;
    wait_http_ok(&client).await?;
    assert!(app.hits() > 0, "the request did not reach the app");

    let agent_dir = web_sidecar.agent_dir();
    let bootstrap_dir = web_sidecar.bootstrap_dir();
    // Envoy holds the agent's certificate, for the agent's key...
    let (agent_serial, agent_cert_key) = cert_file(&agent_dir.join("certs/cert-chain.pem"))?;
    let held = envoy_serials(&web_sidecar).await?;
    assert!(
        held.contains(&agent_serial),
        "{agent_serial} not in {held:?}"
    );
    let agent_key = key_file(&agent_dir.join("certs/key.pem"))?;
    assert_eq!(agent_cert_key, agent_key);
    let mode = std::fs::metadata(agent_dir.join("certs/key.pem"))?
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // ...not the one meshctl bootstrap wrote (still there, untouched, with its own key)...
    let (bootstrap_serial, bootstrap_cert_key) =
        cert_file(&bootstrap_dir.join("certs/cert-chain.pem"))?;
    assert!(
        !held.contains(&bootstrap_serial),
        "{bootstrap_serial} in {held:?}"
    );
    assert_eq!(
        key_file(&bootstrap_dir.join("certs/key.pem"))?,
        bootstrap_cert_key
    );
    assert_ne!(bootstrap_cert_key, agent_key);
    // ...and meshd signed it for a CSR: it never held that key.
    let log = meshd.log();
    let signed = log
        .lines()
        .find(|l| l.contains("signed a workload certificate") && l.contains(&agent_serial))
        .with_context(|| format!("meshd did not log signing {agent_serial}:\n{log}"))?;
    assert!(signed.contains(WEB_ID), "{signed}");
    // The bootstrap Envoy runs from is the agent's, in the agent's directory.
    assert!(agent_dir.join("envoy-bootstrap.json").is_file());
    // No key material in what the agent and Envoy log.
    assert!(!web_sidecar.log().contains("PRIVATE KEY"));
    Ok(())
}

#[tokio::test]
async fn certificates_of_four_seconds_are_renewed_under_traffic_without_a_failed_request()
-> anyhow::Result<()> {
    init_test_logging();
    let app = HttpApp::start("web-1").await?;
    let (mesh, web, client) = web_and_client(NS, app.port())?;
    let meshd = Meshd::start_with(
        mesh.path(),
        &["--debounce", "50ms", "--workload-cert-ttl", "4s"],
    )
    .await?;
    let web_sidecar = Sidecar::for_pod(&meshd, &web, XdsFlavor::Delta).await?;
    let _client_sidecar = Sidecar::for_pod(&meshd, &client, XdsFlavor::Delta).await?;
    wait_http_ok(&client).await?;

    let traffic = Traffic::start(client.outbound(0));
    // The agent's certificates that Envoy had loaded when looked at.
    let mut serials = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline {
        let agent = cert_file(&web_sidecar.agent_dir().join("certs/cert-chain.pem"));
        if let (Ok((serial, _)), Ok(held)) = (agent, envoy_serials(&web_sidecar).await)
            && held.contains(&serial)
        {
            serials.insert(serial);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (sent, failed) = traffic.stop().await;
    assert!(sent > 50, "only {sent} requests sent");
    assert_eq!(failed, 0, "{failed} of {sent} requests failed");
    // The first certificate and at least two renewals reached Envoy.
    assert!(
        serials.len() >= 3,
        "envoy loaded {} of the agent's certificates in 10s: {serials:?}\n{}",
        serials.len(),
        web_sidecar.log()
    );
    // And Envoy is still connected to meshd: a change reaches it.
    let snapshot = meshd.snapshot().await?.version;
    meshd.wait_synced(&web_sidecar.node_id, snapshot).await?;
    Ok(())
}

/// An HTTP app whose every answer takes `delay`; counts requests it has begun.
async fn slow_app(delay: Duration) -> anyhow::Result<(u16, Arc<AtomicUsize>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let begun = Arc::new(AtomicUsize::new(0));
    let counter = begun.clone();
    let app = axum::Router::new().fallback(move || {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(delay).await;
            "slow answer\n"
        }
    });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((port, begun))
}

#[tokio::test]
async fn sigterm_lets_the_request_in_flight_finish_then_envoy_and_the_agent_exit()
-> anyhow::Result<()> {
    init_test_logging();
    let (port, begun) = slow_app(Duration::from_secs(2)).await?;
    let (mesh, _web, client) = web_and_client(NS, port)?;
    let meshd = Meshd::start(mesh.path()).await?;
    let options = SidecarOptions {
        // Long enough that exiting early shows the agent waited for the connection,
        // not for the clock.
        agent_args: vec!["--drain-time".into(), "30s".into()],
        ..SidecarOptions::default()
    };
    let mut web_sidecar =
        Sidecar::start_with(&meshd, NS, "web-1", "web", XdsFlavor::Delta, options).await?;
    let _client_sidecar = Sidecar::for_pod(&meshd, &client, XdsFlavor::Delta).await?;
    wait_http_ok(&client).await?;
    let envoy = web_sidecar.envoy_pid()?;

    let before = begun.load(Ordering::SeqCst);
    let addr = client.outbound(0);
    let request = tokio::spawn(async move { http_get(addr, "/slow").await });
    eventually("the slow request to reach the app", WAIT, || async {
        ensure!(begun.load(Ordering::SeqCst) > before, "not yet");
        Ok(())
    })
    .await?;
    let terminated = tokio::time::Instant::now();
    web_sidecar.signal_agent(Signal::SIGTERM)?;

    let reply = request.await??;
    assert_eq!(reply.status, 200, "{reply:?}\n{}", web_sidecar.log());
    assert_eq!(reply.body, "slow answer\n");
    let status = web_sidecar.wait_exit(Duration::from_secs(20)).await?;
    let took = terminated.elapsed();
    let log = web_sidecar.log();
    assert_eq!(status.code(), Some(0), "{status}\n{log}");
    assert!(
        log.contains("envoy exited with exit status: 0; meshd-agent exits with its code"),
        "{log}"
    );
    assert!(
        took < Duration::from_secs(15),
        "exited {took:?} after SIGTERM\n{log}"
    );
    assert!(!process_alive(envoy), "envoy ({envoy}) is still running");
    Ok(())
}

#[tokio::test]
async fn when_envoy_dies_the_agent_exits_non_zero_saying_so() -> anyhow::Result<()> {
    init_test_logging();
    let app = HttpApp::start("web-1").await?;
    let (mesh, web, _client) = web_and_client(NS, app.port())?;
    let meshd = Meshd::start(mesh.path()).await?;
    let mut sidecar = Sidecar::for_pod(&meshd, &web, XdsFlavor::Delta).await?;
    let envoy = sidecar.envoy_pid()?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(envoy)?),
        Signal::SIGKILL,
    )?;
    let status = sidecar.wait_exit(Duration::from_secs(10)).await?;
    let log = sidecar.log();
    assert!(!status.success(), "{status}\n{log}");
    assert!(
        log.contains(
            "envoy exited with signal: 9 (SIGKILL); meshd-agent exits, the kubelet restarts the container"
        ),
        "{log}"
    );
    Ok(())
}

/// A TCP relay to `target` that passes the first connection at once and holds every
/// later one until `release` turns true: the agent's first `Sign` gets through, Envoy's
/// xDS connection waits.
async fn held_relay(
    target: std::net::SocketAddr,
    release: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((mut inbound, _)) = listener.accept().await {
            let mut release = release.clone();
            let hold = !std::mem::take(&mut first);
            tokio::spawn(async move {
                if hold && release.wait_for(|r| *r).await.is_err() {
                    return;
                }
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    Ok(addr)
}

#[tokio::test]
async fn ready_only_once_envoy_has_its_config() -> anyhow::Result<()> {
    init_test_logging();
    let app = HttpApp::start("web-1").await?;
    let (mesh, _web, _client) = web_and_client(NS, app.port())?;
    let meshd = Meshd::start(mesh.path()).await?;
    let (release, held) = tokio::sync::watch::channel(false);
    let relay = held_relay(meshd.xds_addr, held).await?;
    let options = SidecarOptions {
        wait_live: false,
        xds_address: Some(relay),
        ..SidecarOptions::default()
    };
    let sidecar =
        Sidecar::start_with(&meshd, NS, "web-1", "web", XdsFlavor::Delta, options).await?;
    // The agent has its certificate and Envoy runs, but has no config yet.
    let body = eventually("envoy to be started, unready", WAIT, || async {
        let (status, body) = sidecar.health("/healthz/ready").await?;
        ensure!(status == 503, "{status}: {body}");
        ensure!(body.starts_with("envoy is "), "{body}");
        Ok(body)
    })
    .await?;
    assert!(body.contains("PRE_INITIALIZING"), "{body}");
    let (status, body) = sidecar.health("/healthz/ready").await?;
    assert_eq!(
        (status, body.as_str()),
        (503, "envoy is PRE_INITIALIZING, not LIVE\n")
    );

    release.send_replace(true);
    let body = eventually("/healthz/ready to answer 200", WAIT, || async {
        let (status, body) = sidecar.health("/healthz/ready").await?;
        ensure!(status == 200, "{status}: {body}");
        Ok(body)
    })
    .await?;
    assert_eq!(body, "ready\n");
    for stat in [
        "listener_manager.lds.update_success",
        "cluster_manager.cds.update_success",
    ] {
        let n = sidecar.stat(stat).await?;
        assert!(n.is_some_and(|n| n >= 1), "{stat}: {n:?}");
    }
    let (status, _) = sidecar.health("/other").await?;
    assert_eq!(status, 404);
    Ok(())
}

/// Token mode, refused (the happy path is `no_stranding.rs`'s): a token for another
/// audience. The agent keeps asking, gives meshd's reason in its log and its probe,
/// starts no Envoy, and never logs the token.
#[tokio::test]
async fn a_refused_token_is_retried_with_meshds_reason_in_log_and_probe() -> anyhow::Result<()> {
    use meshd_integration::envoy::SidecarIdentity;
    use meshd_integration::kube_api::KubeApi;
    use meshd_integration::kube_shop::Shop;

    init_test_logging();
    let api = KubeApi::start().await?;
    let shop = Shop::new().await?;
    shop.create(&api, true).await?;
    api.service_account(NS, "web").await?;
    let meshd = Meshd::start_kubernetes(&api, &[]).await?;
    let files = tempfile::tempdir()?;
    let trust_bundle = files.path().join("trust-bundle.pem");
    std::fs::write(&trust_bundle, meshd.trust_bundle_pem().await?)?;
    let token_file = files.path().join("web-1.token");
    let token = api.token(NS, "web", "other", Some("web-1")).await?;
    std::fs::write(&token_file, &token)?;
    let options = SidecarOptions {
        identity: SidecarIdentity::Token {
            token_file,
            trust_bundle,
        },
        wait_live: false,
        ..SidecarOptions::default()
    };
    let refused =
        Sidecar::start_with(&meshd, NS, "web-1", "web", XdsFlavor::Delta, options).await?;
    let body = eventually("the probe to give meshd's reason", WAIT, || async {
        let (status, body) = refused.health("/healthz/ready").await?;
        ensure!(
            status == 503 && body.contains("Unauthenticated"),
            "{status}: {body}"
        );
        Ok(body)
    })
    .await?;
    assert!(body.contains("waiting for the first certificate"), "{body}");
    assert!(body.contains(r#"do not include \"meshd\""#), "{body}");
    // Retried with backoff, not given up on.
    eventually("a second attempt", WAIT, || async {
        let attempts = refused.log().matches("no certificate yet").count();
        ensure!(attempts >= 2, "{attempts} attempts");
        Ok(())
    })
    .await?;
    let log = refused.log();
    assert!(log.contains("did not sign: Unauthenticated: \""), "{log}");
    assert!(!log.contains(token.trim()), "the token was logged:\n{log}");
    assert!(refused.envoy_pid().is_err(), "an envoy was started");
    Ok(())
}
