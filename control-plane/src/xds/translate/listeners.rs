//! Listeners. Inbound: one per port of the workload, with its mTLS mode and RBAC.
//! Outbound, by capture layout: `explicit` (a listener per declared upstream on
//! 127.0.0.1, the egress port).

use std::net::{IpAddr, Ipv4Addr};

use envoy_types::pb::envoy::config::core::v3::TrafficDirection;
use envoy_types::pb::envoy::config::listener::v3::{
    Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter, listener_filter,
};
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpFilter, Rds, http_connection_manager, http_filter,
};

use super::filters::{
    INBOUND_HTTP_LOG, INBOUND_TCP_LOG, INVALID_POLICY_RULE, http_filter_chain_filter,
    network_rbac_filter, stdout_access_log, tcp_proxy_filter,
};
use super::names::{
    egress_listener_name, inbound_cluster_name, inbound_listener_name, outbound_listener_name,
    service_cluster_name,
};
use super::resources::any;
use super::routes::inbound_route_denied;
use super::transport::downstream_mtls;
use super::{ads, socket};
use crate::authz::compile::PortRbac;
use crate::model::MtlsMode;
use crate::model::proxy_view::{EgressView, Outbound};
use crate::model::snapshot::InboundPort;

/// The listener on the workload's own address for one inbound port. On TCP ports it
/// enforces `rbac` itself; on HTTP ports its RBAC filters take their rules from the
/// route configuration [`inbound_route`](super::routes::inbound_route).
pub fn inbound_listener(address: IpAddr, inbound: &InboundPort, rbac: &PortRbac) -> Listener {
    let name = inbound_listener_name(address, inbound.port);
    let filters = if inbound.protocol.is_http() {
        let rbac_filters = PortRbac::http_filters()
            .into_iter()
            .map(|(filter, config)| HttpFilter {
                name: filter.to_string(),
                config_type: Some(http_filter::ConfigType::TypedConfig(any(&config))),
                ..Default::default()
            })
            .collect();
        vec![http_filter_chain_filter(
            &name,
            http_connection_manager::RouteSpecifier::Rds(Rds {
                config_source: Some(ads()),
                route_config_name: name.clone(),
            }),
            rbac_filters,
            stdout_access_log(Some(INBOUND_HTTP_LOG)),
        )]
    } else {
        let mut filters: Vec<Filter> = rbac
            .network_filters(&name)
            .iter()
            .map(network_rbac_filter)
            .collect();
        filters.push(tcp_proxy_filter(
            &name,
            &inbound_cluster_name(inbound.port),
            stdout_access_log(Some(INBOUND_TCP_LOG)),
        ));
        filters
    };
    inbound_listener_with(address, inbound, filters)
}

/// What an inbound listener becomes when the sidecar rejected the compiled one
/// ([`crate::xds::serve::fail_closed`]): the same address, transport and access log, denying every
/// request — HTTP with [`inbound_route_denied`] inline and no RBAC filter, TCP with one
/// RBAC filter whose only policy, [`INVALID_POLICY_RULE`], matches every connection.
pub fn inbound_listener_denied(address: IpAddr, inbound: &InboundPort) -> Listener {
    use envoy_types::pb::envoy::config::rbac::v3::{
        Permission, Policy, Principal, Rbac, permission, principal, rbac,
    };
    use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
    let name = inbound_listener_name(address, inbound.port);
    let filters = if inbound.protocol.is_http() {
        vec![http_filter_chain_filter(
            &name,
            http_connection_manager::RouteSpecifier::RouteConfig(inbound_route_denied(&name)),
            Vec::new(),
            stdout_access_log(Some(INBOUND_HTTP_LOG)),
        )]
    } else {
        let everything = Policy {
            permissions: vec![Permission {
                rule: Some(permission::Rule::Any(true)),
            }],
            principals: vec![Principal {
                identifier: Some(principal::Identifier::Any(true)),
            }],
            ..Default::default()
        };
        let deny_all = NetworkRbac {
            rules: Some(Rbac {
                action: rbac::Action::Deny as i32,
                policies: [(INVALID_POLICY_RULE.to_string(), everything)].into(),
                ..Default::default()
            }),
            stat_prefix: format!("{name}.deny.{INVALID_POLICY_RULE}."),
            ..Default::default()
        };
        vec![
            network_rbac_filter(&deny_all),
            tcp_proxy_filter(
                &name,
                &inbound_cluster_name(inbound.port),
                stdout_access_log(Some(INBOUND_TCP_LOG)),
            ),
        ]
    };
    inbound_listener_with(address, inbound, filters)
}

/// An inbound listener with `filters` on each of the chains its mTLS mode needs.
pub(super) fn inbound_listener_with(
    address: IpAddr,
    inbound: &InboundPort,
    filters: Vec<Filter>,
) -> Listener {
    let name = inbound_listener_name(address, inbound.port);
    let chain = |transport_protocol: &str, tls: bool| FilterChain {
        filter_chain_match: (!transport_protocol.is_empty()).then(|| FilterChainMatch {
            transport_protocol: transport_protocol.to_string(),
            ..Default::default()
        }),
        filters: filters.clone(),
        transport_socket: tls.then(downstream_mtls),
        ..Default::default()
    };
    // PERMISSIVE: the TLS inspector tells mTLS from plaintext on the same port.
    let (filter_chains, listener_filters) = match inbound.mtls {
        MtlsMode::Strict => (vec![chain("", true)], vec![]),
        MtlsMode::Disable => (vec![chain("", false)], vec![]),
        MtlsMode::Permissive => (
            vec![chain("tls", true), chain("raw_buffer", false)],
            vec![ListenerFilter {
                name: "envoy.filters.listener.tls_inspector".to_string(),
                config_type: Some(listener_filter::ConfigType::TypedConfig(any(
                    &TlsInspector::default(),
                ))),
                ..Default::default()
            }],
        ),
    };
    Listener {
        name,
        address: Some(socket(address, inbound.port)),
        filter_chains,
        listener_filters,
        traffic_direction: TrafficDirection::Inbound as i32,
        ..Default::default()
    }
}

/// The listener on `127.0.0.1:<local port>` through which the app reaches an upstream.
pub fn outbound_listener(out: &Outbound) -> Listener {
    let name = outbound_listener_name(out.upstream.local_port);
    let cluster = service_cluster_name(&out.service, out.port.port);
    let filter = if out.port.protocol.is_http() {
        http_filter_chain_filter(
            &name,
            http_connection_manager::RouteSpecifier::Rds(Rds {
                config_source: Some(ads()),
                route_config_name: cluster,
            }),
            Vec::new(),
            stdout_access_log(None),
        )
    } else {
        tcp_proxy_filter(&name, &cluster, stdout_access_log(None))
    };
    Listener {
        name,
        address: Some(socket(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            out.upstream.local_port,
        )),
        filter_chains: vec![FilterChain {
            filters: vec![filter],
            ..Default::default()
        }],
        traffic_direction: TrafficDirection::Outbound as i32,
        ..Default::default()
    }
}

/// The HTTP egress listener on `127.0.0.1:<port>`: requests go to the service their
/// Host names, through the route configuration [`egress_route`](super::routes::egress_route) of the same name.
/// Clients may also use it as an HTTP proxy (absolute URLs are accepted).
pub fn egress_listener(egress: &EgressView) -> Listener {
    let name = egress_listener_name(egress.port);
    let filter = http_filter_chain_filter(
        &name,
        http_connection_manager::RouteSpecifier::Rds(Rds {
            config_source: Some(ads()),
            route_config_name: name.clone(),
        }),
        Vec::new(),
        stdout_access_log(None),
    );
    Listener {
        name,
        address: Some(socket(IpAddr::V4(Ipv4Addr::LOCALHOST), egress.port)),
        filter_chains: vec![FilterChain {
            filters: vec![filter],
            ..Default::default()
        }],
        traffic_direction: TrafficDirection::Outbound as i32,
        ..Default::default()
    }
}
