//! What a `WorkloadPolicy` means once meshd has checked it: which pods it applies to,
//! what it requires of them, whom it exempts, and what happens to a pod that breaks it.
//! The admission webhook, `meshctl admission check` and the background report all read
//! this one type ([`crate::admission`] evaluates it).

use std::collections::BTreeMap;

use crate::model::ObjectKey;

/// What a violation leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Mode {
    /// Admitted, recorded and counted.
    Audit,
    /// Admitted with a warning kubectl shows.
    Warn,
    /// Denied.
    Enforce,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Enforce => "Enforce",
            Mode::Warn => "Warn",
            Mode::Audit => "Audit",
        }
    }
}

/// A Pod Security Standards level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Profile {
    Baseline,
    Restricted,
}

/// The rules beyond the Pod Security Standards; all off unless set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Rules {
    pub read_only_root_filesystem: bool,
    /// Prefixes of normalised image references (`docker.io/library/nginx`), each
    /// ending at a path boundary; empty: any registry.
    pub allowed_registries: Vec<String>,
    pub require_image_digest: bool,
    pub forbid_latest_tag: bool,
    pub require_resource_limits: bool,
    pub forbid_default_service_account: bool,
    /// A pod of a namespace whose mTLS is STRICT may not opt out of injection, nor use
    /// the host's network.
    pub require_mesh: bool,
}

/// Who a policy leaves alone, and why.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Exemption {
    pub target: ExemptionTarget,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub enum ExemptionTarget {
    /// A container of this name.
    Container(String),
    /// Containers whose normalised image matches this pattern (`*` matches any run of
    /// characters).
    Image(String),
    /// Every container of pods running as this ServiceAccount.
    ServiceAccount(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct WorkloadPolicy {
    pub key: ObjectKey,
    pub mode: Mode,
    pub profile: Option<Profile>,
    /// In the root namespace: the namespaces it applies to (none: all). Elsewhere it
    /// applies to its own namespace only.
    pub namespace_selector: Option<BTreeMap<String, String>>,
    /// The pods it applies to (none: all).
    pub selector: Option<BTreeMap<String, String>>,
    pub rules: Rules,
    pub exemptions: Vec<Exemption>,
}
