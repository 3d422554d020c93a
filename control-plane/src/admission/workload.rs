//! Where an object keeps the pod it runs: a Pod is one, and Deployments, StatefulSets,
//! DaemonSets, ReplicaSets, Jobs and CronJobs carry a pod template. The webhook,
//! `meshctl admission check` and `meshctl inject` find it here, so they agree on which
//! kinds they read.

use k8s_openapi::api::core::v1::{PodSpec, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::Value;

/// Where an object of `api_version` + `kind` keeps its pod (a JSON pointer; `""` for a
/// Pod), if it has one.
pub fn template_pointer(api_version: &str, kind: &str) -> Option<&'static str> {
    match (api_version, kind) {
        ("v1", "Pod") => Some(""),
        ("apps/v1", "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet")
        | ("batch/v1", "Job") => Some("/spec/template"),
        ("batch/v1", "CronJob") => Some("/spec/jobTemplate/spec/template"),
        _ => None,
    }
}

/// A pod, or a workload's pod template, read.
#[derive(Debug, Clone)]
pub struct PodOf {
    /// Put in front of the pod's field paths: `""` for a Pod, `spec.template.` for a
    /// Deployment, `spec.jobTemplate.spec.template.` for a CronJob.
    pub prefix: &'static str,
    pub meta: ObjectMeta,
    pub spec: PodSpec,
}

/// The pod of `object` (an `api_version` + `kind`), `Ok(None)` for a kind without one,
/// or why it cannot be read: the field and the error, as a user can fix it.
pub fn pod_of(api_version: &str, kind: &str, object: &Value) -> Result<Option<PodOf>, String> {
    if template_pointer(api_version, kind).is_none() {
        return Ok(None);
    }
    let meta: ObjectMeta = match object.get("metadata") {
        Some(meta) => typed(meta, "metadata")?,
        None => ObjectMeta::default(),
    };
    pod_of_parts(api_version, kind, &meta, object)
}

/// [`pod_of`] for an object already read in two parts: its `metadata`, and the rest
/// (`spec`, ...), as kube's `DynamicObject` holds it. What the webhook reads, without
/// turning the object back into one JSON tree first.
pub fn pod_of_parts(
    api_version: &str,
    kind: &str,
    metadata: &ObjectMeta,
    rest: &Value,
) -> Result<Option<PodOf>, String> {
    let Some(pointer) = template_pointer(api_version, kind) else {
        return Ok(None);
    };
    if pointer.is_empty() {
        let spec = rest.get("spec").ok_or("spec: is required")?;
        return Ok(Some(PodOf {
            prefix: "",
            meta: metadata.clone(),
            spec: typed(spec, "spec")?,
        }));
    }
    let prefix = match pointer {
        "/spec/template" => "spec.template.",
        _ => "spec.jobTemplate.spec.template.",
    };
    let at = prefix.trim_end_matches('.');
    let template = rest
        .pointer(pointer)
        .ok_or_else(|| format!("{at}: is required"))?;
    let read: PodTemplateSpec = typed(template, at)?;
    let spec = read
        .spec
        .ok_or_else(|| format!("{prefix}spec: is required"))?;
    Ok(Some(PodOf {
        prefix,
        meta: read.metadata.unwrap_or_default(),
        spec,
    }))
}

impl PodOf {
    /// Whether it is a workload's template (its pods are created, and injected, later).
    pub fn is_template(&self) -> bool {
        !self.prefix.is_empty()
    }
}

/// `value` read as a `T`; the error names the field under `at`.
fn typed<T: serde::de::DeserializeOwned>(value: &Value, at: &str) -> Result<T, String> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." {
            at.to_string()
        } else {
            format!("{at}.{path}")
        };
        format!("{field}: {}", e.into_inner())
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn pods_and_templates_are_found_and_bad_ones_name_the_field() {
        let pod = json!({"metadata": {"name": "p", "labels": {"a": "b"}},
            "spec": {"containers": [{"name": "app", "image": "x"}]}});
        let read = pod_of("v1", "Pod", &pod).unwrap().unwrap();
        assert_eq!((read.prefix, read.is_template()), ("", false));
        assert_eq!(read.spec.containers[0].name, "app");

        let cron = json!({"spec": {"jobTemplate": {"spec": {"template": pod.clone()}}}});
        let read = pod_of("batch/v1", "CronJob", &cron).unwrap().unwrap();
        assert_eq!(read.prefix, "spec.jobTemplate.spec.template.");
        assert!(read.is_template());
        assert_eq!(read.meta.labels.unwrap()["a"], "b");

        assert!(pod_of("v1", "ConfigMap", &json!({})).unwrap().is_none());
        assert!(
            pod_of("apps/v1beta1", "Deployment", &json!({}))
                .unwrap()
                .is_none()
        );

        let bad = json!({"spec": {"template": {"spec": {"containers": [{"name": "app", "ports": [{"containerPort": "x"}]}]}}}});
        let e = pod_of("apps/v1", "Deployment", &bad).unwrap_err();
        assert!(
            e.starts_with("spec.template.spec.containers[0].ports[0].containerPort: invalid type"),
            "{e}"
        );
        assert_eq!(
            pod_of("apps/v1", "Deployment", &json!({"spec": {}})).unwrap_err(),
            "spec.template: is required"
        );
        assert_eq!(
            pod_of("v1", "Pod", &json!({"metadata": {}})).unwrap_err(),
            "spec: is required"
        );
    }
}
