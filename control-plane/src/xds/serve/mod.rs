//! Serving: the ADS streams and their state. Resources come from
//! [`crate::xds::translate`]; nothing here encodes a listener, cluster or route.
//!
//! - [`server`]: the tonic service; picks a flavour and hands the stream to [`stream`].
//! - [`stream`]: the per-stream driver shared by both flavours.
//! - [`wake`]: which streams a snapshot concerns; only those are woken.
//! - `sotw` and `delta`: the two protocol state machines.
//! - [`node`]: who a stream is (node id, metadata, client certificate).
//! - [`status`]: per-proxy sent/ACK/NACK state for the admin API.
//! - [`secrets`]: SDS secrets encoded once per certificate, shared by streams.
//! - [`limits`]: what one stream may make meshd hold; past it, `RESOURCE_EXHAUSTED`.
//! - [`fail_closed`]: rejected policy resources replaced by deny-all versions.

mod delta;
pub mod fail_closed;
pub mod limits;
pub mod node;
pub mod secrets;
pub mod server;
mod sotw;
pub mod status;
pub mod stream;
pub(crate) mod wake;
