//! `meshctl`: the operator's tool for meshd.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use hyper::Method;
use meshd::admin::admission_report::PolicyReportEntry;
use meshd::admin::{ProxyConfig, SnapshotSummary};
use meshd::authz::check::{CheckRequest, CheckResponse};
use meshd::authz::stats;
use meshd::cli::{CaArgs, DEFAULT_MESHD_NAMESPACE};
use meshd::identity::{MESHD_SERVICE_ACCOUNT, RotationStatus};
use meshd::model::{MeshDefaults, MeshSnapshot};
use meshd::operator::{self, AdminClient, Credentials};
use meshd::sources::file::FileSource;
use meshd::xds::serve::status::{ProxyStatus, XdsFlavor};
use meshd_ca::{OperatorId, SpiffeId};
use meshd_sidecar::bootstrap::{BootstrapOptions, split_host_port, write_bootstrap};
use meshd_sidecar::credentials::{CredentialDir, Credentials as SidecarCredentials};

/// meshctl — operate and debug a meshd service mesh.
#[derive(Debug, Parser)]
#[command(version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write a sidecar directory for a workload: Envoy's bootstrap and its credentials.
    ///
    /// `DIR/envoy-bootstrap.json` names the pod (node id `<pod>.<namespace>` and
    /// metadata), points ADS at meshd over mutual TLS and puts Envoy's admin interface
    /// on 127.0.0.1. `DIR/certs/` holds a certificate for the pod's identity
    /// spiffe://<trust-domain>/ns/<namespace>/sa/<service-account> minted with the mesh
    /// CA, its key (0600) and the trust bundle, which Envoy reads through file-based SDS
    /// (`DIR/sds/`). Run Envoy on it directly, or hand DIR to `meshd-agent run
    /// --cert-dir DIR`, which renews the certificate before it expires.
    Bootstrap(Box<BootstrapArgs>),
    /// Check a config directory offline and list every problem.
    ///
    /// Exits with status 1 if anything is wrong, so it can guard a CI pipeline.
    Analyze {
        /// The directory meshd would read with --config-dir.
        dir: PathBuf,
    },
    /// Show meshd's mesh snapshot, config errors and connected proxies.
    Status {
        #[command(flatten)]
        admin: AdminArgs,
        /// Print JSON instead of a table.
        #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// The mesh CA: status and staged root rotation.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Print meshd's CustomResourceDefinitions (AuthorizationPolicy, PeerAuthentication,
    /// WorkloadPolicy) as YAML, generated from the same Rust types meshd reads them with.
    ///
    /// `meshctl crds | kubectl apply -f -`; the chart renders the same file (`files/crds.yaml`).
    Crds,
    /// Authorization: predict decisions, read denials from proxies.
    #[command(subcommand)]
    Authz(AuthzCommand),
    /// Inject meshd's sidecar into manifests offline, as the webhook does in a cluster.
    ///
    /// Reads YAML (one or more documents, `v1` Lists too) and prints it with meshd's
    /// init container, native sidecar and volumes added to every Pod and to the pod
    /// templates of Deployments, StatefulSets, DaemonSets, ReplicaSets, Jobs and
    /// CronJobs; everything else is printed unchanged. Pods that opt out
    /// (`meshd.io/inject: "false"`), use hostNetwork or are injected already are left
    /// alone (stderr says why). A pod meshd would refuse fails the run, nothing printed.
    ///
    ///   meshctl inject -f deploy.yaml | kubectl apply -f -
    #[command(verbatim_doc_comment)]
    Inject {
        /// The manifests (`-`: stdin).
        #[arg(long, short = 'f', value_name = "FILE")]
        filename: PathBuf,
        /// The injection settings meshd's webhook uses (the chart's
        /// `<release>-inject` ConfigMap, key config.yaml); default: every default.
        #[arg(long, value_name = "FILE")]
        inject_config: Option<PathBuf>,
    },
    /// Admission of what runs: check manifests against WorkloadPolicies offline, or
    /// read the report on running pods.
    #[command(subcommand)]
    Admission(AdmissionCommand),
    /// Show the resources meshd serves to one workload's sidecar.
    ProxyConfig {
        /// The workload, as <namespace>/<pod>.
        workload: String,
        #[command(flatten)]
        admin: AdminArgs,
        #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
enum AdmissionCommand {
    /// Check the Pods and pod templates of manifests as meshd's validating webhook would.
    ///
    /// The policies are the WorkloadPolicies of the --policy files and of the manifests;
    /// Namespaces there give namespace labels, PeerAuthentications the mTLS mode (STRICT
    /// unless one says otherwise). Prints each object's verdict (stderr: a summary).
    /// Exit status: 0 when nothing is denied, 1 when an Enforce policy denies an object
    /// (or its pod cannot be read), 2 when an input is invalid.
    ///
    ///   meshctl admission check -f manifests/ --policy restricted.yaml
    ///   meshctl inject -f deploy.yaml | meshctl admission check -f - --policy p.yaml
    #[command(verbatim_doc_comment)]
    Check {
        /// The manifests: a file, a directory (every *.yaml/*.yml under it) or `-`
        /// (stdin); repeat for more.
        #[arg(long, short = 'f', value_name = "PATH", required = true)]
        filename: Vec<PathBuf>,
        /// More WorkloadPolicies (and Namespaces, PeerAuthentications): a file or a
        /// directory; repeat for more.
        #[arg(long, value_name = "PATH")]
        policy: Vec<PathBuf>,
        /// The injection settings meshd uses (the chart's `<release>-inject` ConfigMap,
        /// key config.yaml), by which meshd's injected containers are recognised.
        #[arg(long, value_name = "FILE")]
        inject_config: Option<PathBuf>,
        /// The mesh's root namespace: its policies apply to every namespace.
        #[arg(long, value_name = "NS", default_value = DEFAULT_MESHD_NAMESPACE)]
        root_namespace: String,
        #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// How the running pods stand against every WorkloadPolicy: pods it applies to,
    /// those that break it, the rules broken most and the first offenders.
    ///
    /// The replica that holds the Lease evaluates the cluster's pods (at most every
    /// 10 s) and keeps this in each policy's status (--source kubernetes).
    Report {
        #[command(flatten)]
        admin: AdminArgs,
        #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Show the roots meshd trusts and where a root rotation stands.
    Status {
        #[command(flatten)]
        admin: AdminArgs,
        #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Start a root rotation without downtime.
    ///
    /// Step 1 adds a new root to every proxy's trust bundle; step 2 (after meshd's
    /// --root-rotation-grace) signs new certificates with it; step 3 (one certificate
    /// lifetime later) drops the old root. Follow it with `meshctl ca status`.
    RotateRoot {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Issue an operator certificate for meshd's admin API, for someone who should not
    /// hold the root key (or for a cluster, where the root lives in a Secret).
    ///
    /// Writes operator-cert.pem, operator-key.pem (mode 0600) and operator-ca.pem into
    /// DIR; use them with `meshctl --operator DIR …` (or MESHD_OPERATOR=DIR).
    OperatorCert {
        /// The operator's name: spiffe://<trust-domain>/meshd/operator/<name>, logged
        /// by meshd with every change it asks for.
        #[arg(long)]
        name: String,
        /// How long the certificate is valid.
        #[arg(long, default_value = "8h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        #[command(flatten)]
        ca: CaArgs,
        /// The directory to write the three files into.
        #[arg(long, short = 'o', value_name = "DIR")]
        output: PathBuf,
    },
}

/// How to reach meshd's admin API: its address, and who the caller is.
#[derive(Debug, clap::Args)]
struct AdminArgs {
    /// meshd's admin API (HTTPS, operator certificate required).
    #[arg(long, env = "MESHD_ADMIN", default_value = "https://127.0.0.1:15014")]
    admin: String,
    /// Operator credentials written by `meshctl ca operator-cert -o DIR`. Without it,
    /// meshctl mints a 10-minute operator certificate from the CA directory (--ca-dir),
    /// which only someone who can read the root key can do.
    #[arg(long, env = "MESHD_OPERATOR", value_name = "DIR")]
    operator: Option<PathBuf>,
    #[command(flatten)]
    ca: CaArgs,
    /// meshd's namespace, as given to meshd (part of the identity meshctl checks).
    #[arg(long, env = "MESHD_NAMESPACE", default_value = DEFAULT_MESHD_NAMESPACE)]
    meshd_namespace: String,
}

impl AdminArgs {
    /// A client for the admin API, authenticated as an operator.
    fn connect(&self) -> anyhow::Result<AdminClient> {
        let credentials = match &self.operator {
            Some(dir) => Credentials::load(dir).context("--operator")?,
            None => {
                let authority = self
                    .ca
                    .open_existing_with_bundle(operator::MINTED_TTL)
                    .context(
                        "meshctl authenticates to meshd's admin API with an operator \
                     certificate: give --operator DIR (from `meshctl ca operator-cert`), or \
                     --ca-dir where meshd keeps its root",
                    )?;
                Credentials::mint(
                    &authority.signer,
                    authority.trust_bundle_pem,
                    &operator_name(),
                    operator::MINTED_TTL,
                )?
            }
        };
        let meshd = SpiffeId::new(
            credentials.id.trust_domain(),
            &self.meshd_namespace,
            MESHD_SERVICE_ACCOUNT,
        )
        .context("--meshd-namespace")?;
        Ok(credentials.client(&self.admin, &meshd)?)
    }
}

/// The local user's name if it is a valid operator name, else `meshctl`.
fn operator_name() -> String {
    std::env::var("USER")
        .ok()
        .filter(|u| OperatorId::new(meshd_ca::DEFAULT_TRUST_DOMAIN, u).is_ok())
        .unwrap_or_else(|| "meshctl".to_string())
}

#[derive(Debug, Subcommand)]
enum AuthzCommand {
    /// Would this caller be allowed this request? Prints the decision of every workload
    /// behind the service port, and the policy rule that decided it.
    ///
    /// meshd evaluates the RBAC it compiles for each workload's sidecar, the same protos
    /// Envoy enforces, against its current snapshot.
    Check(Box<CheckArgs>),
    /// Denials (and admissions, audits) per rule, read from one sidecar's Envoy admin.
    ///
    /// HTTP ports count per rule (`<ns>/<name>#<i>`): requests each DENY rule denied,
    /// each ALLOW rule admitted and each AUDIT rule matched. TCP ports count per DENY
    /// policy the connections it denied. `none` counts what no ALLOW rule admitted.
    Stats {
        /// The sidecar's Envoy admin address (host:port or URL).
        #[arg(long)]
        proxy_admin: String,
        #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

#[derive(Debug, clap::Args)]
#[command(group = clap::ArgGroup::new("caller").required(true))]
struct CheckArgs {
    /// The caller's SPIFFE id, e.g. spiffe://cluster.local/ns/shop/sa/frontend.
    #[arg(long, group = "caller")]
    from: Option<String>,
    /// The caller as <namespace>/<service account>, in the mesh's trust domain.
    #[arg(long, group = "caller", value_name = "NAMESPACE/SA")]
    from_sa: Option<String>,
    /// The caller has no mesh identity (plaintext, e.g. to a PERMISSIVE port).
    #[arg(long, group = "caller")]
    plaintext: bool,
    /// The caller's IP address (for ipBlocks rules).
    #[arg(long)]
    source_ip: Option<std::net::IpAddr>,
    /// The destination service port, as <namespace>/<service>:<port>.
    #[arg(long, value_name = "NAMESPACE/SERVICE:PORT")]
    to: String,
    /// HTTP method (HTTP ports only).
    #[arg(long, default_value = "GET")]
    method: String,
    /// HTTP path, query allowed (HTTP ports only).
    #[arg(long, default_value = "/")]
    path: String,
    /// HTTP Host / :authority (default: the service name).
    #[arg(long)]
    host: Option<String>,
    /// A request header, as name:value; repeat for more.
    #[arg(long = "header", short = 'H', value_name = "NAME:VALUE")]
    headers: Vec<String>,
    #[command(flatten)]
    admin: AdminArgs,
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Debug, clap::Args)]
struct BootstrapArgs {
    /// The pod this sidecar belongs to.
    #[arg(long)]
    pod: String,
    /// The pod's namespace.
    #[arg(long, short = 'n', default_value = "default")]
    namespace: String,
    /// The pod's service account: its identity.
    #[arg(long, default_value = "default")]
    service_account: String,
    /// meshd's xDS address, host:port (host may be a DNS name).
    #[arg(long, env = "MESHD_XDS_ADDRESS", default_value = "127.0.0.1:15012")]
    xds_address: String,
    /// meshd's namespace, as given to meshd (part of the identity Envoy checks).
    #[arg(long, env = "MESHD_NAMESPACE", default_value = DEFAULT_MESHD_NAMESPACE)]
    meshd_namespace: String,
    #[command(flatten)]
    ca: CaArgs,
    /// Lifetime of the bootstrap certificate Envoy uses towards meshd.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    cert_ttl: Duration,
    /// Port of Envoy's admin interface on 127.0.0.1.
    #[arg(long, default_value_t = 15000)]
    admin_port: u16,
    /// xDS flavour: state of the world or incremental.
    #[arg(long, value_enum, default_value_t = Flavor::Delta)]
    xds_protocol: Flavor,
    /// The sidecar directory to write (created 0700; its credentials are replaced).
    #[arg(long, short = 'o', value_name = "DIR")]
    output: PathBuf,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Flavor {
    Sotw,
    Delta,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("meshctl: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Inject {
            filename,
            inject_config,
        } => {
            let config = match &inject_config {
                Some(path) => meshd::inject::InjectConfig::load(path)?,
                None => meshd::inject::InjectConfig::default(),
            };
            let text = if filename.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin()).context("cannot read stdin")?
            } else {
                std::fs::read_to_string(&filename)
                    .with_context(|| format!("cannot read {}", filename.display()))?
            };
            let (yaml, report) = meshd::inject::manifests::inject_yaml(&text, &config)
                .map_err(|e| anyhow::anyhow!("{}: {e}", filename.display()))?;
            print!("{yaml}");
            for left in &report.left_alone {
                eprintln!("not injected: {left}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Admission(AdmissionCommand::Check {
            filename,
            policy,
            inject_config,
            root_namespace,
            output,
        }) => {
            use meshd::admission::manifests;
            let config = match &inject_config {
                Some(path) => meshd::inject::InjectConfig::load(path)?,
                None => meshd::inject::InjectConfig::default(),
            };
            let load = |paths: &[PathBuf]| -> anyhow::Result<Vec<manifests::Input>> {
                Ok(paths
                    .iter()
                    .map(|p| manifests::load(p))
                    .collect::<Result<Vec<_>, _>>()?
                    .concat())
            };
            let report =
                manifests::check(&load(&filename)?, &load(&policy)?, &config, &root_namespace)?;
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.table());
            }
            if report.policies.is_empty() {
                eprintln!(
                    "no WorkloadPolicy in the manifests or --policy files: nothing to check against"
                );
            }
            eprintln!("{}", report.summary());
            Ok(if report.denied() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Bootstrap(args) => {
            let BootstrapArgs {
                pod,
                namespace,
                service_account,
                xds_address,
                meshd_namespace,
                ca,
                cert_ttl,
                admin_port,
                xds_protocol,
                output,
            } = *args;
            let (host, port) = split_host_port(&xds_address)
                .with_context(|| format!("--xds-address {xds_address:?}: expected host:port"))?;
            let ca = ca.open_existing_with_bundle(cert_ttl)?;
            let authority = &ca.signer;
            let id = authority
                .workload_id(&namespace, &service_account)
                .context("--namespace / --service-account")?;
            let meshd_identity = authority
                .workload_id(&meshd_namespace, MESHD_SERVICE_ACCOUNT)
                .context("--meshd-namespace")?;
            let issued = authority.issue(&id)?;
            let dir = CredentialDir::new(&output)?;
            // With the next root during a rotation: meshd serves with it from step 2.
            dir.write(&SidecarCredentials {
                cert_chain_pem: issued.chain_pem.clone(),
                key_pem: issued.key.secret_pem().to_string().into(),
                trust_bundle_pem: ca.trust_bundle_pem.clone(),
            })?;
            let opts = BootstrapOptions {
                namespace,
                pod,
                service_account,
                xds_host: host.to_string(),
                xds_port: port,
                meshd_identity: meshd_identity.to_string(),
                admin_port,
                flavor: match xds_protocol {
                    Flavor::Sotw => XdsFlavor::Sotw,
                    Flavor::Delta => XdsFlavor::Delta,
                },
                credentials: dir.clone(),
            };
            let output = write_bootstrap(&opts)?;
            eprintln!(
                "wrote {} for {id} (certificate valid until {})",
                output.display(),
                humantime::format_rfc3339_seconds(issued.not_after)
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Analyze { dir } => {
            if !dir.is_dir() {
                anyhow::bail!("{}: not a directory", dir.display());
            }
            let mut source = FileSource::new(&dir);
            let objects = source.scan();
            let count = objects.len();
            let mesh = MeshSnapshot::build(0, MeshDefaults::default(), objects);
            let problems: Vec<&str> = mesh.problems().collect();
            for e in source.errors() {
                println!("error: {e}");
            }
            for p in &problems {
                println!("problem: {p}");
            }
            for n in source.notes() {
                println!("note: {n}");
            }
            let ignored = match source.notes().len() {
                0 => String::new(),
                n => format!(", {n} ignored (see the notes)"),
            };
            let wrong = source.errors().len() + problems.len();
            if wrong == 0 {
                println!("{}: {count} objects, no problems{ignored}", dir.display());
                Ok(ExitCode::SUCCESS)
            } else {
                println!("{wrong} problem(s){ignored}");
                Ok(ExitCode::from(1))
            }
        }
        Command::Status { admin, output } => {
            let admin = admin.connect()?;
            let summary: SnapshotSummary = admin.get_json("/debug/snapshot").await?;
            let proxies: Vec<ProxyStatus> = admin.get_json("/debug/proxies").await?;
            if output == Output::Json {
                let v = serde_json::json!({ "snapshot": summary, "proxies": proxies });
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(ExitCode::SUCCESS);
            }
            print!("{}", status_text(&summary, &proxies));
            Ok(ExitCode::SUCCESS)
        }
        Command::Admission(AdmissionCommand::Report { admin, output }) => {
            let entries: Vec<PolicyReportEntry> =
                admin.connect()?.get_json("/admission/report").await?;
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
            } else {
                print!("{}", admission_report_text(&entries));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Ca(CaCommand::Status { admin, output }) => {
            let status: RotationStatus = admin.connect()?.get_json("/ca/status").await?;
            print_rotation(&status, output)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Ca(CaCommand::RotateRoot { admin }) => {
            let status: RotationStatus = admin
                .connect()?
                .call_json(Method::POST, "/ca/rotate-root", None::<&()>)
                .await?;
            println!("root rotation started");
            print_rotation(&status, Output::Table)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Ca(CaCommand::OperatorCert {
            name,
            ttl,
            ca,
            output,
        }) => {
            let authority = ca.open_existing_with_bundle(ttl)?;
            let credentials =
                Credentials::mint(&authority.signer, authority.trust_bundle_pem, &name, ttl)
                    .context("--name")?;
            credentials.write(&output)?;
            eprintln!(
                "wrote operator credentials for {} into {} (valid for {})",
                credentials.id,
                output.display(),
                humantime::format_duration(ttl)
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Crds => {
            print!("{}", meshd::sources::crd::crds_yaml());
            Ok(ExitCode::SUCCESS)
        }
        Command::Authz(AuthzCommand::Check(args)) => {
            let req = check_request(&args)?;
            let resp: CheckResponse = args
                .admin
                .connect()?
                .call_json(Method::POST, "/debug/authz/check", Some(&req))
                .await?;
            print_check(&resp, &req, args.output)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Authz(AuthzCommand::Stats {
            proxy_admin,
            output,
        }) => {
            let base = if proxy_admin.contains("://") {
                proxy_admin
            } else {
                format!("http://{proxy_admin}")
            };
            let url = format!("{}/stats?filter=rbac", base.trim_end_matches('/'));
            let text = reqwest::get(&url)
                .await
                .and_then(|r| r.error_for_status())
                .with_context(|| format!("cannot read Envoy stats at {url}"))?
                .text()
                .await?;
            let rows = stats::parse(&text);
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{:<32} {:<40} {:<8} {:>8}",
                "LISTENER", "RULE", "OUTCOME", "COUNT"
            );
            for r in &rows {
                println!(
                    "{:<32} {:<40} {:<8} {:>8}",
                    r.listener, r.rule, r.outcome, r.count
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::ProxyConfig {
            workload,
            admin,
            output,
        } => {
            let cfg: ProxyConfig = admin
                .connect()?
                .get_json(&format!("/debug/proxy-config?workload={workload}"))
                .await?;
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&cfg)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!("{} (snapshot {})", cfg.workload, cfg.snapshot_version);
            for (t, set) in &cfg.resources {
                println!("{t}:");
                for (name, version) in set {
                    println!("  {name:<60} {version}");
                }
            }
            for p in &cfg.problems {
                println!("problem: {p}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// How many config notes `meshctl status` prints before it points at `-o json`.
const STATUS_NOTES: usize = 10;

/// `meshctl status` as text: the snapshot, what is wrong with the config and the mesh,
/// and a table of the connected proxies.
fn status_text(summary: &SnapshotSummary, proxies: &[ProxyStatus]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "snapshot {}: {} namespaces, {} services, {} workloads, {} endpoints",
        summary.version, summary.namespaces, summary.services, summary.workloads, summary.endpoints
    );
    for e in &summary.config_errors {
        let _ = writeln!(out, "config error: {e}");
    }
    for p in &summary.problems {
        let _ = writeln!(out, "problem: {p}");
    }
    for n in summary.config_notes.iter().take(STATUS_NOTES) {
        let _ = writeln!(out, "config note: {n}");
    }
    if summary.config_notes.len() > STATUS_NOTES {
        let _ = writeln!(
            out,
            "… and {} more config notes (`-o json` lists them all)",
            summary.config_notes.len() - STATUS_NOTES
        );
    }
    out.push('\n');
    let mut rows = vec![
        [
            "NODE", "WORKLOAD", "IDENTITY", "XDS", "SNAPSHOT", "SYNCED", "TYPES",
        ]
        .map(String::from),
    ];
    let mut details: Vec<Vec<String>> = Vec::new();
    for p in proxies {
        let types: Vec<String> = p
            .types
            .iter()
            .map(|(t, s)| {
                let state = if s.nacked {
                    "NACKED"
                } else if s.pending {
                    "sent"
                } else {
                    "acked"
                };
                format!("{t}:{}({state})", s.resources)
            })
            .collect();
        rows.push([
            p.node_id.clone(),
            p.workload.clone(),
            p.identity.clone(),
            match p.flavor {
                XdsFlavor::Sotw => "sotw",
                XdsFlavor::Delta => "delta",
            }
            .to_string(),
            p.snapshot_version.to_string(),
            p.synced_version
                .map(|v| v.to_string())
                .unwrap_or("-".into()),
            types.join(" "),
        ]);
        let mut lines = Vec::new();
        for (t, s) in &p.types {
            if let Some(n) = s.last_nack.as_ref().filter(|_| s.nacked) {
                lines.push(format!("    {t} rejected at {}: {}", n.at, n.message));
            }
        }
        lines.extend(
            p.problems
                .iter()
                .map(|problem| format!("    problem: {problem}")),
        );
        details.push(lines);
    }
    let table = table(&rows);
    let mut lines = table.lines();
    let _ = writeln!(out, "{}", lines.next().unwrap_or_default());
    for (line, detail) in lines.zip(&details) {
        let _ = writeln!(out, "{line}");
        for d in detail {
            let _ = writeln!(out, "{d}");
        }
    }
    out
}

/// Rules shown per policy in `meshctl admission report`'s table.
const TOP_RULES: usize = 3;

/// `meshctl admission report` as text: a table of the policies, then each policy's
/// offenders with their violations.
fn admission_report_text(entries: &[PolicyReportEntry]) -> String {
    use std::fmt::Write as _;
    if entries.is_empty() {
        return "no WorkloadPolicies\n".to_string();
    }
    let mut rows = vec![
        [
            "POLICY",
            "MODE",
            "ACCEPTED",
            "PODS",
            "VIOLATING",
            "TOP RULES",
        ]
        .map(String::from),
    ];
    let mut details = String::new();
    for e in entries {
        let accepted = e.accepted.clone().unwrap_or("-".into());
        if !e.message.is_empty() {
            let _ = writeln!(details, "{}: not accepted: {}", e.policy, e.message);
        }
        let Some(r) = &e.report else {
            rows.push([
                e.policy.clone(),
                e.mode.clone(),
                accepted,
                "-".into(),
                "-".into(),
                "(not evaluated yet)".into(),
            ]);
            continue;
        };
        let mut top: Vec<String> = (r.rules.iter().take(TOP_RULES))
            .map(|rule| format!("{}({})", rule.rule, rule.pods))
            .collect();
        if r.rules.len() > TOP_RULES {
            top.push(format!("+{} more", r.rules.len() - TOP_RULES));
        }
        rows.push([
            e.policy.clone(),
            e.mode.clone(),
            accepted,
            r.pods.to_string(),
            r.violating_pods.to_string(),
            if top.is_empty() {
                "-".into()
            } else {
                top.join(" ")
            },
        ]);
        if r.offenders.is_empty() {
            continue;
        }
        let shown = match r.violating_pods as usize {
            n if n > r.offenders.len() => format!(" (the first {} of {n})", r.offenders.len()),
            _ => String::new(),
        };
        let _ = writeln!(
            details,
            "\n{} ({}), evaluated at {}: offenders{shown}",
            e.policy, e.mode, r.evaluated_at
        );
        for o in &r.offenders {
            let _ = writeln!(details, "  {}", o.pod);
            for v in &o.violations {
                let _ = writeln!(details, "    {v}");
            }
        }
    }
    let mut out = table(&rows);
    out.push_str(&details);
    out
}

/// Rows as columns as wide as their widest cell, two spaces apart; the last column is
/// not padded.
fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i + 1 == N {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn print_rotation(status: &RotationStatus, output: Output) -> anyhow::Result<()> {
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(status)?);
        return Ok(());
    }
    println!("root rotation: {}", status.phase);
    for (i, root) in status.trusted_roots.iter().enumerate() {
        let role = if i == 0 { "signing" } else { "trusted" };
        println!("  root {root} ({role})");
    }
    if let Some(t) = &status.next_step_at {
        println!("  next step at {t}");
    }
    if status.phase != "idle" {
        println!(
            "  certificates still valid under the old root: {} (the old root leaves the bundle at 0)",
            status.valid_under_old_roots
        );
    }
    if let Some(t) = &status.last_completed_at {
        println!("  last rotation completed at {t}");
    }
    Ok(())
}

fn check_request(args: &CheckArgs) -> anyhow::Result<CheckRequest> {
    let (service, port) = args
        .to
        .rsplit_once(':')
        .and_then(|(svc, port)| Some((svc, port.parse::<u16>().ok()?)))
        .filter(|(svc, _)| {
            svc.split_once('/')
                .is_some_and(|(a, b)| !a.is_empty() && !b.is_empty())
        })
        .with_context(|| {
            format!(
                "--to must be <namespace>/<service>:<port>, not {:?}",
                args.to
            )
        })?;
    let (source_namespace, source_service_account) = match &args.from_sa {
        Some(s) => {
            let (ns, sa) = s
                .split_once('/')
                .filter(|(a, b)| !a.is_empty() && !b.is_empty())
                .with_context(|| {
                    format!("--from-sa must be <namespace>/<service account>, not {s:?}")
                })?;
            (Some(ns.to_string()), Some(sa.to_string()))
        }
        None => (None, None),
    };
    let headers = args
        .headers
        .iter()
        .map(|h| {
            h.split_once(':')
                .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
                .filter(|(n, _)| !n.is_empty())
                .with_context(|| format!("--header must be <name>:<value>, not {h:?}"))
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(CheckRequest {
        principal: args.from.clone(),
        source_namespace,
        source_service_account,
        source_ip: args.source_ip,
        service: service.to_string(),
        port,
        method: Some(args.method.clone()),
        path: Some(args.path.clone()),
        host: args.host.clone(),
        headers,
    })
}

fn print_check(resp: &CheckResponse, req: &CheckRequest, output: Output) -> anyhow::Result<()> {
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(resp)?);
        return Ok(());
    }
    let decision = |allowed: bool| if allowed { "ALLOW" } else { "DENY" };
    // Method and path mean nothing to a TCP port.
    let request = if resp.workloads.iter().any(|w| w.protocol == "http") {
        format!(
            " {} {}",
            req.method.as_deref().unwrap_or("GET"),
            req.path.as_deref().unwrap_or("/")
        )
    } else {
        String::new()
    };
    println!(
        "{} {}:{}{request} from {} (snapshot {})",
        decision(resp.allowed),
        resp.service,
        resp.port,
        resp.principal.as_deref().unwrap_or("a plaintext caller"),
        resp.snapshot_version
    );
    for w in &resp.workloads {
        let why = match &w.verdict.denied_by {
            Some(rule) if rule == "none" => "no ALLOW rule matched".to_string(),
            Some(rule) => format!("denied by {rule}"),
            None if w.policies.is_empty() => "no policy selects it".to_string(),
            None => "allowed".to_string(),
        };
        println!(
            "  {:<30} :{} {:<4} {:<5} {why}",
            w.workload,
            w.target_port,
            w.protocol,
            decision(w.verdict.allowed)
        );
        if !w.policies.is_empty() {
            println!("      policies: {}", w.policies.join(", "));
        }
        if !w.verdict.audit.is_empty() {
            println!("      audit: {}", w.verdict.audit.join(", "));
        }
        for note in &w.verdict.notes {
            println!("      note: {note}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshd::xds::serve::status::TypeStatus;

    fn proxy(node_id: &str, workload: &str, identity: &str) -> ProxyStatus {
        let mut p = ProxyStatus::new(
            node_id.into(),
            workload.into(),
            identity.into(),
            XdsFlavor::Delta,
        );
        p.snapshot_version = 12;
        p.synced_version = Some(12);
        p.types.insert(
            "cds".into(),
            TypeStatus {
                resources: 3,
                ..Default::default()
            },
        );
        p
    }

    /// Columns were 32 and 24 characters wide whatever the data: a longer node id
    /// pushed the rest of its row out of line, and two streams of one node id (one
    /// pod's sidecar, one impostor) looked alike without the identity.
    #[test]
    fn status_columns_fit_the_data_and_show_the_identity() {
        let summary = SnapshotSummary {
            version: 12,
            namespaces: 1,
            services: 1,
            workloads: 2,
            endpoints: 1,
            workload_policies: 0,
            connected_proxies: 2,
            config_errors: vec![],
            config_notes: vec![],
            problems: vec!["Service shop/web port 80: …".into()],
            pending: vec![],
            leader: None,
        };
        let long = "checkout-frontend-7f9c8d6b5-abcde.storefront-production";
        let proxies = [
            proxy(
                long,
                "storefront-production/checkout-frontend-7f9c8d6b5-abcde",
                "spiffe://cluster.local/ns/storefront-production/sa/checkout",
            ),
            proxy(
                "web-1.shop",
                "shop/web-1",
                "spiffe://cluster.local/ns/shop/sa/web",
            ),
        ];
        let text = status_text(&summary, &proxies);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[1], "problem: Service shop/web port 80: …");
        let table = &lines[3..];
        assert!(table[0].starts_with("NODE "), "{text}");
        for column in ["WORKLOAD", "IDENTITY", "XDS", "SNAPSHOT", "SYNCED", "TYPES"] {
            let at = table[0].find(column).unwrap();
            for row in &table[1..] {
                assert!(
                    row.len() > at && row[..at].ends_with("  ") && !row[at..].starts_with(' '),
                    "column {column} is not aligned:\n{text}"
                );
            }
        }
        let cells: Vec<&str> = table[2].split_whitespace().collect();
        assert_eq!(
            cells,
            [
                "web-1.shop",
                "shop/web-1",
                "spiffe://cluster.local/ns/shop/sa/web",
                "delta",
                "12",
                "12",
                "cds:3(acked)"
            ]
        );
    }

    #[test]
    fn the_admission_report_shows_top_rules_and_the_offenders_it_has() {
        use meshd::sources::crd::{PolicyOffender, PolicyReport, RuleCount};
        let rule = |rule: &str, pods| RuleCount {
            rule: rule.into(),
            pods,
        };
        let entries = [
            PolicyReportEntry {
                policy: "meshd-system/restricted".into(),
                mode: "Audit".into(),
                accepted: Some("True".into()),
                message: String::new(),
                report: Some(PolicyReport {
                    evaluated_at: "2026-12-01T10:00:00Z".into(),
                    pods: 30,
                    violating_pods: 12,
                    rules: vec![
                        rule("runAsNonRoot", 12),
                        rule("seccompProfile_restricted", 12),
                        rule("capabilities_restricted", 9),
                        rule("forbidLatestTag", 1),
                    ],
                    offenders: vec![PolicyOffender {
                        pod: "shop/web-0".into(),
                        violations: vec!["container \"app\": x [runAsNonRoot]".into()],
                    }],
                }),
            },
            PolicyReportEntry {
                policy: "shop/new".into(),
                mode: "Enforce".into(),
                accepted: Some("False".into()),
                message: "spec.mode: \"Deny\" is not a mode".into(),
                report: None,
            },
        ];
        let text = admission_report_text(&entries);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[..3],
            [
                "POLICY                   MODE     ACCEPTED  PODS  VIOLATING  TOP RULES",
                "meshd-system/restricted  Audit    True      30    12         runAsNonRoot(12) seccompProfile_restricted(12) capabilities_restricted(9) +1 more",
                "shop/new                 Enforce  False     -     -          (not evaluated yet)",
            ],
            "{text}"
        );
        assert_eq!(
            lines[3..],
            [
                "",
                "meshd-system/restricted (Audit), evaluated at 2026-12-01T10:00:00Z: offenders (the first 1 of 12)",
                "  shop/web-0",
                "    container \"app\": x [runAsNonRoot]",
                "shop/new: not accepted: spec.mode: \"Deny\" is not a mode",
            ],
            "{text}"
        );
        assert_eq!(admission_report_text(&[]), "no WorkloadPolicies\n");
    }
}
