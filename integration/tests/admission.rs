//! Pod security admission through a real API server, which calls meshd's validating
//! (and mutating) webhook for real: the chart's webhook configurations pointed at
//! meshd, WorkloadPolicies as CRD objects read by meshd's Kubernetes source, and every
//! case sent by the real `kubectl create --dry-run=server`, so what is asserted is what
//! a user sees: `Error from server ... denied the request: ...`, `Warning: ...`, or
//! the object admitted.
//!
//! The table covers every control of `baseline` and `restricted` failing (and pods
//! passing), each rule beyond the standards, `requireMesh`, exemptions, Warn, Audit
//! (admitted and counted in `/metrics`), several policies at once, the templates of
//! every workload kind, meshd's injected containers passing and hand-made copies
//! failing; `meshctl admission check` on the same objects gives the same verdicts
//! and messages. Then: a policy change applies to the next request and an invalid one is
//! refused (`Accepted=False`) while the version in force stays; an injected pod is
//! stored and admitted under `restricted`; objects the webhook cannot read are denied;
//! with meshd gone, `failurePolicy: Fail` refuses, and meshd's own namespace is never
//! sent to the webhook.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use meshd::sources::crd::WorkloadPolicy;
use meshd_integration::init_test_logging;
use meshd_integration::kube_api::KubeApi;
use meshd_integration::meshd::Meshd;
use meshd_integration::net::free_port;
use meshd_integration::tools::kubectl_binary;
use meshd_integration::wait::eventually;
use meshd_integration::webhook::{self, WebhookClient};
use serde_json::{Value, json};

const INJECT_CONFIG: &str = "proxyImage: registry.example.com/meshd-proxy:9.9.9\n";
const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

struct Cluster {
    api: KubeApi,
    meshd: Meshd,
    webhook: SocketAddr,
    bundle: String,
    _inject_config: tempfile::NamedTempFile,
}

async fn cluster() -> anyhow::Result<Cluster> {
    init_test_logging();
    let api = KubeApi::start().await?;
    let port = free_port();
    webhook::install(&api, &format!("https://localhost:{port}/inject")).await?;
    webhook::install_validating(&api, &format!("https://localhost:{port}/validate")).await?;
    let inject_config = tempfile::NamedTempFile::new()?;
    std::fs::write(inject_config.path(), INJECT_CONFIG)?;
    let webhook: SocketAddr = ([127, 0, 0, 1], port).into();
    let (meshd, bundle) = webhook::start_meshd(&api, webhook, inject_config.path(), true).await?;
    Ok(Cluster {
        api,
        meshd,
        webhook,
        bundle,
        _inject_config: inject_config,
    })
}

/// What kubectl showed.
#[derive(Debug)]
struct Answer {
    admitted: bool,
    /// stderr: warnings, or the error.
    stderr: String,
}

/// Runs the real kubectl against `api` with `object` on stdin.
async fn kubectl(api: &KubeApi, args: &[&str], object: &Value) -> anyhow::Result<Answer> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(kubectl_binary()?)
        .args(args)
        .env("KUBECONFIG", api.kubeconfig())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut stdin = child.stdin.take().context("stdin")?;
    stdin.write_all(object.to_string().as_bytes()).await?;
    drop(stdin);
    let out = child.wait_with_output().await?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    // Client-side noise of the test server's schemaless OpenAPI (see its README).
    let stderr = stderr
        .lines()
        .filter(|l| !l.contains("error calculating patch from openapi"))
        .collect::<Vec<_>>()
        .join("\n");
    Ok(Answer {
        admitted: out.status.success(),
        stderr,
    })
}

impl Cluster {
    /// `kubectl create --dry-run=server` of `object` in `ns`.
    async fn kubectl_create(&self, ns: &str, object: &Value) -> anyhow::Result<Answer> {
        self.kubectl(
            &[
                "create",
                "--dry-run=server",
                "-n",
                ns,
                "-o",
                "name",
                "-f",
                "-",
            ],
            object,
        )
        .await
    }

    async fn kubectl(&self, args: &[&str], object: &Value) -> anyhow::Result<Answer> {
        kubectl(&self.api, args, object).await
    }

    async fn policy(&self, ns: &str, name: &str, spec: Value) -> anyhow::Result<()> {
        self.api
            .apply::<WorkloadPolicy>(
                ns,
                json!({"apiVersion": "security.meshd.io/v1alpha1", "kind": "WorkloadPolicy",
                       "metadata": {"name": name, "namespace": ns}, "spec": spec}),
            )
            .await
    }

    /// Waits until meshd's snapshot holds `n` WorkloadPolicies.
    async fn wait_policies(&self, n: usize) -> anyhow::Result<()> {
        eventually(
            "meshd holds the policies",
            Duration::from_secs(20),
            || async {
                let got = self.meshd.snapshot().await?.workload_policies;
                ensure!(got == n, "{got} of {n} policies");
                Ok(())
            },
        )
        .await
    }
}

/// A container that keeps `restricted` and every rule.
fn clean_container(name: &str) -> Value {
    json!({
        "name": name,
        "image": format!("registry.example.com/shop/web:1.0@{DIGEST}"),
        "securityContext": {
            "runAsNonRoot": true, "allowPrivilegeEscalation": false,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
            "readOnlyRootFilesystem": true,
        },
        "resources": {"limits": {"cpu": "1", "memory": "128Mi"}},
    })
}

/// A pod that keeps `restricted` and every rule, changed by `change`.
fn pod(name: &str, change: impl FnOnce(&mut Value)) -> Value {
    let mut p = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {"serviceAccountName": "web", "containers": [clean_container("app")]},
    });
    change(&mut p);
    p
}

/// `pod`'s first container.
fn app(p: &mut Value) -> &mut Value {
    &mut p["spec"]["containers"][0]
}

/// A workload of `kind` whose template is `pod`.
fn workload(api_version: &str, kind: &str, name: &str, pod: Value) -> Value {
    let mut template = json!({"metadata": pod["metadata"].clone(), "spec": pod["spec"].clone()});
    template["metadata"]
        .as_object_mut()
        .expect("metadata")
        .remove("name");
    if matches!(kind, "Job" | "CronJob") {
        template["spec"]["restartPolicy"] = json!("Never");
    }
    let selector = json!({"matchLabels": pod["metadata"]["labels"].clone()});
    let spec = match kind {
        "CronJob" => {
            json!({"schedule": "* * * * *", "jobTemplate": {"spec": {"template": template}}})
        }
        "Job" => json!({"template": template}),
        "StatefulSet" => json!({"serviceName": name, "selector": selector, "template": template}),
        _ => json!({"selector": selector, "template": template}),
    };
    json!({"apiVersion": api_version, "kind": kind, "metadata": {"name": name}, "spec": spec})
}

#[derive(Debug, Clone, Copy)]
enum Expect {
    Admitted,
    /// Denied; the message holds all of these.
    Denied(&'static [&'static str]),
    /// Admitted with `Warning:` lines holding all of these.
    Warned(&'static [&'static str]),
}

struct Case {
    name: &'static str,
    ns: &'static str,
    object: Value,
    expect: Expect,
}

fn case(name: &'static str, ns: &'static str, object: Value, expect: Expect) -> Case {
    Case {
        name,
        ns,
        object,
        expect,
    }
}

/// The meshd-init container meshd injects, as a user might copy it into a pod.
fn init_copy(change: impl FnOnce(&mut Value)) -> Value {
    let mut c = json!({
        "name": "meshd-init", "image": "registry.example.com/meshd-proxy:9.9.9",
        "imagePullPolicy": "IfNotPresent", "command": ["meshd-agent"], "args": ["init"],
        "resources": {"limits": {"memory": "64Mi"}, "requests": {"cpu": "10m", "memory": "16Mi"}},
        "securityContext": {
            "runAsUser": 0, "runAsGroup": 0, "runAsNonRoot": false, "privileged": false,
            "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": false,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    });
    change(&mut c);
    c
}

fn table() -> Vec<Case> {
    use Expect::*;
    let sc = |c: &mut Value, key: &str, v: Value| c["securityContext"][key] = v;
    let mut t = vec![
        // baseline: every control failing, and a pod with no security settings passing.
        case(
            "baseline passes a plain pod",
            "baseline",
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "plain"},
                   "spec": {"containers": [{"name": "app", "image": "nginx"}]}}),
            Admitted,
        ),
        case(
            "appArmorProfile",
            "baseline",
            pod("a", |p| {
                sc(app(p), "appArmorProfile", json!({"type": "Unconfined"}))
            }),
            Denied(&[
                "denied by baseline/baseline (Enforce)",
                "container \"app\"",
                "appArmorProfile",
                "[appArmorProfile]",
            ]),
        ),
        case(
            "capabilities_baseline",
            "baseline",
            pod("a", |p| {
                sc(app(p), "capabilities", json!({"add": ["SYS_ADMIN"]}))
            }),
            Denied(&["container \"app\"", "SYS_ADMIN", "[capabilities_baseline]"]),
        ),
        case(
            "hostNamespaces",
            "baseline",
            pod("a", |p| p["spec"]["hostPID"] = json!(true)),
            Denied(&["hostPID", "[hostNamespaces]"]),
        ),
        case(
            "hostPathVolumes",
            "baseline",
            pod("a", |p| {
                p["spec"]["volumes"] = json!([{"name": "h", "hostPath": {"path": "/etc"}}])
            }),
            Denied(&["\"h\"", "[hostPathVolumes]"]),
        ),
        case(
            "hostPorts",
            "baseline",
            pod("a", |p| {
                app(p)["ports"] = json!([{"containerPort": 80, "hostPort": 8080}])
            }),
            Denied(&["container \"app\"", "8080", "[hostPorts]"]),
        ),
        case(
            "privileged",
            "baseline",
            pod("a", |p| sc(app(p), "privileged", json!(true))),
            Denied(&[
                "container \"app\"",
                "securityContext.privileged",
                "[privileged]",
            ]),
        ),
        case(
            "procMount",
            "baseline",
            pod("a", |p| sc(app(p), "procMount", json!("Unmasked"))),
            Denied(&["container \"app\"", "procMount", "[procMount]"]),
        ),
        case(
            "seLinuxOptions",
            "baseline",
            pod("a", |p| {
                sc(app(p), "seLinuxOptions", json!({"type": "spc_t"}))
            }),
            Denied(&["container \"app\"", "spc_t", "[seLinuxOptions]"]),
        ),
        case(
            "seccompProfile_baseline",
            "baseline",
            pod("a", |p| {
                sc(app(p), "seccompProfile", json!({"type": "Unconfined"}))
            }),
            Denied(&[
                "container \"app\"",
                "Unconfined",
                "[seccompProfile_baseline]",
            ]),
        ),
        case(
            "sysctls",
            "baseline",
            pod(
                "a",
                |p| {
                    p["spec"]["securityContext"] =
                        json!({"sysctls": [{"name": "kernel.msgmax", "value": "1"}]})
                },
            ),
            Denied(&["kernel.msgmax", "[sysctls]"]),
        ),
        case(
            "windowsHostProcess",
            "baseline",
            pod("a", |p| {
                sc(app(p), "windowsOptions", json!({"hostProcess": true}))
            }),
            Denied(&["container \"app\"", "hostProcess", "[windowsHostProcess]"]),
        ),
        // restricted: every control of its own failing, a baseline one too, a clean pod passing.
        case(
            "restricted passes a clean pod",
            "restricted",
            pod("a", |_| {}),
            Admitted,
        ),
        case(
            "allowPrivilegeEscalation",
            "restricted",
            pod("a", |p| {
                app(p)["securityContext"]
                    .as_object_mut()
                    .unwrap()
                    .remove("allowPrivilegeEscalation");
            }),
            Denied(&[
                "denied by restricted/restricted (Enforce)",
                "container \"app\"",
                "allowPrivilegeEscalation",
                "[allowPrivilegeEscalation]",
            ]),
        ),
        case(
            "capabilities_restricted",
            "restricted",
            pod("a", |p| {
                sc(app(p), "capabilities", json!({"drop": ["NET_RAW"]}))
            }),
            Denied(&["container \"app\"", "ALL", "[capabilities_restricted]"]),
        ),
        case(
            "restrictedVolumes",
            "restricted",
            pod("a", |p| {
                p["spec"]["volumes"] = json!([{"name": "n", "nfs": {"server": "s", "path": "/"}}])
            }),
            Denied(&["\"n\"", "nfs", "[restrictedVolumes]"]),
        ),
        case(
            "runAsNonRoot",
            "restricted",
            pod("a", |p| sc(app(p), "runAsNonRoot", json!(false))),
            Denied(&["container \"app\"", "runAsNonRoot", "[runAsNonRoot]"]),
        ),
        case(
            "runAsUser",
            "restricted",
            pod("a", |p| sc(app(p), "runAsUser", json!(0))),
            Denied(&["container \"app\"", "runAsUser", "[runAsUser]"]),
        ),
        case(
            "seccompProfile_restricted",
            "restricted",
            pod("a", |p| {
                app(p)["securityContext"]
                    .as_object_mut()
                    .unwrap()
                    .remove("seccompProfile");
            }),
            Denied(&[
                "container \"app\"",
                "seccompProfile",
                "[seccompProfile_restricted]",
            ]),
        ),
        case(
            "restricted includes baseline",
            "restricted",
            pod("a", |p| sc(app(p), "privileged", json!(true))),
            Denied(&["container \"app\"", "[privileged]"]),
        ),
        case(
            "every violation at once",
            "restricted",
            pod("a", |p| {
                sc(app(p), "runAsNonRoot", json!(false));
                sc(app(p), "privileged", json!(true));
                p["spec"]["containers"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!({"name": "side", "image": "x"}));
            }),
            Denied(&[
                "container \"app\": securityContext.privileged",
                "container \"app\": securityContext.runAsNonRoot",
                "container \"side\"",
                "; ",
            ]),
        ),
        // The rules beyond the standards.
        case(
            "rules pass a clean pod",
            "rules",
            pod("a", |_| {}),
            Admitted,
        ),
        case(
            "readOnlyRootFilesystem",
            "rules",
            pod("a", |p| sc(app(p), "readOnlyRootFilesystem", json!(false))),
            Denied(&[
                "denied by rules/rules (Enforce)",
                "container \"app\": securityContext.readOnlyRootFilesystem must be true [readOnlyRootFilesystem]",
            ]),
        ),
        case(
            "allowedRegistries",
            "rules",
            pod("a", |p| {
                app(p)["image"] = json!(format!("nginx:1.25@{DIGEST}"))
            }),
            Denied(&[
                "container \"app\": image \"nginx:1.25@",
                "registry docker.io is not allowed",
                "[allowedRegistries]",
            ]),
        ),
        case(
            "requireImageDigest",
            "rules",
            pod("a", |p| {
                app(p)["image"] = json!("registry.example.com/shop/web:1.0")
            }),
            Denied(&["must be pinned by digest", "[requireImageDigest]"]),
        ),
        case(
            "forbidLatestTag",
            "rules",
            pod("a", |p| {
                app(p)["image"] = json!(format!("registry.example.com/shop/web:latest@{DIGEST}"))
            }),
            Denied(&["uses the tag latest", "[forbidLatestTag]"]),
        ),
        case(
            "requireResourceLimits",
            "rules",
            pod("a", |p| {
                app(p)["resources"] = json!({"limits": {"memory": "1Gi"}})
            }),
            Denied(&["resources.limits must set cpu", "[requireResourceLimits]"]),
        ),
        case(
            "forbidDefaultServiceAccount",
            "rules",
            pod("a", |p| {
                p["spec"]
                    .as_object_mut()
                    .unwrap()
                    .remove("serviceAccountName");
            }),
            Denied(&[
                "spec.serviceAccountName must name",
                "[forbidDefaultServiceAccount]",
            ]),
        ),
        // requireMesh in a STRICT namespace (meshd's default mTLS).
        case(
            "requireMesh: hostNetwork",
            "mesh",
            pod("a", |p| p["spec"]["hostNetwork"] = json!(true)),
            Denied(&["spec.hostNetwork must be false", "[requireMesh]"]),
        ),
        case(
            "requireMesh: opting out",
            "mesh",
            pod("a", |p| {
                p["metadata"]["labels"]["meshd.io/inject"] = json!("false")
            }),
            Denied(&["must not be \"false\"", "[requireMesh]"]),
        ),
        case(
            "requireMesh: no sidecar",
            "mesh",
            pod("a", |_| {}),
            Denied(&["no meshd sidecar", "[requireMesh]"]),
        ),
        case(
            "requireMesh: opted in, injected",
            "mesh",
            pod("a", |p| {
                p["metadata"]["labels"]["meshd.io/inject"] = json!("true")
            }),
            Admitted,
        ),
        // Warn: admitted with kubectl's warning text, one per violation.
        case(
            "Warn",
            "warn",
            pod("a", |p| {
                sc(app(p), "runAsNonRoot", json!(false));
                sc(app(p), "runAsUser", json!(0));
            }),
            Warned(&[
                "Warning: meshd warn/restricted (Warn): container \"app\": securityContext.runAsNonRoot",
                "Warning: meshd warn/restricted (Warn): container \"app\": securityContext.runAsUser",
            ]),
        ),
        // Audit: admitted without a word (counted: see the test).
        case(
            "Audit",
            "audit",
            pod("a", |p| sc(app(p), "runAsNonRoot", json!(false))),
            Admitted,
        ),
        // Exemptions by container, image and ServiceAccount, and only those.
        case(
            "exempt container",
            "exempt",
            pod("a", |p| {
                p["spec"]["containers"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!({"name": "debug", "image": "busybox"}))
            }),
            Admitted,
        ),
        case(
            "exempt image",
            "exempt",
            pod("a", |p| {
                p["spec"]["containers"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!({"name": "tool", "image": "registry.example.com/ops/tool:1"}))
            }),
            Admitted,
        ),
        case(
            "exempt ServiceAccount",
            "exempt",
            pod("a", |p| {
                p["spec"]["serviceAccountName"] = json!("legacy");
                sc(app(p), "privileged", json!(true));
            }),
            Admitted,
        ),
        case(
            "not exempt",
            "exempt",
            pod("a", |p| {
                p["spec"]["containers"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!({"name": "other", "image": "busybox"}))
            }),
            Denied(&[
                "denied by exempt/restricted (Enforce)",
                "container \"other\"",
            ]),
        ),
        // Several policies: the root namespace's for tier=prod namespaces, and the namespace's own.
        case(
            "several policies",
            "prod",
            pod("a", |p| {
                app(p)["image"] = json!("nginx:latest");
                sc(app(p), "privileged", json!(true));
            }),
            Denied(&[
                "denied by meshd-system/no-latest (Enforce): container \"app\": image \"nginx:latest\" uses the tag latest [forbidLatestTag]",
                "Warning: meshd prod/baseline (Warn): container \"app\": securityContext.privileged",
            ]),
        ),
        case(
            "a root policy outside its namespaceSelector",
            "dev",
            pod("a", |p| app(p)["image"] = json!("nginx:latest")),
            Admitted,
        ),
        // meshd's injected containers pass; hand-made copies are judged like any other.
        case(
            "injected pod under restricted",
            "meshed",
            pod("a", |_| {}),
            Admitted,
        ),
        case(
            "hand-made meshd-init",
            "restricted",
            pod("a", |p| {
                p["spec"]["initContainers"] = json!([init_copy(|_| {})])
            }),
            Denied(&[
                "container \"meshd-init\"",
                "[runAsNonRoot]",
                "[capabilities_restricted]",
            ]),
        ),
        case(
            "meshd-init copy with another image",
            "baseline",
            pod("a", |p| {
                p["spec"]["initContainers"] = json!([init_copy(
                    |c| c["image"] = json!("evil.example/meshd-proxy:9.9.9")
                )])
            }),
            Denied(&[
                "container \"meshd-init\"",
                "NET_ADMIN",
                "[capabilities_baseline]",
            ]),
        ),
    ];
    // Every workload kind's template: bad ones denied at once, a good one admitted.
    let bad = || pod("w", |p| sc(app(p), "runAsNonRoot", json!(false)));
    for (api_version, kind, name) in [
        ("apps/v1", "Deployment", "bad Deployment"),
        ("apps/v1", "StatefulSet", "bad StatefulSet"),
        ("apps/v1", "DaemonSet", "bad DaemonSet"),
        ("apps/v1", "ReplicaSet", "bad ReplicaSet"),
        ("batch/v1", "Job", "bad Job"),
        ("batch/v1", "CronJob", "bad CronJob"),
    ] {
        t.push(case(name, "restricted", workload(api_version, kind, "w", bad()),
            Denied(&["denied by restricted/restricted (Enforce): container \"app\": securityContext.runAsNonRoot must be true, not false [runAsNonRoot]"])));
    }
    t.push(case(
        "good Deployment",
        "restricted",
        workload("apps/v1", "Deployment", "w", pod("w", |_| {})),
        Admitted,
    ));
    t.push(case(
        "Deployment with an unmeshable template",
        "mesh",
        workload("apps/v1", "Deployment", "w", pod("w", |_| {})),
        Denied(&["no meshd sidecar", "[requireMesh]"]),
    ));
    t.push(case(
        "Deployment whose pods will be injected",
        "mesh",
        workload(
            "apps/v1",
            "Deployment",
            "w",
            pod("w", |p| {
                p["metadata"]["labels"]["meshd.io/inject"] = json!("true")
            }),
        ),
        Admitted,
    ));
    t
}

/// The table's namespaces and their labels.
const NAMESPACES: [(&str, &[(&str, &str)]); 10] = [
    ("baseline", &[]),
    ("restricted", &[]),
    ("rules", &[]),
    ("mesh", &[]),
    ("warn", &[]),
    ("audit", &[]),
    ("exempt", &[]),
    ("prod", &[("tier", "prod")]),
    ("dev", &[("tier", "dev")]),
    ("meshed", &[("meshd.io/inject", "enabled")]),
];

/// The table's WorkloadPolicies: namespace, name, spec.
fn policies() -> Vec<(&'static str, &'static str, Value)> {
    vec![
        (
            "baseline",
            "baseline",
            json!({"mode": "Enforce", "profile": "baseline"}),
        ),
        (
            "restricted",
            "restricted",
            json!({"mode": "Enforce", "profile": "restricted"}),
        ),
        (
            "rules",
            "rules",
            json!({"mode": "Enforce", "rules": {
            "readOnlyRootFilesystem": true, "allowedRegistries": ["registry.example.com/"],
            "requireImageDigest": true, "forbidLatestTag": true, "requireResourceLimits": true,
            "forbidDefaultServiceAccount": true}}),
        ),
        (
            "mesh",
            "require-mesh",
            json!({"mode": "Enforce", "rules": {"requireMesh": true}}),
        ),
        (
            "warn",
            "restricted",
            json!({"mode": "Warn", "profile": "restricted"}),
        ),
        (
            "audit",
            "restricted",
            json!({"mode": "Audit", "profile": "restricted"}),
        ),
        (
            "exempt",
            "restricted",
            json!({"mode": "Enforce", "profile": "restricted", "exemptions": [
            {"container": "debug", "reason": "break glass"},
            {"image": "registry.example.com/ops/*", "reason": "ops tools"},
            {"serviceAccount": "legacy", "reason": "being migrated"}]}),
        ),
        (
            "meshd-system",
            "no-latest",
            json!({"mode": "Enforce",
            "namespaceSelector": {"matchLabels": {"tier": "prod"}}, "rules": {"forbidLatestTag": true}}),
        ),
        (
            "prod",
            "baseline",
            json!({"mode": "Warn", "profile": "baseline"}),
        ),
        (
            "meshed",
            "restricted",
            json!({"mode": "Enforce", "profile": "restricted",
            "rules": {"requireMesh": true}}),
        ),
    ]
}

async fn install_policies(c: &Cluster) -> anyhow::Result<()> {
    for (ns, labels) in NAMESPACES {
        c.api.create_namespace(ns, labels).await?;
    }
    let all = policies();
    for (ns, name, spec) in &all {
        c.policy(ns, name, spec.clone()).await?;
    }
    c.wait_policies(all.len()).await
}

/// Whether the API server sends `case`'s object through the injection webhook first.
fn injected_by_the_api_server(case: &Case) -> bool {
    let label = case.object["metadata"]["labels"]["meshd.io/inject"].as_str();
    case.object["kind"] == "Pod"
        && label != Some("false")
        && (case.ns == "meshed" || label == Some("true"))
}

/// `meshctl admission check` on the table written as files (the policies and
/// namespaces in a `--policy` file; a pod the API server would inject first through
/// `meshctl inject`): the same verdict as the webhook for every case, and every
/// denial's message word for word.
async fn offline_verdicts_match(
    c: &Cluster,
    table: &[Case],
    answers: &[Answer],
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let yaml = |docs: &[Value]| -> anyhow::Result<String> {
        let docs: Result<Vec<String>, _> = docs.iter().map(serde_saphyr::to_string).collect();
        Ok(docs?.join("---\n"))
    };
    let mut defs: Vec<Value> = NAMESPACES
        .iter()
        .map(|(ns, labels)| {
            let labels: serde_json::Map<String, Value> =
                labels.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": labels}})
        })
        .collect();
    defs.extend(policies().into_iter().map(|(ns, name, spec)| {
        json!({"apiVersion": "security.meshd.io/v1alpha1", "kind": "WorkloadPolicy",
               "metadata": {"name": name, "namespace": ns}, "spec": spec})
    }));
    let policy_file = dir.path().join("policies.yaml");
    std::fs::write(&policy_file, yaml(&defs)?)?;
    // The settings meshd injects with, as `kubectl get configmap` would give them.
    let inject_config = dir.path().join("inject.yaml");
    std::fs::write(
        &inject_config,
        format!(
            "{INJECT_CONFIG}meshdNamespace: {}\n",
            c.meshd.meshd_namespace()
        ),
    )?;
    let cases = dir.path().join("cases");
    std::fs::create_dir(&cases)?;
    for (i, case) in table.iter().enumerate() {
        let mut object = case.object.clone();
        object["metadata"]["namespace"] = json!(case.ns);
        let mut text = yaml(&[object])?;
        if injected_by_the_api_server(case) {
            let raw = dir.path().join(format!("raw-{i}.yaml"));
            std::fs::write(&raw, &text)?;
            let out = c
                .meshd
                .meshctl(&[
                    "inject",
                    "-f",
                    path(&raw)?,
                    "--inject-config",
                    path(&inject_config)?,
                ])
                .await?;
            ensure!(
                out.status.success(),
                "meshctl inject: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            text = String::from_utf8(out.stdout)?;
        }
        std::fs::write(cases.join(format!("case-{i:03}.yaml")), text)?;
    }
    let out = c
        .meshd
        .meshctl(&[
            "admission",
            "check",
            "-f",
            path(&cases)?,
            "--policy",
            path(&policy_file)?,
            "--inject-config",
            path(&inject_config)?,
            "-o",
            "json",
        ])
        .await?;
    let report: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("meshctl: {}", String::from_utf8_lossy(&out.stderr)))?;
    let objects = report["objects"].as_array().context("objects")?;
    ensure!(
        objects.len() == table.len(),
        "{} objects checked of {}",
        objects.len(),
        table.len()
    );
    let mut mismatches = Vec::new();
    for object in objects {
        let file = object["file"].as_str().context("file")?;
        let i: usize = file
            .rsplit_once("case-")
            .and_then(|(_, n)| n.strip_suffix(".yaml"))
            .context("case file")?
            .parse()?;
        let (case, answer) = (&table[i], &answers[i]);
        let offline = match object["mode"].as_str() {
            Some("Enforce") => "denied",
            Some("Warn") => "warned",
            _ => "admitted",
        };
        let webhook = match (answer.admitted, answer.stderr.contains("Warning: meshd")) {
            (false, _) => "denied",
            (true, true) => "warned",
            (true, false) => "admitted",
        };
        let messages: Vec<&str> = object["messages"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .filter(|m| m.starts_with("denied by"))
            .collect();
        if offline != webhook || messages.iter().any(|m| !answer.stderr.contains(m)) {
            mismatches.push(format!(
                "{} (in {}): webhook {webhook}, meshctl {offline} {messages:?}; kubectl:\n{}",
                case.name, case.ns, answer.stderr
            ));
        }
    }
    ensure!(
        mismatches.is_empty(),
        "{} cases differ:\n{}",
        mismatches.len(),
        mismatches.join("\n\n")
    );
    Ok(())
}

fn path(p: &std::path::Path) -> anyhow::Result<&str> {
    p.to_str().context("a UTF-8 path")
}

fn judge(case: &Case, answer: &Answer) -> Result<(), String> {
    let ok = match case.expect {
        Expect::Admitted => answer.admitted && !answer.stderr.contains("Warning"),
        Expect::Denied(parts) => {
            !answer.admitted
                && answer.stderr.contains("denied the request")
                && parts.iter().all(|p| answer.stderr.contains(p))
        }
        Expect::Warned(parts) => answer.admitted && parts.iter().all(|p| answer.stderr.contains(p)),
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{} (in {}): expected {:?}, kubectl: admitted={}, stderr:\n{}",
            case.name, case.ns, case.expect, answer.admitted, answer.stderr
        ))
    }
}

#[tokio::test]
async fn the_table_through_the_api_server() -> anyhow::Result<()> {
    let c = cluster().await?;
    install_policies(&c).await?;
    let table = table();
    ensure!(table.len() >= 40, "{} cases", table.len());
    let mut failures = Vec::new();
    let mut answers = Vec::new();
    for case in &table {
        let answer = c.kubectl_create(case.ns, &case.object).await?;
        eprintln!("{} (in {}):\n{}", case.name, case.ns, answer.stderr);
        if let Err(e) = judge(case, &answer) {
            failures.push(e);
        }
        answers.push(answer);
    }
    ensure!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        table.len(),
        failures.join("\n\n")
    );
    offline_verdicts_match(&c, &table, &answers).await?;
    // Audit admitted the pod and counted its violation.
    let metrics = c.meshd.metrics().await?;
    ensure!(
        metrics.lines().any(
            |l| l.starts_with("meshd_admission_policy_violations_total{")
                && l.contains("policy=\"audit/restricted\"")
                && l.contains("mode=\"Audit\"")
                && l.contains("rule=\"runAsNonRoot\"")
                && !l.ends_with(" 0")
        ),
        "no Audit count in:\n{}",
        metrics
            .lines()
            .filter(|l| l.contains("admission"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    Ok(())
}

#[tokio::test]
async fn policy_changes_apply_to_the_next_request_and_injected_pods_are_admitted()
-> anyhow::Result<()> {
    let c = cluster().await?;
    c.api
        .create_namespace("shop", &[("meshd.io/inject", "enabled")])
        .await?;
    let privileged = pod("p", |p| {
        app(p)["securityContext"]["privileged"] = json!(true)
    });
    ensure!(
        c.kubectl_create("shop", &privileged).await?.admitted,
        "no policy yet"
    );

    c.policy(
        "shop",
        "baseline",
        json!({"mode": "Enforce", "profile": "baseline"}),
    )
    .await?;
    c.wait_policies(1).await?;
    let answer = c.kubectl_create("shop", &privileged).await?;
    ensure!(
        !answer.admitted && answer.stderr.contains("denied by shop/baseline (Enforce)"),
        "{answer:?}"
    );
    // Enforce → Warn: the next request is admitted with the warning.
    let before = c.meshd.snapshot().await?.version;
    c.policy(
        "shop",
        "baseline",
        json!({"mode": "Warn", "profile": "baseline"}),
    )
    .await?;
    c.meshd.wait_snapshot_after(before).await?;
    let answer = c.kubectl_create("shop", &privileged).await?;
    ensure!(
        answer.admitted
            && answer
                .stderr
                .contains("Warning: meshd shop/baseline (Warn)"),
        "{answer:?}"
    );

    // An invalid policy is not accepted, names the field, and the version in force stays.
    c.policy(
        "shop",
        "baseline",
        json!({"mode": "Deny", "profile": "baseline"}),
    )
    .await?;
    let policies: Api<WorkloadPolicy> = Api::namespaced(c.api.client.clone(), "shop");
    let message = eventually("Accepted=False", Duration::from_secs(20), || async {
        let p = policies.get("baseline").await?;
        let status = p.status.context("no status")?;
        let accepted = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Accepted")
            .context("no Accepted condition")?;
        ensure!(
            accepted.status == "False"
                && accepted.observed_generation == p.metadata.generation.unwrap_or(0),
            "{accepted:?}"
        );
        Ok(accepted.message.clone())
    })
    .await?;
    ensure!(
        message.contains("spec.mode") && message.contains("\"Deny\" is not a mode"),
        "{message}"
    );
    let answer = c.kubectl_create("shop", &privileged).await?;
    ensure!(
        answer.admitted
            && answer
                .stderr
                .contains("Warning: meshd shop/baseline (Warn)"),
        "the accepted version (Warn) still applies: {answer:?}"
    );

    // restricted enforced on an injected namespace: the pod is stored, injected, admitted.
    c.policy(
        "shop",
        "baseline",
        json!({"mode": "Enforce", "profile": "restricted",
        "rules": {"requireMesh": true, "readOnlyRootFilesystem": true}}),
    )
    .await?;
    c.meshd.wait_snapshot_after(before + 1).await?;
    let answer = c
        .kubectl(&["create", "-n", "shop", "-f", "-"], &pod("web-0", |_| {}))
        .await?;
    ensure!(answer.admitted, "{answer:?}");
    let stored = Api::<Pod>::namespaced(c.api.client.clone(), "shop")
        .get("web-0")
        .await?;
    let inits: Vec<_> = stored
        .spec
        .iter()
        .flat_map(|s| s.init_containers.iter().flatten())
        .map(|c| c.name.as_str())
        .collect();
    ensure!(inits == ["meshd-init", "meshd-proxy"], "{inits:?}");
    // The same pod written by hand with meshd-init's capability raised is denied.
    let mut copy = serde_json::to_value(&stored)?;
    copy["metadata"] = json!({"name": "copy", "labels": {"meshd.io/inject": "false"}});
    copy["spec"]["initContainers"][0]["securityContext"]["capabilities"]["add"] =
        json!(["NET_ADMIN", "NET_RAW", "SYS_ADMIN"]);
    copy.as_object_mut().unwrap().remove("status");
    let answer = c.kubectl_create("shop", &copy).await?;
    ensure!(
        !answer.admitted
            && answer.stderr.contains("container \"meshd-init\"")
            && answer.stderr.contains("SYS_ADMIN"),
        "{answer:?}"
    );
    Ok(())
}

#[tokio::test]
async fn unreadable_objects_are_denied_bad_reviews_get_400_and_an_unreachable_meshd_fails_closed()
-> anyhow::Result<()> {
    let c = cluster().await?;
    let mut client = WebhookClient::new(c.webhook, &c.bundle)?;
    let review = |object: Value, group: &str, version: &str, kind: &str| {
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
            "uid": "u1", "kind": {"group": group, "version": version, "kind": kind},
            "resource": {"group": group, "version": version, "resource": "x"},
            "name": "w", "namespace": "shop", "operation": "CREATE",
            "userInfo": {"username": "test"}, "object": object}})
    };
    let bad = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "w"},
        "spec": {"template": {"spec": {"containers": [{"name": "app", "ports": [{"containerPort": "x"}]}]}}}});
    let (status, body) = post(&mut client, review(bad, "apps", "v1", "Deployment")).await?;
    ensure!(status == 200, "{status} {body}");
    let answer: Value = serde_json::from_str(&body)?;
    ensure!(answer["response"]["allowed"] == json!(false), "{answer}");
    let message = answer["response"]["status"]["message"]
        .as_str()
        .unwrap_or_default();
    ensure!(
        message.starts_with("meshd cannot read Deployment shop/w: spec.template.spec.containers[0].ports[0].containerPort: invalid type"),
        "{message}"
    );
    let no_template =
        json!({"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "w"}, "spec": {}});
    let (_, body) = post(&mut client, review(no_template, "batch", "v1", "CronJob")).await?;
    ensure!(
        body.contains("spec.jobTemplate.spec.template: is required"),
        "{body}"
    );
    // A ConfigMap is none of its business.
    let (_, body) = post(
        &mut client,
        review(
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "w"}}),
            "",
            "v1",
            "ConfigMap",
        ),
    )
    .await?;
    ensure!(
        serde_json::from_str::<Value>(&body)?["response"]["allowed"] == json!(true),
        "{body}"
    );
    for body in [
        json!({}),
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}),
        json!({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview", "request": {}}),
    ] {
        let (status, text) = post(&mut client, body).await?;
        ensure!(status == 400 && !text.trim().is_empty(), "{status} {text}");
    }

    // meshd unreachable: failurePolicy Fail refuses what it would check; meshd's own
    // namespace is never sent to it.
    c.api.create_namespace("shop", &[]).await?;
    c.api.create_namespace("meshd-system", &[]).await?;
    let Cluster { meshd, api, .. } = c;
    meshd.terminate().await?;
    let dry_run = |ns: &'static str| {
        [
            "create",
            "--dry-run=server",
            "-n",
            ns,
            "-o",
            "name",
            "-f",
            "-",
        ]
    };
    let answer = kubectl(&api, &dry_run("shop"), &pod("p", |_| {})).await?;
    ensure!(
        !answer.admitted
            && answer
                .stderr
                .contains("failed calling webhook \"validate.meshd.io\""),
        "{answer:?}"
    );
    let answer = kubectl(&api, &dry_run("meshd-system"), &pod("p", |_| {})).await?;
    ensure!(
        answer.admitted,
        "meshd's namespace waited on meshd: {answer:?}"
    );
    Ok(())
}

async fn post(client: &mut WebhookClient, body: Value) -> anyhow::Result<(u16, String)> {
    let (status, body) = client.post("/validate", serde_json::to_vec(&body)?).await?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}
