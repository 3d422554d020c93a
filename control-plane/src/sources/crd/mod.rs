//! meshd's own resources (`security.meshd.io/v1alpha1`), in the shape a user writes them.
//!
//! These serde types are what the config directory (and later the Kubernetes API) holds;
//! the functions here check them and turn them into model objects, naming the field on
//! error. Unknown fields are errors: a typo must not silently weaken security.

use std::collections::BTreeMap;
use std::net::IpAddr;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

mod workload_policy;

pub use self::workload_policy::{
    ExemptionSpec, PolicyOffender, PolicyReport, RuleCount, RulesSpec, WorkloadPolicy,
    WorkloadPolicySpec, WorkloadPolicyStatus, workload_policy,
};
use super::convert::{FieldError, object_key};
use crate::model::MtlsMode;
use crate::model::authorization::{
    self, Action, Cidr, Condition, Operation, Rule, Source, StringMatch,
};

/// meshd's API group.
pub const GROUP: &str = "security.meshd.io";
pub const GROUP_VERSION: &str = "security.meshd.io/v1alpha1";

/// PeerAuthentication: which mTLS mode the inbound ports of the selected workloads
/// accept (STRICT, PERMISSIVE or DISABLE). The most specific policy wins: the
/// workload's (port level first), then its namespace's, then the root namespace's.
#[derive(CustomResource, Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "security.meshd.io",
    version = "v1alpha1",
    kind = "PeerAuthentication",
    namespaced,
    shortname = "pa",
    status = "PolicyStatus",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mtls.mode"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationSpec {
    /// Without a selector: every workload of the namespace (of the mesh, in the root
    /// namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MtlsSpec>,
    /// Per port number (as a string key): overrides `mtls` for that port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_level_mtls: Option<BTreeMap<String, MtlsSpec>>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MtlsSpec {
    /// STRICT, PERMISSIVE, DISABLE or UNSET (inherit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

/// What meshd made of a policy, written by the replica that holds the Lease.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    #[serde(default)]
    pub conditions: Vec<PolicyCondition>,
}

/// A status condition in the Kubernetes convention; meshd sets `Accepted`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyCondition {
    /// `Accepted`
    #[serde(rename = "type")]
    pub type_: String,
    /// `True` or `False`
    pub status: String,
    /// `Accepted` or `Invalid`
    pub reason: String,
    /// Why the policy was not accepted: the field and what is wrong with it.
    #[serde(default)]
    pub message: String,
    /// The `metadata.generation` this condition describes.
    #[serde(default)]
    pub observed_generation: i64,
    /// RFC 3339.
    #[serde(default)]
    pub last_transition_time: String,
}

/// The CustomResourceDefinitions of meshd's resources, as the chart installs them.
pub fn crds()
-> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>
{
    use kube::CustomResourceExt;
    vec![
        AuthorizationPolicy::crd(),
        PeerAuthentication::crd(),
        WorkloadPolicy::crd(),
    ]
}

/// [`crds`] as one multi-document YAML file.
pub fn crds_yaml() -> String {
    let mut out =
        String::from("# Generated from meshd's Rust types by `meshctl crds`; do not edit.\n");
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&crd).expect("a CRD serializes"));
    }
    out
}

/// `STRICT`, `PERMISSIVE`, `DISABLE`, or `UNSET`/absent (`None`: inherit).
fn parse_mode(field: &str, spec: Option<&MtlsSpec>) -> Result<Option<MtlsMode>, FieldError> {
    match spec.and_then(|s| s.mode.as_deref()) {
        None | Some("UNSET") => Ok(None),
        Some("STRICT") => Ok(Some(MtlsMode::Strict)),
        Some("PERMISSIVE") => Ok(Some(MtlsMode::Permissive)),
        Some("DISABLE") => Ok(Some(MtlsMode::Disable)),
        Some(other) => Err(FieldError::new(
            field,
            format!("{other:?} is not a mode: use STRICT, PERMISSIVE, DISABLE or UNSET"),
        )),
    }
}

pub fn peer_authentication(
    r: &PeerAuthentication,
) -> Result<crate::model::PeerAuthentication, FieldError> {
    let key = object_key(&r.metadata)?;
    let selector = r
        .spec
        .selector
        .as_ref()
        .map(|s| s.match_labels.clone())
        .filter(|l| !l.is_empty());
    let mode = parse_mode("spec.mtls.mode", r.spec.mtls.as_ref())?;
    let mut port_modes = BTreeMap::new();
    for (port, spec) in r.spec.port_level_mtls.iter().flatten() {
        let field = format!("spec.portLevelMtls[\"{port}\"]");
        if selector.is_none() {
            return Err(FieldError::new(
                field,
                "port-level settings need spec.selector.matchLabels: ports are a workload's, not a namespace's",
            ));
        }
        let number = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| FieldError::new(&field, "the key must be a port number (1-65535)"))?;
        match parse_mode(&format!("{field}.mode"), Some(spec))? {
            Some(m) => {
                port_modes.insert(number, m);
            }
            None => {
                return Err(FieldError::new(
                    format!("{field}.mode"),
                    "is required for a port-level setting",
                ));
            }
        }
    }
    Ok(crate::model::PeerAuthentication {
        key,
        selector,
        mode,
        port_modes,
    })
}

/// AuthorizationPolicy: who may do what to the selected workloads. DENY policies
/// win; if any ALLOW policy selects a workload, a request must match one of its rules;
/// AUDIT only logs.
#[derive(CustomResource, Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "security.meshd.io",
    version = "v1alpha1",
    kind = "AuthorizationPolicy",
    namespaced,
    shortname = "ap",
    status = "PolicyStatus",
    printcolumn = r#"{"name":"Action","type":"string","jsonPath":".spec.action"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// ALLOW (default), DENY or AUDIT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleSpec {
    #[serde(default)]
    pub from: Vec<FromSpec>,
    #[serde(default)]
    pub to: Vec<ToSpec>,
    #[serde(default)]
    pub when: Vec<ConditionSpec>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FromSpec {
    pub source: SourceSpec,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SourceSpec {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ToSpec {
    pub operation: OperationSpec,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OperationSpec {
    #[serde(default)]
    pub ports: Vec<String>,
    #[serde(default)]
    pub not_ports: Vec<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub not_methods: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub not_paths: Vec<String>,
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub not_hosts: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConditionSpec {
    /// `request.headers[<name>]`
    pub key: String,
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub not_values: Vec<String>,
}

/// Checks an AuthorizationPolicy and turns it into the model, naming the first wrong
/// field. `trust_domain` completes principals written without `spiffe://`.
pub fn authorization_policy(
    r: &AuthorizationPolicy,
) -> Result<authorization::AuthorizationPolicy, FieldError> {
    let key = object_key(&r.metadata)?;
    let spec = &r.spec;
    let action = match spec.action.as_deref() {
        None | Some("ALLOW") => Action::Allow,
        Some("DENY") => Action::Deny,
        Some("AUDIT") => Action::Audit,
        Some(other) => {
            return Err(FieldError::new(
                "spec.action",
                format!("{other:?} is not an action: use ALLOW, DENY or AUDIT"),
            ));
        }
    };
    let selector = spec
        .selector
        .as_ref()
        .map(|s| s.match_labels.clone())
        .filter(|l| !l.is_empty());
    let mut rules = Vec::new();
    for (i, rule) in spec.rules.iter().enumerate() {
        let at = format!("spec.rules[{i}]");
        if rule.from.is_empty() && rule.to.is_empty() && rule.when.is_empty() {
            return Err(FieldError::new(
                at,
                "an empty rule matches every request; say what it should match \
                 (e.g. from: [{source: {namespaces: [\"*\"]}}] for any mesh workload)",
            ));
        }
        let mut from = Vec::new();
        for (j, f) in rule.from.iter().enumerate() {
            from.push(source(&f.source, &format!("{at}.from[{j}].source"))?);
        }
        let mut to = Vec::new();
        for (j, t) in rule.to.iter().enumerate() {
            to.push(operation(&t.operation, &format!("{at}.to[{j}].operation"))?);
        }
        let mut when = Vec::new();
        for (j, c) in rule.when.iter().enumerate() {
            let at = format!("{at}.when[{j}]");
            let header = c
                .key
                .strip_prefix("request.headers[")
                .and_then(|k| k.strip_suffix(']'))
                .ok_or_else(|| {
                    FieldError::new(
                        format!("{at}.key"),
                        format!("{:?} is not supported: use request.headers[<name>]", c.key),
                    )
                })?;
            if !is_header_name(header) {
                return Err(FieldError::new(
                    format!("{at}.key"),
                    format!(
                        "{header:?} is not an HTTP header name (letters, digits and \
                         !#$%&'*+-.^_`|~, or a pseudo-header such as :authority)"
                    ),
                ));
            }
            if c.values.is_empty() && c.not_values.is_empty() {
                return Err(FieldError::new(at, "needs values or notValues"));
            }
            when.push(Condition {
                header: header.to_ascii_lowercase(),
                values: patterns(&c.values),
                not_values: patterns(&c.not_values),
            });
        }
        rules.push(Rule { from, to, when });
    }
    Ok(authorization::AuthorizationPolicy {
        key,
        selector,
        action,
        rules,
    })
}

/// A header name a request can carry: an RFC 9110 token, or one after `:` (HTTP/2
/// pseudo-headers). Anything else could never match, and Envoy refuses some of it
/// (NUL, CR, LF) outright.
fn is_header_name(name: &str) -> bool {
    let token = name.strip_prefix(':').unwrap_or(name);
    !token.is_empty()
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn patterns(v: &[String]) -> Vec<StringMatch> {
    v.iter().map(|s| StringMatch::parse(s)).collect()
}

fn source(s: &SourceSpec, at: &str) -> Result<Source, FieldError> {
    let principals = |list: &[String], field: &str| {
        list.iter()
            .enumerate()
            .map(|(k, p)| {
                principal(p).map_err(|m| FieldError::new(format!("{at}.{field}[{k}]"), m))
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let cidrs = |list: &[String], field: &str| {
        list.iter()
            .enumerate()
            .map(|(k, c)| cidr(c).map_err(|m| FieldError::new(format!("{at}.{field}[{k}]"), m)))
            .collect::<Result<Vec<_>, _>>()
    };
    let out = Source {
        principals: principals(&s.principals, "principals")?,
        not_principals: principals(&s.not_principals, "notPrincipals")?,
        namespaces: patterns(&s.namespaces),
        not_namespaces: patterns(&s.not_namespaces),
        ip_blocks: cidrs(&s.ip_blocks, "ipBlocks")?,
        not_ip_blocks: cidrs(&s.not_ip_blocks, "notIpBlocks")?,
    };
    if out == Source::default() {
        return Err(FieldError::new(
            at,
            "an empty source matches every caller; list what it should match",
        ));
    }
    Ok(out)
}

/// A principal pattern: a SPIFFE id (`spiffe://td/ns/x/sa/y`, or Istio's form without
/// the scheme), optionally `prefix*`/`*suffix`, or `*`.
fn principal(p: &str) -> Result<StringMatch, String> {
    if p == "*" {
        return Ok(StringMatch::Any);
    }
    let full = if p.starts_with("spiffe://") || p.starts_with('*') {
        p.to_string()
    } else {
        format!("spiffe://{p}")
    };
    let pattern = StringMatch::parse(&full);
    // The message shows what was written, not the `spiffe://` form meshd made of it.
    let not_a_pattern = |why: &str| {
        format!(
            "{p:?} is not a SPIFFE id pattern ([spiffe://]<trust-domain>/ns/<namespace>/sa/<service-account>, \
             prefix* or *suffix): {why}"
        )
    };
    // Check the fixed part against the SPIFFE form where it is complete.
    if let StringMatch::Exact(id) = &pattern {
        id.parse::<meshd_ca::SpiffeId>()
            .map_err(|e| not_a_pattern(e.reason()))?;
    } else if let StringMatch::Prefix(pre) = &pattern
        && !pre.starts_with("spiffe://")
    {
        return Err(not_a_pattern("a prefix must start with spiffe://"));
    }
    Ok(pattern)
}

fn cidr(c: &str) -> Result<Cidr, String> {
    let bad = || format!("{c:?} is not an IP address or CIDR block");
    let (addr, len) = match c.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (c, None),
    };
    let address: IpAddr = addr.parse().map_err(|_| bad())?;
    let max = if address.is_ipv4() { 32 } else { 128 };
    let prefix_len = match len {
        None => max,
        Some(l) => l.parse::<u8>().ok().filter(|l| *l <= max).ok_or_else(bad)?,
    };
    Ok(Cidr {
        address,
        prefix_len,
    })
}

fn operation(o: &OperationSpec, at: &str) -> Result<Operation, FieldError> {
    let ports = |list: &[String], field: &str| {
        list.iter()
            .enumerate()
            .map(|(k, p)| {
                p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| {
                    FieldError::new(
                        format!("{at}.{field}[{k}]"),
                        format!("{p:?} is not a port number (1-65535)"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let out = Operation {
        ports: ports(&o.ports, "ports")?,
        not_ports: ports(&o.not_ports, "notPorts")?,
        methods: patterns(&o.methods),
        not_methods: patterns(&o.not_methods),
        paths: patterns(&o.paths),
        not_paths: patterns(&o.not_paths),
        hosts: patterns(&o.hosts),
        not_hosts: patterns(&o.not_hosts),
    };
    if out == Operation::default() {
        return Err(FieldError::new(
            at,
            "an empty operation matches every request; list what it should match",
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The chart installs the CRDs generated from these types (its templates/crds.yaml
    /// reads files/crds.yaml); they must not drift.
    #[test]
    fn the_charts_crds_match_the_rust_types() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../charts/meshd/files/crds.yaml");
        let chart = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            chart == crds_yaml(),
            "{} differs from the Rust types; regenerate it with\n  \
             cargo run -p meshd --bin meshctl -- crds > charts/meshd/files/crds.yaml",
            path.display()
        );
    }

    /// `storefront/web` was reported as `"spiffe://storefront/web" is not …`: a string
    /// the user never wrote.
    #[test]
    fn an_invalid_principal_is_shown_as_written() {
        for (written, why) in [
            (
                "storefront/web",
                "the path must be /ns/<namespace>/sa/<service-account>",
            ),
            (
                "spiffe://cluster.local/ns/shop",
                "the path must be /ns/<namespace>/sa/<service-account>",
            ),
        ] {
            let e = principal(written).unwrap_err();
            assert!(
                e.starts_with(&format!("{written:?} is not a SPIFFE id pattern (")),
                "{e}"
            );
            assert!(e.ends_with(why), "{e}");
            if !written.starts_with("spiffe://") {
                assert!(
                    !e.contains("spiffe://cluster") && !e.contains("spiffe://storefront"),
                    "{e}"
                );
            }
        }
        assert!(principal("storefront/ns/web/sa/api").is_ok());
    }

    #[test]
    fn crds_have_status_and_printer_columns() {
        let yaml = crds_yaml();
        for needle in [
            "name: authorizationpolicies.security.meshd.io",
            "name: peerauthentications.security.meshd.io",
            "status: {}",
            "jsonPath: .spec.action",
            "jsonPath: .status.conditions[?(@.type==\"Accepted\")].status",
        ] {
            assert!(yaml.contains(needle), "{needle} missing in:\n{yaml}");
        }
    }

    fn policy_with_header(key: &str) -> Result<authorization::AuthorizationPolicy, FieldError> {
        let mut spec = AuthorizationPolicySpec::default();
        spec.rules.push(RuleSpec {
            when: vec![ConditionSpec {
                key: key.to_string(),
                values: vec!["blue".into()],
                not_values: vec![],
            }],
            ..Default::default()
        });
        let mut p = AuthorizationPolicy::new("p", spec);
        p.metadata.namespace = Some("shop".into());
        authorization_policy(&p)
    }

    /// A header name Envoy would refuse (NUL, CR, LF), or none a request can carry,
    /// is refused here with the field named, not compiled into a route Envoy NACKs.
    #[test]
    fn when_keys_must_name_an_http_header() {
        for bad in [
            "request.headers[x\ny]",
            "request.headers[a\0b]",
            "request.headers[x y]",
            "request.headers[]",
            "request.headers[:]",
        ] {
            let e = policy_with_header(bad).unwrap_err();
            assert_eq!(e.field, "spec.rules[0].when[0].key", "{bad:?}: {e}");
        }
        let ok = policy_with_header("request.headers[X-Team]").unwrap();
        assert_eq!(ok.rules[0].when[0].header, "x-team");
        assert!(policy_with_header("request.headers[:authority]").is_ok());
    }
}
