//! A server process's memory and CPU, read from /proc: the process and everything it
//! started (a `sh -c` command's server may be its child), whatever the server is.
//!
//! - Peak RSS: the largest sum of `VmRSS` over the process tree, sampled every 50 ms,
//!   or the largest `VmHWM` (the kernel's own peak) of one process in it if higher —
//!   exact for a server of one process, which is what meshd is.
//! - CPU: `utime + stime` of every process in the tree, plus what each one's reaped
//!   children used (`cutime + cstime`), in clock ticks of 1/100 s.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const SAMPLE_EVERY: Duration = Duration::from_millis(50);
/// `sysconf(_SC_CLK_TCK)` on Linux.
const TICKS_PER_SECOND: f64 = 100.0;

/// Samples the process tree of `pid` until dropped.
pub struct ProcessStats {
    pid: u32,
    peak_kib: Arc<AtomicU64>,
    sampler: tokio::task::JoinHandle<()>,
}

impl ProcessStats {
    pub fn watch(pid: u32) -> ProcessStats {
        let peak_kib = Arc::new(AtomicU64::new(0));
        let peak = peak_kib.clone();
        let sampler = tokio::spawn(async move {
            loop {
                peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                tokio::time::sleep(SAMPLE_EVERY).await;
            }
        });
        ProcessStats {
            pid,
            peak_kib,
            sampler,
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The peak RSS so far, in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        self.peak_kib
            .fetch_max(rss_kib(self.pid), Ordering::Relaxed);
        self.peak_kib.load(Ordering::Relaxed)
    }

    /// CPU seconds the tree has used so far.
    pub fn cpu_seconds(&self) -> f64 {
        tree(self.pid)
            .iter()
            .map(|p| {
                let fields = stat_fields(*p);
                // utime, stime, cutime, cstime: fields 14–17 of stat(5), 12–15 after the
                // state.
                (11..15).map(|i| field(&fields, i)).sum::<f64>()
            })
            .sum::<f64>()
            / TICKS_PER_SECOND
    }
}

impl Drop for ProcessStats {
    fn drop(&mut self) {
        self.sampler.abort();
    }
}

/// The larger of the tree's summed `VmRSS` and its largest `VmHWM`.
fn rss_kib(pid: u32) -> u64 {
    let mut sum = 0;
    let mut hwm = 0;
    for p in tree(pid) {
        let status = std::fs::read_to_string(format!("/proc/{p}/status")).unwrap_or_default();
        let kib = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        sum += kib("VmRSS:");
        hwm = hwm.max(kib("VmHWM:"));
    }
    sum.max(hwm)
}

/// The fields of `/proc/<pid>/stat` after the command name (which may hold spaces):
/// the state is the first.
fn stat_fields(pid: u32) -> Vec<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    rest.split_whitespace().map(String::from).collect()
}

fn field(fields: &[String], i: usize) -> f64 {
    fields.get(i).and_then(|v| v.parse().ok()).unwrap_or(0.0)
}

/// `pid` and its descendants that are alive.
fn tree(pid: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(p) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // The parent's pid is the second field after the name.
        let parent = field(&stat_fields(p), 1) as u32;
        children.entry(parent).or_default().push(p);
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        if let Some(c) = children.get(&tree[i]) {
            tree.extend(c);
        }
        i += 1;
    }
    tree
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shell that starts a child which holds 64 MiB: the child's memory and CPU are
    /// the tree's.
    #[tokio::test]
    async fn a_commands_children_are_measured() {
        let mut child = tokio::process::Command::new("sh")
            .args([
                "-c",
                "python3 -c 'import time; b = bytearray(64 << 20); sum(range(3_000_000)); time.sleep(30)'; true",
            ])
            .kill_on_drop(true)
            .spawn()
            .expect("sh");
        let stats = ProcessStats::watch(child.id().expect("pid"));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let rss = stats.peak_rss_kib();
        let cpu = stats.cpu_seconds();
        let started = tree(stats.pid());
        child.start_kill().expect("kill");
        for p in started.into_iter().skip(1) {
            let _ = std::process::Command::new("kill")
                .arg(p.to_string())
                .status();
        }
        assert!(rss > 64 * 1024, "peak RSS {rss} KiB");
        assert!(cpu > 0.01, "CPU {cpu} s");
    }
}
