//! The config directory as users and Kubernetes really lay it out, read by a real meshd:
//! symlink loops, a ConfigMap volume and its atomic update under real Envoy traffic, and
//! files that are slow or hostile to parse while health checks must keep answering.

use std::collections::BTreeSet;
use std::os::unix::fs::symlink;
use std::time::Duration;

use anyhow::ensure;
use meshd_integration::apps::{HttpApp, answering_apps};
use meshd_integration::envoy::Sidecar;
use meshd_integration::mesh::{ConfigMapDir, MeshDir, PodDef, ServiceDef};
use meshd_integration::meshd::Meshd;
use meshd_integration::net::free_port;
use meshd_integration::wait::eventually;
use meshd_integration::{XdsFlavor, init_test_logging};

const NS: &str = "shop";
const WAIT: Duration = Duration::from_secs(15);

/// `ln -s . mesh/loop; ln -s . mesh/loop2` made meshd walk every path through the two
/// links (3.3 GB, and it never listened). Each loop is an error naming the link, logged
/// once, and the mesh beside it is served.
#[tokio::test]
async fn symlink_loops_are_reported_once_and_the_mesh_is_served() -> anyhow::Result<()> {
    init_test_logging();
    let app = HttpApp::start("web-1").await?;
    let web1 = PodDef::new(NS, "web-1", "web").serves(8080, app.port());
    let client = PodDef::new(NS, "client-1", "client").calls("web", 80, free_port());
    let mesh = MeshDir::new()?;
    let service = ServiceDef::new(NS, "web").http_port(80, 8080).yaml();
    mesh.write("mesh.yaml", &[service, web1.yaml(), client.yaml()])?;
    symlink(".", mesh.path().join("loop"))?;
    symlink(".", mesh.path().join("loop2"))?;

    let meshd = Meshd::start(mesh.path()).await?;
    let snap = meshd.snapshot().await?;
    ensure!(
        (snap.services, snap.workloads) == (1, 2),
        "each file read once: {snap:?}"
    );
    let dir = mesh.path().canonicalize()?;
    let expected: Vec<String> = ["loop", "loop2"]
        .iter()
        .map(|link| {
            format!(
                "{}: a symlink to {}, which contains it: a loop, not followed",
                mesh.path().join(link).display(),
                dir.display()
            )
        })
        .collect();
    ensure!(snap.config_errors == expected, "{:?}", snap.config_errors);

    let _web = Sidecar::for_pod(&meshd, &web1, XdsFlavor::Delta).await?;
    let _client = Sidecar::for_pod(&meshd, &client, XdsFlavor::Delta).await?;
    eventually("traffic", WAIT, || answering_apps(client.outbound(0), 1)).await?;

    // A change elsewhere rescans: the loops are still reported, but logged only once.
    mesh.write_raw(
        "more.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: more}\n",
    )?;
    let after = meshd.wait_snapshot_after(snap.version).await?;
    ensure!(after.config_errors == expected, "{:?}", after.config_errors);
    let log = meshd.log();
    for line in &expected {
        let logged = log.lines().filter(|l| l.ends_with(line.as_str())).count();
        ensure!(logged == 1, "{line:?} logged {logged} times:\n{log}");
    }
    Ok(())
}

/// A ConfigMap volume as the kubelet writes it (`web.yaml -> ..data/web.yaml`, `..data`
/// a symlink to a timestamped directory) is read through its visible links, and an
/// update (a new `..data` renamed over the old one) reaches Envoy as one change.
#[tokio::test]
async fn a_configmap_volume_and_its_atomic_updates_reach_envoy() -> anyhow::Result<()> {
    init_test_logging();
    let blue = HttpApp::start("web-1").await?;
    let green = HttpApp::start("web-2").await?;
    let web1 = PodDef::new(NS, "web-1", "blue").serves(8080, blue.port());
    let web2 = PodDef::new(NS, "web-2", "green").serves(8080, green.port());
    let client = PodDef::new(NS, "client-1", "client").calls("web", 80, free_port());
    let pods = [web1.yaml(), web2.yaml(), client.yaml()].join("---\n");
    let web_selecting = |app: &str| {
        let mut web = ServiceDef::new(NS, "web").http_port(80, 8080);
        web.selector_app = app.to_string();
        web.yaml()
    };
    let mut volume = ConfigMapDir::new()?;
    volume.update(&[
        ("pods.yaml", pods.clone()),
        ("web.yaml", web_selecting("blue")),
    ])?;

    let meshd = Meshd::start(volume.path()).await?;
    let snap = meshd.snapshot().await?;
    ensure!(
        (snap.services, snap.workloads, snap.config_errors.len()) == (1, 3, 0),
        "{snap:?}"
    );
    let _web1 = Sidecar::for_pod(&meshd, &web1, XdsFlavor::Delta).await?;
    let _web2 = Sidecar::for_pod(&meshd, &web2, XdsFlavor::Delta).await?;
    let _client = Sidecar::for_pod(&meshd, &client, XdsFlavor::Sotw).await?;
    let only = |app: &str| BTreeSet::from([app.to_string()]);
    let seen = eventually("traffic to blue", WAIT, || async {
        let seen = answering_apps(client.outbound(0), 3).await?;
        ensure!(seen == only("web-1"), "{seen:?}");
        Ok(seen)
    })
    .await?;
    ensure!(seen == only("web-1"));

    // The update: web now selects green.
    volume.update(&[
        ("pods.yaml", pods.clone()),
        ("web.yaml", web_selecting("green")),
    ])?;
    eventually("traffic to green after the swap", WAIT, || async {
        let seen = answering_apps(client.outbound(0), 3).await?;
        ensure!(seen == only("web-2"), "{seen:?}");
        Ok(())
    })
    .await?;
    let snap = meshd.snapshot().await?;
    ensure!(snap.config_errors.is_empty(), "{:?}", snap.config_errors);

    // A key gone from the ConfigMap takes its objects with it.
    volume.update(&[("pods.yaml", pods)])?;
    eventually("web to be gone", WAIT, || async {
        let snap = meshd.snapshot().await?;
        ensure!((snap.services, snap.workloads) == (0, 3), "{snap:?}");
        ensure!(snap.config_errors.is_empty(), "{:?}", snap.config_errors);
        Ok(())
    })
    .await?;
    Ok(())
}

/// 100,000 nested `[` in a 200 KB file froze meshd for 37 s: health checks and new ADS
/// streams timed out. Whatever the directory holds (that file, and files within every
/// budget that simply take long to parse), `/healthz` keeps answering while meshd reads
/// it, at start and on a change. meshd runs with one tokio worker, as in a pod with one
/// CPU. What is asserted is that health checks are answered *during* the seconds of
/// parsing, and promptly as a rule (the median): a meshd that parses on its async worker
/// answers none until it is done, while a single slow answer on two shared cores says
/// nothing.
#[tokio::test]
async fn health_answers_promptly_while_the_directory_is_read() -> anyhow::Result<()> {
    init_test_logging();
    let mesh = MeshDir::new()?;
    mesh.write_raw(
        "nested.yaml",
        &format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: deep}}\nx: {}\n",
            "[".repeat(100_000)
        ),
    )?;
    // 250,000 nodes is meshd's budget per file.
    let slow = |generation: u32, i: u32| {
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: slow-{generation}-{i}}}\nx: [{}]\n",
            "abcdefgh,".repeat(240_000)
        )
    };
    const SLOW_FILES: u32 = 6;
    for i in 0..SLOW_FILES {
        mesh.write_raw(&format!("slow-{i}.yaml"), &slow(1, i))?;
    }
    let meshd = Meshd::spawn_on_dir(
        mesh.path(),
        &["--debounce", "50ms"],
        &[("TOKIO_WORKER_THREADS", "1")],
    )
    .await?;

    // At start: meshd answers before it is ready.
    let mut while_reading = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        ensure!(tokio::time::Instant::now() < deadline, "meshd is not ready");
        let latency = meshd.healthz_latency().await?;
        if meshd.readyz().await?.0 == 200 {
            break;
        }
        while_reading.push(latency);
    }
    answered_while_reading("its directory at start", while_reading)?;
    let snap = meshd.snapshot().await?;
    ensure!(
        snap.namespaces == SLOW_FILES as usize
            && snap.config_errors.len() == 1
            && snap.config_errors[0].contains("nested.yaml: not valid YAML: recursion limit"),
        "{snap:?}"
    );

    // On a change: every slow file changes at once.
    for i in 0..SLOW_FILES {
        mesh.write_raw(&format!("slow-{i}.yaml"), &slow(2, i))?;
    }
    let mut while_reading = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the change never showed"
        );
        let latency = meshd.healthz_latency().await?;
        if meshd.snapshot().await?.version > snap.version {
            break;
        }
        while_reading.push(latency);
    }
    answered_while_reading("a change", while_reading)
}

/// Health checks answered while meshd read `what` (each one's latency): the files take
/// seconds to parse, so a meshd that answers only once it has read them answers (next to)
/// none before it is done, and its one answer waited for the parse. The median bound is
/// generous: two shared cores and parallel tests make any single answer slow at times.
fn answered_while_reading(what: &str, mut latencies: Vec<Duration>) -> anyhow::Result<()> {
    latencies.sort();
    ensure!(
        latencies.len() >= 3,
        "only {} health checks were answered while meshd read {what}: {latencies:?}",
        latencies.len()
    );
    let median = latencies[latencies.len() / 2];
    ensure!(
        median < Duration::from_millis(500),
        "health checks took {median:?} (median) while meshd read {what}: {latencies:?}"
    );
    Ok(())
}
