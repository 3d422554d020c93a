//! Envoy as the agent's child.
//!
//! The agent starts Envoy once (after the first credentials are written) and never
//! again: if Envoy exits, the agent exits too and leaves the restart to the kubelet, so
//! a crash loop shows as one in `kubectl get pods` instead of being hidden. Envoy
//! inherits stdout and stderr. The agent adds what its lifecycle relies on:
//! `--disable-hot-restart` (the agent never hot-restarts, and several Envoys on one
//! host would otherwise fight over the same shared memory), `--drain-time-s` (the
//! agent's `--drain-time`) and `--drain-strategy immediate` (on drain every connection
//! is told to close after its current request, not a growing share of them).
//!
//! Signals are sent with nix (no `unsafe`, no `kill` command).

pub mod admin;

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::Context;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

pub struct Envoy {
    child: Child,
}

impl Envoy {
    pub fn spawn(
        binary: &Path,
        bootstrap: &Path,
        drain_time: Duration,
        extra: &[OsString],
    ) -> anyhow::Result<Envoy> {
        let drain_secs = drain_time.as_secs_f64().ceil().max(1.0) as u64;
        let child = Command::new(binary)
            .arg("-c")
            .arg(bootstrap)
            .arg("--disable-hot-restart")
            .args(["--drain-time-s", &drain_secs.to_string()])
            .args(["--drain-strategy", "immediate"])
            .args(extra)
            .stdin(Stdio::null())
            // Should the agent itself die, Envoy goes with it rather than run on
            // without anyone renewing its certificate.
            .kill_on_drop(true)
            .spawn()
            .with_context(|| {
                format!("cannot start envoy ({}; --envoy-binary)", binary.display())
            })?;
        Ok(Envoy { child })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Sends `signal` to Envoy (nothing if it has exited already).
    pub fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        let Some(pid) = self.child.id() else {
            return Ok(());
        };
        let pid = i32::try_from(pid).context("envoy's pid")?;
        kill(Pid::from_raw(pid), signal).with_context(|| format!("cannot send {signal} to envoy"))
    }

    /// Waits for Envoy to exit.
    pub async fn wait(&mut self) -> anyhow::Result<ExitStatus> {
        self.child.wait().await.context("waiting for envoy")
    }
}

/// The exit code that passes `status` on: Envoy's own, or 128 + the signal that ended
/// it, as a shell reports it.
pub fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code).unwrap_or(1),
        (None, Some(signal)) => u8::try_from(128 + signal).unwrap_or(1),
        (None, None) => 1,
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    #[test]
    fn exit_codes_pass_on_envoys() {
        assert_eq!(exit_code(ExitStatus::from_raw(0)), 0);
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        // Killed by SIGKILL (9).
        assert_eq!(exit_code(ExitStatus::from_raw(9)), 137);
    }
}
