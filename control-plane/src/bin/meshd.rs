//! `meshd`: the control plane. Reads the mesh from a config directory (the embedded
//! default source) or watches a Kubernetes cluster, serves xDS to Envoy sidecars and an
//! admin API for operators.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use meshd::admin::{self, AdminListener, AdminState, HealthState};
use meshd::cli::{CaArgs, DEFAULT_MESHD_NAMESPACE};
use meshd::cluster::{self, lease::Leadership};
use meshd::identity::{CertManager, SharedRoots};
use meshd::inject::InjectConfig;
use meshd::model::{MeshDefaults, MtlsMode, OutboundPolicy, ScopeEntry, Store, StoreConfig};
use meshd::sources::file::FileSource;
use meshd::sources::kubernetes::{self, KubernetesOptions};
use meshd::xds::serve::server::AdsServer;
use meshd::xds::serve::status::ProxyRegistry;
use meshd::xds::translate::cache::spawn_translator;
use meshd_ca::store::CaSource;
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;

/// meshd — a small, fast service-mesh control plane for Envoy.
///
/// Reads the mesh (Namespaces, Services, Pods, EndpointSlices, PeerAuthentications,
/// AuthorizationPolicies) from a directory of YAML or from a Kubernetes cluster, runs
/// the mesh CA, and serves listeners, clusters, routes, endpoints, RBAC and mTLS
/// secrets to Envoy sidecars over ADS (state of the world and delta) on a TLS port
/// that requires client certificates.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Where the mesh comes from: a directory of YAML (--config-dir), or the
    /// Kubernetes API (--kubeconfig, KUBECONFIG, or the pod's service account).
    #[arg(long, env = "MESHD_SOURCE", value_enum, default_value_t = SourceArg::File)]
    source: SourceArg,

    /// Directory of mesh YAML files, watched for changes (--source file).
    #[arg(long, env = "MESHD_CONFIG_DIR", value_name = "DIR")]
    config_dir: Option<PathBuf>,

    /// Kubeconfig file (--source kubernetes); default: KUBECONFIG, ~/.kube/config,
    /// then in-cluster.
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,

    /// Only namespaces with these labels are part of the mesh (a label selector, e.g.
    /// `meshd.io/mesh=enabled`); the root namespace always is. --source kubernetes.
    #[arg(long, value_name = "SELECTOR")]
    namespace_selector: Option<String>,

    /// This replica's name in the leader Lease and as status field manager.
    #[arg(long, env = "POD_NAME")]
    replica_name: Option<String>,

    /// How long a leader that stopped renewing keeps the Lease (--source kubernetes).
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    lease_duration: Duration,

    /// Address of the xDS (ADS) gRPC server, and of the CA service pods get their
    /// certificates from. TLS only; an ADS stream needs a client certificate of the mesh
    /// (meshd-agent gets one with the pod's token, `meshctl bootstrap` writes one).
    #[arg(long, env = "MESHD_XDS_ADDRESS", default_value = "127.0.0.1:15012")]
    xds_address: SocketAddr,

    #[command(flatten)]
    ca: CaArgs,

    /// The audience a pod's ServiceAccount token must be minted for (--source kubernetes:
    /// the CA service checks tokens with a TokenReview).
    #[arg(long, env = "MESHD_TOKEN_AUDIENCE", default_value = "meshd")]
    token_audience: String,

    /// Lifetime of workload certificates (served over SDS, or signed for an agent's
    /// CSR, which may ask for less); SDS ones are re-issued at half of it.
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

    /// What a pod's egress port (explicit capture) or virtual outbound listener
    /// (transparent capture) reaches when the pod has no meshd.io/scope: namespaces,
    /// namespace/service entries or `*`, comma-separated (default: the pod's own
    /// namespace). The sidecar receives only those services.
    #[arg(long, value_parser = parse_scope_arg)]
    default_scope: Option<ScopeArg>,

    /// What a transparent sidecar does with a connection to a destination the mesh does
    /// not know: `allow-any` passes it through as addressed (without mTLS),
    /// `registry-only` refuses it. The access log names the destination either way.
    #[arg(long, value_enum, default_value_t = OutboundPolicyArg::AllowAny)]
    outbound_policy: OutboundPolicyArg,

    /// meshd's own namespace, part of its serving identity
    /// spiffe://<trust-domain>/ns/<namespace>/sa/meshd.
    #[arg(long, env = "MESHD_NAMESPACE", default_value = DEFAULT_MESHD_NAMESPACE)]
    namespace: String,

    /// Address of the admin API (/debug/..., /ca/...): HTTPS, and only clients with an
    /// operator certificate of this mesh get past the handshake (see `meshctl ca
    /// operator-cert`). Keep it on loopback; meshd warns if it is not.
    #[arg(long, env = "MESHD_ADMIN_ADDRESS", default_value = "127.0.0.1:15014")]
    admin_address: SocketAddr,

    /// Address of the health port (/healthz, /readyz, /metrics): plain HTTP, nothing
    /// secret, nothing that changes meshd. In a pod: the pod IP, for kubelet and Prometheus.
    #[arg(long, env = "MESHD_HEALTH_ADDRESS", default_value = "127.0.0.1:15021")]
    health_address: SocketAddr,

    /// Address of the admission webhooks (`/inject`, `/validate`): HTTPS with meshd's serving
    /// certificate, no client certificate. Off unless given; in a pod, the pod IP or
    /// 0.0.0.0 behind the webhook Service.
    #[arg(long, env = "MESHD_WEBHOOK_ADDRESS")]
    webhook_address: Option<SocketAddr>,

    /// The Service in front of the webhook port: `<name>.<namespace>.svc` joins meshd's
    /// serving certificate, as the API server checks that name.
    #[arg(long, value_name = "NAME", requires = "webhook_address")]
    webhook_service: Option<String>,

    /// The MutatingWebhookConfiguration (injection) and ValidatingWebhookConfiguration
    /// (admission) of this name, whose `caBundle` the Lease holder keeps equal to the
    /// mesh's trust bundle (--source kubernetes).
    #[arg(long, value_name = "NAME", requires = "webhook_address")]
    webhook_configuration: Option<String>,

    /// The injection template's settings (YAML: proxyImage, resources, logLevel,
    /// xdsAddress, ...); the chart renders them from its `injection` values. Default:
    /// every setting's default.
    #[arg(
        long,
        env = "MESHD_INJECT_CONFIG",
        value_name = "FILE",
        requires = "webhook_address"
    )]
    inject_config: Option<PathBuf>,

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OutboundPolicyArg {
    AllowAny,
    RegistryOnly,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SourceArg {
    File,
    Kubernetes,
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
    // A panic's message may quote what a peer sent: it goes through the log, escaped,
    // not raw to stderr where it could stand as lines of its own.
    std::panic::set_hook(Box::new(|info| {
        tracing::error!("panic: {}", meshd::logging::Escaped(&info.to_string()));
    }));
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
    let store_config = StoreConfig {
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
            scope: args.default_scope.clone().map(|s| s.0),
            outbound_policy: match args.outbound_policy {
                OutboundPolicyArg::AllowAny => OutboundPolicy::AllowAny,
                OutboundPolicyArg::RegistryOnly => OutboundPolicy::RegistryOnly,
            },
        },
        debounce: args.debounce,
        debounce_max: args.debounce_max,
    };
    let started = match args.source {
        SourceArg::File => start_file_source(&args, store_config)?,
        SourceArg::Kubernetes => start_kubernetes_source(&args, store_config).await?,
    };
    let certs = CertManager::open(
        started.ca.clone(),
        args.ca.config(args.workload_cert_ttl),
        &args.namespace,
        args.root_rotation_grace,
    )?;
    tracing::info!(
        source = %started.ca,
        trust_domain = %args.ca.trust_domain,
        "mesh CA ready"
    );
    if let Some(service) = &args.webhook_service {
        certs.add_server_dns_names([format!("{service}.{}.svc", args.namespace)]);
    }
    certs.spawn_rotation();
    let shared_rotation = match (&started.shared_roots, &started.leadership) {
        (Some(shared), Some(leadership)) => {
            certs.follow_roots(&shared.roots)?;
            Some(cluster::root_rotation::spawn(
                shared.client.clone(),
                &shared.namespace,
                certs.clone(),
                leadership.is_leader(),
                &shared.replica,
            ))
        }
        _ => None,
    };
    let pod_tokens = started
        .kube_client
        .clone()
        .map(|client| meshd::ca_service::PodTokens {
            reviewer: meshd::ca_service::token::TokenReviewer::new(
                client,
                args.token_audience.clone(),
            ),
            mesh: started.store.subscribe(),
        });
    let ca_service = meshd::ca_service::CaService::new(certs.clone(), pod_tokens);
    // The injection template: the webhook injects with it, and the webhook and the
    // admission report recognise meshd's own containers by it.
    let mut inject = match &args.inject_config {
        Some(path) => InjectConfig::load(path)?,
        None => InjectConfig::default(),
    };
    inject.fill(&args.namespace, &args.ca.trust_domain, &args.token_audience);
    let inject = Arc::new(inject);
    if let (Some(client), Some(leadership)) = (&started.kube_client, &started.leadership) {
        cluster::trust_bundle::spawn(
            client.clone(),
            certs.clone(),
            started.store.subscribe(),
            leadership.is_leader(),
            started.replica.clone(),
        );
        cluster::admission_report::spawn(
            client.clone(),
            started.store.subscribe(),
            inject.clone(),
            leadership.is_leader(),
            args.namespace.clone(),
            started.replica.clone(),
        );
    }
    if let Some(name) = &args.webhook_configuration {
        match (&started.kube_client, &started.leadership) {
            (Some(client), Some(leadership)) => cluster::webhook_ca::spawn(
                client.clone(),
                certs.clone(),
                leadership.is_leader(),
                name.clone(),
            ),
            _ => anyhow::bail!("--webhook-configuration needs --source kubernetes"),
        }
    }
    if let Some(address) = args.webhook_address {
        let listener = meshd::listen::bind(address)
            .with_context(|| format!("cannot listen on --webhook-address {address}"))?;
        let state = meshd::webhook::WebhookState {
            inject: inject.clone(),
            mesh: started.store.subscribe(),
        };
        let certs = certs.clone();
        tokio::spawn(async move {
            if let Err(e) = meshd::webhook::serve(listener, certs, state).await {
                tracing::error!("webhook server failed: {e}");
            }
        });
        tracing::info!(webhook = %address, "admission webhooks serving");
    }
    let store = started.store;
    let (config_errors, config_notes) = (started.errors, started.notes);

    let snapshots = spawn_translator(store.subscribe(), args.ca.trust_domain.clone());
    let registry = ProxyRegistry::default();

    let health_listener = meshd::listen::bind(args.health_address)
        .with_context(|| format!("cannot listen on --health-address {}", args.health_address))?;
    let health_app = admin::health_router(
        HealthState {
            pending: started.pending.clone(),
        },
        args.health_address,
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(health_listener, health_app).await {
            tracing::error!("health server failed: {e}");
        }
    });

    if let Some(warning) = admin::exposure_warning(args.admin_address) {
        tracing::warn!("{warning}");
    }
    let admin_listener = meshd::listen::bind(args.admin_address)
        .with_context(|| format!("cannot listen on --admin-address {}", args.admin_address))?;
    let admin_listener = AdminListener::new(admin_listener, certs.clone())?;
    let mut pending = started.pending.clone();
    let admin_app = admin::router(
        AdminState {
            snapshots: snapshots.clone(),
            registry: registry.clone(),
            config_errors,
            config_notes,
            certs: certs.clone(),
            pending: started.pending,
            leader: started.leadership.as_ref().map(|l| l.is_leader()),
            shared_rotation,
            kube: started.kube_client.clone(),
        },
        args.admin_address,
    );
    tokio::spawn(async move {
        let app = admin_app.into_make_service_with_connect_info::<admin::OperatorConn>();
        if let Err(e) = axum::serve(admin_listener, app).await {
            tracing::error!("admin server failed: {e}");
        }
    });

    // Serving before the first complete view of the mesh would hand proxies an empty
    // or partial config.
    if !pending.borrow().is_empty() {
        tracing::info!(waiting_for = ?*pending.borrow(), "waiting for the initial sync before serving xDS");
        pending
            .wait_for(|p| p.is_empty())
            .await
            .context("the source stopped before its initial sync")?;
        // …and until the xDS snapshot is built from the mesh that holds them.
        let synced = store.subscribe().borrow().version;
        let mut xds = snapshots.clone();
        xds.wait_for(|s| s.version() >= synced)
            .await
            .context("the translator stopped")?;
        tracing::info!(version = synced, "initial sync done");
    }
    let xds_listener = meshd::listen::bind(args.xds_address)
        .with_context(|| format!("cannot listen on --xds-address {}", args.xds_address))?;
    tracing::info!(xds = %args.xds_address, admin = %args.admin_address, health = %args.health_address, identity = %certs.server_id(), "meshd serving");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    // h2's own settings stay at hyper's defaults: smaller receive windows (64 KiB) and
    // frame size were measured to change nothing (298 MiB at 3,000 streams either way):
    // they bound what a proxy may send, and nothing is allocated for them up front.
    // h2's per-connection write buffer (16 KiB) has no setting. What a stream's codec
    // keeps is set in `AdsServer::into_service`.
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .max_concurrent_streams(Some(meshd::xds::serve::limits::MAX_STREAMS_PER_CONNECTION))
        .add_service(AdsServer::new(snapshots, registry, certs.clone()).into_service())
        .add_service(ca_service.into_service())
        .serve_with_incoming_shutdown(
            meshd::tls::incoming(xds_listener, certs, meshd::tls::Port::Xds)?,
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
    if let Some(leadership) = started.leadership {
        leadership.release().await;
    }
    tracing::info!("meshd stopped");
    Ok(())
}

/// The root in `<namespace>/meshd-ca`, shared by the replicas.
struct SharedCa {
    roots: SharedRoots,
    client: kube::Client,
    namespace: String,
    replica: String,
}

/// What a started source hands to the rest of meshd.
struct Started {
    store: Store,
    ca: CaSource,
    /// The root in the cluster's Secret, which rotates under the Lease holder.
    shared_roots: Option<SharedCa>,
    errors: meshd::sources::SharedErrors,
    /// What the source ignored (the file source's notes).
    notes: meshd::sources::SharedErrors,
    /// What the source has not read yet (kinds, or the config directory).
    pending: watch::Receiver<Vec<String>>,
    leadership: Option<Leadership>,
    /// The cluster's API (Kubernetes mode): token reviews, the trust bundle ConfigMaps.
    kube_client: Option<kube::Client>,
    /// This replica's name (Kubernetes mode): its field manager.
    replica: String,
}

fn start_file_source(args: &Args, config: StoreConfig) -> anyhow::Result<Started> {
    let dir = args
        .config_dir
        .as_ref()
        .context("--source file needs --config-dir DIR")?;
    if !dir.is_dir() {
        anyhow::bail!("--config-dir {}: not a directory", dir.display());
    }
    // Empty until the source's first scan (off the async workers) is in: meshd answers
    // health checks meanwhile, and `pending` holds back readiness and the xDS port.
    let store = Store::start(config, Vec::new());
    let running = FileSource::new(dir)
        .spawn(store.clone())
        .with_context(|| format!("cannot watch {}", dir.display()))?;
    Ok(Started {
        store,
        ca: args.ca.source(),
        shared_roots: None,
        errors: running.errors,
        notes: running.notes,
        pending: running.pending,
        leadership: None,
        kube_client: None,
        replica: String::new(),
    })
}

async fn start_kubernetes_source(args: &Args, config: StoreConfig) -> anyhow::Result<Started> {
    if args.config_dir.is_some() {
        anyhow::bail!("--config-dir is for --source file; --source kubernetes reads the cluster");
    }
    let client = cluster::client(args.kubeconfig.as_deref()).await?;
    cluster::require_namespace(&client, &args.namespace).await?;
    // A plug-in CA (--ca-cert-chain) is the user's choice; otherwise the root is the
    // cluster's, in a Secret every replica shares.
    let (ca, shared_roots) = match args.ca.source() {
        plug_in @ CaSource::PlugIn { .. } => (plug_in, None),
        _ => {
            let roots =
                cluster::ca_secret::root(client.clone(), &args.namespace, &args.ca.trust_domain)
                    .await?;
            (roots.current.clone(), Some(roots))
        }
    };
    let replica = args
        .replica_name
        .clone()
        .unwrap_or_else(default_replica_name);
    let leadership = Leadership::start(
        client.clone(),
        &args.namespace,
        &replica,
        args.lease_duration,
    )
    .await
    .with_context(|| {
        format!(
            "cannot take part in the Lease in namespace {}",
            args.namespace
        )
    })?;
    let root_namespace = config.defaults.root_namespace.clone();
    let store = Store::start(config, Vec::new());
    let running = kubernetes::spawn(
        client.clone(),
        store.clone(),
        KubernetesOptions {
            namespace_selector: args.namespace_selector.clone(),
            root_namespace,
        },
    );
    cluster::policy_status::spawn(
        client.clone(),
        running.verdicts.clone(),
        leadership.is_leader(),
        replica.clone(),
    );
    tracing::info!(replica, namespace = %args.namespace, "watching the Kubernetes API");
    let kube_client = client.clone();
    let shared_roots = shared_roots.map(|roots| SharedCa {
        roots,
        client,
        namespace: args.namespace.clone(),
        replica: replica.clone(),
    });
    Ok(Started {
        store,
        ca,
        shared_roots,
        errors: running.errors,
        notes: Default::default(),
        pending: running.pending,
        leadership: Some(leadership),
        kube_client: Some(kube_client),
        replica,
    })
}

/// `--default-scope`, parsed.
#[derive(Debug, Clone)]
struct ScopeArg(Vec<ScopeEntry>);

fn parse_scope_arg(text: &str) -> Result<ScopeArg, String> {
    meshd::sources::convert::parse_scope(text).map(ScopeArg)
}

/// `<hostname>-<pid>`: unique enough outside a pod (in one, POD_NAME is set).
fn default_replica_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "meshd".to_string());
    format!("{host}-{}", std::process::id())
}

fn init_logging(args: &Args) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(&args.log)
        .with_context(|| format!("--log {:?} is not a valid log filter", args.log))?;
    // Colours only for a terminal: log files and collectors get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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
