//! The network filters every listener is made of: the HTTP connection manager (with
//! denials that say why), `tcp_proxy`, network RBAC, and the access-log formats.

use envoy_types::pb::envoy::config::accesslog::v3::{AccessLog, access_log};
use envoy_types::pb::envoy::config::listener::v3::{Filter, filter};
use envoy_types::pb::envoy::extensions::access_loggers::stream::v3::StdoutAccessLog;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, http_connection_manager, http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};

use super::inline;
use super::resources::any;

/// The reason a fail-closed resource gives for every denial, in the
/// [`DENIED_BY_HEADER`] header and the body.
pub const INVALID_POLICY: &str = "invalid-policy: this sidecar rejected the policy meshd compiled for this port; see meshctl status";

/// The name of the RBAC policy that denies every connection on a fail-closed TCP port.
pub const INVALID_POLICY_RULE: &str = "invalid-policy";

pub(super) fn network_rbac_filter(
    rbac: &envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac,
) -> Filter {
    Filter {
        name: "envoy.filters.network.rbac".to_string(),
        config_type: Some(filter::ConfigType::TypedConfig(any(rbac))),
    }
}

/// Header naming the rule that denied a request (`…matched_policy[<ns>/<name>#<rule>]`,
/// or `[none]` when no ALLOW rule matched).
pub const DENIED_BY_HEADER: &str = "x-meshd-denied-by";

/// The access log line of every inbound request: who called (`peer`), how it was
/// decided (`details`: `via_upstream`, or `rbac_access_denied_matched_policy[<rule>]`)
/// and which AUDIT rule matched it (`audit`, `-` for none).
pub(super) const INBOUND_HTTP_LOG: &str = "[%START_TIME%] inbound \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% peer=%DOWNSTREAM_PEER_URI_SAN% details=%RESPONSE_CODE_DETAILS% audit=%DYNAMIC_METADATA(envoy.filters.http.rbac:audit_shadow_effective_policy_id)% %DURATION%ms\n";

/// The access log line of every inbound connection, as [`INBOUND_HTTP_LOG`].
pub(super) const INBOUND_TCP_LOG: &str = "[%START_TIME%] inbound tcp %DOWNSTREAM_REMOTE_ADDRESS% peer=%DOWNSTREAM_PEER_URI_SAN% details=%CONNECTION_TERMINATION_DETAILS% audit=%DYNAMIC_METADATA(envoy.filters.network.rbac:audit_shadow_effective_policy_id)% %BYTES_RECEIVED%B in %BYTES_SENT%B out %DURATION%ms\n";

/// The access log line of a transparent sidecar's connection to a destination outside
/// the mesh, passed through under `--outbound-policy allow-any`.
pub(super) const OUTBOUND_PASSTHROUGH_LOG: &str = "[%START_TIME%] outbound tcp %DOWNSTREAM_LOCAL_ADDRESS% not in the mesh: passed through as addressed, without mTLS (outbound policy allow-any) %BYTES_RECEIVED%B out %BYTES_SENT%B in %DURATION%ms\n";

/// The same, refused under `--outbound-policy registry-only`.
pub(super) const OUTBOUND_REFUSED_LOG: &str = "[%START_TIME%] outbound tcp %DOWNSTREAM_LOCAL_ADDRESS% not in the mesh: refused (outbound policy registry-only)\n";

pub(super) fn http_filter_chain_filter(
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
pub(super) const DENIAL_BODY_PREFIX: &str = "access denied by meshd authorization: ";

/// Local 403s say why, in a header and the body: for RBAC denials the rule
/// (`%RESPONSE_CODE_DETAILS%`); a fail-closed route's direct response
/// ([`inbound_route_denied`]) sets the header itself, and it is kept.
pub(super) fn denial_reply() -> envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::LocalReplyConfig{
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

pub(super) fn tcp_proxy_filter(stat_prefix: &str, cluster: &str, access_log: AccessLog) -> Filter {
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

/// An access log to Envoy's stdout, in `format` or else Envoy's default format.
pub(super) fn stdout_access_log(format: Option<&str>) -> AccessLog {
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
