//! Sidecar injection: what turns a pod into a meshed pod. One function, [`inject`],
//! behind both the mutating webhook ([`crate::webhook`]) and `meshctl inject` (offline,
//! [`manifests`]), so a pod gets the same spec either way.
//!
//! A pod is injected unless:
//! - it opts out (label `meshd.io/inject: "false"`);
//! - it uses the host's network (`hostNetwork: true`): its traffic cannot be captured
//!   without capturing the node's;
//! - it is meshd itself (labels `app.kubernetes.io/part-of: meshd` and
//!   `app.kubernetes.io/component: control-plane`, as the chart sets them);
//! - it is injected already (annotation [`INJECTED_ANNOTATION`], or a `meshd-proxy`
//!   container): a second pass changes nothing, so the webhook's reinvocation is safe.
//!
//! Which pods reach the webhook at all is the webhook configuration's business
//! (namespace label `meshd.io/inject=enabled`, or pod label `meshd.io/inject: "true"`).
//!
//! The pod's annotations choose the capture (`meshd.io/capture`, default from the
//! settings: transparent) and its port and range exclusions
//! ([`meshd_sidecar::capture`]). A pod meshd would refuse — an invalid annotation of
//! meshd's, an app port meshd's sidecar needs, a volume or container named like
//! meshd's — is refused here, with the field named, instead of being admitted and
//! failing later in the mesh.

pub mod config;
pub mod manifests;
mod probes;
pub mod template;

use k8s_openapi::api::core::v1::{Pod, PodSpec, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use meshd_sidecar::capture;
use meshd_sidecar::probes::{AppProbes, ORIGINAL_PROBES_ANNOTATION};

pub use self::config::InjectConfig;
use crate::model::Capture;
use crate::sources::CAPTURE_ANNOTATION;
use crate::sources::convert::{self, FieldError};

/// The label that opts a pod in (`"true"`) or out (`"false"`); on a namespace,
/// `enabled` opts its pods in.
pub const INJECT_LABEL: &str = "meshd.io/inject";
/// Set on every injected pod: the version of meshd whose template injected it.
pub const INJECTED_ANNOTATION: &str = "meshd.io/injected";

/// Ports a container of the app may not use: Envoy's admin port, its virtual
/// listeners and the agent's health port.
const RESERVED_PORTS: [u16; 4] = [
    15000,
    capture::OUTBOUND_PORT,
    capture::INBOUND_PORT,
    capture::AGENT_HEALTH_PORT,
];

/// What [`inject`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Injected,
    LeftAlone(Reason),
}

/// Why a pod was left as it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    OptedOut,
    HostNetwork,
    Meshd,
    AlreadyInjected,
}

impl Reason {
    pub fn reason(self) -> &'static str {
        match self {
            Reason::OptedOut => "the pod opts out (meshd.io/inject: \"false\")",
            Reason::HostNetwork => "the pod uses the host's network, which cannot be meshed",
            Reason::Meshd => "the pod is meshd's own",
            Reason::AlreadyInjected => "the pod is injected already",
        }
    }
}

/// Injects meshd's sidecar into the pod (or pod template) `meta` + `spec` of
/// `namespace`, or says why not. On an error nothing is changed.
pub fn inject(
    meta: &mut ObjectMeta,
    spec: &mut PodSpec,
    namespace: &str,
    config: &InjectConfig,
) -> Result<Outcome, FieldError> {
    if let Some(reason) = left_alone(meta, spec) {
        return Ok(Outcome::LeftAlone(reason));
    }
    let mut injected_meta = meta.clone();
    let mut injected = spec.clone();
    let annotations = injected_meta.annotations.get_or_insert_default();
    let capture_mode = match annotations.get(CAPTURE_ANNOTATION) {
        Some(value) => value.trim().to_string(),
        None => config.default_capture.clone(),
    };
    let transparent = match Capture::parse(&capture_mode) {
        Some(c) => c == Capture::Transparent,
        None => {
            return Err(FieldError::new(
                annotation_field(CAPTURE_ANNOTATION),
                format!("{capture_mode:?} is not a capture mode (explicit, transparent)"),
            ));
        }
    };
    let init_args = capture::init_args(annotations).map_err(|e| {
        FieldError::new(
            annotation_field(e.annotation),
            format!("{:?}: {}", e.value, e.error),
        )
    })?;
    check_names(&injected)?;

    let mut app_probes = AppProbes::default();
    for (i, c) in injected.containers.iter_mut().enumerate() {
        check_ports(c, &format!("spec.containers[{i}]"))?;
        probes::rewrite(c, &format!("spec.containers[{i}]"), &mut app_probes)?;
    }
    // The app's own native sidecars have probes too.
    for (i, c) in injected.init_containers.iter_mut().flatten().enumerate() {
        if c.restart_policy.as_deref() == Some("Always") {
            check_ports(c, &format!("spec.initContainers[{i}]"))?;
            probes::rewrite(c, &format!("spec.initContainers[{i}]"), &mut app_probes)?;
        }
    }

    let mut ours = Vec::new();
    if transparent {
        ours.push(template::init_container(config, init_args));
    }
    ours.push(template::sidecar(config, &app_probes));
    let inits = injected.init_containers.get_or_insert_default();
    inits.splice(0..0, ours);
    injected
        .volumes
        .get_or_insert_default()
        .extend(template::volumes(config));
    annotations.extend(template::annotations(&capture_mode));
    if !app_probes.is_empty() {
        annotations.insert(ORIGINAL_PROBES_ANNOTATION.into(), app_probes.to_json());
    }

    // What the mesh will read of the pod: refused now rather than ignored later.
    let mut as_stored = Pod {
        metadata: injected_meta.clone(),
        spec: Some(injected.clone()),
        status: None,
    };
    as_stored.metadata.namespace = Some(namespace.to_string());
    if as_stored.metadata.name.as_deref().is_none_or(str::is_empty) {
        as_stored.metadata.name = Some(format!(
            "{}new",
            as_stored
                .metadata
                .generate_name
                .as_deref()
                .unwrap_or("pod-")
        ));
    }
    convert::pod(&as_stored)?;

    *meta = injected_meta;
    *spec = injected;
    Ok(Outcome::Injected)
}

fn left_alone(meta: &ObjectMeta, spec: &PodSpec) -> Option<Reason> {
    let labels = meta.labels.as_ref();
    let label = |k: &str| labels.and_then(|l| l.get(k)).map(String::as_str);
    if label(INJECT_LABEL) == Some("false") {
        return Some(Reason::OptedOut);
    }
    if spec.host_network == Some(true) {
        return Some(Reason::HostNetwork);
    }
    if label("app.kubernetes.io/part-of") == Some("meshd")
        && label("app.kubernetes.io/component") == Some("control-plane")
    {
        return Some(Reason::Meshd);
    }
    let annotated = meta
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(INJECTED_ANNOTATION));
    let has_sidecar = spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .any(|c| c.name == template::SIDECAR);
    if annotated || has_sidecar {
        return Some(Reason::AlreadyInjected);
    }
    None
}

fn annotation_field(name: &str) -> String {
    format!("metadata.annotations[\"{name}\"]")
}

/// Container and volume names meshd adds must be free.
fn check_names(spec: &PodSpec) -> Result<(), FieldError> {
    for (list, containers) in [
        (
            "initContainers",
            spec.init_containers.as_deref().unwrap_or_default(),
        ),
        ("containers", &spec.containers[..]),
    ] {
        for (i, c) in containers.iter().enumerate() {
            if c.name == template::INIT {
                return Err(FieldError::new(
                    format!("spec.{list}[{i}].name"),
                    format!("{:?} is the name of meshd's init container", c.name),
                ));
            }
        }
    }
    for (i, v) in spec.volumes.iter().flatten().enumerate() {
        if template::VOLUMES.contains(&v.name.as_str()) {
            return Err(FieldError::new(
                format!("spec.volumes[{i}].name"),
                format!("{:?} is the name of a volume meshd adds", v.name),
            ));
        }
    }
    Ok(())
}

fn check_ports(
    container: &k8s_openapi::api::core::v1::Container,
    field: &str,
) -> Result<(), FieldError> {
    for (i, p) in container.ports.iter().flatten().enumerate() {
        if RESERVED_PORTS
            .iter()
            .any(|r| i32::from(*r) == p.container_port)
        {
            return Err(FieldError::new(
                format!("{field}.ports[{i}].containerPort"),
                format!(
                    "{} is a port of meshd's sidecar (15000 Envoy admin, 15001 outbound, \
                     15006 inbound, 15020 agent health)",
                    p.container_port
                ),
            ));
        }
    }
    Ok(())
}

/// [`inject`] on the pod or pod template `object` (JSON with `metadata` and `spec`),
/// as the JSON Patch (RFC 6902) that makes the change: what the webhook answers and
/// what `meshctl inject` applies to a manifest. Fields meshd's Kubernetes types do not
/// know are never touched: the patch is the difference of two typed readings.
pub fn patch(
    object: &serde_json::Value,
    namespace: &str,
    config: &InjectConfig,
) -> Result<(Outcome, json_patch::Patch), FieldError> {
    let template: PodTemplateSpec = serde_path_to_error::deserialize(object).map_err(|e| {
        let path = e.path().to_string();
        FieldError::new(path, e.into_inner().to_string())
    })?;
    let mut meta = template.metadata.unwrap_or_default();
    let mut spec = template
        .spec
        .ok_or_else(|| FieldError::new("spec", "is required"))?;
    let before = typed_json(&meta, &spec);
    let outcome = inject(&mut meta, &mut spec, namespace, config)?;
    let mut patch = json_patch::diff(&before, &typed_json(&meta, &spec));
    // A template without metadata reads as empty metadata: make it so first.
    if !patch.0.is_empty()
        && !object
            .get("metadata")
            .is_some_and(serde_json::Value::is_object)
    {
        patch.0.insert(
            0,
            json_patch::PatchOperation::Add(json_patch::AddOperation {
                path: json_patch::jsonptr::PointerBuf::parse("/metadata").expect("a pointer"),
                value: serde_json::json!({}),
            }),
        );
    }
    Ok((outcome, patch))
}

fn typed_json(meta: &ObjectMeta, spec: &PodSpec) -> serde_json::Value {
    serde_json::json!({ "metadata": meta, "spec": spec })
}

#[cfg(test)]
mod tests;
