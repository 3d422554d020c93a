//! Translation: model → Envoy resources. Pure functions, no I/O, no gRPC.
//!
//! Shapes (`explicit` capture; `transparent` will change only the outbound listener):
//! - a service port becomes an EDS cluster `outbound|<port>||<host>`, its endpoints a
//!   `ClusterLoadAssignment` of the same name and, for HTTP ports, a route configuration
//!   of the same name. These are shared by every proxy that calls the service.
//! - each inbound port of a workload becomes a listener `inbound|<podIP>:<port>` that
//!   forwards to a static cluster `inbound|<port>||` at `127.0.0.1:<app port>`; on HTTP
//!   ports over a route configuration `inbound|<port>`, which carries the port's RBAC and
//!   nothing of the pod's own, so the pods the same policies select share one.
//! - each declared upstream becomes a listener `outbound|127.0.0.1:<local port>` that
//!   sends to the service's cluster, over RDS for HTTP ports, `tcp_proxy` for TCP.
//! - a pod's egress port becomes a listener `egress|127.0.0.1:<port>` whose route
//!   configuration (same name) has a virtual host per HTTP service port in its scope.
//!
//! Mutual TLS: every sidecar gets two SDS secrets over ADS, [`WORKLOAD_SECRET`](secrets::WORKLOAD_SECRET) (its own
//! certificate and key) and [`ROOT_SECRET`](secrets::ROOT_SECRET) (the trust bundle). Inbound chains
//! terminate mTLS and require a client certificate from the bundle; service clusters
//! originate mTLS and accept only a server whose SPIFFE id is one of the identities of
//! that service's endpoints.

pub mod cache;
pub mod clusters;
pub mod filters;
pub mod listeners;
pub mod names;
pub mod resources;
pub mod routes;
pub mod secrets;
pub mod touched;
mod transport;
pub mod virtual_outbound;

use std::net::IpAddr;

use envoy_types::pb::envoy::config::core::v3::{
    Address, AggregatedConfigSource, ApiVersion, ConfigSource, DataSource, SocketAddress, address,
    config_source, data_source, socket_address,
};

pub(super) fn inline(text: &str) -> DataSource {
    DataSource {
        specifier: Some(data_source::Specifier::InlineString(text.to_string())),
        ..Default::default()
    }
}

pub(super) fn ads() -> ConfigSource {
    ConfigSource {
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
            AggregatedConfigSource {},
        )),
        resource_api_version: ApiVersion::V3 as i32,
        ..Default::default()
    }
}

pub(super) fn socket(ip: IpAddr, port: u16) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(port))),
            ..Default::default()
        })),
    }
}
