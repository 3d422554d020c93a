//! The kubelet harness (`meshd_integration::kubelet`) is faithful: hand-written Pods
//! stored by the real test API server, run from the stored spec in lab pods
//! (namespaces on a bridge, so these tests need root), with apps that are plain
//! `python3` and `sh` processes or served by the test. No meshd here.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, ensure};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use meshd_integration::init_test_logging;
use meshd_integration::kube_api::KubeApi;
use meshd_integration::kubelet::{BinDir, ImageDef, Images, Kubelet, ProbeKind};
use meshd_integration::netns::{Lab, LabPod};
use meshd_integration::wait::eventually;
use serde_json::{Value, json};

const NS: &str = "kt";
const WAIT: Duration = Duration::from_secs(20);

/// An API server with namespace [`NS`] and ServiceAccount `app`, a lab with one pod,
/// and a kubelet on the lab's node.
struct Node {
    api: KubeApi,
    // Dropped after the pod and the kubelet: field order.
    kubelet: Kubelet,
    pod: LabPod,
    _lab: Lab,
}

async fn node(pod_name: &str) -> anyhow::Result<Node> {
    init_test_logging();
    let api = KubeApi::start_bare().await?;
    api.create_namespace(NS, &[]).await?;
    api.service_account(NS, "app").await?;
    let lab = Lab::new()?;
    let pod = lab.pod(pod_name)?;
    let images = Images::new()
        .with("sh", ImageDef::system())
        .with("python", ImageDef::system())
        .with("served-by-test", ImageDef::RunByTest);
    let kubelet = Kubelet::new(&lab, &api, images)?;
    Ok(Node {
        api,
        kubelet,
        pod,
        _lab: lab,
    })
}

impl Node {
    /// Stores `pod` (its `metadata.name` and [`NS`]) through the API server.
    async fn store(&self, pod: Value) -> anyhow::Result<()> {
        self.api.apply::<Pod>(NS, pod).await
    }

    async fn stored(&self, name: &str) -> anyhow::Result<Pod> {
        Ok(Api::<Pod>::namespaced(self.api.client.clone(), NS)
            .get(name)
            .await?)
    }
}

/// A mount point that no machine has, unique to the test: the harness creates it
/// (and its missing parents) and removes what it created.
fn mount_point(test: &str, what: &str) -> String {
    format!(
        "/run/meshd-kubelet-test-{}/{test}/{what}",
        std::process::id()
    )
}

/// The condition `kind` of a stored pod: "True", "False" or missing.
fn condition(pod: &Pod, kind: &str) -> Option<String> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == kind)
        .map(|c| c.status.clone())
}

#[tokio::test]
async fn an_init_container_writes_an_empty_dir_the_app_serves() -> anyhow::Result<()> {
    let node = node("web").await?;
    let data = mount_point("empty-dir", "data");
    node.store(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web", "namespace": NS},
        "spec": {
            "volumes": [{"name": "data", "emptyDir": {}}, {"name": "inner", "emptyDir": {}}],
            "initContainers": [{
                "name": "write", "image": "sh",
                "command": ["sh", "-c", "echo written-by-init > $(DATA)/index.html; stat -c %a $(DATA) > $(DATA)/mode"],
                "env": [{"name": "DATA", "value": data}],
                "volumeMounts": [{"name": "data", "mountPath": data}]}],
            "containers": [{
                "name": "web", "image": "python",
                "command": ["python3", "-m", "http.server", "8080", "--directory", data],
                "ports": [{"name": "http", "containerPort": 8080}],
                "readinessProbe": {"httpGet": {"path": "/index.html", "port": "http"},
                                   "periodSeconds": 1},
                // A mount inside another: its mount point is made in the volume (which
                // must then be writable, as with runc).
                "volumeMounts": [{"name": "inner", "mountPath": format!("{data}/inner"),
                                  "readOnly": true},
                                 {"name": "data", "mountPath": data}]}]}
    }))
    .await?;
    let pod = node.kubelet.run(&node.pod, NS, "web").await?;
    pod.wait_ready(WAIT).await?;
    let served = pod.probe("web", ProbeKind::Readiness).await?;
    assert!(served.success, "{served:?}");
    assert_eq!(served.status, Some(200));
    assert_eq!(served.detail, "written-by-init\n");
    // The emptyDir is mode 0777 as the kubelet makes it, and the mount is the
    // container's own: the host's mount point stays empty.
    let volume = pod.volume_path("data")?;
    assert_eq!(std::fs::read_to_string(volume.join("mode"))?.trim(), "777");
    assert!(
        volume.join("inner").is_dir(),
        "the nested mount point is not in the volume"
    );
    let on_host: Vec<_> = std::fs::read_dir(&data)?.collect();
    assert!(
        on_host.is_empty(),
        "the bind mount leaked to the host: {on_host:?}"
    );
    pod.stop().await?;
    assert!(
        !Path::new(&data).exists(),
        "the mount point the harness created is still there"
    );
    Ok(())
}

#[tokio::test]
async fn env_comes_from_field_refs_and_command_lines_are_expanded() -> anyhow::Result<()> {
    let node = node("env").await?;
    let out = mount_point("env", "out");
    let env = json!([
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
        {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
        {"name": "NOTE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['note']"}}},
        {"name": "SA", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
        {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
        {"name": "GREETING", "value": "hi $(POD_NAME) $$(POD_NAME) $(LATER) $(NOPE)"},
        {"name": "LATER", "value": "late"},
    ]);
    // The environment the process was started with (os.environ is Python's, which
    // may add LC_CTYPE).
    let dump = "import json, sys; \
                env = dict(v.split('=', 1) for v in open('/proc/self/environ').read().split('\\0') if v); \
                json.dump({'env': env, 'argv': sys.argv[1:]}, open(sys.argv[1], 'w'))";
    node.store(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "env", "namespace": NS,
                     "labels": {"app": "envtest"}, "annotations": {"note": "hello"}},
        "spec": {
            "serviceAccountName": "app",
            "volumes": [{"name": "out", "emptyDir": {}},
                        {"name": "info", "downwardAPI": {"items": [
                            {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
                            {"path": "meta/uid", "fieldRef": {"fieldPath": "metadata.uid"}}]}}],
            "initContainers": [{
                "name": "dump", "image": "python", "env": env,
                "command": ["python3", "-c", dump],
                "args": [format!("{out}/result.json"), "$(POD_NAME)", "$$(POD_IP)", "$(POD_IP)", "$(UNDEFINED)", "$(POD_IP"],
                "volumeMounts": [{"name": "out", "mountPath": out}]}],
            "containers": [{"name": "app", "image": "served-by-test", "env": env}]}
    }))
    .await?;
    let pod = node.kubelet.run(&node.pod, NS, "env").await?;
    let result: Value = serde_json::from_str(&std::fs::read_to_string(
        pod.volume_path("out")?.join("result.json"),
    )?)?;
    let stored = node.stored("env").await?;
    let uid = stored.metadata.uid.context("uid")?;
    let (ip, host_ip) = (node.pod.ip.to_string(), node.kubelet.node_ip().to_string());
    let want: BTreeMap<String, String> = [
        ("POD_NAME", "env"),
        ("POD_NAMESPACE", NS),
        ("POD_UID", uid.as_str()),
        ("APP", "envtest"),
        ("NOTE", "hello"),
        ("SA", "app"),
        ("NODE", node.kubelet.node_name()),
        ("POD_IP", ip.as_str()),
        ("HOST_IP", host_ip.as_str()),
        // Only variables defined before it expand; unknown ones stay as written.
        ("GREETING", "hi env $(POD_NAME) $(LATER) $(NOPE)"),
        ("LATER", "late"),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .into();
    // The process gets exactly its spec's env and its image's PATH, nothing of the test's.
    let mut with_path = want.clone();
    with_path.insert(
        "PATH".into(),
        meshd_integration::kubelet::STANDARD_PATH.join(":"),
    );
    let got: BTreeMap<String, String> = serde_json::from_value(result["env"].clone())?;
    assert_eq!(got, with_path);
    assert_eq!(
        result["argv"],
        json!([
            format!("{out}/result.json"),
            "env",
            "$(POD_IP)",
            ip,
            "$(UNDEFINED)",
            "$(POD_IP"
        ])
    );
    let info = pod.volume_path("info")?;
    assert_eq!(
        std::fs::read_to_string(info.join("labels"))?,
        "app=\"envtest\""
    );
    assert_eq!(std::fs::read_to_string(info.join("meta/uid"))?, uid);
    // An app the test serves gets its env resolved all the same (and no PATH: no image).
    assert_eq!(pod.env("app")?, want);
    Ok(())
}

#[tokio::test]
async fn a_projected_token_is_bound_to_the_pod_and_readable_by_its_non_root_user()
-> anyhow::Result<()> {
    let node = node("token").await?;
    let (tokens, out) = (mount_point("token", "tokens"), mount_point("token", "out"));
    node.store(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "token", "namespace": NS},
        "spec": {
            "serviceAccountName": "app",
            "volumes": [
                {"name": "tokens", "projected": {"sources": [{"serviceAccountToken":
                    {"audience": "kubelet-test", "expirationSeconds": 7200, "path": "sa/token"}}]}},
                {"name": "out", "emptyDir": {}}],
            "initContainers": [{
                "name": "read", "image": "sh",
                "securityContext": {"runAsUser": 1000, "runAsGroup": 1000},
                "command": ["sh", "-c",
                    "id -u > $1/uid; cat $2/sa/token > $1/token; if touch $2/x 2> $1/touch; then echo wrote > $1/touch; fi",
                    "sh", out, tokens],
                "volumeMounts": [{"name": "tokens", "mountPath": tokens, "readOnly": true},
                                 {"name": "out", "mountPath": out}]}],
            "containers": [{"name": "app", "image": "served-by-test",
                            "securityContext": {"runAsUser": 1000}}]}
    }))
    .await?;
    let pod = node.kubelet.run(&node.pod, NS, "token").await?;
    let out = pod.volume_path("out")?;
    assert_eq!(std::fs::read_to_string(out.join("uid"))?.trim(), "1000");
    let touch = std::fs::read_to_string(out.join("touch"))?;
    assert!(touch.contains("Read-only file system"), "{touch}");
    // Every container runs as 1000: the kubelet makes the token that user's, 0600.
    let file = std::fs::metadata(pod.volume_path("tokens")?.join("sa/token"))?;
    assert_eq!((file.mode() & 0o777, file.uid()), (0o600, 1000));

    let token = std::fs::read_to_string(out.join("token"))?;
    let review = Api::<TokenReview>::all(node.api.client.clone())
        .create(
            &Default::default(),
            &TokenReview {
                spec: TokenReviewSpec {
                    token: Some(token.clone()),
                    audiences: Some(vec!["kubelet-test".into()]),
                },
                ..Default::default()
            },
        )
        .await?;
    let status = review.status.context("no review status")?;
    assert_eq!(status.authenticated, Some(true), "{status:?}");
    let user = status.user.context("no user")?;
    assert_eq!(
        user.username.as_deref(),
        Some("system:serviceaccount:kt:app")
    );
    let extra = user.extra.unwrap_or_default();
    assert_eq!(
        extra.get("authentication.kubernetes.io/pod-name"),
        Some(&vec!["token".to_string()]),
        "{extra:?}"
    );
    assert_eq!(
        extra.get("authentication.kubernetes.io/pod-uid"),
        Some(&vec![pod.uid.clone()])
    );
    // The source's expirationSeconds, not the API server's default.
    use base64::Engine;
    let payload = token.split('.').nth(1).context("not a JWT")?;
    let claims: Value =
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload)?)?;
    assert_eq!(
        claims["exp"].as_i64().context("exp")? - claims["iat"].as_i64().context("iat")?,
        7200
    );
    Ok(())
}

#[tokio::test]
async fn capabilities_are_the_specs_and_nothing_more() -> anyhow::Result<()> {
    let node = node("caps").await?;
    let caps = "grep -E '^Cap(Eff|Bnd)' /proc/self/status";
    let container = |name: &str, sc: Value, script: String| {
        json!({"name": name, "image": "sh", "securityContext": sc,
               "command": ["sh", "-c", script]})
    };
    node.store(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "caps", "namespace": NS},
        "spec": {
            "initContainers": [
                container("net-admin",
                    json!({"capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}}),
                    format!("{caps}; ip link add kt0 type veth peer name kt0p")),
                container("non-root",
                    json!({"runAsUser": 1000, "capabilities": {"add": ["NET_ADMIN"]},
                           "allowPrivilegeEscalation": false}),
                    format!("{caps}; grep NoNewPrivs /proc/self/status"))],
            "containers": [{"name": "app", "image": "served-by-test"}]}
    }))
    .await?;
    let pod = node.kubelet.run(&node.pod, NS, "caps").await?;
    let root = pod.logs("net-admin")?;
    assert!(root.contains("CapEff:\t0000000000003000"), "{root}");
    assert!(root.contains("CapBnd:\t0000000000003000"), "{root}");
    node.pod.netns.ip(&["link", "show", "kt0"])?;
    // A non-root user gets no capability even when added (no ambient set), and
    // allowPrivilegeEscalation: false is no_new_privs.
    let user = pod.logs("non-root")?;
    assert!(user.contains("CapEff:\t0000000000000000"), "{user}");
    assert!(user.contains("NoNewPrivs:\t1"), "{user}");
    drop(pod);

    node.store(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "no-caps", "namespace": NS},
        "spec": {
            "initContainers": [container("dropped", json!({"capabilities": {"drop": ["ALL"]}}),
                                         "ip link add kt1 type veth peer name kt1p".into())],
            "containers": [{"name": "app", "image": "served-by-test"}]}
    }))
    .await?;
    let err = node
        .kubelet
        .run(&node.pod, NS, "no-caps")
        .await
        .err()
        .context("root without NET_ADMIN added a link")?;
    let err = format!("{err:#}");
    assert!(err.contains("init container dropped failed"), "{err}");
    assert!(err.contains("Operation not permitted"), "{err}");
    ensure!(node.pod.netns.ip(&["link", "show", "kt1"]).is_err());
    Ok(())
}

#[tokio::test]
async fn native_sidecars_start_first_and_a_startup_probe_holds_the_next_container()
-> anyhow::Result<()> {
    let node = node("sidecars").await?;
    let shared = mount_point("sidecars", "shared");
    let mount = json!([{"name": "shared", "mountPath": shared}]);
    node.store(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "sidecars", "namespace": NS},
        "spec": {
            "terminationGracePeriodSeconds": 5,
            "volumes": [{"name": "shared", "emptyDir": {}}],
            "initContainers": [
                {"name": "plain", "image": "sh", "restartPolicy": "Always",
                 "command": ["sleep", "3600"]},
                // Listens only after 2 s: its startup probe passes then.
                {"name": "slow", "image": "python", "restartPolicy": "Always",
                 "command": ["sh", "-c", "sleep 2; exec python3 -m http.server 9000"],
                 "startupProbe": {"tcpSocket": {"port": 9000}, "periodSeconds": 1,
                                  "failureThreshold": 30}}],
            "containers": [{
                "name": "app", "image": "python", "volumeMounts": mount,
                "command": ["sh", "-c",
                    "python3 -c \"import urllib.request; urllib.request.urlopen('http://127.0.0.1:9000/', timeout=2)\" \
                     && echo reached > $0/app; exec sleep 3600", shared]}]}
    }))
    .await?;
    let pod = node.kubelet.run(&node.pod, NS, "sidecars").await?;
    let at = |c: &str| pod.started_at(c).unwrap().context("not started");
    let (plain, slow, app) = (at("plain")?, at("slow")?, at("app")?);
    assert!(plain < slow && slow < app, "start order");
    assert!(
        app - slow >= Duration::from_secs(2),
        "the app started {:?} after the slow sidecar",
        app - slow
    );
    assert!(pod.pid("plain")?.is_some() && pod.pid("slow")?.is_some());
    let reached = pod.volume_path("shared")?.join("app");
    eventually("the app to reach the sidecar", WAIT, || async {
        Ok(std::fs::read_to_string(&reached)?)
    })
    .await?;
    let stored = node.stored("sidecars").await?;
    let init = stored
        .status
        .and_then(|s| s.init_container_statuses)
        .unwrap_or_default();
    assert!(
        init.iter()
            .all(|s| s.started == Some(true)
                && s.state.as_ref().is_some_and(|st| st.running.is_some())),
        "{init:?}"
    );
    // Stopped as the kubelet does: the app first, then the sidecars, last first.
    let stopped: Vec<String> = pod.stop().await?.into_iter().map(|(n, _)| n).collect();
    assert_eq!(stopped, ["app", "slow", "plain"]);
    Ok(())
}

#[tokio::test]
async fn a_passing_readiness_probe_makes_the_pod_ready_in_the_api_server() -> anyhow::Result<()> {
    let node = node("ready").await?;
    node.store(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "ready", "namespace": NS},
        "spec": {"containers": [{
            "name": "web", "image": "python",
            "command": ["sh", "-c", "sleep 3; exec python3 -m http.server 8080"],
            "ports": [{"name": "http", "containerPort": 8080}],
            "readinessProbe": {"httpGet": {"port": "http", "path": "/"}, "periodSeconds": 1}}]}
    }))
    .await?;
    let pod = node.kubelet.run(&node.pod, NS, "ready").await?;
    let stored = node.stored("ready").await?;
    let status = stored.status.clone().context("no status")?;
    assert_eq!(status.phase.as_deref(), Some("Running"));
    assert_eq!(status.pod_ip, Some(node.pod.ip.to_string()));
    assert_eq!(status.host_ip, Some(node.kubelet.node_ip().to_string()));
    assert_eq!(condition(&stored, "Ready").as_deref(), Some("False"));
    let api = Api::<Pod>::namespaced(node.api.client.clone(), NS);
    eventually(
        "the Ready condition True in the API server",
        WAIT,
        || async {
            let pod = api.get("ready").await?;
            ensure!(
                condition(&pod, "Ready").as_deref() == Some("True"),
                "{:?}",
                pod.status
            );
            Ok(())
        },
    )
    .await?;
    assert!(pod.ready());
    // Each condition keeps the time it last changed: Ready changed seconds after the
    // pod was scheduled (the app listens after 3 s).
    let stored = api.get("ready").await?;
    let since = |kind: &str| {
        stored
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == kind))
            .and_then(|c| c.last_transition_time.clone())
            .map(|t| t.0)
            .with_context(|| format!("no {kind} transition time"))
    };
    assert!(
        since("Ready")? > since("PodScheduled")?,
        "{:?}",
        stored.status
    );
    Ok(())
}

/// What an app the test serves saw of one probe request.
#[derive(Debug, Clone, Default)]
struct Seen {
    headers: BTreeMap<String, String>,
    peer: Option<std::net::SocketAddr>,
}

#[tokio::test]
async fn probes_are_sent_from_the_node_as_the_kubelet_sends_them() -> anyhow::Result<()> {
    let node = node("probes").await?;
    // An HTTP app that records each request's headers and peer, and a gRPC health
    // service, both served by the test in the pod.
    let seen = Arc::new(Mutex::new(Seen::default()));
    let listener = node.pod.netns.listen(node.pod.addr(8080)).await?;
    let record = seen.clone();
    let app = axum::Router::new().fallback(
        move |axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<
            std::net::SocketAddr,
        >,
              headers: axum::http::HeaderMap| {
            let record = record.clone();
            async move {
                *record.lock().unwrap() = Seen {
                    headers: headers
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                        .collect(),
                    peer: Some(peer),
                };
                (axum::http::StatusCode::IM_A_TEAPOT, "short and stout")
            }
        },
    );
    let http = tokio::spawn(async move {
        let _ = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .await;
    });
    let (health, service) = tonic_health::server::health_reporter();
    health
        .set_service_status("kt.Ready", tonic_health::ServingStatus::Serving)
        .await;
    let grpc_listener = node.pod.netns.listen(node.pod.addr(9090)).await?;
    let grpc = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(
                grpc_listener,
            )),
    );
    node.store(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "probes", "namespace": NS},
        "spec": {"containers": [{
            "name": "app", "image": "served-by-test",
            "ports": [{"name": "web", "containerPort": 8080}],
            "readinessProbe": {"httpGet": {"port": "web", "path": "/healthz?x=1",
                "httpHeaders": [{"name": "X-Probe", "value": "yes"},
                                {"name": "Host", "value": "probe.example"}]}},
            "livenessProbe": {"tcpSocket": {"port": 8081}},
            "startupProbe": {"grpc": {"port": 9090, "service": "kt.Ready"}}}]}
    }))
    .await?;
    let pod = node.kubelet.run(&node.pod, NS, "probes").await?;

    let ready = pod.probe("app", ProbeKind::Readiness).await?;
    assert!(!ready.success, "418 is a failure: {ready:?}");
    assert_eq!(ready.status, Some(418));
    assert_eq!(ready.detail, "short and stout");
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen.peer.map(|p| p.ip()),
        Some(node.kubelet.node_ip().into())
    );
    for (header, want) in [
        ("user-agent", "kube-probe/1.33"),
        ("accept", "*/*"),
        ("x-probe", "yes"),
        ("host", "probe.example"),
        ("connection", "close"),
    ] {
        let got = seen.headers.get(header).map(String::as_str);
        assert_eq!(got, Some(want), "{header}: {seen:?}");
    }

    let tcp = pod.probe("app", ProbeKind::Liveness).await?;
    assert!(!tcp.success, "nothing listens on 8081: {tcp:?}");
    let startup = pod.probe("app", ProbeKind::Startup).await?;
    assert!(startup.success, "{startup:?}");
    health
        .set_service_status("kt.Ready", tonic_health::ServingStatus::NotServing)
        .await;
    let startup = pod.probe("app", ProbeKind::Startup).await?;
    assert!(!startup.success, "{startup:?}");
    http.abort();
    grpc.abort();
    Ok(())
}

#[tokio::test]
async fn a_failing_init_container_fails_the_start_with_its_output() -> anyhow::Result<()> {
    let node = node("failing").await?;
    let marker = mount_point("failing", "marker");
    node.store(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "failing", "namespace": NS},
        "spec": {
            "volumes": [{"name": "m", "emptyDir": {}}],
            "initContainers": [{"name": "fail", "image": "sh",
                "command": ["sh", "-c", "echo init-says-no; echo on-stderr >&2; exit 3"]}],
            "containers": [{"name": "app", "image": "sh",
                "volumeMounts": [{"name": "m", "mountPath": marker}],
                "command": ["sh", "-c", "touch $0/ran; sleep 3600", marker]}]}
    }))
    .await?;
    let err = node
        .kubelet
        .run(&node.pod, NS, "failing")
        .await
        .err()
        .context("the pod started")?;
    let err = format!("{err:#}");
    assert!(
        err.contains("init container fail failed (exit status: 3)"),
        "{err}"
    );
    assert!(
        err.contains("init-says-no") && err.contains("on-stderr"),
        "{err}"
    );
    let status = node.stored("failing").await?.status.context("no status")?;
    let init = &status.init_container_statuses.unwrap_or_default()[0];
    let terminated = init.state.as_ref().and_then(|s| s.terminated.as_ref());
    assert_eq!(terminated.map(|t| t.exit_code), Some(3), "{init:?}");
    let app = &status.container_statuses.unwrap_or_default()[0];
    assert!(
        app.state.as_ref().is_some_and(|s| s.waiting.is_some()),
        "{app:?}"
    );
    assert_eq!(status.phase.as_deref(), Some("Pending"));
    assert!(
        !Path::new(&marker).exists(),
        "the app's mount point was made"
    );
    Ok(())
}

#[tokio::test]
async fn pods_the_harness_cannot_run_are_refused_naming_the_field() -> anyhow::Result<()> {
    let node = node("refused").await?;
    let cases = [
        (
            json!({"containers": [{"name": "web", "image": "nginx:1.27"}]}),
            "container web: image \"nginx:1.27\" is not in the test's image table",
        ),
        (
            json!({"volumes": [{"name": "host", "hostPath": {"path": "/etc"}}],
                   "containers": [{"name": "web", "image": "served-by-test"}]}),
            "volume host: only emptyDir, configMap, secret, downwardAPI and projected",
        ),
        (
            json!({"containers": [{"name": "web", "image": "served-by-test",
                   "env": [{"name": "CPU", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}}]}]}),
            "container web: env CPU: valueFrom.resourceFieldRef is not supported",
        ),
        (
            json!({"hostNetwork": true, "containers": [{"name": "web", "image": "served-by-test"}]}),
            "spec.hostNetwork is not supported",
        ),
        (
            json!({"containers": [{"name": "web", "image": "served-by-test",
                   "readinessProbe": {"exec": {"command": ["true"]}}}]}),
            "exec probes are not supported",
        ),
    ];
    for (i, (spec, want)) in cases.into_iter().enumerate() {
        let name = format!("refused-{i}");
        node.store(json!({"apiVersion": "v1", "kind": "Pod",
                          "metadata": {"name": name, "namespace": NS}, "spec": spec}))
            .await?;
        let err = match node.kubelet.run(&node.pod, NS, &name).await {
            Ok(pod) if want.starts_with("exec") => {
                // Probes run after the start: the probe itself is refused.
                format!(
                    "{:#}",
                    pod.probe("web", ProbeKind::Readiness).await.unwrap_err()
                )
            }
            Ok(_) => anyhow::bail!("pod {name} started"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains(want), "{name}: {err}");
    }
    // A ConfigMap volume waits for its ConfigMap and honours items.
    let (config, file) = (
        mount_point("refused", "config"),
        mount_point("refused", "b.txt"),
    );
    node.store(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "config", "namespace": NS},
        "spec": {"volumes": [{"name": "cm", "configMap": {"name": "late",
                     "items": [{"key": "b", "path": "dir/b.txt"}]}}],
                 "initContainers": [{"name": "read", "image": "sh",
                     "volumeMounts": [{"name": "cm", "mountPath": config},
                                      {"name": "cm", "mountPath": file, "subPath": "dir/b.txt"}],
                     "command": ["sh", "-c", "ls $0; cat $0/dir/b.txt; echo; cat $1", config, file]}],
                 "containers": [{"name": "web", "image": "served-by-test"}]}}))
        .await?;
    let later = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        node.api
            .apply::<k8s_openapi::api::core::v1::ConfigMap>(
                NS,
                json!({"apiVersion": "v1", "kind": "ConfigMap",
                       "metadata": {"name": "late", "namespace": NS},
                       "data": {"a": "not asked for", "b": "asked for"}}),
            )
            .await
    };
    let (pod, created) = tokio::join!(node.kubelet.run(&node.pod, NS, "config"), later);
    created?;
    let logs = pod?.logs("read")?;
    assert_eq!(logs, "dir\nasked for\nasked for");
    assert!(!Path::new(&file).exists(), "the file mount point is left");
    Ok(())
}

#[tokio::test]
async fn an_images_entrypoint_runs_with_the_containers_args_as_a_non_root_user()
-> anyhow::Result<()> {
    init_test_logging();
    // An image as the injection test builds one: a BinDir holding Envoy.
    let bin = BinDir::new()?.add("envoy", &meshd_integration::tools::envoy_binary()?)?;
    let api = KubeApi::start_bare().await?;
    api.create_namespace(NS, &[]).await?;
    let lab = Lab::new()?;
    let lab_pod = lab.pod("proxy")?;
    let images = Images::new()
        .with(
            "proxy",
            ImageDef::process([bin.path()]).with_entrypoint(&["envoy"]),
        )
        .with("served-by-test", ImageDef::RunByTest);
    let kubelet = Kubelet::new(&lab, &api, images)?;
    api.apply::<Pod>(
        NS,
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "proxy", "namespace": NS},
               "spec": {
                   "initContainers": [{"name": "version", "image": "proxy", "args": ["--version"],
                       "securityContext": {"runAsUser": 1337, "runAsGroup": 1337}}],
                   "containers": [{"name": "app", "image": "served-by-test"}]}}),
    )
    .await?;
    let pod = kubelet.run(&lab_pod, NS, "proxy").await?;
    assert_eq!(pod.argv("version")?, ["envoy", "--version"]);
    let version = pod.logs("version")?;
    assert!(
        version.contains(meshd_integration::tools::ENVOY_VERSION),
        "{version}"
    );
    Ok(())
}
