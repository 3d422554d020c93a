//! The Envoy bootstrap: the node names the workload, ADS points at meshd over mutual
//! TLS, Envoy's admin interface stays on loopback. The client certificate and the
//! trust bundle Envoy checks meshd with come from file-based SDS secrets in a
//! [`CredentialDir`], so a renewal or a new root reaches Envoy without a restart.

use std::net::IpAddr;

use serde_json::{Value, json};

use crate::credentials::{CLIENT_CERT_SECRET, CredentialDir, CredentialError, TRUST_BUNDLE_SECRET};
use crate::{NAMESPACE_KEY, POD_KEY, SERVICE_ACCOUNT_KEY, XdsFlavor};

/// The bootstrap's file in a sidecar directory, beside the credentials.
pub const BOOTSTRAP_FILE: &str = "envoy-bootstrap.json";

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
    /// Where the client certificate, its key and the trust bundle are kept current.
    pub credentials: CredentialDir,
}

impl BootstrapOptions {
    pub fn node_id(&self) -> String {
        format!("{}.{}", self.pod, self.namespace)
    }
}

/// `host:port` (the host a DNS name, an IPv4 address or a bracketed IPv6 one), as
/// `--xds-address` takes meshd's address; `None` if it is not of that form.
pub fn split_host_port(address: &str) -> Option<(&str, u16)> {
    let (host, port) = address.rsplit_once(':')?;
    let host = host.trim_matches(['[', ']']);
    (!host.is_empty()).then_some(())?;
    Some((host, port.parse().ok()?))
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
                            "tls_certificate_sds_secret_configs": [
                                file_sds(CLIENT_CERT_SECRET, &opts.credentials.client_cert_sds()),
                            ],
                            "combined_validation_context": {
                                "default_validation_context": {
                                    "match_typed_subject_alt_names": [{
                                        "san_type": "URI",
                                        "matcher": { "exact": opts.meshd_identity },
                                    }],
                                },
                                "validation_context_sds_secret_config":
                                    file_sds(TRUST_BUNDLE_SECRET, &opts.credentials.trust_bundle_sds()),
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

/// An SDS secret read from `path` (which never changes: the files it names do).
fn file_sds(name: &str, path: &std::path::Path) -> Value {
    json!({
        "name": name,
        "sds_config": {
            "path_config_source": { "path": path },
            "resource_api_version": "V3",
        },
    })
}

/// Writes the bootstrap into its credential directory (whose credentials must already
/// be there: Envoy reads them at start) and returns its path.
pub fn write_bootstrap(opts: &BootstrapOptions) -> Result<std::path::PathBuf, CredentialError> {
    let path = opts.credentials.root().join(BOOTSTRAP_FILE);
    let text = serde_json::to_string_pretty(&envoy_bootstrap(opts)).expect("JSON") + "\n";
    crate::credentials::replace_file(&path, &text, 0o644)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::split_host_port;

    #[test]
    fn addresses_split_into_host_and_port() {
        assert_eq!(
            split_host_port("meshd.meshd-system.svc:15012"),
            Some(("meshd.meshd-system.svc", 15012))
        );
        assert_eq!(
            split_host_port("127.0.0.1:15012"),
            Some(("127.0.0.1", 15012))
        );
        assert_eq!(split_host_port("[::1]:15012"), Some(("::1", 15012)));
        for bad in ["meshd", "meshd:", ":15012", "meshd:http", "meshd:70000"] {
            assert_eq!(split_host_port(bad), None, "{bad}");
        }
    }
}
