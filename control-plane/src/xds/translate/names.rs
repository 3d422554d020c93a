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

pub fn outbound_listener_name(local_port: u16) -> String {
    format!("outbound|127.0.0.1:{local_port}")
}

pub fn egress_listener_name(port: u16) -> String {
    format!("egress|127.0.0.1:{port}")
}
