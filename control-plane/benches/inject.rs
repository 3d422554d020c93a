//! Sidecar injection of one pod in-process: the template and JSON Patch alone
//! (`inject::patch`), and a whole AdmissionReview as the webhook answers it (parse the
//! body, inject, encode the answer). A pod of two app containers with three probes
//! and capture annotations, as a Deployment's pod would look.

use criterion::{Criterion, criterion_group, criterion_main};
use meshd::inject::{self, InjectConfig};
use serde_json::json;

fn pod() -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": "web-7d9f8b6c5d-x2x4q", "namespace": "shop",
            "labels": {"app": "web", "pod-template-hash": "7d9f8b6c5d"},
            "annotations": {"meshd.io/exclude-outbound-ports": "5432", "meshd.io/upstreams": "shop/db:5432=15432"},
        },
        "spec": {
            "serviceAccountName": "web",
            "containers": [{
                "name": "app", "image": "registry.example/shop/web@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                "ports": [{"name": "http", "containerPort": 8080}, {"name": "grpc", "containerPort": 9090}],
                "env": [{"name": "MODE", "value": "prod"}],
                "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 5},
                "livenessProbe": {"tcpSocket": {"port": 8080}},
                "startupProbe": {"grpc": {"port": 9090}},
                "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
            }, {
                "name": "log-shipper", "image": "registry.example/shipper:2",
                "volumeMounts": [{"name": "logs", "mountPath": "/logs"}],
            }],
            "volumes": [{"name": "logs", "emptyDir": {}}],
        },
    })
}

fn bench(c: &mut Criterion) {
    let config = InjectConfig::default();
    let pod = pod();
    c.bench_function("inject::patch (one pod)", |b| {
        b.iter(|| inject::patch(std::hint::black_box(&pod), "shop", &config).unwrap())
    });
    let review = serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop", "operation": "CREATE", "userInfo": {"username": "admin"},
            "object": pod, "dryRun": false,
        }
    }))
    .unwrap();
    c.bench_function("AdmissionReview /inject (parse, inject, answer)", |b| {
        b.iter(|| meshd::webhook::inject_review(&config, std::hint::black_box(&review)))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
