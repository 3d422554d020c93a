use k8s_openapi::api::core::v1::{Container, PodSpec};
use serde_json::{Value, json};

use super::*;

fn pod(extra_meta: Value, spec: Value) -> Value {
    let mut meta = json!({"name": "web-0", "labels": {"app": "web"}});
    if let (Some(m), Some(extra)) = (meta.as_object_mut(), extra_meta.as_object()) {
        m.extend(extra.clone());
    }
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec})
}

fn app() -> Value {
    json!({"containers": [{"name": "app", "image": "shop/web:1", "ports": [{"name": "http", "containerPort": 8080}]}]})
}

fn injected(object: &Value) -> (ObjectMeta, PodSpec) {
    let config = InjectConfig::default();
    let (outcome, patch) = super::patch(object, "shop", &config).unwrap();
    assert_eq!(outcome, Outcome::Injected);
    let mut after = object.clone();
    json_patch::patch(&mut after, &patch).unwrap();
    let template: PodTemplateSpec = serde_json::from_value(after).unwrap();
    (template.metadata.unwrap(), template.spec.unwrap())
}

fn container<'a>(list: &'a [Container], name: &str) -> &'a Container {
    list.iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

#[test]
fn a_pod_gets_the_init_container_the_native_sidecar_and_their_volumes() {
    let mut spec = app();
    spec["initContainers"] = json!([{"name": "migrate", "image": "shop/migrate:1"}]);
    let (meta, spec) = injected(&pod(json!({}), spec));
    let inits = spec.init_containers.as_deref().unwrap();
    let names: Vec<&str> = inits.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        ["meshd-init", "meshd-proxy", "migrate"],
        "ours first, the app's after"
    );

    let init = &inits[0];
    assert_eq!(init.args.as_deref().unwrap(), ["init"]);
    let caps = init
        .security_context
        .as_ref()
        .unwrap()
        .capabilities
        .as_ref()
        .unwrap();
    assert_eq!(caps.add.as_deref().unwrap(), ["NET_ADMIN", "NET_RAW"]);
    assert_eq!(caps.drop.as_deref().unwrap(), ["ALL"]);

    let sidecar = &inits[1];
    assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
    assert_eq!(sidecar.args.as_deref().unwrap(), ["run"]);
    let security = sidecar.security_context.as_ref().unwrap();
    assert_eq!(security.run_as_user, Some(1337));
    assert_eq!(security.read_only_root_filesystem, Some(true));
    let ready = sidecar
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(ready.path.as_deref(), Some("/healthz/ready"));
    assert_eq!(ready.port, IntOrStringInt(15020));
    let env = |name: &str| {
        sidecar
            .env
            .iter()
            .flatten()
            .find(|e| e.name == name)
            .unwrap_or_else(|| panic!("no env {name}"))
            .clone()
    };
    assert_eq!(
        env("MESHD_XDS_ADDRESS").value.as_deref(),
        Some("meshd.meshd-system.svc:15012")
    );
    assert_eq!(
        env("POD_IP")
            .value_from
            .unwrap()
            .field_ref
            .unwrap()
            .field_path,
        "status.podIP"
    );

    let volumes: Vec<&str> = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect();
    assert_eq!(
        volumes,
        ["meshd-agent", "meshd-token", "meshd-trust-bundle"]
    );
    let token = spec.volumes.as_ref().unwrap()[1]
        .projected
        .as_ref()
        .unwrap()
        .sources
        .as_ref()
        .unwrap()[0]
        .service_account_token
        .clone()
        .unwrap();
    assert_eq!(token.audience.as_deref(), Some("meshd"));
    assert_eq!(token.expiration_seconds, Some(3600));

    let annotations = meta.annotations.unwrap();
    assert_eq!(annotations["meshd.io/capture"], "transparent");
    assert_eq!(annotations[INJECTED_ANNOTATION], env!("CARGO_PKG_VERSION"));
    assert_eq!(spec.containers.len(), 1, "the app's containers stay");
}

#[allow(non_snake_case)]
fn IntOrStringInt(n: i32) -> k8s_openapi::apimachinery::pkg::util::intstr::IntOrString {
    k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n)
}

#[test]
fn capture_annotations_become_the_init_containers_arguments() {
    let (_, spec) = injected(&pod(
        json!({"annotations": {
            "meshd.io/exclude-outbound-ports": "5432, 6379",
            "meshd.io/exclude-inbound-ports": "9090",
        }}),
        app(),
    ));
    let init = container(spec.init_containers.as_deref().unwrap(), "meshd-init");
    assert_eq!(
        init.args.as_deref().unwrap(),
        [
            "init",
            "--exclude-outbound-ports=5432,6379",
            "--exclude-inbound-ports=9090"
        ]
    );
}

#[test]
fn explicit_capture_needs_no_init_container() {
    let (meta, spec) = injected(&pod(
        json!({"annotations": {"meshd.io/capture": "explicit"}}),
        app(),
    ));
    let names: Vec<&str> = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(names, ["meshd-proxy"]);
    assert_eq!(meta.annotations.unwrap()["meshd.io/capture"], "explicit");
}

#[test]
fn probes_go_through_the_agent_and_the_originals_are_kept() {
    let spec = json!({"containers": [{
        "name": "app", "image": "shop/web:1",
        "ports": [{"name": "http", "containerPort": 8080}],
        "readinessProbe": {"httpGet": {"path": "/ready", "port": "http",
            "httpHeaders": [{"name": "X-Probe", "value": "1"}]}, "periodSeconds": 7, "timeoutSeconds": 2},
        "livenessProbe": {"tcpSocket": {"port": 8080}},
        "startupProbe": {"grpc": {"port": 9090, "service": "shop"}},
    }, {
        "name": "worker", "image": "shop/worker:1",
        "livenessProbe": {"exec": {"command": ["true"]}},
    }]});
    let (meta, spec) = injected(&pod(json!({}), spec));
    let app = container(&spec.containers, "app");
    let ready = app.readiness_probe.as_ref().unwrap();
    let get = ready.http_get.as_ref().unwrap();
    assert_eq!(get.path.as_deref(), Some("/app-health/app/readyz"));
    assert_eq!(get.port, IntOrStringInt(15020));
    assert_eq!(
        (ready.period_seconds, ready.timeout_seconds),
        (Some(7), Some(2)),
        "timings stay"
    );
    let live = app.liveness_probe.as_ref().unwrap();
    assert!(live.tcp_socket.is_none());
    assert_eq!(
        live.http_get.as_ref().unwrap().path.as_deref(),
        Some("/app-health/app/livez")
    );
    let startup = app.startup_probe.as_ref().unwrap();
    assert!(startup.grpc.is_none());
    assert_eq!(
        startup.http_get.as_ref().unwrap().path.as_deref(),
        Some("/app-health/app/startupz")
    );
    let worker = container(&spec.containers, "worker");
    assert!(
        worker.liveness_probe.as_ref().unwrap().exec.is_some(),
        "exec stays"
    );

    let originals =
        AppProbes::from_json(&meta.annotations.unwrap()[ORIGINAL_PROBES_ANNOTATION]).unwrap();
    use meshd_sidecar::probes::{Check, HttpScheme};
    let readiness = originals.get("/app-health/app/readyz").unwrap();
    assert_eq!(readiness.timeout_seconds, 2);
    match &readiness.check {
        Check::HttpGet {
            port,
            path,
            scheme,
            headers,
            ..
        } => {
            assert_eq!(
                (*port, path.as_str(), *scheme),
                (8080, "/ready", HttpScheme::Http),
                "named port resolved"
            );
            assert_eq!(headers[0].name, "X-Probe");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        originals.get("/app-health/app/livez").unwrap().check,
        Check::TcpSocket { port: 8080, .. }
    ));
    assert!(
        matches!(&originals.get("/app-health/app/startupz").unwrap().check, Check::Grpc { port: 9090, service } if service == "shop")
    );
    let sidecar = container(spec.init_containers.as_deref().unwrap(), "meshd-proxy");
    let env = sidecar
        .env
        .iter()
        .flatten()
        .find(|e| e.name == meshd_sidecar::probes::ENV)
        .unwrap();
    assert_eq!(
        AppProbes::from_json(env.value.as_deref().unwrap()).unwrap(),
        originals
    );
}

#[test]
fn pods_that_are_not_injected_get_no_patch() {
    let config = InjectConfig::default();
    let cases = [
        (
            pod(json!({"labels": {"meshd.io/inject": "false"}}), app()),
            Reason::OptedOut,
        ),
        (
            pod(
                json!({}),
                json!({"hostNetwork": true, "containers": [{"name": "a", "image": "a"}]}),
            ),
            Reason::HostNetwork,
        ),
        (
            pod(
                json!({"labels": {"app.kubernetes.io/part-of": "meshd", "app.kubernetes.io/component": "control-plane"}}),
                app(),
            ),
            Reason::Meshd,
        ),
    ];
    for (object, reason) in cases {
        let (outcome, patch) = super::patch(&object, "shop", &config).unwrap();
        assert_eq!(outcome, Outcome::LeftAlone(reason));
        assert!(patch.0.is_empty(), "{reason:?}: {patch:?}");
    }
}

#[test]
fn a_second_pass_changes_nothing() {
    let config = InjectConfig::default();
    let object = pod(json!({}), app());
    let (_, patch) = super::patch(&object, "shop", &config).unwrap();
    let mut once = object.clone();
    json_patch::patch(&mut once, &patch).unwrap();
    let (outcome, again) = super::patch(&once, "shop", &config).unwrap();
    assert_eq!(outcome, Outcome::LeftAlone(Reason::AlreadyInjected));
    assert!(again.0.is_empty(), "{again:?}");
}

#[test]
fn invalid_pods_are_refused_with_the_field_named() {
    let config = InjectConfig::default();
    let mut reserved = app();
    reserved["containers"][0]["ports"] = json!([{"containerPort": 15020}]);
    let mut clash = app();
    clash["volumes"] = json!([{"name": "meshd-token", "emptyDir": {}}]);
    let mut named = app();
    named["containers"][0]["readinessProbe"] = json!({"httpGet": {"port": "metrics"}});
    for (object, field) in [
        (
            pod(
                json!({"annotations": {"meshd.io/exclude-outbound-ports": "http"}}),
                app(),
            ),
            "meshd.io/exclude-outbound-ports",
        ),
        (
            pod(json!({"annotations": {"meshd.io/capture": "magic"}}), app()),
            "meshd.io/capture",
        ),
        (
            pod(
                json!({"annotations": {"meshd.io/upstreams": "nope"}}),
                app(),
            ),
            "meshd.io/upstreams",
        ),
        (
            pod(
                json!({"annotations": {"meshd.io/egress-port": "15300"}}),
                app(),
            ),
            "meshd.io/egress-port",
        ),
        (
            pod(json!({}), reserved),
            "spec.containers[0].ports[0].containerPort",
        ),
        (pod(json!({}), clash), "spec.volumes[0].name"),
        (
            pod(json!({}), named),
            "spec.containers[0].readinessProbe.httpGet.port",
        ),
        (pod(json!({}), json!({"containers": "app"})), "containers"),
    ] {
        let err = super::patch(&object, "shop", &config).unwrap_err();
        assert!(err.field.contains(field), "{field}: {err}");
    }
}

#[test]
fn meshctl_inject_fills_pod_templates_and_leaves_other_objects() {
    let text = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: settings}
data: {a: b}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: app, image: "shop/web:1"}]
      someFutureField: kept
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: nightly}
spec:
  schedule: "0 3 * * *"
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: OnFailure
          containers: [{name: job, image: "shop/job:1"}]
---
apiVersion: v1
kind: List
items:
  - apiVersion: apps/v1
    kind: DaemonSet
    metadata: {name: agent}
    spec:
      selector: {matchLabels: {app: agent}}
      template:
        metadata: {labels: {app: agent}}
        spec:
          hostNetwork: true
          containers: [{name: a, image: "a:1"}]
"#;
    let (yaml, report) = manifests::inject_yaml(text, &InjectConfig::default()).unwrap();
    assert_eq!(report.injected, ["Deployment/web", "CronJob/nightly"]);
    assert_eq!(report.left_alone.len(), 1, "{report:?}");
    assert!(
        report.left_alone[0].starts_with("DaemonSet/agent"),
        "{report:?}"
    );
    let docs: Vec<Value> = serde_saphyr::from_multiple(&yaml).unwrap();
    assert_eq!(docs.len(), 4);
    assert_eq!(docs[0]["data"]["a"], "b");
    let web = &docs[1]["spec"]["template"];
    assert_eq!(web["spec"]["initContainers"][1]["name"], "meshd-proxy");
    assert_eq!(
        web["spec"]["someFutureField"], "kept",
        "fields meshd does not know stay"
    );
    assert_eq!(
        web["metadata"]["annotations"]["meshd.io/capture"],
        "transparent"
    );
    let job = &docs[2]["spec"]["jobTemplate"]["spec"]["template"]["spec"];
    assert_eq!(job["initContainers"][1]["restartPolicy"], "Always");
    assert!(
        docs[3]["items"][0]["spec"]["template"]["spec"]
            .get("initContainers")
            .is_none()
    );
}

#[test]
fn a_refused_template_fails_the_run_with_document_and_field() {
    let text = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  template:\n    metadata:\n      annotations: {meshd.io/exclude-inbound-ports: \"x\"}\n    spec:\n      containers: [{name: app, image: a}]\n";
    let err = manifests::inject_yaml(text, &InjectConfig::default()).unwrap_err();
    assert!(
        err.starts_with("document 1: Deployment/web: spec.template.metadata.annotations"),
        "{err}"
    );
    assert!(err.contains("meshd.io/exclude-inbound-ports"), "{err}");
}
