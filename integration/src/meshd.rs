//! A real `meshd` process on free ports, and `meshctl` to talk to it.
//!
//! meshd runs on this machine's loopback, or inside a lab pod's network namespace
//! ([`Meshd::start_in`]): then its xDS port is on the pod's address for the other pods,
//! its admin and health ports on that namespace's loopback, and everything the harness
//! does with it (HTTP to those ports, `meshctl`) runs in the namespace too.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use meshd::admin::SnapshotSummary;
use meshd::identity::RotationStatus;
use meshd::xds::serve::status::ProxyStatus;
pub use meshd::xds::serve::status::XdsFlavor;
use tempfile::TempDir;
use tokio::process::{Child, Command};

use crate::net::free_port;
use crate::netns::{LabPod, Netns};
use crate::tools::meshd_binary;
use crate::wait::eventually;

pub struct Meshd {
    child: Child,
    pub xds_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub health_addr: SocketAddr,
    work: TempDir,
    /// For the health port (plain HTTP).
    http: reqwest::Client,
    /// With the Kubernetes source: the cluster whose Secret holds the root.
    kube: Option<kube::Client>,
    meshd_namespace: String,
    /// How it was started, to start it again the same way ([`Meshd::kill_and_restart`]).
    command: Vec<std::ffi::OsString>,
    env: Vec<(String, String)>,
    /// The lab namespace meshd runs in, if not this machine's.
    netns: Option<Netns>,
}

impl std::fmt::Debug for Meshd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Meshd")
            .field("xds_addr", &self.xds_addr)
            .field("admin_addr", &self.admin_addr)
            .field("health_addr", &self.health_addr)
            .finish_non_exhaustive()
    }
}

impl Meshd {
    /// Starts meshd on `config_dir` (debounce 50 ms) and waits until it serves.
    pub async fn start(config_dir: &Path) -> anyhow::Result<Meshd> {
        Self::start_with(config_dir, &["--debounce", "50ms"]).await
    }

    /// Starts meshd with extra command-line arguments and waits until it is ready (it
    /// has read the config directory).
    pub async fn start_with(config_dir: &Path, extra: &[&str]) -> anyhow::Result<Meshd> {
        let meshd = Self::spawn_on_dir(config_dir, extra, &[]).await?;
        meshd.wait_ready().await?;
        Ok(meshd)
    }

    /// Starts meshd on `config_dir` with extra arguments and environment variables, and
    /// returns once its admin API answers, without waiting for it to be ready.
    pub async fn spawn_on_dir(
        config_dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Meshd> {
        let source = ["--config-dir".into(), config_dir.as_os_str().to_owned()];
        Self::spawn(&source, extra, env, None, None).await
    }

    /// Starts meshd on `config_dir` inside the lab pod `pod` (as the control-plane pod
    /// of a cluster), with extra arguments, and waits until it is ready. Its xDS port is
    /// `<pod IP>:15012`, where the other pods' agents reach it.
    pub async fn start_in(
        pod: &LabPod,
        config_dir: &Path,
        extra: &[&str],
    ) -> anyhow::Result<Meshd> {
        let source = ["--config-dir".into(), config_dir.as_os_str().to_owned()];
        let meshd = Self::spawn(&source, extra, &[], None, Some(pod)).await?;
        meshd.wait_ready().await?;
        Ok(meshd)
    }

    /// Starts meshd on the Kubernetes API of `kubeconfig` and waits until it is ready
    /// (its initial lists are done). Its CA directory gets the root from the cluster's
    /// Secret, so `meshctl bootstrap` and [`Meshd::ca_dir`] work as with a directory.
    pub async fn start_kubernetes(
        api: &crate::kube_api::KubeApi,
        extra: &[&str],
    ) -> anyhow::Result<Meshd> {
        let meshd = Self::spawn_kubernetes(api, extra).await?;
        meshd.wait_ready().await?;
        meshd.sync_ca_dir().await?;
        Ok(meshd)
    }

    /// Starts meshd on the Kubernetes API of `api` without waiting for it to be ready.
    pub async fn spawn_kubernetes(
        api: &crate::kube_api::KubeApi,
        extra: &[&str],
    ) -> anyhow::Result<Meshd> {
        let source = [
            "--source".into(),
            "kubernetes".into(),
            "--kubeconfig".into(),
            api.kubeconfig().as_os_str().to_owned(),
        ];
        Self::spawn(&source, extra, &[], Some(api.client.clone()), None).await
    }

    async fn spawn(
        source: &[std::ffi::OsString],
        extra: &[&str],
        env: &[(&str, &str)],
        kube: Option<kube::Client>,
        pod: Option<&LabPod>,
    ) -> anyhow::Result<Meshd> {
        let work = tempfile::Builder::new().prefix("meshd-run-").tempdir()?;
        let xds_addr: SocketAddr = match pod {
            Some(pod) => pod.addr(15012),
            None => ([127, 0, 0, 1], free_port()).into(),
        };
        let admin_addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let health_addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let meshd_namespace = extra
            .iter()
            .position(|a| *a == "--namespace")
            .and_then(|i| extra.get(i + 1))
            .unwrap_or(&meshd::cli::DEFAULT_MESHD_NAMESPACE)
            .to_string();
        // A test may choose its own log level.
        let log = if extra.contains(&"--log") {
            &[][..]
        } else {
            &["--log", "info,meshd=debug"][..]
        };
        let mut command: Vec<std::ffi::OsString> = source.to_vec();
        for (flag, addr) in [
            ("--xds-address", xds_addr),
            ("--admin-address", admin_addr),
            ("--health-address", health_addr),
        ] {
            command.extend([flag.into(), addr.to_string().into()]);
        }
        command.extend(["--ca-dir".into(), work.path().join("ca").into_os_string()]);
        command.extend(log.iter().chain(extra).map(Into::into));
        let env: Vec<(String, String)> = (env.iter())
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let netns = pod.map(|p| p.netns.clone());
        let child = start_process(work.path(), &command, &env, netns.as_ref())?;
        let mut meshd = Meshd {
            child,
            xds_addr,
            admin_addr,
            health_addr,
            work,
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(5))
                .build()?,
            kube,
            meshd_namespace,
            command,
            env,
            netns,
        };
        meshd.wait_serving().await?;
        Ok(meshd)
    }

    /// Kills meshd (SIGKILL: no shutdown of any kind) and starts it again with the same
    /// command line: same ports, CA directory and config, so sidecars reconnect to it.
    /// Returns once it is ready.
    pub async fn kill_and_restart(&mut self) -> anyhow::Result<()> {
        self.child.start_kill()?;
        self.child.wait().await?;
        self.child = start_process(
            self.work.path(),
            &self.command,
            &self.env,
            self.netns.as_ref(),
        )?;
        self.wait_serving().await?;
        self.wait_ready().await
    }

    /// Waits until the health port answers; fails if meshd exits first.
    async fn wait_serving(&mut self) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("meshd exited ({status})\nmeshd log:\n{}", self.log());
            }
            match self.healthz().await {
                Ok(_) => break,
                Err(e) if tokio::time::Instant::now() > deadline => {
                    bail!(
                        "meshd did not serve within 20s: {e:#}\nmeshd log:\n{}",
                        self.log()
                    )
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        Ok(())
    }

    /// GET `path` on the health port: (status, body).
    async fn health_get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        let (http, url) = (self.http.clone(), format!("{}{path}", self.health_url()));
        self.within(async move {
            let resp = http.get(&url).send().await?;
            Ok((resp.status().as_u16(), resp.text().await?))
        })
        .await
    }

    /// Polls `fut` where meshd's loopback is: in its lab namespace, if it has one.
    async fn within<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = anyhow::Result<T>> + Send + 'static,
    ) -> anyhow::Result<T> {
        match &self.netns {
            Some(netns) => netns.run(fut).await,
            None => fut.await,
        }
    }

    /// `/healthz` on the health port.
    pub async fn healthz(&self) -> anyhow::Result<String> {
        let (status, body) = self.health_get("/healthz").await?;
        anyhow::ensure!(status == 200, "/healthz: {status}: {body}");
        Ok(body)
    }

    /// Waits until `/readyz` says ready.
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        eventually("meshd to be ready", Duration::from_secs(30), || async {
            let (status, body) = self.readyz().await?;
            anyhow::ensure!(status == 200, "{status}: {body}");
            Ok(())
        })
        .await
    }

    /// `/readyz`: (HTTP status, body).
    pub async fn readyz(&self) -> anyhow::Result<(u16, String)> {
        self.health_get("/readyz").await
    }

    /// How long one `/healthz` takes to answer 200.
    pub async fn healthz_latency(&self) -> anyhow::Result<Duration> {
        let asked = tokio::time::Instant::now();
        self.healthz().await?;
        Ok(asked.elapsed())
    }

    /// Stops meshd as an orchestrator would: SIGTERM, then wait for it to exit.
    pub async fn terminate(mut self) -> anyhow::Result<String> {
        if let Some(pid) = self.child.id() {
            std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status()?;
        }
        tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .context("meshd did not stop within 10s of SIGTERM")??;
        Ok(self.log())
    }

    /// meshd's process id.
    /// Pins every thread of meshd to one CPU core (`taskset`), for benchmarks that
    /// measure what one core does.
    pub fn pin_to_core(&self, core: usize) -> anyhow::Result<()> {
        let pid = self.pid().context("meshd's pid")?;
        let pinned = std::process::Command::new("taskset")
            .args(["-a", "-cp", &core.to_string(), &pid.to_string()])
            .output()
            .context("taskset (util-linux)")?;
        anyhow::ensure!(pinned.status.success(), "taskset: {pinned:?}");
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// meshd's CA directory (root certificate and key), for minting test certificates.
    pub fn ca_dir(&self) -> PathBuf {
        self.work.path().join("ca")
    }

    /// The admin API (HTTPS, operator certificate required).
    pub fn admin_url(&self) -> String {
        format!("https://{}", self.admin_addr)
    }

    /// The health port (plain HTTP: /healthz, /readyz, /metrics).
    pub fn health_url(&self) -> String {
        format!("http://{}", self.health_addr)
    }

    /// meshd's namespace (`--namespace`): part of its identity.
    pub fn meshd_namespace(&self) -> &str {
        &self.meshd_namespace
    }

    /// meshd's identity, as its admin API must present it.
    pub fn identity(&self) -> anyhow::Result<meshd_ca::SpiffeId> {
        Ok(meshd_ca::SpiffeId::new(
            meshd_ca::DEFAULT_TRUST_DOMAIN,
            &self.meshd_namespace,
            meshd::identity::MESHD_SERVICE_ACCOUNT,
        )?)
    }

    /// With the Kubernetes source: writes the root files of the cluster's Secret into
    /// [`Meshd::ca_dir`] (they follow a root rotation there), so operator certificates
    /// and `meshctl bootstrap` work as with a directory.
    async fn sync_ca_dir(&self) -> anyhow::Result<()> {
        let Some(client) = &self.kube else {
            return Ok(());
        };
        let secret = kube::Api::<k8s_openapi::api::core::v1::Secret>::namespaced(
            client.clone(),
            &self.meshd_namespace,
        )
        .get(meshd::cluster::ca_secret::SECRET_NAME)
        .await
        .context("reading meshd's CA Secret")?;
        let data = secret.data.unwrap_or_default();
        let dir = self.ca_dir();
        std::fs::create_dir_all(&dir)?;
        use meshd_ca::store::*;
        for (file, mode) in [
            (ROOT_CERT_FILE, 0o644),
            (ROOT_KEY_FILE, 0o600),
            (NEXT_ROOT_CERT_FILE, 0o644),
            (NEXT_ROOT_KEY_FILE, 0o600),
        ] {
            match data.get(file) {
                Some(text) => write_file(
                    &dir.join(file),
                    std::str::from_utf8(&text.0).context("PEM in the Secret")?,
                    mode,
                    true,
                )?,
                None => {
                    let _ = std::fs::remove_file(dir.join(file));
                }
            }
        }
        Ok(())
    }

    /// The roots meshd's certificates chain to now (PEM), from the CA directory (or the
    /// cluster's Secret).
    pub async fn trust_bundle_pem(&self) -> anyhow::Result<String> {
        self.sync_ca_dir().await?;
        let mut pem = String::new();
        for file in [
            meshd_ca::store::ROOT_CERT_FILE,
            meshd_ca::store::NEXT_ROOT_CERT_FILE,
        ] {
            if let Ok(text) = std::fs::read_to_string(self.ca_dir().join(file)) {
                pem.push_str(&text);
            }
        }
        Ok(pem)
    }

    /// A client for the admin API, with an operator certificate minted from the CA
    /// directory, as `meshctl` does.
    pub async fn admin_client(&self) -> anyhow::Result<meshd::operator::AdminClient> {
        self.sync_ca_dir().await?;
        let ca = meshd::cli::CaArgs {
            ca_dir: self.ca_dir(),
            ca_cert_chain: None,
            ca_key: None,
            trust_domain: meshd_ca::DEFAULT_TRUST_DOMAIN.to_string(),
        }
        .open_existing_with_bundle(meshd::operator::MINTED_TTL)?;
        let credentials = meshd::operator::Credentials::mint(
            &ca.signer,
            ca.trust_bundle_pem,
            "harness",
            meshd::operator::MINTED_TTL,
        )?;
        Ok(credentials.client(&self.admin_url(), &self.identity()?)?)
    }

    /// Everything meshd has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.work.path().join("meshd.log")).unwrap_or_default()
    }

    /// GET `path` on the admin API, as an operator.
    pub async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        Ok(serde_json::from_str(&self.get_text(path).await?)?)
    }

    /// GET `path` on the admin API, as an operator; the body.
    pub async fn get_text(&self, path: &str) -> anyhow::Result<String> {
        let (client, path) = (self.admin_client().await?, path.to_string());
        self.within(async move {
            let resp = client.request(hyper::Method::GET, &path, None).await?;
            anyhow::ensure!(
                resp.status.is_success(),
                "{path}: {}: {}",
                resp.status,
                resp.text()
            );
            Ok(resp.text())
        })
        .await
    }

    pub async fn snapshot(&self) -> anyhow::Result<SnapshotSummary> {
        self.get_json("/debug/snapshot").await
    }

    /// `/metrics` (Prometheus text).
    pub async fn metrics(&self) -> anyhow::Result<String> {
        let (status, body) = self.health_get("/metrics").await?;
        anyhow::ensure!(status == 200, "/metrics: {status}: {body}");
        Ok(body)
    }

    pub async fn proxies(&self) -> anyhow::Result<Vec<ProxyStatus>> {
        self.get_json("/debug/proxies").await
    }

    /// Waits until meshd has published a snapshot newer than `version`; returns it.
    pub async fn wait_snapshot_after(&self, version: u64) -> anyhow::Result<SnapshotSummary> {
        eventually(
            &format!("a mesh snapshot newer than {version}"),
            Duration::from_secs(10),
            || async {
                let s = self.snapshot().await?;
                if s.version > version {
                    Ok(s)
                } else {
                    bail!("snapshot is still {}", s.version)
                }
            },
        )
        .await
    }

    /// Waits until the proxy `node_id` has ACKed everything meshd sent it for snapshot
    /// `version` or later, including at least clusters and listeners.
    pub async fn wait_synced(&self, node_id: &str, version: u64) -> anyhow::Result<ProxyStatus> {
        eventually(
            &format!("proxy {node_id} to ACK snapshot {version}"),
            Duration::from_secs(15),
            || async {
                let proxies = self.proxies().await?;
                let p = proxies
                    .into_iter()
                    .find(|p| p.node_id == node_id)
                    .with_context(|| format!("{node_id} is not connected"))?;
                let acked = |t: &str| p.types.get(t).is_some_and(|s| !s.pending && !s.nacked);
                if p.synced_version.is_some_and(|v| v >= version) && acked("cds") && acked("lds") {
                    Ok(p)
                } else {
                    bail!("{node_id} is at {:?}: {:?}", p.synced_version, p.types)
                }
            },
        )
        .await
    }

    /// Waits until a root rotation completed (`/ca/status` idle with a completion
    /// time); returns the last status and the phases seen on the way, in order.
    pub async fn wait_rotation_done(
        &self,
        timeout: Duration,
    ) -> anyhow::Result<(RotationStatus, Vec<String>)> {
        let phases = std::sync::Mutex::new(Vec::<String>::new());
        let done = eventually("the rotation to complete", timeout, || async {
            let s: RotationStatus = self.get_json("/ca/status").await?;
            {
                let mut seen = phases.lock().unwrap_or_else(|p| p.into_inner());
                if seen.last() != Some(&s.phase) {
                    seen.push(s.phase.clone());
                }
            }
            anyhow::ensure!(
                s.phase == "idle" && s.last_completed_at.is_some(),
                "at {}",
                s.phase
            );
            Ok(s)
        })
        .await?;
        Ok((done, phases.into_inner().unwrap_or_else(|p| p.into_inner())))
    }

    /// Runs `meshctl` with `args`, pointed at this meshd's admin API and CA directory
    /// (from which it mints its operator certificate).
    pub async fn meshctl(&self, args: &[&str]) -> anyhow::Result<std::process::Output> {
        self.sync_ca_dir().await?;
        let meshctl = meshd_binary("meshctl")?;
        let mut command = match &self.netns {
            Some(netns) => netns.command(meshctl),
            None => Command::new(meshctl),
        };
        command
            .args(args)
            .env("MESHD_ADMIN", self.admin_url())
            .env("MESHD_CA_DIR", self.ca_dir())
            .env("MESHD_NAMESPACE", &self.meshd_namespace)
            .output()
            .await
            .context("cannot run meshctl")
    }

    /// Writes a sidecar bootstrap with `meshctl bootstrap`; returns its path.
    #[allow(clippy::too_many_arguments)]
    pub async fn bootstrap(
        &self,
        namespace: &str,
        pod: &str,
        service_account: &str,
        flavor: XdsFlavor,
        admin_port: u16,
        dir: &Path,
        extra: &[String],
    ) -> anyhow::Result<PathBuf> {
        let path = dir.join(format!("{pod}.{namespace}"));
        let flavor = match flavor {
            XdsFlavor::Sotw => "sotw",
            XdsFlavor::Delta => "delta",
        };
        let out = self
            .meshctl(
                &[
                    "bootstrap",
                    "--namespace",
                    namespace,
                    "--pod",
                    pod,
                    "--service-account",
                    service_account,
                    "--ca-dir",
                    self.ca_dir().to_str().context("non-UTF-8 temp path")?,
                    "--xds-address",
                    &self.xds_addr.to_string(),
                    "--admin-port",
                    &admin_port.to_string(),
                    "--xds-protocol",
                    flavor,
                    "-o",
                    path.to_str().context("non-UTF-8 temp path")?,
                ]
                .into_iter()
                .chain(extra.iter().map(String::as_str))
                .collect::<Vec<_>>(),
            )
            .await?;
        if !out.status.success() {
            bail!(
                "meshctl bootstrap failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(path.join(meshd_sidecar::bootstrap::BOOTSTRAP_FILE))
    }
}

/// Starts the meshd process, appending its output to `work/meshd.log` (a restart's log
/// follows the one before).
fn start_process(
    work: &Path,
    command: &[std::ffi::OsString],
    env: &[(String, String)],
    netns: Option<&Netns>,
) -> anyhow::Result<Child> {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(work.join("meshd.log"))?;
    let meshd = meshd_binary("meshd")?;
    match netns {
        Some(netns) => netns.command(meshd),
        None => Command::new(meshd),
    }
    .args(command)
    .envs(env.iter().map(|(k, v)| (k, v)))
    .stdin(Stdio::null())
    .stdout(log_file.try_clone()?)
    .stderr(log_file)
    .kill_on_drop(true)
    .spawn()
    .context("cannot start meshd")
}
