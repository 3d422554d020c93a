//! Translation: model → Envoy resources. Pure functions, no I/O, no gRPC.
//!
//! Shapes (`explicit` capture; `transparent` will change only the outbound listener):
//! - a service port becomes an EDS cluster `outbound|<port>||<host>`, its endpoints a
//!   `ClusterLoadAssignment` of the same name and, for HTTP ports, a route configuration
//!   of the same name. These are shared by every proxy that calls the service.
//! - each inbound port of a workload becomes a listener `inbound|<podIP>:<port>` that
//!   forwards to a static cluster `inbound|<port>||` at `127.0.0.1:<app port>`; on HTTP
//!   ports over a route configuration of the same name, which carries the port's RBAC.
//! - each declared upstream becomes a listener `outbound|127.0.0.1:<local port>` that
//!   sends to the service's cluster, over RDS for HTTP ports, `tcp_proxy` for TCP.
//! - a pod's egress port becomes a listener `egress|127.0.0.1:<port>` whose route
//!   configuration (same name) has a virtual host per HTTP service port in its scope.
//!
//! Mutual TLS: every sidecar gets two SDS secrets over ADS, [`WORKLOAD_SECRET`] (its own
//! certificate and key) and [`ROOT_SECRET`] (the trust bundle). Inbound chains
//! terminate mTLS and require a client certificate from the bundle; service clusters
//! originate mTLS and accept only a server whose SPIFFE id is one of the identities of
//! that service's endpoints.

use std::net::{IpAddr, Ipv4Addr};

use envoy_types::pb::envoy::config::accesslog::v3::{AccessLog, access_log};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, DiscoveryType, EdsClusterConfig,
};
use envoy_types::pb::envoy::config::core::v3::Metadata;
use envoy_types::pb::envoy::config::core::v3::{
    Address, AggregatedConfigSource, ApiVersion, BindConfig, ConfigSource, DataSource,
    HealthStatus, Http2ProtocolOptions, SocketAddress, TrafficDirection, TransportSocket, address,
    config_source, data_source, socket_address, transport_socket,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint as EnvoyEndpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::config::listener::v3::{
    Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter, filter, listener_filter,
};
use envoy_types::pb::envoy::config::route::v3::{
    Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, route, route_action,
    route_match,
};
use envoy_types::pb::envoy::extensions::access_loggers::stream::v3::StdoutAccessLog;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_connection_manager, http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::envoy::extensions::transport_sockets::raw_buffer::v3::RawBuffer;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, SdsSecretConfig, Secret,
    SubjectAltNameMatcher, TlsCertificate, UpstreamTlsContext, common_tls_context, secret,
    subject_alt_name_matcher,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    HttpProtocolOptions, http_protocol_options,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
use envoy_types::pb::google::protobuf::{Any, BoolValue, Duration, Struct, Value, value};
use meshd_ca::{IssuedCertificate, SpiffeId, TrustBundle};
use prost::{Message, Name};

use super::rbac::PortRbac;
use crate::model::proxy_view::{EgressView, Outbound};
use crate::model::snapshot::{Endpoint, InboundPort};
use crate::model::{MtlsMode, Service, ServicePort};

const CONNECT_TIMEOUT: Duration = Duration {
    seconds: 5,
    nanos: 0,
};
/// SDS name of a proxy's own certificate and key.
pub const WORKLOAD_SECRET: &str = "default";
/// SDS name of the trust bundle.
pub const ROOT_SECRET: &str = "ROOTCA";

/// Endpoint metadata that makes a cluster talk plaintext to a DISABLE port.
const TRANSPORT_SOCKET_MATCH: &str = "envoy.transport_socket_match";
const PLAINTEXT_MATCH: (&str, &str) = ("meshd.tls", "disabled");

const HTTP_PROTOCOL_OPTIONS_KEY: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

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

/// The EDS cluster of a service port; its TLS accepts only `identities`.
pub fn service_cluster(svc: &Service, port: &ServicePort, identities: &[SpiffeId]) -> Cluster {
    let mut cluster = Cluster {
        name: service_cluster_name(svc, port.port),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: String::new(),
        }),
        connect_timeout: Some(CONNECT_TIMEOUT),
        transport_socket: Some(upstream_mtls(identities)),
        // Endpoints whose port is DISABLE carry metadata that selects plaintext.
        transport_socket_matches: vec![
            envoy_types::pb::envoy::config::cluster::v3::cluster::TransportSocketMatch {
                name: "plaintext".to_string(),
                r#match: Some(plaintext_match()),
                transport_socket: Some(raw_buffer()),
            },
        ],
        ..Default::default()
    };
    if port.protocol.needs_http2_upstream() {
        set_http2_upstream(&mut cluster);
    }
    cluster
}

/// `cluster`, connecting from `source` (the calling pod's IP). In explicit capture the
/// sidecars of one machine would otherwise all connect from the address the kernel
/// picks (127.0.0.1 towards a loopback pod IP), and a destination's `ipBlocks` could not
/// tell its callers apart. In a pod of its own the pod IP is what the kernel picks
/// anyway. The pod IP must be an address of the machine, as inbound listeners already
/// require.
pub fn bound_to(mut cluster: Cluster, source: IpAddr) -> Cluster {
    cluster.upstream_bind_config = Some(BindConfig {
        source_address: Some(SocketAddress {
            address: source.to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(0)),
            ..Default::default()
        }),
        ..Default::default()
    });
    cluster
}

/// The ready endpoints of a service port.
pub fn service_load_assignment(
    cluster_name: &str,
    endpoints: &[Endpoint],
) -> ClusterLoadAssignment {
    let lb_endpoints = endpoints
        .iter()
        .filter(|e| e.ready)
        .map(|e| LbEndpoint {
            host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(EnvoyEndpoint {
                address: Some(socket(e.address, e.port)),
                ..Default::default()
            })),
            health_status: HealthStatus::Healthy as i32,
            metadata: (e.mtls == MtlsMode::Disable).then(|| Metadata {
                filter_metadata: [(TRANSPORT_SOCKET_MATCH.to_string(), plaintext_match())].into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .collect();
    ClusterLoadAssignment {
        cluster_name: cluster_name.to_string(),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints,
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The route configuration of an HTTP service port: everything to its cluster.
pub fn service_route(svc: &Service, port: &ServicePort) -> RouteConfiguration {
    let name = service_cluster_name(svc, port.port);
    RouteConfiguration {
        name: name.clone(),
        virtual_hosts: vec![VirtualHost {
            name: format!("{}:{}", svc.hostname(), port.port),
            domains: vec!["*".to_string()],
            routes: vec![route_to(&name)],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The static cluster that hands inbound traffic to the local application.
pub fn inbound_cluster(inbound: &InboundPort, app_port: u16) -> Cluster {
    let name = inbound_cluster_name(inbound.port);
    let mut cluster = Cluster {
        name: name.clone(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32)),
        connect_timeout: Some(CONNECT_TIMEOUT),
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: name,
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![LbEndpoint {
                    host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(EnvoyEndpoint {
                        address: Some(socket(IpAddr::V4(Ipv4Addr::LOCALHOST), app_port)),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    if inbound.protocol.needs_http2_upstream() {
        set_http2_upstream(&mut cluster);
    }
    cluster
}

/// The route configuration of an inbound HTTP port, named like its listener: everything
/// to the local app, through the port's RBAC stages (see [`super::rbac`]: the stages
/// live here so that they change together, and for the next request).
pub fn inbound_route(listener: &str, inbound: &InboundPort, rbac: &PortRbac) -> RouteConfiguration {
    let mut route = route_to(&inbound_cluster_name(inbound.port));
    route.typed_per_filter_config = rbac.per_route_configs();
    RouteConfiguration {
        name: listener.to_string(),
        virtual_hosts: vec![VirtualHost {
            name: "inbound".to_string(),
            domains: vec!["*".to_string()],
            routes: vec![route],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The listener on the workload's own address for one inbound port. On TCP ports it
/// enforces `rbac` itself; on HTTP ports its RBAC filters take their rules from the
/// route configuration [`inbound_route`].
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

/// The reason a fail-closed resource gives for every denial, in the
/// [`DENIED_BY_HEADER`] header and the body.
pub const INVALID_POLICY: &str = "invalid-policy: this sidecar rejected the policy meshd compiled for this port; see meshctl status";

/// The name of the RBAC policy that denies every connection on a fail-closed TCP port.
pub const INVALID_POLICY_RULE: &str = "invalid-policy";

/// What an inbound HTTP port's route becomes when the sidecar rejected the compiled one
/// ([`super::fail_closed`]): every request gets 403 naming [`INVALID_POLICY`]. A direct
/// response, with the RBAC filters switched off for it (a generic `FilterConfig`), so it
/// needs none of the RBAC machinery the sidecar may have refused.
pub fn inbound_route_denied(listener: &str) -> RouteConfiguration {
    use envoy_types::pb::envoy::config::core::v3::{
        HeaderValue, HeaderValueOption, header_value_option,
    };
    use envoy_types::pb::envoy::config::route::v3::{DirectResponseAction, FilterConfig};
    let route = Route {
        r#match: Some(RouteMatch {
            path_specifier: Some(route_match::PathSpecifier::Prefix("/".to_string())),
            ..Default::default()
        }),
        action: Some(route::Action::DirectResponse(DirectResponseAction {
            status: 403,
            body: Some(inline(&format!("{DENIAL_BODY_PREFIX}{INVALID_POLICY}\n"))),
            ..Default::default()
        })),
        // The RBAC filters of the listener pass the request on to this response (the
        // ALLOW stage would refuse it first, naming no rule, without a route override).
        typed_per_filter_config: super::rbac::STAGES
            .iter()
            .map(|(filter, _)| {
                let off = FilterConfig {
                    disabled: true,
                    ..Default::default()
                };
                (filter.to_string(), any(&off))
            })
            .collect(),
        response_headers_to_add: vec![HeaderValueOption {
            header: Some(HeaderValue {
                key: DENIED_BY_HEADER.to_string(),
                value: INVALID_POLICY.to_string(),
                ..Default::default()
            }),
            append_action: header_value_option::HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
            ..Default::default()
        }],
        ..Default::default()
    };
    RouteConfiguration {
        name: listener.to_string(),
        virtual_hosts: vec![VirtualHost {
            name: "inbound".to_string(),
            domains: vec!["*".to_string()],
            routes: vec![route],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// What an inbound listener becomes when the sidecar rejected the compiled one
/// ([`super::fail_closed`]): the same address, transport and access log, denying every
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

fn network_rbac_filter(
    rbac: &envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac,
) -> Filter {
    Filter {
        name: "envoy.filters.network.rbac".to_string(),
        config_type: Some(filter::ConfigType::TypedConfig(any(rbac))),
    }
}

/// An inbound listener with `filters` on each of the chains its mTLS mode needs.
fn inbound_listener_with(address: IpAddr, inbound: &InboundPort, filters: Vec<Filter>) -> Listener {
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

pub fn egress_listener_name(port: u16) -> String {
    format!("egress|127.0.0.1:{port}")
}

/// The HTTP egress listener on `127.0.0.1:<port>`: requests go to the service their
/// Host names, through the route configuration [`egress_route`] of the same name.
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

/// One virtual host per HTTP service port in scope, answering to the names a client
/// in `namespace` would use: `web.shop`, `web.shop.svc`, `web.shop.svc.cluster.local`
/// (and `web` from shop itself), each with `:<port>`, and without it for port 80. A
/// Host outside the scope gets Envoy's 404.
pub fn egress_route(egress: &EgressView, namespace: &str) -> RouteConfiguration {
    let virtual_hosts = egress
        .services
        .iter()
        .map(|(svc, port)| {
            let mut hosts = vec![
                format!("{}.{}", svc.key.name, svc.key.namespace),
                format!("{}.{}.svc", svc.key.name, svc.key.namespace),
                svc.hostname(),
            ];
            if svc.key.namespace == namespace {
                hosts.push(svc.key.name.clone());
            }
            let mut domains: Vec<String> =
                hosts.iter().map(|h| format!("{h}:{}", port.port)).collect();
            if port.port == 80 {
                domains.extend(hosts);
            }
            VirtualHost {
                name: format!("{}:{}", svc.hostname(), port.port),
                domains,
                routes: vec![route_to(&service_cluster_name(svc, port.port))],
                ..Default::default()
            }
        })
        .collect();
    RouteConfiguration {
        name: egress_listener_name(egress.port),
        virtual_hosts,
        ..Default::default()
    }
}

/// A proxy's own certificate and key, as the SDS secret [`WORKLOAD_SECRET`].
pub fn workload_secret(cert: &IssuedCertificate) -> Secret {
    Secret {
        name: WORKLOAD_SECRET.to_string(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: Some(inline(&cert.chain_pem)),
            private_key: Some(inline(cert.key.secret_pem())),
            ..Default::default()
        })),
    }
}

/// The trust bundle, as the SDS secret [`ROOT_SECRET`].
pub fn root_secret(bundle: &TrustBundle) -> Secret {
    Secret {
        name: ROOT_SECRET.to_string(),
        r#type: Some(secret::Type::ValidationContext(
            CertificateValidationContext {
                trusted_ca: Some(inline(&bundle.pem())),
                ..Default::default()
            },
        )),
    }
}

fn inline(text: &str) -> DataSource {
    DataSource {
        specifier: Some(data_source::Specifier::InlineString(text.to_string())),
        ..Default::default()
    }
}

fn sds(name: &str) -> SdsSecretConfig {
    SdsSecretConfig {
        name: name.to_string(),
        sds_config: Some(ads()),
    }
}

/// Server side of mTLS on an inbound chain: present the workload certificate, require
/// a client certificate from the trust bundle.
fn downstream_mtls() -> TransportSocket {
    let ctx = DownstreamTlsContext {
        common_tls_context: Some(CommonTlsContext {
            tls_certificate_sds_secret_configs: vec![sds(WORKLOAD_SECRET)],
            validation_context_type: Some(
                common_tls_context::ValidationContextType::ValidationContextSdsSecretConfig(sds(
                    ROOT_SECRET,
                )),
            ),
            ..Default::default()
        }),
        require_client_certificate: Some(BoolValue { value: true }),
        ..Default::default()
    };
    tls_socket(any(&ctx))
}

/// Client side of mTLS towards a service: present the workload certificate, accept
/// only a server certificate from the trust bundle naming one of `identities`.
fn upstream_mtls(identities: &[SpiffeId]) -> TransportSocket {
    let matchers = identities
        .iter()
        .map(|id| SubjectAltNameMatcher {
            san_type: subject_alt_name_matcher::SanType::Uri as i32,
            matcher: Some(StringMatcher {
                match_pattern: Some(string_matcher::MatchPattern::Exact(id.to_string())),
                ..Default::default()
            }),
            ..Default::default()
        })
        .collect();
    let ctx = UpstreamTlsContext {
        common_tls_context: Some(CommonTlsContext {
            tls_certificate_sds_secret_configs: vec![sds(WORKLOAD_SECRET)],
            validation_context_type: Some(
                common_tls_context::ValidationContextType::CombinedValidationContext(
                    common_tls_context::CombinedCertificateValidationContext {
                        default_validation_context: Some(CertificateValidationContext {
                            match_typed_subject_alt_names: matchers,
                            ..Default::default()
                        }),
                        validation_context_sds_secret_config: Some(sds(ROOT_SECRET)),
                        ..Default::default()
                    },
                ),
            ),
            ..Default::default()
        }),
        ..Default::default()
    };
    tls_socket(any(&ctx))
}

fn plaintext_match() -> Struct {
    Struct {
        fields: [(
            PLAINTEXT_MATCH.0.to_string(),
            Value {
                kind: Some(value::Kind::StringValue(PLAINTEXT_MATCH.1.to_string())),
            },
        )]
        .into(),
    }
}

fn raw_buffer() -> TransportSocket {
    TransportSocket {
        name: "envoy.transport_sockets.raw_buffer".to_string(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(any(
            &RawBuffer::default(),
        ))),
    }
}

fn tls_socket(config: Any) -> TransportSocket {
    TransportSocket {
        name: "envoy.transport_sockets.tls".to_string(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(config)),
    }
}

/// Header naming the rule that denied a request (`…matched_policy[<ns>/<name>#<rule>]`,
/// or `[none]` when no ALLOW rule matched).
pub const DENIED_BY_HEADER: &str = "x-meshd-denied-by";

/// The access log line of every inbound request: who called (`peer`), how it was
/// decided (`details`: `via_upstream`, or `rbac_access_denied_matched_policy[<rule>]`)
/// and which AUDIT rule matched it (`audit`, `-` for none).
const INBOUND_HTTP_LOG: &str = "[%START_TIME%] inbound \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% peer=%DOWNSTREAM_PEER_URI_SAN% details=%RESPONSE_CODE_DETAILS% audit=%DYNAMIC_METADATA(envoy.filters.http.rbac:audit_shadow_effective_policy_id)% %DURATION%ms\n";

/// The access log line of every inbound connection, as [`INBOUND_HTTP_LOG`].
const INBOUND_TCP_LOG: &str = "[%START_TIME%] inbound tcp %DOWNSTREAM_REMOTE_ADDRESS% peer=%DOWNSTREAM_PEER_URI_SAN% details=%CONNECTION_TERMINATION_DETAILS% audit=%DYNAMIC_METADATA(envoy.filters.network.rbac:audit_shadow_effective_policy_id)% %BYTES_RECEIVED%B in %BYTES_SENT%B out %DURATION%ms\n";

fn http_filter_chain_filter(
    stat_prefix: &str,
    routes: http_connection_manager::RouteSpecifier,
    mut http_filters: Vec<HttpFilter>,
    access_log: AccessLog,
) -> Filter {
    let explain_denials = !http_filters.is_empty();
    http_filters.push(HttpFilter {
        name: "envoy.filters.http.router".to_string(),
        config_type: Some(http_filter::ConfigType::TypedConfig(
            any(&Router::default()),
        )),
        ..Default::default()
    });
    let hcm = HttpConnectionManager {
        stat_prefix: stat_prefix.to_string(),
        route_specifier: Some(routes),
        http_filters,
        access_log: vec![access_log],
        local_reply_config: explain_denials.then(denial_reply),
        ..Default::default()
    };
    Filter {
        name: "envoy.filters.network.http_connection_manager".to_string(),
        config_type: Some(filter::ConfigType::TypedConfig(any(&hcm))),
    }
}

/// The start of the body of every denial.
const DENIAL_BODY_PREFIX: &str = "access denied by meshd authorization: ";

/// Local 403s say why, in a header and the body: for RBAC denials the rule
/// (`%RESPONSE_CODE_DETAILS%`); a fail-closed route's direct response
/// ([`inbound_route_denied`]) sets the header itself, and it is kept.
fn denial_reply() -> envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::LocalReplyConfig{
    use envoy_types::pb::envoy::config::accesslog::v3::{
        AccessLogFilter, ComparisonFilter, StatusCodeFilter, access_log_filter, comparison_filter,
    };
    use envoy_types::pb::envoy::config::core::v3::{
        HeaderValue, HeaderValueOption, RuntimeUInt32, SubstitutionFormatString,
        header_value_option, substitution_format_string,
    };
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::ResponseMapper;
    envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::LocalReplyConfig {
        mappers: vec![ResponseMapper {
            filter: Some(AccessLogFilter {
                filter_specifier: Some(access_log_filter::FilterSpecifier::StatusCodeFilter(
                    StatusCodeFilter {
                        comparison: Some(ComparisonFilter {
                            op: comparison_filter::Op::Eq as i32,
                            value: Some(RuntimeUInt32 {
                                default_value: 403,
                                runtime_key: "meshd.denial_status".to_string(),
                            }),
                        }),
                    },
                )),
            }),
            body_format_override: Some(SubstitutionFormatString {
                format: Some(substitution_format_string::Format::TextFormatSource(inline(
                    &format!("{DENIAL_BODY_PREFIX}%RESP({DENIED_BY_HEADER})%\n"),
                ))),
                ..Default::default()
            }),
            headers_to_add: vec![HeaderValueOption {
                header: Some(HeaderValue {
                    key: DENIED_BY_HEADER.to_string(),
                    value: "%RESPONSE_CODE_DETAILS%".to_string(),
                    ..Default::default()
                }),
                append_action: header_value_option::HeaderAppendAction::AddIfAbsent as i32,
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn tcp_proxy_filter(stat_prefix: &str, cluster: &str, access_log: AccessLog) -> Filter {
    let tcp = TcpProxy {
        stat_prefix: stat_prefix.to_string(),
        cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(cluster.to_string())),
        access_log: vec![access_log],
        ..Default::default()
    };
    Filter {
        name: "envoy.filters.network.tcp_proxy".to_string(),
        config_type: Some(filter::ConfigType::TypedConfig(any(&tcp))),
    }
}

fn route_to(cluster: &str) -> Route {
    Route {
        r#match: Some(RouteMatch {
            path_specifier: Some(route_match::PathSpecifier::Prefix("/".to_string())),
            ..Default::default()
        }),
        action: Some(route::Action::Route(RouteAction {
            cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(cluster.to_string())),
            // No overall deadline: streams (gRPC, SSE) may legitimately last long.
            timeout: Some(Duration {
                seconds: 0,
                nanos: 0,
            }),
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// An access log to Envoy's stdout, in `format` or else Envoy's default format.
fn stdout_access_log(format: Option<&str>) -> AccessLog {
    use envoy_types::pb::envoy::config::core::v3::{
        SubstitutionFormatString, substitution_format_string,
    };
    use envoy_types::pb::envoy::extensions::access_loggers::stream::v3::stdout_access_log::AccessLogFormat;
    let log = StdoutAccessLog {
        access_log_format: format.map(|f| {
            AccessLogFormat::LogFormat(SubstitutionFormatString {
                format: Some(substitution_format_string::Format::TextFormatSource(
                    inline(f),
                )),
                ..Default::default()
            })
        }),
    };
    AccessLog {
        name: "envoy.access_loggers.stdout".to_string(),
        config_type: Some(access_log::ConfigType::TypedConfig(any(&log))),
        ..Default::default()
    }
}

fn set_http2_upstream(cluster: &mut Cluster) {
    let opts = HttpProtocolOptions {
        upstream_protocol_options: Some(
            http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
                http_protocol_options::ExplicitHttpConfig {
                    protocol_config: Some(
                        http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(
                            Http2ProtocolOptions::default(),
                        ),
                    ),
                },
            ),
        ),
        ..Default::default()
    };
    cluster
        .typed_extension_protocol_options
        .insert(HTTP_PROTOCOL_OPTIONS_KEY.to_string(), any(&opts));
}

fn ads() -> ConfigSource {
    ConfigSource {
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
            AggregatedConfigSource {},
        )),
        resource_api_version: ApiVersion::V3 as i32,
        ..Default::default()
    }
}

fn socket(ip: IpAddr, port: u16) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(port))),
            ..Default::default()
        })),
    }
}

pub fn any<M: Message + Name>(m: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}
