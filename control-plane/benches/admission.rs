//! One pod through `admission::check`, in-process, as the webhook and `meshctl
//! admission check` evaluate it (the goal is ≤ 20 µs per pod): (a) a pod that passes
//! `restricted`, one policy; (b) that pod injected by meshd, recognition of its own
//! containers included, against `restricted` and every rule; (c) a pod that breaks
//! every control and rule it can (building the violations and messages included);
//! (d) the injected pod against 10 policies (the two of (b), eight of its namespace);
//! the recognition of meshd's containers alone, which (b) and (d) include; and the
//! whole `/validate` review of (b), from its body to the answer.

use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use meshd::admission::{self, workload};
use meshd::inject::{self, InjectConfig};
use meshd::model::workload_policy::{Mode, Profile, Rules, WorkloadPolicy};
use meshd::model::{MeshDefaults, MeshObject, MeshSnapshot, ObjectKey};
use serde_json::{Value, json};

fn passing() -> Value {
    let sc = json!({
        "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
        "capabilities": {"drop": ["ALL"]},
    });
    let limits = json!({"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "1", "memory": "256Mi"}});
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": "web-7d9f8b6c5d-x2x4q", "namespace": "shop",
            "labels": {"app": "web", "pod-template-hash": "7d9f8b6c5d"},
            "annotations": {"meshd.io/upstreams": "shop/db:5432=15432"},
        },
        "spec": {
            "serviceAccountName": "web",
            "securityContext": {"runAsNonRoot": true, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
            "initContainers": [{"name": "migrate", "image": "registry.example/shop/migrate:3", "securityContext": sc, "resources": limits}],
            "containers": [{
                "name": "app", "image": "registry.example/shop/web:1.4.2",
                "ports": [{"name": "http", "containerPort": 8080}, {"name": "grpc", "containerPort": 9090}],
                "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}},
                "securityContext": sc, "resources": limits,
            }, {
                "name": "log-shipper", "image": "registry.example/shipper:2",
                "securityContext": sc, "resources": limits,
                "volumeMounts": [{"name": "logs", "mountPath": "/logs"}],
            }],
            "volumes": [{"name": "logs", "emptyDir": {}}, {"name": "config", "configMap": {"name": "web"}}],
        },
    })
}

fn injected(config: &InjectConfig) -> Value {
    let mut pod = passing();
    let (_, patch) = inject::patch(&pod, "shop", config).unwrap();
    json_patch::patch(&mut pod, &patch).unwrap();
    pod
}

fn failing() -> Value {
    let sc = json!({
        "privileged": true, "runAsUser": 0, "runAsNonRoot": false,
        "capabilities": {"add": ["SYS_ADMIN", "NET_ADMIN"]},
        "seccompProfile": {"type": "Unconfined"}, "procMount": "Unmasked",
        "seLinuxOptions": {"type": "spc_t"}, "appArmorProfile": {"type": "Unconfined"},
    });
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "bad", "namespace": "shop", "labels": {"app": "bad"}},
        "spec": {
            "hostNetwork": true, "hostPID": true, "hostIPC": true,
            "securityContext": {"sysctls": [{"name": "kernel.msgmax", "value": "1"}]},
            "initContainers": [{"name": "setup", "image": "busybox", "securityContext": sc}],
            "containers": [{
                "name": "app", "image": "nginx:latest",
                "ports": [{"containerPort": 80, "hostPort": 80}],
                "securityContext": sc,
                "volumeMounts": [{"name": "root", "mountPath": "/host"}],
            }],
            "volumes": [{"name": "root", "hostPath": {"path": "/"}}],
        },
    })
}

fn every_rule() -> Rules {
    Rules {
        read_only_root_filesystem: true,
        allowed_registries: vec!["registry.example/".into()],
        require_image_digest: false,
        forbid_latest_tag: true,
        require_resource_limits: true,
        forbid_default_service_account: true,
        require_mesh: true,
    }
}

fn policy(namespace: &str, name: &str, profile: Option<Profile>, rules: Rules) -> MeshObject {
    MeshObject::WorkloadPolicy(Arc::new(WorkloadPolicy {
        key: ObjectKey::new(namespace, name),
        mode: Mode::Enforce,
        profile,
        namespace_selector: None,
        selector: None,
        rules,
        exemptions: Vec::new(),
    }))
}

fn mesh(policies: Vec<MeshObject>) -> MeshSnapshot {
    MeshSnapshot::build(1, MeshDefaults::default(), policies)
}

fn bench(c: &mut Criterion) {
    let config = InjectConfig::default();
    let restricted = || {
        policy(
            "meshd-system",
            "restricted",
            Some(Profile::Restricted),
            Rules::default(),
        )
    };
    let with_rules = || {
        vec![
            restricted(),
            policy(
                "meshd-system",
                "rules",
                Some(Profile::Baseline),
                every_rule(),
            ),
        ]
    };
    let ten = {
        let mut p = with_rules();
        for i in 0..8 {
            let rules = Rules {
                allowed_registries: vec![
                    format!("registry{i}.example/"),
                    "registry.example/".into(),
                ],
                forbid_latest_tag: true,
                ..Rules::default()
            };
            p.push(policy(
                "shop",
                &format!("team-{i}"),
                (i % 2 == 0).then_some(Profile::Baseline),
                rules,
            ));
        }
        p
    };
    let cases = [
        ("(a) passing pod, restricted", passing(), vec![restricted()]),
        (
            "(b) injected pod, restricted + every rule",
            injected(&config),
            with_rules(),
        ),
        (
            "(c) failing pod, restricted + every rule",
            failing(),
            with_rules(),
        ),
        ("(d) injected pod, 10 policies", injected(&config), ten),
    ];
    for (name, object, policies) in cases {
        let mesh = mesh(policies);
        let pod = workload::pod_of("v1", "Pod", &object).unwrap().unwrap();
        let verdict = admission::check(&mesh, &config, "shop", &pod);
        let violations: usize = verdict.findings.iter().map(|f| f.violations.len()).sum();
        // The passing pods pass; the failing one fails as much as it can.
        assert_eq!(
            verdict.mode().is_some(),
            name.contains("failing"),
            "{name}: {:#?}",
            verdict.messages()
        );
        c.bench_function(
            &format!(
                "admission::check {name} ({} {}, {violations} violations)",
                mesh.workload_policies.len(),
                if mesh.workload_policies.len() == 1 {
                    "policy"
                } else {
                    "policies"
                }
            ),
            |b| {
                b.iter(|| {
                    let verdict = admission::check(
                        std::hint::black_box(&mesh),
                        &config,
                        "shop",
                        std::hint::black_box(&pod),
                    );
                    // What the webhook sends back is built too.
                    verdict.messages()
                })
            },
        );
    }
}

/// What (b) and (d) spend on telling meshd's own containers from look-alikes.
fn recognition(c: &mut Criterion) {
    let config = InjectConfig::default();
    let pod = workload::pod_of("v1", "Pod", &injected(&config))
        .unwrap()
        .unwrap();
    assert_eq!(
        admission::injected::recognise(&pod.meta, &pod.spec, &config),
        ["meshd-init", "meshd-proxy"]
    );
    c.bench_function("admission::injected::recognise (the injected pod)", |b| {
        b.iter(|| {
            admission::injected::recognise(
                std::hint::black_box(&pod.meta),
                std::hint::black_box(&pod.spec),
                &config,
            )
        })
    });
}

/// The whole `/validate` answer for (b): the AdmissionReview read, the pod found, checked
/// and the review written, as the webhook does it for every request.
fn whole_review(c: &mut Criterion) {
    let config = InjectConfig::default();
    let (_tx, snapshot) = tokio::sync::watch::channel(Arc::new(mesh(vec![
        policy(
            "meshd-system",
            "restricted",
            Some(Profile::Restricted),
            Rules::default(),
        ),
        policy(
            "meshd-system",
            "rules",
            Some(Profile::Baseline),
            every_rule(),
        ),
    ])));
    let review = serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "u", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "name": "web", "namespace": "shop", "operation": "CREATE", "userInfo": {},
            "object": injected(&config)}}))
    .unwrap();
    c.bench_function(
        &format!(
            "webhook /validate: the whole review of (b) ({} bytes)",
            review.len()
        ),
        |b| {
            b.iter(|| {
                meshd::webhook::validate_review(&config, &snapshot, std::hint::black_box(&review))
            })
        },
    );
}

criterion_group!(benches, bench, recognition, whole_review);
criterion_main!(benches);
