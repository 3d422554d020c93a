//! A lab of network namespaces on this machine: "pods" with their own IP on a private
//! bridge, for tests of transparent capture with the real kernel's netfilter.
//!
//! ```text
//!   meshd-<pid>-<n>-bridge        one namespace holding the Linux bridge `br0`
//!                                 (10.201.<n>.254 on it once `Lab::node` is asked: the node)
//!     br0 ── v1 ─ eth0  meshd-<pid>-<n>-meshd     10.201.<n>.1/16   (meshd itself)
//!         ── v2 ─ eth0  meshd-<pid>-<n>-web-1     10.201.<n>.2/16
//!         ── v3 ─ eth0  meshd-<pid>-<n>-client-1  10.201.<n>.3/16
//! ```
//!
//! Every pod namespace has `lo` up, its address and a default route `dev eth0`: a Service
//! VIP (10.96.x.y) must be routable for `connect()` to reach the OUTPUT nat hook, where
//! capture redirects it to Envoy. The lab's addresses exist only inside its namespaces
//! (10.201.0.0/16 and 10.96.0.0/16 are not routed on the machine this was written on
//! either); the host's own interfaces, routes and firewall are never touched: everything
//! is made with `ip -n` inside namespaces the lab created.
//!
//! How code reaches into a namespace:
//! - a process: [`Netns::command`] (`ip netns exec NS program …`, which execs, so the
//!   child's pid is the program's own);
//! - an in-process socket: [`Netns::run`] polls a future on a thread that joined the
//!   namespace (`setns(CLONE_NEWNET)`), with its own current-thread tokio runtime, so
//!   every socket the future creates (an HTTP client, a `connect`) lives in that
//!   namespace; [`Netns::listen`] binds a listener there and hands it to the caller's
//!   runtime (a socket keeps its namespace wherever it is polled), which is how an app
//!   of [`crate::apps`] serves inside a pod.
//!
//! Cleanup: every namespace is a guard ([`Netns`]) deleted when its last handle drops —
//! also while a panic unwinds. Processes still inside are killed first (by pid, from
//! `ip netns pids`: only the harness starts processes there). Names carry the test
//! process's pid, so parallel test binaries never collide; what a killed run left behind
//! (its pid is gone) is removed by the next [`Lab::new`].

use std::ffi::OsStr;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};

use anyhow::{Context, bail};
use tokio::sync::{mpsc, oneshot};

/// Where `ip netns` keeps its named namespaces.
const NETNS_DIR: &str = "/run/netns";
/// The lab's subnet: `10.201.<lab>.<pod>/16`.
const SUBNET_PREFIX: [u8; 2] = [10, 201];
/// The uid and gid Envoy runs as in a pod (meshd-agent init exempts its traffic).
pub use meshd_sidecar::capture::PROXY_UID;

/// Tools the lab runs; a missing one fails the test with this advice.
const TOOLS: [(&str, &str); 3] = [
    ("ip", "apt-get install -y iproute2"),
    ("iptables", "apt-get install -y iptables"),
    ("setpriv", "apt-get install -y util-linux"),
];

/// A network namespace the lab made: deleted (and the processes inside killed) when the
/// last clone drops.
#[derive(Clone)]
pub struct Netns {
    inner: Arc<NetnsInner>,
}

struct NetnsInner {
    name: String,
    jobs: mpsc::UnboundedSender<Job>,
}

type Job = Pin<Box<dyn Future<Output = ()> + Send>>;

impl std::fmt::Debug for Netns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Netns").field(&self.inner.name).finish()
    }
}

impl Netns {
    /// Creates the namespace `name` with `lo` up, and its thread.
    fn create(name: &str) -> anyhow::Result<Netns> {
        ip(&["netns", "add", name]).with_context(|| {
            format!("cannot create network namespace {name} (the lab needs root)")
        })?;
        // From here on the guard deletes it, whatever fails next.
        let jobs = match spawn_thread(name) {
            Ok(jobs) => jobs,
            Err(e) => {
                delete_netns(name);
                return Err(e);
            }
        };
        let netns = Netns {
            inner: Arc::new(NetnsInner {
                name: name.to_string(),
                jobs,
            }),
        };
        netns.ip(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// `/run/netns/<name>`: for `nsenter --net=` or `setns`.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.inner.name)
    }

    /// `program` run inside the namespace (`ip netns exec <name> program`); add its
    /// arguments.
    pub fn command(&self, program: impl AsRef<OsStr>) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("ip");
        cmd.args(["netns", "exec", self.name()]).arg(program);
        cmd
    }

    /// `ip -n <name> args…`, failing with ip's message.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["-n", self.name()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Polls `fut` to completion inside the namespace: every socket it creates lives
    /// there. `fut` must be lazy (an `async` block or `async fn` call creates nothing
    /// before it is polled). Dropping the returned future cancels `fut`.
    pub async fn run<T, F>(&self, fut: F) -> anyhow::Result<T>
    where
        F: Future<Output = anyhow::Result<T>> + Send + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job = async move {
            let mut tx = tx;
            tokio::select! {
                result = fut => { let _ = tx.send(result); }
                () = tx.closed() => {}
            }
        };
        self.inner
            .jobs
            .send(Box::pin(job))
            .map_err(|_| anyhow::anyhow!("the thread of namespace {} has stopped", self.name()))?;
        rx.await
            .with_context(|| format!("the thread of namespace {} has stopped", self.name()))?
    }

    /// A TCP listener on `addr` inside the namespace, for the caller's runtime.
    pub async fn listen(&self, addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
        let name = self.name().to_string();
        let listener = self
            .run(async move {
                let l = std::net::TcpListener::bind(addr)
                    .with_context(|| format!("cannot listen on {addr} in {name}"))?;
                l.set_nonblocking(true)?;
                Ok(l)
            })
            .await?;
        Ok(tokio::net::TcpListener::from_std(listener)?)
    }

    /// Relays every TCP connection made to `listen` inside this namespace to `to` in the
    /// test process's own network (e.g. a meshd on this machine's loopback, which pods
    /// cannot reach otherwise), bytes unchanged both ways (TLS passes through). Stops
    /// when the returned task is aborted or dropped with the runtime.
    pub async fn forward(
        &self,
        listen: SocketAddr,
        to: SocketAddr,
    ) -> anyhow::Result<tokio::task::JoinHandle<()>> {
        let listener = self.listen(listen).await?;
        Ok(tokio::spawn(async move {
            while let Ok((mut inside, _)) = listener.accept().await {
                tokio::spawn(async move {
                    if let Ok(mut outside) = tokio::net::TcpStream::connect(to).await {
                        let _ = inside.set_nodelay(true);
                        let _ = outside.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut inside, &mut outside).await;
                    }
                });
            }
        }))
    }

    /// The pids of the processes in the namespace.
    pub fn pids(&self) -> anyhow::Result<Vec<i32>> {
        netns_pids(self.name())
    }
}

impl Drop for NetnsInner {
    fn drop(&mut self) {
        // The thread ends when its job channel closes (this sender goes with self).
        delete_netns(&self.name);
    }
}

/// A thread in namespace `name` polling the jobs it is sent on a current-thread
/// runtime. Threads it starts (tokio's blocking pool) inherit the namespace.
fn spawn_thread(name: &str) -> anyhow::Result<mpsc::UnboundedSender<Job>> {
    let path = Path::new(NETNS_DIR).join(name);
    let (jobs, mut rx) = mpsc::unbounded_channel::<Job>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
    std::thread::Builder::new()
        .name(format!("netns {name}"))
        .spawn(move || {
            let entered = (|| {
                let file = std::fs::File::open(&path)
                    .with_context(|| format!("cannot open {}", path.display()))?;
                nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("cannot join {}", path.display()))?;
                Ok(tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?)
            })();
            let runtime = match entered {
                Ok(rt) => {
                    let _ = ready_tx.send(Ok(()));
                    rt
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            runtime.block_on(async move {
                while let Some(job) = rx.recv().await {
                    tokio::spawn(job);
                }
            });
        })
        .context("cannot start a thread")?;
    ready_rx
        .recv()
        .context("the namespace thread died before it started")??;
    Ok(jobs)
}

/// Kills what still runs in `name` and deletes it; errors are only printed (this runs
/// in `Drop`).
fn delete_netns(name: &str) {
    for pid in netns_pids(name).unwrap_or_default() {
        // By pid, from the namespace itself: only the harness starts processes there.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    if let Err(e) = ip(&["netns", "delete", name]) {
        eprintln!("lab: cannot delete network namespace {name}: {e:#}");
    }
}

fn netns_pids(name: &str) -> anyhow::Result<Vec<i32>> {
    Ok(ip(&["netns", "pids", name])?
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .filter(|p| *p > 1)
        .collect())
}

/// Runs `ip args…`; its stdout, or an error with its stderr.
fn ip(args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .context("cannot run `ip` (apt-get install -y iproute2)")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Fails with an install hint unless every tool the lab runs is on PATH.
pub fn require_tools(tools: &[(&str, &str)]) -> anyhow::Result<()> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for (tool, install) in tools {
        if !std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()) {
            bail!("the namespace lab needs `{tool}`, which is not on PATH ({install})");
        }
    }
    Ok(())
}

/// A bridge and the pods on it. Dropping it deletes the bridge's namespace; each
/// [`LabPod`] deletes its own.
#[derive(Debug)]
pub struct Lab {
    /// `meshd-<pid>-<n>`: the prefix of everything the lab names.
    prefix: String,
    /// `<n>`: the third octet of the lab's addresses.
    index: u8,
    bridge: Netns,
    next_host: AtomicU8,
    next_vip: AtomicU8,
    /// The node's address on `br0`, once [`Lab::node`] gave it one.
    node_ip: std::sync::Mutex<Option<Ipv4Addr>>,
}

/// A pod: its namespace and its address on the lab's bridge.
#[derive(Debug, Clone)]
pub struct LabPod {
    pub name: String,
    pub ip: Ipv4Addr,
    pub netns: Netns,
}

impl Lab {
    /// A new lab: its bridge namespace with the bridge `br0` up, no pods yet. First
    /// removes what killed test runs left (their pid is gone).
    pub fn new() -> anyhow::Result<Lab> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        require_tools(&TOOLS)?;
        remove_leftovers();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("meshd-{}-{n}", std::process::id());
        let bridge = Netns::create(&format!("{prefix}-bridge"))?;
        bridge.ip(&["link", "add", "br0", "type", "bridge"])?;
        bridge.ip(&["link", "set", "br0", "up"])?;
        Ok(Lab {
            index: u8::try_from(n % 250).expect("below 250"),
            prefix,
            bridge,
            next_host: AtomicU8::new(1),
            next_vip: AtomicU8::new(1),
            node_ip: std::sync::Mutex::new(None),
        })
    }

    /// The prefix of every name this lab gives (namespaces, temp dirs).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The namespace holding the bridge `br0` (where a capture sees every packet
    /// between pods).
    pub fn bridge(&self) -> &Netns {
        &self.bridge
    }

    /// The node the pods run on: the bridge's namespace, with the address
    /// `10.201.<lab>.254` on `br0` (given on first call), from where the kubelet
    /// ([`crate::kubelet`]) probes pods as a node does.
    pub fn node(&self) -> anyhow::Result<(Netns, Ipv4Addr)> {
        let mut node_ip = self.node_ip.lock().unwrap_or_else(|e| e.into_inner());
        let ip = match *node_ip {
            Some(ip) => ip,
            None => {
                let ip = Ipv4Addr::new(SUBNET_PREFIX[0], SUBNET_PREFIX[1], self.index, 254);
                self.bridge
                    .ip(&["addr", "add", &format!("{ip}/16"), "dev", "br0"])?;
                *node_ip = Some(ip);
                ip
            }
        };
        Ok((self.bridge.clone(), ip))
    }

    /// A new pod `name` on the bridge: namespace `<prefix>-<name>`, `eth0` with the
    /// next address of the lab, default route `dev eth0`.
    pub fn pod(&self, name: &str) -> anyhow::Result<LabPod> {
        let host = self.next_host.fetch_add(1, Ordering::Relaxed);
        anyhow::ensure!(host < 250, "lab {}: no address left", self.prefix);
        let ip = Ipv4Addr::new(SUBNET_PREFIX[0], SUBNET_PREFIX[1], self.index, host);
        let netns = Netns::create(&format!("{}-{name}", self.prefix))?;
        // The veth is made in the bridge's namespace with its other end moved into the
        // pod's: names need only be unique inside each namespace.
        let port = format!("v{host}");
        self.bridge.ip(&[
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            netns.name(),
        ])?;
        self.bridge
            .ip(&["link", "set", &port, "master", "br0", "up"])?;
        netns.ip(&["addr", "add", &format!("{ip}/16"), "dev", "eth0"])?;
        netns.ip(&["link", "set", "eth0", "up"])?;
        netns.ip(&["route", "add", "default", "dev", "eth0"])?;
        Ok(LabPod {
            name: name.to_string(),
            ip,
            netns,
        })
    }

    /// A fresh Service VIP (`10.96.<lab>.<n>`): routed by every pod's default route, owned
    /// by no interface, so only capture makes a connection to it work.
    pub fn vip(&self) -> Ipv4Addr {
        let n = self.next_vip.fetch_add(1, Ordering::Relaxed);
        assert!(n < 255, "lab {}: no Service VIP left", self.prefix);
        Ipv4Addr::new(10, 96, self.index, n)
    }

    /// Starts recording every TCP packet that crosses the bridge (`tcpdump -A` in the
    /// bridge's namespace, on all its ports), once tcpdump says it listens.
    pub async fn capture_packets(&self) -> anyhow::Result<PacketCapture> {
        require_tools(&[("tcpdump", "apt-get install -y tcpdump")])?;
        let dir = self.tempdir("tcpdump")?;
        let (out, err) = (dir.path().join("packets.txt"), dir.path().join("stderr"));
        let child = self
            .bridge
            .command("tcpdump")
            // Every port of the bridge (each packet twice: in on one veth, out on
            // another); payload as ASCII, each packet printed as it comes (not in a
            // block a second later, lost when tcpdump stops). Immediate mode rings
            // hold buffer / snaplen packets: 32 MiB / 64 KiB (a whole segment) leaves
            // room for 512; `stop` fails if the kernel dropped any.
            .args([
                "-i",
                "any",
                "--immediate-mode",
                "-B",
                "32768",
                "-s",
                "65535",
            ])
            .args(["-n", "-l", "-A", "tcp"])
            .stdin(std::process::Stdio::null())
            .stdout(std::fs::File::create(&out)?)
            .stderr(std::fs::File::create(&err)?)
            .kill_on_drop(true)
            .spawn()
            .context("cannot start tcpdump")?;
        let mut capture = PacketCapture {
            child,
            out,
            err: err.clone(),
            dir,
        };
        crate::wait::eventually(
            "tcpdump to listen on the bridge",
            std::time::Duration::from_secs(10),
            || {
                let (status, text) = (capture.child.try_wait(), std::fs::read_to_string(&err));
                async move {
                    let text = text.unwrap_or_default();
                    if let Ok(Some(status)) = status {
                        bail!("tcpdump exited ({status}): {text}");
                    }
                    anyhow::ensure!(text.contains("listening on"), "tcpdump: {text:?}");
                    Ok(())
                }
            },
        )
        .await?;
        Ok(capture)
    }

    /// A temporary directory named after the lab, readable by everyone (uid
    /// [`PROXY_UID`] reads what is in it).
    pub fn tempdir(&self, what: &str) -> anyhow::Result<tempfile::TempDir> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("{}-{what}-", self.prefix))
            .tempdir()?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        Ok(dir)
    }
}

/// tcpdump on the lab's bridge ([`Lab::capture_packets`]).
#[derive(Debug)]
pub struct PacketCapture {
    child: tokio::process::Child,
    out: PathBuf,
    err: PathBuf,
    dir: tempfile::TempDir,
}

impl PacketCapture {
    /// Waits until tcpdump has printed `text` (packets are printed in the order they
    /// crossed, so everything sent before it is printed too).
    pub async fn wait_for(&self, text: &str) -> anyhow::Result<()> {
        crate::wait::eventually(
            &format!("tcpdump to print {text:?}"),
            std::time::Duration::from_secs(10),
            || async {
                let printed = std::fs::read_to_string(&self.out).unwrap_or_default();
                anyhow::ensure!(printed.contains(text), "not yet");
                Ok(())
            },
        )
        .await
    }

    /// Stops tcpdump (SIGTERM: it flushes what it has) and returns what it printed:
    /// one header line per packet (`IP a.port > b.port: …`), its payload as ASCII.
    /// Fails if the kernel dropped packets: then the capture does not show everything.
    pub async fn stop(mut self) -> anyhow::Result<String> {
        if let Some(pid) = self.child.id() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(pid)?);
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        }
        tokio::time::timeout(std::time::Duration::from_secs(10), self.child.wait())
            .await
            .context("tcpdump did not stop within 10s of SIGTERM")??;
        let text = std::fs::read_to_string(&self.out)?;
        let summary = std::fs::read_to_string(&self.err)?;
        let dropped = summary
            .lines()
            .find_map(|l| l.strip_suffix(" packets dropped by kernel"))
            .with_context(|| format!("tcpdump printed no summary: {summary}"))?;
        anyhow::ensure!(dropped.trim() == "0", "tcpdump: {summary}");
        drop(self.dir);
        Ok(text)
    }
}

impl LabPod {
    /// `addr` as `<pod IP>:port`.
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ip, port))
    }
}

/// Deletes namespaces named `meshd-<pid>-<n>-…` whose process is gone.
fn remove_leftovers() {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = leftover_pid(&name) else {
            continue;
        };
        if pid != std::process::id() && !process_alive(pid) {
            eprintln!("lab: removing network namespace {name} left by process {pid}");
            delete_netns(&name);
        }
    }
}

/// The pid in a lab name `meshd-<pid>-<n>-<rest>`.
fn leftover_pid(name: &str) -> Option<u32> {
    let mut parts = name.strip_prefix("meshd-")?.splitn(3, '-');
    let pid = parts.next()?.parse().ok()?;
    parts.next()?.parse::<u32>().ok()?;
    parts.next().filter(|rest| !rest.is_empty())?;
    Some(pid)
}

/// Whether process `pid` is still there (and not a zombie): a process the lab or a
/// sidecar started, or the owner of a leftover namespace.
pub fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.split_whitespace().next() != Some("Z"))
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_lab_names_are_leftovers() {
        assert_eq!(leftover_pid("meshd-123-4-web-1"), Some(123));
        assert_eq!(leftover_pid("meshd-123-4-bridge"), Some(123));
        assert_eq!(leftover_pid("meshd-123-4"), None);
        assert_eq!(leftover_pid("meshd-abc-4-web"), None);
        assert_eq!(leftover_pid("meshd-123-x-web"), None);
        assert_eq!(leftover_pid("other-123-4-web"), None);
    }
}
