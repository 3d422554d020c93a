//! Workload certificate issuance throughput on one core (goal: ≥ 2,000/s).
//!
//! `cargo bench -p meshd-ca` prints the time per certificate; certificates per second
//! is its inverse.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use meshd_ca::store::{CaSource, open_or_create};
use meshd_ca::{CaConfig, SpiffeId};

fn issue(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let (ca, _) = open_or_create(
        &CaSource::Directory(dir.path().join("ca")),
        CaConfig::default(),
    )
    .expect("a CA");
    let id = SpiffeId::new("cluster.local", "shop", "web").expect("an id");
    let mut group = c.benchmark_group("ca");
    group.throughput(Throughput::Elements(1));
    group.bench_function("issue workload certificate (ECDSA P-256)", |b| {
        b.iter(|| ca.issue(&id).expect("issued"))
    });
    group.finish();
}

criterion_group!(benches, issue);
criterion_main!(benches);
