//! `meshd`: the control plane. Reads the mesh from a config directory (the embedded
//! default source), serves xDS to Envoy sidecars and an admin API for operators.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use meshd::admin::{self, AdminState};
use meshd::cli::{CaArgs, DEFAULT_MESHD_NAMESPACE};
use meshd::identity::CertManager;
use meshd::model::{MeshDefaults, MtlsMode, Store, StoreConfig};
use meshd::sources::file::FileSource;
use meshd::xds::cache::spawn_translator;
use meshd::xds::server::AdsServer;
use meshd::xds::status::ProxyRegistry;
use tracing_subscriber::EnvFilter;

/// meshd — a small, fast service-mesh control plane for Envoy.
///
/// Reads Kubernetes-style YAML (Namespaces, Services, Pods, EndpointSlices,
/// PeerAuthentications) from a directory, watches it, runs the mesh CA, and serves
/// listeners, clusters, routes, endpoints and mTLS secrets to Envoy sidecars over ADS
/// (state of the world and delta) on a TLS port that requires client certificates.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Directory of mesh YAML files, watched for changes.
    #[arg(long, env = "MESHD_CONFIG_DIR", value_name = "DIR")]
    config_dir: PathBuf,

    /// Address of the xDS (ADS) gRPC server. It speaks TLS only and requires a client
    /// certificate from the mesh CA (`meshctl bootstrap` writes one).
    #[arg(long, env = "MESHD_XDS_ADDRESS", default_value = "127.0.0.1:15012")]
    xds_address: SocketAddr,

    #[command(flatten)]
    ca: CaArgs,

    /// Lifetime of workload certificates; they are re-issued at half of it.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    workload_cert_ttl: Duration,

    /// During a root rotation, how long proxies get to receive the new root before
    /// certificates are signed by it.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    root_rotation_grace: Duration,

    /// Namespace whose policies apply to the whole mesh (default: --namespace).
    #[arg(long, env = "MESHD_ROOT_NAMESPACE")]
    root_namespace: Option<String>,

    /// mTLS mode of every inbound port no PeerAuthentication covers. PERMISSIVE and
    /// DISABLE accept plaintext: opt in only while migrating.
    #[arg(long, value_enum, default_value_t = ModeArg::Strict)]
    mtls_mode: ModeArg,

    /// meshd's own namespace, part of its serving identity
    /// spiffe://<trust-domain>/ns/<namespace>/sa/meshd.
    #[arg(long, env = "MESHD_NAMESPACE", default_value = DEFAULT_MESHD_NAMESPACE)]
    namespace: String,

    /// Address of the admin HTTP API (/healthz, /readyz, /debug/...).
    #[arg(long, env = "MESHD_ADMIN_ADDRESS", default_value = "127.0.0.1:15014")]
    admin_address: SocketAddr,

    /// Quiet time after a change before a new snapshot is built.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    debounce: Duration,

    /// Longest a burst of changes can delay a snapshot.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    debounce_max: Duration,

    /// Log filter, in `RUST_LOG` syntax (e.g. `info,meshd::xds=debug`).
    #[arg(long, env = "MESHD_LOG", default_value = "info")]
    log: String,

    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
#[value(rename_all = "UPPER")]
enum ModeArg {
    Strict,
    Permissive,
    Disable,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_logging(&args)?;
    if args.debounce > args.debounce_max {
        anyhow::bail!(
            "--debounce ({:?}) must not be longer than --debounce-max ({:?})",
            args.debounce,
            args.debounce_max
        );
    }

    if args.workload_cert_ttl < Duration::from_secs(2) {
        anyhow::bail!(
            "--workload-cert-ttl {:?} is too short: certificates must live at least 2s",
            args.workload_cert_ttl
        );
    }
    let certs = CertManager::open(
        args.ca.source(),
        args.ca.config(args.workload_cert_ttl),
        &args.namespace,
        args.root_rotation_grace,
    )?;
    tracing::info!(
        source = ?args.ca.source(),
        trust_domain = %args.ca.trust_domain,
        "mesh CA ready"
    );
    certs.spawn_rotation();

    let dir = &args.config_dir;
    if !dir.is_dir() {
        anyhow::bail!("--config-dir {}: not a directory", dir.display());
    }
    let mut source = FileSource::new(dir);
    let initial = source.scan();
    tracing::info!(
        dir = %dir.display(),
        objects = initial.len(),
        errors = source.errors().len(),
        "loaded config directory"
    );
    let store = Store::start(
        StoreConfig {
            defaults: MeshDefaults {
                root_namespace: args
                    .root_namespace
                    .clone()
                    .unwrap_or(args.namespace.clone()),
                mtls_mode: match args.mtls_mode {
                    ModeArg::Strict => MtlsMode::Strict,
                    ModeArg::Permissive => MtlsMode::Permissive,
                    ModeArg::Disable => MtlsMode::Disable,
                },
            },
            debounce: args.debounce,
            debounce_max: args.debounce_max,
        },
        initial,
    );
    let config_errors = Arc::new(Mutex::new(Vec::new()));
    source
        .spawn_watch(store.clone(), config_errors.clone())
        .with_context(|| format!("cannot watch {}", dir.display()))?;

    let snapshots = spawn_translator(store.subscribe(), args.ca.trust_domain.clone());
    let registry = ProxyRegistry::default();

    let admin_listener = tokio::net::TcpListener::bind(args.admin_address)
        .await
        .with_context(|| format!("cannot listen on --admin-address {}", args.admin_address))?;
    let admin_app = admin::router(AdminState {
        snapshots: snapshots.clone(),
        registry: registry.clone(),
        config_errors,
        certs: certs.clone(),
    });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(admin_listener, admin_app).await {
            tracing::error!("admin server failed: {e}");
        }
    });

    let xds_listener = tokio::net::TcpListener::bind(args.xds_address)
        .await
        .with_context(|| format!("cannot listen on --xds-address {}", args.xds_address))?;
    tracing::info!(xds = %args.xds_address, admin = %args.admin_address, identity = %certs.server_id(), "meshd serving");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(AdsServer::new(snapshots, registry, certs.clone()).into_service())
        .serve_with_incoming_shutdown(
            meshd::xds::tls::incoming(xds_listener, certs)?,
            stopped(stop_rx.clone()),
        );
    // ADS streams never end by themselves: after a short grace period they are cut,
    // and Envoy reconnects to another replica (or to this one after a restart).
    tokio::select! {
        served = server => served.context("xDS server failed")?,
        _ = async {
            stopped(stop_rx).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        } => {}
    }
    tracing::info!("meshd stopped");
    Ok(())
}

fn init_logging(args: &Args) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(&args.log)
        .with_context(|| format!("--log {:?} is not a valid log filter", args.log))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

async fn stopped(mut stop: tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
}
