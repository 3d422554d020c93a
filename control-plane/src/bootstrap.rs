//! The Envoy side of the handshake: a bootstrap that names the workload, points ADS at
//! meshd over mutual TLS, and keeps Envoy's admin interface on loopback. Written by
//! `meshctl bootstrap`, with the proxy's bootstrap certificate and key beside it.

use std::net::IpAddr;
use std::path::PathBuf;

use serde_json::{Value, json};

use crate::xds::node::{NAMESPACE_KEY, POD_KEY, SERVICE_ACCOUNT_KEY};
use crate::xds::status::XdsFlavor;

/// The name of the bootstrap's static cluster that reaches meshd.
pub const XDS_CLUSTER: &str = "meshd-xds";

#[derive(Debug, Clone)]
pub struct BootstrapOptions {
    pub namespace: String,
    pub pod: String,
    pub service_account: String,
    /// meshd's xDS endpoint: an IP or a DNS name.
    pub xds_host: String,
    pub xds_port: u16,
    /// The SPIFFE id meshd's serving certificate must carry.
    pub meshd_identity: String,
    /// Envoy's admin interface, always on loopback.
    pub admin_port: u16,
    pub flavor: XdsFlavor,
    /// The proxy's client certificate chain, its key and the trust bundle (PEM files).
    pub cert_chain: PathBuf,
    pub private_key: PathBuf,
    pub trust_bundle: PathBuf,
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
            "metadata": {
                NAMESPACE_KEY: opts.namespace,
                POD_KEY: opts.pod,
                SERVICE_ACCOUNT_KEY: opts.service_account,
            },
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
                "transport_socket": {
                    "name": "envoy.transport_sockets.tls",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                        "sni": "meshd",
                        "common_tls_context": {
                            "alpn_protocols": ["h2"],
                            "tls_certificates": [{
                                "certificate_chain": { "filename": opts.cert_chain },
                                "private_key": { "filename": opts.private_key },
                            }],
                            "validation_context": {
                                "trusted_ca": { "filename": opts.trust_bundle },
                                "match_typed_subject_alt_names": [{
                                    "san_type": "URI",
                                    "matcher": { "exact": opts.meshd_identity },
                                }],
                            },
                        },
                    },
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
