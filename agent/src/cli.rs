//! The command line. Every flag a pod sets has an environment variable, so the
//! injected container can be configured with `env:` alone.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use meshd_ca::{DEFAULT_MESHD_NAMESPACE, DEFAULT_TRUST_DOMAIN};

/// meshd-agent — the per-pod helper that gives Envoy its identity and runs it.
#[derive(Debug, Parser)]
#[command(name = "meshd-agent", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Get the pod's certificate from meshd, write Envoy's bootstrap, run Envoy, keep
    /// the certificate and trust bundle current, answer the readiness probe.
    ///
    /// The key is made here (ECDSA P-256, a new one at every renewal) and reaches disk
    /// only as DIR/certs/key.pem (0600) in the agent's own directory (--dir).
    ///
    /// Identity, one of two modes:
    ///
    /// - token mode (the default, in a cluster): meshd reviews the pod's projected
    ///   ServiceAccount token (--token-file, audience meshd). Namespace, pod and service
    ///   account are read from the token's own claims.
    ///
    /// - local mode (--cert-dir): starts from a directory `meshctl bootstrap -o DIR`
    ///   wrote, and from then on renews over mutual TLS with its current, still valid
    ///   certificate. It never writes into that directory.
    ///
    /// The certificate is renewed at half its lifetime (±10 %), and at once when meshd
    /// announces a new signing root. Envoy is started only once the first certificate is
    /// written; arguments after `--` are passed to it. SIGTERM drains Envoy (up to
    /// --drain-time) and the agent exits with Envoy's exit code; SIGINT and SIGHUP are
    /// forwarded. If Envoy exits on its own, so does the agent (non-zero): the kubelet
    /// restarts the container.
    #[command(verbatim_doc_comment)]
    Run(Box<RunArgs>),
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Token mode: the pod's projected ServiceAccount token, read again at every
    /// renewal (the kubelet rotates it).
    #[arg(
        long,
        env = "MESHD_AGENT_TOKEN_FILE",
        default_value = "/var/run/secrets/tokens/meshd-token",
        value_name = "FILE"
    )]
    pub token_file: PathBuf,
    /// Token mode: the roots to trust meshd with until meshd sends its own bundle
    /// (e.g. a ConfigMap mount).
    #[arg(
        long,
        env = "MESHD_AGENT_TRUST_BUNDLE",
        default_value = "/var/run/secrets/meshd/trust-bundle.pem",
        value_name = "FILE"
    )]
    pub trust_bundle: PathBuf,
    /// Token mode: the mesh's trust domain (local mode takes it from the certificate).
    #[arg(long, env = "MESHD_TRUST_DOMAIN", default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Local mode: a directory written by `meshctl bootstrap -o DIR` (its certs/ is
    /// read, never written). The identity is its certificate's SPIFFE id.
    #[arg(long, env = "MESHD_AGENT_CERT_DIR", value_name = "DIR")]
    pub cert_dir: Option<PathBuf>,
    /// The pod's name. Required in local mode; in token mode, if given, it must be the
    /// token's pod.
    #[arg(long, env = "POD_NAME")]
    pub pod: Option<String>,
    /// The agent's own sidecar directory: Envoy's bootstrap and credentials (0700).
    #[arg(
        long,
        env = "MESHD_AGENT_DIR",
        default_value = "/var/run/meshd-agent",
        value_name = "DIR"
    )]
    pub dir: PathBuf,
    /// meshd's xDS address, host:port (host may be a DNS name); the CA service is
    /// served there too.
    #[arg(long, env = "MESHD_XDS_ADDRESS", value_name = "HOST:PORT")]
    pub xds_address: String,
    /// meshd's namespace: meshd must present spiffe://<td>/ns/<this>/sa/meshd.
    #[arg(long, env = "MESHD_NAMESPACE", default_value = DEFAULT_MESHD_NAMESPACE)]
    pub meshd_namespace: String,
    /// xDS flavour Envoy speaks: state of the world or incremental.
    #[arg(long, env = "MESHD_AGENT_XDS_PROTOCOL", value_enum, default_value_t = Flavor::Delta)]
    pub xds_protocol: Flavor,
    /// Port of Envoy's admin interface on 127.0.0.1.
    #[arg(long, env = "MESHD_AGENT_ENVOY_ADMIN_PORT", default_value_t = 15000)]
    pub envoy_admin_port: u16,
    /// The Envoy binary (looked up on PATH unless it is a path).
    #[arg(
        long,
        env = "MESHD_AGENT_ENVOY_BINARY",
        default_value = "envoy",
        value_name = "PATH"
    )]
    pub envoy_binary: PathBuf,
    /// Where `/healthz/ready` is served (plain HTTP, for the kubelet's probes).
    #[arg(
        long,
        env = "MESHD_AGENT_HEALTH_ADDRESS",
        default_value = "0.0.0.0:15020"
    )]
    pub health_address: SocketAddr,
    /// On SIGTERM, how long Envoy may drain its connections before it is stopped
    /// (less if no connection is left). Also Envoy's --drain-time-s.
    #[arg(
        long,
        env = "MESHD_AGENT_DRAIN_TIME",
        default_value = "5s",
        value_parser = humantime::parse_duration
    )]
    pub drain_time: Duration,
    /// Log filter (tracing's EnvFilter syntax).
    #[arg(long, env = "MESHD_AGENT_LOG", default_value = "info")]
    pub log: String,
    /// Arguments for Envoy, after `--` (the agent sets -c, --disable-hot-restart,
    /// --drain-time-s and --drain-strategy itself).
    #[arg(last = true, value_name = "ENVOY ARGS")]
    pub envoy_args: Vec<OsString>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Flavor {
    Sotw,
    Delta,
}

impl From<Flavor> for meshd_sidecar::XdsFlavor {
    fn from(f: Flavor) -> Self {
        match f {
            Flavor::Sotw => meshd_sidecar::XdsFlavor::Sotw,
            Flavor::Delta => meshd_sidecar::XdsFlavor::Delta,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn arguments_after_the_double_dash_go_to_envoy() {
        let cli = Cli::try_parse_from([
            "meshd-agent",
            "run",
            "--xds-address",
            "127.0.0.1:15012",
            "--cert-dir",
            "web-1",
            "--pod",
            "web-1",
            "--",
            "--concurrency",
            "1",
        ])
        .unwrap();
        let Command::Run(args) = cli.command;
        assert_eq!(args.envoy_args, ["--concurrency", "1"]);
        assert_eq!(args.drain_time, Duration::from_secs(5));
        assert_eq!(
            args.cert_dir.as_deref(),
            Some(std::path::Path::new("web-1"))
        );
    }
}
