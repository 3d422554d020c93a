//! A real sidecar for one pod, as a pod runs it: `meshd-agent run` in local mode
//! (its `--cert-dir` is what `meshctl bootstrap` wrote) or in token mode
//! ([`SidecarIdentity`]), which has meshd sign its own key and then runs a real Envoy
//! as its child. So every test that starts a sidecar exercises the agent too.
//!
//! The agent runs in a process group of its own, and the whole group (agent and
//! Envoy) is SIGKILLed when the sidecar is stopped or dropped: no test leaves an Envoy
//! behind, whatever happened to the agent. The group is signalled with nix's
//! `killpg`, never with the `kill` command and a negative pid (which once signalled
//! every process on this machine).
//!
//! In a lab pod ([`SidecarOptions::netns`]) the agent runs as a pod's sidecar does under
//! transparent capture: inside the pod's network namespace, as uid/gid
//! [`PROXY_UID`] (`setpriv`), whose traffic `meshd-agent init` exempts. Its directory
//! (bootstrap, its own `--dir`) and a hard link to the Envoy binary (the cache under
//! /root is closed to that uid) are then the proxy's own. The harness reaches Envoy's
//! admin port and the agent's health port on the pod's loopback from inside the
//! namespace.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tempfile::TempDir;
use tokio::process::{Child, Command};

use crate::mesh::PodDef;
use crate::meshd::{Meshd, XdsFlavor};
use crate::net::free_port;
use crate::netns::{Netns, PROXY_UID};
use crate::tools::{envoy_binary, meshd_binary};

#[derive(Debug)]
pub struct Sidecar {
    agent: Child,
    /// How the agent was started, to start it again ([`Sidecar::restart`]).
    command: Vec<std::ffi::OsString>,
    /// The agent's process group (its own pid), once known to be one worth signalling.
    group: Option<Pid>,
    pub node_id: String,
    pub admin_port: u16,
    /// The agent's `/healthz/ready` port on 127.0.0.1.
    pub health_port: u16,
    /// When the agent was (last) started, after `meshctl bootstrap`.
    pub started_at: tokio::time::Instant,
    work: TempDir,
    http: reqwest::Client,
    /// The lab namespace the sidecar runs in, if not this machine's.
    netns: Option<Netns>,
}

/// How the harness starts a sidecar; [`SidecarOptions::default`] is what
/// [`Sidecar::start`] uses.
#[derive(Debug, Clone)]
pub struct SidecarOptions {
    /// Extra arguments for Envoy (after the agent's `--`).
    pub envoy_args: Vec<String>,
    /// Extra arguments for `meshd-agent run`.
    pub agent_args: Vec<String>,
    /// Wait until Envoy is LIVE before returning.
    pub wait_live: bool,
    /// What the agent proves the pod's identity with.
    pub identity: SidecarIdentity,
    /// Where the agent (and so Envoy) reaches meshd, if not at `meshd.xds_addr`.
    pub xds_address: Option<std::net::SocketAddr>,
    /// Run in this lab pod's network namespace as uid [`PROXY_UID`].
    pub netns: Option<Netns>,
}

/// The agent's two modes.
#[derive(Debug, Clone, Default)]
pub enum SidecarIdentity {
    /// Local mode: `meshctl bootstrap`'s directory as `--cert-dir`, with these extra
    /// arguments for `meshctl bootstrap` (e.g. `--cert-ttl`).
    #[default]
    Bootstrap,
    BootstrapWith(Vec<String>),
    /// Token mode, as in a pod: the projected token's file and the trust bundle
    /// (the `meshd-trust-bundle` ConfigMap's file).
    Token {
        token_file: PathBuf,
        trust_bundle: PathBuf,
    },
}

impl Default for SidecarOptions {
    fn default() -> Self {
        SidecarOptions {
            envoy_args: Vec::new(),
            agent_args: Vec::new(),
            wait_live: true,
            identity: SidecarIdentity::Bootstrap,
            xds_address: None,
            netns: None,
        }
    }
}

impl Sidecar {
    /// Starts the sidecar for the pod `pod`.
    pub async fn for_pod(
        meshd: &Meshd,
        pod: &PodDef,
        flavor: XdsFlavor,
    ) -> anyhow::Result<Sidecar> {
        Self::start(
            meshd,
            &pod.namespace,
            &pod.name,
            &pod.service_account,
            flavor,
        )
        .await
    }

    /// Starts the sidecar for `namespace/pod` running as `service_account`, against
    /// `meshd`, and waits until Envoy is live (its initial xDS fetch is done).
    pub async fn start(
        meshd: &Meshd,
        namespace: &str,
        pod: &str,
        service_account: &str,
        flavor: XdsFlavor,
    ) -> anyhow::Result<Sidecar> {
        Self::start_with_args(meshd, namespace, pod, service_account, flavor, &[]).await
    }

    /// [`Sidecar::start`] with more Envoy command-line arguments.
    pub async fn start_with_args(
        meshd: &Meshd,
        namespace: &str,
        pod: &str,
        service_account: &str,
        flavor: XdsFlavor,
        extra: &[&str],
    ) -> anyhow::Result<Sidecar> {
        let options = SidecarOptions {
            envoy_args: extra.iter().map(|a| a.to_string()).collect(),
            ..SidecarOptions::default()
        };
        Self::start_with(meshd, namespace, pod, service_account, flavor, options).await
    }

    /// The sidecar, started as `options` say.
    pub async fn start_with(
        meshd: &Meshd,
        namespace: &str,
        pod: &str,
        service_account: &str,
        flavor: XdsFlavor,
        options: SidecarOptions,
    ) -> anyhow::Result<Sidecar> {
        let work = tempfile::Builder::new()
            .prefix("meshd-sidecar-")
            .tempdir()?;
        let admin_port = free_port();
        let health_port = free_port();
        let mut command: Vec<std::ffi::OsString> = vec!["run".into()];
        match &options.identity {
            SidecarIdentity::Bootstrap | SidecarIdentity::BootstrapWith(_) => {
                let extra = match &options.identity {
                    SidecarIdentity::BootstrapWith(args) => args.as_slice(),
                    _ => &[],
                };
                // What `meshctl bootstrap -o DIR` writes: the agent starts from its
                // certificate.
                let bootstrap = meshd
                    .bootstrap(
                        namespace,
                        pod,
                        service_account,
                        flavor,
                        admin_port,
                        work.path(),
                        extra,
                    )
                    .await?;
                let cert_dir = bootstrap.parent().context("bootstrap file's directory")?;
                command.extend(["--cert-dir".into(), cert_dir.into()]);
                command.extend(["--pod".into(), pod.into()]);
            }
            SidecarIdentity::Token {
                token_file,
                trust_bundle,
            } => {
                command.extend(["--token-file".into(), token_file.into()]);
                command.extend(["--trust-bundle".into(), trust_bundle.into()]);
            }
        }
        let agent_dir = work.path().join("agent");
        let (admin, health) = (admin_port.to_string(), format!("127.0.0.1:{health_port}"));
        let xds = options.xds_address.unwrap_or(meshd.xds_addr).to_string();
        let envoy = match &options.netns {
            Some(_) => {
                // Everything so far (the bootstrap directory) becomes the proxy's; the
                // link comes after: it shares the cached binary's owner.
                chown_tree(work.path(), PROXY_UID)?;
                link_envoy(work.path())?
            }
            None => envoy_binary()?,
        };
        let flags: [(&str, &std::ffi::OsStr); 8] = [
            ("--dir", agent_dir.as_os_str()),
            ("--xds-address", xds.as_ref()),
            ("--meshd-namespace", meshd.meshd_namespace().as_ref()),
            ("--xds-protocol", flavor_arg(flavor).as_ref()),
            ("--envoy-admin-port", admin.as_ref()),
            ("--envoy-binary", envoy.as_os_str()),
            ("--health-address", health.as_ref()),
            ("--log", "info,meshd_agent=debug".as_ref()),
        ];
        for (flag, value) in flags {
            command.extend([flag.into(), value.to_owned()]);
        }
        command.extend(options.agent_args.iter().map(Into::into));
        command.push("--".into());
        command.extend(["--concurrency", "1", "--log-level", "info"].map(Into::into));
        command.extend(options.envoy_args.iter().map(Into::into));
        let started_at = tokio::time::Instant::now();
        let agent = spawn_agent(work.path(), &command, options.netns.as_ref())?;
        // The group is the agent's own pid; never signal a group of 0 or 1.
        let group = agent_group(&agent);
        let mut sidecar = Sidecar {
            agent,
            command,
            group,
            node_id: format!("{pod}.{namespace}"),
            admin_port,
            health_port,
            started_at,
            work,
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(5))
                .build()?,
            netns: options.netns,
        };
        if options.wait_live {
            sidecar.wait_live(Duration::from_secs(30)).await?;
        }
        Ok(sidecar)
    }

    /// Kills the agent and Envoy and starts them again as before, with the same
    /// directory (as the kubelet restarts a container: its emptyDir stays), and waits
    /// until Envoy is live.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill_group();
        let _ = self.agent.kill().await;
        self.started_at = tokio::time::Instant::now();
        self.agent = spawn_agent(self.work.path(), &self.command, self.netns.as_ref())?;
        self.group = agent_group(&self.agent);
        self.wait_live(Duration::from_secs(30)).await
    }

    /// Waits until Envoy says LIVE; fails at once if the agent exits.
    pub async fn wait_live(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.agent.try_wait()? {
                bail!(
                    "meshd-agent for {} exited ({status})\nsidecar log:\n{}",
                    self.node_id,
                    self.log()
                );
            }
            match self.admin("/ready").await {
                Ok(body) if body.trim() == "LIVE" => return Ok(()),
                other if tokio::time::Instant::now() > deadline => bail!(
                    "envoy {} not live within {timeout:?} ({other:?})\nsidecar log:\n{}",
                    self.node_id,
                    self.log()
                ),
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// GET on Envoy's admin interface.
    pub async fn admin(&self, path: &str) -> anyhow::Result<String> {
        let (_, body) = self.get(self.admin_port, path).await?;
        Ok(body)
    }

    /// GET `path` on the agent's health port: (status, body).
    pub async fn health(&self, path: &str) -> anyhow::Result<(u16, String)> {
        self.get(self.health_port, path).await
    }

    /// GET `path` on the pod's loopback at `port` (in its namespace, if it has one).
    async fn get(&self, port: u16, path: &str) -> anyhow::Result<(u16, String)> {
        let (http, url) = (self.http.clone(), format!("http://127.0.0.1:{port}{path}"));
        let get = async move {
            let resp = http.get(&url).send().await?;
            Ok((resp.status().as_u16(), resp.text().await?))
        };
        match &self.netns {
            Some(netns) => netns.run(get).await,
            None => get.await,
        }
    }

    /// One counter or gauge from `/stats`, if Envoy has it.
    pub async fn stat(&self, name: &str) -> anyhow::Result<Option<u64>> {
        let text = self
            .admin(&format!("/stats?filter=^{}$", regex_escape(name)))
            .await?;
        Ok(text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .and_then(|v| v.trim().parse().ok()))
    }

    /// Everything the agent and Envoy have logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.work.path().join("sidecar.log")).unwrap_or_default()
    }

    /// The directory `meshctl bootstrap` wrote (the agent's `--cert-dir`).
    pub fn bootstrap_dir(&self) -> PathBuf {
        self.work.path().join(&self.node_id)
    }

    /// The agent's own sidecar directory (`--dir`): Envoy's bootstrap and credentials.
    pub fn agent_dir(&self) -> PathBuf {
        self.work.path().join("agent")
    }

    /// The agent's process id, while it runs.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.id()
    }

    /// Envoy's process id: the agent's child.
    pub fn envoy_pid(&self) -> anyhow::Result<u32> {
        let agent = self.agent.id().context("the agent has exited")?;
        children_of(agent)?
            .into_iter()
            .next()
            .with_context(|| format!("meshd-agent ({agent}) has no child process"))
    }

    /// Sends `signal` to the agent alone (as the kubelet does to a container's first
    /// process).
    pub fn signal_agent(&self, signal: Signal) -> anyhow::Result<()> {
        let pid = self.agent.id().context("the agent has exited")?;
        kill(Pid::from_raw(i32::try_from(pid)?), signal)?;
        Ok(())
    }

    /// Waits for the agent to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        tokio::time::timeout(timeout, self.agent.wait())
            .await
            .with_context(|| {
                format!(
                    "meshd-agent for {} still running after {timeout:?}\nsidecar log:\n{}",
                    self.node_id,
                    self.log()
                )
            })?
            .context("waiting for meshd-agent")
    }

    /// Stops the agent and Envoy now.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.kill_group();
        let _ = self.agent.kill().await;
        Ok(())
    }

    fn kill_group(&mut self) {
        if let Some(group) = self.group.take() {
            // Gone already is fine: then there is nothing left to stop.
            let _ = killpg(group, Signal::SIGKILL);
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.kill_group();
    }
}

/// Starts `meshd-agent` with `args` in a process group of its own, its output (and
/// Envoy's) appended to `work/sidecar.log`; in `netns` as uid [`PROXY_UID`].
fn spawn_agent(
    work: &Path,
    args: &[std::ffi::OsString],
    netns: Option<&Netns>,
) -> anyhow::Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(work.join("sidecar.log"))?;
    let agent = meshd_binary("meshd-agent")?;
    let mut command = match netns {
        Some(netns) => {
            let mut c = netns.command("setpriv");
            let id = PROXY_UID.to_string();
            c.args(["--reuid", &id, "--regid", &id, "--clear-groups"])
                .arg(agent);
            c
        }
        None => Command::new(agent),
    };
    command
        .args(args)
        // Nothing of the test's environment decides for the agent.
        .env_remove("POD_NAME")
        .env_remove("MESHD_XDS_ADDRESS")
        .env_remove("MESHD_NAMESPACE")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .context("cannot start meshd-agent")
}

/// A hard link to the Envoy binary in `dir` (a copy across file systems): the install
/// under /root is closed to [`PROXY_UID`], the link shares the binary's mode.
fn link_envoy(dir: &Path) -> anyhow::Result<PathBuf> {
    let (envoy, link) = (envoy_binary()?, dir.join("envoy"));
    if std::fs::hard_link(&envoy, &link).is_err() {
        std::fs::copy(&envoy, &link)
            .with_context(|| format!("cannot copy {} to {}", envoy.display(), link.display()))?;
    }
    Ok(link)
}

/// Makes `root` and everything below it owned by `uid` (and gid `uid`).
fn chown_tree(root: &Path, uid: u32) -> anyhow::Result<()> {
    std::os::unix::fs::lchown(root, Some(uid), Some(uid))
        .with_context(|| format!("cannot chown {}", root.display()))?;
    if root.is_dir() && !root.is_symlink() {
        for entry in std::fs::read_dir(root)? {
            chown_tree(&entry?.path(), uid)?;
        }
    }
    Ok(())
}

/// The agent's process group: its own pid, never 0 or 1.
fn agent_group(agent: &Child) -> Option<Pid> {
    agent
        .id()
        .and_then(|pid| i32::try_from(pid).ok())
        .filter(|pid| *pid > 1)
        .map(Pid::from_raw)
}

/// The processes whose parent is `pid` (from `/proc/*/stat`).
pub fn children_of(pid: u32) -> anyhow::Result<Vec<u32>> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...; comm may hold spaces and parentheses.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        if rest.split_whitespace().nth(1) == Some(pid.to_string().as_str()) {
            children.push(child);
        }
    }
    Ok(children)
}

fn flavor_arg(flavor: XdsFlavor) -> &'static str {
    match flavor {
        XdsFlavor::Sotw => "sotw",
        XdsFlavor::Delta => "delta",
    }
}

fn regex_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                vec![c]
            } else {
                vec!['\\', c]
            }
        })
        .collect()
}

/// Whether the sidecar uses SotW or delta xDS, for test names and loops.
pub const FLAVORS: [XdsFlavor; 2] = [XdsFlavor::Sotw, XdsFlavor::Delta];
