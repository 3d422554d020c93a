//! The part of a kubelet the tests need: a Pod as the API server stores it, run in a lab
//! pod ([`crate::netns::LabPod`]) the way the kubelet and a container runtime would run
//! it, as far as this machine allows. What runs is the stored spec, never a copy the
//! test wrote by hand.
//!
//! [`Kubelet::run`] does, in the kubelet's order:
//! 1. resolves every container first (its image in the test's [`Images`], its
//!    environment and `$(VAR)`-expanded command line: `env`, its user and
//!    capabilities: `process`), so a pod the harness cannot run fails before anything
//!    starts, naming the container and the field;
//! 2. makes every volume (`volumes`) in a temp dir of the pod's;
//! 3. runs the init containers in order: a regular one must exit 0 (else the start fails
//!    with its output), a native sidecar (`restartPolicy: Always`) is started and the
//!    next container waits until it has started (its startupProbe passed, if it has
//!    one);
//! 4. starts the app containers;
//! 5. writes the pod's status at each step (`status`), and from then on polls the
//!    readiness probes as the kubelet does (startup probe first, then readiness at its
//!    period with its thresholds) from the node (`probes`), turning the Ready condition
//!    True once every app container and sidecar is ready.
//!
//! Each container process runs in the pod's network namespace, in a mount namespace of
//! its own with its `volumeMounts` bind-mounted, as its user with its capabilities
//! (`process`); its output goes to a log file the test can read
//! ([`RunningPod::logs`]), and every log is printed when the start fails or a test
//! panics with the pod running. A `mountPath` missing on this machine is created for the
//! pod and removed when the last pod of the test process using it is gone (`process`
//! says why and how; a killed test process leaves those empty entries behind). [`RunningPod::stop`] stops it as the kubelet does: app
//! containers first (SIGTERM, SIGKILL after `terminationGracePeriodSeconds`), then the
//! sidecars in reverse order; dropping it kills everything at once.
//!
//! Not reproduced: image file systems (a container sees this machine's, its command
//! found in its image's PATH), `readOnlyRootFilesystem`, seccomp, AppArmor, SELinux,
//! cgroups and resources, `privileged`, `procMount`, sysctls, the pod's own UTS and PID
//! namespaces (hostname), what a runtime adds to the environment (`HOME`, `HOSTNAME`)
//! and the Service variables (`enableServiceLinks`): a process gets its image's PATH and
//! its spec's env, nothing else; DNS (`/etc/resolv.conf`, `/etc/hosts`), restarts
//! (a container that exits stays exited and its status still says running; liveness
//! probes are not run, though
//! [`RunningPod::probe`] sends one), lifecycle hooks (an error), ephemeral containers,
//! `workingDir` from the image (`/` unless the spec sets one), volume updates and token
//! refreshes, `envFrom` and env from ConfigMaps, Secrets or resources (errors).

mod env;
mod images;
mod probes;
mod process;
mod status;
mod volumes;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};
use kube::Api;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tokio::process::Child;
use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub use env::{PodFacts, expand};
pub use images::{BinDir, ImageDef, Images, STANDARD_PATH};
pub use probes::{ProbeKind, ProbeOutcome};
pub use process::Identity;

use crate::kube_api::KubeApi;
use crate::netns::{Lab, LabPod, Netns};
use probes::{Prober, Timing};
use process::{Launch, Mount, MountPoints, Tools};
use status::{ContainerState, PodState, State};

/// How long a regular init container may run before the start fails (the kubelet would
/// wait forever).
pub const INIT_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs pods on one lab's node.
pub struct Kubelet {
    client: kube::Client,
    images: Images,
    node: Netns,
    node_ip: Ipv4Addr,
    node_name: String,
    tools: Tools,
}

impl std::fmt::Debug for Kubelet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kubelet")
            .field("node_name", &self.node_name)
            .field("node_ip", &self.node_ip)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for RunningPod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningPod")
            .field("namespace", &self.namespace)
            .field("name", &self.name)
            .field("ip", &self.ip)
            .field(
                "containers",
                &self.runs.iter().map(|r| &r.spec.name).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// The role a container has in the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// An init container that must run to completion.
    Init,
    /// An init container with `restartPolicy: Always`.
    Sidecar,
    App,
}

/// One container of a running pod.
#[derive(Debug)]
struct Run {
    spec: Container,
    role: Role,
    /// Started by the harness (a process image), or served by the test.
    by_test: bool,
    env: Vec<(String, String)>,
    argv: Vec<String>,
    identity: Identity,
    mounts: Vec<Mount>,
    log: PathBuf,
    child: Option<Child>,
    group: Option<Pid>,
    started_at: Option<Instant>,
    exit: Option<ExitStatus>,
    /// Its index in the status's init or app list.
    slot: usize,
}

impl Kubelet {
    /// A kubelet on `lab`'s node, talking to `api`, with `images` for the containers.
    pub fn new(lab: &Lab, api: &KubeApi, images: Images) -> anyhow::Result<Kubelet> {
        let (node, node_ip) = lab.node()?;
        Ok(Kubelet {
            client: api.client.clone(),
            images,
            node,
            node_ip,
            node_name: format!("{}-node", lab.prefix()),
            tools: Tools::find()?,
        })
    }

    /// The node's address (`status.hostIP`), where probes come from.
    pub fn node_ip(&self) -> Ipv4Addr {
        self.node_ip
    }

    /// The node's name: `spec.nodeName` for a pod that has none (a scheduler would have
    /// bound it here).
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// Reads pod `namespace/name` from the API server and runs it in `lab_pod`.
    pub async fn run(
        &self,
        lab_pod: &LabPod,
        namespace: &str,
        name: &str,
    ) -> anyhow::Result<RunningPod> {
        let stored = Api::<Pod>::namespaced(self.client.clone(), namespace)
            .get(name)
            .await
            .with_context(|| format!("cannot read pod {namespace}/{name}"))?;
        self.run_pod(lab_pod, stored).await
    }

    /// Runs `stored` (a Pod as read back from the API server) in `lab_pod`.
    pub async fn run_pod(&self, lab_pod: &LabPod, stored: Pod) -> anyhow::Result<RunningPod> {
        let mut pod = self.prepare(lab_pod, stored).await?;
        match pod.start(self).await {
            Ok(()) => Ok(pod),
            Err(e) => {
                let logs = pod.all_logs();
                drop(pod);
                Err(e.context(format!("pod did not start\n{logs}")))
            }
        }
    }

    /// Everything before the first process: containers resolved, volumes made.
    async fn prepare(&self, lab_pod: &LabPod, stored: Pod) -> anyhow::Result<RunningPod> {
        let meta = &stored.metadata;
        let namespace = meta.namespace.clone().context("the pod has no namespace")?;
        let name = meta.name.clone().context("the pod has no name")?;
        let what = format!("pod {namespace}/{name}");
        let uid = meta
            .uid
            .clone()
            .with_context(|| format!("{what} has no uid (not stored?)"))?;
        let spec = stored
            .spec
            .clone()
            .with_context(|| format!("{what} has no spec"))?;
        for (field, set) in [
            ("hostNetwork", spec.host_network),
            ("hostPID", spec.host_pid),
            ("hostIPC", spec.host_ipc),
            ("shareProcessNamespace", spec.share_process_namespace),
        ] {
            if set == Some(true) {
                bail!("{what}: spec.{field} is not supported by the harness");
            }
        }
        if spec
            .ephemeral_containers
            .as_ref()
            .is_some_and(|e| !e.is_empty())
        {
            bail!("{what}: spec.ephemeralContainers are not supported by the harness");
        }
        let facts = PodFacts {
            name: name.clone(),
            namespace: namespace.clone(),
            uid: uid.clone(),
            labels: meta.labels.clone().unwrap_or_default(),
            annotations: meta.annotations.clone().unwrap_or_default(),
            service_account: spec
                .service_account_name
                .clone()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".into()),
            node_name: spec
                .node_name
                .clone()
                .unwrap_or_else(|| self.node_name.clone()),
            pod_ip: lab_pod.ip.to_string(),
            host_ip: self.node_ip.to_string(),
        };
        let dir = tempfile::Builder::new()
            .prefix(&format!("meshd-kubelet-{name}-"))
            .tempdir()?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        }
        std::fs::create_dir(dir.path().join("logs"))?;
        std::fs::create_dir(dir.path().join("volumes"))?;

        // 1. Every container, before anything runs.
        let volume_dir = |v: &str| dir.path().join("volumes").join(v);
        let declared: BTreeMap<&str, _> = spec
            .volumes
            .iter()
            .flatten()
            .map(|v| (v.name.as_str(), v))
            .collect();
        let mut runs = Vec::new();
        let all = spec
            .init_containers
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, c)| {
                let sidecar = c.restart_policy.as_deref() == Some("Always");
                (c, if sidecar { Role::Sidecar } else { Role::Init }, i)
            })
            .chain(
                spec.containers
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (c, Role::App, i)),
            );
        for (container, role, slot) in all {
            let cname = &container.name;
            let in_container = || format!("{what}: container {cname}");
            if let Some(policy) = container.restart_policy.as_deref()
                && (role == Role::App || policy != "Always")
            {
                bail!(
                    "{}: restartPolicy {policy:?} is only valid as Always on an init container",
                    in_container()
                );
            }
            if container.lifecycle.is_some() {
                bail!(
                    "{}: lifecycle hooks are not supported by the harness",
                    in_container()
                );
            }
            let image = self
                .images
                .get(cname, container.image.as_deref())
                .with_context(|| what.clone())?;
            let (image_path, entrypoint, cmd, by_test) = match image {
                ImageDef::Process {
                    entrypoint,
                    cmd,
                    path,
                } => {
                    let joined = std::env::join_paths(path)
                        .with_context(in_container)?
                        .to_string_lossy()
                        .into_owned();
                    (Some(joined), entrypoint.clone(), cmd.clone(), false)
                }
                ImageDef::RunByTest => (None, Vec::new(), Vec::new(), true),
            };
            let env = env::resolve(container, image_path.as_deref(), &facts)
                .with_context(in_container)?;
            let argv = if by_test && container.command.is_none() && container.args.is_none() {
                Vec::new()
            } else {
                process::argv(container, &entrypoint, &cmd, &env).with_context(in_container)?
            };
            let identity = process::identity(container, spec.security_context.as_ref())
                .with_context(in_container)?;
            let mut mounts = Vec::new();
            for m in container.volume_mounts.iter().flatten() {
                let at = || format!("{}: volumeMounts {}", in_container(), m.mount_path);
                if !declared.contains_key(m.name.as_str()) {
                    bail!("{}: no volume named {:?} in the pod", at(), m.name);
                }
                if m.sub_path_expr.is_some() {
                    bail!("{}: subPathExpr is not supported by the harness", at());
                }
                if m.mount_propagation.as_deref().is_some_and(|p| p != "None") {
                    bail!("{}: mountPropagation is not supported by the harness", at());
                }
                let mut source = volume_dir(&m.name);
                if let Some(sub) = m.sub_path.as_deref().filter(|s| !s.is_empty()) {
                    let ok = Path::new(sub)
                        .components()
                        .all(|c| matches!(c, std::path::Component::Normal(_)));
                    anyhow::ensure!(
                        ok,
                        "{}: subPath {sub:?} must be relative without '..'",
                        at()
                    );
                    source = source.join(sub);
                }
                mounts.push(Mount {
                    source,
                    target: PathBuf::from(&m.mount_path),
                    read_only: m.read_only == Some(true),
                });
            }
            runs.push(Run {
                log: dir.path().join("logs").join(format!("{cname}.log")),
                spec: container.clone(),
                role,
                by_test,
                env,
                argv,
                identity,
                mounts,
                child: None,
                group: None,
                started_at: None,
                exit: None,
                slot,
            });
        }

        // 2. The volumes.
        let uids: Vec<u32> = runs.iter().map(|r| r.identity.uid).collect();
        let explicit_users = spec
            .init_containers
            .iter()
            .flatten()
            .chain(&spec.containers)
            .all(|c| {
                c.security_context
                    .as_ref()
                    .and_then(|s| s.run_as_user)
                    .or(spec.security_context.as_ref().and_then(|p| p.run_as_user))
                    .is_some()
            });
        let fs_user = (explicit_users && uids.windows(2).all(|w| w[0] == w[1]))
            .then(|| uids.first().copied())
            .flatten();
        let fs_group = spec
            .security_context
            .as_ref()
            .and_then(|p| p.fs_group)
            .map(u32::try_from)
            .transpose()
            .context("securityContext.fsGroup is not a gid")?;
        let cx = volumes::VolumeContext {
            client: &self.client,
            pod: &facts,
            fs_user,
            fs_group,
        };
        let mut volume_paths = BTreeMap::new();
        for volume in spec.volumes.iter().flatten() {
            let path = volume_dir(&volume.name);
            volumes::make(volume, &path, &cx)
                .await
                .with_context(|| what.clone())?;
            volume_paths.insert(volume.name.clone(), path);
        }
        // A subPath that is not there yet is made as a directory, as the kubelet does.
        for run in &runs {
            for m in &run.mounts {
                if !m.source.exists() {
                    std::fs::create_dir_all(&m.source)
                        .with_context(|| format!("{what}: subPath {}", m.source.display()))?;
                }
            }
        }

        let image = |c: &Container| c.image.clone().unwrap_or_default();
        let waiting = |c: &Container| ContainerState {
            name: c.name.clone(),
            image: image(c),
            state: State::Waiting {
                reason: "PodInitializing",
            },
            started: false,
            ready: false,
        };
        let init: Vec<&Container> = spec.init_containers.iter().flatten().collect();
        let state = PodState {
            namespace: namespace.clone(),
            name: name.clone(),
            pod_ip: facts.pod_ip.clone(),
            host_ip: facts.host_ip.clone(),
            start_time: status::now(),
            init: init.iter().map(|c| waiting(c)).collect(),
            sidecar: init
                .iter()
                .map(|c| c.restart_policy.as_deref() == Some("Always"))
                .collect(),
            apps: spec.containers.iter().map(waiting).collect(),
            transitions: BTreeMap::new(),
        };
        let (ready_tx, ready_rx) = watch::channel(false);
        Ok(RunningPod {
            namespace,
            name,
            uid,
            ip: lab_pod.ip,
            netns: lab_pod.netns.clone(),
            grace: Duration::from_secs(
                spec.termination_grace_period_seconds.unwrap_or(30).max(0) as u64
            ),
            spec,
            runs,
            volumes: volume_paths,
            prober: Prober {
                node: self.node.clone(),
                pod_ip: lab_pod.ip,
            },
            state: Arc::new(Mutex::new(state)),
            ready_tx: Arc::new(ready_tx),
            ready_rx,
            client: self.client.clone(),
            tasks: Vec::new(),
            mount_points: MountPoints::default(),
            dir,
        })
    }
}

/// A pod the [`Kubelet`] runs. Dropping it kills every container at once.
pub struct RunningPod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub ip: Ipv4Addr,
    netns: Netns,
    grace: Duration,
    spec: PodSpec,
    runs: Vec<Run>,
    volumes: BTreeMap<String, PathBuf>,
    prober: Prober,
    state: Arc<Mutex<PodState>>,
    ready_tx: Arc<watch::Sender<bool>>,
    ready_rx: watch::Receiver<bool>,
    client: kube::Client,
    tasks: Vec<JoinHandle<()>>,
    // Dropped after the containers are killed (Drop), before the pod's directory.
    mount_points: MountPoints,
    dir: tempfile::TempDir,
}

impl RunningPod {
    /// Steps 3 to 5 of the module doc.
    async fn start(&mut self, kubelet: &Kubelet) -> anyhow::Result<()> {
        self.write_status().await?;
        for i in 0..self.runs.len() {
            let role = self.runs[i].role;
            match role {
                Role::Init => self.run_to_completion(kubelet, i).await?,
                Role::Sidecar => {
                    self.spawn(kubelet, i)?;
                    self.wait_started(i).await?;
                    self.watch_readiness(i);
                }
                Role::App => {
                    self.spawn(kubelet, i)?;
                    let slot = self.runs[i].slot;
                    let mut state = self.state.lock().await;
                    state.apps[slot].state = State::Running {
                        started_at: status::now(),
                    };
                    // The startup probe (if any) runs in the readiness task.
                    state.apps[slot].started = self.runs[i].spec.startup_probe.is_none();
                    state.write(&self.client).await?;
                    drop(state);
                    self.watch_readiness(i);
                }
            }
        }
        Ok(())
    }

    async fn write_status(&self) -> anyhow::Result<()> {
        self.state.lock().await.write(&self.client).await
    }

    /// Starts container `i`'s process (nothing for an app the test serves).
    fn spawn(&mut self, kubelet: &Kubelet, i: usize) -> anyhow::Result<()> {
        let run = &mut self.runs[i];
        run.started_at = Some(Instant::now());
        if run.by_test {
            return Ok(());
        }
        for m in &run.mounts {
            let nested = run
                .mounts
                .iter()
                .any(|p| p.target != m.target && m.target.starts_with(&p.target));
            if nested {
                // Made inside the outer mount ([`process::command`]).
                continue;
            }
            let file = std::fs::metadata(&m.source).is_ok_and(|meta| !meta.is_dir());
            self.mount_points.ensure(&m.target, file).with_context(|| {
                format!(
                    "container {}: volumeMounts {}",
                    run.spec.name,
                    m.target.display()
                )
            })?;
        }
        let working_dir = run.spec.working_dir.clone().unwrap_or_else(|| "/".into());
        let launch = Launch {
            netns: self.netns.name(),
            mounts: &run.mounts,
            working_dir: &working_dir,
            identity: &run.identity,
            argv: &run.argv,
            env: &run.env,
            log: &run.log,
        };
        let child = process::command(&kubelet.tools, &launch)?
            .spawn()
            .with_context(|| format!("cannot start container {}", run.spec.name))?;
        run.group = child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .filter(|p| *p > 1)
            .map(Pid::from_raw);
        run.child = Some(child);
        Ok(())
    }

    /// Runs init container `i` and fails unless it exits 0.
    async fn run_to_completion(&mut self, kubelet: &Kubelet, i: usize) -> anyhow::Result<()> {
        self.spawn(kubelet, i)?;
        let started_at = status::now();
        let slot = self.runs[i].slot;
        {
            let mut state = self.state.lock().await;
            state.init[slot].state = State::Running {
                started_at: started_at.clone(),
            };
            state.init[slot].started = true;
            state.write(&self.client).await?;
        }
        let run = &mut self.runs[i];
        let name = run.spec.name.clone();
        let exit = match run.child.as_mut() {
            Some(child) => tokio::time::timeout(INIT_TIMEOUT, child.wait())
                .await
                .with_context(|| {
                    format!(
                        "init container {name} still runs after {INIT_TIMEOUT:?}; its output:\n{}",
                        read_log(&run.log)
                    )
                })?
                .with_context(|| format!("waiting for init container {name}"))?,
            None => {
                bail!("init container {name}: its image is run by the test, which cannot complete")
            }
        };
        run.exit = Some(exit);
        // The container is gone; so is whatever it left running.
        if let Some(group) = run.group.take() {
            let _ = killpg(group, Signal::SIGKILL);
        }
        let code = exit.code().unwrap_or(128 + exit_signal(&exit));
        let mut state = self.state.lock().await;
        state.init[slot].state = State::Terminated {
            exit_code: code,
            reason: if code == 0 { "Completed" } else { "Error" },
            started_at,
            finished_at: status::now(),
        };
        state.init[slot].started = false;
        state.write(&self.client).await?;
        if code != 0 {
            bail!(
                "init container {name} failed ({exit}); its output:\n{}",
                read_log(&run.log)
            );
        }
        Ok(())
    }

    /// Waits until sidecar `i` has started: its startupProbe passed, if it has one.
    async fn wait_started(&mut self, i: usize) -> anyhow::Result<()> {
        let slot = self.runs[i].slot;
        {
            let mut state = self.state.lock().await;
            state.init[slot].state = State::Running {
                started_at: status::now(),
            };
            state.write(&self.client).await?;
        }
        let (prober, run) = (&self.prober, &mut self.runs[i]);
        if let Some(probe) = &run.spec.startup_probe
            && let Err(why) = until_started(prober, &run.spec, probe, run.child.as_mut()).await
        {
            bail!(
                "sidecar {}: {why}; its output:\n{}",
                run.spec.name,
                read_log(&run.log)
            );
        }
        let mut state = self.state.lock().await;
        state.init[slot].started = true;
        state.write(&self.client).await
    }

    /// Polls container `i`'s startup probe (app containers) and then its readiness
    /// probe for as long as the pod runs, keeping its `ready` in the status.
    fn watch_readiness(&mut self, i: usize) {
        let run = &self.runs[i];
        let (container, role, slot) = (run.spec.clone(), run.role, run.slot);
        let (prober, state, client) =
            (self.prober.clone(), self.state.clone(), self.client.clone());
        let ready_tx = self.ready_tx.clone();
        let set = move |ready: Option<bool>, started: Option<bool>| {
            let (state, client, ready_tx) = (state.clone(), client.clone(), ready_tx.clone());
            async move {
                let mut state = state.lock().await;
                let c = match role {
                    Role::App => &mut state.apps[slot],
                    _ => &mut state.init[slot],
                };
                if let Some(r) = ready {
                    c.ready = r;
                }
                if let Some(s) = started {
                    c.started = s;
                }
                ready_tx.send_replace(state.ready());
                if let Err(e) = state.write(&client).await {
                    eprintln!("kubelet: {e:#}");
                }
            }
        };
        let task = tokio::spawn(async move {
            let name = &container.name;
            if role == Role::App
                && let Some(probe) = &container.startup_probe
                && let Err(why) = until_started(&prober, &container, probe, None).await
            {
                eprintln!("kubelet: container {name}: {why}");
                return;
            }
            set(None, Some(true)).await;
            let Some(probe) = &container.readiness_probe else {
                set(Some(true), None).await;
                return;
            };
            let timing = Timing::of(probe);
            tokio::time::sleep(timing.initial_delay).await;
            let (mut successes, mut failures, mut ready) = (0, 0, false);
            loop {
                let success = match prober.probe(&container, probe).await {
                    Ok(outcome) => outcome.success,
                    Err(e) => {
                        eprintln!("kubelet: container {name}: readinessProbe: {e:#}");
                        return;
                    }
                };
                if success {
                    (successes, failures) = (successes + 1, 0);
                } else {
                    (successes, failures) = (0, failures + 1);
                }
                let now_ready = if successes >= timing.success_threshold {
                    true
                } else if failures >= timing.failure_threshold {
                    false
                } else {
                    ready
                };
                if now_ready != ready {
                    ready = now_ready;
                    set(Some(ready), None).await;
                }
                tokio::time::sleep(timing.period).await;
            }
        });
        self.tasks.push(task);
    }

    /// Waits until the pod's Ready condition (as this kubelet reports it) is True.
    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let mut rx = self.ready_rx.clone();
        match tokio::time::timeout(timeout, rx.wait_for(|ready| *ready)).await {
            Ok(Ok(_)) => Ok(()),
            _ => {
                let mut probes = String::new();
                for run in &self.runs {
                    for kind in [ProbeKind::Startup, ProbeKind::Readiness] {
                        if kind.of(&run.spec).is_some() {
                            let outcome = self.probe(&run.spec.name, kind).await;
                            probes.push_str(&format!(
                                "  {} {}: {outcome:?}\n",
                                run.spec.name,
                                kind.name()
                            ));
                        }
                    }
                }
                bail!(
                    "pod {}/{} not ready within {timeout:?}; probes now:\n{probes}{}",
                    self.namespace,
                    self.name,
                    self.all_logs()
                )
            }
        }
    }

    /// Whether the pod's Ready condition is True, as this kubelet reports it.
    pub fn ready(&self) -> bool {
        *self.ready_rx.borrow()
    }

    /// One attempt of `container`'s probe of `kind`, sent as the kubelet sends it.
    pub async fn probe(&self, container: &str, kind: ProbeKind) -> anyhow::Result<ProbeOutcome> {
        let spec = &self.run(container)?.spec;
        let probe = kind
            .of(spec)
            .with_context(|| format!("container {container} has no {}", kind.name()))?;
        self.prober
            .probe(spec, probe)
            .await
            .with_context(|| format!("container {container}: {}", kind.name()))
    }

    fn run(&self, container: &str) -> anyhow::Result<&Run> {
        self.runs
            .iter()
            .find(|r| r.spec.name == container)
            .with_context(|| {
                format!(
                    "pod {}/{} has no container {container}",
                    self.namespace, self.name
                )
            })
    }

    fn run_mut(&mut self, container: &str) -> anyhow::Result<&mut Run> {
        let (ns, name) = (self.namespace.clone(), self.name.clone());
        self.runs
            .iter_mut()
            .find(|r| r.spec.name == container)
            .with_context(|| format!("pod {ns}/{name} has no container {container}"))
    }

    /// What `container` has printed (stdout and stderr) so far.
    pub fn logs(&self, container: &str) -> anyhow::Result<String> {
        Ok(read_log(&self.run(container)?.log))
    }

    /// The log file of `container`.
    pub fn log_path(&self, container: &str) -> anyhow::Result<PathBuf> {
        Ok(self.run(container)?.log.clone())
    }

    /// Every container's log, each under its name.
    pub fn all_logs(&self) -> String {
        let mut all = String::new();
        for run in &self.runs {
            if run.by_test {
                continue;
            }
            all.push_str(&format!(
                "--- container {} ({}):\n{}\n",
                run.spec.name,
                process::describe(&run.argv),
                read_log(&run.log)
            ));
        }
        all
    }

    /// `container`'s environment as resolved from the spec: exactly what its process
    /// gets (or would get, for an app the test serves).
    pub fn env(&self, container: &str) -> anyhow::Result<BTreeMap<String, String>> {
        Ok(self.run(container)?.env.iter().cloned().collect())
    }

    /// `container`'s command line (command and args, `$(VAR)` expanded); empty for an
    /// app the test serves whose spec gives none.
    pub fn argv(&self, container: &str) -> anyhow::Result<Vec<String>> {
        Ok(self.run(container)?.argv.clone())
    }

    /// Who `container` runs as.
    pub fn identity(&self, container: &str) -> anyhow::Result<Identity> {
        Ok(self.run(container)?.identity.clone())
    }

    /// When `container` was started (for an app the test serves: when its turn came).
    pub fn started_at(&self, container: &str) -> anyhow::Result<Option<Instant>> {
        Ok(self.run(container)?.started_at)
    }

    /// The pid of `container`'s process, while it runs.
    pub fn pid(&self, container: &str) -> anyhow::Result<Option<u32>> {
        Ok(self.run(container)?.child.as_ref().and_then(|c| c.id()))
    }

    /// The directory of volume `name` on this machine.
    pub fn volume_path(&self, name: &str) -> anyhow::Result<&Path> {
        self.volumes
            .get(name)
            .map(PathBuf::as_path)
            .with_context(|| format!("pod {}/{} has no volume {name}", self.namespace, self.name))
    }

    /// The pod's directory on this machine: `volumes/<name>` and `logs/<container>.log`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The pod's spec, as stored.
    pub fn spec(&self) -> &PodSpec {
        &self.spec
    }

    /// How `container` exited, if it has.
    pub fn try_exit(&mut self, container: &str) -> anyhow::Result<Option<ExitStatus>> {
        let run = self.run_mut(container)?;
        if run.exit.is_none()
            && let Some(child) = run.child.as_mut()
        {
            run.exit = child.try_wait()?;
        }
        Ok(run.exit)
    }

    /// Waits for `container` to exit.
    pub async fn wait_exit(
        &mut self,
        container: &str,
        timeout: Duration,
    ) -> anyhow::Result<ExitStatus> {
        let run = self.run_mut(container)?;
        if let Some(exit) = run.exit {
            return Ok(exit);
        }
        let child = run
            .child
            .as_mut()
            .with_context(|| format!("container {container} has no process"))?;
        let exit = tokio::time::timeout(timeout, child.wait())
            .await
            .with_context(|| format!("container {container} still runs after {timeout:?}"))??;
        run.exit = Some(exit);
        Ok(exit)
    }

    /// Stops the pod as the kubelet does: SIGTERM to every app container, SIGKILL to
    /// what still runs after `terminationGracePeriodSeconds`; then the sidecars, last
    /// first, in what is left of that period. Returns how each container process
    /// exited, in stop order.
    pub async fn stop(mut self) -> anyhow::Result<Vec<(String, ExitStatus)>> {
        for task in self.tasks.drain(..) {
            task.abort();
        }
        let deadline = Instant::now() + self.grace;
        let mut exits = Vec::new();
        let apps: Vec<usize> = (0..self.runs.len())
            .filter(|i| self.runs[*i].role == Role::App)
            .collect();
        for &i in &apps {
            self.runs[i].signal(Signal::SIGTERM);
        }
        for &i in &apps {
            if let Some(exit) = self.runs[i].reap(deadline).await? {
                exits.push((self.runs[i].spec.name.clone(), exit));
            }
        }
        let sidecars: Vec<usize> = (0..self.runs.len())
            .rev()
            .filter(|i| self.runs[*i].role == Role::Sidecar)
            .collect();
        for i in sidecars {
            self.runs[i].signal(Signal::SIGTERM);
            if let Some(exit) = self.runs[i].reap(deadline).await? {
                exits.push((self.runs[i].spec.name.clone(), exit));
            }
        }
        Ok(exits)
    }
}

impl Run {
    /// Sends `signal` to the container's process (as a runtime does to its pid 1).
    fn signal(&self, signal: Signal) {
        if self.exit.is_none()
            && let Some(pid) = self.child.as_ref().and_then(|c| c.id())
            && let Ok(pid) = i32::try_from(pid)
        {
            let _ = kill(Pid::from_raw(pid), signal);
        }
    }

    /// Waits for the process to exit until `deadline`, then SIGKILLs it; either way
    /// kills what else is left in its group.
    async fn reap(&mut self, deadline: Instant) -> anyhow::Result<Option<ExitStatus>> {
        let Some(child) = self.child.as_mut() else {
            return Ok(None);
        };
        if self.exit.is_none() {
            let exit = match tokio::time::timeout_at(deadline, child.wait()).await {
                Ok(exit) => exit?,
                Err(_) => {
                    let _ = child.start_kill();
                    child.wait().await?
                }
            };
            self.exit = Some(exit);
        }
        if let Some(group) = self.group.take() {
            let _ = killpg(group, Signal::SIGKILL);
        }
        Ok(self.exit)
    }
}

impl Drop for RunningPod {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        if std::thread::panicking() {
            eprintln!(
                "kubelet: pod {}/{} at the panic:\n{}",
                self.namespace,
                self.name,
                self.all_logs()
            );
        }
        for run in &mut self.runs {
            if let Some(group) = run.group.take() {
                let _ = killpg(group, Signal::SIGKILL);
            }
            if let Some(child) = run.child.as_mut() {
                let _ = child.start_kill();
            }
        }
    }
}

/// Sends the startup probe until it passes, as the kubelet does; why not, if it fails
/// `failureThreshold` times in a row (the kubelet would restart the container), cannot
/// be sent, or `child` exits first.
async fn until_started(
    prober: &Prober,
    container: &Container,
    probe: &k8s_openapi::api::core::v1::Probe,
    mut child: Option<&mut Child>,
) -> Result<(), String> {
    let timing = Timing::of(probe);
    tokio::time::sleep(timing.initial_delay).await;
    let mut failures = 0;
    loop {
        if let Some(exit) = child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            return Err(format!("exited ({exit}) before its startupProbe passed"));
        }
        match prober.probe(container, probe).await {
            Ok(outcome) if outcome.success => return Ok(()),
            Ok(outcome) => {
                failures += 1;
                if failures >= timing.failure_threshold {
                    return Err(format!(
                        "startupProbe failed {failures} times (the kubelet would restart it): \
                         {outcome:?}"
                    ));
                }
            }
            Err(e) => return Err(format!("startupProbe: {e:#}")),
        }
        tokio::time::sleep(timing.period).await;
    }
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn exit_signal(exit: &ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    exit.signal().unwrap_or(0)
}
