//! meshd's admission webhooks: HTTPS on `--webhook-address` (TLS with meshd's own
//! serving certificate, [`crate::tls::Port::Webhook`]), AdmissionReview v1.
//!
//! - `POST /inject`, the mutating webhook: Pods being created get meshd's sidecar
//!   ([`crate::inject`]) as a JSON Patch; a pod meshd would refuse is denied with the
//!   field named; any other kind or operation is allowed unchanged.
//! - `POST /validate`, the validating webhook: Pods and the pod templates of
//!   Deployments, StatefulSets, DaemonSets, ReplicaSets, Jobs and CronJobs against the
//!   mesh's WorkloadPolicies ([`crate::admission`]): denied (Enforce), admitted with
//!   warnings (Warn), admitted and counted (Audit). It runs after mutation, so it sees
//!   meshd's injected containers, and exempts exactly those.
//!
//! A body that is not an AdmissionReview with a request gets `400` and the reason (the
//! API server then applies the webhook's `failurePolicy`). Every answer is counted
//! (`meshd_admission_reviews_total{webhook,result}`) and timed
//! (`meshd_admission_review_duration_seconds`). Nothing a webhook receives changes
//! meshd's state. Which objects reach a webhook is decided by the webhook
//! configuration the chart installs (namespace and object selectors); its `caBundle`
//! is kept current by the Lease holder ([`crate::cluster::webhook_ca`]).

mod inject;
mod review;
mod server;
mod validate;

pub use inject::handle as inject_review;
pub use server::{WebhookState, serve};
pub use validate::handle as validate_review;
