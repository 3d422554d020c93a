//! Load generation for an xDS control plane: a scenario written as a config directory,
//! many Envoy-like ADS streams that record when each piece of config arrived, the
//! changes made to the scenario, and the figures `xds-load` reports.
//!
//! - [`scenario`]: the mesh (services, backends, client pods) and its CA;
//! - [`proxy`]: one Envoy-like proxy: first requests before the response headers,
//!   reconnects with Envoy's [`backoff`] and its subscriptions, every arrival recorded;
//! - [`changes`]: changes written into the directory, each with a probe that tells
//!   its own push;
//! - [`measure`]: convergence, bytes, reconnects, and what a stalled run's streams saw;
//! - [`server`]: meshd from this build, a command's server, or one already running;
//! - [`process`]: a server's peak RSS and CPU from /proc.

pub mod backoff;
pub mod changes;
pub mod measure;
pub mod process;
pub mod proxy;
pub mod scenario;
pub mod server;

pub use changes::{Applied, ChangeKind, ChangeWriter};
pub use proxy::{Arrival, Nack, Probes, ProxySpec, SharedTimeline, Timeline, run_proxy};
pub use scenario::{EgressScope, NAMESPACE, Scenario, certificates};
