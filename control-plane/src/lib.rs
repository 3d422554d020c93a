//! meshd: a service-mesh control plane serving Envoy's xDS APIs.
//!
//! Data flows one way (see ARCHITECTURE.md):
//! [`sources`] → [`model::Store`] → [`model::MeshSnapshot`] → [`xds::translate`] →
//! [`xds::serve`] → Envoy. [`admin`] shows what is happening; the Envoy side of the
//! handshake (bootstrap, credential files) is `meshd_sidecar`'s.

pub mod admin;
pub mod admission;
pub mod authz;
pub mod ca_service;
pub mod cli;
pub mod cluster;
pub mod identity;
pub mod inject;
pub mod listen;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod operator;
pub mod sources;
pub mod tls;
pub mod webhook;
pub mod xds;
