//! Has a real Envoy check one proxy's whole config, as meshd would serve it.
//!
//! [`bootstrap`] turns a proxy's [`ProxyResources`] (and its two SDS secrets) into an
//! Envoy bootstrap that holds them as static resources, and [`envoy_validate`] runs
//! `envoy --mode validate` on it: Envoy builds every listener, filter chain, filter,
//! route configuration (with its per-route RBAC), cluster and TLS context exactly as it
//! would on an xDS update, without opening a socket. What it refuses there it would
//! NACK.
//!
//! Three rewrites make the xDS resources static, and each keeps what is checked:
//! - a listener's RDS reference becomes the route configuration of that name inline
//!   (then Envoy also checks that every cluster a route names exists);
//! - SDS references lose their config source, so the TLS contexts bind to the static
//!   secrets and Envoy parses the certificates and keys;
//! - each endpoint assignment (EDS) becomes the `load_assignment` of a static cluster of
//!   its own (`eds-check|<name>`); the EDS clusters themselves stay as they are, served
//!   by an ADS config source that validation never dials.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;

use anyhow::{Context, bail, ensure};
use envoy_types::pb::envoy::config::bootstrap::v3::Bootstrap;
use envoy_types::pb::envoy::config::bootstrap::v3::bootstrap::{DynamicResources, StaticResources};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType};
use envoy_types::pb::envoy::config::core::v3::{
    ApiConfigSource, ApiVersion, GrpcService, Http2ProtocolOptions, Node, TransportSocket,
    api_config_source, grpc_service, transport_socket,
};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::{Listener, filter};
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CommonTlsContext, DownstreamTlsContext, Secret, UpstreamTlsContext, common_tls_context,
};
use envoy_types::pb::google::protobuf::{Any, Duration};
use meshd::xds::translate::resources::{ProxyResources, ResourceType};
use prost::{Message, Name};

use crate::tools::envoy_binary;

/// The static cluster the bootstrap's (never dialled) ADS config source names.
const ADS_CLUSTER: &str = "validate-ads";

/// A bootstrap holding everything in `resources` as static resources (see the module
/// doc). Fails if a listener names a route configuration the proxy is not served.
pub fn bootstrap(node_id: &str, resources: &ProxyResources) -> anyhow::Result<Bootstrap> {
    let routes: BTreeMap<String, RouteConfiguration> = decode_all(resources, ResourceType::Route)?
        .into_iter()
        .map(|r: RouteConfiguration| (r.name.clone(), r))
        .collect();
    let mut clusters: Vec<Cluster> = decode_all(resources, ResourceType::Cluster)?;
    for c in &mut clusters {
        if let Some(ts) = &mut c.transport_socket {
            static_secrets(ts)?;
        }
        for m in &mut c.transport_socket_matches {
            if let Some(ts) = &mut m.transport_socket {
                static_secrets(ts)?;
            }
        }
    }
    for cla in decode_all::<ClusterLoadAssignment>(resources, ResourceType::Endpoint)? {
        let name = format!("eds-check|{}", cla.cluster_name);
        clusters.push(Cluster {
            name: name.clone(),
            cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32)),
            connect_timeout: Some(Duration {
                seconds: 1,
                nanos: 0,
            }),
            load_assignment: Some(ClusterLoadAssignment {
                cluster_name: name,
                ..cla
            }),
            ..Default::default()
        });
    }
    clusters.push(ads_cluster());
    let mut used_routes = std::collections::BTreeSet::new();
    let mut listeners: Vec<Listener> = decode_all(resources, ResourceType::Listener)?;
    for l in &mut listeners {
        for chain in &mut l.filter_chains {
            if let Some(ts) = &mut chain.transport_socket {
                static_secrets(ts)?;
            }
            for f in &mut chain.filters {
                let Some(filter::ConfigType::TypedConfig(any)) = &mut f.config_type else {
                    continue;
                };
                if any.type_url != HttpConnectionManager::type_url() {
                    continue;
                }
                let mut hcm = HttpConnectionManager::decode(any.value.as_slice())?;
                if let Some(http_connection_manager::RouteSpecifier::Rds(rds)) =
                    &hcm.route_specifier
                {
                    let route = routes.get(&rds.route_config_name).with_context(|| {
                        format!(
                            "listener {} names route configuration {}, which the proxy is not served",
                            l.name, rds.route_config_name
                        )
                    })?;
                    used_routes.insert(route.name.clone());
                    hcm.route_specifier = Some(
                        http_connection_manager::RouteSpecifier::RouteConfig(route.clone()),
                    );
                    *any = to_any(&hcm);
                }
            }
        }
    }
    if let Some(unused) = routes.keys().find(|r| !used_routes.contains(*r)) {
        bail!("route configuration {unused} is served, but no listener uses it");
    }
    let secrets: Vec<Secret> = decode_all(resources, ResourceType::Secret)?;
    Ok(Bootstrap {
        node: Some(Node {
            id: node_id.to_string(),
            cluster: "validate".to_string(),
            ..Default::default()
        }),
        static_resources: Some(StaticResources {
            listeners,
            clusters,
            secrets,
        }),
        dynamic_resources: Some(DynamicResources {
            ads_config: Some(ApiConfigSource {
                api_type: api_config_source::ApiType::Grpc as i32,
                transport_api_version: ApiVersion::V3 as i32,
                grpc_services: vec![GrpcService {
                    target_specifier: Some(grpc_service::TargetSpecifier::EnvoyGrpc(
                        grpc_service::EnvoyGrpc {
                            cluster_name: ADS_CLUSTER.to_string(),
                            ..Default::default()
                        },
                    )),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// Runs `envoy --mode validate` on `bootstrap`, written (binary protobuf) into `dir`.
/// Err carries Envoy's own words for what it refused.
pub fn envoy_validate(bootstrap: &Bootstrap, dir: &Path, name: &str) -> anyhow::Result<()> {
    let path = dir.join(format!("{name}.pb"));
    std::fs::write(&path, bootstrap.encode_to_vec())?;
    let out = std::process::Command::new(envoy_binary()?)
        .arg("--mode")
        .arg("validate")
        .arg("-c")
        .arg(&path)
        .args(["--log-level", "critical", "--disable-hot-restart"])
        .stdin(Stdio::null())
        .output()
        .context("cannot run envoy --mode validate")?;
    ensure!(
        out.status.success(),
        "envoy --mode validate refused {}: {}{}",
        path.display(),
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(())
}

fn decode_all<M: Message + Name + Default>(
    resources: &ProxyResources,
    t: ResourceType,
) -> anyhow::Result<Vec<M>> {
    resources
        .get(t)
        .values()
        .map(|r| {
            ensure!(
                r.body.type_url == M::type_url(),
                "{} in {t:?}",
                r.body.type_url
            );
            M::decode(r.body.value.as_slice()).with_context(|| format!("decoding {}", r.name))
        })
        .collect()
}

fn to_any<M: Message + Name>(m: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}

/// Makes the TLS context in `ts` take its secrets from the bootstrap's static ones.
fn static_secrets(ts: &mut TransportSocket) -> anyhow::Result<()> {
    // A transport socket without a typed config has no secrets to take.
    if let Some(transport_socket::ConfigType::TypedConfig(any)) = &mut ts.config_type {
        if any.type_url == DownstreamTlsContext::type_url() {
            let mut ctx = DownstreamTlsContext::decode(any.value.as_slice())?;
            if let Some(common) = &mut ctx.common_tls_context {
                strip_sds_sources(common);
            }
            *any = to_any(&ctx);
        } else if any.type_url == UpstreamTlsContext::type_url() {
            let mut ctx = UpstreamTlsContext::decode(any.value.as_slice())?;
            if let Some(common) = &mut ctx.common_tls_context {
                strip_sds_sources(common);
            }
            *any = to_any(&ctx);
        }
    }
    Ok(())
}

fn strip_sds_sources(common: &mut CommonTlsContext) {
    for sds in &mut common.tls_certificate_sds_secret_configs {
        sds.sds_config = None;
    }
    match &mut common.validation_context_type {
        Some(common_tls_context::ValidationContextType::ValidationContextSdsSecretConfig(sds)) => {
            sds.sds_config = None;
        }
        Some(common_tls_context::ValidationContextType::CombinedValidationContext(combined)) => {
            if let Some(sds) = &mut combined.validation_context_sds_secret_config {
                sds.sds_config = None;
            }
        }
        _ => {}
    }
}

fn ads_cluster() -> Cluster {
    use envoy_types::pb::envoy::config::core::v3::{
        Address, SocketAddress, address, socket_address,
    };
    use envoy_types::pb::envoy::config::endpoint::v3::{
        Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
    };
    let mut cluster = Cluster {
        name: ADS_CLUSTER.to_string(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32)),
        connect_timeout: Some(Duration {
            seconds: 1,
            nanos: 0,
        }),
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: ADS_CLUSTER.to_string(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![LbEndpoint {
                    host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                        address: Some(Address {
                            address: Some(address::Address::SocketAddress(SocketAddress {
                                address: "127.0.0.1".to_string(),
                                port_specifier: Some(socket_address::PortSpecifier::PortValue(1)),
                                ..Default::default()
                            })),
                        }),
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
    use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
        HttpProtocolOptions, http_protocol_options,
    };
    use http_protocol_options::explicit_http_config::ProtocolConfig;
    let h2 = HttpProtocolOptions {
        upstream_protocol_options: Some(
            http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
                http_protocol_options::ExplicitHttpConfig {
                    protocol_config: Some(ProtocolConfig::Http2ProtocolOptions(
                        Http2ProtocolOptions::default(),
                    )),
                },
            ),
        ),
        ..Default::default()
    };
    cluster.typed_extension_protocol_options.insert(
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".to_string(),
        to_any(&h2),
    );
    cluster
}
