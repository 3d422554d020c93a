//! `POST /validate`: Pods and the pod templates of workloads against the mesh's
//! `WorkloadPolicy`s ([`crate::admission`]), with the mesh snapshot in force when the
//! review arrives, so a policy change applies to the next request.
//!
//! - Enforce: denied, one line per Enforce policy naming the policy, and every
//!   violation with its container, field and rule.
//! - Warn: admitted with one warning per violation (kubectl prints each as
//!   `Warning: ...`).
//! - Audit: admitted; each violation is counted
//!   (`meshd_admission_policy_violations_total{policy,mode,rule}`, as are the other
//!   modes') and put in the API server's audit log (`auditAnnotations`).
//!
//! An object whose pod cannot be read is denied with the parse error: never admitted
//! unchecked. Updates that leave the pod (template) as it was are admitted without a
//! check (a label change or a scale must not be blocked by a policy that arrived
//! later); `pods/ephemeralcontainers` is checked, since it adds containers. Other
//! kinds and sub-resources are admitted unchanged.

use std::collections::HashMap;
use std::sync::Arc;

use axum::response::Response;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, Operation};
use tokio::sync::watch;

use super::review;
use crate::admission::{self, workload};
use crate::inject::InjectConfig;
use crate::logging::Escaped;
use crate::metrics::{PolicyRuleLabel, metrics};
use crate::model::MeshSnapshot;
use crate::model::workload_policy::Mode;

pub const PATH: &str = "/validate";

/// Audit annotation key (the API server prefixes it with the webhook's name).
const AUDIT_KEY: &str = "violations";

/// Answers the review in `body` with the snapshot `mesh` holds now; `inject` is the
/// injection template meshd's own containers are recognised by.
pub fn handle(
    inject: &InjectConfig,
    mesh: &watch::Receiver<Arc<MeshSnapshot>>,
    body: &[u8],
) -> Response {
    let request = match review::request(body) {
        Ok(r) => r,
        Err(reason) => return review::invalid(PATH, &reason),
    };
    let allowed = AdmissionResponse::from(&request);
    let Some(checked) = to_check(&request) else {
        return review::answer(PATH, "unchanged", allowed);
    };
    let (api_version, object) = checked;
    let kind = &request.kind.kind;
    let (namespace, name) = review::object_name(&request, object);
    let read = workload::pod_of_parts(&api_version, kind, &object.metadata, &object.data);
    let pod = match read {
        Ok(Some(pod)) => pod,
        Ok(None) => return review::answer(PATH, "unchanged", allowed),
        Err(e) => {
            let message = format!("meshd cannot read {kind} {namespace}/{name}: {e}");
            tracing::info!("{}", Escaped(&message));
            return review::answer(PATH, "denied", allowed.deny(message));
        }
    };
    let verdict = {
        let mesh = mesh.borrow();
        admission::check(&mesh, inject, &namespace, &pod)
    };
    for f in &verdict.findings {
        for v in &f.violations {
            metrics()
                .admission_violations
                .get_or_create(&PolicyRuleLabel {
                    policy: f.policy.to_string(),
                    mode: f.mode.name(),
                    rule: v.control,
                })
                .inc();
        }
    }
    let messages = verdict.messages();
    let lines = |mode: Mode| -> Vec<&str> {
        verdict
            .findings
            .iter()
            .zip(&messages)
            .filter(|(f, _)| f.mode == mode)
            .map(|(_, m)| m.as_str())
            .collect()
    };
    let mut response = allowed;
    let warnings: Vec<String> = verdict
        .findings
        .iter()
        .filter(|f| f.mode == Mode::Warn)
        .flat_map(|f| {
            f.violations
                .iter()
                .map(move |v| format!("meshd {} (Warn): {v} [{}]", f.policy, v.control))
        })
        .collect();
    if !warnings.is_empty() {
        response.warnings = Some(warnings);
    }
    let audit = lines(Mode::Audit);
    if !audit.is_empty() {
        response.audit_annotations = HashMap::from([(AUDIT_KEY.to_string(), audit.join("\n"))]);
    }
    let object = format!("{kind} {namespace}/{name}");
    match verdict.mode() {
        Some(Mode::Enforce) => {
            let message = lines(Mode::Enforce).join("\n");
            tracing::info!(object = %Escaped(&object), "{}", Escaped(&message));
            review::answer(PATH, "denied", response.deny(message))
        }
        Some(Mode::Warn) => review::answer(PATH, "warned", response),
        Some(Mode::Audit) => review::answer(PATH, "audited", response),
        None => review::answer(PATH, "allowed", response),
    }
}

/// The object to check and its `apiVersion`, or `None` when the request is one the
/// webhook admits unchanged (see the module doc).
fn to_check(request: &AdmissionRequest<DynamicObject>) -> Option<(String, &DynamicObject)> {
    let object = request.object.as_ref()?;
    let gvk = &request.kind;
    let api_version = match gvk.group.as_str() {
        "" => gvk.version.clone(),
        group => format!("{group}/{}", gvk.version),
    };
    workload::template_pointer(&api_version, &gvk.kind)?;
    let sub_resource = request.sub_resource.as_deref().unwrap_or("");
    let is_pod = gvk.kind == "Pod";
    match (&request.operation, sub_resource) {
        (Operation::Create, "") => Some((api_version, object)),
        (Operation::Update, "ephemeralcontainers") if is_pod => Some((api_version, object)),
        (Operation::Update, "") => {
            let pointer = if is_pod {
                "/spec"
            } else {
                workload::template_pointer(&api_version, &gvk.kind)?
            };
            let unchanged = request
                .old_object
                .as_ref()
                .is_some_and(|old| old.data.pointer(pointer) == object.data.pointer(pointer));
            (!unchanged).then_some((api_version, object))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use axum::body::to_bytes;
    use serde_json::{Value, json};

    use super::*;
    use crate::model::workload_policy::{Profile, Rules, WorkloadPolicy};
    use crate::model::{MeshDefaults, MeshObject, ObjectKey};

    fn mesh() -> watch::Receiver<Arc<MeshSnapshot>> {
        let policy = WorkloadPolicy {
            key: ObjectKey::new("shop", "baseline"),
            mode: Mode::Enforce,
            profile: Some(Profile::Baseline),
            namespace_selector: None,
            selector: None,
            rules: Rules::default(),
            exemptions: Vec::new(),
        };
        let mesh = MeshSnapshot::build(
            1,
            MeshDefaults::default(),
            [MeshObject::WorkloadPolicy(Arc::new(policy))],
        );
        watch::channel(Arc::new(mesh)).1
    }

    fn deployment(privileged: bool, replicas: u32) -> Value {
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"}}, "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "app", "image": "web:1",
                    "securityContext": {"privileged": privileged}}]}}}})
    }

    fn review(
        kind: (&str, &str, &str),
        operation: &str,
        sub_resource: Option<&str>,
        object: Value,
        old: Option<Value>,
    ) -> Vec<u8> {
        let (group, version, kind) = kind;
        serde_json::to_vec(
            &json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "u", "kind": {"group": group, "version": version, "kind": kind},
                "resource": {"group": group, "version": version, "resource": "x"},
                "subResource": sub_resource, "name": "web", "namespace": "shop",
                "operation": operation, "userInfo": {}, "object": object, "oldObject": old}}),
        )
        .unwrap()
    }

    async fn allowed(body: Vec<u8>) -> (bool, String) {
        let response = handle(&InjectConfig::default(), &mesh(), &body);
        let bytes = to_bytes(response.into_body(), usize::MAX).await.unwrap();
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        let message = v["response"]["status"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        (v["response"]["allowed"] == json!(true), message)
    }

    const DEPLOYMENT: (&str, &str, &str) = ("apps", "v1", "Deployment");

    #[tokio::test]
    async fn updates_are_checked_only_when_the_pod_template_changes() {
        // A scale of a Deployment admitted before the policy: not blocked.
        let (ok, _) = allowed(review(
            DEPLOYMENT,
            "UPDATE",
            None,
            deployment(true, 3),
            Some(deployment(true, 1)),
        ))
        .await;
        assert!(ok);
        // Its template made privileged: denied.
        let (ok, message) = allowed(review(
            DEPLOYMENT,
            "UPDATE",
            None,
            deployment(true, 1),
            Some(deployment(false, 1)),
        ))
        .await;
        assert!(!ok);
        assert!(
            message.starts_with("denied by shop/baseline (Enforce): container \"app\""),
            "{message}"
        );
        // Status and scale sub-resources are none of its business.
        let (ok, _) = allowed(review(
            DEPLOYMENT,
            "UPDATE",
            Some("status"),
            deployment(true, 1),
            Some(deployment(false, 1)),
        ))
        .await;
        assert!(ok);
    }

    #[tokio::test]
    async fn ephemeral_containers_are_checked() {
        let pod = |ephemeral: Value| {
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "namespace": "shop"},
                "spec": {"containers": [{"name": "app", "image": "web:1"}], "ephemeralContainers": ephemeral}})
        };
        let debug =
            json!([{"name": "debug", "image": "busybox", "securityContext": {"privileged": true}}]);
        let (ok, message) = allowed(review(
            ("", "v1", "Pod"),
            "UPDATE",
            Some("ephemeralcontainers"),
            pod(debug),
            Some(pod(json!([]))),
        ))
        .await;
        assert!(!ok);
        assert!(message.contains("container \"debug\""), "{message}");
        // A metadata-only update of the pod: admitted.
        let (ok, _) = allowed(review(
            ("", "v1", "Pod"),
            "UPDATE",
            None,
            pod(json!([{"name": "debug", "image": "busybox", "securityContext": {"privileged": true}}])),
            Some(pod(json!([{"name": "debug", "image": "busybox", "securityContext": {"privileged": true}}]))),
        ))
        .await;
        assert!(ok);
    }
}
