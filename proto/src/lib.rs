//! meshd's own gRPC APIs, compiled from `proto/` by `build.rs` (protox: no system
//! `protoc`), and the client side of reaching meshd.
//!
//! - [`ca`]: `meshd.ca.v1.CertificateAuthority`, served on meshd's xDS port: `Sign`
//!   (a CSR authenticated by a pod's ServiceAccount token or by the caller's own mesh
//!   certificate) and `WatchTrustBundle`. meshd-agent is its client.
//! - [`client`]: a TLS channel to meshd that checks meshd's SPIFFE id (not a DNS name),
//!   with or without a client certificate, and [`client::SpiffeServerVerifier`] for
//!   any client of a mesh server.
//!
//! Neither kube nor the control plane: the agent depends on this crate.

pub mod client;

/// `meshd.ca.v1`: the mesh CA's service.
pub mod ca {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("meshd.ca.v1");
}

/// The metadata key of a bearer token, and its scheme.
pub const AUTHORIZATION: &str = "authorization";
pub const BEARER: &str = "Bearer ";
