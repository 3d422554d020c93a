//! One pod against every `WorkloadPolicy` that applies to it: the one evaluator behind
//! the validating webhook, `meshctl admission check` and the background report.
//!
//! A policy applies to a pod of namespace `ns` if it lives in `ns`, or in the root
//! namespace and its `namespaceSelector` (if any) matches `ns`'s labels; and its
//! `selector` (if any) matches the pod's labels. Its exemptions drop the violations of
//! the containers they name (by name or image pattern), or the whole pod (by
//! ServiceAccount). Every violation of every policy is kept; the strongest mode among
//! the policies with violations decides: Enforce denies, Warn admits with warnings,
//! Audit admits and counts.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::PodSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::image::{ImageRef, matches_pattern};
use super::pss::{self, Violation};
use super::rules::{self, MeshFacts};
use crate::model::ObjectKey;
use crate::model::workload_policy::{ExemptionTarget, Mode, Profile, WorkloadPolicy};

/// What one policy found.
#[derive(Debug, Clone)]
pub struct PolicyFindings {
    pub policy: ObjectKey,
    pub mode: Mode,
    pub violations: Vec<Violation>,
}

/// The pod's verdict: the findings of every policy it breaks.
#[derive(Debug, Clone, Default)]
pub struct Verdict {
    pub findings: Vec<PolicyFindings>,
}

impl Verdict {
    /// The strongest mode among the broken policies; `None`: nothing broken.
    pub fn mode(&self) -> Option<Mode> {
        self.findings.iter().map(|f| f.mode).max()
    }

    /// One line per broken policy, every violation in it with its rule:
    /// `denied by meshd-system/restricted (Enforce): container "app":
    /// securityContext.runAsNonRoot must be true [runAsNonRoot]; …`.
    pub fn messages(&self) -> Vec<String> {
        self.findings
            .iter()
            .map(|f| {
                let verb = match f.mode {
                    Mode::Enforce => "denied",
                    Mode::Warn => "warning",
                    Mode::Audit => "audit",
                };
                let all: Vec<String> = f
                    .violations
                    .iter()
                    .map(|v| format!("{v} [{}]", v.control))
                    .collect();
                format!(
                    "{verb} by {}/{} ({}): {}",
                    f.policy.namespace,
                    f.policy.name,
                    f.mode.name(),
                    all.join("; ")
                )
            })
            .collect()
    }
}

/// What the evaluator needs to know of the pod's namespace.
#[derive(Debug, Clone, Copy)]
pub struct NamespaceFacts<'a> {
    pub name: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    pub root: &'a str,
    pub mesh: MeshFacts,
}

/// The pod `meta` + `spec` of namespace `ns` against `policies`. The containers named
/// in `meshd_containers` (meshd's own, [`super::injected::recognise`]) are exempt
/// from every policy.
pub fn evaluate<'p>(
    policies: impl IntoIterator<Item = &'p WorkloadPolicy>,
    ns: NamespaceFacts<'_>,
    meta: &ObjectMeta,
    spec: &PodSpec,
    meshd_containers: &[String],
) -> Verdict {
    let labels = meta.labels.clone().unwrap_or_default();
    let service_account = spec
        .service_account_name
        .as_deref()
        .filter(|s| !s.is_empty())
        .unwrap_or("default");
    let mut findings = Vec::new();
    for policy in policies {
        if !applies(policy, ns, &labels) {
            continue;
        }
        if policy.exemptions.iter().any(
            |e| matches!(&e.target, ExemptionTarget::ServiceAccount(sa) if sa == service_account),
        ) {
            continue;
        }
        let mut violations = match policy.profile {
            Some(Profile::Baseline) => pss::check(pss::Level::Baseline, meta, spec),
            Some(Profile::Restricted) => pss::check(pss::Level::Restricted, meta, spec),
            None => Vec::new(),
        };
        violations.extend(rules::check(&policy.rules, meta, spec, ns.mesh));
        // meshd's own containers first: that test is cheap, and in an injected pod
        // `meshd-init` breaks every profile.
        violations.retain(|v| {
            v.container
                .as_ref()
                .is_none_or(|c| !meshd_containers.contains(c))
                && !exempt(policy, v, spec)
        });
        if !violations.is_empty() {
            findings.push(PolicyFindings {
                policy: policy.key.clone(),
                mode: policy.mode,
                violations,
            });
        }
    }
    Verdict { findings }
}

pub(crate) fn applies(
    policy: &WorkloadPolicy,
    ns: NamespaceFacts<'_>,
    pod_labels: &BTreeMap<String, String>,
) -> bool {
    let selected = |selector: &Option<BTreeMap<String, String>>,
                    labels: &BTreeMap<String, String>| {
        selector
            .as_ref()
            .is_none_or(|s| s.iter().all(|(k, v)| labels.get(k) == Some(v)))
    };
    let namespace_ok = if policy.key.namespace == ns.name {
        true
    } else {
        policy.key.namespace == ns.root && selected(&policy.namespace_selector, ns.labels)
    };
    namespace_ok && selected(&policy.selector, pod_labels)
}

/// Whether an exemption of `policy` covers `v` (a container's violation).
fn exempt(policy: &WorkloadPolicy, v: &Violation, spec: &PodSpec) -> bool {
    let Some(container) = v.container.as_deref() else {
        return false;
    };
    if policy.exemptions.is_empty() {
        return false;
    }
    let image = rules::containers(spec)
        .into_iter()
        .find(|c| c.name == container)
        .and_then(|c| c.image.and_then(ImageRef::parse));
    policy.exemptions.iter().any(|e| match &e.target {
        ExemptionTarget::Container(name) => name == container,
        ExemptionTarget::Image(pattern) => image
            .as_ref()
            .is_some_and(|i| matches_pattern(pattern, &i.to_string())),
        ExemptionTarget::ServiceAccount(_) => false,
    })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Pod;
    use serde_json::json;

    use super::*;
    use crate::model::workload_policy::{Exemption, Rules};

    fn policy(
        ns: &str,
        name: &str,
        mode: Mode,
        profile: Option<Profile>,
        rules: Rules,
    ) -> WorkloadPolicy {
        WorkloadPolicy {
            key: ObjectKey::new(ns, name),
            mode,
            profile,
            namespace_selector: None,
            selector: None,
            rules,
            exemptions: Vec::new(),
        }
    }

    fn root_pod() -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "labels": {"app": "web"}},
            "spec": {"serviceAccountName": "web", "containers": [{"name": "app", "image": "nginx:latest"}]},
        }))
        .unwrap()
    }

    fn run(
        policies: &[WorkloadPolicy],
        ns_labels: &BTreeMap<String, String>,
        pod: &Pod,
    ) -> Verdict {
        let ns = NamespaceFacts {
            name: "shop",
            labels: ns_labels,
            root: "meshd-system",
            mesh: MeshFacts {
                namespace_strict: true,
                ..MeshFacts::default()
            },
        };
        evaluate(policies, ns, &pod.metadata, pod.spec.as_ref().unwrap(), &[])
    }

    #[test]
    fn every_policy_reports_and_the_strongest_mode_decides() {
        let restricted = policy(
            "meshd-system",
            "restricted",
            Mode::Enforce,
            Some(Profile::Restricted),
            Rules::default(),
        );
        let registries = policy(
            "shop",
            "registries",
            Mode::Warn,
            None,
            Rules {
                allowed_registries: vec!["registry.example.com/".into()],
                ..Rules::default()
            },
        );
        let elsewhere = policy(
            "other",
            "x",
            Mode::Enforce,
            Some(Profile::Baseline),
            Rules::default(),
        );
        let verdict = run(
            &[restricted, registries, elsewhere],
            &BTreeMap::new(),
            &root_pod(),
        );
        assert_eq!(verdict.mode(), Some(Mode::Enforce));
        let messages = verdict.messages();
        assert_eq!(messages.len(), 2, "{messages:#?}");
        assert!(
            messages[0]
                .starts_with("denied by meshd-system/restricted (Enforce): container \"app\": "),
            "{messages:#?}"
        );
        assert!(
            messages[0].contains("runAsNonRoot must be true"),
            "{messages:#?}"
        );
        assert_eq!(
            messages[1],
            r#"warning by shop/registries (Warn): container "app": image "nginx:latest": registry docker.io is not allowed (docker.io/library/nginx:latest is under none of registry.example.com/) [allowedRegistries]"#
        );
    }

    #[test]
    fn selectors_and_exemptions_narrow_a_policy() {
        let mut p = policy(
            "meshd-system",
            "latest",
            Mode::Enforce,
            None,
            Rules {
                forbid_latest_tag: true,
                ..Rules::default()
            },
        );
        let pod = root_pod();
        assert_eq!(
            run(std::slice::from_ref(&p), &BTreeMap::new(), &pod).mode(),
            Some(Mode::Enforce)
        );

        p.namespace_selector = Some([("tier".to_string(), "prod".to_string())].into());
        assert_eq!(
            run(std::slice::from_ref(&p), &BTreeMap::new(), &pod).mode(),
            None,
            "not a prod namespace"
        );
        let prod: BTreeMap<_, _> = [("tier".to_string(), "prod".to_string())].into();
        assert_eq!(
            run(std::slice::from_ref(&p), &prod, &pod).mode(),
            Some(Mode::Enforce)
        );

        p.selector = Some([("app".to_string(), "db".to_string())].into());
        assert_eq!(
            run(std::slice::from_ref(&p), &prod, &pod).mode(),
            None,
            "not a db pod"
        );
        p.selector = None;

        for target in [
            ExemptionTarget::Container("app".into()),
            ExemptionTarget::Image("docker.io/library/nginx:*".into()),
            ExemptionTarget::ServiceAccount("web".into()),
        ] {
            let mut exempted = p.clone();
            exempted.exemptions = vec![Exemption {
                target: target.clone(),
                reason: "test".into(),
            }];
            assert_eq!(run(&[exempted], &prod, &pod).mode(), None, "{target:?}");
        }
        let mut other = p.clone();
        other.exemptions = vec![Exemption {
            target: ExemptionTarget::Container("sidecar".into()),
            reason: "x".into(),
        }];
        assert_eq!(
            run(&[other], &prod, &pod).mode(),
            Some(Mode::Enforce),
            "another container's exemption"
        );
    }
}
