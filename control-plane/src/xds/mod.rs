//! Envoy's side, in two rooms that meet only at [`translate::resources`]:
//!
//! - [`translate`]: pure functions, model → Envoy resources, by kind (listeners in both
//!   capture layouts, clusters, routes, secrets), and the per-snapshot cache that builds
//!   each shared resource once. No streams, no gRPC.
//! - [`serve`]: the ADS service, one task per stream with its protocol state (SotW and
//!   delta), who a stream is, per-proxy status, SDS secrets per identity, per-stream
//!   limits and the fail-closed replacement of rejected policy. It assembles resources
//!   that `translate` built and never builds one itself.
//!
//! Data flows one way: `translate` never imports `serve`.

pub mod serve;
pub mod translate;
