//! The rules of a `WorkloadPolicy` beyond the Pod Security Standards
//! ([`crate::model::workload_policy::Rules`]), for every container of a pod: regular,
//! init and ephemeral. Violations have the standards' shape ([`Violation`]), so one
//! message and one report carry both.

use k8s_openapi::api::core::v1::{PodSpec, ResourceRequirements, SecurityContext};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::image::ImageRef;
use super::pss::Violation;
use crate::model::workload_policy::Rules;

/// What a rule needs of one container, whichever list it is in.
pub struct ContainerView<'a> {
    /// `spec.containers[0]`.
    pub field: String,
    pub name: &'a str,
    pub image: Option<&'a str>,
    pub security_context: Option<&'a SecurityContext>,
    /// `None` for ephemeral containers, which may not set resources.
    pub resources: Option<Option<&'a ResourceRequirements>>,
}

/// Every container of `spec`, init containers first, then the app's, then ephemeral.
pub fn containers(spec: &PodSpec) -> Vec<ContainerView<'_>> {
    let mut out = Vec::new();
    for (list, containers) in [
        (
            "initContainers",
            spec.init_containers.as_deref().unwrap_or_default(),
        ),
        ("containers", &spec.containers[..]),
    ] {
        for (i, c) in containers.iter().enumerate() {
            out.push(ContainerView {
                field: format!("spec.{list}[{i}]"),
                name: &c.name,
                image: c.image.as_deref(),
                security_context: c.security_context.as_ref(),
                resources: Some(c.resources.as_ref()),
            });
        }
    }
    for (i, c) in spec.ephemeral_containers.iter().flatten().enumerate() {
        out.push(ContainerView {
            field: format!("spec.ephemeralContainers[{i}]"),
            name: &c.name,
            image: c.image.as_deref(),
            security_context: c.security_context.as_ref(),
            resources: None,
        });
    }
    out
}

/// What `requireMesh` needs to know of the pod's place in the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MeshFacts {
    /// The namespace's mTLS is STRICT.
    pub namespace_strict: bool,
    /// The namespace is labelled `meshd.io/inject=enabled`.
    pub namespace_injected: bool,
    /// The pod is a workload's template: its pods are injected when they are created,
    /// so it must be one the injector will take, not one that has the sidecar.
    pub template: bool,
}

/// Whether the pod will run without meshd's sidecar: a pod without it, or a template
/// without it (`meshctl inject` adds it) that the injector will not take either
/// (neither its namespace nor its label opts it in).
fn facts_say_unmeshed(meta: &ObjectMeta, spec: &PodSpec, mesh: MeshFacts) -> bool {
    let has_sidecar = spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .any(|c| c.name == crate::inject::template::SIDECAR);
    if has_sidecar {
        return false;
    }
    if mesh.template {
        let label = meta
            .labels
            .as_ref()
            .and_then(|l| l.get(crate::inject::INJECT_LABEL))
            .map(String::as_str);
        return !(mesh.namespace_injected || label == Some("true"));
    }
    true
}

/// Every violation of `rules` by the pod `meta` + `spec`.
pub fn check(rules: &Rules, meta: &ObjectMeta, spec: &PodSpec, mesh: MeshFacts) -> Vec<Violation> {
    let mut out = Vec::new();
    let pod = |control, field: &str, message: String| Violation {
        control,
        container: None,
        field: field.to_string(),
        message,
    };
    if rules.forbid_default_service_account
        && spec
            .service_account_name
            .as_deref()
            .is_none_or(|sa| sa.is_empty() || sa == "default")
    {
        out.push(pod(
            "forbidDefaultServiceAccount",
            "spec.serviceAccountName",
            "spec.serviceAccountName must name a ServiceAccount of the pod's own, not default \
             (identity-based policy needs real identities)"
                .into(),
        ));
    }
    if rules.require_mesh && mesh.namespace_strict {
        let label = meta
            .labels
            .as_ref()
            .and_then(|l| l.get(crate::inject::INJECT_LABEL))
            .map(String::as_str);
        if spec.host_network == Some(true) {
            out.push(pod(
                "requireMesh",
                "spec.hostNetwork",
                "spec.hostNetwork must be false: the namespace's mTLS is STRICT and a pod on \
                 the host's network cannot be meshed"
                    .into(),
            ));
        } else if label == Some("false") {
            out.push(pod(
                "requireMesh",
                "metadata.labels[\"meshd.io/inject\"]",
                "metadata.labels[\"meshd.io/inject\"] must not be \"false\": the namespace's \
                 mTLS is STRICT"
                    .into(),
            ));
        } else if facts_say_unmeshed(meta, spec, mesh) {
            out.push(pod(
                "requireMesh",
                "spec.initContainers",
                "the pod has no meshd sidecar and the namespace's mTLS is STRICT (label the \
                 namespace meshd.io/inject=enabled)"
                    .into(),
            ));
        }
    }
    for c in containers(spec) {
        let at = |control, field: &str, message: String| Violation {
            control,
            container: Some(c.name.to_string()),
            field: format!("{}.{field}", c.field),
            message,
        };
        if rules.read_only_root_filesystem
            && c.security_context.and_then(|s| s.read_only_root_filesystem) != Some(true)
        {
            out.push(at(
                "readOnlyRootFilesystem",
                "securityContext.readOnlyRootFilesystem",
                "securityContext.readOnlyRootFilesystem must be true".into(),
            ));
        }
        if rules.require_resource_limits
            && let Some(resources) = c.resources
        {
            let limits = resources.and_then(|r| r.limits.as_ref());
            let missing: Vec<&str> = ["cpu", "memory"]
                .into_iter()
                .filter(|k| !limits.is_some_and(|l| l.contains_key(*k)))
                .collect();
            if !missing.is_empty() {
                out.push(at(
                    "requireResourceLimits",
                    "resources.limits",
                    format!("resources.limits must set {}", missing.join(" and ")),
                ));
            }
        }
        let image_rules = !rules.allowed_registries.is_empty()
            || rules.require_image_digest
            || rules.forbid_latest_tag;
        if !image_rules {
            continue;
        }
        let written = c.image.unwrap_or("");
        let Some(image) = ImageRef::parse(written) else {
            out.push(at(
                "image",
                "image",
                format!("image {written:?} is not an image reference"),
            ));
            continue;
        };
        if !rules.allowed_registries.is_empty()
            && !rules.allowed_registries.iter().any(|p| image.under(p))
        {
            out.push(at(
                "allowedRegistries",
                "image",
                format!(
                    "image {written:?}: registry {} is not allowed ({image} is under none of {})",
                    image.registry,
                    rules.allowed_registries.join(", ")
                ),
            ));
        }
        if rules.require_image_digest && image.digest.is_none() {
            out.push(at(
                "requireImageDigest",
                "image",
                format!("image {written:?} must be pinned by digest (@sha256:...)"),
            ));
        }
        if rules.forbid_latest_tag && image.is_latest() {
            out.push(at(
                "forbidLatestTag",
                "image",
                match image.tag {
                    Some(_) => format!("image {written:?} uses the tag latest"),
                    None => format!("image {written:?} has no tag, which means latest"),
                },
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Pod;
    use serde_json::json;

    use super::*;

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": spec})).unwrap()
    }

    fn all_rules() -> Rules {
        Rules {
            read_only_root_filesystem: true,
            allowed_registries: vec!["registry.example.com/".into()],
            require_image_digest: true,
            forbid_latest_tag: true,
            require_resource_limits: true,
            forbid_default_service_account: true,
            require_mesh: true,
        }
    }

    fn controls(rules: &Rules, p: &Pod, strict: bool) -> Vec<String> {
        check(
            rules,
            &p.metadata,
            p.spec.as_ref().unwrap(),
            MeshFacts {
                namespace_strict: strict,
                ..MeshFacts::default()
            },
        )
        .iter()
        .map(|v| v.to_string())
        .collect()
    }

    #[test]
    fn a_pod_that_keeps_every_rule_passes() {
        let p = pod(json!({
            "serviceAccountName": "web",
            "initContainers": [{"name": "meshd-proxy", "image": "registry.example.com/meshd-proxy@sha256:ab",
                "securityContext": {"readOnlyRootFilesystem": true},
                "resources": {"limits": {"cpu": "1", "memory": "64Mi"}}}],
            "containers": [{"name": "app", "image": "registry.example.com/shop/web:1.4@sha256:cd",
                "securityContext": {"readOnlyRootFilesystem": true},
                "resources": {"limits": {"cpu": "1", "memory": "128Mi"}}}],
        }));
        assert_eq!(controls(&all_rules(), &p, true), Vec::<String>::new());
    }

    #[test]
    fn every_broken_rule_is_reported_with_its_container_and_field() {
        let p = pod(json!({
            "hostNetwork": true,
            "containers": [{"name": "app", "image": "nginx"}],
            "ephemeralContainers": [{"name": "debug", "image": "busybox:latest"}],
        }));
        let found = check(
            &all_rules(),
            &p.metadata,
            p.spec.as_ref().unwrap(),
            MeshFacts {
                namespace_strict: true,
                ..MeshFacts::default()
            },
        );
        let got: Vec<(&str, &str)> = found
            .iter()
            .map(|v| (v.control, v.field.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("forbidDefaultServiceAccount", "spec.serviceAccountName"),
                ("requireMesh", "spec.hostNetwork"),
                (
                    "readOnlyRootFilesystem",
                    "spec.containers[0].securityContext.readOnlyRootFilesystem"
                ),
                (
                    "requireResourceLimits",
                    "spec.containers[0].resources.limits"
                ),
                ("allowedRegistries", "spec.containers[0].image"),
                ("requireImageDigest", "spec.containers[0].image"),
                ("forbidLatestTag", "spec.containers[0].image"),
                (
                    "readOnlyRootFilesystem",
                    "spec.ephemeralContainers[0].securityContext.readOnlyRootFilesystem"
                ),
                ("allowedRegistries", "spec.ephemeralContainers[0].image"),
                ("requireImageDigest", "spec.ephemeralContainers[0].image"),
                ("forbidLatestTag", "spec.ephemeralContainers[0].image"),
            ]
        );
        let text: Vec<String> = found.iter().map(|v| v.to_string()).collect();
        assert!(
            text.contains(&r#"container "app": image "nginx": registry docker.io is not allowed (docker.io/library/nginx is under none of registry.example.com/)"#.to_string()),
            "{text:#?}"
        );
        assert!(
            text.contains(
                &r#"container "app": image "nginx" has no tag, which means latest"#.to_string()
            ),
            "{text:#?}"
        );
        assert!(
            text.contains(
                &r#"container "app": resources.limits must set cpu and memory"#.to_string()
            ),
            "{text:#?}"
        );
    }

    #[test]
    fn require_mesh_applies_to_strict_namespaces_only() {
        let rules = Rules {
            require_mesh: true,
            ..Rules::default()
        };
        let opted_out: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "labels": {"meshd.io/inject": "false"}},
            "spec": {"containers": [{"name": "app", "image": "a"}]},
        }))
        .unwrap();
        assert_eq!(
            controls(&rules, &opted_out, true),
            [
                r#"metadata.labels["meshd.io/inject"] must not be "false": the namespace's mTLS is STRICT"#
            ]
        );
        assert!(controls(&rules, &opted_out, false).is_empty());
        let plain = pod(json!({"containers": [{"name": "app", "image": "a"}]}));
        assert!(controls(&rules, &plain, true)[0].contains("no meshd sidecar"));
    }
}
