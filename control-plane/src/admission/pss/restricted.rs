//! The `restricted` controls, each as upstream's v1.33 check decides it (ids and
//! history in the module doc of [`super`]). A container that leaves a setting to the
//! pod inherits the pod's: it is reported only when the pod does not satisfy the
//! control either, and not when the pod's own value is reported already.

use k8s_openapi::api::core::v1::Volume;

use super::baseline::{added_capabilities, valid_seccomp};
use super::containers;
use super::{Pod, Violation, pod_violation, quoted_list};

/// `allowPrivilegeEscalation`: explicitly false in every container (not for Windows
/// pods since 1.25).
pub(super) fn allow_privilege_escalation(pod: &Pod<'_>, out: &mut Vec<Violation>) {
    if pod.is_windows() {
        return;
    }
    for c in containers::all(pod.spec) {
        if c.security_context
            .and_then(|sc| sc.allow_privilege_escalation)
            != Some(false)
        {
            out.push(c.violation(
                "allowPrivilegeEscalation",
                "securityContext.allowPrivilegeEscalation",
                "securityContext.allowPrivilegeEscalation must be false".into(),
            ));
        }
    }
}

/// `capabilities_restricted`: drop `ALL`, add nothing but `NET_BIND_SERVICE` (not for
/// Windows pods since 1.25; the baseline capabilities control it overrides does not
/// run either, as upstream).
pub(super) fn capabilities(pod: &Pod<'_>, out: &mut Vec<Violation>) {
    const CONTROL: &str = "capabilities_restricted";
    if pod.is_windows() {
        return;
    }
    for c in containers::all(pod.spec) {
        let caps = c.security_context.and_then(|sc| sc.capabilities.as_ref());
        let dropped = caps
            .and_then(|caps| caps.drop.as_deref())
            .unwrap_or_default();
        // Exactly "ALL": upstream compares case-sensitively.
        if !dropped.iter().any(|cap| cap == "ALL") {
            out.push(c.violation(
                CONTROL,
                "securityContext.capabilities.drop",
                r#"securityContext.capabilities.drop must include "ALL""#.into(),
            ));
        }
        let added = added_capabilities(&c);
        if added.iter().any(|cap| cap != "NET_BIND_SERVICE") {
            let bad = added
                .iter()
                .map(String::as_str)
                .filter(|cap| *cap != "NET_BIND_SERVICE");
            out.push(c.violation(
                CONTROL,
                "securityContext.capabilities.add",
                format!(
                    r#"securityContext.capabilities.add must not include {} (only "NET_BIND_SERVICE")"#,
                    quoted_list(bad)
                ),
            ));
        }
    }
}

/// `restrictedVolumes`: only the volume types the standard allows.
pub(super) fn volumes(pod: &Pod<'_>, out: &mut Vec<Violation>) {
    for (i, volume) in pod.spec.volumes.iter().flatten().enumerate() {
        // Upstream looks at the allowed sources first: a volume with one of them is
        // allowed whatever else it sets (the API server refuses such volumes anyway).
        if allowed_volume(volume) {
            continue;
        }
        let (field, message) = match restricted_volume_type(volume) {
            Some(type_) => (
                format!("spec.volumes[{i}].{type_}"),
                format!(
                    "volume {:?} must not use the restricted volume type {type_}",
                    volume.name
                ),
            ),
            None => (
                format!("spec.volumes[{i}]"),
                format!("volume {:?} has no allowed volume type", volume.name),
            ),
        };
        out.push(pod_violation("restrictedVolumes", field, message));
    }
}

fn allowed_volume(v: &Volume) -> bool {
    v.config_map.is_some()
        || v.csi.is_some()
        || v.downward_api.is_some()
        || v.empty_dir.is_some()
        || v.ephemeral.is_some()
        || v.image.is_some()
        || v.persistent_volume_claim.is_some()
        || v.projected.is_some()
        || v.secret.is_some()
}

/// The field name of a restricted volume source, in upstream's order.
fn restricted_volume_type(v: &Volume) -> Option<&'static str> {
    let types = [
        (v.host_path.is_some(), "hostPath"),
        (v.gce_persistent_disk.is_some(), "gcePersistentDisk"),
        (v.aws_elastic_block_store.is_some(), "awsElasticBlockStore"),
        (v.git_repo.is_some(), "gitRepo"),
        (v.nfs.is_some(), "nfs"),
        (v.iscsi.is_some(), "iscsi"),
        (v.glusterfs.is_some(), "glusterfs"),
        (v.rbd.is_some(), "rbd"),
        (v.flex_volume.is_some(), "flexVolume"),
        (v.cinder.is_some(), "cinder"),
        (v.cephfs.is_some(), "cephfs"),
        (v.flocker.is_some(), "flocker"),
        (v.fc.is_some(), "fc"),
        (v.azure_file.is_some(), "azureFile"),
        (v.vsphere_volume.is_some(), "vsphereVolume"),
        (v.quobyte.is_some(), "quobyte"),
        (v.azure_disk.is_some(), "azureDisk"),
        (v.photon_persistent_disk.is_some(), "photonPersistentDisk"),
        (v.portworx_volume.is_some(), "portworxVolume"),
        (v.scale_io.is_some(), "scaleIO"),
        (v.storageos.is_some(), "storageos"),
    ];
    types
        .into_iter()
        .find_map(|(set, name)| set.then_some(name))
}

/// `runAsNonRoot`: true at pod level (containers may leave it unset) or in every
/// container; an explicit false anywhere fails. The `hostUsers: false` relaxation is
/// behind an alpha gate, off by default, at 1.33: not here.
pub(super) fn run_as_non_root(pod: &Pod<'_>, out: &mut Vec<Violation>) {
    const CONTROL: &str = "runAsNonRoot";
    let pod_value = pod
        .spec
        .security_context
        .as_ref()
        .and_then(|sc| sc.run_as_non_root);
    if pod_value == Some(false) {
        out.push(pod_violation(
            CONTROL,
            "spec.securityContext.runAsNonRoot".into(),
            "spec.securityContext.runAsNonRoot must be true, not false".into(),
        ));
    }
    for c in containers::all(pod.spec) {
        match c.security_context.and_then(|sc| sc.run_as_non_root) {
            Some(true) => {}
            Some(false) => out.push(c.violation(
                CONTROL,
                "securityContext.runAsNonRoot",
                "securityContext.runAsNonRoot must be true, not false".into(),
            )),
            // Inherits the pod's; a pod-level false is reported above.
            None if pod_value.is_none() => out.push(c.violation(
                CONTROL,
                "securityContext.runAsNonRoot",
                "securityContext.runAsNonRoot must be true".into(),
            )),
            None => {}
        }
    }
}

/// `runAsUser`: never 0, pod or container (unset is fine).
pub(super) fn run_as_user(pod: &Pod<'_>, out: &mut Vec<Violation>) {
    const CONTROL: &str = "runAsUser";
    if pod
        .spec
        .security_context
        .as_ref()
        .and_then(|sc| sc.run_as_user)
        == Some(0)
    {
        out.push(pod_violation(
            CONTROL,
            "spec.securityContext.runAsUser".into(),
            "spec.securityContext.runAsUser must not be 0".into(),
        ));
    }
    for c in containers::all(pod.spec) {
        if c.security_context.and_then(|sc| sc.run_as_user) == Some(0) {
            out.push(c.violation(
                CONTROL,
                "securityContext.runAsUser",
                "securityContext.runAsUser must not be 0".into(),
            ));
        }
    }
}

/// `seccompProfile_restricted`: RuntimeDefault or Localhost at pod level (containers
/// may leave it unset) or in every container; `Unconfined` (or anything else) set
/// anywhere fails. Not for Windows pods since 1.25 (nor the baseline control).
pub(super) fn seccomp_profile(pod: &Pod<'_>, out: &mut Vec<Violation>) {
    const CONTROL: &str = "seccompProfile_restricted";
    if pod.is_windows() {
        return;
    }
    let pod_sc = pod.spec.security_context.as_ref();
    let pod_type = pod_sc
        .and_then(|sc| sc.seccomp_profile.as_ref())
        .map(|p| p.type_.as_str());
    if let Some(type_) = pod_type.filter(|t| !valid_seccomp(t)) {
        out.push(pod_violation(
            CONTROL,
            "spec.securityContext.seccompProfile.type".into(),
            format!(
                "spec.securityContext.seccompProfile.type must be RuntimeDefault or Localhost, not {type_:?}"
            ),
        ));
    }
    for c in containers::all(pod.spec) {
        let profile = c
            .security_context
            .and_then(|sc| sc.seccomp_profile.as_ref());
        match profile.map(|p| p.type_.as_str()) {
            Some(type_) if valid_seccomp(type_) => {}
            Some(type_) => out.push(c.violation(
                CONTROL,
                "securityContext.seccompProfile.type",
                format!(
                    "securityContext.seccompProfile.type must be RuntimeDefault or Localhost, not {type_:?}"
                ),
            )),
            // Inherits the pod's; a bad pod-level profile is reported above.
            None if pod_type.is_none() => out.push(c.violation(
                CONTROL,
                "securityContext.seccompProfile.type",
                "securityContext.seccompProfile.type must be RuntimeDefault or Localhost".into(),
            )),
            None => {}
        }
    }
}
