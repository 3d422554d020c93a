//! The `baseline` controls, each as upstream's v1.33 check decides it (ids and
//! history in the module doc of [`super`]).

use k8s_openapi::api::core::v1::SELinuxOptions;

use super::containers::{self, ContainerRef};
use super::{Pod, Violation, pod_violation, quoted_list};

const APPARMOR_ANNOTATION_PREFIX: &str = "container.apparmor.security.beta.kubernetes.io/";

/// The capabilities a container runtime grants by default (`capabilities_baseline`).
pub(super) const DEFAULT_CAPABILITIES: [&str; 13] = [
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
];

/// The safe sysctls at v1.33 (the 1.0 set, then 1.27, 1.29 and 1.32 additions).
const SAFE_SYSCTLS: [&str; 12] = [
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
    "net.ipv4.tcp_rmem",
    "net.ipv4.tcp_wmem",
];

/// SELinux types a pod may ask for (`container_engine_t` since 1.31); empty is allowed.
const SELINUX_TYPES: [&str; 5] = [
    "",
    "container_t",
    "container_init_t",
    "container_kvm_t",
    "container_engine_t",
];

/// `appArmorProfile`: the field at pod and container level, then the beta annotations.
pub(super) fn app_armor_profile(pod: &Pod<'_>, out: &mut Vec<Violation>) {
    const CONTROL: &str = "appArmorProfile";
    let allowed = |t: &str| t == "RuntimeDefault" || t == "Localhost";
    let pod_profile = pod.spec.security_context.as_ref();
    if let Some(profile) = pod_profile.and_then(|sc| sc.app_armor_profile.as_ref())
        && !allowed(&profile.type_)
    {
        out.push(pod_violation(
            CONTROL,
            "spec.securityContext.appArmorProfile.type".into(),
            format!(
                "spec.securityContext.appArmorProfile.type must be RuntimeDefault or Localhost, not {:?}",
                profile.type_
            ),
        ));
    }
    for c in containers::all(pod.spec) {
        if let Some(profile) = c
            .security_context
            .and_then(|sc| sc.app_armor_profile.as_ref())
            && !allowed(&profile.type_)
        {
            out.push(c.violation(
                CONTROL,
                "securityContext.appArmorProfile.type",
                format!(
                    "securityContext.appArmorProfile.type must be RuntimeDefault or Localhost, not {:?}",
                    profile.type_
                ),
            ));
        }
    }
    // A BTreeMap: sorted by key, as upstream sorts its list.
    for (key, value) in pod.meta.annotations.iter().flatten() {
        if key.starts_with(APPARMOR_ANNOTATION_PREFIX)
            && !(value.is_empty() || value == "runtime/default" || value.starts_with("localhost/"))
        {
            out.push(pod_violation(
                CONTROL,
                format!("metadata.annotations[{key:?}]"),
                format!(
                    "annotation {key} must be runtime/default or localhost/<profile>, not {value:?}"
                ),
            ));
        }
    }
}

/// `capabilities_baseline`: only the runtime's default capabilities may be added.
pub(super) fn capabilities(pod: &Pod<'_>, out: &mut Vec<Violation>) {
    for c in containers::all(pod.spec) {
        let added = added_capabilities(&c);
        if added
            .iter()
            .any(|cap| !DEFAULT_CAPABILITIES.contains(&cap.as_str()))
        {
            let bad = added
                .iter()
                .map(String::as_str)
                .filter(|cap| !DEFAULT_CAPABILITIES.contains(cap));
            out.push(c.violation(
                "capabilities_baseline",
                "securityContext.capabilities.add",
                format!(
                    "securityContext.capabilities.add must not include {} (only the runtime's default capabilities)",
                    quoted_list(bad)
                ),
            ));
        }
    }
}

/// A container's `capabilities.add`, empty when unset.
pub(super) fn added_capabilities<'a>(c: &ContainerRef<'a>) -> &'a [String] {
    c.security_context
        .and_then(|sc| sc.capabilities.as_ref())
        .and_then(|caps| caps.add.as_deref())
        .unwrap_or_default()
}

/// `hostNamespaces`: no host network, PID or IPC namespace.
pub(super) fn host_namespaces(pod: &Pod<'_>, out: &mut Vec<Violation>) {
    let spec = pod.spec;
    for (set, field) in [
        (spec.host_network, "spec.hostNetwork"),
        (spec.host_pid, "spec.hostPID"),
        (spec.host_ipc, "spec.hostIPC"),
    ] {
        if set == Some(true) {
            out.push(pod_violation(
                "hostNamespaces",
                field.into(),
                format!("{field} must be false"),
            ));
        }
    }
}

/// `hostPathVolumes`: no hostPath volume (at restricted, `restrictedVolumes` instead).
pub(super) fn host_path_volumes(pod: &Pod<'_>, out: &mut Vec<Violation>) {
    for (i, volume) in pod.spec.volumes.iter().flatten().enumerate() {
        if let Some(host_path) = &volume.host_path {
            out.push(pod_violation(
                "hostPathVolumes",
                format!("spec.volumes[{i}].hostPath"),
                format!(
                    "volume {:?} must not be a hostPath volume (path {:?})",
                    volume.name, host_path.path
                ),
            ));
        }
    }
}

/// `hostPorts`: every container port's `hostPort` unset or 0.
pub(super) fn host_ports(pod: &Pod<'_>, out: &mut Vec<Violation>) {
    for c in containers::all(pod.spec) {
        for (i, port) in c.ports.iter().enumerate() {
            if let Some(host_port) = port.host_port.filter(|p| *p != 0) {
                out.push(c.violation(
                    "hostPorts",
                    &format!("ports[{i}].hostPort"),
                    format!("ports[{i}].hostPort must be unset or 0, not {host_port}"),
                ));
            }
        }
    }
}

/// `privileged`: no container `privileged: true`.
pub(super) fn privileged(pod: &Pod<'_>, out: &mut Vec<Violation>) {
    for c in containers::all(pod.spec) {
        if c.security_context.and_then(|sc| sc.privileged) == Some(true) {
            out.push(c.violation(
                "privileged",
                "securityContext.privileged",
                "securityContext.privileged must be false".into(),
            ));
        }
    }
}

/// `procMount`: unset or `Default`. At 1.33 upstream relaxes this for `hostUsers:
/// false` only behind an alpha feature gate that is off by default, so it is not here.
pub(super) fn proc_mount(pod: &Pod<'_>, out: &mut Vec<Violation>) {
    for c in containers::all(pod.spec) {
        if let Some(proc_mount) = c.security_context.and_then(|sc| sc.proc_mount.as_deref())
            && proc_mount != "Default"
        {
            out.push(c.violation(
                "procMount",
                "securityContext.procMount",
                format!("securityContext.procMount must be Default or unset, not {proc_mount:?}"),
            ));
        }
    }
}

/// `seLinuxOptions`: an allowed type, no user, no role; pod and containers.
pub(super) fn se_linux_options(pod: &Pod<'_>, out: &mut Vec<Violation>) {
    const CONTROL: &str = "seLinuxOptions";
    // Each offending part of the options: (field under seLinuxOptions, message tail).
    fn problems(opts: &SELinuxOptions) -> impl Iterator<Item = (&'static str, String)> + '_ {
        let type_ = opts.type_.as_deref().unwrap_or_default();
        let bad_type = (!SELINUX_TYPES.contains(&type_)).then(|| {
            (
                "type",
                format!(
                    "must be empty, container_t, container_init_t, container_kvm_t or container_engine_t, not {type_:?}"
                ),
            )
        });
        let set = |name: &'static str, value: &Option<String>| {
            value
                .as_deref()
                .filter(|v| !v.is_empty())
                .map(|v| (name, format!("must not be set (is {v:?})")))
        };
        bad_type
            .into_iter()
            .chain(set("user", &opts.user))
            .chain(set("role", &opts.role))
    }
    let pod_opts = pod.spec.security_context.as_ref();
    if let Some(opts) = pod_opts.and_then(|sc| sc.se_linux_options.as_ref()) {
        for (part, tail) in problems(opts) {
            let field = format!("spec.securityContext.seLinuxOptions.{part}");
            let message = format!("{field} {tail}");
            out.push(pod_violation(CONTROL, field, message));
        }
    }
    for c in containers::all(pod.spec) {
        if let Some(opts) = c
            .security_context
            .and_then(|sc| sc.se_linux_options.as_ref())
        {
            for (part, tail) in problems(opts) {
                let field = format!("securityContext.seLinuxOptions.{part}");
                let message = format!("{field} {tail}");
                out.push(c.violation(CONTROL, &field, message));
            }
        }
    }
}

/// Seccomp profile types both seccomp controls accept.
pub(super) fn valid_seccomp(type_: &str) -> bool {
    type_ == "RuntimeDefault" || type_ == "Localhost"
}

/// `seccompProfile_baseline` (v1.19+): a profile, where set, is RuntimeDefault or
/// Localhost. The old alpha annotations are not looked at any more (only before 1.19).
pub(super) fn seccomp_profile(pod: &Pod<'_>, out: &mut Vec<Violation>) {
    const CONTROL: &str = "seccompProfile_baseline";
    let pod_sc = pod.spec.security_context.as_ref();
    if let Some(profile) = pod_sc.and_then(|sc| sc.seccomp_profile.as_ref())
        && !valid_seccomp(&profile.type_)
    {
        out.push(pod_violation(
            CONTROL,
            "spec.securityContext.seccompProfile.type".into(),
            format!(
                "spec.securityContext.seccompProfile.type must be RuntimeDefault or Localhost, not {:?}",
                profile.type_
            ),
        ));
    }
    for c in containers::all(pod.spec) {
        if let Some(profile) = c
            .security_context
            .and_then(|sc| sc.seccomp_profile.as_ref())
            && !valid_seccomp(&profile.type_)
        {
            out.push(c.violation(
                CONTROL,
                "securityContext.seccompProfile.type",
                format!(
                    "securityContext.seccompProfile.type must be RuntimeDefault or Localhost, not {:?}",
                    profile.type_
                ),
            ));
        }
    }
}

/// `sysctls`: only the safe, namespaced ones.
pub(super) fn sysctls(pod: &Pod<'_>, out: &mut Vec<Violation>) {
    let pod_sc = pod.spec.security_context.as_ref();
    for (i, sysctl) in pod_sc
        .and_then(|sc| sc.sysctls.as_deref())
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        if !SAFE_SYSCTLS.contains(&sysctl.name.as_str()) {
            out.push(pod_violation(
                "sysctls",
                format!("spec.securityContext.sysctls[{i}].name"),
                format!(
                    "spec.securityContext.sysctls[{i}]: sysctl {:?} is not allowed",
                    sysctl.name
                ),
            ));
        }
    }
}

/// `windowsHostProcess`: no `hostProcess: true`, pod or container.
pub(super) fn windows_host_process(pod: &Pod<'_>, out: &mut Vec<Violation>) {
    const CONTROL: &str = "windowsHostProcess";
    let pod_sc = pod.spec.security_context.as_ref();
    let pod_options = pod_sc.and_then(|sc| sc.windows_options.as_ref());
    if pod_options.and_then(|w| w.host_process) == Some(true) {
        out.push(pod_violation(
            CONTROL,
            "spec.securityContext.windowsOptions.hostProcess".into(),
            "spec.securityContext.windowsOptions.hostProcess must be false".into(),
        ));
    }
    for c in containers::all(pod.spec) {
        let options = c
            .security_context
            .and_then(|sc| sc.windows_options.as_ref());
        if options.and_then(|w| w.host_process) == Some(true) {
            out.push(c.violation(
                CONTROL,
                "securityContext.windowsOptions.hostProcess",
                "securityContext.windowsOptions.hostProcess must be false".into(),
            ));
        }
    }
}
