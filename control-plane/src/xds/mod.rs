//! Envoy's side: translation of the model into xDS resources and the ADS server.
//!
//! - [`translate`]: pure functions, model → Envoy protos.
//! - [`cache`]: one [`cache::XdsSnapshot`] per mesh snapshot; shared resources built once.
//! - [`server`]: the ADS service and the per-stream driver; `sotw` and `delta` are
//!   the two protocol state machines it drives, one task per stream.
//! - [`secrets`]: SDS secrets encoded once per certificate, shared by streams.
//! - [`status`]: per-proxy sent/ACK/NACK state for the admin API.
//! - [`limits`]: what one stream may make meshd hold; past it, `RESOURCE_EXHAUSTED`.

pub mod authz_check;
pub mod cache;
mod delta;
pub mod fail_closed;
pub mod limits;
pub mod node;
pub mod rbac;
pub mod rbac_eval;
pub mod rbac_stats;
pub mod resources;
pub mod secrets;
pub mod server;
mod sotw;
pub mod status;
pub mod translate;
