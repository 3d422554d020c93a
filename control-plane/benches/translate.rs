//! Translating one proxy's full config (listeners, clusters, endpoints, routes, RBAC)
//! from a shared snapshot of 1,000 services and 10,000 pods: what every stream does
//! when the mesh changes. Target: ≤ 1 ms.

use std::collections::BTreeMap;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use meshd::model::authorization::{
    Action, AuthorizationPolicy, Operation, Rule, Source, StringMatch,
};
use meshd::model::{
    ContainerPort, MeshDefaults, MeshObject, MeshSnapshot, ObjectKey, Protocol, Service,
    ServicePort, TargetPort, Upstream, Workload,
};
use meshd::xds::translate::cache::XdsSnapshot;

fn mesh() -> MeshSnapshot {
    let mut objects = Vec::new();
    for s in 0..1_000 {
        objects.push(MeshObject::Service(Arc::new(Service {
            key: ObjectKey::new("shop", format!("svc{s}")),
            cluster_ip: None,
            ports: vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                target_port: TargetPort::Number(8080),
                protocol: Protocol::Http,
            }],
            selector: Some([("app".to_string(), format!("svc{s}"))].into()),
        })));
        for n in 0..10u32 {
            let i = s * 10 + n;
            objects.push(MeshObject::Workload(Arc::new(Workload {
                scope: None,
                capture: Default::default(),
                key: ObjectKey::new("shop", format!("svc{s}-{n}")),
                uid: None,
                labels: [("app".to_string(), format!("svc{s}"))].into(),
                service_account: format!("svc{s}"),
                address: Some(std::net::Ipv4Addr::from(0x0a00_0000 + i).into()),
                ready: true,
                container_ports: vec![ContainerPort {
                    name: Some("http".into()),
                    port: 8080,
                }],
                app_ports: BTreeMap::new(),
                // Each pod calls 10 services.
                upstreams: (0..10)
                    .map(|k| Upstream {
                        service: ObjectKey::new("shop", format!("svc{}", (s + k + 1) % 1_000)),
                        port: 80,
                        local_port: 15_001 + k as u16,
                    })
                    .collect(),
                egress: None,
            })));
        }
    }
    let rule = |from: Vec<Source>, to: Vec<Operation>| Rule {
        from,
        to,
        when: vec![],
    };
    for (name, action) in [("allow", Action::Allow), ("deny", Action::Deny)] {
        objects.push(MeshObject::AuthorizationPolicy(Arc::new(
            AuthorizationPolicy {
                key: ObjectKey::new("shop", name),
                selector: None,
                action,
                rules: vec![rule(
                    vec![Source {
                        namespaces: vec![StringMatch::Exact("shop".into())],
                        ..Default::default()
                    }],
                    vec![Operation {
                        paths: vec![StringMatch::Prefix("/admin".into())],
                        ..Default::default()
                    }],
                )],
            },
        )));
    }
    MeshSnapshot::build(1, MeshDefaults::default(), objects)
}

fn translate(c: &mut Criterion) {
    let mesh = Arc::new(mesh());
    let snap = XdsSnapshot::build(mesh.clone(), None, "cluster.local");
    let pod = ObjectKey::new("shop", "svc500-3");
    let (_, resources) = snap.proxy_resources(&pod).expect("the pod is in the mesh");
    assert!(
        !resources
            .get(meshd::xds::translate::resources::ResourceType::Listener)
            .is_empty()
    );
    // What a stream does on a snapshot that did not touch its proxy: the workload's
    // inbound resources come from the cache, the rest are shared `Arc`s.
    c.bench_function(
        "one proxy's full config, proxy untouched (11 listeners, 11 clusters, RBAC)",
        |b| b.iter(|| snap.proxy_resources(&pod)),
    );
    // A proxy whose inputs changed: its inbound listener, cluster and route (RBAC)
    // are encoded. Every pod is asked once per snapshot, so each call misses.
    let pods: Vec<ObjectKey> = mesh.workloads.keys().cloned().collect();
    c.bench_function(
        "one proxy's full config, proxy changed (inbound encoded)",
        |b| {
            b.iter_custom(|iters| {
                let mut total = std::time::Duration::ZERO;
                let mut snap = XdsSnapshot::build(mesh.clone(), None, "cluster.local");
                for i in 0..iters as usize {
                    if i > 0 && i % pods.len() == 0 {
                        snap = XdsSnapshot::build(mesh.clone(), None, "cluster.local");
                    }
                    let started = std::time::Instant::now();
                    std::hint::black_box(snap.proxy_resources(&pods[i % pods.len()]));
                    total += started.elapsed();
                }
                total
            })
        },
    );
}

criterion_group!(benches, translate);
criterion_main!(benches);
