//! Listeners, in the two capture layouts. Both are made of the same parts: an inbound
//! port's filters and mTLS chains ([`inbound_filters`], [`mtls_chains`]) and a service
//! port's route or `tcp_proxy`; the layouts differ only in where those sit.
//!
//! - `explicit`: one inbound listener per port on the pod IP ([`inbound_listener`]),
//!   one outbound listener per declared upstream on 127.0.0.1 ([`outbound_listener`]),
//!   the egress port ([`egress_listener`]).
//! - `transparent`: `meshd-agent init` redirects the pod's TCP; the virtual inbound
//!   listener on 15006 has every inbound port as chains matched by destination port
//!   ([`virtual_inbound_listener`]), the virtual outbound listener on 15001 has a chain
//!   per service VIP and port in scope and per endpoint address
//!   ([`virtual_outbound_listener`]).

use std::net::{IpAddr, Ipv4Addr};

use envoy_types::pb::envoy::config::core::v3::{CidrRange, TrafficDirection};
use envoy_types::pb::envoy::config::listener::v3::{
    Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter, listener_filter,
};
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpFilter, Rds, http_connection_manager, http_filter,
};
use envoy_types::pb::google::protobuf::{BoolValue, UInt32Value};

use super::filters::{
    INBOUND_HTTP_LOG, INBOUND_TCP_LOG, INVALID_POLICY_RULE, OUTBOUND_PASSTHROUGH_LOG,
    OUTBOUND_REFUSED_LOG, http_filter_chain_filter, network_rbac_filter, stdout_access_log,
    tcp_proxy_filter,
};
use super::names::{
    BLACKHOLE_CLUSTER, INBOUND_CAPTURE_PORT, INBOUND_PASSTHROUGH_CLUSTER, OUTBOUND_CAPTURE_PORT,
    PASSTHROUGH_CLUSTER, egress_listener_name, inbound_cluster_name, inbound_listener_name,
    inbound_route_name, outbound_listener_name, service_cluster_name,
    virtual_inbound_listener_name, virtual_outbound_listener_name,
};
use super::resources::any;
use super::routes::inbound_route_denied;
use super::transport::downstream_mtls;
use super::{ads, socket};
use crate::authz::compile::PortRbac;
use crate::model::proxy_view::{EgressView, Outbound};
use crate::model::snapshot::InboundPort;
use crate::model::{MtlsMode, OutboundPolicy};

/// The filters of one inbound port, named `name` (its stat prefix and, on HTTP, the
/// route configuration [`inbound_route`](super::routes::inbound_route) that carries its
/// RBAC). On TCP ports they enforce `rbac` themselves.
fn inbound_filters(name: &str, inbound: &InboundPort, rbac: &PortRbac) -> Vec<Filter> {
    if inbound.protocol.is_http() {
        let rbac_filters = PortRbac::http_filters()
            .into_iter()
            .map(|(filter, config)| HttpFilter {
                name: filter.to_string(),
                config_type: Some(http_filter::ConfigType::TypedConfig(any(&config))),
                ..Default::default()
            })
            .collect();
        vec![http_filter_chain_filter(
            name,
            http_connection_manager::RouteSpecifier::Rds(Rds {
                config_source: Some(ads()),
                route_config_name: inbound_route_name(inbound.port),
            }),
            rbac_filters,
            stdout_access_log(Some(INBOUND_HTTP_LOG)),
        )]
    } else {
        tcp_filters(name, rbac, &inbound_cluster_name(inbound.port))
    }
}

/// Network RBAC, then `tcp_proxy` to `cluster`.
fn tcp_filters(name: &str, rbac: &PortRbac, cluster: &str) -> Vec<Filter> {
    let mut filters: Vec<Filter> = rbac
        .network_filters(name)
        .iter()
        .map(network_rbac_filter)
        .collect();
    filters.push(tcp_proxy_filter(
        name,
        cluster,
        stdout_access_log(Some(INBOUND_TCP_LOG)),
    ));
    filters
}

/// What an inbound port's filters become when the sidecar rejected the compiled ones
/// ([`crate::xds::serve::fail_closed`]): the same name and access log, denying every
/// request — HTTP with [`inbound_route_denied`] inline and no RBAC filter, TCP with one
/// RBAC filter whose only policy, [`INVALID_POLICY_RULE`], matches every connection.
fn inbound_filters_denied(name: &str, inbound: &InboundPort) -> Vec<Filter> {
    if inbound.protocol.is_http() {
        vec![http_filter_chain_filter(
            name,
            http_connection_manager::RouteSpecifier::RouteConfig(inbound_route_denied(name)),
            Vec::new(),
            stdout_access_log(Some(INBOUND_HTTP_LOG)),
        )]
    } else {
        tcp_filters_denied(name, &inbound_cluster_name(inbound.port))
    }
}

fn tcp_filters_denied(name: &str, cluster: &str) -> Vec<Filter> {
    use envoy_types::pb::envoy::config::rbac::v3::{
        Permission, Policy, Principal, Rbac, permission, principal, rbac,
    };
    use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
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
        tcp_proxy_filter(name, cluster, stdout_access_log(Some(INBOUND_TCP_LOG))),
    ]
}

/// The chains an inbound port needs for its mTLS mode, each with `filters`: STRICT one
/// mTLS chain, DISABLE one plaintext chain, PERMISSIVE both, told apart by the TLS
/// inspector. On the virtual inbound listener they match `destination_port` too.
fn mtls_chains(
    name: &str,
    mode: MtlsMode,
    destination_port: Option<u16>,
    filters: Vec<Filter>,
) -> Vec<FilterChain> {
    let chain = |transport_protocol: &str, tls: bool| FilterChain {
        name: format!(
            "{name}{}",
            if transport_protocol.is_empty() {
                String::new()
            } else {
                format!("|{transport_protocol}")
            }
        ),
        filter_chain_match: (!transport_protocol.is_empty() || destination_port.is_some()).then(
            || FilterChainMatch {
                destination_port: destination_port.map(|p| UInt32Value {
                    value: u32::from(p),
                }),
                transport_protocol: transport_protocol.to_string(),
                ..Default::default()
            },
        ),
        filters: filters.clone(),
        transport_socket: tls.then(downstream_mtls),
        ..Default::default()
    };
    match mode {
        MtlsMode::Strict => vec![chain("", true)],
        MtlsMode::Disable => vec![chain("", false)],
        MtlsMode::Permissive => vec![chain("tls", true), chain("raw_buffer", false)],
    }
}

fn tls_inspector() -> ListenerFilter {
    ListenerFilter {
        name: "envoy.filters.listener.tls_inspector".to_string(),
        config_type: Some(listener_filter::ConfigType::TypedConfig(any(
            &TlsInspector::default(),
        ))),
        ..Default::default()
    }
}

/// Explicit capture: the listener on the workload's own address for one inbound port.
pub fn inbound_listener(address: IpAddr, inbound: &InboundPort, rbac: &PortRbac) -> Listener {
    let name = inbound_listener_name(address, inbound.port);
    let filters = inbound_filters(&name, inbound, rbac);
    inbound_listener_with(address, inbound, filters)
}

/// [`inbound_listener`] when the sidecar rejected it: every request denied
/// ([`inbound_filters_denied`]).
pub fn inbound_listener_denied(address: IpAddr, inbound: &InboundPort) -> Listener {
    let name = inbound_listener_name(address, inbound.port);
    let filters = inbound_filters_denied(&name, inbound);
    inbound_listener_with(address, inbound, filters)
}

fn inbound_listener_with(address: IpAddr, inbound: &InboundPort, filters: Vec<Filter>) -> Listener {
    let name = inbound_listener_name(address, inbound.port);
    Listener {
        filter_chains: mtls_chains(&name, inbound.mtls, None, filters),
        listener_filters: (inbound.mtls == MtlsMode::Permissive)
            .then(tls_inspector)
            .into_iter()
            .collect(),
        address: Some(socket(address, inbound.port)),
        name,
        traffic_direction: TrafficDirection::Inbound as i32,
        ..Default::default()
    }
}

/// Transparent capture: what the virtual inbound listener serves.
#[derive(Debug, Clone)]
pub struct VirtualInbound {
    /// The pod IP: each port's chain is named as the explicit listener of that port
    /// would be, `inbound|<pod IP>:<port>`, so routes, RBAC stats and `meshctl authz
    /// stats` read the same in both layouts.
    pub address: IpAddr,
    /// The inbound ports some Service names, each with its RBAC.
    pub ports: Vec<(InboundPort, PortRbac)>,
    /// A port no Service names: the pod's own mTLS mode (by port where a
    /// PeerAuthentication's `portLevelMtls` sets one that differs; `None` for every
    /// other port), and the pod's policies, as on any TCP port.
    pub other_ports: Vec<(Option<u16>, MtlsMode)>,
    pub other_rbac: PortRbac,
}

/// Transparent capture: `0.0.0.0:15006`, where `meshd-agent init` redirects every
/// inbound TCP connection. The `original_dst` listener filter restores the address the
/// caller dialled; one set of chains per inbound port (its mTLS mode, its RBAC: exactly
/// what [`inbound_listener`] has) forwards to the app at `127.0.0.1:<app port>`, and
/// chains without a port take the rest to the original destination port from
/// 127.0.0.6 (which init exempts from capture). `denied`: the fail-closed twin, every
/// chain denying.
pub fn virtual_inbound_listener(v: &VirtualInbound, denied: bool) -> Listener {
    let mut chains = Vec::new();
    for (inbound, rbac) in &v.ports {
        let name = inbound_listener_name(v.address, inbound.port);
        let filters = if denied {
            inbound_filters_denied(&name, inbound)
        } else {
            inbound_filters(&name, inbound, rbac)
        };
        chains.extend(mtls_chains(
            &name,
            inbound.mtls,
            Some(inbound.port),
            filters,
        ));
    }
    for (port, mode) in &v.other_ports {
        let name = match port {
            Some(p) => format!("{INBOUND_PASSTHROUGH_CLUSTER}|{p}"),
            None => INBOUND_PASSTHROUGH_CLUSTER.to_string(),
        };
        let filters = if denied {
            tcp_filters_denied(&name, INBOUND_PASSTHROUGH_CLUSTER)
        } else {
            tcp_filters(&name, &v.other_rbac, INBOUND_PASSTHROUGH_CLUSTER)
        };
        chains.extend(mtls_chains(&name, *mode, *port, filters));
    }
    // The capture ports themselves, dialled from outside: refused. Handed on to the
    // original destination they would reach this listener again, over and over.
    for port in [OUTBOUND_CAPTURE_PORT, INBOUND_CAPTURE_PORT] {
        let name = format!("{BLACKHOLE_CLUSTER}|{port}");
        chains.extend(mtls_chains(
            &name,
            MtlsMode::Disable,
            Some(port),
            tcp_filters_denied(&name, BLACKHOLE_CLUSTER),
        ));
    }
    let permissive = v
        .ports
        .iter()
        .map(|(p, _)| p.mtls)
        .chain(v.other_ports.iter().map(|(_, m)| *m))
        .any(|m| m == MtlsMode::Permissive);
    let mut listener_filters = vec![original_dst()];
    listener_filters.extend(permissive.then(tls_inspector));
    Listener {
        name: virtual_inbound_listener_name(),
        address: Some(socket(
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            INBOUND_CAPTURE_PORT,
        )),
        filter_chains: chains,
        listener_filters,
        traffic_direction: TrafficDirection::Inbound as i32,
        ..Default::default()
    }
}

fn original_dst() -> ListenerFilter {
    use envoy_types::pb::envoy::extensions::filters::listener::original_dst::v3::OriginalDst;
    ListenerFilter {
        name: "envoy.filters.listener.original_dst".to_string(),
        config_type: Some(listener_filter::ConfigType::TypedConfig(any(
            &OriginalDst::default(),
        ))),
        ..Default::default()
    }
}

/// One chain of the virtual outbound listener: connections to one of `addresses` on
/// `port` go to `cluster` (over the route configuration `http_route` on HTTP ports).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundChain {
    pub name: String,
    pub port: u16,
    pub addresses: Vec<IpAddr>,
    pub cluster: String,
    pub http_route: Option<String>,
}

/// Transparent capture: `0.0.0.0:15001`, where `meshd-agent init` redirects the pod's
/// outbound TCP (`use_original_dst`: chains match the address the app dialled). A
/// Service VIP and port in scope goes to the service's cluster (HTTP through its shared
/// route); an endpoint's own address (a pod IP, a headless service) to the original
/// destination over mTLS to that service's identities; anything else to
/// [`PASSTHROUGH_CLUSTER`] under `allow-any`, or nowhere under `registry-only` — the
/// access log says the destination is not in the mesh either way.
pub fn virtual_outbound_listener(chains: &[OutboundChain], policy: OutboundPolicy) -> Listener {
    let filter_chains = chains
        .iter()
        .map(|c| {
            let filter = match &c.http_route {
                Some(route) => http_filter_chain_filter(
                    &c.name,
                    http_connection_manager::RouteSpecifier::Rds(Rds {
                        config_source: Some(ads()),
                        route_config_name: route.clone(),
                    }),
                    Vec::new(),
                    stdout_access_log(None),
                ),
                None => tcp_proxy_filter(&c.name, &c.cluster, stdout_access_log(None)),
            };
            FilterChain {
                name: c.name.clone(),
                filter_chain_match: Some(FilterChainMatch {
                    destination_port: Some(UInt32Value {
                        value: u32::from(c.port),
                    }),
                    prefix_ranges: c.addresses.iter().map(|a| host_range(*a)).collect(),
                    ..Default::default()
                }),
                filters: vec![filter],
                ..Default::default()
            }
        })
        .collect();
    let (cluster, log) = match policy {
        OutboundPolicy::AllowAny => (PASSTHROUGH_CLUSTER, OUTBOUND_PASSTHROUGH_LOG),
        OutboundPolicy::RegistryOnly => (BLACKHOLE_CLUSTER, OUTBOUND_REFUSED_LOG),
    };
    Listener {
        name: virtual_outbound_listener_name(),
        address: Some(socket(
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            OUTBOUND_CAPTURE_PORT,
        )),
        use_original_dst: Some(BoolValue { value: true }),
        filter_chains,
        default_filter_chain: Some(FilterChain {
            name: cluster.to_string(),
            filters: vec![tcp_proxy_filter(
                cluster,
                cluster,
                stdout_access_log(Some(log)),
            )],
            ..Default::default()
        }),
        traffic_direction: TrafficDirection::Outbound as i32,
        ..Default::default()
    }
}

fn host_range(address: IpAddr) -> CidrRange {
    CidrRange {
        address_prefix: address.to_string(),
        prefix_len: Some(UInt32Value {
            value: if address.is_ipv4() { 32 } else { 128 },
        }),
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
