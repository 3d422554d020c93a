//! Sources turn the outside world into [`crate::model`] objects and feed the store.
//!
//! - [`convert`]: Kubernetes API objects → model objects, with errors naming the field.
//!   Shared by every source so that a Service means the same thing wherever it came from.
//! - [`crd`]: meshd's own resources (`security.meshd.io/v1alpha1`) → model objects.
//! - [`file`](mod@file): the embedded default — a directory of Kubernetes-style YAML, watched live.
//! - [`kubernetes`]: watchers on a Kubernetes API server.

pub mod convert;
pub mod crd;
pub mod file;
pub mod kubernetes;

/// What a source could not accept right now (one line per problem, naming the object
/// and field), shared with the admin API.
pub type SharedErrors = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// Annotation on a pod naming the services it calls and the local port for each
/// (`explicit` capture): `"web:80=15001, db.data:5432=15002"`.
pub const UPSTREAMS_ANNOTATION: &str = "meshd.io/upstreams";
/// Annotation on a pod giving its sidecar an HTTP egress port on 127.0.0.1 (`"15080"`),
/// through which the app reaches every HTTP service in its scope by Host header.
pub const EGRESS_PORT_ANNOTATION: &str = "meshd.io/egress-port";
/// Annotation on a pod naming what its egress port (explicit capture) or its virtual
/// outbound listener (transparent capture) reaches, and so which services its sidecar
/// receives: `"shop, payments/api"` (namespaces, `namespace/service`s, `*`). Without it,
/// meshd's `--default-scope` applies, else the pod's own namespace.
pub const SCOPE_ANNOTATION: &str = "meshd.io/scope";
/// Annotation on a pod mapping an inbound port to the port the app really listens on
/// at 127.0.0.1: `"8080=18080"`. Unlisted ports are served on the same port number.
pub const APP_PORTS_ANNOTATION: &str = "meshd.io/app-ports";
/// Annotation on a pod choosing how its traffic reaches the sidecar: `explicit` (the
/// default: local ports) or `transparent` (iptables capture by `meshd-agent init`).
pub const CAPTURE_ANNOTATION: &str = "meshd.io/capture";
