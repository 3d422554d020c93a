//! meshd's own resources (`security.meshd.io/v1alpha1`), in the shape a user writes them.
//!
//! These serde types are what the config directory (and later the Kubernetes API) holds;
//! the functions here check them and turn them into model objects, naming the field on
//! error. Unknown fields are errors: a typo must not silently weaken security.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

use super::convert::{FieldError, object_key};
use crate::model::{MtlsMode, PeerAuthentication};

pub const GROUP_VERSION: &str = "security.meshd.io/v1alpha1";

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationResource {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PeerAuthenticationSpec,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationSpec {
    pub selector: Option<WorkloadSelector>,
    pub mtls: Option<MtlsSpec>,
    pub port_level_mtls: Option<BTreeMap<String, MtlsSpec>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MtlsSpec {
    pub mode: Option<String>,
}

/// `STRICT`, `PERMISSIVE`, `DISABLE`, or `UNSET`/absent (`None`: inherit).
fn parse_mode(field: &str, spec: Option<&MtlsSpec>) -> Result<Option<MtlsMode>, FieldError> {
    match spec.and_then(|s| s.mode.as_deref()) {
        None | Some("UNSET") => Ok(None),
        Some("STRICT") => Ok(Some(MtlsMode::Strict)),
        Some("PERMISSIVE") => Ok(Some(MtlsMode::Permissive)),
        Some("DISABLE") => Ok(Some(MtlsMode::Disable)),
        Some(other) => Err(FieldError::new(
            field,
            format!("{other:?} is not a mode: use STRICT, PERMISSIVE, DISABLE or UNSET"),
        )),
    }
}

pub fn peer_authentication(
    r: &PeerAuthenticationResource,
) -> Result<PeerAuthentication, FieldError> {
    let key = object_key(&r.metadata)?;
    let selector = r
        .spec
        .selector
        .as_ref()
        .map(|s| s.match_labels.clone())
        .filter(|l| !l.is_empty());
    let mode = parse_mode("spec.mtls.mode", r.spec.mtls.as_ref())?;
    let mut port_modes = BTreeMap::new();
    for (port, spec) in r.spec.port_level_mtls.iter().flatten() {
        let field = format!("spec.portLevelMtls[\"{port}\"]");
        if selector.is_none() {
            return Err(FieldError::new(
                field,
                "port-level settings need spec.selector.matchLabels: ports are a workload's, not a namespace's",
            ));
        }
        let number = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| FieldError::new(&field, "the key must be a port number (1-65535)"))?;
        match parse_mode(&format!("{field}.mode"), Some(spec))? {
            Some(m) => {
                port_modes.insert(number, m);
            }
            None => {
                return Err(FieldError::new(
                    format!("{field}.mode"),
                    "is required for a port-level setting",
                ));
            }
        }
    }
    Ok(PeerAuthentication {
        key,
        selector,
        mode,
        port_modes,
    })
}
