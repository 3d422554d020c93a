//! The Envoy side of the handshake: a bootstrap that names the workload and points ADS
//! at meshd. Written by `meshctl bootstrap`.

use std::net::IpAddr;

use serde_json::{Value, json};

use crate::xds::node::{NAMESPACE_KEY, POD_KEY};
use crate::xds::status::XdsFlavor;

/// The name of the bootstrap's static cluster that reaches meshd.
pub const XDS_CLUSTER: &str = "meshd-xds";

#[derive(Debug, Clone)]
pub struct BootstrapOptions {
    pub namespace: String,
    pub pod: String,
    /// meshd's xDS endpoint: an IP or a DNS name.
    pub xds_host: String,
    pub xds_port: u16,
    /// Envoy's admin interface, always on loopback.
    pub admin_port: u16,
    pub flavor: XdsFlavor,
}

impl BootstrapOptions {
    pub fn node_id(&self) -> String {
        format!("{}.{}", self.pod, self.namespace)
    }
}

/// The bootstrap as JSON (which Envoy also reads as YAML).
pub fn envoy_bootstrap(opts: &BootstrapOptions) -> Value {
    let api_type = match opts.flavor {
        XdsFlavor::Sotw => "GRPC",
        XdsFlavor::Delta => "DELTA_GRPC",
    };
    // An IP needs no resolver; a name is resolved and re-resolved by Envoy.
    let cluster_type = if opts.xds_host.parse::<IpAddr>().is_ok() {
        "STATIC"
    } else {
        "STRICT_DNS"
    };
    json!({
        "node": {
            "id": opts.node_id(),
            "cluster": opts.namespace,
            "metadata": { NAMESPACE_KEY: opts.namespace, POD_KEY: opts.pod },
        },
        "admin": {
            "address": { "socket_address": { "address": "127.0.0.1", "port_value": opts.admin_port } }
        },
        "dynamic_resources": {
            "ads_config": {
                "api_type": api_type,
                "transport_api_version": "V3",
                "set_node_on_first_message_only": true,
                "grpc_services": [{ "envoy_grpc": { "cluster_name": XDS_CLUSTER } }],
            },
            "cds_config": { "ads": {}, "resource_api_version": "V3" },
            "lds_config": { "ads": {}, "resource_api_version": "V3" },
        },
        "static_resources": {
            "clusters": [{
                "name": XDS_CLUSTER,
                "type": cluster_type,
                "connect_timeout": "1s",
                "typed_extension_protocol_options": {
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        "explicit_http_config": { "http2_protocol_options": {} },
                    }
                },
                "load_assignment": {
                    "cluster_name": XDS_CLUSTER,
                    "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": {
                        "socket_address": { "address": opts.xds_host, "port_value": opts.xds_port }
                    } } }] }],
                },
            }]
        },
    })
}
