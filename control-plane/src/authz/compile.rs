//! AuthorizationPolicies → Envoy RBAC filters for one inbound port.
//!
//! Three stages per port, in the order they run:
//! 1. AUDIT: every AUDIT rule as shadow rules, which never enforce. It runs first so
//!    that it sees every request, allowed or denied (Istio's AUDIT does too): a denial
//!    ends the filter chain, and an AUDIT stage after it would never see the denied;
//! 2. DENY: every DENY rule; a request that matches one is denied;
//! 3. ALLOW: every ALLOW rule, only if some ALLOW policy selects the workload (with
//!    none, everything is allowed; with some, at least one rule must match).
//!
//! Each rule is an Envoy policy named `<namespace>/<name>#<rule>`, so Envoy's response
//! details (and meshd's `x-meshd-denied-by` header, and the access log) name the rule
//! that denied a request. Envoy counts per rule (HTTP: `track_per_rule_stats`) what
//! was denied, allowed and audited; network RBAC has no per-rule counters, so on TCP
//! each DENY policy and each AUDIT rule is a network filter of its own. Per port it
//! counts what no ALLOW rule admitted; `meshctl authz stats` reads it back
//! ([`rbac_stats`](super::stats)).
//!
//! **Live updates.** On HTTP ports the three stages are HTTP filters in the listener
//! whose real configs live in the port's inbound route configuration (RDS, named like
//! the listener), as per-route overrides ([`RbacPerRoute`]) of all three filters on the
//! one route. Two properties follow:
//! - a change applies to the next request, even on connections opened before it: the
//!   connection manager takes the latest route configuration for every request, while
//!   a listener update would leave old connections on the old filter chain until they
//!   drain (minutes);
//! - the three stages change together: Envoy swaps a route configuration as one
//!   object, so no request meets the new DENY stage with the old ALLOW stage. Such a
//!   mix could allow what both versions deny (old: ALLOW only ns A; new: DENY /x and no
//!   ALLOW; mixed: neither) — which is what three separately delivered filter configs
//!   (ECDS) would have risked.
//!
//! The filters' own configs in the listener never change; they carry the stat
//! prefixes, and fail closed (the ALLOW stage admits nothing) should a route ever come
//! without its overrides.
//! On TCP ports the stages are network filters in the listener and decide once per
//! connection, when it opens. Semantics: [`crate::authz`].

use std::collections::HashMap;

use envoy_types::pb::envoy::config::core::v3::CidrRange;
use envoy_types::pb::envoy::config::rbac::v3::{
    Permission, Policy, Principal, Rbac, permission, principal, rbac,
};
use envoy_types::pb::envoy::config::route::v3::{HeaderMatcher, header_matcher};
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::{Rbac as HttpRbac, RbacPerRoute};
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
use envoy_types::pb::envoy::r#type::matcher::v3::{
    PathMatcher, StringMatcher, path_matcher, string_matcher,
};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::protobuf::UInt32Value;

use crate::model::Workload;
use crate::model::authorization::{
    Action, AuthorizationPolicy, Cidr, Operation, Rule, Source, StringMatch,
};
use crate::model::snapshot::{InboundPort, MeshSnapshot};

/// The RBAC stages of one inbound port, in the order they run.
#[derive(Debug, Default, Clone)]
pub struct PortRbac {
    pub deny: Option<Rbac>,
    pub allow: Option<Rbac>,
    pub audit: Option<Rbac>,
}

/// The stages, in the order they run: the name of each stage's HTTP filter, and its
/// stat prefix (stats: `http.<listener>.rbac.<prefix>…`).
pub const STAGES: [(&str, &str); 3] = [
    ("meshd.rbac.audit", "audit_"),
    ("meshd.rbac.deny", "deny."),
    ("meshd.rbac.allow", "allow."),
];

/// The RBAC of `workload`'s inbound port `inbound`, exactly as its sidecar gets it.
pub fn inbound_rbac(mesh: &MeshSnapshot, workload: &Workload, inbound: &InboundPort) -> PortRbac {
    let policies: Vec<&AuthorizationPolicy> = mesh
        .authorization_policies_for(workload)
        .into_iter()
        .map(|p| &**p)
        .collect();
    compile(&policies, inbound.protocol.is_http())
}

/// Compiles the policies that select a workload for one of its ports.
pub fn compile(policies: &[&AuthorizationPolicy], http: bool) -> PortRbac {
    let stage = |action: Action| {
        let selected: Vec<_> = policies.iter().filter(|p| p.action == action).collect();
        if selected.is_empty() {
            return None;
        }
        let mut rules = HashMap::new();
        for p in selected {
            for (i, rule) in p.rules.iter().enumerate() {
                if let Some(policy) = compile_rule(rule, action, http) {
                    rules.insert(p.rule_id(i), policy);
                }
            }
        }
        Some(Rbac {
            action: match action {
                Action::Deny => rbac::Action::Deny,
                Action::Allow => rbac::Action::Allow,
                Action::Audit => rbac::Action::Log,
            } as i32,
            policies: rules,
            ..Default::default()
        })
    };
    PortRbac {
        deny: stage(Action::Deny),
        allow: stage(Action::Allow),
        audit: stage(Action::Audit),
    }
}

impl PortRbac {
    /// The three HTTP filters of an inbound HTTP port, in [`STAGES`] order. They are
    /// the same for every port and every policy version: what they enforce comes from
    /// the route ([`Self::per_route_configs`]). Without a route override, DENY and AUDIT
    /// pass everything and ALLOW admits nothing.
    pub fn http_filters() -> [(&'static str, HttpRbac); 3] {
        let [audit, deny, allow] = STAGES;
        [
            (audit.0, Self::http_stage(audit.1, None, None)),
            (deny.0, Self::http_stage(deny.1, None, None)),
            (
                allow.0,
                Self::http_stage(
                    allow.1,
                    Some(Rbac {
                        action: rbac::Action::Allow as i32,
                        ..Default::default()
                    }),
                    None,
                ),
            ),
        ]
    }

    /// This port's stages as route overrides of the filters of [`Self::http_filters`],
    /// by filter name: one route carries all three, so they change together. A stage
    /// without policies passes everything (an RBAC filter without rules does nothing).
    pub fn per_route_configs(&self) -> HashMap<String, Any> {
        let [audit, deny, allow] = STAGES;
        let stages = [
            (audit, Self::http_stage(audit.1, None, self.audit.clone())),
            (deny, Self::http_stage(deny.1, self.deny.clone(), None)),
            (allow, Self::http_stage(allow.1, self.allow.clone(), None)),
        ];
        stages
            .into_iter()
            .map(|((name, _), rbac)| {
                let per_route = RbacPerRoute { rbac: Some(rbac) };
                (
                    name.to_string(),
                    crate::xds::translate::resources::any(&per_route),
                )
            })
            .collect()
    }

    /// One HTTP stage: enforced `rules` or `shadow` rules, counted per rule under
    /// `prefix`.
    fn http_stage(prefix: &str, rules: Option<Rbac>, shadow: Option<Rbac>) -> HttpRbac {
        HttpRbac {
            rules,
            rules_stat_prefix: prefix.to_string(),
            shadow_rules: shadow,
            shadow_rules_stat_prefix: prefix.to_string(),
            track_per_rule_stats: true,
            ..Default::default()
        }
    }

    /// The network filters (before the TCP proxy) of the listener `listener`, AUDIT
    /// first. Network RBAC has no per-rule counters, so
    /// - each AUDIT rule gets a filter of its own, whose shadow rules (action DENY: a
    ///   match is counted as `shadow_denied`, and never enforced) count its matches in
    ///   `<listener>.audit.<ns>/<name>#<i>.rbac.audit_.shadow_denied`. They run in
    ///   reverse name order: each match writes the connection's
    ///   `audit_shadow_effective_policy_id`, so the access log names the first
    ///   matching rule by name, as the one HTTP stage does;
    /// - each DENY policy gets a filter of its own: its `denied` counter
    ///   (`<listener>.deny.<ns>/<name>.rbac.denied`) is the policy's.
    pub fn network_filters(&self, listener: &str) -> Vec<NetworkRbac> {
        let mut out = Vec::new();
        if let Some(audit) = &self.audit {
            let mut rules: Vec<_> = audit.policies.iter().collect();
            rules.sort_by(|a, b| b.0.cmp(a.0));
            for (rule_id, rule) in rules {
                out.push(NetworkRbac {
                    shadow_rules: Some(Rbac {
                        action: rbac::Action::Deny as i32,
                        policies: [(rule_id.clone(), rule.clone())].into(),
                        ..Default::default()
                    }),
                    shadow_rules_stat_prefix: STAGES[0].1.to_string(),
                    stat_prefix: format!("{listener}.audit.{rule_id}."),
                    ..Default::default()
                });
            }
        }
        if let Some(deny) = &self.deny {
            let mut by_policy: std::collections::BTreeMap<&str, Rbac> = Default::default();
            for (rule_id, rule) in &deny.policies {
                let policy = rule_id.split_once('#').map_or(rule_id.as_str(), |(p, _)| p);
                by_policy
                    .entry(policy)
                    .or_insert_with(|| Rbac {
                        action: deny.action,
                        ..Default::default()
                    })
                    .policies
                    .insert(rule_id.clone(), rule.clone());
            }
            for (policy, rules) in by_policy {
                out.push(NetworkRbac {
                    rules: Some(rules),
                    // Network RBAC stats live under `<stat_prefix>.rbac.`.
                    stat_prefix: format!("{listener}.deny.{policy}."),
                    ..Default::default()
                });
            }
        }
        if let Some(allow) = &self.allow {
            out.push(NetworkRbac {
                rules: Some(allow.clone()),
                stat_prefix: format!("{listener}.allow."),
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
        // A condition may have only `values`, only `notValues`, or both; each list
        // present adds one part (an empty `or_rules` would be NACKed by Envoy).
        for c in &rule.when {
            let headers =
                |list: &[StringMatch]| list.iter().map(|v| header(&c.header, v)).collect();
            push_either(&mut perms, headers(&c.values), false);
            push_either(&mut perms, headers(&c.not_values), true);
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
        // Every HTTP request has a path: `*` is any request.
        let path = |p: &StringMatch| match string_matcher(p, false) {
            None => Permission {
                rule: Some(permission::Rule::Any(true)),
            },
            Some(m) => Permission {
                rule: Some(permission::Rule::UrlPath(PathMatcher {
                    rule: Some(path_matcher::Rule::Path(m)),
                })),
            },
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

/// The peer's certificate URI SAN matches `m` (a SPIFFE id pattern); `*` is any peer
/// with a certificate.
fn peer(m: &StringMatch) -> Principal {
    authenticated(string_matcher(m, false))
}

/// The peer's SPIFFE id is in a namespace matching `m`: `.../ns/<namespace>/sa/...`.
fn namespace(m: &StringMatch) -> Principal {
    let contains = |s: String| {
        Some(StringMatcher {
            match_pattern: Some(string_matcher::MatchPattern::Contains(s)),
            ..Default::default()
        })
    };
    match m {
        StringMatch::Any => authenticated(contains("/ns/".into())),
        StringMatch::Exact(ns) => authenticated(contains(format!("/ns/{ns}/sa/"))),
        StringMatch::Prefix(p) => authenticated(contains(format!("/ns/{p}"))),
        StringMatch::Suffix(s) => authenticated(contains(format!("{s}/sa/"))),
    }
}

/// A peer with a certificate whose URI SAN matches `m` (any, if `None`).
fn authenticated(m: Option<StringMatcher>) -> Principal {
    Principal {
        identifier: Some(principal::Identifier::Authenticated(
            principal::Authenticated { principal_name: m },
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
    // `*`: the header is there, with any value.
    let specifier = match string_matcher(m, ignore_case) {
        None => header_matcher::HeaderMatchSpecifier::PresentMatch(true),
        Some(sm) => header_matcher::HeaderMatchSpecifier::StringMatch(sm),
    };
    Permission {
        rule: Some(permission::Rule::Header(HeaderMatcher {
            name: name.to_string(),
            header_match_specifier: Some(specifier),
            ..Default::default()
        })),
    }
}

/// `m` as an Envoy string matcher; `None` for `*`, which Envoy cannot say as one (an
/// empty prefix is refused): each caller writes "anything" its own way.
fn string_matcher(m: &StringMatch, ignore_case: bool) -> Option<StringMatcher> {
    use string_matcher::MatchPattern;
    let pattern = match m {
        StringMatch::Any => return None,
        StringMatch::Exact(s) => MatchPattern::Exact(s.clone()),
        StringMatch::Prefix(s) => MatchPattern::Prefix(s.clone()),
        StringMatch::Suffix(s) => MatchPattern::Suffix(s.clone()),
    };
    Some(StringMatcher {
        match_pattern: Some(pattern),
        ignore_case,
    })
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

/// Any of `rules`. Envoy refuses an empty `or_rules`, so "any of none" is written as
/// what it means: nothing matches.
fn or_rules(mut rules: Vec<Permission>) -> Permission {
    match rules.len() {
        0 => not_rule(Permission {
            rule: Some(permission::Rule::Any(true)),
        }),
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

/// Any of `ids`; "any of none" matches nobody (as [`or_rules`]).
fn or_ids(mut ids: Vec<Principal>) -> Principal {
    match ids.len() {
        0 => Principal {
            identifier: Some(principal::Identifier::NotId(Box::new(any_id()))),
        },
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
        assert!(tcp.allow.as_ref().unwrap().policies.is_empty());
        let http = compile(&[&allow], true);
        assert_eq!(http.allow.as_ref().unwrap().policies.len(), 1);

        // DENY that uses HTTP fields still denies on TCP, without them: any request.
        let deny = policy(Action::Deny, get_admin());
        let tcp = compile(&[&deny], false);
        let rule = &tcp.deny.as_ref().unwrap().policies["shop/p#0"];
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
        let configs = c.per_route_configs();
        let decoded = |name: &str| {
            use prost::Message;
            let any = &configs[name];
            RbacPerRoute::decode(any.value.as_slice())
                .unwrap()
                .rbac
                .unwrap()
        };
        // DENY and ALLOW pass everything; AUDIT only has shadow rules.
        assert!(decoded("meshd.rbac.deny").rules.is_none());
        assert!(decoded("meshd.rbac.allow").rules.is_none());
        let audit = decoded("meshd.rbac.audit");
        assert!(audit.rules.is_none() && audit.shadow_rules.is_some());
        assert_eq!(audit.shadow_rules_stat_prefix, "audit_");
    }

    #[test]
    fn without_route_overrides_the_allow_stage_admits_nothing() {
        let [audit, deny, allow] = PortRbac::http_filters();
        assert!(deny.1.rules.is_none() && audit.1.rules.is_none());
        let allow = allow.1.rules.expect("fail closed");
        assert_eq!(allow.action, rbac::Action::Allow as i32);
        assert!(allow.policies.is_empty());
    }

    /// What Envoy's validation refuses in RBAC, as far as meshd's output goes: empty
    /// `and_rules`/`or_rules`/`and_ids`/`or_ids`, and empty `prefix`, `suffix` or
    /// `contains` matchers (the property test in `integration/tests/envoy_validate.rs`
    /// has a real Envoy check everything).
    fn assert_envoy_accepts(rbac: &Rbac) {
        use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern;
        fn sm(m: &StringMatcher) {
            match &m.match_pattern {
                Some(
                    MatchPattern::Prefix(s) | MatchPattern::Suffix(s) | MatchPattern::Contains(s),
                ) => {
                    assert!(!s.is_empty(), "empty matcher {m:?}")
                }
                Some(MatchPattern::Exact(_)) => {}
                other => panic!("unexpected matcher {other:?}"),
            }
        }
        fn perm(p: &Permission) {
            match p.rule.as_ref().expect("a rule") {
                permission::Rule::AndRules(set) | permission::Rule::OrRules(set) => {
                    assert!(!set.rules.is_empty(), "empty set");
                    set.rules.iter().for_each(perm);
                }
                permission::Rule::NotRule(p) => perm(p),
                permission::Rule::Header(h) => {
                    if let Some(header_matcher::HeaderMatchSpecifier::StringMatch(m)) =
                        &h.header_match_specifier
                    {
                        sm(m)
                    }
                }
                permission::Rule::UrlPath(p) => match &p.rule {
                    Some(path_matcher::Rule::Path(m)) => sm(m),
                    other => panic!("{other:?}"),
                },
                _ => {}
            }
        }
        fn id(p: &Principal) {
            match p.identifier.as_ref().expect("an identifier") {
                principal::Identifier::AndIds(set) | principal::Identifier::OrIds(set) => {
                    assert!(!set.ids.is_empty(), "empty set");
                    set.ids.iter().for_each(id);
                }
                principal::Identifier::NotId(p) => id(p),
                principal::Identifier::Authenticated(a) => {
                    if let Some(m) = &a.principal_name {
                        sm(m)
                    }
                }
                _ => {}
            }
        }
        for policy in rbac.policies.values() {
            policy.permissions.iter().for_each(perm);
            policy.principals.iter().for_each(id);
        }
    }

    /// `*` in every field that takes a pattern, plus a `when` with only `notValues`:
    /// nothing Envoy refuses (an empty prefix was, for `principals: ["*"]`).
    #[test]
    fn wildcards_and_not_values_compile_to_rbac_envoy_accepts() {
        let any = vec![StringMatch::Any];
        let rule = Rule {
            from: vec![Source {
                principals: any.clone(),
                not_principals: any.clone(),
                namespaces: any.clone(),
                not_namespaces: any.clone(),
                ..Default::default()
            }],
            to: vec![Operation {
                methods: any.clone(),
                not_methods: any.clone(),
                paths: any.clone(),
                not_paths: any.clone(),
                hosts: any.clone(),
                not_hosts: any.clone(),
                ..Default::default()
            }],
            when: vec![
                crate::model::authorization::Condition {
                    header: "x-a".into(),
                    values: any.clone(),
                    not_values: any.clone(),
                },
                crate::model::authorization::Condition {
                    header: "x-b".into(),
                    values: vec![],
                    not_values: vec![StringMatch::Prefix("us-".into())],
                },
            ],
        };
        for action in [Action::Allow, Action::Deny, Action::Audit] {
            let mut p = policy(action, Operation::default());
            p.rules = vec![rule.clone()];
            for http in [true, false] {
                let c = compile(&[&p], http);
                for stage in [&c.deny, &c.allow, &c.audit].into_iter().flatten() {
                    assert_envoy_accepts(stage);
                }
            }
        }
    }

    /// AUDIT runs first on HTTP and TCP ports, so it sees the requests DENY and ALLOW
    /// refuse; on TCP each AUDIT rule is a filter of its own (its own counter), in
    /// reverse name order (the access log names the first match).
    #[test]
    fn audit_runs_before_deny_and_allow() {
        let [first, ..] = PortRbac::http_filters();
        assert_eq!(first.0, "meshd.rbac.audit");
        let mut audit = policy(Action::Audit, get_admin());
        audit.rules.push(Rule {
            from: vec![Source {
                namespaces: vec![StringMatch::Exact("edge".into())],
                ..Default::default()
            }],
            ..Default::default()
        });
        let deny = policy(Action::Deny, get_admin());
        let filters = compile(&[&deny, &audit], false).network_filters("l");
        let prefixes: Vec<&str> = filters.iter().map(|f| f.stat_prefix.as_str()).collect();
        assert_eq!(
            prefixes,
            ["l.audit.shop/p#1.", "l.audit.shop/p#0.", "l.deny.shop/p."]
        );
        let shadow = filters[0].shadow_rules.as_ref().unwrap();
        assert!(filters[0].rules.is_none() && shadow.action == rbac::Action::Deny as i32);
    }
}
