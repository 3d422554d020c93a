//! Sidecar injection through a real API server, which calls meshd's mutating webhook
//! for real: the chart's webhook configuration (pointed at meshd with `injection.url`),
//! its caBundle written by meshd's Lease holder, pods stored injected, left alone, or
//! refused with the annotation named; the webhook failing closed; `meshctl inject`
//! giving the webhook's pod spec.

use std::net::SocketAddr;

use anyhow::{Context, ensure};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use meshd_integration::init_test_logging;
use meshd_integration::kube_api::KubeApi;
use meshd_integration::meshd::Meshd;
use meshd_integration::net::free_port;
use meshd_integration::tools::meshd_binary;
use meshd_integration::webhook::{self, CONFIGURATION, WebhookClient};
use serde_json::{Value, json};

/// A test API server with the chart's webhook configuration, and meshd serving it.
struct Cluster {
    api: KubeApi,
    meshd: Meshd,
    webhook: SocketAddr,
    bundle: String,
    inject_config: tempfile::NamedTempFile,
}

const INJECT_CONFIG: &str = "proxyImage: registry.example/meshd-proxy:9.9.9\nlogLevel: debug\n";

async fn cluster() -> anyhow::Result<Cluster> {
    init_test_logging();
    let api = KubeApi::start().await?;
    let port = free_port();
    webhook::install(&api, &format!("https://localhost:{port}/inject")).await?;
    let inject_config = tempfile::NamedTempFile::new()?;
    std::fs::write(inject_config.path(), INJECT_CONFIG)?;
    let webhook: SocketAddr = ([127, 0, 0, 1], port).into();
    let (meshd, bundle) = webhook::start_meshd(&api, webhook, inject_config.path(), false).await?;
    api.create_namespace("shop", &[("meshd.io/inject", "enabled")])
        .await?;
    api.create_namespace("plain", &[]).await?;
    Ok(Cluster {
        api,
        meshd,
        webhook,
        bundle,
        inject_config,
    })
}

fn app_pod(name: &str, labels: Value, annotations: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": labels, "annotations": annotations},
        "spec": {"containers": [{
            "name": "app", "image": "shop/web:1",
            "ports": [{"name": "http", "containerPort": 8080}],
            "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 3},
            "livenessProbe": {"tcpSocket": {"port": 8080}},
        }]}
    })
}

impl Cluster {
    async fn create(&self, ns: &str, pod: Value) -> anyhow::Result<Pod> {
        let pod: Pod = serde_json::from_value(pod)?;
        Ok(Api::<Pod>::namespaced(self.api.client.clone(), ns)
            .create(&Default::default(), &pod)
            .await?)
    }

    async fn stored(&self, ns: &str, name: &str) -> anyhow::Result<Pod> {
        Ok(Api::<Pod>::namespaced(self.api.client.clone(), ns)
            .get(name)
            .await?)
    }
}

fn init_names(pod: &Pod) -> Vec<String> {
    pod.spec
        .iter()
        .flat_map(|s| s.init_containers.iter().flatten())
        .map(|c| c.name.clone())
        .collect()
}

#[tokio::test]
async fn pods_of_labelled_namespaces_are_stored_injected_and_others_untouched() -> anyhow::Result<()>
{
    let c = cluster().await?;
    c.create(
        "shop",
        app_pod(
            "web-0",
            json!({"app": "web"}),
            json!({"meshd.io/exclude-outbound-ports": "5432"}),
        ),
    )
    .await?;
    let pod = c.stored("shop", "web-0").await?;
    ensure!(
        init_names(&pod) == ["meshd-init", "meshd-proxy"],
        "{:?}",
        init_names(&pod)
    );
    let spec = pod.spec.as_ref().context("spec")?;
    let inits = spec.init_containers.as_ref().context("init containers")?;
    ensure!(
        inits[0].args.as_deref()
            == Some(&["init".to_string(), "--exclude-outbound-ports=5432".into()][..]),
        "{:?}",
        inits[0].args
    );
    let sidecar = &inits[1];
    ensure!(sidecar.restart_policy.as_deref() == Some("Always"));
    ensure!(
        sidecar.image.as_deref() == Some("registry.example/meshd-proxy:9.9.9"),
        "the settings' image"
    );
    ensure!(
        sidecar
            .env
            .iter()
            .flatten()
            .any(|e| e.name == "MESHD_AGENT_LOG" && e.value.as_deref() == Some("debug")),
        "the settings' log level: {:?}",
        sidecar.env
    );
    let volumes: Vec<_> = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect();
    for want in ["meshd-agent", "meshd-token", "meshd-trust-bundle"] {
        ensure!(volumes.contains(&want), "no volume {want}: {volumes:?}");
    }
    let app = &spec.containers[0];
    let ready = app
        .readiness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .context("readiness")?;
    ensure!(
        ready.path.as_deref() == Some("/app-health/app/readyz"),
        "{ready:?}"
    );
    let live = app.liveness_probe.as_ref().context("liveness")?;
    ensure!(
        live.tcp_socket.is_none() && live.http_get.is_some(),
        "{live:?}"
    );
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    ensure!(annotations.get("meshd.io/capture").map(String::as_str) == Some("transparent"));
    ensure!(
        annotations.contains_key("meshd.io/original-probes"),
        "{annotations:?}"
    );

    // Opt-out, hostNetwork and meshd itself stay as they are in a labelled namespace.
    c.create(
        "shop",
        app_pod("opted-out", json!({"meshd.io/inject": "false"}), json!({})),
    )
    .await?;
    let mut host = app_pod("host", json!({}), json!({}));
    host["spec"]["hostNetwork"] = json!(true);
    c.create("shop", host).await?;
    c.create(
        "shop",
        app_pod(
            "meshd-x",
            json!({"app.kubernetes.io/part-of": "meshd", "app.kubernetes.io/component": "control-plane"}),
            json!({}),
        ),
    )
    .await?;
    // Unlabelled namespaces are never sent to meshd, unless a pod opts in.
    c.create("plain", app_pod("plain-0", json!({}), json!({})))
        .await?;
    c.create(
        "plain",
        app_pod("opted-in", json!({"meshd.io/inject": "true"}), json!({})),
    )
    .await?;
    for (ns, name) in [
        ("shop", "opted-out"),
        ("shop", "host"),
        ("shop", "meshd-x"),
        ("plain", "plain-0"),
    ] {
        let pod = c.stored(ns, name).await?;
        ensure!(init_names(&pod).is_empty(), "{ns}/{name} was injected");
        ensure!(
            pod.spec.as_ref().context("spec")?.containers[0]
                .readiness_probe
                .as_ref()
                .and_then(|p| p.http_get.as_ref())
                .and_then(|g| g.path.clone())
                .as_deref()
                == Some("/healthz"),
            "{ns}/{name}: probes rewritten"
        );
    }
    ensure!(init_names(&c.stored("plain", "opted-in").await?) == ["meshd-init", "meshd-proxy"]);

    let metrics = c.meshd.metrics().await?;
    ensure!(
        metrics.contains(r#"meshd_admission_reviews_total{webhook="/inject",result="injected"} 2"#),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test]
async fn a_pod_meshd_would_refuse_is_denied_with_the_annotation_named() -> anyhow::Result<()> {
    let c = cluster().await?;
    for (annotations, named) in [
        (
            json!({"meshd.io/exclude-inbound-ports": "http"}),
            "meshd.io/exclude-inbound-ports",
        ),
        (json!({"meshd.io/capture": "sometimes"}), "meshd.io/capture"),
        (
            json!({"meshd.io/upstreams": "not a list"}),
            "meshd.io/upstreams",
        ),
    ] {
        let err = c
            .create("shop", app_pod("bad", json!({}), annotations.clone()))
            .await
            .expect_err("the pod was admitted")
            .to_string();
        ensure!(
            err.contains("meshd cannot inject pod shop/bad") && err.contains(named),
            "{annotations}: {err}"
        );
        ensure!(
            c.stored("shop", "bad").await.is_err(),
            "a refused pod was stored"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_second_pass_is_a_no_op_and_what_is_not_a_pod_creation_passes_unchanged()
-> anyhow::Result<()> {
    let c = cluster().await?;
    c.create("shop", app_pod("web-0", json!({}), json!({})))
        .await?;
    let stored = serde_json::to_value(c.stored("shop", "web-0").await?)?;
    let mut client = WebhookClient::new(c.webhook, &c.bundle)?;

    // Reinvocation of an injected pod: allowed, no patch.
    let again = client.review("/inject", "shop", "CREATE", &stored).await?;
    ensure!(
        again["allowed"] == true && again.get("patch").is_none(),
        "{again}"
    );
    ensure!(
        again["uid"] == "705ab4f5-6393-11e8-b7cc-42010a800002",
        "the uid comes back"
    );
    // A fresh pod gets a patch, base64 JSON Patch.
    let fresh = client
        .review(
            "/inject",
            "shop",
            "CREATE",
            &app_pod("web-1", json!({}), json!({})),
        )
        .await?;
    ensure!(
        fresh["allowed"] == true && fresh["patchType"] == "JSONPatch",
        "{fresh}"
    );
    // Other kinds and operations pass unchanged.
    let config_map = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}});
    for (operation, object) in [("CREATE", &config_map), ("UPDATE", &stored)] {
        let answer = client.review("/inject", "shop", operation, object).await?;
        ensure!(
            answer["allowed"] == true && answer.get("patch").is_none(),
            "{operation}: {answer}"
        );
    }
    // Malformed reviews: 400 with the reason.
    for (body, says) in [
        (b"{not json".to_vec(), "not an AdmissionReview"),
        (
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#.to_vec(),
            "no request",
        ),
        (
            br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview","request":null}"#
                .to_vec(),
            "only admission.k8s.io/v1",
        ),
    ] {
        let (status, answer) = client.post("/inject", body).await?;
        let answer = String::from_utf8_lossy(&answer);
        ensure!(status == 400 && answer.contains(says), "{status} {answer}");
    }
    Ok(())
}

#[tokio::test]
async fn the_lease_holder_keeps_the_ca_bundle_and_the_webhook_fails_closed() -> anyhow::Result<()> {
    let c = cluster().await?;
    // `helm upgrade` renders caBundle empty again; someone may write a wrong one.
    let webhooks: Api<MutatingWebhookConfiguration> = Api::all(c.api.client.clone());
    let mut config = webhooks.get(CONFIGURATION).await?;
    for w in config.webhooks.iter_mut().flatten() {
        w.client_config.ca_bundle = Some(ByteString(b"not a certificate".to_vec()));
    }
    webhooks
        .replace(CONFIGURATION, &Default::default(), &config)
        .await?;
    webhook::wait_ca_bundle(&c.api, &c.bundle).await?;
    c.create("shop", app_pod("web-0", json!({}), json!({})))
        .await?;
    ensure!(init_names(&c.stored("shop", "web-0").await?).len() == 2);

    // meshd gone: pods of injected namespaces are refused (none starts unmeshed),
    // other namespaces never wait on meshd.
    let Cluster {
        api,
        meshd,
        inject_config,
        ..
    } = c;
    meshd.terminate().await?;
    let c = (api, inject_config);
    let create = |ns: &'static str, name: &'static str| {
        let client = c.0.client.clone();
        async move {
            let pod: Pod = serde_json::from_value(app_pod(name, json!({}), json!({})))?;
            anyhow::Ok(
                Api::<Pod>::namespaced(client, ns)
                    .create(&Default::default(), &pod)
                    .await?,
            )
        }
    };
    let err = create("shop", "web-1")
        .await
        .expect_err("admitted without meshd")
        .to_string();
    ensure!(err.contains("inject.meshd.io"), "{err}");
    create("plain", "plain-0").await?;
    Ok(())
}

#[tokio::test]
async fn meshctl_inject_gives_the_pod_spec_the_webhook_gives() -> anyhow::Result<()> {
    let c = cluster().await?;
    let template = json!({
        "metadata": {"labels": {"app": "web"}, "annotations": {"meshd.io/exclude-inbound-ports": "9090"}},
        "spec": {
            "serviceAccountName": "web",
            "containers": [{
                "name": "app", "image": "shop/web:1",
                "ports": [{"name": "http", "containerPort": 8080}],
                "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}},
                "startupProbe": {"grpc": {"port": 9090}},
            }],
        },
    });
    let deployment = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "plain"},
        "spec": {"selector": {"matchLabels": {"app": "web"}}, "template": template},
    });
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), serde_json::to_string(&deployment)?)?;
    let out = tokio::process::Command::new(meshd_binary("meshctl")?)
        .args(["inject", "-f"])
        .arg(file.path())
        .arg("--inject-config")
        .arg(c.inject_config.path())
        .output()
        .await?;
    ensure!(
        out.status.success(),
        "meshctl inject: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let injected: Value = serde_saphyr::from_str(std::str::from_utf8(&out.stdout)?)?;
    // The injected Deployment, stored (and defaulted) by the API server…
    let deployment: Deployment = serde_json::from_value(injected)?;
    let stored = Api::<Deployment>::namespaced(c.api.client.clone(), "plain")
        .create(&Default::default(), &deployment)
        .await?;
    let offline = stored
        .spec
        .context("spec")?
        .template
        .spec
        .context("template spec")?;
    // …and the pod its ReplicaSet would create, injected by the webhook.
    let mut pod = json!({"apiVersion": "v1", "kind": "Pod"});
    pod["metadata"] = template["metadata"].clone();
    pod["metadata"]["name"] = json!("web-abc12");
    pod["spec"] = template["spec"].clone();
    let mut webhook = c.create("shop", pod).await?.spec.context("pod spec")?;
    // The API server defaults this for Pods only (as kube-apiserver's SetDefaults_Pod).
    ensure!(webhook.enable_service_links == Some(true) && offline.enable_service_links.is_none());
    webhook.enable_service_links = None;
    ensure!(
        serde_json::to_value(&offline)? == serde_json::to_value(&webhook)?,
        "meshctl inject and the webhook differ:\noffline: {}\nwebhook: {}",
        serde_json::to_string_pretty(&offline)?,
        serde_json::to_string_pretty(&webhook)?
    );
    ensure!(
        init_names(&Pod {
            spec: Some(webhook),
            ..Default::default()
        })
        .len()
            == 2
    );
    Ok(())
}
