//! Admission of what runs in the mesh: the one evaluator behind the validating webhook
//! (`/validate`, [`crate::webhook`]), `meshctl admission check` and the Lease
//! holder's report.
//!
//! [`workload`] finds the pod of an object (a Pod, or the pod template of a
//! Deployment, StatefulSet, DaemonSet, ReplicaSet, Job or CronJob); [`pss`] decides
//! the Kubernetes Pod Security Standards for it, [`rules`] the `WorkloadPolicy` rules
//! beyond them, on image references read as the runtime reads them ([`image`]);
//! [`injected`] recognises meshd's own injected containers exactly, which are exempt;
//! [`evaluate`] puts the pod against every policy that applies to it and says which
//! mode decides. [`check`] ties them to the mesh snapshot: its policies, its
//! namespaces' labels, their mTLS mode. [`manifests`] builds such a snapshot from
//! files, for `meshctl admission check`.

pub mod evaluate;
pub mod image;
pub mod injected;
pub mod manifests;
pub mod pss;
pub mod rules;
pub mod workload;

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use self::evaluate::NamespaceFacts;
pub use self::evaluate::{PolicyFindings, Verdict};
use self::rules::MeshFacts;
use self::workload::PodOf;
use crate::inject::{INJECT_LABEL, InjectConfig};
use crate::model::workload_policy::WorkloadPolicy;
use crate::model::{MeshSnapshot, MtlsMode};

/// The pod `pod` of namespace `namespace` against every `WorkloadPolicy` of `mesh`;
/// `inject` is the injection template meshd's own containers are recognised by. Field
/// paths in the verdict are the object's (`spec.template.spec.containers[0]...` for a
/// Deployment).
pub fn check(mesh: &MeshSnapshot, inject: &InjectConfig, namespace: &str, pod: &PodOf) -> Verdict {
    let empty = BTreeMap::new();
    let facts = namespace_facts(mesh, namespace, pod.is_template(), &empty);
    // A template is usually injected later, in its pods; one `meshctl inject` wrote
    // carries meshd's containers and annotation already, and is recognised the same.
    let meshd_containers = injected::recognise(&pod.meta, &pod.spec, inject);
    let mut verdict = evaluate::evaluate(
        mesh.workload_policies.values().map(|p| &**p),
        facts,
        &pod.meta,
        &pod.spec,
        &meshd_containers,
    );
    if !pod.prefix.is_empty() {
        for v in verdict.findings.iter_mut().flat_map(|f| &mut f.violations) {
            v.field.insert_str(0, pod.prefix);
        }
    }
    verdict
}

/// The policies of `mesh` that apply to a pod with `meta` in `namespace` (by
/// namespace and selector; exemptions aside), as [`check`] chooses them: what the
/// report counts a policy's pods by.
pub fn applying<'m>(
    mesh: &'m MeshSnapshot,
    namespace: &str,
    meta: &ObjectMeta,
) -> Vec<&'m WorkloadPolicy> {
    let empty = BTreeMap::new();
    let facts = namespace_facts(mesh, namespace, false, &empty);
    let labels = meta.labels.as_ref().unwrap_or(&empty);
    mesh.workload_policies
        .values()
        .map(|p| &**p)
        .filter(|p| evaluate::applies(p, facts, labels))
        .collect()
}

fn namespace_facts<'a>(
    mesh: &'a MeshSnapshot,
    namespace: &'a str,
    template: bool,
    empty: &'a BTreeMap<String, String>,
) -> NamespaceFacts<'a> {
    let labels = mesh.namespaces.get(namespace).map_or(empty, |n| &n.labels);
    NamespaceFacts {
        name: namespace,
        labels,
        root: &mesh.defaults.root_namespace,
        mesh: MeshFacts {
            namespace_strict: mesh.namespace_mtls(namespace) == MtlsMode::Strict,
            namespace_injected: labels.get(INJECT_LABEL).map(String::as_str) == Some("enabled"),
            template,
        },
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;

    use super::*;
    use crate::model::workload_policy::{Mode, Profile, Rules};
    use crate::model::{MeshDefaults, MeshObject, ObjectKey};

    fn restricted_mesh() -> MeshSnapshot {
        let policy = WorkloadPolicy {
            key: ObjectKey::new("meshd-system", "restricted"),
            mode: Mode::Enforce,
            profile: Some(Profile::Restricted),
            namespace_selector: None,
            selector: None,
            rules: Rules {
                require_mesh: true,
                ..Rules::default()
            },
            exemptions: Vec::new(),
        };
        MeshSnapshot::build(
            1,
            MeshDefaults::default(),
            [MeshObject::WorkloadPolicy(Arc::new(policy))],
        )
    }

    /// `meshctl inject -f deploy.yaml | kubectl apply -f -`: the Deployment arrives with
    /// meshd's containers in its template, and they pass as they do in a pod.
    #[test]
    fn a_template_injected_by_meshctl_passes_as_its_pods_do() {
        let config = InjectConfig::default();
        let deployment = json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"selector": {"matchLabels": {"app": "web"}}, "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "app", "image": "web:1", "securityContext": {
                    "runAsNonRoot": true, "allowPrivilegeEscalation": false,
                    "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}}]}}}});
        let yaml = serde_saphyr::to_string(&deployment).unwrap();
        let (injected, _) = crate::inject::manifests::inject_yaml(&yaml, &config).unwrap();
        let injected: serde_json::Value = serde_saphyr::from_str(&injected).unwrap();
        let mesh = restricted_mesh();
        let verdict = |object: &serde_json::Value| {
            let pod = workload::pod_of("apps/v1", "Deployment", object)
                .unwrap()
                .unwrap();
            check(&mesh, &config, "shop", &pod).messages()
        };
        assert_eq!(verdict(&injected), Vec::<String>::new());
        // As written, the template is unmeshed in a STRICT namespace the injector does
        // not take.
        let messages = verdict(&deployment);
        assert!(messages[0].contains("[requireMesh]"), "{messages:?}");
        // Another proxy image setting: meshd-init is no longer meshd's.
        let other = InjectConfig::parse("proxyImage: other/meshd-proxy:1\n").unwrap();
        let pod = workload::pod_of("apps/v1", "Deployment", &injected)
            .unwrap()
            .unwrap();
        let messages = check(&mesh, &other, "shop", &pod).messages();
        assert!(
            messages[0].contains("container \"meshd-init\""),
            "{messages:?}"
        );
    }
}
