//! The one injection template: what meshd adds to a pod, made from the settings
//! ([`InjectConfig`]) and the pod's own annotations only, so the same pod always gets
//! the same containers (the admission check of pod security relies on that to tell
//! meshd's containers from look-alikes).
//!
//! - `meshd-init` (transparent capture only), the first init container:
//!   `meshd-agent init` with the arguments the pod's capture annotations give, as root
//!   with NET_ADMIN and NET_RAW and nothing else. Its root filesystem stays writable:
//!   iptables takes its lock in `/run/xtables.lock`.
//! - `meshd-proxy`, the native sidecar (an init container with `restartPolicy: Always`,
//!   so it starts before the app, its startup probe holds the app back until Envoy has
//!   its config, it stops after the app, and a Job's pod completes):
//!   `meshd-agent run` as the proxy uid, read-only root filesystem, no capabilities.
//! - Volumes: the agent's directory (a memory `emptyDir`: the key never touches a
//!   disk), the projected ServiceAccount token (audience meshd), and the trust bundle
//!   ConfigMap meshd writes into every mesh namespace.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, HTTPGetAction, ObjectFieldSelector, Probe, ProjectedVolumeSource, SeccompProfile,
    SecurityContext, ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use meshd_sidecar::capture::{AGENT_HEALTH_PORT, PROXY_UID};
use meshd_sidecar::probes::AppProbes;

use super::InjectConfig;
use crate::cluster::trust_bundle;

pub const SIDECAR: &str = "meshd-proxy";
pub const INIT: &str = "meshd-init";
pub const AGENT_VOLUME: &str = "meshd-agent";
pub const TOKEN_VOLUME: &str = "meshd-token";
pub const TRUST_BUNDLE_VOLUME: &str = "meshd-trust-bundle";
/// The volume names meshd adds; a pod that already uses one cannot be injected.
pub const VOLUMES: [&str; 3] = [AGENT_VOLUME, TOKEN_VOLUME, TRUST_BUNDLE_VOLUME];

const AGENT_DIR: &str = "/var/run/meshd-agent";
const TOKEN_DIR: &str = "/var/run/secrets/tokens";
const TOKEN_FILE: &str = "meshd-token";
const TRUST_BUNDLE_DIR: &str = "/var/run/secrets/meshd";
const READY_PATH: &str = "/healthz/ready";

/// The `meshd-init` container for `init_args` (from the pod's capture annotations).
pub fn init_container(config: &InjectConfig, init_args: Vec<String>) -> Container {
    Container {
        name: INIT.into(),
        image: Some(config.proxy_image.clone()),
        image_pull_policy: Some(config.image_pull_policy.clone()),
        command: Some(vec!["meshd-agent".into()]),
        args: Some(
            std::iter::once("init".to_string())
                .chain(init_args)
                .collect(),
        ),
        resources: Some(config.init_resources.clone()),
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_group: Some(0),
            run_as_non_root: Some(false),
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(false),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".into(), "NET_RAW".into()]),
                drop: Some(vec!["ALL".into()]),
            }),
            seccomp_profile: Some(runtime_default()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The `meshd-proxy` native sidecar; `probes` are the app's originals for the agent.
pub fn sidecar(config: &InjectConfig, probes: &AppProbes) -> Container {
    let field = |name: &str, path: &str| EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let value = |name: &str, value: String| EnvVar {
        name: name.into(),
        value: Some(value),
        ..Default::default()
    };
    let mut env = vec![
        field("POD_NAME", "metadata.name"),
        field("POD_NAMESPACE", "metadata.namespace"),
        field("SERVICE_ACCOUNT", "spec.serviceAccountName"),
        field("POD_IP", "status.podIP"),
        value("MESHD_XDS_ADDRESS", config.xds_address()),
        value("MESHD_NAMESPACE", config.meshd_namespace().into()),
        value("MESHD_TRUST_DOMAIN", config.trust_domain().into()),
        value(
            "MESHD_AGENT_TOKEN_FILE",
            format!("{TOKEN_DIR}/{TOKEN_FILE}"),
        ),
        value(
            "MESHD_AGENT_TRUST_BUNDLE",
            format!("{TRUST_BUNDLE_DIR}/{}", trust_bundle::KEY),
        ),
        value("MESHD_AGENT_DIR", AGENT_DIR.into()),
        value("MESHD_AGENT_LOG", config.log_level.clone()),
    ];
    if !probes.is_empty() {
        env.push(value(meshd_sidecar::probes::ENV, probes.to_json()));
    }
    let ready = |period: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(READY_PATH.into()),
            port: IntOrString::Int(i32::from(AGENT_HEALTH_PORT)),
            scheme: Some("HTTP".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(3),
        failure_threshold: Some(failures),
        ..Default::default()
    };
    let uid = i64::from(PROXY_UID);
    Container {
        name: SIDECAR.into(),
        image: Some(config.proxy_image.clone()),
        image_pull_policy: Some(config.image_pull_policy.clone()),
        command: Some(vec!["meshd-agent".into()]),
        args: Some(vec!["run".into()]),
        restart_policy: Some("Always".into()),
        env: Some(env),
        ports: Some(vec![ContainerPort {
            name: Some("meshd-health".into()),
            container_port: i32::from(AGENT_HEALTH_PORT),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        // The app starts once Envoy has its config (up to 10 minutes).
        startup_probe: Some(ready(1, 600)),
        readiness_probe: Some(ready(5, 3)),
        resources: Some(config.resources.clone()),
        security_context: Some(SecurityContext {
            run_as_user: Some(uid),
            run_as_group: Some(uid),
            run_as_non_root: Some(true),
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            seccomp_profile: Some(runtime_default()),
            ..Default::default()
        }),
        volume_mounts: Some(vec![
            mount(AGENT_VOLUME, AGENT_DIR, false),
            mount(TOKEN_VOLUME, TOKEN_DIR, true),
            mount(TRUST_BUNDLE_VOLUME, TRUST_BUNDLE_DIR, true),
        ]),
        ..Default::default()
    }
}

/// The volumes the sidecar mounts.
pub fn volumes(config: &InjectConfig) -> Vec<Volume> {
    vec![
        Volume {
            name: AGENT_VOLUME.into(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("Memory".into()),
                size_limit: Some(Quantity("16Mi".into())),
            }),
            ..Default::default()
        },
        Volume {
            name: TOKEN_VOLUME.into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(config.token_audience().into()),
                        expiration_seconds: Some(config.token_expiration_seconds),
                        path: TOKEN_FILE.into(),
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        },
        Volume {
            name: TRUST_BUNDLE_VOLUME.into(),
            config_map: Some(ConfigMapVolumeSource {
                name: trust_bundle::CONFIG_MAP_NAME.into(),
                ..Default::default()
            }),
            ..Default::default()
        },
    ]
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: read_only.then_some(true),
        ..Default::default()
    }
}

fn runtime_default() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".into(),
        ..Default::default()
    }
}

/// The annotations injection adds (beside the probes), for `capture`.
pub fn annotations(capture: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            super::INJECTED_ANNOTATION.to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        ),
        (
            crate::sources::CAPTURE_ANNOTATION.to_string(),
            capture.to_string(),
        ),
    ])
}
