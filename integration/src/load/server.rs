//! The control plane under load: meshd from this build (the default), any server
//! started by a command (`--server-cmd`), or one already running (`--target`).
//!
//! A command runs as `sh -c CMD` in a process group of its own (the whole group is
//! stopped at the end), with the scenario in its environment:
//!
//! | variable | what |
//! |---|---|
//! | `XDS_LOAD_ADDRESS` | `127.0.0.1:<port>` to serve ADS (gRPC) on |
//! | `XDS_LOAD_SCENARIO_DIR` | the scenario: Kubernetes YAML in meshd's file-source layout, rewritten for every change |
//! | `XDS_LOAD_CA_DIR` | the mesh CA (`root-cert.pem`, `root-key.pem`: meshd's `--ca-dir`) |
//! | `XDS_LOAD_SERVER_CERT`, `XDS_LOAD_SERVER_KEY` | a serving certificate chain and key (PEM) from that CA, for the DNS name `meshd` the proxies check |
//! | `XDS_LOAD_TRUST_BUNDLE` | the roots the proxies' client certificates chain to (PEM) |
//!
//! It is measured as soon as it accepts connections on the address.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use super::process::ProcessStats;
use super::scenario::write_ca;
use crate::meshd::Meshd;
use crate::net::free_port;

/// How long a command gets to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Server {
    /// Where its ADS port is.
    pub addr: SocketAddr,
    /// The CA it trusts, for the proxies' certificates.
    pub ca_dir: PathBuf,
    /// Its process, if known: RSS and CPU.
    pub stats: Option<ProcessStats>,
    kind: Kind,
}

// One per run: its size does not matter.
#[allow(clippy::large_enum_variant)]
enum Kind {
    Meshd(Meshd),
    Command(Command),
    Target,
}

impl Server {
    /// meshd from this build on `scenario_dir`, once ready.
    pub async fn meshd(scenario_dir: &Path) -> anyhow::Result<Server> {
        let meshd =
            Meshd::start_with(scenario_dir, &["--debounce", "100ms", "--log", "warn"]).await?;
        Ok(Server {
            addr: meshd.xds_addr,
            ca_dir: meshd.ca_dir(),
            stats: Some(ProcessStats::watch(
                meshd.pid().context("meshd has no pid")?,
            )),
            kind: Kind::Meshd(meshd),
        })
    }

    /// `sh -c command` with the variables above, a CA made in `work`, once it accepts
    /// connections.
    pub async fn command(
        command: &str,
        scenario_dir: &Path,
        work: &Path,
    ) -> anyhow::Result<Server> {
        let ca_dir = work.join("ca");
        let files = write_ca(&ca_dir, work)?;
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let log = work.join("server.log");
        let log_file = std::fs::File::create(&log)?;
        let child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(command)
            .env("XDS_LOAD_ADDRESS", addr.to_string())
            .env("XDS_LOAD_SCENARIO_DIR", scenario_dir)
            .env("XDS_LOAD_CA_DIR", &ca_dir)
            .env("XDS_LOAD_SERVER_CERT", &files.cert)
            .env("XDS_LOAD_SERVER_KEY", &files.key)
            .env("XDS_LOAD_TRUST_BUNDLE", &files.trust_bundle)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot run sh -c {command:?}"))?;
        let pid = child.id().context("the server command has no pid")?;
        let mut command = Command {
            child,
            group: Pid::from_raw(pid as i32),
            log,
        };
        command.wait_accepting(addr).await?;
        Ok(Server {
            addr,
            ca_dir,
            stats: Some(ProcessStats::watch(pid)),
            kind: Kind::Command(command),
        })
    }

    /// A server already running at `addr`, trusting the CA in `ca_dir`; measured if
    /// its `pid` is given.
    pub fn target(addr: SocketAddr, ca_dir: &Path, pid: Option<u32>) -> Server {
        Server {
            addr,
            ca_dir: ca_dir.to_path_buf(),
            stats: pid.map(ProcessStats::watch),
            kind: Kind::Target,
        }
    }

    /// A counter meshd exports (summed over its labels); `None` for other servers.
    pub async fn metric(&self, name: &str) -> anyhow::Result<Option<f64>> {
        let Kind::Meshd(meshd) = &self.kind else {
            return Ok(None);
        };
        let text = meshd.metrics().await?;
        Ok(Some(
            text.lines()
                .filter(|l| l.starts_with(name))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum(),
        ))
    }

    /// Fails if a server this tool started has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Kind::Command(command) = &mut self.kind {
            command.check_running()?;
        }
        Ok(())
    }
}

struct Command {
    child: tokio::process::Child,
    group: Pid,
    log: PathBuf,
}

impl Command {
    fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "the server command exited ({status}); its output ({}):\n{}",
                self.log.display(),
                tail(&self.log)
            );
        }
        Ok(())
    }

    async fn wait_accepting(&mut self, addr: SocketAddr) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            self.check_running()?;
            match tokio::net::TcpStream::connect(addr).await {
                Ok(_) => return Ok(()),
                Err(e) if tokio::time::Instant::now() > deadline => bail!(
                    "the server command did not accept connections on {addr} (XDS_LOAD_ADDRESS) within {START_TIMEOUT:?}: {e}; its output:\n{}",
                    tail(&self.log)
                ),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
}

impl Drop for Command {
    /// Stops the whole group: TERM, and KILL for what is left after 5 s.
    fn drop(&mut self) {
        let _ = killpg(self.group, Signal::SIGTERM);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if self.child.try_wait().is_ok_and(|s| s.is_some()) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = killpg(self.group, Signal::SIGKILL);
    }
}

/// The last 40 lines of a log.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
