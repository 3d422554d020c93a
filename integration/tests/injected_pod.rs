//! "Label and you're meshed", end to end: pods created in a namespace labelled
//! `meshd.io/inject=enabled` are injected by meshd's webhook (called by a real API
//! server), and then run from the spec as stored — the way the kubelet would run it
//! ([`meshd_integration::kubelet`]): each pod in its own network namespace, the
//! `meshd-init` container's command as root with only NET_ADMIN and NET_RAW, the
//! sidecar's command line and environment from the spec as uid 1337 with a token the
//! API server minted for that pod, the volumes at their mount paths. Their traffic is
//! mTLS under AuthorizationPolicy, and the app's HTTP, TCP and gRPC probes, sent to
//! :15020 as the kubelet sends them, reach the app under STRICT.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, ensure};
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::Api;
use meshd::sources::crd::AuthorizationPolicy;
use meshd_integration::apps::{HttpApp, http_get};
use meshd_integration::init_test_logging;
use meshd_integration::kube_api::KubeApi;
use meshd_integration::kubelet::{BinDir, ImageDef, Images, Kubelet, ProbeKind, STANDARD_PATH};
use meshd_integration::meshd::Meshd;
use meshd_integration::net::free_port;
use meshd_integration::netns::Lab;
use meshd_integration::tools::{envoy_binary, meshd_binary};
use meshd_integration::transparent;
use meshd_integration::wait::eventually;
use meshd_integration::webhook::{self, CONFIGURATION};
use serde_json::json;

const NS: &str = "shop";
const PROXY_IMAGE: &str = "meshd-proxy:e2e";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/shop/sa/client";

fn pod(name: &str, image: &str, readiness: bool) -> anyhow::Result<Pod> {
    let mut container = json!({
        "name": "app", "image": image,
        "ports": [{"name": "http", "containerPort": 8080}],
    });
    if readiness {
        container["readinessProbe"] =
            json!({"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 1});
        container["livenessProbe"] = json!({"tcpSocket": {"port": 8080}, "periodSeconds": 5});
        container["startupProbe"] = json!({"grpc": {"port": 9090}, "periodSeconds": 1});
    }
    Ok(serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": {"app": name}},
        "spec": {"serviceAccountName": name, "containers": [container]},
    }))?)
}

#[tokio::test]
async fn a_pod_created_in_a_labelled_namespace_is_meshed_from_its_stored_spec() -> anyhow::Result<()>
{
    init_test_logging();
    let api = KubeApi::start().await?;
    let lab = Lab::new()?;
    let meshd_pod = lab.pod("meshd")?;
    let (web_lab, client_lab, outside_lab) =
        (lab.pod("web")?, lab.pod("client")?, lab.pod("outside")?);

    // meshd runs on this machine (it watches the API server on loopback); the pods
    // reach its xDS port at the meshd pod's address, relayed unchanged (TLS end to end).
    let port = free_port();
    webhook::install(&api, &format!("https://localhost:{port}/inject")).await?;
    let inject_config = tempfile::NamedTempFile::new()?;
    std::fs::write(
        inject_config.path(),
        format!(
            "proxyImage: {PROXY_IMAGE}\nxdsAddress: \"{}\"\n",
            meshd_pod.addr(15012)
        ),
    )?;
    let meshd = Meshd::start_kubernetes(
        &api,
        &[
            "--webhook-address",
            &format!("127.0.0.1:{port}"),
            "--webhook-configuration",
            CONFIGURATION,
            "--inject-config",
            inject_config.path().to_str().context("path")?,
        ],
    )
    .await?;
    let _relay = meshd_pod
        .netns
        .forward(meshd_pod.addr(15012), meshd.xds_addr)
        .await?;
    webhook::wait_ca_bundle(&api, &meshd.trust_bundle_pem().await?).await?;

    api.create_namespace(NS, &[("meshd.io/inject", "enabled")])
        .await?;
    for sa in ["web", "client"] {
        api.service_account(NS, sa).await?;
    }
    let vip = lab.vip();
    api.apply::<Service>(
        NS,
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "web", "namespace": NS},
               "spec": {"clusterIP": vip.to_string(), "selector": {"app": "web"},
                        "ports": [{"name": "http", "port": 80, "targetPort": 8080, "appProtocol": "http"}]}}),
    )
    .await?;
    api.apply::<AuthorizationPolicy>(
        NS,
        json!({"apiVersion": "security.meshd.io/v1alpha1", "kind": "AuthorizationPolicy",
               "metadata": {"name": "no-admin", "namespace": NS},
               "spec": {"selector": {"matchLabels": {"app": "web"}}, "action": "DENY",
                        "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}]}}),
    )
    .await?;

    // `kubectl apply` of two plain pods: the API server stores them injected.
    let pods: Api<Pod> = Api::namespaced(api.client.clone(), NS);
    for (name, image, readiness) in [
        ("web", "shop/web:1", true),
        ("client", "shop/client:1", false),
    ] {
        pods.create(&Default::default(), &pod(name, image, readiness)?)
            .await
            .with_context(|| format!("create pod {name}"))?;
    }

    // The kubelet: the proxy image holds meshd-agent and envoy (and the system's
    // iptables); the apps are served by this test inside their pods.
    let bin = BinDir::new()?
        .add("meshd-agent", &meshd_binary("meshd-agent")?)?
        .add("envoy", &envoy_binary()?)?;
    let path =
        std::iter::once(bin.path().to_path_buf()).chain(STANDARD_PATH.iter().map(PathBuf::from));
    let images = Images::new()
        .with(PROXY_IMAGE, ImageDef::process(path))
        .with("shop/web:1", ImageDef::RunByTest)
        .with("shop/client:1", ImageDef::RunByTest);
    let kubelet = Kubelet::new(&lab, &api, images)?;
    let web_app = HttpApp::serve(
        "web",
        web_lab.netns.listen(([0, 0, 0, 0], 8080).into()).await?,
    )?;
    let start = |lab_pod, name| {
        let kubelet = &kubelet;
        async move {
            tokio::time::timeout(Duration::from_secs(120), kubelet.run(lab_pod, NS, name))
                .await
                .with_context(|| format!("pod {name} did not start in 2 minutes"))?
        }
    };
    // Its gRPC health service, for the startup probe.
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let grpc_listener = web_lab.netns.listen(([0, 0, 0, 0], 9090).into()).await?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health_service)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(grpc_listener)),
    );
    let web = start(&web_lab, "web").await?;
    api.endpoint_slice(NS, "web", 8080, &[("web", &web_lab.ip.to_string(), true)])
        .await?;
    let client = start(&client_lab, "client").await?;

    // What ran is what was stored: meshd-init's iptables, the sidecar as uid 1337.
    ensure!(
        transparent::rules(&web_lab)
            .await?
            .contains("MESHD_INBOUND"),
        "meshd-init left no capture in the web pod"
    );
    let identity = web.identity("meshd-proxy")?;
    ensure!(
        identity.uid == 1337 && identity.capabilities.is_empty(),
        "{identity:?}"
    );
    web.wait_ready(Duration::from_secs(60)).await?;
    ensure!(
        meshd
            .log()
            .contains("spiffe://cluster.local/ns/shop/sa/web"),
        "meshd signed no certificate for web's token"
    );

    // The client's unmodified app calls the Service VIP (owned by nothing: only the
    // capture makes it work): mTLS to web, as the client's identity.
    let reply = eventually(
        "client → web:80 through both sidecars",
        Duration::from_secs(30),
        || {
            let netns = client_lab.netns.clone();
            async move {
                let reply = netns
                    .run(async move { http_get(SocketAddr::new(vip.into(), 80), "/").await })
                    .await?;
                ensure!(reply.status == 200, "HTTP {}: {}", reply.status, reply.body);
                Ok(reply)
            }
        },
    )
    .await?;
    ensure!(reply.app.as_deref() == Some("web"), "{reply:?}");
    let log = eventually(
        "web's access log names the client",
        Duration::from_secs(10),
        || {
            let log = web.logs("meshd-proxy");
            async move {
                let log = log?;
                ensure!(log.contains(&format!("peer={CLIENT_ID}")), "not yet");
                Ok(log)
            }
        },
    )
    .await?;
    ensure!(
        web_app.peers().iter().all(|p| p.ip().is_loopback()),
        "the app was reached around its sidecar: {:?}\n{log}",
        web_app.peers()
    );
    // …under the namespace's policy.
    let admin = client_lab
        .netns
        .run(async move { http_get(SocketAddr::new(vip.into(), 80), "/admin").await })
        .await?;
    ensure!(
        admin.status == 403 && admin.body.contains("shop/no-admin"),
        "{admin:?}"
    );
    // STRICT: a pod outside the mesh gets nothing from web's port in plaintext.
    let web_addr = web_lab.addr(8080);
    let plaintext = outside_lab
        .netns
        .run(async move { anyhow::Ok(http_get(web_addr, "/").await.ok()) })
        .await?;
    ensure!(
        plaintext.is_none(),
        "STRICT web answered plaintext: {plaintext:?}"
    );

    // The kubelet's probes, sent to :15020 from the node as the stored spec says, reach
    // the app through the agent; the same probe straight to the app's port (what the
    // spec held before injection) cannot pass STRICT.
    let hits = web_app.hits();
    for kind in [
        ProbeKind::Readiness,
        ProbeKind::Liveness,
        ProbeKind::Startup,
    ] {
        let outcome = web.probe("app", kind).await?;
        ensure!(outcome.success, "{kind:?}: {outcome:?}");
    }
    ensure!(
        web_app.hits() > hits,
        "the readiness probe never reached the app"
    );
    let (node, _) = lab.node()?;
    let direct = node
        .run(async move { anyhow::Ok(http_get(web_addr, "/healthz").await.ok()) })
        .await?;
    ensure!(
        direct.is_none(),
        "a plaintext probe passed STRICT: {direct:?}"
    );
    let stored = pods.get("web").await?;
    ensure!(
        stored
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True"),
        "the web pod is not Ready in the API server"
    );

    client.stop().await?;
    web.stop().await?;
    Ok(())
}
