//! Clusters and their endpoints: a service port's EDS cluster (mTLS to the identities
//! of its endpoints, plaintext to DISABLE endpoints by transport-socket match) and its
//! `ClusterLoadAssignment`, and a workload's static inbound cluster to its app.

use std::net::{IpAddr, Ipv4Addr};

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, DiscoveryType, EdsClusterConfig,
};
use envoy_types::pb::envoy::config::core::v3::Metadata;
use envoy_types::pb::envoy::config::core::v3::{
    BindConfig, HealthStatus, Http2ProtocolOptions, SocketAddress, socket_address,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint as EnvoyEndpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    HttpProtocolOptions, http_protocol_options,
};
use envoy_types::pb::google::protobuf::{Duration, Struct, Value, value};
use meshd_ca::SpiffeId;

use super::names::{
    BLACKHOLE_CLUSTER, INBOUND_PASSTHROUGH_CLUSTER, INBOUND_PASSTHROUGH_SOURCE,
    PASSTHROUGH_CLUSTER, direct_cluster_name, inbound_cluster_name, service_cluster_name,
};
use super::resources::any;
use super::transport::{raw_buffer, upstream_mtls};
use super::{ads, socket};
use crate::model::snapshot::{Endpoint, InboundPort};
use crate::model::{MtlsMode, Service, ServicePort};

pub(super) const CONNECT_TIMEOUT: Duration = Duration {
    seconds: 5,
    nanos: 0,
};

/// Endpoint metadata that makes a cluster talk plaintext to a DISABLE port.
pub(super) const TRANSPORT_SOCKET_MATCH: &str = "envoy.transport_socket_match";
pub(super) const PLAINTEXT_MATCH: (&str, &str) = ("meshd.tls", "disabled");

pub(super) const HTTP_PROTOCOL_OPTIONS_KEY: &str =
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

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

pub(super) fn plaintext_match() -> Struct {
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

pub(super) fn set_http2_upstream(cluster: &mut Cluster) {
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

/// Transparent capture: a service port's cluster for calls to one of its endpoints' own
/// addresses (a pod IP dialled directly, a headless service): the address the app
/// dialled, over mTLS that accepts only `identities`.
pub fn direct_cluster(svc: &Service, port: u16, identities: &[SpiffeId]) -> Cluster {
    Cluster {
        transport_socket: Some(upstream_mtls(identities)),
        ..original_destination(direct_cluster_name(svc, port))
    }
}

/// Transparent capture: what the mesh does not know, to where it was addressed, as it
/// is ([`PASSTHROUGH_CLUSTER`]); the inbound twin connects from 127.0.0.6, which `meshd-agent
/// init` exempts from capture, so it reaches the app instead of the sidecar again.
pub fn passthrough_clusters() -> [Cluster; 3] {
    let inbound = Cluster {
        upstream_bind_config: Some(BindConfig {
            source_address: Some(SocketAddress {
                address: INBOUND_PASSTHROUGH_SOURCE.to_string(),
                port_specifier: Some(socket_address::PortSpecifier::PortValue(0)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..original_destination(INBOUND_PASSTHROUGH_CLUSTER.to_string())
    };
    // No endpoints: every connection is closed at once (`registry-only`).
    let blackhole = Cluster {
        name: BLACKHOLE_CLUSTER.to_string(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32)),
        connect_timeout: Some(CONNECT_TIMEOUT),
        ..Default::default()
    };
    [
        original_destination(PASSTHROUGH_CLUSTER.to_string()),
        inbound,
        blackhole,
    ]
}

fn original_destination(name: String) -> Cluster {
    use envoy_types::pb::envoy::config::cluster::v3::cluster::LbPolicy;
    Cluster {
        name,
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(
            DiscoveryType::OriginalDst as i32,
        )),
        lb_policy: LbPolicy::ClusterProvided as i32,
        connect_timeout: Some(CONNECT_TIMEOUT),
        ..Default::default()
    }
}
