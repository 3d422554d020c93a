//! AuthorizationPolicies → Envoy RBAC filters for one inbound port.
//!
//! Per port, in the order they run:
//! 1. one DENY filter per DENY policy (a request is denied if any of them matches);
//! 2. one ALLOW filter holding every ALLOW rule, only if some ALLOW policy selects the
//!    workload (with none, everything is allowed; with some, at least one must match);
//! 3. one filter with every AUDIT rule as shadow rules, which never enforce.
//!
//! Each rule is an Envoy policy named `<namespace>/<name>#<rule>`, so Envoy's response
//! details (and meshd's `x-meshd-denied-by` header) name the rule that denied a request.
//! Each filter has its own stat prefix ([`StagePrefix`]), so Envoy's RBAC counters say
//! how many requests each DENY policy denied and how many no ALLOW rule admitted;
//! `meshctl authz stats` reads them back from a proxy.
//!
//! Live updates: every stage of a port sits in that port's one listener resource, so a
//! policy change reaches Envoy as one LDS update that swaps all stages at once; there is
//! no moment with the new ALLOW rules but the old DENY rules. Semantics: [`crate::authz`].

use std::collections::HashMap;

use envoy_types::pb::envoy::config::core::v3::CidrRange;
use envoy_types::pb::envoy::config::rbac::v3::{
    Permission, Policy, Principal, Rbac, permission, principal, rbac,
};
use envoy_types::pb::envoy::config::route::v3::{HeaderMatcher, header_matcher};
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
use envoy_types::pb::envoy::r#type::matcher::v3::{
    PathMatcher, StringMatcher, path_matcher, string_matcher,
};
use envoy_types::pb::google::protobuf::UInt32Value;

use crate::authz::{Action, AuthorizationPolicy, Cidr, Operation, Rule, Source, StringMatch};
use crate::model::Workload;
use crate::model::snapshot::{InboundPort, MeshSnapshot};

/// The RBAC stages of one inbound port, in the order they run.
#[derive(Debug, Default, Clone)]
pub struct PortRbac {
    pub deny: Vec<Stage>,
    pub allow: Option<Stage>,
    pub audit: Option<Stage>,
}

/// One RBAC filter: its rules and the prefix of its stats.
#[derive(Debug, Clone)]
pub struct Stage {
    pub prefix: StagePrefix,
    pub rbac: Rbac,
}

/// Which stage a filter is, as written into its stat names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StagePrefix {
    /// `deny[<namespace>/<name>].`: the DENY policy `namespace/name`.
    Deny(String),
    /// `allow.`: every ALLOW rule of the workload.
    Allow,
    /// `audit_` (a shadow prefix).
    Audit,
}

impl StagePrefix {
    pub fn as_stat(&self) -> String {
        match self {
            StagePrefix::Deny(policy) => format!("deny[{policy}]."),
            StagePrefix::Allow => "allow.".to_string(),
            StagePrefix::Audit => "audit_".to_string(),
        }
    }
}

/// The RBAC of `workload`'s inbound port `inbound`, exactly as its listener carries it.
pub fn inbound_rbac(mesh: &MeshSnapshot, workload: &Workload, inbound: &InboundPort) -> PortRbac {
    let policies = mesh.authorization_policies_for(workload);
    compile(&policies, inbound.protocol.is_http())
}

/// Compiles the policies that select a workload for one of its ports.
pub fn compile(policies: &[&AuthorizationPolicy], http: bool) -> PortRbac {
    let rbac = |action: Action, selected: &[&&AuthorizationPolicy]| {
        let mut rules = HashMap::new();
        for p in selected {
            for (i, rule) in p.rules.iter().enumerate() {
                if let Some(policy) = compile_rule(rule, action, http) {
                    rules.insert(p.rule_id(i), policy);
                }
            }
        }
        Rbac {
            action: match action {
                Action::Deny => rbac::Action::Deny,
                Action::Allow => rbac::Action::Allow,
                Action::Audit => rbac::Action::Log,
            } as i32,
            policies: rules,
            ..Default::default()
        }
    };
    let of = |action: Action| -> Vec<&&AuthorizationPolicy> {
        policies.iter().filter(|p| p.action == action).collect()
    };
    let stage = |action: Action, prefix: StagePrefix| {
        let selected = of(action);
        (!selected.is_empty()).then(|| Stage {
            prefix,
            rbac: rbac(action, &selected),
        })
    };
    // In the order the policies come (by namespace and name), so the first denial
    // reported is predictable.
    let deny = of(Action::Deny)
        .into_iter()
        .map(|p| Stage {
            prefix: StagePrefix::Deny(format!("{}/{}", p.key.namespace, p.key.name)),
            rbac: rbac(Action::Deny, &[p]),
        })
        .collect();
    PortRbac {
        deny,
        allow: stage(Action::Allow, StagePrefix::Allow),
        audit: stage(Action::Audit, StagePrefix::Audit),
    }
}

impl PortRbac {
    /// The enforcing stages, DENY filters first.
    pub fn enforcing(&self) -> impl Iterator<Item = &Stage> {
        self.deny.iter().chain(&self.allow)
    }

    /// The HTTP filters (before the router).
    pub fn http_filters(&self) -> Vec<HttpRbac> {
        let mut out: Vec<HttpRbac> = self
            .enforcing()
            .map(|s| HttpRbac {
                rules: Some(s.rbac.clone()),
                rules_stat_prefix: s.prefix.as_stat(),
                ..Default::default()
            })
            .collect();
        if let Some(audit) = &self.audit {
            out.push(HttpRbac {
                shadow_rules: Some(audit.rbac.clone()),
                shadow_rules_stat_prefix: audit.prefix.as_stat(),
                ..Default::default()
            });
        }
        out
    }

    /// The network filters (before the TCP proxy) of the listener `listener`.
    pub fn network_filters(&self, listener: &str) -> Vec<NetworkRbac> {
        let mut out: Vec<NetworkRbac> = self
            .enforcing()
            .map(|s| NetworkRbac {
                rules: Some(s.rbac.clone()),
                // Network RBAC stats live under `<stat_prefix>.rbac.`.
                stat_prefix: format!("{listener}.{}", s.prefix.as_stat()),
                ..Default::default()
            })
            .collect();
        if let Some(audit) = &self.audit {
            out.push(NetworkRbac {
                shadow_rules: Some(audit.rbac.clone()),
                shadow_rules_stat_prefix: audit.prefix.as_stat(),
                stat_prefix: format!("{listener}."),
                ..Default::default()
            });
        }
        out
    }
}

/// One rule as an Envoy policy, or `None` if it can never match here (an ALLOW rule
/// that needs HTTP, on a TCP port).
fn compile_rule(rule: &Rule, action: Action, http: bool) -> Option<Policy> {
    if !http && action == Action::Allow && rule.uses_http_fields() {
        return None;
    }
    // On TCP a DENY (or AUDIT) rule keeps only what TCP can check: it denies more.
    let mut perms = Vec::new();
    if !rule.to.is_empty() {
        perms.push(or_rules(
            rule.to.iter().map(|o| operation(o, http)).collect(),
        ));
    }
    if http {
        for c in &rule.when {
            perms.push(or_rules(
                c.values.iter().map(|v| header(&c.header, v)).collect(),
            ));
            if !c.not_values.is_empty() {
                perms.push(not_rule(or_rules(
                    c.not_values.iter().map(|v| header(&c.header, v)).collect(),
                )));
            }
        }
    }
    let principal = if rule.from.is_empty() {
        any_id()
    } else {
        or_ids(rule.from.iter().map(source).collect())
    };
    Some(Policy {
        permissions: vec![and_rules(perms)],
        principals: vec![principal],
        ..Default::default()
    })
}

fn operation(o: &Operation, http: bool) -> Permission {
    let mut all = Vec::new();
    let port = |p: &u16| Permission {
        rule: Some(permission::Rule::DestinationPort(u32::from(*p))),
    };
    push_either(&mut all, o.ports.iter().map(port).collect(), false);
    push_either(&mut all, o.not_ports.iter().map(port).collect(), true);
    if http {
        let method = |m: &StringMatch| header(":method", m);
        let path = |p: &StringMatch| Permission {
            rule: Some(permission::Rule::UrlPath(PathMatcher {
                rule: Some(path_matcher::Rule::Path(string_matcher(p, false))),
            })),
        };
        let host = |h: &StringMatch| header_ci(":authority", h);
        push_either(&mut all, o.methods.iter().map(method).collect(), false);
        push_either(&mut all, o.not_methods.iter().map(method).collect(), true);
        push_either(&mut all, o.paths.iter().map(path).collect(), false);
        push_either(&mut all, o.not_paths.iter().map(path).collect(), true);
        push_either(&mut all, o.hosts.iter().map(host).collect(), false);
        push_either(&mut all, o.not_hosts.iter().map(host).collect(), true);
    }
    and_rules(all)
}

/// Adds `any of list` (or `none of list` when `negate`) if the list is not empty.
fn push_either(all: &mut Vec<Permission>, list: Vec<Permission>, negate: bool) {
    if list.is_empty() {
        return;
    }
    let any = or_rules(list);
    all.push(if negate { not_rule(any) } else { any });
}

fn source(s: &Source) -> Principal {
    let mut all = Vec::new();
    let mut either = |list: Vec<Principal>, negate: bool| {
        if list.is_empty() {
            return;
        }
        let any = or_ids(list);
        all.push(if negate {
            Principal {
                identifier: Some(principal::Identifier::NotId(Box::new(any))),
            }
        } else {
            any
        });
    };
    either(s.principals.iter().map(peer).collect(), false);
    either(s.not_principals.iter().map(peer).collect(), true);
    either(s.namespaces.iter().map(namespace).collect(), false);
    either(s.not_namespaces.iter().map(namespace).collect(), true);
    either(s.ip_blocks.iter().map(ip_block).collect(), false);
    either(s.not_ip_blocks.iter().map(ip_block).collect(), true);
    match all.len() {
        0 => any_id(),
        1 => all.pop().expect("one"),
        _ => Principal {
            identifier: Some(principal::Identifier::AndIds(principal::Set { ids: all })),
        },
    }
}

/// The peer's certificate URI SAN matches `m` (a SPIFFE id pattern).
fn peer(m: &StringMatch) -> Principal {
    authenticated(string_matcher(m, false))
}

/// The peer's SPIFFE id is in a namespace matching `m`: `.../ns/<namespace>/sa/...`.
fn namespace(m: &StringMatch) -> Principal {
    let contains = |s: String| StringMatcher {
        match_pattern: Some(string_matcher::MatchPattern::Contains(s)),
        ..Default::default()
    };
    match m {
        StringMatch::Any => authenticated(contains("/ns/".into())),
        StringMatch::Exact(ns) => authenticated(contains(format!("/ns/{ns}/sa/"))),
        StringMatch::Prefix(p) => authenticated(contains(format!("/ns/{p}"))),
        StringMatch::Suffix(s) => authenticated(contains(format!("{s}/sa/"))),
    }
}

fn authenticated(m: StringMatcher) -> Principal {
    Principal {
        identifier: Some(principal::Identifier::Authenticated(
            principal::Authenticated {
                principal_name: Some(m),
            },
        )),
    }
}

fn ip_block(c: &Cidr) -> Principal {
    Principal {
        identifier: Some(principal::Identifier::DirectRemoteIp(CidrRange {
            address_prefix: c.address.to_string(),
            prefix_len: Some(UInt32Value {
                value: u32::from(c.prefix_len),
            }),
        })),
    }
}

fn header(name: &str, m: &StringMatch) -> Permission {
    header_matcher(name, m, false)
}

fn header_ci(name: &str, m: &StringMatch) -> Permission {
    header_matcher(name, m, true)
}

fn header_matcher(name: &str, m: &StringMatch, ignore_case: bool) -> Permission {
    let specifier = match m {
        StringMatch::Any => header_matcher::HeaderMatchSpecifier::PresentMatch(true),
        _ => header_matcher::HeaderMatchSpecifier::StringMatch(string_matcher(m, ignore_case)),
    };
    Permission {
        rule: Some(permission::Rule::Header(HeaderMatcher {
            name: name.to_string(),
            header_match_specifier: Some(specifier),
            ..Default::default()
        })),
    }
}

fn string_matcher(m: &StringMatch, ignore_case: bool) -> StringMatcher {
    use string_matcher::MatchPattern;
    let pattern = match m {
        // Envoy has no "any" string matcher; an empty prefix matches every value.
        StringMatch::Any => MatchPattern::Prefix(String::new()),
        StringMatch::Exact(s) => MatchPattern::Exact(s.clone()),
        StringMatch::Prefix(s) => MatchPattern::Prefix(s.clone()),
        StringMatch::Suffix(s) => MatchPattern::Suffix(s.clone()),
    };
    StringMatcher {
        match_pattern: Some(pattern),
        ignore_case,
    }
}

fn and_rules(mut rules: Vec<Permission>) -> Permission {
    match rules.len() {
        0 => Permission {
            rule: Some(permission::Rule::Any(true)),
        },
        1 => rules.pop().expect("one"),
        _ => Permission {
            rule: Some(permission::Rule::AndRules(permission::Set { rules })),
        },
    }
}

fn or_rules(mut rules: Vec<Permission>) -> Permission {
    match rules.len() {
        1 => rules.pop().expect("one"),
        _ => Permission {
            rule: Some(permission::Rule::OrRules(permission::Set { rules })),
        },
    }
}

fn not_rule(p: Permission) -> Permission {
    Permission {
        rule: Some(permission::Rule::NotRule(Box::new(p))),
    }
}

fn or_ids(mut ids: Vec<Principal>) -> Principal {
    match ids.len() {
        1 => ids.pop().expect("one"),
        _ => Principal {
            identifier: Some(principal::Identifier::OrIds(principal::Set { ids })),
        },
    }
}

fn any_id() -> Principal {
    Principal {
        identifier: Some(principal::Identifier::Any(true)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ObjectKey;

    fn policy(action: Action, op: Operation) -> AuthorizationPolicy {
        AuthorizationPolicy {
            key: ObjectKey::new("shop", "p"),
            selector: None,
            action,
            rules: vec![Rule {
                from: vec![],
                to: vec![op],
                when: vec![],
            }],
        }
    }

    fn get_admin() -> Operation {
        Operation {
            methods: vec![StringMatch::Exact("GET".into())],
            paths: vec![StringMatch::Prefix("/admin".into())],
            ..Default::default()
        }
    }

    #[test]
    fn http_only_rules_on_tcp_fail_closed() {
        // ALLOW that needs HTTP never matches on TCP: the policy exists but is empty,
        // so the ALLOW stage denies everything.
        let allow = policy(Action::Allow, get_admin());
        let tcp = compile(&[&allow], false);
        assert!(tcp.allow.as_ref().unwrap().rbac.policies.is_empty());
        let http = compile(&[&allow], true);
        assert_eq!(http.allow.as_ref().unwrap().rbac.policies.len(), 1);

        // DENY that uses HTTP fields still denies on TCP, without them: any request.
        let deny = policy(Action::Deny, get_admin());
        let tcp = compile(&[&deny], false);
        let rule = &tcp.deny[0].rbac.policies["shop/p#0"];
        assert_eq!(
            rule.permissions[0].rule,
            Some(permission::Rule::Any(true)),
            "{rule:?}"
        );
        assert!(tcp.allow.is_none(), "no ALLOW policy, no ALLOW stage");
    }

    #[test]
    fn audit_rules_never_enforce() {
        let audit = policy(Action::Audit, get_admin());
        let c = compile(&[&audit], true);
        let filters = c.http_filters();
        assert_eq!(filters.len(), 1);
        assert!(filters[0].rules.is_none() && filters[0].shadow_rules.is_some());
    }
}
