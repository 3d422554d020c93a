//! `WorkloadPolicy`: what may run in the mesh. Checked here into
//! [`crate::model::workload_policy::WorkloadPolicy`], every error naming its field.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{PolicyCondition, WorkloadSelector};
use crate::model::workload_policy::{
    self as model, Exemption, ExemptionTarget, Mode, Profile, Rules,
};
use crate::sources::convert::{FieldError, object_key};

/// WorkloadPolicy: what the pods it selects may run. `Enforce` denies a pod (or a
/// workload whose pod template) that breaks it, `Warn` admits it with a warning,
/// `Audit` admits and counts it. In the root namespace it applies to every namespace
/// (or those `namespaceSelector` selects), elsewhere to its own.
#[derive(CustomResource, Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "security.meshd.io",
    version = "v1alpha1",
    kind = "WorkloadPolicy",
    namespaced,
    shortname = "wp",
    status = "WorkloadPolicyStatus",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#,
    printcolumn = r#"{"name":"Profile","type":"string","jsonPath":".spec.profile"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadPolicySpec {
    /// Enforce (deny), Warn (admit with a warning) or Audit (admit, record and count).
    pub mode: String,
    /// A Pod Security Standards level: baseline or restricted (Kubernetes v1.33).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// Root namespace only: the namespaces it applies to (default: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<WorkloadSelector>,
    /// The pods it applies to (default: all of its namespaces).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<RulesSpec>,
    #[serde(default)]
    pub exemptions: Vec<ExemptionSpec>,
}

/// What meshd made of the policy (`Accepted`) and what it finds among the running
/// pods (`report`), both written by the replica that holds the Lease.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadPolicyStatus {
    #[serde(default)]
    pub conditions: Vec<PolicyCondition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<PolicyReport>,
}

/// The running pods against the policy: counts, and the first few offenders. Bounded:
/// it does not grow with the cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyReport {
    /// RFC 3339: when the pods were last evaluated.
    pub evaluated_at: String,
    /// Running pods the policy applies to.
    pub pods: u64,
    /// Of those, the pods that break it.
    pub violating_pods: u64,
    /// Per rule broken (a Pod Security Standards control id or a rule name): the pods
    /// that break it, most first. A list, not a map, so that a merge patch of the
    /// report replaces it whole and a rule no pod breaks any more leaves it.
    #[serde(default)]
    pub rules: Vec<RuleCount>,
    /// The first offenders by namespace and name (at most 10).
    #[serde(default)]
    pub offenders: Vec<PolicyOffender>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RuleCount {
    pub rule: String,
    pub pods: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyOffender {
    /// `namespace/name`
    pub pod: String,
    /// The pod's violations of this policy (at most 5, then how many more).
    pub violations: Vec<String>,
}

/// Rules beyond the Pod Security Standards.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RulesSpec {
    /// Every container's root filesystem is read-only.
    #[serde(default)]
    pub read_only_root_filesystem: bool,
    /// Images only from these prefixes of the normalised reference (`nginx` is
    /// `docker.io/library/nginx`), e.g. `registry.example.com/`, `docker.io/library/`.
    #[serde(default)]
    pub allowed_registries: Vec<String>,
    /// Images pinned by digest (`@sha256:...`).
    #[serde(default)]
    pub require_image_digest: bool,
    /// No `:latest` tag, and no image without a tag or digest (which means latest).
    #[serde(default)]
    pub forbid_latest_tag: bool,
    /// Every container sets resources.limits.cpu and resources.limits.memory.
    #[serde(default)]
    pub require_resource_limits: bool,
    /// No pod runs as the namespace's `default` ServiceAccount: identity-based policy
    /// needs identities of their own.
    #[serde(default)]
    pub forbid_default_service_account: bool,
    /// In a namespace whose mTLS is STRICT, a pod may not opt out of injection nor use
    /// the host's network (which cannot be meshed).
    #[serde(default)]
    pub require_mesh: bool,
}

/// One exemption: exactly one of container, image, serviceAccount, and the reason.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExemptionSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// A pattern on the normalised image reference; `*` matches any run of characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    /// Why: shown in reports, required.
    pub reason: String,
}

pub fn workload_policy(r: &WorkloadPolicy) -> Result<model::WorkloadPolicy, FieldError> {
    let key = object_key(&r.metadata)?;
    let spec = &r.spec;
    let mode = match spec.mode.as_str() {
        "Enforce" => Mode::Enforce,
        "Warn" => Mode::Warn,
        "Audit" => Mode::Audit,
        other => {
            return Err(FieldError::new(
                "spec.mode",
                format!("{other:?} is not a mode: use Enforce, Warn or Audit"),
            ));
        }
    };
    let profile = match spec.profile.as_deref() {
        None => None,
        Some("baseline") => Some(Profile::Baseline),
        Some("restricted") => Some(Profile::Restricted),
        Some(other) => {
            return Err(FieldError::new(
                "spec.profile",
                format!("{other:?} is not a profile: use baseline or restricted"),
            ));
        }
    };
    let labels = |s: &Option<WorkloadSelector>| {
        s.as_ref()
            .map(|s| s.match_labels.clone())
            .filter(|l| !l.is_empty())
    };
    let r_spec = spec.rules.clone().unwrap_or_default();
    for (i, registry) in r_spec.allowed_registries.iter().enumerate() {
        if registry.trim().is_empty() || registry.chars().any(char::is_whitespace) {
            return Err(FieldError::new(
                format!("spec.rules.allowedRegistries[{i}]"),
                format!("{registry:?} is not a registry prefix (e.g. registry.example.com/)"),
            ));
        }
    }
    let rules = Rules {
        read_only_root_filesystem: r_spec.read_only_root_filesystem,
        allowed_registries: r_spec.allowed_registries.clone(),
        require_image_digest: r_spec.require_image_digest,
        forbid_latest_tag: r_spec.forbid_latest_tag,
        require_resource_limits: r_spec.require_resource_limits,
        forbid_default_service_account: r_spec.forbid_default_service_account,
        require_mesh: r_spec.require_mesh,
    };
    if profile.is_none() && rules == Rules::default() {
        return Err(FieldError::new(
            "spec",
            "the policy requires nothing: set a profile or at least one rule",
        ));
    }
    let mut exemptions = Vec::new();
    for (i, e) in spec.exemptions.iter().enumerate() {
        let at = format!("spec.exemptions[{i}]");
        let target = match (&e.container, &e.image, &e.service_account) {
            (Some(c), None, None) if !c.is_empty() => ExemptionTarget::Container(c.clone()),
            (None, Some(p), None) if !p.is_empty() => ExemptionTarget::Image(p.clone()),
            (None, None, Some(sa)) if !sa.is_empty() => ExemptionTarget::ServiceAccount(sa.clone()),
            _ => {
                return Err(FieldError::new(
                    at,
                    "name exactly one of container, image or serviceAccount (not empty)",
                ));
            }
        };
        if e.reason.trim().is_empty() {
            return Err(FieldError::new(
                format!("{at}.reason"),
                "an exemption needs its reason",
            ));
        }
        exemptions.push(Exemption {
            target,
            reason: e.reason.clone(),
        });
    }
    Ok(model::WorkloadPolicy {
        key,
        mode,
        profile,
        namespace_selector: labels(&spec.namespace_selector),
        selector: labels(&spec.selector),
        rules,
        exemptions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<model::WorkloadPolicy, FieldError> {
        let text = format!(
            "apiVersion: security.meshd.io/v1alpha1\nkind: WorkloadPolicy\nmetadata: {{name: p, namespace: meshd-system}}\n{yaml}"
        );
        let r: WorkloadPolicy =
            serde_saphyr::from_str(&text).map_err(|e| FieldError::new("yaml", e.to_string()))?;
        workload_policy(&r)
    }

    #[test]
    fn a_policy_reads_as_written() {
        let p = parse(
            "spec:\n  mode: Enforce\n  profile: restricted\n  selector: {matchLabels: {app: web}}\n  rules: {allowedRegistries: [registry.example.com/], forbidLatestTag: true}\n  exemptions:\n    - {container: debug, reason: break glass}\n    - {image: 'registry.example.com/ops/*', reason: ops tools}\n",
        )
        .unwrap();
        assert_eq!(p.mode, Mode::Enforce);
        assert_eq!(p.profile, Some(Profile::Restricted));
        assert_eq!(p.rules.allowed_registries, ["registry.example.com/"]);
        assert!(p.rules.forbid_latest_tag && !p.rules.require_mesh);
        assert_eq!(
            p.exemptions[1].target,
            ExemptionTarget::Image("registry.example.com/ops/*".into())
        );
    }

    #[test]
    fn invalid_policies_name_the_field() {
        for (yaml, field) in [
            ("spec: {mode: Deny, profile: baseline}", "spec.mode"),
            ("spec: {mode: Enforce, profile: strict}", "spec.profile"),
            ("spec: {mode: Enforce}", "spec"),
            (
                "spec: {mode: Warn, rules: {allowedRegistries: ['']}}",
                "spec.rules.allowedRegistries[0]",
            ),
            (
                "spec: {mode: Audit, profile: baseline, exemptions: [{container: a, image: b, reason: x}]}",
                "spec.exemptions[0]",
            ),
            (
                "spec: {mode: Audit, profile: baseline, exemptions: [{container: a, reason: ' '}]}",
                "spec.exemptions[0].reason",
            ),
        ] {
            let err = parse(yaml).unwrap_err();
            assert_eq!(err.field, field, "{yaml}: {err}");
        }
        // Unknown fields are refused by the type itself.
        assert!(
            parse("spec: {mode: Enforce, profile: baseline, rules: {readOnlyRootFs: true}}")
                .is_err()
        );
    }
}
