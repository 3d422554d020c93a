//! Route configurations: a service port's shared route, an inbound port's route that
//! carries its RBAC (and its deny-all twin), the egress port's virtual hosts.

use envoy_types::pb::envoy::config::route::v3::{
    Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, route, route_action,
    route_match,
};
use envoy_types::pb::google::protobuf::Duration;

use super::filters::{DENIAL_BODY_PREFIX, DENIED_BY_HEADER, INVALID_POLICY};
use super::inline;
use super::names::{
    egress_listener_name, inbound_cluster_name, inbound_route_name, service_cluster_name,
};
use super::resources::any;
use crate::authz::compile::PortRbac;
use crate::model::proxy_view::EgressView;
use crate::model::{Service, ServicePort};

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

/// The route configuration of an inbound HTTP port ([`inbound_route_name`]): everything
/// to the local app, through the port's RBAC stages (see [`crate::authz::compile`]: the stages
/// live here so that they change together, and for the next request). Nothing in it is
/// the pod's own, so pods with the same policies share it.
pub fn inbound_route(port: u16, rbac: &PortRbac) -> RouteConfiguration {
    let mut route = route_to(&inbound_cluster_name(port));
    route.typed_per_filter_config = rbac.per_route_configs();
    inbound_route_config(&inbound_route_name(port), route)
}

/// What an inbound HTTP port's route becomes when the sidecar rejected the compiled one
/// ([`crate::xds::serve::fail_closed`]): every request gets 403 naming [`INVALID_POLICY`]. A direct
/// response, with the RBAC filters switched off for it (a generic `FilterConfig`), so it
/// needs none of the RBAC machinery the sidecar may have refused.
pub fn inbound_route_denied(name: &str) -> RouteConfiguration {
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
        typed_per_filter_config: crate::authz::compile::STAGES
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
    inbound_route_config(name, route)
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

pub(super) fn route_to(cluster: &str) -> Route {
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

/// An inbound port's route configuration `name`: one virtual host answering every name
/// with `route`.
fn inbound_route_config(name: &str, route: Route) -> RouteConfiguration {
    RouteConfiguration {
        name: name.to_string(),
        virtual_hosts: vec![VirtualHost {
            name: "inbound".to_string(),
            domains: vec!["*".to_string()],
            routes: vec![route],
            ..Default::default()
        }],
        ..Default::default()
    }
}
