//! The Pod Security Standards evaluator (`admission::pss::check`) on one typed pod:
//! a pod of an init container and two containers that passes `restricted`, and one
//! that fails many controls (the cost of building the violations included).

use criterion::{Criterion, criterion_group, criterion_main};
use k8s_openapi::api::core::v1::Pod;
use meshd::admission::pss::{self, Level};
use serde_json::json;

fn passing() -> Pod {
    let sc = json!({
        "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
        "capabilities": {"drop": ["ALL"]},
    });
    serde_json::from_value(json!({
        "metadata": {
            "name": "web-7d9f8b6c5d-x2x4q", "namespace": "shop",
            "labels": {"app": "web", "pod-template-hash": "7d9f8b6c5d"},
            "annotations": {"meshd.io/upstreams": "shop/db:5432=15432", "kubectl.kubernetes.io/default-container": "app"},
        },
        "spec": {
            "securityContext": {"runAsNonRoot": true, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
            "initContainers": [{"name": "migrate", "image": "registry.example/shop/migrate:3", "securityContext": sc}],
            "containers": [{
                "name": "app", "image": "registry.example/shop/web:1.4.2",
                "ports": [{"name": "http", "containerPort": 8080}, {"name": "grpc", "containerPort": 9090}],
                "securityContext": sc,
            }, {
                "name": "log-shipper", "image": "registry.example/shipper:2",
                "securityContext": sc,
                "volumeMounts": [{"name": "logs", "mountPath": "/logs"}],
            }],
            "volumes": [{"name": "logs", "emptyDir": {}}, {"name": "config", "configMap": {"name": "web"}}],
        },
    }))
    .unwrap()
}

fn failing() -> Pod {
    let mut pod = passing();
    let spec = pod.spec.as_mut().unwrap();
    spec.host_network = Some(true);
    spec.security_context = None;
    for c in &mut spec.containers {
        let sc = c.security_context.as_mut().unwrap();
        sc.privileged = Some(true);
        sc.allow_privilege_escalation = None;
        sc.capabilities.as_mut().unwrap().add = Some(vec!["NET_ADMIN".into(), "SYS_ADMIN".into()]);
    }
    pod
}

fn bench(c: &mut Criterion) {
    for (name, pod) in [("passing", passing()), ("failing", failing())] {
        let (meta, spec) = (&pod.metadata, pod.spec.as_ref().unwrap());
        for level in [Level::Baseline, Level::Restricted] {
            let violations = pss::check(level, meta, spec).len();
            c.bench_function(
                &format!("pss::check {level:?}, {name} pod ({violations} violations)"),
                |b| {
                    b.iter(|| {
                        pss::check(
                            level,
                            std::hint::black_box(meta),
                            std::hint::black_box(spec),
                        )
                    })
                },
            );
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
