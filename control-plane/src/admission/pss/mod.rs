//! The Kubernetes [Pod Security Standards] (`baseline`, `restricted`), decided for one
//! pod spec as `k8s.io/pod-security-admission` decides them for **Kubernetes v1.33**
//! (meshd's API version, k8s-openapi `v1_33`; upstream's `policy/check_*.go` on the
//! `release-1.33` branch, level version `latest` = `v1.33`). A pod is allowed exactly
//! when upstream allows it; where upstream folds several findings of a control into one
//! message, [`check`] reports each offending field on its own, so a user sees every
//! violation at once.
//!
//! [Pod Security Standards]: https://kubernetes.io/docs/concepts/security/pod-security-standards/
//!
//! "Containers" means `initContainers`, `containers` and `ephemeralContainers`, visited
//! in that order (upstream's `visitContainers`). Controls run in upstream's order
//! (baseline ids sorted, then restricted ids sorted, a restricted control replacing the
//! baseline one it overrides), so the output order is stable.
//!
//! | control (upstream id) | level | what fails at v1.33 | history |
//! |---|---|---|---|
//! | `appArmorProfile` | baseline | pod or container `securityContext.appArmorProfile.type` other than `RuntimeDefault`/`Localhost`; an annotation `container.apparmor.security.beta.kubernetes.io/*` other than empty, `runtime/default`, `localhost/*` | one version (1.0) checks both the field (added to the API in 1.30) and the annotation |
//! | `capabilities_baseline` | baseline | `capabilities.add` outside `AUDIT_WRITE CHOWN DAC_OVERRIDE FOWNER FSETID KILL MKNOD NET_BIND_SERVICE SETFCAP SETGID SETPCAP SETUID SYS_CHROOT` (compared case-sensitively, no `CAP_` prefix) | unchanged since 1.0 |
//! | `hostNamespaces` | baseline | `hostNetwork`, `hostPID`, `hostIPC` true | unchanged |
//! | `hostPathVolumes` | baseline | any `hostPath` volume | unchanged |
//! | `hostPorts` | baseline | a container port's `hostPort` other than unset/0 | unchanged (`hostProbesAndHostLifecycle` only from 1.34) |
//! | `privileged` | baseline | container `privileged: true` | unchanged |
//! | `procMount` | baseline | container `procMount` set to anything but `Default` (also `""`) | 1.33 relaxes it for `hostUsers: false` only behind the alpha gate `UserNamespacesPodSecurityStandards` (off by default, not followed here); split into `procMount`/`procMount_restricted` in 1.35 |
//! | `seLinuxOptions` | baseline | `seLinuxOptions.type` not empty/`container_t`/`container_init_t`/`container_kvm_t`/`container_engine_t`; `user` or `role` non-empty; pod or container | `container_engine_t` allowed from 1.31 |
//! | `seccompProfile_baseline` | baseline | pod or container `seccompProfile.type` other than `RuntimeDefault`/`Localhost` (absent is fine) | before 1.19 the `seccomp.security.alpha.kubernetes.io` annotations; since 1.19 only the fields |
//! | `sysctls` | baseline | a pod sysctl outside `kernel.shm_rmid_forced`, `net.ipv4.ip_local_port_range`, `net.ipv4.tcp_syncookies`, `net.ipv4.ping_group_range`, `net.ipv4.ip_unprivileged_port_start`, `net.ipv4.ip_local_reserved_ports` (1.27), `net.ipv4.tcp_keepalive_time`, `tcp_fin_timeout`, `tcp_keepalive_intvl`, `tcp_keepalive_probes` (1.29), `net.ipv4.tcp_rmem`, `tcp_wmem` (1.32) | 1.37 adds `tcp_slow_start_after_idle`, `tcp_notsent_lowat` (not at 1.33) |
//! | `windowsHostProcess` | baseline | pod or container `windowsOptions.hostProcess: true` | unchanged |
//! | `allowPrivilegeEscalation` | restricted | container `allowPrivilegeEscalation` not explicitly false | 1.25: not checked for `spec.os.name: windows` |
//! | `capabilities_restricted` | restricted | `capabilities.drop` without `ALL` (exactly, case-sensitive); `add` other than `NET_BIND_SERVICE`; replaces `capabilities_baseline` | from 1.22; 1.25: not checked for Windows pods (nor is `capabilities_baseline`, which it overrides) |
//! | `restrictedVolumes` | restricted | a volume of none of `configMap csi downwardAPI emptyDir ephemeral image persistentVolumeClaim projected secret`; replaces `hostPathVolumes` | one version (1.0); `image` volumes (API 1.31) are in its allowed list at every version |
//! | `runAsNonRoot` | restricted | pod `runAsNonRoot: false`; container `false`; container unset while the pod does not say true | the `hostUsers: false` relaxation is behind the same alpha gate at 1.33 (not followed); unconditional from 1.35 |
//! | `runAsUser` | restricted | pod or container `runAsUser: 0` | from 1.23; same user-namespace note |
//! | `seccompProfile_restricted` | restricted | pod or container type other than `RuntimeDefault`/`Localhost`; a container without a profile while the pod has no valid one; replaces `seccompProfile_baseline` | from 1.19; 1.25: not checked for Windows pods (nor is the baseline control) |
//!
//! Field paths are relative to the pod (`spec.…`, `metadata.…`); a caller checking a
//! pod template puts its own prefix in front. No allocation happens for a pod that
//! passes; a violation costs its field path and message.

mod baseline;
mod containers;
mod restricted;
#[cfg(test)]
mod tests;

use std::fmt;

use k8s_openapi::api::core::v1::PodSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// The Kubernetes version whose Pod Security Standards [`check`] decides.
pub const KUBERNETES_VERSION: &str = "v1.33";

/// A Pod Security Standards profile. `Restricted` includes `Baseline`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Baseline,
    Restricted,
}

/// One offending field of one control.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The upstream check id, e.g. `runAsNonRoot`, `capabilities_restricted`.
    pub control: &'static str,
    /// The container's name when the field is a container's.
    pub container: Option<String>,
    /// The field's path in the pod, e.g. `spec.containers[0].securityContext.runAsNonRoot`.
    pub field: String,
    /// Short and user-facing, naming the offending values; relative to the container
    /// for a container's field (`securityContext.runAsNonRoot must be true`).
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.container {
            Some(name) => write!(f, "container {name:?}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// Every violation of every control of `level`, in a stable order (see the module doc).
/// Empty when the pod is allowed.
pub fn check(level: Level, meta: &ObjectMeta, spec: &PodSpec) -> Vec<Violation> {
    let mut out = Vec::new();
    let pod = Pod { meta, spec };
    // Upstream's order: baseline ids sorted bytewise, then restricted ids sorted; at
    // restricted, the baseline controls a restricted one overrides are left out.
    baseline::app_armor_profile(&pod, &mut out);
    if level == Level::Baseline {
        baseline::capabilities(&pod, &mut out);
    }
    baseline::host_namespaces(&pod, &mut out);
    if level == Level::Baseline {
        baseline::host_path_volumes(&pod, &mut out);
    }
    baseline::host_ports(&pod, &mut out);
    baseline::privileged(&pod, &mut out);
    baseline::proc_mount(&pod, &mut out);
    baseline::se_linux_options(&pod, &mut out);
    if level == Level::Baseline {
        baseline::seccomp_profile(&pod, &mut out);
    }
    baseline::sysctls(&pod, &mut out);
    baseline::windows_host_process(&pod, &mut out);
    if level == Level::Restricted {
        restricted::allow_privilege_escalation(&pod, &mut out);
        restricted::capabilities(&pod, &mut out);
        restricted::volumes(&pod, &mut out);
        restricted::run_as_non_root(&pod, &mut out);
        restricted::run_as_user(&pod, &mut out);
        restricted::seccomp_profile(&pod, &mut out);
    }
    out
}

/// What every control reads.
struct Pod<'a> {
    meta: &'a ObjectMeta,
    spec: &'a PodSpec,
}

impl Pod<'_> {
    /// `spec.os.name: windows`: upstream skips some restricted controls (since 1.25).
    fn is_windows(&self) -> bool {
        self.spec.os.as_ref().is_some_and(|os| os.name == "windows")
    }
}

/// A pod-level violation.
fn pod_violation(control: &'static str, field: String, message: String) -> Violation {
    Violation {
        control,
        container: None,
        field,
        message,
    }
}

/// `"A", "B"`: values as a message names them, quoted and escaped, duplicates once.
fn quoted_list<'a>(values: impl IntoIterator<Item = &'a str>) -> String {
    let mut seen: Vec<&str> = Vec::new();
    for value in values {
        if !seen.contains(&value) {
            seen.push(value);
        }
    }
    seen.iter()
        .map(|v| format!("{v:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}
