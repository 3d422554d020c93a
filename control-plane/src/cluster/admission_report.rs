//! The report on running pods: the Lease holder puts every pod of the cluster against
//! every `WorkloadPolicy` with the one evaluator ([`crate::admission::check`], as the
//! webhook does) and keeps a small summary in each policy's `status.report`, and in
//! `/metrics`.
//!
//! - **Who**: the Lease holder only. It watches Pods itself (a kube-runtime watcher
//!   of every namespace but meshd's own, which its webhook never sees either), keeping
//!   only what the evaluator reads: metadata without `managedFields` and
//!   `last-applied-configuration`, and the spec. Finished pods (`Succeeded`,
//!   `Failed`) do not count. Losing the Lease stops the watch and clears the metrics;
//!   the next holder lists the pods and writes every report again.
//! - **When**: at once when the pods are listed, then after changes to the pods or to
//!   the mesh snapshot (policies, namespaces' labels, mTLS), at most every
//!   [`INTERVAL`]: a cluster where pods churn costs one evaluation per interval. The
//!   evaluation runs on the blocking pool.
//! - **What is written**: a merge patch of `status.report` only (the `Accepted`
//!   condition is [`super::policy_status`]'s, so neither clobbers the other), and only
//!   when the report changed other than its `evaluatedAt`; every [`RESYNC`] all of
//!   them again, which repairs a status someone else changed.
//! - **Bounded**: counts per policy and per rule (the rules are a fixed set), at most
//!   [`MAX_OFFENDERS`] offenders by namespace and name, each with at most
//!   [`MAX_VIOLATIONS`] violations then `and N more`, each cut at [`MAX_MESSAGE`]
//!   characters: the status does not grow with the cluster.
//!
//! A policy's pods are those it applies to by namespace and selector; a pod its
//! ServiceAccount exemption covers counts among them, as not violating.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::admission::{self, workload::PodOf};
use crate::inject::InjectConfig;
use crate::logging::Escaped;
use crate::metrics::{PolicyLabel, PolicyModeLabel, PolicyRuleLabel, metrics};
use crate::model::workload_policy::Mode;
use crate::model::{MeshSnapshot, ObjectKey};
use crate::sources::crd::{self, PolicyOffender, PolicyReport, RuleCount};

/// Shortest time between two evaluations.
pub const INTERVAL: Duration = Duration::from_secs(10);
/// How often every report is written even if it did not change.
pub const RESYNC: Duration = Duration::from_secs(300);
pub const MAX_OFFENDERS: usize = 10;
pub const MAX_VIOLATIONS: usize = 5;
pub const MAX_MESSAGE: usize = 300;

/// One policy against the running pods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tally {
    pub mode: Mode,
    pub pods: u64,
    pub violating: u64,
    /// Rule → the pods that break it.
    pub rules: BTreeMap<&'static str, u64>,
    pub offenders: Vec<PolicyOffender>,
}

impl Tally {
    /// The report as the status holds it; rules broken most first.
    pub fn report(&self, evaluated_at: String) -> PolicyReport {
        let mut rules: Vec<RuleCount> = self
            .rules
            .iter()
            .map(|(rule, pods)| RuleCount {
                rule: rule.to_string(),
                pods: *pods,
            })
            .collect();
        rules.sort_by(|a, b| b.pods.cmp(&a.pods).then_with(|| a.rule.cmp(&b.rule)));
        PolicyReport {
            evaluated_at,
            pods: self.pods,
            violating_pods: self.violating,
            rules,
            offenders: self.offenders.clone(),
        }
    }
}

/// Every policy of `mesh` (each has a tally, also with no pods) against `pods`, which
/// come in the order offenders are listed in (namespace, name).
pub fn tally<'p>(
    mesh: &MeshSnapshot,
    inject: &InjectConfig,
    pods: impl IntoIterator<Item = (&'p ObjectKey, &'p PodOf)>,
) -> BTreeMap<ObjectKey, Tally> {
    let mut tallies: BTreeMap<ObjectKey, Tally> = mesh
        .workload_policies
        .iter()
        .map(|(key, p)| {
            let tally = Tally {
                mode: p.mode,
                pods: 0,
                violating: 0,
                rules: BTreeMap::new(),
                offenders: Vec::new(),
            };
            (key.clone(), tally)
        })
        .collect();
    for (key, pod) in pods {
        for policy in admission::applying(mesh, &key.namespace, &pod.meta) {
            if let Some(t) = tallies.get_mut(&policy.key) {
                t.pods += 1;
            }
        }
        let verdict = admission::check(mesh, inject, &key.namespace, pod);
        for finding in verdict.findings {
            let Some(t) = tallies.get_mut(&finding.policy) else {
                continue;
            };
            t.violating += 1;
            let rules: BTreeSet<&'static str> =
                finding.violations.iter().map(|v| v.control).collect();
            for rule in rules {
                *t.rules.entry(rule).or_default() += 1;
            }
            if t.offenders.len() < MAX_OFFENDERS {
                let mut violations: Vec<String> = finding
                    .violations
                    .iter()
                    .take(MAX_VIOLATIONS)
                    .map(|v| cut(format!("{v} [{}]", v.control)))
                    .collect();
                if finding.violations.len() > MAX_VIOLATIONS {
                    violations.push(format!(
                        "and {} more",
                        finding.violations.len() - MAX_VIOLATIONS
                    ));
                }
                t.offenders.push(PolicyOffender {
                    pod: key.to_string(),
                    violations,
                });
            }
        }
    }
    tallies
}

/// At most [`MAX_MESSAGE`] characters: a message quotes images, which have no limit.
fn cut(mut message: String) -> String {
    if let Some((at, _)) = message.char_indices().nth(MAX_MESSAGE) {
        message.truncate(at);
        message.push('…');
    }
    message
}

/// What the evaluator reads of a Pod, if it counts (it has a spec and has not
/// finished).
fn running(pod: Pod) -> Option<(ObjectKey, PodOf)> {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return None;
    }
    let mut meta = pod.metadata;
    let key = ObjectKey::new(meta.namespace.as_deref()?, meta.name.as_deref()?);
    meta.managed_fields = None;
    if let Some(a) = meta.annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
    let spec = pod.spec?;
    Some((
        key,
        PodOf {
            prefix: "",
            meta,
            spec,
        },
    ))
}

fn key_of(pod: &Pod) -> Option<ObjectKey> {
    Some(ObjectKey::new(
        pod.metadata.namespace.as_deref()?,
        pod.metadata.name.as_deref()?,
    ))
}

/// Starts the report task: it works while `is_leader` says so. `inject` is the
/// injection template meshd's own containers are recognised by; `meshd_namespace`'s
/// pods are not reported.
pub fn spawn(
    client: Client,
    mesh: watch::Receiver<Arc<MeshSnapshot>>,
    inject: Arc<InjectConfig>,
    mut is_leader: watch::Receiver<bool>,
    meshd_namespace: String,
    replica: String,
) {
    tokio::spawn(async move {
        let params = PatchParams {
            field_manager: Some(format!("meshd-report/{replica}")),
            ..Default::default()
        };
        loop {
            if is_leader.wait_for(|l| *l).await.is_err() {
                return;
            }
            let leading = Leading {
                client: client.clone(),
                mesh: mesh.clone(),
                inject: inject.clone(),
                params: params.clone(),
                meshd_namespace: meshd_namespace.clone(),
            };
            let stopped = leading.run(is_leader.clone()).await;
            clear_metrics();
            if stopped {
                return;
            }
        }
    });
}

struct Leading {
    client: Client,
    mesh: watch::Receiver<Arc<MeshSnapshot>>,
    inject: Arc<InjectConfig>,
    params: PatchParams,
    meshd_namespace: String,
}

impl Leading {
    /// Reports until the Lease is lost (`false`) or meshd stops (`true`).
    async fn run(mut self, mut is_leader: watch::Receiver<bool>) -> bool {
        let api: Api<Pod> = Api::all(self.client.clone());
        let config = watcher::Config::default()
            .fields(&format!("metadata.namespace!={}", self.meshd_namespace));
        let mut events = watcher::watcher(api, config).default_backoff().boxed();
        let mut pods: BTreeMap<ObjectKey, Arc<PodOf>> = BTreeMap::new();
        let mut listing: BTreeMap<ObjectKey, Arc<PodOf>> = BTreeMap::new();
        let mut listed = false;
        let mut dirty = false;
        let mut last: Option<Instant> = None;
        let mut written: BTreeMap<ObjectKey, PolicyReport> = BTreeMap::new();
        let mut exported = Exported::default();
        let mut resync = tokio::time::interval_at(Instant::now() + RESYNC, RESYNC);
        tracing::info!("admission report: watching pods");
        loop {
            let due = (listed && dirty).then(|| last.map_or_else(Instant::now, |t| t + INTERVAL));
            tokio::select! {
                r = is_leader.changed() => match r {
                    Err(_) => return true,
                    Ok(()) if !*is_leader.borrow() => {
                        tracing::info!("admission report: stopped (no longer the Lease holder)");
                        return false;
                    }
                    Ok(()) => {}
                },
                r = self.mesh.changed() => {
                    if r.is_err() {
                        return true;
                    }
                    dirty = true;
                }
                event = events.next() => match event {
                    None => return true,
                    Some(Ok(Event::Init)) => listing.clear(),
                    Some(Ok(Event::InitApply(pod))) => {
                        if let Some((key, pod)) = running(pod) {
                            listing.insert(key, Arc::new(pod));
                        }
                    }
                    Some(Ok(Event::InitDone)) => {
                        pods = std::mem::take(&mut listing);
                        listed = true;
                        dirty = true;
                    }
                    Some(Ok(Event::Apply(pod))) => {
                        let key = key_of(&pod);
                        match running(pod) {
                            Some((key, pod)) => {
                                pods.insert(key, Arc::new(pod));
                            }
                            None => {
                                if let Some(key) = key {
                                    pods.remove(&key);
                                }
                            }
                        }
                        dirty = true;
                    }
                    Some(Ok(Event::Delete(pod))) => {
                        if let Some(key) = key_of(&pod) {
                            pods.remove(&key);
                        }
                        dirty = true;
                    }
                    Some(Err(e)) => {
                        tracing::warn!("admission report: pod watch failed, retrying after a backoff: {e}");
                    }
                },
                _ = resync.tick() => {
                    written.clear();
                    dirty = true;
                }
                _ = sleep_until(due), if due.is_some() => {
                    last = Some(Instant::now());
                    dirty = !self.evaluate(&pods, &mut written, &mut exported).await;
                }
            }
        }
    }

    /// One evaluation of every pod, its reports written and its metrics set; `false`
    /// if a write failed (it is retried at the next evaluation).
    async fn evaluate(
        &self,
        pods: &BTreeMap<ObjectKey, Arc<PodOf>>,
        written: &mut BTreeMap<ObjectKey, PolicyReport>,
        exported: &mut Exported,
    ) -> bool {
        let mesh = self.mesh.borrow().clone();
        let inject = self.inject.clone();
        let pods: Vec<(ObjectKey, Arc<PodOf>)> =
            pods.iter().map(|(k, p)| (k.clone(), p.clone())).collect();
        let evaluated = {
            let mesh = mesh.clone();
            tokio::task::spawn_blocking(move || {
                tally(&mesh, &inject, pods.iter().map(|(k, p)| (k, &**p)))
            })
            .await
        };
        let tallies = match evaluated {
            Ok(t) => t,
            Err(e) => {
                tracing::error!("admission report: the evaluation failed: {e}");
                return false;
            }
        };
        exported.set(&tallies);
        written.retain(|key, _| tallies.contains_key(key));
        let now = crate::xds::serve::status::now_rfc3339();
        let mut ok = true;
        for (key, tally) in &tallies {
            let unstamped = tally.report(String::new());
            if written.get(key) == Some(&unstamped) {
                continue;
            }
            match self.write(key, &tally.report(now.clone())).await {
                Ok(()) => {
                    tracing::debug!(policy = %key, pods = tally.pods, violating = tally.violating, "admission report written");
                    written.insert(key.clone(), unstamped);
                }
                Err(e) => {
                    ok = false;
                    tracing::warn!(
                        policy = %key,
                        "cannot write the admission report: {} (retrying)",
                        Escaped(&e.to_string())
                    );
                }
            }
        }
        ok
    }

    async fn write(&self, key: &ObjectKey, report: &PolicyReport) -> Result<(), kube::Error> {
        let patch = Patch::Merge(json!({ "status": { "report": report } }));
        match Api::<crd::WorkloadPolicy>::namespaced(self.client.clone(), &key.namespace)
            .patch_status(&key.name, &self.params, &patch)
            .await
        {
            // Deleted meanwhile: nothing to report.
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            other => other.map(drop),
        }
    }
}

async fn sleep_until(due: Option<Instant>) {
    if let Some(due) = due {
        tokio::time::sleep_until(due).await;
    }
}

/// The label sets this replica exports, so that those of a policy, mode or rule that
/// went can be removed.
#[derive(Debug, Default)]
struct Exported {
    pods: BTreeSet<PolicyLabel>,
    violating: BTreeSet<PolicyModeLabel>,
    rules: BTreeSet<PolicyRuleLabel>,
}

impl Exported {
    fn set(&mut self, tallies: &BTreeMap<ObjectKey, Tally>) {
        let m = metrics();
        let mut now = Exported::default();
        for (key, t) in tallies {
            let policy = key.to_string();
            let mode = t.mode.name();
            let label = PolicyLabel {
                policy: policy.clone(),
            };
            m.workload_policy_pods
                .get_or_create(&label)
                .set(t.pods as i64);
            now.pods.insert(label);
            let label = PolicyModeLabel {
                policy: policy.clone(),
                mode,
            };
            m.workload_policy_violating_pods
                .get_or_create(&label)
                .set(t.violating as i64);
            now.violating.insert(label);
            for (rule, pods) in &t.rules {
                let label = PolicyRuleLabel {
                    policy: policy.clone(),
                    mode,
                    rule,
                };
                m.workload_policy_rule_violating_pods
                    .get_or_create(&label)
                    .set(*pods as i64);
                now.rules.insert(label);
            }
        }
        for gone in self.pods.difference(&now.pods) {
            m.workload_policy_pods.remove(gone);
        }
        for gone in self.violating.difference(&now.violating) {
            m.workload_policy_violating_pods.remove(gone);
        }
        for gone in self.rules.difference(&now.rules) {
            m.workload_policy_rule_violating_pods.remove(gone);
        }
        *self = now;
    }
}

/// Only the Lease holder reports: a replica that lost it says nothing.
fn clear_metrics() {
    let m = metrics();
    m.workload_policy_pods.clear();
    m.workload_policy_violating_pods.clear();
    m.workload_policy_rule_violating_pods.clear();
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::json;

    use super::*;
    use crate::model::workload_policy::{Profile, Rules, WorkloadPolicy};
    use crate::model::{MeshDefaults, MeshSnapshot};

    fn mesh(policies: Vec<WorkloadPolicy>) -> MeshSnapshot {
        let mut mesh = MeshSnapshot {
            defaults: MeshDefaults {
                root_namespace: "meshd-system".into(),
                ..MeshDefaults::default()
            },
            ..MeshSnapshot::default()
        };
        for p in policies {
            mesh.workload_policies.insert(p.key.clone(), Arc::new(p));
        }
        mesh
    }

    fn policy(ns: &str, name: &str, profile: Option<Profile>, rules: Rules) -> WorkloadPolicy {
        WorkloadPolicy {
            key: ObjectKey::new(ns, name),
            mode: Mode::Audit,
            profile,
            namespace_selector: None,
            selector: None,
            rules,
            exemptions: Vec::new(),
        }
    }

    fn pod(ns: &str, name: &str, spec: serde_json::Value) -> (ObjectKey, PodOf) {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"namespace": ns, "name": name, "managedFields": [{"manager": "kubectl"}]},
            "spec": spec,
        }))
        .unwrap();
        running(pod).unwrap()
    }

    /// A pod with `n` containers, each breaking `forbidLatestTag`.
    fn latest(ns: &str, name: &str, n: usize) -> (ObjectKey, PodOf) {
        let containers: Vec<_> = (0..n)
            .map(|i| json!({"name": format!("c{i}"), "image": "nginx:latest"}))
            .collect();
        pod(ns, name, json!({"containers": containers}))
    }

    fn run(mesh: &MeshSnapshot, pods: &[(ObjectKey, PodOf)]) -> BTreeMap<ObjectKey, Tally> {
        let mut sorted: Vec<_> = pods.iter().map(|(k, p)| (k, p)).collect();
        sorted.sort_by(|a, b| a.0.cmp(b.0));
        tally(mesh, &InjectConfig::default(), sorted)
    }

    #[test]
    fn counts_pods_rules_and_offenders_per_policy() {
        let mesh = mesh(vec![
            policy(
                "meshd-system",
                "restricted",
                Some(Profile::Restricted),
                Rules::default(),
            ),
            policy(
                "shop",
                "latest",
                None,
                Rules {
                    forbid_latest_tag: true,
                    ..Rules::default()
                },
            ),
            policy(
                "empty",
                "nothing-here",
                Some(Profile::Baseline),
                Rules::default(),
            ),
        ]);
        let good = json!({
            "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "app", "image": "shop/web:1", "securityContext": {
                "allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}}],
        });
        let pods = vec![
            pod("shop", "good", good),
            latest("shop", "b-latest", 1),
            latest("shop", "a-latest", 2),
            latest("other", "latest", 1),
        ];
        let tallies = run(&mesh, &pods);

        let latest_policy = &tallies[&ObjectKey::new("shop", "latest")];
        assert_eq!((latest_policy.pods, latest_policy.violating), (3, 2));
        assert_eq!(
            latest_policy.rules,
            BTreeMap::from([("forbidLatestTag", 2)])
        );
        let offenders: Vec<&str> = latest_policy
            .offenders
            .iter()
            .map(|o| o.pod.as_str())
            .collect();
        assert_eq!(offenders, ["shop/a-latest", "shop/b-latest"], "by name");
        assert_eq!(
            latest_policy.offenders[0].violations.len(),
            2,
            "every violation of the pod: {:?}",
            latest_policy.offenders[0]
        );
        assert!(
            latest_policy.offenders[0].violations[0].starts_with("container \"c0\": image ")
                && latest_policy.offenders[0].violations[0].ends_with("[forbidLatestTag]"),
            "{:?}",
            latest_policy.offenders[0]
        );

        let restricted = &tallies[&ObjectKey::new("meshd-system", "restricted")];
        assert_eq!((restricted.pods, restricted.violating), (4, 3));
        let report = restricted.report("t".into());
        assert_eq!(report.violating_pods, 3);
        assert!(
            report
                .rules
                .iter()
                .all(|r| r.pods == 3 && report.rules.first().unwrap().rule <= r.rule),
            "every latest pod breaks the same controls, listed by name: {:?}",
            report.rules
        );
        assert!(report.rules.iter().any(|r| r.rule == "runAsNonRoot"));

        let empty = &tallies[&ObjectKey::new("empty", "nothing-here")];
        assert_eq!((empty.pods, empty.violating), (0, 0));
        assert!(empty.offenders.is_empty() && empty.rules.is_empty());
    }

    #[test]
    fn offenders_and_their_violations_are_bounded() {
        let mesh = mesh(vec![policy(
            "shop",
            "latest",
            None,
            Rules {
                forbid_latest_tag: true,
                ..Rules::default()
            },
        )]);
        let pods: Vec<_> = (0..30)
            .map(|i| latest("shop", &format!("p{i:02}"), 8))
            .collect();
        let t = &run(&mesh, &pods)[&ObjectKey::new("shop", "latest")];
        assert_eq!((t.pods, t.violating), (30, 30));
        assert_eq!(t.rules["forbidLatestTag"], 30);
        assert_eq!(t.offenders.len(), MAX_OFFENDERS);
        assert_eq!(t.offenders[0].pod, "shop/p00");
        assert_eq!(t.offenders[9].pod, "shop/p09");
        for o in &t.offenders {
            assert_eq!(o.violations.len(), MAX_VIOLATIONS + 1, "{o:?}");
            assert_eq!(o.violations[MAX_VIOLATIONS], "and 3 more");
        }
    }

    #[test]
    fn long_messages_are_cut_and_finished_pods_do_not_count() {
        let long = format!("registry.example.com/{}:latest", "x".repeat(1000));
        let message = cut(format!("image {long:?} is bad"));
        assert_eq!(message.chars().count(), MAX_MESSAGE + 1);
        assert!(message.ends_with('…'));
        assert_eq!(cut("short".into()), "short");

        let done: Pod = serde_json::from_value(json!({
            "metadata": {"namespace": "shop", "name": "job-1"},
            "spec": {"containers": [{"name": "c", "image": "x"}]},
            "status": {"phase": "Succeeded"},
        }))
        .unwrap();
        assert!(running(done).is_none());
        let (_, kept) = latest("shop", "p", 1);
        assert!(kept.meta.managed_fields.is_none(), "managedFields dropped");
    }

    #[test]
    fn rules_are_listed_most_broken_first() {
        let t = Tally {
            mode: Mode::Warn,
            pods: 5,
            violating: 4,
            rules: BTreeMap::from([("a", 1), ("b", 4), ("c", 4)]),
            offenders: Vec::new(),
        };
        let rules: Vec<(String, u64)> = t
            .report("now".into())
            .rules
            .into_iter()
            .map(|r| (r.rule, r.pods))
            .collect();
        assert_eq!(rules, [("b".into(), 4), ("c".into(), 4), ("a".into(), 1)]);
    }
}
