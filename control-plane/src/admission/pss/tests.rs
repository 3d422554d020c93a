//! The controls case by case. Every case starts from one pod that passes `restricted`
//! (runAsNonRoot and seccomp set only at pod level, so its three containers inherit
//! them), changes one thing, and expects exactly the listed violations. Container
//! cases run for the init container, the container and the ephemeral container alike.
//! Where a case mirrors upstream's fixtures (`test/fixtures_*.go`, release-1.33) the
//! comment says so.

use k8s_openapi::api::core::v1::PodSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::{Value, json};

use super::{Level, Violation, check};

const CONTAINERS: [(&str, &str); 3] = [
    ("initContainers", "init"),
    ("containers", "app"),
    ("ephemeralContainers", "debug"),
];

fn base_pod() -> Value {
    let sc = json!({"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}});
    json!({
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {
            "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
            "initContainers": [{"name": "init", "image": "busybox", "securityContext": sc}],
            "containers": [{"name": "app", "image": "nginx", "securityContext": sc}],
            "ephemeralContainers": [{"name": "debug", "image": "busybox", "securityContext": sc}],
        },
    })
}

/// Sets the value at a JSON pointer, creating the objects on the way.
fn set(doc: &mut Value, pointer: &str, value: Value) {
    let mut at = doc;
    for part in pointer.trim_start_matches('/').split('/') {
        if at.is_null() {
            *at = json!({});
        }
        at = match at {
            Value::Array(items) => &mut items[part.parse::<usize>().unwrap()],
            Value::Object(map) => map.entry(part.replace("~1", "/")).or_insert(Value::Null),
            other => panic!("{pointer}: {other} is no container"),
        };
    }
    *at = value;
}

fn evaluate(level: Level, pod: &Value) -> Vec<Violation> {
    let meta: ObjectMeta = serde_json::from_value(pod["metadata"].clone()).unwrap();
    let spec: PodSpec = serde_json::from_value(pod["spec"].clone()).unwrap();
    check(level, &meta, &spec)
}

/// (control, container, field) of each violation, for comparison.
fn summary(violations: &[Violation]) -> Vec<(&'static str, Option<String>, String)> {
    violations
        .iter()
        .map(|v| (v.control, v.container.clone(), v.field.clone()))
        .collect()
}

#[test]
fn the_base_pod_passes_both_levels() {
    for level in [Level::Baseline, Level::Restricted] {
        assert_eq!(evaluate(level, &base_pod()), vec![], "{level:?}");
    }
}

/// A change to one container's field: (level, pointer under the container, JSON value
/// — `null` unsets it —, expected (control, field under the container) violations).
#[rustfmt::skip]
type ContainerCase = (Level, &'static str, &'static str, &'static [(&'static str, &'static str)]);

const B: Level = Level::Baseline;
const R: Level = Level::Restricted;

// One case a line: the table reads better than rustfmt's layout of it.
#[rustfmt::skip]
const CONTAINER_CASES: &[ContainerCase] = &[
    // privileged
    (B, "securityContext/privileged", "true", &[("privileged", "securityContext.privileged")]),
    (B, "securityContext/privileged", "false", &[]),
    (R, "securityContext/privileged", "true", &[("privileged", "securityContext.privileged")]),
    // capabilities_baseline: the default set may be added, nothing else; exact case,
    // no CAP_ prefix (upstream compares the strings as they are).
    (B, "securityContext/capabilities/add", r#"["NET_ADMIN"]"#, &[("capabilities_baseline", "securityContext.capabilities.add")]),
    (B, "securityContext/capabilities/add", r#"["NET_RAW"]"#, &[("capabilities_baseline", "securityContext.capabilities.add")]),
    (B, "securityContext/capabilities/add", r#"["chown"]"#, &[("capabilities_baseline", "securityContext.capabilities.add")]),
    (B, "securityContext/capabilities/add", r#"["CAP_CHOWN"]"#, &[("capabilities_baseline", "securityContext.capabilities.add")]),
    (
        B,
        "securityContext/capabilities/add",
        r#"["AUDIT_WRITE","CHOWN","DAC_OVERRIDE","FOWNER","FSETID","KILL","MKNOD","NET_BIND_SERVICE","SETFCAP","SETGID","SETPCAP","SETUID","SYS_CHROOT"]"#,
        &[],
    ),
    // ...and at restricted the restricted control replaces it (one violation, not two).
    (R, "securityContext/capabilities/add", r#"["NET_ADMIN"]"#, &[("capabilities_restricted", "securityContext.capabilities.add")]),
    // hostPorts: 0 is "unset"; every offending port by its index.
    (B, "ports", r#"[{"containerPort": 80, "hostPort": 8080}]"#, &[("hostPorts", "ports[0].hostPort")]),
    (B, "ports", r#"[{"containerPort": 80, "hostPort": 0}]"#, &[]),
    (B, "ports", r#"[{"containerPort": 80}]"#, &[]),
    (
        B,
        "ports",
        r#"[{"containerPort": 80, "hostPort": 80}, {"containerPort": 81}, {"containerPort": 82, "hostPort": 82}]"#,
        &[("hostPorts", "ports[0].hostPort"), ("hostPorts", "ports[2].hostPort")],
    ),
    // procMount: only Default; the empty string is not Default.
    (B, "securityContext/procMount", r#""Unmasked""#, &[("procMount", "securityContext.procMount")]),
    (B, "securityContext/procMount", r#""""#, &[("procMount", "securityContext.procMount")]),
    (B, "securityContext/procMount", r#""Default""#, &[]),
    // seLinuxOptions: the type list of 1.31+ (container_engine_t), empty strings are unset.
    (B, "securityContext/seLinuxOptions", r#"{"type": "spc_t"}"#, &[("seLinuxOptions", "securityContext.seLinuxOptions.type")]),
    (B, "securityContext/seLinuxOptions", r#"{"type": "container_engine_t"}"#, &[]),
    (B, "securityContext/seLinuxOptions", r#"{"type": "container_kvm_t", "level": "s0:c123,c456"}"#, &[]),
    (B, "securityContext/seLinuxOptions", r#"{"type": "", "user": "", "role": ""}"#, &[]),
    (B, "securityContext/seLinuxOptions", r#"{"user": "system_u"}"#, &[("seLinuxOptions", "securityContext.seLinuxOptions.user")]),
    (
        B,
        "securityContext/seLinuxOptions",
        r#"{"type": "unconfined_t", "role": "sysadm_r"}"#,
        &[("seLinuxOptions", "securityContext.seLinuxOptions.type"), ("seLinuxOptions", "securityContext.seLinuxOptions.role")],
    ),
    // seccompProfile_baseline: Unconfined (and the empty type) fail where set.
    (B, "securityContext/seccompProfile", r#"{"type": "Unconfined"}"#, &[("seccompProfile_baseline", "securityContext.seccompProfile.type")]),
    (B, "securityContext/seccompProfile", r#"{"type": ""}"#, &[("seccompProfile_baseline", "securityContext.seccompProfile.type")]),
    (B, "securityContext/seccompProfile", r#"{"type": "Localhost", "localhostProfile": "p.json"}"#, &[]),
    // appArmorProfile, the field.
    (B, "securityContext/appArmorProfile", r#"{"type": "Unconfined"}"#, &[("appArmorProfile", "securityContext.appArmorProfile.type")]),
    (B, "securityContext/appArmorProfile", r#"{"type": "RuntimeDefault"}"#, &[]),
    (B, "securityContext/appArmorProfile", r#"{"type": "Localhost", "localhostProfile": "k8s-nginx"}"#, &[]),
    // windowsHostProcess (upstream's fixture: true for containers fails).
    (B, "securityContext/windowsOptions/hostProcess", "true", &[("windowsHostProcess", "securityContext.windowsOptions.hostProcess")]),
    (B, "securityContext/windowsOptions/hostProcess", "false", &[]),
    // allowPrivilegeEscalation: must be explicitly false.
    (R, "securityContext/allowPrivilegeEscalation", "true", &[("allowPrivilegeEscalation", "securityContext.allowPrivilegeEscalation")]),
    (R, "securityContext/allowPrivilegeEscalation", "null", &[("allowPrivilegeEscalation", "securityContext.allowPrivilegeEscalation")]),
    (B, "securityContext/allowPrivilegeEscalation", "true", &[]),
    // capabilities_restricted (upstream's fixtures: an empty drop, dropping every
    // capability by name, adding back the default set all fail).
    (R, "securityContext/capabilities/drop", "[]", &[("capabilities_restricted", "securityContext.capabilities.drop")]),
    (R, "securityContext/capabilities/drop", r#"["all"]"#, &[("capabilities_restricted", "securityContext.capabilities.drop")]),
    (
        R,
        "securityContext/capabilities/drop",
        r#"["CHOWN","DAC_OVERRIDE","FOWNER","FSETID","KILL","MKNOD","NET_RAW","SETGID","SETUID","SETFCAP","SETPCAP","NET_BIND_SERVICE","SYS_CHROOT","AUDIT_WRITE","SYS_ADMIN","NET_ADMIN"]"#,
        &[("capabilities_restricted", "securityContext.capabilities.drop")],
    ),
    (R, "securityContext/capabilities/drop", r#"["NET_RAW", "ALL"]"#, &[]),
    (R, "securityContext/capabilities", "null", &[("capabilities_restricted", "securityContext.capabilities.drop")]),
    (R, "securityContext/capabilities/add", r#"["NET_BIND_SERVICE"]"#, &[]),
    (R, "securityContext/capabilities/add", r#"["CHOWN", "NET_BIND_SERVICE"]"#, &[("capabilities_restricted", "securityContext.capabilities.add")]),
    (B, "securityContext/capabilities", "null", &[]),
    // A container without any securityContext.
    (
        R,
        "securityContext",
        "null",
        &[
            ("allowPrivilegeEscalation", "securityContext.allowPrivilegeEscalation"),
            ("capabilities_restricted", "securityContext.capabilities.drop"),
        ],
    ),
    (B, "securityContext", "null", &[]),
    // runAsNonRoot: a container's explicit false fails although the pod says true.
    (R, "securityContext/runAsNonRoot", "false", &[("runAsNonRoot", "securityContext.runAsNonRoot")]),
    (R, "securityContext/runAsNonRoot", "true", &[]),
    (B, "securityContext/runAsNonRoot", "false", &[]),
    // runAsUser: 0 fails, any other uid passes.
    (R, "securityContext/runAsUser", "0", &[("runAsUser", "securityContext.runAsUser")]),
    (R, "securityContext/runAsUser", "1000", &[]),
    (B, "securityContext/runAsUser", "0", &[]),
    // seccompProfile_restricted replaces the baseline control: one violation.
    (R, "securityContext/seccompProfile", r#"{"type": "Unconfined"}"#, &[("seccompProfile_restricted", "securityContext.seccompProfile.type")]),
    (R, "securityContext/seccompProfile", r#"{"type": ""}"#, &[("seccompProfile_restricted", "securityContext.seccompProfile.type")]),
    (R, "securityContext/seccompProfile", r#"{"type": "Localhost", "localhostProfile": "p.json"}"#, &[]),
];

#[test]
fn container_controls_for_every_kind_of_container() {
    for (level, pointer, value, want) in CONTAINER_CASES {
        for (list, name) in CONTAINERS {
            let mut pod = base_pod();
            let value: Value = serde_json::from_str(value).unwrap();
            set(
                &mut pod,
                &format!("/spec/{list}/0/{pointer}"),
                value.clone(),
            );
            let got = evaluate(*level, &pod);
            let want: Vec<_> = want
                .iter()
                .map(|(control, rest)| {
                    (
                        *control,
                        Some(name.to_string()),
                        format!("spec.{list}[0].{rest}"),
                    )
                })
                .collect();
            assert_eq!(
                summary(&got),
                want,
                "{level:?} {list}/0/{pointer} = {value}: {got:#?}"
            );
            // The message is relative to the container and the Display names it.
            for v in &got {
                assert!(
                    v.to_string().starts_with(&format!("container {name:?}: ")),
                    "{v}"
                );
                let rest = v.field.split_once("].").unwrap().1;
                assert!(v.message.starts_with(rest), "{v:?}");
            }
        }
    }
}

/// A change to the pod: (level, pointer, JSON value, expected (control, container, field)).
type PodCase = (
    Level,
    &'static str,
    &'static str,
    &'static [(&'static str, Option<&'static str>, &'static str)],
);

#[rustfmt::skip]
const POD_CASES: &[PodCase] = &[
    // hostNamespaces
    (B, "/spec/hostNetwork", "true", &[("hostNamespaces", None, "spec.hostNetwork")]),
    (B, "/spec/hostPID", "true", &[("hostNamespaces", None, "spec.hostPID")]),
    (R, "/spec/hostIPC", "true", &[("hostNamespaces", None, "spec.hostIPC")]),
    (B, "/spec/hostNetwork", "false", &[]),
    // hostPathVolumes at baseline; restrictedVolumes replaces it at restricted.
    (B, "/spec/volumes", r#"[{"name": "host", "hostPath": {"path": "/var/run"}}]"#, &[("hostPathVolumes", None, "spec.volumes[0].hostPath")]),
    (R, "/spec/volumes", r#"[{"name": "host", "hostPath": {"path": "/var/run"}}]"#, &[("restrictedVolumes", None, "spec.volumes[0].hostPath")]),
    (B, "/spec/volumes", r#"[{"name": "nfs", "nfs": {"server": "nfs.local", "path": "/"}}]"#, &[]),
    (R, "/spec/volumes", r#"[{"name": "nfs", "nfs": {"server": "nfs.local", "path": "/"}}]"#, &[("restrictedVolumes", None, "spec.volumes[0].nfs")]),
    (R, "/spec/volumes", r#"[{"name": "git", "gitRepo": {"repository": "https://example.com/r"}}]"#, &[("restrictedVolumes", None, "spec.volumes[0].gitRepo")]),
    (R, "/spec/volumes", r#"[{"name": "disk", "awsElasticBlockStore": {"volumeID": "vol-1"}}]"#, &[("restrictedVolumes", None, "spec.volumes[0].awsElasticBlockStore")]),
    // A volume with no source at all: upstream's "unknown" type.
    (R, "/spec/volumes", r#"[{"name": "nothing"}]"#, &[("restrictedVolumes", None, "spec.volumes[0]")]),
    // Every allowed volume type at restricted.
    (
        R,
        "/spec/volumes",
        r#"[
            {"name": "a", "configMap": {"name": "cm"}},
            {"name": "b", "csi": {"driver": "csi.example.com"}},
            {"name": "c", "downwardAPI": {}},
            {"name": "d", "emptyDir": {}},
            {"name": "e", "ephemeral": {"volumeClaimTemplate": {"spec": {"accessModes": ["ReadWriteOnce"]}}}},
            {"name": "f", "image": {"reference": "registry.example/data:1"}},
            {"name": "g", "persistentVolumeClaim": {"claimName": "pvc"}},
            {"name": "h", "projected": {"sources": []}},
            {"name": "i", "secret": {"secretName": "s"}}
        ]"#,
        &[],
    ),
    (
        R,
        "/spec/volumes",
        r#"[{"name": "ok", "emptyDir": {}}, {"name": "host", "hostPath": {"path": "/"}}, {"name": "rbd", "rbd": {"monitors": ["m"], "image": "i"}}]"#,
        &[("restrictedVolumes", None, "spec.volumes[1].hostPath"), ("restrictedVolumes", None, "spec.volumes[2].rbd")],
    ),
    // sysctls: the safe set of 1.32 (tcp_rmem) and 1.27 (ip_local_reserved_ports)
    // passes; 1.37's additions are not safe at 1.33.
    (
        B,
        "/spec/securityContext/sysctls",
        r#"[{"name": "net.ipv4.tcp_rmem", "value": "4096 87380 6291456"}, {"name": "net.ipv4.ip_local_reserved_ports", "value": "8080"}, {"name": "net.ipv4.tcp_keepalive_time", "value": "60"}]"#,
        &[],
    ),
    (
        B,
        "/spec/securityContext/sysctls",
        r#"[{"name": "kernel.shm_rmid_forced", "value": "1"}, {"name": "kernel.msgmax", "value": "1"}, {"name": "net.ipv4.tcp_notsent_lowat", "value": "1"}]"#,
        &[("sysctls", None, "spec.securityContext.sysctls[1].name"), ("sysctls", None, "spec.securityContext.sysctls[2].name")],
    ),
    // seLinuxOptions at pod level.
    (B, "/spec/securityContext/seLinuxOptions", r#"{"type": "spc_t"}"#, &[("seLinuxOptions", None, "spec.securityContext.seLinuxOptions.type")]),
    (B, "/spec/securityContext/seLinuxOptions", r#"{"type": "container_t", "level": "s0"}"#, &[]),
    // appArmorProfile at pod level and as the beta annotation (upstream's fixtures:
    // runtime/default and localhost/foo pass, unconfined fails).
    (B, "/spec/securityContext/appArmorProfile", r#"{"type": "Unconfined"}"#, &[("appArmorProfile", None, "spec.securityContext.appArmorProfile.type")]),
    (B, "/spec/securityContext/appArmorProfile", r#"{"type": "RuntimeDefault"}"#, &[]),
    (
        B,
        "/metadata/annotations",
        r#"{"container.apparmor.security.beta.kubernetes.io/app": "unconfined", "container.apparmor.security.beta.kubernetes.io/init": "runtime/default", "container.apparmor.security.beta.kubernetes.io/debug": "localhost/foo"}"#,
        &[("appArmorProfile", None, r#"metadata.annotations["container.apparmor.security.beta.kubernetes.io/app"]"#)],
    ),
    (B, "/metadata/annotations", r#"{"container.apparmor.security.beta.kubernetes.io/app": ""}"#, &[]),
    // Since 1.19 the seccomp alpha annotations are not looked at.
    (B, "/metadata/annotations", r#"{"seccomp.security.alpha.kubernetes.io/pod": "unconfined"}"#, &[]),
    // windowsHostProcess at pod level (upstream's fixture).
    (B, "/spec/securityContext/windowsOptions", r#"{"hostProcess": true}"#, &[("windowsHostProcess", None, "spec.securityContext.windowsOptions.hostProcess")]),
    // seccomp at pod level: absent is fine for baseline; for restricted every container
    // must then set it (upstream's fixtures: unset everywhere fails); Unconfined at
    // pod level is reported once, not again for the containers inheriting it.
    (B, "/spec/securityContext/seccompProfile", "null", &[]),
    (
        R,
        "/spec/securityContext/seccompProfile",
        "null",
        &[
            ("seccompProfile_restricted", Some("init"), "spec.initContainers[0].securityContext.seccompProfile.type"),
            ("seccompProfile_restricted", Some("app"), "spec.containers[0].securityContext.seccompProfile.type"),
            ("seccompProfile_restricted", Some("debug"), "spec.ephemeralContainers[0].securityContext.seccompProfile.type"),
        ],
    ),
    (B, "/spec/securityContext/seccompProfile", r#"{"type": "Unconfined"}"#, &[("seccompProfile_baseline", None, "spec.securityContext.seccompProfile.type")]),
    (R, "/spec/securityContext/seccompProfile", r#"{"type": "Unconfined"}"#, &[("seccompProfile_restricted", None, "spec.securityContext.seccompProfile.type")]),
    (R, "/spec/securityContext/seccompProfile", r#"{"type": "Localhost", "localhostProfile": "p.json"}"#, &[]),
    // runAsNonRoot at pod level: unset → every container that does not set it.
    (
        R,
        "/spec/securityContext/runAsNonRoot",
        "null",
        &[
            ("runAsNonRoot", Some("init"), "spec.initContainers[0].securityContext.runAsNonRoot"),
            ("runAsNonRoot", Some("app"), "spec.containers[0].securityContext.runAsNonRoot"),
            ("runAsNonRoot", Some("debug"), "spec.ephemeralContainers[0].securityContext.runAsNonRoot"),
        ],
    ),
    (R, "/spec/securityContext/runAsNonRoot", "false", &[("runAsNonRoot", None, "spec.securityContext.runAsNonRoot")]),
    (R, "/spec/securityContext/runAsUser", "0", &[("runAsUser", None, "spec.securityContext.runAsUser")]),
    (R, "/spec/securityContext/runAsUser", "1000", &[]),
    // Windows pods (spec.os.name): upstream skips allowPrivilegeEscalation,
    // capabilities and seccomp at restricted, and with them the baseline capabilities
    // and seccomp controls they override.
    (R, "/spec/os", r#"{"name": "windows"}"#, &[]),
    (R, "/spec/os", r#"{"name": "linux"}"#, &[]),
];

#[test]
fn pod_controls() {
    for (level, pointer, value, want) in POD_CASES {
        let mut pod = base_pod();
        let value: Value = serde_json::from_str(value).unwrap();
        set(&mut pod, pointer, value.clone());
        let got = evaluate(*level, &pod);
        let want: Vec<_> = want
            .iter()
            .map(|(control, container, field)| {
                (*control, container.map(String::from), field.to_string())
            })
            .collect();
        assert_eq!(
            summary(&got),
            want,
            "{level:?} {pointer} = {value}: {got:#?}"
        );
    }
}

#[test]
fn pod_level_settings_are_inherited_and_containers_may_set_their_own() {
    // No pod-level runAsNonRoot or seccomp: a container setting both passes, the
    // others are named.
    let mut pod = base_pod();
    set(&mut pod, "/spec/securityContext", json!(null));
    set(
        &mut pod,
        "/spec/containers/0/securityContext/runAsNonRoot",
        json!(true),
    );
    set(
        &mut pod,
        "/spec/containers/0/securityContext/seccompProfile",
        json!({"type": "RuntimeDefault"}),
    );
    let got = evaluate(Level::Restricted, &pod);
    let names: Vec<_> = got
        .iter()
        .map(|v| (v.control, v.container.as_deref().unwrap()))
        .collect();
    assert_eq!(
        names,
        [
            ("runAsNonRoot", "init"),
            ("runAsNonRoot", "debug"),
            ("seccompProfile_restricted", "init"),
            ("seccompProfile_restricted", "debug"),
        ]
    );
    // Every container setting its own: the pod needs nothing.
    for (list, _) in CONTAINERS {
        set(
            &mut pod,
            &format!("/spec/{list}/0/securityContext/runAsNonRoot"),
            json!(true),
        );
        set(
            &mut pod,
            &format!("/spec/{list}/0/securityContext/seccompProfile"),
            json!({"type": "Localhost", "localhostProfile": "p"}),
        );
    }
    assert_eq!(evaluate(Level::Restricted, &pod), vec![]);
    // A pod-level Unconfined fails even when every container sets its own valid
    // profile (upstream's fixture "unconfined, pod-level").
    set(
        &mut pod,
        "/spec/securityContext/seccompProfile",
        json!({"type": "Unconfined"}),
    );
    let got = evaluate(Level::Restricted, &pod);
    assert_eq!(
        summary(&got),
        [(
            "seccompProfile_restricted",
            None,
            "spec.securityContext.seccompProfile.type".to_string()
        )]
    );
}

#[test]
fn windows_pods_skip_what_upstream_skips_and_nothing_else() {
    let mut pod = base_pod();
    set(&mut pod, "/spec/os", json!({"name": "windows"}));
    for (list, _) in CONTAINERS {
        set(
            &mut pod,
            &format!("/spec/{list}/0/securityContext"),
            json!({"capabilities": {"add": ["NET_ADMIN"]}}),
        );
    }
    set(
        &mut pod,
        "/spec/securityContext/seccompProfile",
        json!({"type": "Unconfined"}),
    );
    // restricted: capabilities, seccomp and allowPrivilegeEscalation are not checked
    // for Windows pods — neither are the baseline controls they override.
    assert_eq!(evaluate(Level::Restricted, &pod), vec![]);
    // baseline still checks both.
    let got = evaluate(Level::Baseline, &pod);
    let controls: Vec<_> = got.iter().map(|v| v.control).collect();
    assert_eq!(
        controls,
        [
            "capabilities_baseline",
            "capabilities_baseline",
            "capabilities_baseline",
            "seccompProfile_baseline"
        ]
    );
    // hostProcess and runAsNonRoot still apply to Windows pods at restricted.
    set(
        &mut pod,
        "/spec/securityContext/windowsOptions",
        json!({"hostProcess": true}),
    );
    set(&mut pod, "/spec/securityContext/runAsNonRoot", json!(false));
    let got = evaluate(Level::Restricted, &pod);
    let controls: Vec<_> = got.iter().map(|v| v.control).collect();
    assert_eq!(controls, ["windowsHostProcess", "runAsNonRoot"]);
}

#[test]
fn user_namespaces_relax_nothing_at_1_33() {
    // Upstream relaxes runAsNonRoot, runAsUser and procMount for hostUsers: false at
    // 1.33 only behind the alpha gate UserNamespacesPodSecurityStandards (off).
    let mut pod = base_pod();
    set(&mut pod, "/spec/hostUsers", json!(false));
    set(&mut pod, "/spec/securityContext/runAsUser", json!(0));
    set(
        &mut pod,
        "/spec/containers/0/securityContext/procMount",
        json!("Unmasked"),
    );
    let got = evaluate(Level::Restricted, &pod);
    let controls: Vec<_> = got.iter().map(|v| v.control).collect();
    assert_eq!(controls, ["procMount", "runAsUser"]);
}

#[test]
fn every_violation_in_upstream_order_with_messages_naming_the_values() {
    let pod = json!({
        "metadata": {"name": "bad", "annotations": {"container.apparmor.security.beta.kubernetes.io/app": "unconfined"}},
        "spec": {
            "hostNetwork": true,
            "hostPID": true,
            "securityContext": {"sysctls": [{"name": "kernel.msgmax", "value": "1"}], "runAsUser": 0},
            "volumes": [{"name": "docker", "hostPath": {"path": "/var/run/docker.sock"}}],
            "containers": [{
                "name": "app", "image": "nginx",
                "ports": [{"containerPort": 80, "hostPort": 80}],
                "securityContext": {
                    "privileged": true,
                    "capabilities": {"add": ["NET_ADMIN", "SYS_TIME", "NET_ADMIN", "CHOWN"]},
                    "seLinuxOptions": {"type": "spc_t"},
                    "seccompProfile": {"type": "Unconfined"},
                    "procMount": "Unmasked",
                    "runAsNonRoot": false,
                },
            }],
        },
    });
    let baseline: Vec<String> = evaluate(Level::Baseline, &pod)
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        baseline,
        [
            r#"annotation container.apparmor.security.beta.kubernetes.io/app must be runtime/default or localhost/<profile>, not "unconfined""#,
            r#"container "app": securityContext.capabilities.add must not include "NET_ADMIN", "SYS_TIME" (only the runtime's default capabilities)"#,
            "spec.hostNetwork must be false",
            "spec.hostPID must be false",
            r#"volume "docker" must not be a hostPath volume (path "/var/run/docker.sock")"#,
            r#"container "app": ports[0].hostPort must be unset or 0, not 80"#,
            r#"container "app": securityContext.privileged must be false"#,
            r#"container "app": securityContext.procMount must be Default or unset, not "Unmasked""#,
            r#"container "app": securityContext.seLinuxOptions.type must be empty, container_t, container_init_t, container_kvm_t or container_engine_t, not "spc_t""#,
            r#"container "app": securityContext.seccompProfile.type must be RuntimeDefault or Localhost, not "Unconfined""#,
            r#"spec.securityContext.sysctls[0]: sysctl "kernel.msgmax" is not allowed"#,
        ]
    );
    let restricted: Vec<String> = evaluate(Level::Restricted, &pod)
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        restricted,
        [
            r#"annotation container.apparmor.security.beta.kubernetes.io/app must be runtime/default or localhost/<profile>, not "unconfined""#,
            "spec.hostNetwork must be false",
            "spec.hostPID must be false",
            r#"container "app": ports[0].hostPort must be unset or 0, not 80"#,
            r#"container "app": securityContext.privileged must be false"#,
            r#"container "app": securityContext.procMount must be Default or unset, not "Unmasked""#,
            r#"container "app": securityContext.seLinuxOptions.type must be empty, container_t, container_init_t, container_kvm_t or container_engine_t, not "spc_t""#,
            r#"spec.securityContext.sysctls[0]: sysctl "kernel.msgmax" is not allowed"#,
            r#"container "app": securityContext.allowPrivilegeEscalation must be false"#,
            r#"container "app": securityContext.capabilities.drop must include "ALL""#,
            r#"container "app": securityContext.capabilities.add must not include "NET_ADMIN", "SYS_TIME", "CHOWN" (only "NET_BIND_SERVICE")"#,
            r#"volume "docker" must not use the restricted volume type hostPath"#,
            r#"container "app": securityContext.runAsNonRoot must be true, not false"#,
            "spec.securityContext.runAsUser must not be 0",
            r#"container "app": securityContext.seccompProfile.type must be RuntimeDefault or Localhost, not "Unconfined""#,
        ]
    );
}

#[test]
fn peer_supplied_strings_are_escaped_in_messages() {
    let mut pod = base_pod();
    set(
        &mut pod,
        "/spec/containers/0/securityContext/procMount",
        json!("Unmasked\n[INFO] forged"),
    );
    let got = evaluate(Level::Baseline, &pod);
    assert_eq!(got.len(), 1);
    assert!(!got[0].to_string().contains('\n'), "{}", got[0]);
    assert!(
        got[0].message.contains(r#""Unmasked\n[INFO] forged""#),
        "{}",
        got[0]
    );
}
