//! `meshd-agent run`: the lifecycle.
//!
//! 1. Check the app's probes ([`app_probes`](crate::app_probes)), resolve the pod and
//!    its proof ([`identity`](crate::identity)); bind the health port at once, so probes
//!    are answered (the app's at once, the sidecar's 503 with the reason) while meshd is
//!    asked.
//! 2. The credential task ([`renewal`](crate::renewal)) gets the first certificate,
//!    retrying with backoff; SIGTERM or SIGINT meanwhile ends the agent (exit 0).
//! 3. Envoy's bootstrap is written beside the credentials and Envoy started; from then
//!    on the credential task keeps them current on its own.
//! 4. SIGTERM: `POST /drain_listeners?graceful`, wait until no downstream connection
//!    is left or `--drain-time` is up, SIGTERM Envoy, exit with its code. SIGINT and
//!    SIGHUP are passed to Envoy. Envoy exiting on its own ends the agent, non-zero.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use meshd_ca::{MESHD_SERVICE_ACCOUNT, SpiffeId};
use meshd_sidecar::bootstrap::{BootstrapOptions, split_host_port, write_bootstrap};
use meshd_sidecar::credentials::CredentialDir;
use nix::sys::signal::Signal;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::app_probes::AppProber;
use crate::ca_client::CaClient;
use crate::cli::RunArgs;
use crate::envoy::admin::EnvoyAdmin;
use crate::envoy::{Envoy, exit_code};
use crate::health::{self, Stage};
use crate::identity::{self, Mode};
use crate::renewal::Renewer;

/// How long Envoy has to exit after SIGTERM before it is killed.
const ENVOY_STOP_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let apps = AppProber::from_flag(args.app_probes.as_deref())?;
    let (mode, pod, roots) = identity::resolve(&args)?;
    let (xds_host, xds_port) = split_host_port(&args.xds_address).with_context(|| {
        format!(
            "--xds-address {:?}: expected host:port (MESHD_XDS_ADDRESS)",
            args.xds_address
        )
    })?;
    let meshd_identity = SpiffeId::new(
        pod.id.trust_domain(),
        &args.meshd_namespace,
        MESHD_SERVICE_ACCOUNT,
    )
    .context("--meshd-namespace")?;
    let dir = CredentialDir::new(&args.dir)?;
    let listener = TcpListener::bind(args.health_address)
        .await
        .with_context(|| format!("--health-address {}", args.health_address))?;
    let health_address = listener.local_addr().context("--health-address")?;
    let app_probes = apps.len();
    let admin = EnvoyAdmin::new(args.envoy_admin_port);
    let stage = Arc::new(watch::channel(Stage::WaitingForCertificate(None)).0);
    tokio::spawn(health::serve(listener, admin, stage.subscribe(), apps));
    let mut signals = Signals::new()?;
    info!(
        identity = %pod.id,
        pod = %pod.name,
        mode = match mode { Mode::Token { .. } => "token", Mode::Local { .. } => "local" },
        meshd = %args.xds_address,
        health = %health_address,
        app_probes,
        "meshd-agent starting"
    );

    let renewer = Renewer::new(
        mode,
        pod.clone(),
        CaClient::new(args.xds_address.clone(), meshd_identity.to_string()),
        dir.clone(),
        roots,
        stage.clone(),
    );
    let (first_tx, first_rx) = oneshot::channel();
    let _renewal = AbortOnDrop(tokio::spawn(renewer.run(first_tx)));
    tokio::select! {
        first = first_rx => first.context("the credential task ended")?,
        signal = signals.next() => {
            info!("{signal} before envoy was started: exiting");
            return Ok(ExitCode::SUCCESS);
        }
    }

    let bootstrap = write_bootstrap(&BootstrapOptions {
        namespace: pod.id.namespace().to_string(),
        pod: pod.name.clone(),
        service_account: pod.id.service_account().to_string(),
        xds_host: xds_host.to_string(),
        xds_port,
        meshd_identity: meshd_identity.to_string(),
        admin_port: args.envoy_admin_port,
        flavor: args.xds_protocol.into(),
        credentials: dir,
    })?;
    let mut envoy = Envoy::spawn(
        &args.envoy_binary,
        &bootstrap,
        args.drain_time,
        &args.envoy_args,
    )?;
    stage.send_replace(Stage::EnvoyStarted);
    info!(pid = ?envoy.pid(), bootstrap = %bootstrap.display(), "envoy started");

    let mut interrupted = false;
    loop {
        tokio::select! {
            status = envoy.wait() => {
                let status = status?;
                if interrupted {
                    info!("envoy exited with {status} after SIGINT; meshd-agent exits with its code");
                    return Ok(ExitCode::from(exit_code(status)));
                }
                error!("envoy exited with {status}; meshd-agent exits, the kubelet restarts the container");
                return Ok(ExitCode::from(exit_code(status).max(1)));
            }
            signal = signals.next() => match signal {
                Signal::SIGTERM => return drain_and_stop(envoy, admin, args.drain_time).await,
                other => {
                    info!("{other}: passing it on to envoy");
                    interrupted |= other == Signal::SIGINT;
                    envoy.signal(other)?;
                }
            },
        }
    }
}

/// SIGTERM: let the connections finish, then stop Envoy; its exit code is the agent's.
async fn drain_and_stop(
    mut envoy: Envoy,
    admin: EnvoyAdmin,
    drain_time: Duration,
) -> anyhow::Result<ExitCode> {
    info!("SIGTERM: draining envoy's listeners for at most {drain_time:?}");
    match admin.drain_listeners().await {
        Err(e) => warn!("cannot drain envoy ({e:#}): stopping it now"),
        Ok(()) => {
            let deadline = Instant::now() + drain_time;
            loop {
                let open = admin.active_downstream_connections().await;
                match open {
                    Ok(0) => {
                        info!("no connection left open: stopping envoy");
                        break;
                    }
                    Ok(n) => debug!("{n} downstream connections still open"),
                    Err(ref e) => debug!("envoy's connection count: {e:#}"),
                }
                if Instant::now() >= deadline {
                    info!("drain time is up ({open:?} connections open): stopping envoy");
                    break;
                }
                tokio::select! {
                    status = envoy.wait() => {
                        let status = status?;
                        info!("envoy exited with {status} while draining; meshd-agent exits with its code");
                        return Ok(ExitCode::from(exit_code(status)));
                    }
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
        }
    }
    envoy.signal(Signal::SIGTERM)?;
    let status = match tokio::time::timeout(ENVOY_STOP_TIMEOUT, envoy.wait()).await {
        Ok(status) => status?,
        Err(_) => {
            warn!("envoy did not exit within {ENVOY_STOP_TIMEOUT:?} of SIGTERM: killing it");
            envoy.signal(Signal::SIGKILL)?;
            envoy.wait().await?
        }
    };
    info!("envoy exited with {status}; meshd-agent exits with its code");
    Ok(ExitCode::from(exit_code(status)))
}

/// The signals the agent handles.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Signals> {
        let on = |kind| signal(kind).context("cannot handle signals");
        Ok(Signals {
            term: on(SignalKind::terminate())?,
            int: on(SignalKind::interrupt())?,
            hup: on(SignalKind::hangup())?,
        })
    }

    async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::SIGTERM,
            _ = self.int.recv() => Signal::SIGINT,
            _ = self.hup.recv() => Signal::SIGHUP,
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
