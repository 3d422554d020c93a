//! meshd-agent, the per-pod helper beside Envoy.
//!
//! `meshd-agent run` makes the pod's key in memory, has meshd sign a CSR for the pod's
//! SPIFFE id, writes key, chain and trust bundle into its own sidecar directory
//! (`meshd_sidecar::credentials::CredentialDir`, which Envoy watches through file-based
//! SDS) together with Envoy's bootstrap, starts Envoy, keeps the credentials current
//! and answers the pod's probes: its own readiness and the app's probes, which the
//! injector routes through it. Its modules, in the order a run meets them:
//!
//! - [`cli`]: the flags (each with its environment variable).
//! - [`identity`]: who the pod is and what proves it to meshd: its projected
//!   ServiceAccount token ([`token`]), or in local mode a certificate `meshctl
//!   bootstrap` wrote and from then on the agent's own.
//! - [`keys`]: a fresh ECDSA P-256 key and its CSR for every signature.
//! - [`ca_client`]: `Sign` and `WatchTrustBundle` on meshd's xDS port.
//! - [`certs`]: what the agent reads from a chain (identity, expiry, serial, which
//!   root signed it).
//! - [`renewal`]: the credential task: first certificate, renewal at half life with
//!   jitter or at once when the signing root changes, the trust bundle kept current,
//!   retries with backoff ([`schedule`] holds the arithmetic).
//! - [`envoy`]: Envoy as a child process (signals, drain, exit) and its admin API.
//! - [`health`]: `/healthz/ready` for the container's probes, and the app's probes at
//!   `/app-health/<container>/<kind>`, performed by [`app_probes`] on the pod's loopback.
//! - [`run`]: the whole lifecycle.
//!
//! `meshd-agent init` ([`init`]) is the other command: the pod's transparent capture,
//! iptables rules programmed once by the injected init container.
//!
//! Small on purpose (a current-thread runtime, hyper for both HTTP sides, no kube, no
//! control plane): it runs in every pod.

mod app_probes;
mod ca_client;
mod certs;
mod cli;
mod envoy;
mod health;
mod identity;
mod init;
mod keys;
mod renewal;
mod run;
mod schedule;
mod token;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let args = match cli.command {
        cli::Command::Run(args) => args,
        // No runtime and no logging set-up: init runs a few processes and exits.
        cli::Command::Init(args) => return init::init(&args),
    };
    if let Err(e) = init_logging(&args.log) {
        eprintln!("meshd-agent: {e:#}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshd-agent: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run::run(*args)) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::from(2)
        }
    }
}

fn init_logging(filter: &str) -> anyhow::Result<()> {
    use anyhow::Context;
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .with_context(|| format!("--log {filter:?} is not a valid log filter"))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    Ok(())
}
