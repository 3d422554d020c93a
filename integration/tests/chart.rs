//! The Helm chart, rendered and installed by real Helm 4: lint, Kubernetes schemas, the
//! values schema, quoting, release-derived names, Pod Security `restricted`, the ports
//! and NetworkPolicy, and CRDs that `helm upgrade` keeps current.

use std::collections::BTreeSet;

use anyhow::{Context, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use meshd_integration::chart::{Rendered, chart_dir, helm_ok, refused, render};
use meshd_integration::kube_api::KubeApi;
use serde_json::{Value, json};

const NS: &str = "meshd-system";
/// The Kubernetes versions the rendered manifests must be valid for: the one the chart
/// targets (meshd's client API, k8s-openapi `v1_33`) and the newest schemas
/// kubernetes-validate ships.
const KUBERNETES: [&str; 2] = ["1.33.0", "1.37.0"];

fn deployment(r: &Rendered) -> anyhow::Result<&Value> {
    r.one("Deployment")
}

fn meshd_container(r: &Rendered) -> anyhow::Result<&Value> {
    let containers = &deployment(r)?["spec"]["template"]["spec"]["containers"];
    containers
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "meshd"))
        .context("the Deployment has no meshd container")
}

fn args(r: &Rendered) -> anyhow::Result<Vec<Value>> {
    Ok(meshd_container(r)?["args"]
        .as_array()
        .context("the meshd container has no args")?
        .clone())
}

#[test]
fn helm_lint_strict_passes() -> anyhow::Result<()> {
    let chart = chart_dir();
    let out = helm_ok(&["lint", "--strict", chart.to_str().context("chart path")?])?;
    ensure!(out.contains("0 chart(s) failed"), "helm lint: {out}");
    Ok(())
}

#[test]
fn default_values_render_valid_manifests() -> anyhow::Result<()> {
    let r = render("meshd", NS, &[])?;
    for version in KUBERNETES {
        r.validate(version)?;
    }
    let kinds: BTreeSet<_> = r.names().into_iter().map(|(kind, _, _)| kind).collect();
    for kind in [
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Service",
        "Deployment",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ConfigMap",
        "MutatingWebhookConfiguration",
    ] {
        ensure!(kinds.contains(kind), "no {kind} rendered: {kinds:?}");
    }
    let pod = &deployment(&r)?["spec"]["template"]["spec"];
    ensure!(
        pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
            ["topologyKey"]
            == "kubernetes.io/hostname",
        "replicas do not prefer distinct nodes: {}",
        pod["affinity"]
    );
    let container = meshd_container(&r)?;
    ensure!(
        container["startupProbe"]["httpGet"]["path"] == "/healthz",
        "no startup probe: {container}"
    );
    // The CA service reviews pod tokens.
    let role = r.one("ClusterRole")?;
    ensure!(
        role["rules"]
            .as_array()
            .is_some_and(|rules| rules.iter().any(|rule| {
                rule["apiGroups"][0] == "authentication.k8s.io"
                    && rule["resources"][0] == "tokenreviews"
                    && rule["verbs"][0] == "create"
            })),
        "meshd may not create TokenReviews: {role}"
    );
    for want in ["--token-audience=meshd", "--outbound-policy=allow-any"] {
        ensure!(
            args(&r)?.contains(&Value::from(want)),
            "no {want}: {:?}",
            args(&r)?
        );
    }
    Ok(())
}

#[test]
fn custom_values_render_valid_manifests() -> anyhow::Result<()> {
    let values = tempfile::NamedTempFile::new()?;
    std::fs::write(
        values.path(),
        "networkPolicy:\n  healthFrom:\n    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: monitoring}}\n      podSelector: {matchLabels: {app.kubernetes.io/name: prometheus}}\n\
         tolerations: [{key: dedicated, operator: Equal, value: mesh, effect: NoSchedule}]\n\
         nodeSelector: {kubernetes.io/os: linux}\n",
    )?;
    let values = values.path().to_str().context("temp path")?;
    let three = render(
        "mesh-prod",
        "mesh",
        &[
            "--set",
            "replicaCount=3",
            "--set",
            "mtlsMode=PERMISSIVE",
            "--set",
            "outboundPolicy=registry-only",
            "--set-string",
            "namespaceSelector=meshd.io/mesh=enabled",
            "-f",
            values,
        ],
    )?;
    let off = render(
        "meshd",
        NS,
        &[
            "--set",
            "networkPolicy.enabled=false",
            "--set",
            "podDisruptionBudget.enabled=false",
            "--set",
            "crds.install=false",
        ],
    )?;
    for r in [&three, &off] {
        for version in KUBERNETES {
            r.validate(version)?;
        }
    }

    ensure!(deployment(&three)?["spec"]["replicas"] == 3);
    ensure!(deployment(&three)?["metadata"]["name"] == "mesh-prod-meshd");
    let pdb = three.one("PodDisruptionBudget")?;
    ensure!(
        pdb["spec"]["maxUnavailable"] == 1,
        "a drain may take every replica: {pdb}"
    );
    let arguments = args(&three)?;
    for want in [
        "--mtls-mode=PERMISSIVE",
        "--outbound-policy=registry-only",
        "--namespace=mesh",
        "--namespace-selector=meshd.io/mesh=enabled",
    ] {
        ensure!(
            arguments.contains(&json!(want)),
            "no {want} in {arguments:?}"
        );
    }
    let policy = three.one("NetworkPolicy")?;
    let health_rule = policy["spec"]["ingress"]
        .as_array()
        .and_then(|rules| rules.iter().find(|r| r["ports"][0]["port"] == 15021))
        .context("no health rule in the NetworkPolicy")?;
    ensure!(
        health_rule["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
            == "monitoring",
        "healthFrom not applied: {health_rule}"
    );

    for kind in [
        "NetworkPolicy",
        "PodDisruptionBudget",
        "CustomResourceDefinition",
    ] {
        ensure!(off.all(kind).is_empty(), "{kind} rendered though disabled");
    }
    Ok(())
}

/// The `injection` values reach meshd's injection template (the ConfigMap meshd reads
/// with --inject-config parses as meshd parses it) and the webhook configuration.
#[test]
fn injection_values_reach_the_template_and_the_webhook() -> anyhow::Result<()> {
    let config_of = |r: &Rendered| -> anyhow::Result<meshd::inject::InjectConfig> {
        let map = r
            .objects
            .iter()
            .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == "meshd-inject")
            .context("no meshd-inject ConfigMap")?;
        let text = map["data"]["config.yaml"]
            .as_str()
            .context("no config.yaml")?;
        meshd::inject::InjectConfig::parse(text).map_err(anyhow::Error::msg)
    };
    let default = render("meshd", NS, &[])?;
    let config = config_of(&default)?;
    ensure!(config.proxy_image == "meshd-proxy:0.1.0", "{config:?}");
    ensure!(config.xds_address() == "meshd.meshd-system.svc:15012");
    ensure!(config.meshd_namespace() == NS && config.default_capture == "transparent");
    let webhooks = default.one("MutatingWebhookConfiguration")?;
    ensure!(webhooks["metadata"]["name"] == "meshd-meshd-system");
    for webhook in webhooks["webhooks"].as_array().context("webhooks")? {
        ensure!(webhook["failurePolicy"] == "Fail", "{webhook}");
        ensure!(
            webhook["clientConfig"]["service"]
                == json!({"name": "meshd", "namespace": NS, "path": "/inject", "port": 443}),
            "{webhook}"
        );
        // meshd's own namespace never waits on meshd.
        ensure!(
            webhook["namespaceSelector"]["matchExpressions"][0]
                == json!({"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": [NS]}),
            "{webhook}"
        );
    }
    let arguments = args(&default)?;
    for want in [
        "--webhook-address=0.0.0.0:15017",
        "--webhook-service=meshd",
        "--webhook-configuration=meshd-meshd-system",
        "--inject-config=/etc/meshd/inject/config.yaml",
    ] {
        ensure!(
            arguments.contains(&json!(want)),
            "no {want} in {arguments:?}"
        );
    }

    let custom = render(
        "meshd",
        "mesh",
        &[
            "--set",
            "injection.proxy.image.repository=registry.example/meshd-proxy",
            "--set",
            "injection.proxy.image.tag=1.2.3",
            "--set",
            "injection.proxy.resources.limits.memory=512Mi",
            "--set",
            "injection.proxy.logLevel=debug",
            "--set",
            "injection.failurePolicy=Ignore",
            "--set",
            "injection.url=https://meshd.example:15017/inject",
            "--set",
            "trustDomain=prod.example",
        ],
    )?;
    for version in KUBERNETES {
        custom.validate(version)?;
    }
    let config = config_of(&custom)?;
    ensure!(
        config.proxy_image == "registry.example/meshd-proxy:1.2.3",
        "{config:?}"
    );
    ensure!(config.log_level == "debug" && config.trust_domain() == "prod.example");
    ensure!(config.xds_address() == "meshd.mesh.svc:15012");
    ensure!(
        config
            .resources
            .limits
            .as_ref()
            .map(|l| l["memory"].0.as_str())
            == Some("512Mi"),
        "{config:?}"
    );
    let webhook = &custom.one("MutatingWebhookConfiguration")?["webhooks"][0];
    ensure!(webhook["failurePolicy"] == "Ignore");
    ensure!(
        webhook["clientConfig"] == json!({"url": "https://meshd.example:15017/inject"}),
        "{webhook}"
    );

    let off = render(
        "meshd",
        NS,
        &[
            "--set",
            "injection.enabled=false",
            "--set",
            "admission.enabled=false",
        ],
    )?;
    let kinds: BTreeSet<_> = off.names().into_iter().map(|(kind, _, _)| kind).collect();
    ensure!(!kinds.contains("MutatingWebhookConfiguration") && !kinds.contains("ConfigMap"));
    ensure!(
        !args(&off)?
            .iter()
            .any(|a| a.as_str().is_some_and(|a| a.starts_with("--webhook"))),
        "{:?}",
        args(&off)?
    );
    Ok(())
}

/// The `admission` values reach the ValidatingWebhookConfiguration; admission alone
/// (injection off) still serves the webhook port and reads the injection template,
/// which is how it recognises meshd's own containers.
#[test]
fn admission_values_reach_the_validating_webhook() -> anyhow::Result<()> {
    let default = render("meshd", NS, &[])?;
    let config = default.one("ValidatingWebhookConfiguration")?;
    ensure!(config["metadata"]["name"] == "meshd-meshd-system");
    let webhook = &config["webhooks"][0];
    ensure!(webhook["name"] == "validate.meshd.io" && webhook["failurePolicy"] == "Fail");
    ensure!(
        webhook["clientConfig"]["service"]
            == json!({"name": "meshd", "namespace": NS, "path": "/validate", "port": 443}),
        "{webhook}"
    );
    ensure!(
        webhook["namespaceSelector"]["matchExpressions"][0]
            == json!({"key": "kubernetes.io/metadata.name", "operator": "NotIn",
                      "values": [NS, "kube-system"]}),
        "{webhook}"
    );
    let resources: Vec<&Value> = webhook["rules"]
        .as_array()
        .context("rules")?
        .iter()
        .flat_map(|r| r["resources"].as_array().into_iter().flatten())
        .collect();
    ensure!(
        resources
            == [
                "pods",
                "pods/ephemeralcontainers",
                "deployments",
                "statefulsets",
                "daemonsets",
                "replicasets",
                "jobs",
                "cronjobs"
            ],
        "{resources:?}"
    );
    // The Lease holder may write exactly this configuration's caBundle.
    let role = default
        .objects
        .iter()
        .find(|o| o["kind"] == "ClusterRole")
        .context("no ClusterRole")?;
    ensure!(
        role["rules"].as_array().context("rules")?.iter().any(|r| {
            r["resources"]
                == json!([
                    "mutatingwebhookconfigurations",
                    "validatingwebhookconfigurations"
                ])
                && r["resourceNames"] == json!(["meshd-meshd-system"])
        }),
        "{role}"
    );

    let alone = render(
        "meshd",
        NS,
        &[
            "--set",
            "injection.enabled=false",
            "--set",
            "admission.failurePolicy=Ignore",
            "--set-json",
            "admission.excludeNamespaces=[]",
            "--set",
            "admission.url=https://meshd.example:15017/validate",
        ],
    )?;
    for version in KUBERNETES {
        alone.validate(version)?;
    }
    let kinds: BTreeSet<_> = alone.names().into_iter().map(|(kind, _, _)| kind).collect();
    ensure!(!kinds.contains("MutatingWebhookConfiguration") && kinds.contains("ConfigMap"));
    let webhook = &alone.one("ValidatingWebhookConfiguration")?["webhooks"][0];
    ensure!(webhook["failurePolicy"] == "Ignore");
    ensure!(
        webhook["clientConfig"] == json!({"url": "https://meshd.example:15017/validate"}),
        "{webhook}"
    );
    ensure!(
        webhook["namespaceSelector"]["matchExpressions"][0]["values"] == json!([NS]),
        "{webhook}"
    );
    let arguments = args(&alone)?;
    ensure!(
        arguments.contains(&json!("--webhook-address=0.0.0.0:15017"))
            && arguments.contains(&json!("--inject-config=/etc/meshd/inject/config.yaml")),
        "{arguments:?}"
    );
    Ok(())
}

#[test]
fn two_releases_share_no_object_or_pod() -> anyhow::Result<()> {
    let first = render("meshd", NS, &[])?;
    let second = render("meshd-canary", NS, &["--set", "crds.install=false"])?;
    let names = |r: &Rendered| r.names().into_iter().collect::<BTreeSet<_>>();
    let shared: Vec<_> = names(&first)
        .intersection(&names(&second))
        .cloned()
        .collect();
    ensure!(
        shared.is_empty(),
        "two releases in {NS} collide on {shared:?}"
    );
    // One release's Service and Deployment must not select the other's pods.
    let pods = |r: &Rendered| -> anyhow::Result<Value> {
        Ok(deployment(r)?["spec"]["template"]["metadata"]["labels"].clone())
    };
    for (r, other) in [(&first, pods(&second)?), (&second, pods(&first)?)] {
        for selector in [
            &r.one("Service")?["spec"]["selector"],
            &deployment(r)?["spec"]["selector"]["matchLabels"],
        ] {
            let selects = selector
                .as_object()
                .context("selector")?
                .iter()
                .all(|(k, v)| other[k] == *v);
            ensure!(!selects, "selector {selector} also selects {other}");
        }
    }

    // A release of one name in two namespaces: its cluster-scoped objects differ.
    let elsewhere = render("meshd", "meshd-staging", &["--set", "crds.install=false"])?;
    let cluster_scoped = |r: &Rendered| {
        r.names()
            .into_iter()
            .filter(|(kind, _, _)| kind.starts_with("Cluster"))
            .collect::<BTreeSet<_>>()
    };
    let shared: Vec<_> = cluster_scoped(&first)
        .intersection(&cluster_scoped(&elsewhere))
        .cloned()
        .collect();
    ensure!(
        shared.is_empty(),
        "releases in two namespaces collide on {shared:?}"
    );
    Ok(())
}

#[test]
fn every_object_carries_the_standard_labels() -> anyhow::Result<()> {
    let r = render("meshd-canary", NS, &[])?;
    for object in &r.objects {
        let labels = &object["metadata"]["labels"];
        for (key, want) in [
            ("app.kubernetes.io/name", "meshd"),
            ("app.kubernetes.io/instance", "meshd-canary"),
            ("app.kubernetes.io/managed-by", "Helm"),
        ] {
            ensure!(
                labels[key] == want,
                "{} {} has {key}={}",
                object["kind"],
                object["metadata"]["name"],
                labels[key]
            );
        }
        for key in ["app.kubernetes.io/version", "helm.sh/chart"] {
            ensure!(
                labels[key].as_str().is_some_and(|v| !v.is_empty()),
                "{} {} has no {key}",
                object["kind"],
                object["metadata"]["name"]
            );
        }
    }
    Ok(())
}

#[test]
fn the_schema_refuses_values_meshd_would_crash_on() -> anyhow::Result<()> {
    // Each value alone, so each message is seen to come from its own value.
    for (set, field, says) in [
        (
            "mtlsMode=BOGUS",
            "'/mtlsMode'",
            "'STRICT', 'PERMISSIVE', 'DISABLE'",
        ),
        (
            "outboundPolicy=allow-all",
            "'/outboundPolicy'",
            "'allow-any', 'registry-only'",
        ),
        ("workloadCertTTL=abc", "'/workloadCertTTL'", "'abc'"),
        ("replicaCount=0", "'/replicaCount'", "got 0, want 1"),
        ("leaseDuration=15", "'/leaseDuration'", "want string"),
        (
            "trustDomain=Cluster.Local",
            "'/trustDomain'",
            "'Cluster.Local'",
        ),
        (
            "image.pullPolicy=Sometimes",
            "'/image/pullPolicy'",
            "'IfNotPresent'",
        ),
        ("replicas=3", "at ''", "'replicas'"),
        (
            "networkPolicy.enabled=yes",
            "'/networkPolicy/enabled'",
            "want boolean",
        ),
        (
            "injection.failurePolicy=Sometimes",
            "'/injection/failurePolicy'",
            "'Fail', 'Ignore'",
        ),
        (
            "injection.url=http://meshd.example:15017/inject",
            "'/injection/url'",
            "does not match pattern",
        ),
        (
            "injection.defaultCapture=magic",
            "'/injection/defaultCapture'",
            "'transparent', 'explicit'",
        ),
        (
            "injection.proxy.image.tag=a:b",
            "'/injection/proxy/image/tag'",
            "does not match pattern",
        ),
        (
            "admission.failurePolicy=Never",
            "'/admission/failurePolicy'",
            "'Fail', 'Ignore'",
        ),
        (
            "admission.url=http://meshd.example:15017/validate",
            "'/admission/url'",
            "does not match pattern",
        ),
        (
            "admission.excludeNamespaces={Kube_System}",
            "'/admission/excludeNamespaces/0'",
            "does not match pattern",
        ),
    ] {
        let message = refused("meshd", NS, &["--set", set])?;
        ensure!(
            message.contains("don't meet the specifications of the schema")
                && message.contains(field)
                && message.contains(says),
            "--set {set}: the refusal should name {field} and say {says}, got:\n{message}"
        );
    }
    // An empty NetworkPolicy peer would admit everyone to the health port.
    let values = tempfile::NamedTempFile::new()?;
    std::fs::write(values.path(), "networkPolicy: {healthFrom: [{}]}\n")?;
    let message = refused(
        "meshd",
        NS,
        &["-f", values.path().to_str().context("path")?],
    )?;
    ensure!(
        message.contains("'/networkPolicy/healthFrom/0'"),
        "an empty peer was not refused by name: {message}"
    );
    Ok(())
}

/// The schema's duration pattern takes what meshd's flag parser (humantime) takes.
#[test]
fn the_schemas_durations_are_the_ones_meshd_parses() -> anyhow::Result<()> {
    for text in [
        "1h", "90m", "1h30m", "1h 30m", "1.5h", "15s", "100ms", "2 days", "1hour", "3w", "45 min",
        "1M", "abc", "1H", "1h30", "1", "h", "1.h", "-1h", "1x", "", " ", "1h;", "1h-", "1,5h",
        "s1", ".5h",
    ] {
        let meshd_takes = humantime::parse_duration(text).is_ok();
        let set = format!("workloadCertTTL={text}");
        let schema_takes = render("meshd", NS, &["--set-string", &set]).is_ok();
        ensure!(
            meshd_takes == schema_takes,
            "{text:?}: meshd parses it: {meshd_takes}, the schema takes it: {schema_takes}"
        );
    }
    Ok(())
}

#[test]
fn a_value_never_turns_an_argument_into_yaml() -> anyhow::Result<()> {
    let values = tempfile::NamedTempFile::new()?;
    std::fs::write(
        values.path(),
        "namespaceSelector: \"#tier: {a, b} 'x' \\\"y\\\"\"\n",
    )?;
    let r = render(
        "meshd",
        NS,
        &[
            "--set-string",
            "log=info: x",
            "-f",
            values.path().to_str().context("path")?,
        ],
    )?;
    let arguments = args(&r)?;
    for want in [
        "--log=info: x",
        "--namespace-selector=#tier: {a, b} 'x' \"y\"",
    ] {
        ensure!(
            arguments.contains(&json!(want)),
            "{want:?} is not one argument: {arguments:?}"
        );
    }
    ensure!(
        arguments.iter().all(Value::is_string),
        "an argument is not a string: {arguments:?}"
    );
    Ok(())
}

/// The checks of Pod Security Standards `restricted` (which includes `baseline`) that
/// a pod spec alone decides, each violation naming the container and field.
fn restricted_violations(pod: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for field in ["hostNetwork", "hostPID", "hostIPC"] {
        if pod[field] == true {
            out.push(format!("spec.{field} is true"));
        }
    }
    for volume in pod["volumes"].as_array().into_iter().flatten() {
        let allowed = [
            "name",
            "configMap",
            "csi",
            "downwardAPI",
            "emptyDir",
            "ephemeral",
            "persistentVolumeClaim",
            "projected",
            "secret",
        ];
        for key in volume.as_object().into_iter().flatten().map(|(k, _)| k) {
            if !allowed.contains(&key.as_str()) {
                out.push(format!("volume {}: type {key}", volume["name"]));
            }
        }
    }
    let pod_sc = &pod["securityContext"];
    let containers = ["initContainers", "containers", "ephemeralContainers"]
        .iter()
        .flat_map(|list| pod[*list].as_array().into_iter().flatten());
    for c in containers {
        let name = &c["name"];
        let sc = &c["securityContext"];
        // A container's setting wins over the pod's.
        let effective = |field: &str| {
            if sc[field].is_null() {
                &pod_sc[field]
            } else {
                &sc[field]
            }
        };
        if sc["privileged"] == true {
            out.push(format!("{name}: privileged"));
        }
        if sc["allowPrivilegeEscalation"] != false {
            out.push(format!("{name}: allowPrivilegeEscalation is not false"));
        }
        if effective("runAsNonRoot") != true {
            out.push(format!("{name}: runAsNonRoot is not true"));
        }
        if effective("runAsUser") == 0 {
            out.push(format!("{name}: runAsUser is 0"));
        }
        let seccomp = &effective("seccompProfile")["type"];
        if seccomp != "RuntimeDefault" && seccomp != "Localhost" {
            out.push(format!("{name}: seccompProfile.type is {seccomp}"));
        }
        let caps = &sc["capabilities"];
        if !caps["drop"]
            .as_array()
            .is_some_and(|d| d.contains(&json!("ALL")))
        {
            out.push(format!("{name}: capabilities.drop lacks ALL"));
        }
        for add in caps["add"].as_array().into_iter().flatten() {
            if add != "NET_BIND_SERVICE" {
                out.push(format!("{name}: capabilities.add {add}"));
            }
        }
        for port in c["ports"].as_array().into_iter().flatten() {
            if port["hostPort"].as_u64().is_some_and(|p| p != 0) {
                out.push(format!("{name}: hostPort {}", port["hostPort"]));
            }
        }
    }
    out
}

#[test]
fn meshds_pod_passes_pod_security_restricted() -> anyhow::Result<()> {
    let r = render("meshd", NS, &[])?;
    let pod = &deployment(&r)?["spec"]["template"]["spec"];
    let violations = restricted_violations(pod);
    ensure!(
        violations.is_empty(),
        "meshd's pod fails Pod Security restricted: {violations:?}"
    );
    // Beyond restricted: nothing in the image can be changed at run time.
    let container = meshd_container(&r)?;
    ensure!(container["securityContext"]["readOnlyRootFilesystem"] == true);

    // The checks themselves see what the old chart lacked.
    let mut loose = pod.clone();
    loose["securityContext"]
        .as_object_mut()
        .context("pod securityContext")?
        .remove("seccompProfile");
    ensure!(!restricted_violations(&loose).is_empty());
    Ok(())
}

#[test]
fn probes_and_metrics_use_the_health_port_and_the_admin_api_stays_private() -> anyhow::Result<()> {
    let r = render("meshd", NS, &[])?;
    let arguments = args(&r)?;
    for want in [
        "--admin-address=127.0.0.1:15014",
        "--health-address=$(POD_IP):15021",
        "--xds-address=0.0.0.0:15012",
    ] {
        ensure!(
            arguments.contains(&json!(want)),
            "no {want} in {arguments:?}"
        );
    }
    let container = meshd_container(&r)?;
    ensure!(
        container["env"]
            .as_array()
            .context("env")?
            .iter()
            .any(|e| e["name"] == "POD_IP"
                && e["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"),
        "POD_IP does not come from the downward API: {}",
        container["env"]
    );
    // Named ports resolve to their container port.
    let port_number = |port: &Value| -> anyhow::Result<u64> {
        if let Some(n) = port.as_u64() {
            return Ok(n);
        }
        container["ports"]
            .as_array()
            .and_then(|ports| ports.iter().find(|p| p["name"] == *port))
            .and_then(|p| p["containerPort"].as_u64())
            .with_context(|| format!("no container port named {port}"))
    };
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        let port = &container[probe]["httpGet"]["port"];
        ensure!(port_number(port)? == 15021, "{probe} probes port {port}");
    }
    let declared: Vec<_> = container["ports"]
        .as_array()
        .context("ports")?
        .iter()
        .map(|p| p["containerPort"].clone())
        .collect();
    ensure!(
        declared == [json!(15012), json!(15021), json!(15017)],
        "container ports {declared:?}"
    );
    let annotations = &deployment(&r)?["spec"]["template"]["metadata"]["annotations"];
    ensure!(
        annotations["prometheus.io/port"] == "15021",
        "Prometheus scrapes {annotations}"
    );

    let service = r.one("Service")?;
    let ports: Vec<_> = service["spec"]["ports"]
        .as_array()
        .context("service ports")?
        .iter()
        .map(|p| p["port"].clone())
        .collect();
    ensure!(
        ports == [json!(15012), json!(443)],
        "the Service exposes {ports:?}"
    );

    // Default NetworkPolicy: xDS from every namespace, the webhook port from anywhere
    // (the API server), the health port from nobody (the node's kubelet is never
    // blocked), nothing else.
    let policy = r.one("NetworkPolicy")?;
    ensure!(policy["spec"]["policyTypes"] == json!(["Ingress"]));
    ensure!(
        policy["spec"]["podSelector"] == deployment(&r)?["spec"]["selector"],
        "the NetworkPolicy does not select meshd's pods: {policy}"
    );
    ensure!(
        policy["spec"]["ingress"]
            == json!([{
                "from": [{"namespaceSelector": {}}],
                "ports": [{"port": 15012, "protocol": "TCP"}],
            }, {
                "ports": [{"port": 15017, "protocol": "TCP"}],
            }]),
        "the NetworkPolicy admits {}",
        policy["spec"]["ingress"]
    );
    Ok(())
}

/// Real Helm against a real API server: releases side by side in one namespace, CRDs
/// brought up to date by `helm upgrade` (Helm never upgrades a chart's `crds/`), and
/// kept with every policy by `helm uninstall`.
#[tokio::test]
async fn helm_install_upgrade_and_uninstall_keep_the_crds_current() -> anyhow::Result<()> {
    let api = KubeApi::start_bare().await?;
    let kubeconfig = api
        .kubeconfig()
        .to_str()
        .context("kubeconfig path")?
        .to_string();
    let helm = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--kubeconfig", &kubeconfig]);
        if matches!(args[0], "install" | "upgrade") {
            // The test API server serves no networking.k8s.io.
            all.extend(["--set", "networkPolicy.enabled=false"]);
        }
        helm_ok(&all)
    };
    let chart = chart_dir();
    let chart = chart.to_str().context("chart path")?;

    // Revision 1 is a chart whose CRDs predate a printer column, as an older release's.
    let old = tempfile::tempdir()?;
    copy_dir(&chart_dir(), old.path())?;
    let crds = old.path().join("files").join("crds.yaml");
    let text = std::fs::read_to_string(&crds)?;
    ensure!(
        text.contains("name: Accepted"),
        "the CRDs have no Accepted column"
    );
    std::fs::write(&crds, text.replace("name: Accepted", "name: Obsolete"))?;
    let old = old.path().to_str().context("temp path")?;

    // As kube-apiserver creates it: labelled with its name, which keeps meshd's own
    // namespace out of its webhooks (an upgrade of meshd never waits on meshd).
    api.create_namespace(NS, &[]).await?;
    helm(&["install", "meshd", old, "-n", NS])?;
    let columns = || async {
        let crds: Api<CustomResourceDefinition> = Api::all(api.client.clone());
        let crd = crds.get("authorizationpolicies.security.meshd.io").await?;
        anyhow::Ok(
            crd.spec.versions[0]
                .additional_printer_columns
                .iter()
                .flatten()
                .map(|c| c.name.clone())
                .collect::<Vec<_>>(),
        )
    };
    ensure!(columns().await? == ["Action", "Obsolete"]);

    helm(&["upgrade", "meshd", chart, "-n", NS])?;
    ensure!(
        columns().await? == ["Action", "Accepted"],
        "helm upgrade left the CRD behind: {:?}",
        columns().await?
    );

    // A second release beside it installs (no object of the first is in its way).
    helm(&[
        "install",
        "meshd-canary",
        chart,
        "-n",
        NS,
        "--set",
        "crds.install=false",
    ])?;
    let deployments: Api<Deployment> = Api::namespaced(api.client.clone(), NS);
    let mut names: Vec<_> = deployments
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .filter_map(|d| d.metadata.name)
        .collect();
    names.sort();
    ensure!(names == ["meshd", "meshd-canary"], "deployments {names:?}");

    // Every object of both releases was created.
    for release in ["meshd", "meshd-canary"] {
        let manifest = helm(&["get", "manifest", release, "-n", NS])?;
        let file = tempfile::NamedTempFile::new()?;
        std::fs::write(file.path(), &manifest)?;
        let out = std::process::Command::new(meshd_integration::tools::kubectl_binary()?)
            .args(["get", "-f"])
            .arg(file.path())
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .output()?;
        ensure!(
            out.status.success(),
            "{release}: not every object was created: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let listed = String::from_utf8_lossy(&out.stdout);
        for kind in ["mutatingwebhookconfiguration", "configmap/", "deployment"] {
            ensure!(
                listed.to_lowercase().contains(kind),
                "{release}: no {kind} in {listed}"
            );
        }
    }

    helm(&["uninstall", "meshd", "-n", NS])?;
    helm(&["uninstall", "meshd-canary", "-n", NS])?;
    ensure!(
        deployments
            .list(&Default::default())
            .await?
            .items
            .is_empty(),
        "helm uninstall left a Deployment"
    );
    let kept = Api::<CustomResourceDefinition>::all(api.client.clone())
        .get_opt("authorizationpolicies.security.meshd.io")
        .await?;
    ensure!(
        kept.is_some(),
        "helm uninstall removed the CRDs (and with them every policy)"
    );
    Ok(())
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}
