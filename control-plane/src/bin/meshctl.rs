//! `meshctl`: the operator's tool for meshd.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use meshd::admin::{ProxyConfig, SnapshotSummary};
use meshd::bootstrap::{BootstrapOptions, envoy_bootstrap};
use meshd::sources::file::FileSource;
use meshd::xds::status::{ProxyStatus, XdsFlavor};

/// meshctl — operate and debug a meshd service mesh.
#[derive(Debug, Parser)]
#[command(version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write the Envoy bootstrap for a workload's sidecar.
    ///
    /// The bootstrap names the pod (node id `<pod>.<namespace>` and metadata), points
    /// ADS at meshd and puts Envoy's admin interface on 127.0.0.1.
    Bootstrap {
        /// The pod this sidecar belongs to.
        #[arg(long)]
        pod: String,
        /// The pod's namespace.
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
        /// meshd's xDS address, host:port (host may be a DNS name).
        #[arg(long, default_value = "127.0.0.1:15010")]
        xds_address: String,
        /// Port of Envoy's admin interface on 127.0.0.1.
        #[arg(long, default_value_t = 15000)]
        admin_port: u16,
        /// xDS flavour: state of the world or incremental.
        #[arg(long, value_enum, default_value_t = Flavor::Delta)]
        xds_protocol: Flavor,
        /// Write to this file instead of standard output.
        #[arg(long, short = 'o')]
        output: Option<PathBuf>,
    },
    /// Check a config directory offline and list every problem.
    ///
    /// Exits with status 1 if anything is wrong, so it can guard a CI pipeline.
    Analyze {
        /// The directory meshd would read with --config-dir.
        dir: PathBuf,
    },
    /// Show meshd's mesh snapshot, config errors and connected proxies.
    Status {
        /// meshd's admin address.
        #[arg(long, env = "MESHD_ADMIN", default_value = "http://127.0.0.1:15014")]
        admin: String,
        /// Print JSON instead of a table.
        #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Show the resources meshd serves to one workload's sidecar.
    ProxyConfig {
        /// The workload, as <namespace>/<pod>.
        workload: String,
        /// meshd's admin address.
        #[arg(long, env = "MESHD_ADMIN", default_value = "http://127.0.0.1:15014")]
        admin: String,
        #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
        output: Output,
    },
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
        Command::Bootstrap {
            pod,
            namespace,
            xds_address,
            admin_port,
            xds_protocol,
            output,
        } => {
            let (host, port) = xds_address
                .rsplit_once(':')
                .and_then(|(h, p)| Some((h.trim_matches(['[', ']']), p.parse::<u16>().ok()?)))
                .with_context(|| format!("--xds-address {xds_address:?}: expected host:port"))?;
            let opts = BootstrapOptions {
                namespace,
                pod,
                xds_host: host.to_string(),
                xds_port: port,
                admin_port,
                flavor: match xds_protocol {
                    Flavor::Sotw => XdsFlavor::Sotw,
                    Flavor::Delta => XdsFlavor::Delta,
                },
            };
            let text = serde_json::to_string_pretty(&envoy_bootstrap(&opts))? + "\n";
            match output {
                Some(path) => std::fs::write(&path, text)
                    .with_context(|| format!("cannot write {}", path.display()))?,
                None => std::io::stdout().write_all(text.as_bytes())?,
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Analyze { dir } => {
            if !dir.is_dir() {
                anyhow::bail!("{}: not a directory", dir.display());
            }
            let mut source = FileSource::new(&dir);
            let objects = source.scan();
            for e in source.errors() {
                println!("error: {e}");
            }
            if source.errors().is_empty() {
                println!("{}: {} objects, no problems", dir.display(), objects.len());
                Ok(ExitCode::SUCCESS)
            } else {
                println!("{} problem(s)", source.errors().len());
                Ok(ExitCode::from(1))
            }
        }
        Command::Status { admin, output } => {
            let summary: SnapshotSummary = get_json(&admin, "/debug/snapshot").await?;
            let proxies: Vec<ProxyStatus> = get_json(&admin, "/debug/proxies").await?;
            if output == Output::Json {
                let v = serde_json::json!({ "snapshot": summary, "proxies": proxies });
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "snapshot {}: {} namespaces, {} services, {} workloads, {} endpoints",
                summary.version,
                summary.namespaces,
                summary.services,
                summary.workloads,
                summary.endpoints
            );
            for e in &summary.config_errors {
                println!("config error: {e}");
            }
            println!();
            println!(
                "{:<32} {:<24} {:<6} {:>8} {:>8}  TYPES",
                "NODE", "WORKLOAD", "XDS", "SNAPSHOT", "SYNCED"
            );
            for p in &proxies {
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
                println!(
                    "{:<32} {:<24} {:<6} {:>8} {:>8}  {}",
                    p.node_id,
                    p.workload,
                    serde_json::to_value(p.flavor)?.as_str().unwrap_or("?"),
                    p.snapshot_version,
                    p.synced_version
                        .map(|v| v.to_string())
                        .unwrap_or("-".into()),
                    types.join(" ")
                );
                for (t, s) in &p.types {
                    if let Some(n) = s.last_nack.as_ref().filter(|_| s.nacked) {
                        println!("    {t} rejected at {}: {}", n.at, n.message);
                    }
                }
                for problem in &p.problems {
                    println!("    problem: {problem}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::ProxyConfig {
            workload,
            admin,
            output,
        } => {
            let cfg: ProxyConfig =
                get_json(&admin, &format!("/debug/proxy-config?workload={workload}")).await?;
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

async fn get_json<T: serde::de::DeserializeOwned>(admin: &str, path: &str) -> anyhow::Result<T> {
    let url = format!("{}{path}", admin.trim_end_matches('/'));
    let resp = reqwest::get(&url)
        .await
        .with_context(|| format!("cannot reach meshd's admin API at {admin}"))?;
    let status = resp.status();
    if !status.is_success() {
        let body = resp.text().await.unwrap_or_default();
        anyhow::bail!("{url}: {status}: {}", body.trim());
    }
    resp.json()
        .await
        .with_context(|| format!("{url}: unexpected answer"))
}
