//! meshd's certificate authority. No gRPC, no Kubernetes: keys, certificates and files.
//!
//! - [`SpiffeId`]: workload identities, `spiffe://<td>/ns/<ns>/sa/<sa>`; [`OperatorId`]:
//!   operators of meshd's admin API, `spiffe://<td>/meshd/operator/<name>`.
//! - [`Authority`]: a signing CA (a root meshd generated, or a user's root or
//!   intermediate) and the [`TrustBundle`] of roots proxies must trust. It issues
//!   short-lived ECDSA P-256 workload certificates whose only SAN is the SPIFFE id:
//!   with a key it makes (served over SDS), or for the key of a checked [`csr::Csr`]
//!   (meshd-agent's, which never leaves its pod).
//! - [`store`]: where the signing CA comes from — a directory where meshd creates the
//!   root on first start ([`store::open_or_create`]; everything else only opens it, with
//!   [`store::open`]) and whose every step survives a crash, or plug-in files — with
//!   every check done at start so a bad CA fails loudly, naming the file.
//!
//! Private keys are [`PrivateKeyPem`]s: zeroized on drop, never printed by `Debug`.

mod authority;
pub mod csr;
mod pem;
pub mod spiffe;
pub mod store;

pub use authority::{
    Authority, CaConfig, CaError, IssuedCertificate, OperatorCertificate, PrivateKeyPem,
    SignedCertificate, TrustBundle, generate_root,
};
pub use spiffe::{
    DEFAULT_MESHD_NAMESPACE, DEFAULT_TRUST_DOMAIN, MESHD_SERVICE_ACCOUNT, OperatorId, SpiffeId,
    SpiffeIdError, leaf_uri,
};
