//! How resources are named. A name is what ties resources of different kinds together
//! (a listener's RDS route name, a route's cluster, a cluster's EDS name), so every
//! kind takes its names from here.

use std::net::IpAddr;

use crate::model::Service;

pub fn service_cluster_name(svc: &Service, port: u16) -> String {
    format!("outbound|{port}||{}", svc.hostname())
}

pub fn inbound_cluster_name(port: u16) -> String {
    format!("inbound|{port}||")
}

pub fn inbound_listener_name(address: IpAddr, port: u16) -> String {
    format!("inbound|{}", std::net::SocketAddr::new(address, port))
}

/// The route of an inbound HTTP port. Without the pod's address, unlike its listener:
/// a route's content is its port and the policies that select the pod, so the pods a
/// policy selects share one encoded route per port (a proxy has one pod, so the name is
/// still unique on its stream).
pub fn inbound_route_name(port: u16) -> String {
    format!("inbound|{port}")
}

pub fn outbound_listener_name(local_port: u16) -> String {
    format!("outbound|127.0.0.1:{local_port}")
}

pub fn egress_listener_name(port: u16) -> String {
    format!("egress|127.0.0.1:{port}")
}

/// Transparent capture: the ports `meshd-agent init` redirects outbound and inbound
/// TCP to (one definition, shared with the agent).
pub use meshd_sidecar::capture::{
    INBOUND_PORT as INBOUND_CAPTURE_PORT, OUTBOUND_PORT as OUTBOUND_CAPTURE_PORT,
};

pub fn virtual_outbound_listener_name() -> String {
    format!("outbound|0.0.0.0:{OUTBOUND_CAPTURE_PORT}")
}

/// Starts with `inbound|` like every listener that carries policy
/// ([`crate::xds::serve::fail_closed::guards`]).
pub fn virtual_inbound_listener_name() -> String {
    format!("inbound|0.0.0.0:{INBOUND_CAPTURE_PORT}")
}

/// A service port's cluster for calls to one of its endpoints' own addresses (a pod
/// IP, a headless service): the original destination, over mTLS to its identities.
pub fn direct_cluster_name(svc: &Service, port: u16) -> String {
    format!("direct|{port}||{}", svc.hostname())
}

/// Where a transparent sidecar sends what the mesh does not know, as it was addressed.
pub const PASSTHROUGH_CLUSTER: &str = "PassthroughCluster";
/// Where it sends it under `--outbound-policy registry-only`: nowhere.
pub const BLACKHOLE_CLUSTER: &str = "BlackHoleCluster";
/// Inbound connections to a port no Service names: on to the app at the original
/// destination port, from 127.0.0.6 (exempt from capture).
pub const INBOUND_PASSTHROUGH_CLUSTER: &str = "InboundPassthroughCluster";
/// The source address of [`INBOUND_PASSTHROUGH_CLUSTER`]'s connections.
pub use meshd_sidecar::capture::INBOUND_PASSTHROUGH_SOURCE;
