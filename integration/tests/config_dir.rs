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

/// `docs` as the items of one `v1` List, as `kubectl get … -o yaml` writes them.
fn as_list(docs: &[String]) -> String {
    let mut list =
        String::from("apiVersion: v1\nkind: List\nmetadata:\n  resourceVersion: \"\"\nitems:\n");
    for doc in docs {
        for (i, line) in doc.lines().enumerate() {
            list.push_str(if i == 0 { "- " } else { "  " });
            list.push_str(line);
            list.push('\n');
        }
    }
    list
}

/// `kubectl get all,configmaps -n shop -o yaml > mesh.yaml` loaded as an empty mesh:
/// the List, and the ReplicaSet, Deployment and ConfigMap in it, refused the file. Now
/// its Pods and Services are served, and what meshd does not read is noted in the log,
/// `meshctl status` and `meshctl analyze` (which still succeeds).
#[tokio::test]
async fn a_kubectl_export_is_served_and_what_meshd_ignores_is_noted() -> anyhow::Result<()> {
    init_test_logging();
    let app = HttpApp::start("web-1").await?;
    let web1 = PodDef::new(NS, "web-1", "web").serves(8080, app.port());
    let client = PodDef::new(NS, "client-1", "client").calls("web", 80, free_port());
    let others = [
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n  namespace: shop\nspec:\n  replicas: 1\n  selector:\n    matchLabels: {app: web}\n  template:\n    metadata:\n      labels: {app: web}\n    spec:\n      containers: [{name: app, image: test/web}]\nstatus: {readyReplicas: 1}\n",
        "apiVersion: apps/v1\nkind: ReplicaSet\nmetadata:\n  name: web-5d8f7c\n  namespace: shop\n  ownerReferences: [{apiVersion: apps/v1, kind: Deployment, name: web, uid: 1b2c3d4e, controller: true}]\nspec:\n  replicas: 1\n  selector:\n    matchLabels: {app: web}\n",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: kube-root-ca.crt\n  namespace: shop\ndata:\n  ca.crt: \"-----BEGIN CERTIFICATE-----\"\n",
    ];
    let mut docs = vec![
        web1.yaml(),
        client.yaml(),
        ServiceDef::new(NS, "web").http_port(80, 8080).yaml(),
    ];
    docs.extend(others.iter().map(|d| d.to_string()));
    let mesh = MeshDir::new()?;
    mesh.write_raw("mesh.yaml", &as_list(&docs))?;
    let file = mesh.path().join("mesh.yaml");
    let noted =
        |item: usize, what: &str| format!("{}: document 1, items[{item}] {what}", file.display());
    let notes = [
        noted(
            3,
            "(Deployment shop/web): apps/v1 Deployment is not read by meshd: ignored",
        ),
        noted(
            4,
            "(ReplicaSet shop/web-5d8f7c): apps/v1 ReplicaSet is not read by meshd: ignored",
        ),
        noted(
            5,
            "(ConfigMap shop/kube-root-ca.crt): v1 ConfigMap is not read by meshd: ignored",
        ),
    ];

    let analyze = std::process::Command::new(meshd_integration::tools::meshd_binary("meshctl")?)
        .arg("analyze")
        .arg(mesh.path())
        .output()?;
    let printed = String::from_utf8_lossy(&analyze.stdout);
    ensure!(analyze.status.success(), "{printed}");
    for note in &notes {
        ensure!(printed.contains(&format!("note: {note}\n")), "{printed}");
    }
    ensure!(
        printed.ends_with(&format!(
            "{}: 3 objects, no problems, 3 ignored (see the notes)\n",
            mesh.path().display()
        )),
        "{printed}"
    );

    let meshd = Meshd::start(mesh.path()).await?;
    let snap = meshd.snapshot().await?;
    ensure!(
        (snap.services, snap.workloads) == (1, 2) && snap.config_errors.is_empty(),
        "{snap:?}"
    );
    ensure!(snap.config_notes == notes, "{:?}", snap.config_notes);
    let status = meshd.meshctl(&["status"]).await?;
    let printed = String::from_utf8_lossy(&status.stdout);
    ensure!(status.status.success(), "{printed}");
    for note in &notes {
        ensure!(
            printed.contains(&format!("config note: {note}\n")),
            "{printed}"
        );
    }
    let log = meshd.log();
    ensure!(
        log.contains(
            "config directory: ignored 3 object(s) of kinds meshd does not read \
             (ConfigMap ×1, Deployment ×1, ReplicaSet ×1); `meshctl analyze` lists them"
        ),
        "{log}"
    );

    let _web = Sidecar::for_pod(&meshd, &web1, XdsFlavor::Delta).await?;
    let _client = Sidecar::for_pod(&meshd, &client, XdsFlavor::Sotw).await?;
    eventually("traffic", WAIT, || answering_apps(client.outbound(0), 1)).await?;
    Ok(())
}

/// A Service whose named targetPort no container port of a selected pod declares gave
/// that pod none of its traffic, and only `meshctl authz check` hinted at it. It is a
/// problem in the log, `meshctl status` and `meshctl analyze`, naming service, port
/// and pods, while the rest of the mesh is served; fixing the pod clears it.
#[tokio::test]
async fn a_named_target_port_no_selected_pod_declares_is_reported() -> anyhow::Result<()> {
    init_test_logging();
    let pod = |name: &str, port_name: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: shop\n  labels: {{app: web}}\nspec:\n  containers:\n    - name: app\n      image: test/web\n      ports: [{{name: {port_name}, containerPort: 8080}}]\nstatus: {{podIP: {}}}\n",
            meshd_integration::net::pod_ip()
        )
    };
    let service = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  selector: {app: web}\n  ports: [{name: http, port: 80, targetPort: http}]\n".to_string();
    let mesh = MeshDir::new()?;
    mesh.write(
        "mesh.yaml",
        &[service.clone(), pod("web-1", "http"), pod("web-2", "web")],
    )?;
    let problem = "Service shop/web port 80: targetPort \"http\" is the name of no container \
                   port of pod shop/web-2, so it gets none of this port's traffic";

    let analyze = std::process::Command::new(meshd_integration::tools::meshd_binary("meshctl")?)
        .arg("analyze")
        .arg(mesh.path())
        .output()?;
    let printed = String::from_utf8_lossy(&analyze.stdout);
    ensure!(analyze.status.code() == Some(1), "{printed}");
    ensure!(
        printed == format!("problem: {problem}\n1 problem(s)\n"),
        "{printed}"
    );

    let meshd = Meshd::start(mesh.path()).await?;
    let snap = meshd.snapshot().await?;
    ensure!(snap.problems == [problem], "{snap:?}");
    ensure!(snap.endpoints == 1, "web-1 is served: {snap:?}");
    let status = meshd.meshctl(&["status"]).await?;
    let printed = String::from_utf8_lossy(&status.stdout);
    ensure!(
        printed.contains(&format!("\nproblem: {problem}\n")),
        "{printed}"
    );
    ensure!(
        meshd.log().contains(&format!("mesh problem: {problem}")),
        "{}",
        meshd.log()
    );

    mesh.write(
        "mesh.yaml",
        &[service, pod("web-1", "http"), pod("web-2", "http")],
    )?;
    let after = meshd.wait_snapshot_after(snap.version).await?;
    ensure!(
        after.problems.is_empty() && after.endpoints == 2,
        "{after:?}"
    );
    ensure!(
        meshd
            .log()
            .contains(&format!("mesh problem resolved: {problem}")),
        "{}",
        meshd.log()
    );
    Ok(())
}
