//! One container as a process, the way a runtime sets it up, with util-linux instead of
//! runc (no `unsafe`, no `pre_exec`):
//!
//! ```text
//! ip netns exec <pod netns>          the pod's network; a mount namespace of its own,
//!                                    slave to the host's (mounts never propagate back)
//!   sh -c 'mount --bind [-o ro] VOLUME MOUNTPATH …; exec env -C WORKDIR setpriv … -- "$@"'
//!     env -C WORKDIR                 the working directory, after the mounts
//!     setpriv --reuid U --regid G --clear-groups|--groups …
//!             --bounding-set -all,+cap… --inh-caps -all [--no-new-privs]
//!       <command> <args>             looked up in the image's PATH, environment cleared
//! ```
//!
//! `ip netns exec`, `sh`, `env` and `setpriv` each exec the next, so the child's pid is the
//! container's own process. It runs in a process group of its own: the container's
//! processes die together, as a runtime kills a container's cgroup.
//!
//! Capabilities as containerd sets them: the runtime's default set, `add: [ALL]` all of
//! them, `drop: [ALL]` none, then each named one added or dropped; that set is the
//! bounding set, inheritable and ambient are empty. So root gets exactly that set, a
//! non-root user none (runc gives no ambient capabilities, and exec clears the rest).
//!
//! Mount points: a `mountPath` inside another of the container's mounts is made inside
//! that volume by the setup script, after the outer mount. Any other `mountPath` that does not exist on this machine is created (empty
//! directories, or an empty file for a file's subPath) before the container starts, and
//! removed when the last pod of this test process using it stops (a process-wide
//! count: removing a mount point detaches it in every namespace, so a pod still using
//! it must keep it). Only what this process created is removed, deepest first, and only
//! while empty. A test process that is killed leaves those empty entries behind.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::{Capabilities, Container, PodSecurityContext};

/// The capabilities containerd gives a container by default.
const DEFAULT_CAPS: [&str; 14] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

/// Every capability Linux knows (the names of `capabilities(7)`, without `CAP_`).
const ALL_CAPS: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// Who a container runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    /// The bounding set, upper case without `CAP_`.
    pub capabilities: Vec<String>,
    pub no_new_privs: bool,
}

/// The container's identity from its securityContext over the pod's.
pub fn identity(
    container: &Container,
    pod: Option<&PodSecurityContext>,
) -> anyhow::Result<Identity> {
    let sc = container.security_context.as_ref();
    let id = |v: Option<i64>, field: &str| -> anyhow::Result<Option<u32>> {
        v.map(|v| {
            u32::try_from(v).with_context(|| format!("securityContext.{field} {v} is not a uid"))
        })
        .transpose()
    };
    if sc.and_then(|s| s.privileged) == Some(true) {
        bail!("securityContext.privileged is not supported by the harness");
    }
    let uid = id(sc.and_then(|s| s.run_as_user), "runAsUser")?
        .or(id(pod.and_then(|p| p.run_as_user), "runAsUser")?)
        // No image user: root, as an image without USER.
        .unwrap_or(0);
    let gid = id(sc.and_then(|s| s.run_as_group), "runAsGroup")?
        .or(id(pod.and_then(|p| p.run_as_group), "runAsGroup")?)
        // containerd takes the user's group from the image's /etc/passwd; there is no
        // image file system here, so 0 as for a uid it does not list.
        .unwrap_or(0);
    let run_as_non_root = sc
        .and_then(|s| s.run_as_non_root)
        .or(pod.and_then(|p| p.run_as_non_root));
    if run_as_non_root == Some(true) && uid == 0 {
        bail!("runAsNonRoot is set but the container would run as root (uid 0)");
    }
    let mut groups: Vec<u32> = Vec::new();
    for g in pod
        .and_then(|p| p.supplemental_groups.clone())
        .unwrap_or_default()
        .into_iter()
        .chain(pod.and_then(|p| p.fs_group))
    {
        let g = u32::try_from(g).with_context(|| format!("group {g} is not a gid"))?;
        if !groups.contains(&g) {
            groups.push(g);
        }
    }
    Ok(Identity {
        uid,
        gid,
        groups,
        capabilities: capability_set(sc.and_then(|s| s.capabilities.as_ref()))?,
        no_new_privs: sc.and_then(|s| s.allow_privilege_escalation) == Some(false),
    })
}

/// containerd's `WithCapabilities`: the default set, then ALL added or dropped, then each
/// named one.
fn capability_set(caps: Option<&Capabilities>) -> anyhow::Result<Vec<String>> {
    let mut set: Vec<String> = DEFAULT_CAPS.iter().map(|c| c.to_string()).collect();
    let Some(caps) = caps else {
        return Ok(set);
    };
    let normal = |c: &String, field: &str| -> anyhow::Result<String> {
        let name = c.to_ascii_uppercase();
        let name = name.strip_prefix("CAP_").unwrap_or(&name).to_string();
        if name != "ALL" && !ALL_CAPS.contains(&name.as_str()) {
            bail!("securityContext.capabilities.{field}: unknown capability {c:?}");
        }
        Ok(name)
    };
    let add: Vec<String> = caps
        .add
        .iter()
        .flatten()
        .map(|c| normal(c, "add"))
        .collect::<anyhow::Result<_>>()?;
    let drop: Vec<String> = caps
        .drop
        .iter()
        .flatten()
        .map(|c| normal(c, "drop"))
        .collect::<anyhow::Result<_>>()?;
    if add.iter().any(|c| c == "ALL") {
        set = ALL_CAPS.iter().map(|c| c.to_string()).collect();
    }
    if drop.iter().any(|c| c == "ALL") {
        set.clear();
    }
    for c in add.iter().filter(|c| *c != "ALL") {
        if !set.contains(c) {
            set.push(c.clone());
        }
    }
    set.retain(|c| !drop.contains(c));
    Ok(set)
}

/// A bind mount of a volume (or a path in it) into the container.
#[derive(Debug, Clone)]
pub struct Mount {
    pub source: PathBuf,
    pub target: PathBuf,
    pub read_only: bool,
}

/// Absolute paths of the programs the setup runs (the container's own PATH is the
/// image's, which need not hold them).
#[derive(Debug, Clone)]
pub struct Tools {
    ip: PathBuf,
    sh: PathBuf,
    mount: PathBuf,
    setpriv: PathBuf,
    env: PathBuf,
}

impl Tools {
    pub fn find() -> anyhow::Result<Tools> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let find = |tool: &str, package: &str| -> anyhow::Result<PathBuf> {
            std::env::split_paths(&path)
                .map(|dir| dir.join(tool))
                .find(|p| p.is_file())
                .with_context(|| {
                    format!("the kubelet harness needs `{tool}` (apt-get install -y {package})")
                })
        };
        Ok(Tools {
            ip: find("ip", "iproute2")?,
            sh: find("sh", "dash")?,
            mount: find("mount", "mount")?,
            setpriv: find("setpriv", "util-linux")?,
            env: find("env", "coreutils")?,
        })
    }
}

/// What one container process is started with.
pub struct Launch<'a> {
    pub netns: &'a str,
    pub mounts: &'a [Mount],
    pub working_dir: &'a str,
    pub identity: &'a Identity,
    pub argv: &'a [String],
    pub env: &'a [(String, String)],
    pub log: &'a Path,
}

/// The command that runs `argv` as the container: in `netns`, with `mounts`, as
/// `identity`, with exactly `env`, output appended to `log`.
pub fn command(tools: &Tools, launch: &Launch<'_>) -> anyhow::Result<tokio::process::Command> {
    let Launch {
        netns,
        mounts,
        working_dir,
        identity,
        argv,
        env,
        log,
    } = launch;
    let mut script = String::from("set -e\n");
    if !env.iter().any(|(name, _)| name == "PWD") {
        // The shell exports the PWD it starts in; the container gets only its env.
        script.push_str("unset PWD\n");
    }
    // Parents before what is mounted inside them, as containerd sorts mounts; a mount
    // point inside an earlier mount is made there (in the volume), not on this machine.
    let mut mounts = mounts.to_vec();
    mounts.sort_by_key(|m| m.target.components().count());
    for (i, m) in mounts.iter().enumerate() {
        if mounts[..i].iter().any(|p| m.target.starts_with(&p.target)) {
            let make = if m.source.is_dir() {
                "mkdir -p --"
            } else {
                "touch --"
            };
            script.push_str(&format!(
                "test -e {0} || {make} {0}\n",
                quote(m.target.as_os_str())
            ));
        }
        script.push_str(&format!(
            "{} --bind {}-- {} {}\n",
            quote(tools.mount.as_os_str()),
            if m.read_only { "-o ro " } else { "" },
            quote(m.source.as_os_str()),
            quote(m.target.as_os_str()),
        ));
    }
    let ids = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let groups = if identity.groups.is_empty() {
        "--clear-groups".to_string()
    } else {
        format!("--groups {}", ids(&identity.groups))
    };
    let bounding: String = std::iter::once("-all".to_string())
        .chain(
            identity
                .capabilities
                .iter()
                .map(|c| format!("+{}", c.to_ascii_lowercase())),
        )
        .collect::<Vec<_>>()
        .join(",");
    script.push_str(&format!(
        "exec {} -C {} {} --reuid {} --regid {} {groups} --bounding-set {bounding} --inh-caps -all {}-- \"$@\"\n",
        // `env -C`, not the shell's `cd`, which would export PWD and OLDPWD.
        quote(tools.env.as_os_str()),
        quote(working_dir.as_ref()),
        quote(tools.setpriv.as_os_str()),
        identity.uid,
        identity.gid,
        if identity.no_new_privs {
            "--no-new-privs "
        } else {
            ""
        },
    ));
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    let mut cmd = tokio::process::Command::new(&tools.ip);
    cmd.args(["netns", "exec", netns])
        .arg(&tools.sh)
        .arg("-c")
        .arg(script)
        .arg("sh")
        .args(*argv)
        .env_clear()
        // Nothing of the test's working directory reaches the container.
        .current_dir("/")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .process_group(0)
        .kill_on_drop(true);
    Ok(cmd)
}

/// `s` as one word for `sh`.
fn quote(s: &std::ffi::OsStr) -> String {
    format!("'{}'", s.to_string_lossy().replace('\'', r"'\''"))
}

/// Paths this test process created as mount points, with how many pods use each.
static CREATED: Mutex<Option<HashMap<PathBuf, usize>>> = Mutex::new(None);

/// Mount points one pod holds (see the module doc); released on drop.
#[derive(Debug, Default)]
pub struct MountPoints {
    held: Vec<PathBuf>,
}

impl MountPoints {
    /// Makes `target` exist (a file if `file`), creating what is missing.
    pub fn ensure(&mut self, target: &Path, file: bool) -> anyhow::Result<()> {
        anyhow::ensure!(
            target.is_absolute(),
            "mountPath {} is not absolute",
            target.display()
        );
        let mut guard = CREATED.lock().unwrap_or_else(|e| e.into_inner());
        let created = guard.get_or_insert_with(HashMap::new);
        let mut path = PathBuf::from("/");
        let components: Vec<_> = target.components().skip(1).collect();
        for (i, component) in components.iter().enumerate() {
            path.push(component);
            let last = i + 1 == components.len();
            if let Some(users) = created.get_mut(&path) {
                *users += 1;
                self.held.push(path.clone());
                continue;
            }
            if std::fs::symlink_metadata(&path).is_ok() {
                continue;
            }
            if last && file {
                std::fs::File::create(&path).map(drop)
            } else {
                std::fs::create_dir(&path)
            }
            .with_context(|| format!("cannot create mount point {}", path.display()))?;
            created.insert(path.clone(), 1);
            self.held.push(path.clone());
        }
        Ok(())
    }
}

impl Drop for MountPoints {
    fn drop(&mut self) {
        let mut guard = CREATED.lock().unwrap_or_else(|e| e.into_inner());
        let created = guard.get_or_insert_with(HashMap::new);
        // Deepest first: children go before their parents.
        self.held
            .sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for path in self.held.drain(..) {
            let Some(users) = created.get_mut(&path) else {
                continue;
            };
            *users -= 1;
            if *users > 0 {
                continue;
            }
            created.remove(&path);
            let removed = if path.is_dir() && !path.is_symlink() {
                std::fs::remove_dir(&path)
            } else {
                std::fs::remove_file(&path)
            };
            if let Err(e) = removed {
                eprintln!(
                    "kubelet: cannot remove mount point {} it created: {e}",
                    path.display()
                );
            }
        }
    }
}

/// The container's argv: `command` (else the image's ENTRYPOINT) and `args` (else the
/// image's CMD, only when the ENTRYPOINT is the image's too), `$(VAR)`-expanded.
pub fn argv(
    container: &Container,
    entrypoint: &[String],
    cmd: &[String],
    env: &[(String, String)],
) -> anyhow::Result<Vec<String>> {
    let vars: std::collections::BTreeMap<String, String> = env.iter().cloned().collect();
    let (command, args): (Vec<String>, Vec<String>) = match (&container.command, &container.args) {
        (Some(command), args) => (command.clone(), args.clone().unwrap_or_default()),
        (None, Some(args)) => (entrypoint.to_vec(), args.clone()),
        (None, None) => (entrypoint.to_vec(), cmd.to_vec()),
    };
    let argv: Vec<String> = command
        .iter()
        .chain(&args)
        .map(|a| super::env::expand(a, &vars))
        .collect();
    if argv.is_empty() {
        bail!(
            "container {} has no command: neither the spec nor its image gives one",
            container.name
        );
    }
    Ok(argv)
}

/// The process's arguments for a log line.
pub fn describe(argv: &[String]) -> String {
    argv.iter()
        .map(|a| quote(a.as_ref()))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(add: &[&str], drop: &[&str]) -> Vec<String> {
        let c = Capabilities {
            add: Some(add.iter().map(|s| s.to_string()).collect()),
            drop: Some(drop.iter().map(|s| s.to_string()).collect()),
        };
        let mut set = capability_set(Some(&c)).unwrap();
        set.sort();
        set
    }

    #[test]
    fn capabilities_as_containerd_computes_them() {
        assert_eq!(
            caps(&["NET_ADMIN", "NET_RAW"], &["ALL"]),
            ["NET_ADMIN", "NET_RAW"]
        );
        assert!(caps(&[], &["ALL"]).is_empty());
        assert_eq!(caps(&["ALL"], &["CHOWN"]).len(), ALL_CAPS.len() - 1);
        let default = caps(&["CAP_NET_ADMIN"], &["NET_RAW"]);
        assert!(default.contains(&"NET_ADMIN".to_string()));
        assert!(!default.contains(&"NET_RAW".to_string()));
        assert!(default.contains(&"CHOWN".to_string()));
        let err = capability_set(Some(&Capabilities {
            add: Some(vec!["NET_ADMINN".into()]),
            drop: None,
        }))
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("add: unknown capability \"NET_ADMINN\"")
        );
    }
}
