//! Authorization policies: the validated model and its semantics.
//!
//! A `security.meshd.io/v1alpha1` AuthorizationPolicy selects workloads (its
//! `selector.matchLabels` in its namespace; without a selector, every workload of the
//! namespace; in the root namespace, every workload of the mesh) and has an action:
//!
//! - **DENY** policies are evaluated first; a request that matches any of their rules is
//!   denied, whatever else applies.
//! - **ALLOW**: if any ALLOW policy selects a workload, a request must match at least
//!   one rule of one of them; if none selects it, the request is allowed.
//! - **AUDIT** never changes the decision; matches are recorded (Envoy shadow rules),
//!   for every request, allowed or denied: the AUDIT stage runs first.
//!
//! A rule matches when every part it has matches: any of its `from` sources (each
//! source: all its fields), any of its `to` operations (each: all its fields), and all
//! its `when` conditions (a condition with `values` needs the header to have one of
//! them, one with `notValues` needs it to have none of them — a missing header has
//! none — and one with both needs both). Strings match exactly, by `prefix*`, by
//! `*suffix`, or `*`.
//!
//! HTTP-only fields (methods, paths, hosts, request headers) on a TCP port cannot be
//! checked: a DENY rule that uses them is applied without them (it denies more: fail
//! closed), an ALLOW rule that uses them never matches (it allows less). Istio made the
//! same choice for the same reason.
//!
//! [`compile`] compiles these into Envoy's RBAC filters; each rule
//! becomes an Envoy policy named `<namespace>/<name>#<rule index>`, so a denial names
//! the policy and rule that caused it.

//!
//! - [`compile`]: policies → Envoy's RBAC filters, per inbound port.
//! - [`eval`]: the same decision evaluated by meshd itself (`meshctl authz check`).
//! - [`stats`]: Envoy's RBAC counters read back per policy and rule (`meshctl authz stats`).
//! - [`check`]: the admin API behind `meshctl authz check`.
//!
//! The policy types themselves are the model's ([`crate::model::authorization`]).

pub mod check;
pub mod compile;
pub mod eval;
pub mod stats;
