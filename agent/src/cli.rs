//! The command line. Every flag a pod sets has an environment variable, so the
//! injected container can be configured with `env:` alone.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use meshd_ca::{DEFAULT_MESHD_NAMESPACE, DEFAULT_TRUST_DOMAIN};
use meshd_sidecar::capture::{self, CidrList, PortList, Selection};

use crate::init::backend::Choice as BackendChoice;

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
    /// the certificate and trust bundle current, answer the readiness probe and perform
    /// the app's probes (--app-probes) for the kubelet.
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
    /// Transparent capture: redirect the pod's TCP to Envoy with iptables (what the
    /// injected init container runs, once, as root with NET_ADMIN in the pod's network
    /// namespace).
    ///
    /// Outbound TCP goes to --outbound-port, except the proxy's own (--proxy-uid,
    /// --proxy-gid), loopback and what the exclude/include flags leave out; Envoy's own
    /// connections over lo to a pod address go to --inbound-port, so a pod calling
    /// itself passes the inbound checks. Inbound TCP goes to --inbound-port, except the
    /// agent's health port (15020) and --exclude-inbound-ports.
    ///
    /// Each address family is ONE iptables-restore --noflush transaction into meshd's
    /// nat chains (MESHD_INBOUND, MESHD_IN_REDIRECT, MESHD_OUTPUT, MESHD_REDIRECT), with
    /// one jump each from PREROUTING and OUTPUT: running it again leaves the same rules,
    /// a refused rule changes nothing (and is named, with its flag), --cleanup removes
    /// exactly meshd's chains and jumps. IPv6 (ip6tables) when the pod has an IPv6
    /// address beyond loopback and link-local. Lists are comma-separated; IP ranges of
    /// both families may be mixed.
    #[command(verbatim_doc_comment)]
    Init(Box<InitArgs>),
}

#[derive(Debug, clap::Args)]
pub struct InitArgs {
    /// Envoy's outbound virtual listener.
    #[arg(long, env = "MESHD_AGENT_OUTBOUND_PORT", default_value_t = capture::OUTBOUND_PORT,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub outbound_port: u16,
    /// Envoy's inbound virtual listener.
    #[arg(long, env = "MESHD_AGENT_INBOUND_PORT", default_value_t = capture::INBOUND_PORT,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub inbound_port: u16,
    /// The uid Envoy runs as: its connections are not captured.
    #[arg(long, env = "MESHD_AGENT_PROXY_UID", default_value_t = capture::PROXY_UID,
          value_parser = clap::value_parser!(u32).range(..i64::from(u32::MAX)))]
    pub proxy_uid: u32,
    /// The gid Envoy runs as: its connections are not captured [default: --proxy-uid].
    #[arg(long, env = "MESHD_AGENT_PROXY_GID",
          value_parser = clap::value_parser!(u32).range(..i64::from(u32::MAX)))]
    pub proxy_gid: Option<u32>,
    /// Outbound TCP to these ports bypasses Envoy (pod annotation
    /// meshd.io/exclude-outbound-ports).
    #[arg(long, env = "MESHD_AGENT_EXCLUDE_OUTBOUND_PORTS", value_name = "PORTS")]
    pub exclude_outbound_ports: Option<PortList>,
    /// Outbound TCP to these IP ranges bypasses Envoy (pod annotation
    /// meshd.io/exclude-outbound-ip-ranges).
    #[arg(
        long,
        env = "MESHD_AGENT_EXCLUDE_OUTBOUND_IP_RANGES",
        value_name = "CIDRS"
    )]
    pub exclude_outbound_ip_ranges: Option<CidrList>,
    /// Only outbound TCP to these IP ranges is captured; `*`: all, empty: none (pod
    /// annotation meshd.io/include-outbound-ip-ranges).
    #[arg(
        long,
        env = "MESHD_AGENT_INCLUDE_OUTBOUND_IP_RANGES",
        value_name = "CIDRS",
        default_value = "*"
    )]
    pub include_outbound_ip_ranges: Selection<CidrList>,
    /// Inbound TCP to these ports bypasses Envoy (pod annotation
    /// meshd.io/exclude-inbound-ports).
    #[arg(long, env = "MESHD_AGENT_EXCLUDE_INBOUND_PORTS", value_name = "PORTS")]
    pub exclude_inbound_ports: Option<PortList>,
    /// Only inbound TCP to these ports is captured; `*`: all, empty: none.
    #[arg(
        long,
        env = "MESHD_AGENT_INCLUDE_INBOUND_PORTS",
        value_name = "PORTS",
        default_value = "*"
    )]
    pub include_inbound_ports: Selection<PortList>,
    /// Which iptables: the one already in use here (meshd's chains, else rules), else
    /// the default `iptables`; or nft / legacy.
    #[arg(long, env = "MESHD_AGENT_IPTABLES_BACKEND", value_enum,
          default_value_t = BackendChoice::Auto)]
    pub iptables_backend: BackendChoice,
    /// Print the transactions instead of applying them (needs no root).
    #[arg(long, env = "MESHD_AGENT_DRY_RUN")]
    pub dry_run: bool,
    /// Remove meshd's chains and jumps (and nothing else) instead.
    #[arg(long, env = "MESHD_AGENT_CLEANUP")]
    pub cleanup: bool,
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
    /// Where `/healthz/ready` and the app probes are served (plain HTTP, for the
    /// kubelet's probes).
    #[arg(
        long,
        env = "MESHD_AGENT_HEALTH_ADDRESS",
        default_value_t = SocketAddr::from(([0, 0, 0, 0], capture::AGENT_HEALTH_PORT))
    )]
    pub health_address: SocketAddr,
    /// The app's original probes as the injector writes them (the JSON of
    /// meshd_sidecar::probes::AppProbes, by path): each is performed on the pod's
    /// loopback when the kubelet asks for its /app-health/<container>/<livez|readyz|startupz>
    /// on the health port. Invalid JSON refuses the start. Default: none.
    #[arg(long, env = meshd_sidecar::probes::ENV, value_name = "JSON", hide_env_values = true)]
    pub app_probes: Option<String>,
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
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        assert_eq!(args.envoy_args, ["--concurrency", "1"]);
        assert_eq!(args.drain_time, Duration::from_secs(5));
        assert_eq!(
            args.cert_dir.as_deref(),
            Some(std::path::Path::new("web-1"))
        );
    }

    fn init(args: &[&str]) -> Result<InitArgs, clap::Error> {
        let cli = Cli::try_parse_from(["meshd-agent", "init"].iter().chain(args))?;
        match cli.command {
            Command::Init(args) => Ok(*args),
            Command::Run(_) => panic!("not init"),
        }
    }

    #[test]
    fn init_defaults_capture_everything_but_the_proxy() {
        let args = init(&[]).unwrap();
        assert_eq!((args.outbound_port, args.inbound_port), (15001, 15006));
        assert_eq!((args.proxy_uid, args.proxy_gid), (1337, None));
        assert_eq!(args.include_outbound_ip_ranges, Selection::All);
        assert_eq!(args.include_inbound_ports, Selection::All);
        assert_eq!(args.exclude_outbound_ports, None);
        assert_eq!(args.iptables_backend, BackendChoice::Auto);
        assert!(!args.dry_run && !args.cleanup);
    }

    #[test]
    fn init_takes_what_init_args_makes_of_annotations() {
        let annotations = [
            ("meshd.io/exclude-outbound-ports", "5432"),
            (
                "meshd.io/exclude-outbound-ip-ranges",
                "169.254.169.254,fd00::/8",
            ),
            ("meshd.io/include-outbound-ip-ranges", ""),
            ("meshd.io/exclude-inbound-ports", "9090,9091"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let flags = capture::init_args(&annotations).unwrap();
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let args = init(&flags).unwrap();
        assert_eq!(args.exclude_outbound_ports, Some(PortList(vec![5432])));
        assert_eq!(
            args.exclude_outbound_ip_ranges.unwrap().to_string(),
            "169.254.169.254/32,fd00::/8"
        );
        assert_eq!(
            args.include_outbound_ip_ranges,
            Selection::Only(CidrList::default())
        );
        assert_eq!(args.exclude_inbound_ports, Some(PortList(vec![9090, 9091])));
    }

    #[test]
    fn every_capture_annotation_has_its_init_flag() {
        use clap::CommandFactory;
        let command = Cli::command();
        let init = command.find_subcommand("init").unwrap();
        for annotation in &capture::ANNOTATIONS {
            assert!(
                init.get_arguments()
                    .any(|a| a.get_long() == Some(annotation.flag)),
                "{} names --{}, which init does not have",
                annotation.name,
                annotation.flag
            );
        }
    }

    #[test]
    fn a_bad_init_value_is_named_with_its_flag() {
        let cases: [(&[&str], &str); 6] = [
            (
                &["--exclude-outbound-ports", "80,http"],
                "--exclude-outbound-ports",
            ),
            (&["--outbound-port", "0"], "--outbound-port"),
            (&["--inbound-port", "65536"], "--inbound-port"),
            (&["--proxy-uid", "4294967295"], "--proxy-uid"),
            (
                &["--exclude-outbound-ip-ranges", "10.0.0.0/40"],
                "--exclude-outbound-ip-ranges",
            ),
            (
                &["--include-outbound-ip-ranges", "::ffff:10.0.0.0/104"],
                "--include-outbound-ip-ranges",
            ),
        ];
        for (args, flag) in cases {
            let e = init(args).unwrap_err().to_string();
            assert!(e.contains(flag), "{args:?}: {e}");
        }
        let e = init(&["--exclude-outbound-ports", "80,http"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"http\" is not a port"), "{e}");
        let e = init(&["--include-outbound-ip-ranges", "::ffff:10.0.0.0/104"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("write it as IPv4 (10.0.0.0/8)"), "{e}");
    }
}
