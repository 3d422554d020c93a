//! meshd as a Kubernetes controller, against a real API server (kube's own server
//! libraries on etcd: real list/watch, 410 Gone, status subresources, Leases, Secrets)
//! and real Envoy sidecars. No controllers run there, so the tests create what they
//! would: Pods with status, EndpointSlices.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, ensure};
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use meshd::identity::RotationStatus;
use meshd::sources::crd::AuthorizationPolicy;
use meshd_integration::apps::{Traffic, http_get};
use meshd_integration::envoy::Sidecar;
use meshd_integration::kube_api::KubeApi;
use meshd_integration::kube_shop::{NS, Shop};
use meshd_integration::meshd::Meshd;
use meshd_integration::wait::eventually;
use meshd_integration::{XdsFlavor, init_test_logging};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn pods_and_services_from_the_cluster_reach_envoy() -> anyhow::Result<()> {
    init_test_logging();
    let api = KubeApi::start().await?;
    let shop = Shop::new().await?;
    shop.create(&api, false).await?;
    let meshd = Meshd::start_kubernetes(&api, &["--debounce", "50ms"]).await?;
    let sidecars = shop.sidecars(&meshd).await?;

    // web-1 is not ready: its endpoint is known but gets no traffic.
    eventually("a 503 while web-1 is not ready", WAIT, || async {
        let r = http_get(shop.outbound(), "/").await?;
        ensure!(r.status == 503, "got {} {}", r.status, r.body);
        Ok(())
    })
    .await?;
    // The pod becomes ready: Envoy routes to it.
    shop.set_ready(&api, true).await?;
    eventually("web-1 to answer once ready", WAIT, || async {
        let r = http_get(shop.outbound(), "/").await?;
        ensure!(
            r.status == 200 && r.app.as_deref() == Some("web-1"),
            "got {} {:?}",
            r.status,
            r.app
        );
        Ok(())
    })
    .await?;

    // The Service is deleted: its cluster leaves the client's Envoy.
    let client = &sidecars[1];
    let has_web = || async {
        let dump = client
            .admin("/config_dump?resource=dynamic_active_clusters")
            .await?;
        anyhow::Ok(dump.contains("outbound|80||web.shop"))
    };
    ensure!(
        has_web().await?,
        "the client's Envoy has no cluster for web"
    );
    api.delete::<Service>(NS, "web").await?;
    eventually(
        "web's cluster to leave the client's Envoy",
        WAIT,
        || async {
            ensure!(!has_web().await?, "still there");
            Ok(())
        },
    )
    .await?;
    Ok(())
}

/// The API server restarts: every watch is cut and, since etcd moved on meanwhile
/// (writes to ConfigMaps, which meshd does not watch), resuming from meshd's last
/// resourceVersion gets `410 Gone`. meshd re-lists — and while it does, the mesh it
/// serves never shrinks and traffic keeps flowing.
#[tokio::test]
async fn a_410_gone_relists_without_serving_an_empty_mesh() -> anyhow::Result<()> {
    init_test_logging();
    let api = KubeApi::start().await?;
    let shop = Shop::new().await?;
    shop.create(&api, true).await?;
    let meshd = Meshd::start_kubernetes(&api, &["--debounce", "50ms"]).await?;
    let _sidecars = shop.sidecars(&meshd).await?;
    eventually("web-1 to answer", WAIT, || async {
        let r = http_get(shop.outbound(), "/").await?;
        ensure!(r.status == 200, "got {}", r.status);
        Ok(())
    })
    .await?;

    // Watch what meshd serves and what the client sees, all along.
    let size = |s: &meshd::admin::SnapshotSummary| s.services + s.workloads + s.endpoints;
    let initial = size(&meshd.snapshot().await?);
    let stop = Arc::new(AtomicBool::new(false));
    let smallest = Arc::new(AtomicUsize::new(usize::MAX));
    let failures = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(AtomicUsize::new(0));
    let meshd = Arc::new(meshd);
    let watcher = {
        let (stop, smallest, meshd) = (stop.clone(), smallest.clone(), meshd.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(s) = meshd.snapshot().await {
                    smallest.fetch_min(size(&s), Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let traffic = {
        let (stop, failures, requests) = (stop.clone(), failures.clone(), requests.clone());
        let addr = shop.outbound();
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match http_get(addr, "/").await {
                    Ok(r) if r.status == 200 => {}
                    _ => {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
                requests.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    for i in 0..30 {
        api.apply::<ConfigMap>(
            "default",
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": {"name": format!("noise-{i}"), "namespace": "default"},
                   "data": {"n": i.to_string()}}),
        )
        .await?;
    }
    api.restart().await?;
    eventually(
        "meshd to re-list pods after 410 Gone",
        Duration::from_secs(60),
        || async {
            let log = meshd.log();
            ensure!(
                log.lines()
                    .any(|l| l.contains("re-list done") && l.contains("kind=Pod")),
                "no re-list yet; meshd's log:\n{}",
                log.lines()
                    .filter(|l| l.contains("kubernetes") || l.contains("watch"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            Ok(())
        },
    )
    .await?;
    // A little traffic after the re-list, too.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    watcher.await?;
    traffic.await?;

    let log = meshd.log();
    ensure!(
        log.contains("410") || log.to_lowercase().contains("gone") || log.contains("too old"),
        "the re-list was not caused by 410 Gone:\n{log}"
    );
    let least = smallest.load(Ordering::Relaxed);
    ensure!(
        least == initial,
        "meshd served a smaller mesh at some point: {least} objects instead of {initial}"
    );
    let (failed, total) = (
        failures.load(Ordering::Relaxed),
        requests.load(Ordering::Relaxed),
    );
    ensure!(
        failed == 0 && total > 50,
        "{failed} of {total} requests failed"
    );
    ensure!(
        meshd.readyz().await?.0 == 200,
        "meshd is not ready after the re-list"
    );
    Ok(())
}

/// meshd is not ready — and serves no xDS — until every watcher has listed; a policy
/// with an invalid field gets `Accepted=False` with the reason while its previous
/// version keeps applying.
#[tokio::test]
async fn readiness_and_policy_status() -> anyhow::Result<()> {
    init_test_logging();
    let api = KubeApi::start_bare().await?;
    api.create_namespace("meshd-system", &[]).await?;
    let shop = Shop::new().await?;
    shop.create(&api, true).await?;
    // Without meshd's CRDs, two watchers cannot list: not ready.
    let meshd = Meshd::spawn_kubernetes(&api, &["--debounce", "50ms"]).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (status, body) = meshd.readyz().await?;
    ensure!(
        status == 503
            && body.contains("AuthorizationPolicy")
            && body.contains("PeerAuthentication"),
        "{status} {body}"
    );
    ensure!(
        tokio::net::TcpStream::connect(meshd.xds_addr)
            .await
            .is_err(),
        "xDS is served before the initial sync"
    );
    api.install_crds().await?;
    meshd.wait_ready().await?;

    let policy = |rules: serde_json::Value| {
        json!({"apiVersion": "security.meshd.io/v1alpha1", "kind": "AuthorizationPolicy",
               "metadata": {"name": "no-admin", "namespace": NS},
               "spec": {"selector": {"matchLabels": {"app": "web"}}, "action": "DENY",
                        "rules": rules}})
    };
    let admin_rule = json!({"to": [{"operation": {"paths": ["/admin*"]}}]});
    api.apply::<AuthorizationPolicy>(NS, policy(json!([admin_rule])))
        .await?;
    wait_condition(&api, "no-admin", "True", 1).await?;
    let check = || async {
        let out = meshd
            .meshctl(&[
                "authz",
                "check",
                "--from-sa",
                "shop/client",
                "--to",
                "shop/web:80",
                "--path",
                "/admin/x",
            ])
            .await?;
        anyhow::Ok(String::from_utf8_lossy(&out.stdout).to_string())
    };
    eventually("meshd to apply the policy", WAIT, || async {
        let out = check().await?;
        ensure!(out.contains("denied by shop/no-admin#0"), "{out}");
        Ok(())
    })
    .await?;

    // Generation 2 adds a rule with a bad CIDR.
    let bad_rule = json!({"from": [{"source": {"ipBlocks": ["10.0.0.0/33"]}}]});
    api.apply::<AuthorizationPolicy>(NS, policy(json!([admin_rule, bad_rule])))
        .await?;
    let condition = wait_condition(&api, "no-admin", "False", 2).await?;
    ensure!(
        condition.reason == "Invalid"
            && condition
                .message
                .contains("spec.rules[1].from[0].source.ipBlocks[0]"),
        "{condition:?}"
    );
    let out = check().await?;
    ensure!(
        out.contains("denied by shop/no-admin#0"),
        "the previous version no longer applies: {out}"
    );
    let errors = meshd.snapshot().await?.config_errors;
    ensure!(
        errors
            .iter()
            .any(|e| e.contains("AuthorizationPolicy shop/no-admin")),
        "{errors:?}"
    );
    Ok(())
}

/// Two replicas race for the root Secret and end with one root; one holds the Lease
/// and writes status; when it stops, the other takes the Lease and the status writes;
/// a restarted replica keeps the root.
#[tokio::test]
async fn replicas_share_one_root_and_hand_over_the_lease() -> anyhow::Result<()> {
    init_test_logging();
    let api = KubeApi::start().await?;
    let shop = Shop::new().await?;
    shop.create(&api, true).await?;
    let args = |name: &'static str| ["--replica-name", name, "--lease-duration", "3s"];
    let (args_a, args_b) = (args("replica-a"), args("replica-b"));
    let (a, b) = tokio::join!(
        Meshd::start_kubernetes(&api, &args_a),
        Meshd::start_kubernetes(&api, &args_b),
    );
    let (a, b) = (a?, b?);
    let root_a = root(&a).await?;
    ensure!(root_a.len() == 1 && root_a == root(&b).await?, "{root_a:?}");

    let (leader, follower, leader_name, follower_name) =
        leader_and_follower(a, b, "replica-a", "replica-b").await?;

    let deny = |name: &str| {
        json!({"apiVersion": "security.meshd.io/v1alpha1", "kind": "AuthorizationPolicy",
               "metadata": {"name": name, "namespace": NS},
               "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/x"]}}]}]}})
    };
    api.apply::<AuthorizationPolicy>(NS, deny("first")).await?;
    wait_condition(&api, "first", "True", 1).await?;
    ensure!(
        status_writer(&api, "first").await? == format!("meshd/{leader_name}"),
        "the status was not written by the leader"
    );

    // The leader stops; the follower takes over the Lease and the status writes.
    leader.terminate().await?;
    eventually("the other replica to take the Lease", WAIT, || async {
        ensure!(follower.snapshot().await?.leader == Some(true), "not yet");
        Ok(())
    })
    .await?;
    api.apply::<AuthorizationPolicy>(NS, deny("second")).await?;
    wait_condition(&api, "second", "True", 1).await?;
    ensure!(status_writer(&api, "second").await? == format!("meshd/{follower_name}"));

    // A restarted replica keeps the root.
    let again_args = args(leader_name);
    let again = Meshd::start_kubernetes(&api, &again_args).await?;
    ensure!(
        root(&again).await? == root_a,
        "the root changed across a restart"
    );
    Ok(())
}

/// Waits until exactly one of `a` and `b` holds the Lease; returns (leader, follower,
/// leader's name, follower's name).
async fn leader_and_follower(
    a: Meshd,
    b: Meshd,
    name_a: &'static str,
    name_b: &'static str,
) -> anyhow::Result<(Meshd, Meshd, &'static str, &'static str)> {
    let a_leads = eventually("one replica to hold the Lease", WAIT, || async {
        let (la, lb) = (a.snapshot().await?.leader, b.snapshot().await?.leader);
        match (la, lb) {
            (Some(true), Some(false)) => Ok(true),
            (Some(false), Some(true)) => Ok(false),
            other => anyhow::bail!("leaders: {other:?}"),
        }
    })
    .await?;
    Ok(if a_leads {
        (a, b, name_a, name_b)
    } else {
        (b, a, name_b, name_a)
    })
}

/// A root rotation asked of the follower: the Lease holder walks the root Secret
/// through the three steps, both replicas follow it, and traffic from a sidecar of one
/// replica to a sidecar of the other does not fail once.
#[tokio::test]
async fn root_rotation_in_the_secret_is_driven_by_the_lease_holder() -> anyhow::Result<()> {
    init_test_logging();
    let api = KubeApi::start().await?;
    let shop = Shop::new().await?;
    shop.create(&api, true).await?;
    let args = |name: &'static str| {
        [
            "--replica-name",
            name,
            "--lease-duration",
            "3s",
            "--workload-cert-ttl",
            "4s",
            "--root-rotation-grace",
            "2s",
        ]
    };
    let (args_a, args_b) = (args("replica-a"), args("replica-b"));
    let (a, b) = tokio::join!(
        Meshd::start_kubernetes(&api, &args_a),
        Meshd::start_kubernetes(&api, &args_b),
    );
    let (leader, follower, leader_name, _) =
        leader_and_follower(a?, b?, "replica-a", "replica-b").await?;
    let (old_root, _) = api.mesh_root().await?;

    // web's sidecar gets its certificates from the leader, the client's from the
    // follower: each side must trust what the other replica signs, at every step.
    let _web = Sidecar::start(&leader, NS, "web-1", "web", XdsFlavor::Delta).await?;
    let _client = Sidecar::start(&follower, NS, "client-1", "client", XdsFlavor::Sotw).await?;
    eventually("traffic", WAIT, || async {
        ensure!(http_get(shop.outbound(), "/").await?.status == 200);
        Ok(())
    })
    .await?;
    let traffic = Traffic::start(shop.outbound());

    let out = follower.meshctl(&["ca", "rotate-root"]).await?;
    let printed = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && printed.contains("trusting-new-root"),
        "{printed}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let again = follower.meshctl(&["ca", "rotate-root"]).await?;
    ensure!(
        !again.status.success()
            && String::from_utf8_lossy(&again.stderr).contains("already under way"),
        "a second request during the rotation: {}",
        String::from_utf8_lossy(&again.stderr)
    );

    let mut phases = Vec::new();
    for replica in [&follower, &leader] {
        phases.extend(replica.wait_rotation_done(WAIT).await?.1);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (sent, failed) = traffic.stop().await;
    ensure!(
        phases.contains(&"signing-with-new-root".to_string()),
        "phases seen: {phases:?}"
    );
    ensure!(sent > 100, "only {sent} requests during the rotation");
    ensure!(
        failed == 0,
        "{failed} of {sent} requests failed during the rotation"
    );

    // One new root, the same on both replicas; the old one is kept for the record,
    // and the Lease holder wrote the new root.
    let (new_root, _) = api.mesh_root().await?;
    ensure!(new_root != old_root, "the root did not change");
    let (on_leader, on_follower) = (root(&leader).await?, root(&follower).await?);
    ensure!(
        on_leader.len() == 1 && on_leader == on_follower,
        "trusted roots: leader {on_leader:?}, follower {on_follower:?}"
    );
    let secret = kube::Api::<k8s_openapi::api::core::v1::Secret>::namespaced(
        api.client.clone(),
        "meshd-system",
    )
    .get("meshd-ca")
    .await?;
    let data = secret.data.clone().unwrap_or_default();
    ensure!(
        data.get("previous-root-cert.pem").map(|b| b.0.as_slice()) == Some(old_root.as_bytes())
    );
    ensure!(!data.contains_key("next-root-key.pem") && !data.contains_key("previous-root-key.pem"));
    let root_writer = secret
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .find(|f| {
            f.fields_v1
                .as_ref()
                .is_some_and(|v| v.0["f:data"].get("f:root-cert.pem").is_some())
        })
        .and_then(|f| f.manager);
    ensure!(
        root_writer == Some(format!("meshd/{leader_name}")),
        "root-cert.pem was written by {root_writer:?}"
    );
    Ok(())
}

/// Waits until the policy's `Accepted` condition is `status` for `generation`.
async fn wait_condition(
    api: &KubeApi,
    name: &str,
    status: &str,
    generation: i64,
) -> anyhow::Result<meshd::sources::crd::PolicyCondition> {
    let policies: kube::Api<AuthorizationPolicy> = kube::Api::namespaced(api.client.clone(), NS);
    eventually(
        &format!("{name}: Accepted={status} for generation {generation}"),
        WAIT,
        || async {
            let p = policies.get(name).await?;
            let c = p
                .status
                .unwrap_or_default()
                .conditions
                .into_iter()
                .find(|c| c.type_ == "Accepted")
                .context("no Accepted condition")?;
            ensure!(
                c.status == status && c.observed_generation == generation,
                "{c:?}"
            );
            Ok(c)
        },
    )
    .await
}

/// The field manager that wrote the policy's status.
async fn status_writer(api: &KubeApi, name: &str) -> anyhow::Result<String> {
    let policies: kube::Api<AuthorizationPolicy> = kube::Api::namespaced(api.client.clone(), NS);
    let p = policies.get(name).await?;
    p.metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .find(|f| f.subresource.as_deref() == Some("status"))
        .and_then(|f| f.manager)
        .context("no status manager")
}

/// The roots `meshd` trusts, by serial.
async fn root(meshd: &Meshd) -> anyhow::Result<Vec<String>> {
    let s: RotationStatus = meshd.get_json("/ca/status").await?;
    Ok(s.trusted_roots)
}

/// With `--namespace-selector`, only labelled namespaces (and the root namespace) are
/// part of the mesh, and labelling one brings it in live.
#[tokio::test]
async fn namespace_selection() -> anyhow::Result<()> {
    init_test_logging();
    let api = KubeApi::start().await?;
    let shop = Shop::new().await?;
    shop.create(&api, true).await?; // shop carries meshd.io/mesh=enabled
    api.create_namespace("other", &[]).await?;
    api.http_service("other", "legacy", 80, 8080).await?;
    let meshd =
        Meshd::start_kubernetes(&api, &["--namespace-selector", "meshd.io/mesh=enabled"]).await?;
    let services = || async {
        let snap: serde_json::Value = meshd.get_json("/debug/snapshot").await?;
        anyhow::Ok(snap["services"].as_u64().unwrap_or(0))
    };
    // Ready means the published mesh holds every initial list.
    ensure!(services().await? == 1, "only shop/web is in the mesh");
    api.create_namespace("other", &[("meshd.io/mesh", "enabled")])
        .await?;
    eventually("the labelled namespace to join the mesh", WAIT, || async {
        ensure!(services().await? == 2, "{} services", services().await?);
        Ok(())
    })
    .await?;
    Ok(())
}
