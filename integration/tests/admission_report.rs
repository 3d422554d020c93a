//! The Lease holder's report on running pods, through a real API server: pods created
//! (some breaking the policies, one in meshd's own namespace, which is not reported),
//! WorkloadPolicies applied, and each policy's `status.report`, `/metrics` and
//! `meshctl admission report` following a policy change, a deleted pod and a deleted
//! policy; thirty offending pods keep the offenders at ten; a second replica serves
//! the same report from the status and takes the report over with the Lease.

use std::time::Duration;

use anyhow::{Context, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use meshd::admin::admission_report::PolicyReportEntry;
use meshd::sources::crd::{PolicyReport, WorkloadPolicy};
use meshd_integration::init_test_logging;
use meshd_integration::kube_api::KubeApi;
use meshd_integration::meshd::Meshd;
use meshd_integration::wait::eventually;
use serde_json::{Value, json};

/// The report is written at most every 10 s; a step may wait for one interval and a
/// status round trip.
const WAIT: Duration = Duration::from_secs(40);

fn policy(ns: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "security.meshd.io/v1alpha1", "kind": "WorkloadPolicy",
           "metadata": {"name": name, "namespace": ns}, "spec": spec})
}

/// A pod keeping `restricted`, pinned by tag.
fn good_pod(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {
            "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "app", "image": "registry.example.com/shop/web:1.2",
                "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}}]}})
}

/// A pod running `nginx:latest` as it comes: it breaks `forbidLatestTag`, and
/// `restricted` in several ways.
fn latest_pod(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {"containers": [{"name": "web", "image": "nginx:latest"}]}})
}

async fn create_pod(api: &KubeApi, ns: &str, pod: Value) -> anyhow::Result<()> {
    let pod: Pod = serde_json::from_value(pod)?;
    Api::<Pod>::namespaced(api.client.clone(), ns)
        .create(&Default::default(), &pod)
        .await
        .with_context(|| format!("create pod {ns}/{:?}", pod.metadata.name))?;
    Ok(())
}

async fn report(api: &KubeApi, ns: &str, name: &str) -> anyhow::Result<PolicyReport> {
    let p = Api::<WorkloadPolicy>::namespaced(api.client.clone(), ns)
        .get(name)
        .await?;
    p.status
        .and_then(|s| s.report)
        .with_context(|| format!("{ns}/{name}: no status.report yet"))
}

/// Waits until the report of `ns/name` satisfies `want`; returns it.
async fn wait_report(
    api: &KubeApi,
    ns: &str,
    name: &str,
    what: &str,
    want: impl Fn(&PolicyReport) -> bool,
) -> anyhow::Result<PolicyReport> {
    eventually(&format!("{ns}/{name}: {what}"), WAIT, || async {
        let r = report(api, ns, name).await?;
        ensure!(want(&r), "{r:#?}");
        Ok(r)
    })
    .await
}

fn offenders(r: &PolicyReport) -> Vec<&str> {
    r.offenders.iter().map(|o| o.pod.as_str()).collect()
}

fn rules(r: &PolicyReport) -> Vec<(&str, u64)> {
    r.rules.iter().map(|c| (c.rule.as_str(), c.pods)).collect()
}

/// The value of the metric line that starts with `series` (name and labels).
fn metric(text: &str, series: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(str::to_string)
}

#[tokio::test]
async fn the_lease_holder_reports_running_pods_in_status_metrics_and_meshctl() -> anyhow::Result<()>
{
    init_test_logging();
    let api = KubeApi::start().await?;
    api.create_namespace("shop", &[("team", "shop")]).await?;
    api.create_namespace("crowd", &[]).await?;
    create_pod(&api, "shop", good_pod("good")).await?;
    create_pod(&api, "shop", latest_pod("latest-a")).await?;
    create_pod(&api, "shop", latest_pod("latest-b")).await?;
    // meshd's namespace is never subject to its webhook, nor to the report (though
    // the root's policy below selects it too).
    api.create_namespace("meshd-system", &[("team", "shop")])
        .await?;
    create_pod(&api, "meshd-system", latest_pod("meshd-look")).await?;
    for i in 0..30 {
        create_pod(&api, "crowd", latest_pod(&format!("p{i:02}"))).await?;
    }
    let meshd = Meshd::start_kubernetes(&api, &[]).await?;

    api.apply::<WorkloadPolicy>(
        "shop",
        policy(
            "shop",
            "latest",
            json!({"mode": "Warn", "rules": {"forbidLatestTag": true}}),
        ),
    )
    .await?;
    api.apply::<WorkloadPolicy>(
        "meshd-system",
        policy(
            "meshd-system",
            "restricted",
            json!({"mode": "Audit", "profile": "restricted",
                   "namespaceSelector": {"matchLabels": {"team": "shop"}}}),
        ),
    )
    .await?;
    api.apply::<WorkloadPolicy>(
        "crowd",
        policy(
            "crowd",
            "digests",
            json!({"mode": "Enforce", "rules": {"requireImageDigest": true}}),
        ),
    )
    .await?;

    let latest = wait_report(&api, "shop", "latest", "3 pods, 2 violating", |r| {
        r.pods == 3 && r.violating_pods == 2
    })
    .await?;
    ensure!(rules(&latest) == [("forbidLatestTag", 2)], "{latest:#?}");
    ensure!(
        offenders(&latest) == ["shop/latest-a", "shop/latest-b"],
        "{latest:#?}"
    );
    ensure!(
        latest.offenders[0].violations
            == [r#"container "web": image "nginx:latest" uses the tag latest [forbidLatestTag]"#],
        "{:?}",
        latest.offenders[0]
    );
    ensure!(!latest.evaluated_at.is_empty());

    // The root's policy, for namespaces labelled team=shop: meshd's own pod and the
    // crowd are not its pods.
    let restricted = wait_report(&api, "meshd-system", "restricted", "3 pods", |r| {
        r.pods == 3 && r.violating_pods == 2
    })
    .await?;
    ensure!(
        offenders(&restricted) == ["shop/latest-a", "shop/latest-b"],
        "{restricted:#?}"
    );
    ensure!(
        rules(&restricted).contains(&("runAsNonRoot", 2)),
        "{restricted:#?}"
    );

    // Thirty offenders: counted, ten listed.
    let digests = wait_report(&api, "crowd", "digests", "30 violating", |r| {
        r.pods == 30 && r.violating_pods == 30
    })
    .await?;
    ensure!(digests.offenders.len() == 10, "{digests:#?}");
    ensure!(
        digests.offenders[0].pod == "crowd/p00" && digests.offenders[9].pod == "crowd/p09",
        "{:?}",
        offenders(&digests)
    );
    ensure!(rules(&digests) == [("requireImageDigest", 30)]);

    let metrics = meshd.metrics().await?;
    for (series, value) in [
        (r#"meshd_workload_policy_pods{policy="shop/latest"}"#, "3"),
        (
            r#"meshd_workload_policy_violating_pods{policy="shop/latest",mode="Warn"}"#,
            "2",
        ),
        (
            r#"meshd_workload_policy_rule_violating_pods{policy="shop/latest",mode="Warn",rule="forbidLatestTag"}"#,
            "2",
        ),
        (
            r#"meshd_workload_policy_pods{policy="crowd/digests"}"#,
            "30",
        ),
        (
            r#"meshd_workload_policy_violating_pods{policy="meshd-system/restricted",mode="Audit"}"#,
            "2",
        ),
    ] {
        ensure!(
            metric(&metrics, series).as_deref() == Some(value),
            "{series} is not {value}:\n{metrics}"
        );
    }

    // meshctl: the table and the offenders; JSON as the status holds it.
    let out = meshd.meshctl(&["admission", "report"]).await?;
    ensure!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout)?;
    let row = |policy: &str| {
        text.lines()
            .find(|l| l.starts_with(policy))
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
    };
    ensure!(
        row("shop/latest")
            == Some(vec![
                "shop/latest",
                "Warn",
                "True",
                "3",
                "2",
                "forbidLatestTag(2)"
            ]),
        "{text}"
    );
    ensure!(
        row("crowd/digests")
            == Some(vec![
                "crowd/digests",
                "Enforce",
                "True",
                "30",
                "30",
                "requireImageDigest(30)"
            ]),
        "{text}"
    );
    ensure!(
        text.contains("offenders (the first 10 of 30)")
            && text.contains(
                "\n  shop/latest-a\n    container \"web\": image \"nginx:latest\" uses the tag latest [forbidLatestTag]\n"
            )
            && !text.contains("crowd/p10"),
        "{text}"
    );
    let out = meshd
        .meshctl(&["admission", "report", "-o", "json"])
        .await?;
    ensure!(out.status.success(), "{out:?}");
    let entries: Vec<PolicyReportEntry> = serde_json::from_slice(&out.stdout)?;
    let names: Vec<&str> = entries.iter().map(|e| e.policy.as_str()).collect();
    ensure!(
        names == ["crowd/digests", "meshd-system/restricted", "shop/latest"],
        "{names:?}"
    );
    ensure!(entries[2].report.as_ref() == Some(&latest), "{entries:#?}");

    // The policy changes: Enforce, and resource limits instead of the tag, which the
    // good pod lacks too; the rule no pod breaks any more leaves the report.
    api.apply::<WorkloadPolicy>(
        "shop",
        policy(
            "shop",
            "latest",
            json!({"mode": "Enforce", "rules": {"requireResourceLimits": true}}),
        ),
    )
    .await?;
    let changed = wait_report(&api, "shop", "latest", "every pod violating", |r| {
        r.violating_pods == 3
    })
    .await?;
    ensure!(
        rules(&changed) == [("requireResourceLimits", 3)],
        "{changed:#?}"
    );
    ensure!(
        offenders(&changed) == ["shop/good", "shop/latest-a", "shop/latest-b"],
        "{changed:#?}"
    );
    let metrics = meshd.metrics().await?;
    ensure!(
        metric(
            &metrics,
            r#"meshd_workload_policy_violating_pods{policy="shop/latest",mode="Enforce"}"#
        )
        .as_deref()
            == Some("3")
            && !metrics.contains(r#"{policy="shop/latest",mode="Warn""#),
        "the Warn series stays:\n{metrics}"
    );

    // A pod goes; so does a policy.
    api.delete_pod_now("shop", "latest-a").await?;
    api.delete::<WorkloadPolicy>("crowd", "digests").await?;
    let gone = wait_report(&api, "shop", "latest", "2 pods", |r| r.pods == 2).await?;
    ensure!(
        gone.violating_pods == 2 && offenders(&gone) == ["shop/good", "shop/latest-b"],
        "{gone:#?}"
    );
    ensure!(rules(&gone) == [("requireResourceLimits", 2)], "{gone:#?}");
    eventually("crowd/digests to leave /metrics", WAIT, || async {
        let metrics = meshd.metrics().await?;
        ensure!(!metrics.contains("crowd/digests"), "{metrics}");
        Ok(())
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_second_replica_serves_the_report_and_takes_it_over_with_the_lease() -> anyhow::Result<()>
{
    init_test_logging();
    let api = KubeApi::start().await?;
    api.create_namespace("shop", &[]).await?;
    api.create_namespace("other", &[]).await?;
    create_pod(&api, "shop", latest_pod("first")).await?;
    let args = |name: &'static str| ["--replica-name", name, "--lease-duration", "3s"];
    let (args_a, args_b) = (args("replica-a"), args("replica-b"));
    let (a, b) = tokio::join!(
        Meshd::start_kubernetes(&api, &args_a),
        Meshd::start_kubernetes(&api, &args_b),
    );
    let (a, b) = (a?, b?);
    let a_leads = eventually("one replica to hold the Lease", WAIT, || async {
        match (a.snapshot().await?.leader, b.snapshot().await?.leader) {
            (Some(true), Some(false)) => Ok(true),
            (Some(false), Some(true)) => Ok(false),
            other => anyhow::bail!("leaders: {other:?}"),
        }
    })
    .await?;
    let (leader, follower) = if a_leads { (a, b) } else { (b, a) };
    api.apply::<WorkloadPolicy>(
        "shop",
        policy(
            "shop",
            "latest",
            json!({"mode": "Audit", "rules": {"forbidLatestTag": true}}),
        ),
    )
    .await?;
    api.apply::<WorkloadPolicy>(
        "other",
        policy(
            "other",
            "latest",
            json!({"mode": "Audit", "rules": {"forbidLatestTag": true}}),
        ),
    )
    .await?;
    let first = wait_report(&api, "shop", "latest", "1 violating", |r| {
        r.violating_pods == 1
    })
    .await?;
    wait_report(&api, "other", "latest", "no pods", |r| r.pods == 0).await?;

    // A pod elsewhere changes the other report only: shop's is not written again.
    create_pod(&api, "other", latest_pod("elsewhere")).await?;
    wait_report(&api, "other", "latest", "1 violating", |r| {
        r.violating_pods == 1
    })
    .await?;
    ensure!(
        report(&api, "shop", "latest").await? == first,
        "an unchanged report was written again"
    );

    // The follower answers from the status; only the leader exports the metrics.
    let out = follower
        .meshctl(&["admission", "report", "-o", "json"])
        .await?;
    ensure!(out.status.success(), "{out:?}");
    let entries: Vec<PolicyReportEntry> = serde_json::from_slice(&out.stdout)?;
    ensure!(
        entries.len() == 2 && entries[1].report.as_ref() == Some(&first),
        "{entries:#?}"
    );
    ensure!(
        leader.metrics().await?.contains("shop/latest")
            && !follower.metrics().await?.contains("shop/latest"),
        "metrics on the follower"
    );

    // The leader stops; the follower takes the Lease and reports the next pod.
    leader.terminate().await?;
    eventually("the other replica to take the Lease", WAIT, || async {
        ensure!(follower.snapshot().await?.leader == Some(true), "not yet");
        Ok(())
    })
    .await?;
    create_pod(&api, "shop", latest_pod("second")).await?;
    wait_report(&api, "shop", "latest", "2 violating", |r| {
        r.violating_pods == 2
    })
    .await?;
    let metrics = follower.metrics().await?;
    ensure!(
        metric(
            &metrics,
            r#"meshd_workload_policy_violating_pods{policy="shop/latest",mode="Audit"}"#
        )
        .as_deref()
            == Some("2"),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test]
async fn with_a_config_directory_the_report_says_it_needs_kubernetes() -> anyhow::Result<()> {
    init_test_logging();
    let dir = tempfile::tempdir()?;
    let meshd = Meshd::start(dir.path()).await?;
    let out = meshd.meshctl(&["admission", "report"]).await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && stderr.contains("the admission report needs --source kubernetes"),
        "{out:?}"
    );
    Ok(())
}
