//! The mesh index (store + snapshots) under Kubernetes-sized load.
//!
//! 1,000 services and 10,000 pods (10 per service, 10 namespaces), then 10,000 pod
//! events (readiness flips and label moves) pushed through the real debounced store, as
//! the Kubernetes source would. Prints a table: how long the initial index took, events
//! per second, snapshots built, memory, and what one pod event costs — a snapshot
//! derived from the previous one versus one derived from scratch, and how many service
//! ports each derived.
//!
//! `cargo bench -p meshd --bench index` (add `-- --json` for JSON).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshd::model::snapshot::{Changes, MeshSnapshot};
use meshd::model::{
    ContainerPort, MeshDefaults, MeshObject, ObjectKey, Protocol, Service, ServicePort, Store,
    StoreConfig, StoreEvent, TargetPort, Workload,
};

const SERVICES: usize = 1_000;
const PODS_PER_SERVICE: usize = 10;
const NAMESPACES: usize = 10;
const EVENTS: usize = 10_000;

fn service(i: usize) -> MeshObject {
    MeshObject::Service(Arc::new(Service {
        key: ObjectKey::new(format!("ns{}", i % NAMESPACES), format!("svc{i}")),
        cluster_ip: None,
        ports: vec![ServicePort {
            name: Some("http".into()),
            port: 80,
            target_port: TargetPort::Number(8080),
            protocol: Protocol::Http,
        }],
        selector: Some([("app".to_string(), format!("svc{i}"))].into()),
    }))
}

fn pod(svc: usize, n: usize, ready: bool) -> MeshObject {
    let i = svc * PODS_PER_SERVICE + n;
    MeshObject::Workload(Arc::new(Workload {
        scope: None,
        capture: Default::default(),
        key: ObjectKey::new(format!("ns{}", svc % NAMESPACES), format!("svc{svc}-{n}")),
        uid: None,
        labels: [("app".to_string(), format!("svc{svc}"))].into(),
        service_account: format!("svc{svc}"),
        address: Some(std::net::Ipv4Addr::from(0x0a00_0000 + i as u32).into()),
        ready,
        container_ports: vec![ContainerPort {
            name: Some("http".into()),
            port: 8080,
        }],
        app_ports: BTreeMap::new(),
        upstreams: vec![],
        egress: None,
    }))
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    let json = std::env::args().any(|a| a == "--json");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let rss_before = rss_kib();

    let mut objects: Vec<MeshObject> = (0..SERVICES).map(service).collect();
    for s in 0..SERVICES {
        for n in 0..PODS_PER_SERVICE {
            objects.push(pod(s, n, true));
        }
    }
    let object_count = objects.len();

    let (initial, events_time, snapshots, last) = rt.block_on(async {
        let start = Instant::now();
        let store = Store::start(StoreConfig::default(), objects.clone());
        let mut rx = store.subscribe();
        let initial = start.elapsed();
        rx.borrow_and_update();

        // 10,000 pod events: each pod in turn flips readiness or moves to another service.
        let start = Instant::now();
        let mut published = 0;
        let feeder = {
            let store = store.clone();
            tokio::spawn(async move {
                for e in 0..EVENTS {
                    let svc = (e * 7919) % SERVICES;
                    let n = e % PODS_PER_SERVICE;
                    store.send(StoreEvent::Upsert(pod(svc, n, e % 2 == 1)));
                    if e % 100 == 99 {
                        // A source delivers in bursts, not all in one go.
                        tokio::task::yield_now().await;
                    }
                }
            })
        };
        feeder.await.expect("feeder");
        let last_pod = pod(
            ((EVENTS - 1) * 7919) % SERVICES,
            (EVENTS - 1) % PODS_PER_SERVICE,
            true,
        );
        let MeshObject::Workload(want) = last_pod else {
            unreachable!()
        };
        loop {
            rx.changed().await.expect("store alive");
            published += 1;
            let snap = rx.borrow_and_update().clone();
            if snap
                .workloads
                .get(&want.key)
                .is_some_and(|w| w.ready == want.ready)
            {
                break (initial, start.elapsed(), published, snap);
            }
        }
    });
    let rss_after = rss_kib();

    // One pod event: from the last snapshot, derived incrementally vs from scratch.
    let mut objects: BTreeMap<_, _> = objects
        .into_iter()
        .map(|o| ((o.kind(), o.key()), o))
        .collect();
    let changed = pod(123, 4, false);
    let id = (changed.kind(), changed.key());
    objects.insert(id.clone(), changed);
    let changes: Changes = [id].into();
    let runs = 20;
    let (mut inc, mut full) = (Duration::ZERO, Duration::ZERO);
    let (mut inc_derived, mut full_derived) = (0, 0);
    for _ in 0..runs {
        let t = Instant::now();
        let snap = MeshSnapshot::update(
            &last,
            0,
            MeshDefaults::default(),
            objects.values().cloned(),
            &changes,
        );
        inc += t.elapsed();
        inc_derived = snap.derived_service_ports;
        let t = Instant::now();
        let snap = MeshSnapshot::build(0, MeshDefaults::default(), objects.values().cloned());
        full += t.elapsed();
        full_derived = snap.derived_service_ports;
    }
    let (inc, full) = (inc / runs, full / runs);

    let eps = EVENTS as f64 / events_time.as_secs_f64();
    let rss_mib = (rss_after.saturating_sub(rss_before)) as f64 / 1024.0;
    if json {
        println!(
            "{{\"services\":{SERVICES},\"pods\":{},\"initial_index_ms\":{:.1},\"pod_events\":{EVENTS},\"events_per_s\":{eps:.0},\"snapshots\":{snapshots},\"rss_growth_mib\":{rss_mib:.1},\"one_event_incremental_ms\":{:.3},\"one_event_full_ms\":{:.3},\"incremental_derived_ports\":{inc_derived},\"full_derived_ports\":{full_derived}}}",
            SERVICES * PODS_PER_SERVICE,
            initial.as_secs_f64() * 1e3,
            inc.as_secs_f64() * 1e3,
            full.as_secs_f64() * 1e3,
        );
        return;
    }
    println!(
        "mesh index: {SERVICES} services, {} pods in {NAMESPACES} namespaces ({object_count} objects)",
        SERVICES * PODS_PER_SERVICE
    );
    println!("| figure | value |");
    println!("|---|---|");
    println!(
        "| initial index (store start, first snapshot) | {:.1} ms |",
        initial.as_secs_f64() * 1e3
    );
    println!(
        "| {EVENTS} pod events through the store | {:.0} ms |",
        events_time.as_secs_f64() * 1e3
    );
    println!("| pod events per second | {eps:.0} |");
    println!("| snapshots published for them (debounce 100 ms) | {snapshots} |");
    println!("| memory growth (RSS) for the index | {rss_mib:.1} MiB |");
    println!(
        "| one pod event, snapshot derived from the previous | {:.2} ms, {inc_derived} service port(s) derived |",
        inc.as_secs_f64() * 1e3
    );
    println!(
        "| one pod event, snapshot derived from scratch | {:.2} ms, {full_derived} service ports derived |",
        full.as_secs_f64() * 1e3
    );
}
