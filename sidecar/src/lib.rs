//! What a sidecar's Envoy starts from, shared by `meshctl bootstrap` (which writes it
//! once, for local runs) and meshd-agent (which writes it in the pod and keeps the
//! credentials current), and what the injector and `meshd-agent init` agree on:
//!
//! - [`bootstrap`]: the Envoy bootstrap, the one generator: the node names the pod, ADS
//!   points at meshd over mutual TLS, Envoy's admin interface stays on loopback, and the
//!   client certificate and trust bundle come from file-based SDS.
//! - [`credentials`]: the directory those SDS files point into, replaced atomically (the
//!   Kubernetes `..data` swap) so that Envoy picks up a renewed certificate or a new
//!   trust bundle without a restart, and never sees a key beside another key's
//!   certificate.
//! - [`capture`]: transparent capture's ports and proxy uid, the pod annotations that
//!   tune it, their one parser, and [`capture::init_args`], which turns a pod's
//!   annotations into `meshd-agent init`'s arguments.
//! - [`probes`]: the app's probes through the agent: the path the injector rewrites a
//!   probe to, and the original probes the agent performs, as JSON in its environment.
//!
//! meshd reads the node metadata keys defined here ([`NAMESPACE_KEY`], ...). No kube,
//! no gRPC: meshd-agent depends on this crate.

pub mod bootstrap;
pub mod capture;
pub mod credentials;
pub mod probes;

use serde::{Deserialize, Serialize};

/// `node.metadata` keys naming the pod a sidecar serves.
pub const NAMESPACE_KEY: &str = "namespace";
pub const POD_KEY: &str = "pod";
pub const SERVICE_ACCOUNT_KEY: &str = "service_account";

/// How a sidecar speaks xDS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdsFlavor {
    /// State of the world (`StreamAggregatedResources`).
    Sotw,
    /// Incremental (`DeltaAggregatedResources`).
    Delta,
}
