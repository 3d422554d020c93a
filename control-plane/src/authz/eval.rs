//! Evaluates compiled RBAC ([`PortRbac`]) for one request the way Envoy does.
//!
//! `meshctl authz check` answers from this, so its prediction comes from the very
//! protos the sidecar enforces, not from a second reading of the policies. It covers
//! exactly the RBAC matchers [`rbac`](super::compile) emits; anything else never matches
//! and is reported in [`Verdict::notes`].
//!
//! Envoy's rules, mirrored here: a policy matches when any of its permissions and any
//! of its principals match; an enforcing filter with action DENY denies when some
//! policy matches, one with ALLOW denies when none does; filters run in order and the
//! first denial wins, naming the first matching policy in name order (or `none`). The
//! AUDIT stage runs before them, so every request, allowed or denied, gets its AUDIT
//! matches.
//! `Authenticated` matches the peer certificate's URI SAN (no certificate: no match);
//! `url_path` ignores the query; a header with several values matches joined by `,`.

use std::net::IpAddr;

use envoy_types::pb::envoy::config::rbac::v3::{
    Permission, Principal, Rbac, permission, principal,
};
use envoy_types::pb::envoy::config::route::v3::{HeaderMatcher, header_matcher};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, path_matcher, string_matcher};

use super::compile::PortRbac;

/// What Envoy knows about a request when its RBAC filters run.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// The caller's SPIFFE id from its certificate; `None` for plaintext.
    pub principal: Option<String>,
    /// The caller's address; `None` if unknown (then IP blocks never match).
    pub source_ip: Option<IpAddr>,
    /// The inbound port (the workload's target port).
    pub port: u16,
    /// HTTP attributes; ignored on TCP ports.
    pub http: Option<HttpRequest>,
}

#[derive(Debug, Clone, Default)]
pub struct HttpRequest {
    pub method: String,
    /// The path, query included.
    pub path: String,
    /// The `:authority` (Host).
    pub host: String,
    /// Other request headers; names are matched case-insensitively.
    pub headers: Vec<(String, String)>,
}

/// The outcome of every RBAC stage of a port for one request.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Verdict {
    pub allowed: bool,
    /// The rule that denied (`<ns>/<name>#<i>`), or `none` when no ALLOW rule matched.
    pub denied_by: Option<String>,
    /// Envoy's response (or connection termination) details for a denial:
    /// `rbac_access_denied_matched_policy[<rule>]`, as in `x-meshd-denied-by`.
    pub details: Option<String>,
    /// The AUDIT rules that matched (logged, never enforced).
    pub audit: Vec<String>,
    /// Anything the evaluation could not know, e.g. a source IP it was not given.
    pub notes: Vec<String>,
}

impl PortRbac {
    /// Evaluates `request` against every stage of this port, in Envoy's order.
    pub fn evaluate(&self, request: &Request) -> Verdict {
        let mut eval = Eval {
            request,
            notes: Vec::new(),
        };
        let mut denied_by = None;
        let stages = [(&self.deny, false), (&self.allow, true)];
        for (rbac, is_allow) in stages {
            let Some(rbac) = rbac else { continue };
            let matched = eval.first_match(rbac);
            if matched.is_some() != is_allow {
                denied_by = Some(matched.unwrap_or_else(|| "none".to_string()));
                break;
            }
        }
        let audit = self
            .audit
            .as_ref()
            .map(|a| eval.all_matches(a))
            .unwrap_or_default();
        eval.notes.sort();
        eval.notes.dedup();
        Verdict {
            allowed: denied_by.is_none(),
            details: denied_by
                .as_ref()
                .map(|r| format!("rbac_access_denied_matched_policy[{r}]")),
            denied_by,
            audit,
            notes: eval.notes,
        }
    }
}

struct Eval<'a> {
    request: &'a Request,
    notes: Vec<String>,
}

impl Eval<'_> {
    /// The first policy (in name order, as Envoy keeps them) that matches.
    fn first_match(&mut self, rbac: &Rbac) -> Option<String> {
        self.all_matches(rbac).into_iter().next()
    }

    fn all_matches(&mut self, rbac: &Rbac) -> Vec<String> {
        let mut names: Vec<&String> = rbac.policies.keys().collect();
        names.sort();
        names
            .into_iter()
            .filter(|name| {
                let p = &rbac.policies[*name];
                p.permissions.iter().any(|perm| self.permission(perm))
                    && p.principals.iter().any(|id| self.principal(id))
            })
            .cloned()
            .collect()
    }

    fn permission(&mut self, p: &Permission) -> bool {
        use permission::Rule;
        match &p.rule {
            Some(Rule::Any(any)) => *any,
            Some(Rule::AndRules(set)) => set.rules.iter().all(|r| self.permission(r)),
            Some(Rule::OrRules(set)) => set.rules.iter().any(|r| self.permission(r)),
            Some(Rule::NotRule(r)) => !self.permission(r),
            Some(Rule::DestinationPort(port)) => u32::from(self.request.port) == *port,
            Some(Rule::Header(h)) => self.header(h),
            Some(Rule::UrlPath(m)) => match (&self.request.http, &m.rule) {
                (Some(http), Some(path_matcher::Rule::Path(sm))) => {
                    let path = http.path.split_once('?').map_or(&*http.path, |(p, _)| p);
                    string_matches(sm, path)
                }
                _ => false,
            },
            other => {
                self.notes
                    .push(format!("unsupported permission {other:?} never matches"));
                false
            }
        }
    }

    fn principal(&mut self, p: &Principal) -> bool {
        use principal::Identifier;
        match &p.identifier {
            Some(Identifier::Any(any)) => *any,
            Some(Identifier::AndIds(set)) => set.ids.iter().all(|i| self.principal(i)),
            Some(Identifier::OrIds(set)) => set.ids.iter().any(|i| self.principal(i)),
            Some(Identifier::NotId(i)) => !self.principal(i),
            Some(Identifier::Authenticated(auth)) => match &self.request.principal {
                None => false,
                Some(id) => auth
                    .principal_name
                    .as_ref()
                    .is_none_or(|m| string_matches(m, id)),
            },
            Some(Identifier::DirectRemoteIp(cidr)) => {
                let Some(ip) = self.request.source_ip else {
                    self.notes.push(
                        "no source IP given: rules on ipBlocks were taken as not matching"
                            .to_string(),
                    );
                    return false;
                };
                let len = cidr.prefix_len.as_ref().map_or(0, |l| l.value);
                cidr.address_prefix
                    .parse::<IpAddr>()
                    .is_ok_and(|net| in_block(ip, net, len))
            }
            other => {
                self.notes
                    .push(format!("unsupported principal {other:?} never matches"));
                false
            }
        }
    }

    fn header(&self, h: &HeaderMatcher) -> bool {
        let Some(value) = self.header_value(&h.name) else {
            return false;
        };
        let matched = match &h.header_match_specifier {
            Some(header_matcher::HeaderMatchSpecifier::PresentMatch(present)) => *present,
            Some(header_matcher::HeaderMatchSpecifier::StringMatch(sm)) => {
                string_matches(sm, &value)
            }
            _ => false,
        };
        matched != h.invert_match
    }

    /// The header as Envoy's matcher sees it: pseudo-headers from the request line,
    /// repeated headers joined by `,`.
    fn header_value(&self, name: &str) -> Option<String> {
        let http = self.request.http.as_ref()?;
        match name {
            ":method" => Some(http.method.clone()),
            ":path" => Some(http.path.clone()),
            ":authority" => Some(http.host.clone()),
            _ => {
                let values: Vec<&str> = http
                    .headers
                    .iter()
                    .filter(|(n, _)| n.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v.as_str())
                    .collect();
                (!values.is_empty()).then(|| values.join(","))
            }
        }
    }
}

fn string_matches(m: &StringMatcher, value: &str) -> bool {
    use string_matcher::MatchPattern;
    let fold = |s: &str| {
        if m.ignore_case {
            s.to_ascii_lowercase()
        } else {
            s.to_string()
        }
    };
    let v = fold(value);
    match &m.match_pattern {
        Some(MatchPattern::Exact(e)) => v == fold(e),
        Some(MatchPattern::Prefix(p)) => v.starts_with(&fold(p)),
        Some(MatchPattern::Suffix(s)) => v.ends_with(&fold(s)),
        Some(MatchPattern::Contains(c)) => v.contains(&fold(c)),
        _ => false,
    }
}

fn in_block(ip: IpAddr, net: IpAddr, len: u32) -> bool {
    match (ip, net) {
        (IpAddr::V4(ip), IpAddr::V4(net)) => {
            let mask = u32::MAX.checked_shl(32 - len.min(32)).unwrap_or(0);
            u32::from(ip) & mask == u32::from(net) & mask
        }
        (IpAddr::V6(ip), IpAddr::V6(net)) => {
            let mask = u128::MAX.checked_shl(128 - len.min(128)).unwrap_or(0);
            u128::from(ip) & mask == u128::from(net) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::compile::compile;
    use crate::model::ObjectKey;
    use crate::model::authorization::StringMatch::{Exact, Prefix, Suffix};
    use crate::model::authorization::{
        Action, AuthorizationPolicy, Cidr, Condition, Operation, Rule, Source,
    };

    fn policy(name: &str, action: Action, rule: Rule) -> AuthorizationPolicy {
        AuthorizationPolicy {
            key: ObjectKey::new("shop", name),
            selector: None,
            action,
            rules: vec![rule],
        }
    }

    fn get(principal: &str, path: &str) -> Request {
        Request {
            principal: Some(principal.to_string()),
            source_ip: Some("10.1.2.3".parse().unwrap()),
            port: 8080,
            http: Some(HttpRequest {
                method: "GET".into(),
                path: path.into(),
                host: "web.shop".into(),
                headers: vec![("X-Team".into(), "blue".into())],
            }),
        }
    }

    const CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/client";
    const OTHER: &str = "spiffe://cluster.local/ns/edge/sa/gw";

    #[test]
    fn deny_wins_then_allow_then_default() {
        let allow = policy(
            "callers",
            Action::Allow,
            Rule {
                from: vec![Source {
                    namespaces: vec![Exact("shop".into())],
                    ..Default::default()
                }],
                ..Default::default()
            },
        );
        let deny = policy(
            "no-admin",
            Action::Deny,
            Rule {
                to: vec![Operation {
                    paths: vec![Prefix("/admin".into())],
                    ..Default::default()
                }],
                ..Default::default()
            },
        );
        let rbac = compile(&[&allow, &deny], true);
        let v = rbac.evaluate(&get(CLIENT, "/admin/x?y=1"));
        assert_eq!(v.denied_by.as_deref(), Some("shop/no-admin#0"));
        assert_eq!(
            v.details.as_deref(),
            Some("rbac_access_denied_matched_policy[shop/no-admin#0]")
        );
        assert!(rbac.evaluate(&get(CLIENT, "/shop")).allowed);
        let v = rbac.evaluate(&get(OTHER, "/shop"));
        assert_eq!(v.denied_by.as_deref(), Some("none"));
        assert!(compile(&[], true).evaluate(&get(OTHER, "/")).allowed);
    }

    #[test]
    fn not_fields_headers_ip_blocks_and_audit() {
        let allow = policy(
            "blue",
            Action::Allow,
            Rule {
                from: vec![Source {
                    not_principals: vec![Suffix("/sa/gw".into())],
                    ip_blocks: vec![Cidr {
                        address: "10.1.0.0".parse().unwrap(),
                        prefix_len: 16,
                    }],
                    ..Default::default()
                }],
                to: vec![Operation {
                    not_methods: vec![Exact("DELETE".into())],
                    ..Default::default()
                }],
                when: vec![Condition {
                    header: "x-team".into(),
                    values: vec![Exact("blue".into())],
                    not_values: vec![],
                }],
            },
        );
        let audit = policy("watch", Action::Audit, Rule::default());
        let rbac = compile(&[&allow, &audit], true);
        let v = rbac.evaluate(&get(CLIENT, "/"));
        assert!(v.allowed, "{v:?}");
        assert_eq!(v.audit, vec!["shop/watch#0".to_string()]);
        assert!(!rbac.evaluate(&get(OTHER, "/")).allowed, "notPrincipals");
        let mut far = get(CLIENT, "/");
        far.source_ip = Some("10.2.0.1".parse().unwrap());
        assert!(!rbac.evaluate(&far).allowed, "ipBlocks");
        let mut unknown = get(CLIENT, "/");
        unknown.source_ip = None;
        let v = rbac.evaluate(&unknown);
        assert!(!v.allowed && !v.notes.is_empty(), "{v:?}");
        let mut delete = get(CLIENT, "/");
        delete.http.as_mut().unwrap().method = "DELETE".into();
        assert!(!rbac.evaluate(&delete).allowed, "notMethods");
        let mut red = get(CLIENT, "/");
        red.http.as_mut().unwrap().headers = vec![("x-team".into(), "red".into())];
        assert!(!rbac.evaluate(&red).allowed, "when header");
        // On TCP the ALLOW rule needs HTTP, so it never matches: implicit deny.
        let tcp = compile(&[&allow], false);
        let mut conn = get(CLIENT, "/");
        conn.http = None;
        assert_eq!(tcp.evaluate(&conn).denied_by.as_deref(), Some("none"));
    }

    /// `when` with only `notValues` matches a request whose header has none of them,
    /// also one without the header (Istio's semantics).
    #[test]
    fn when_with_only_not_values() {
        let allow = policy(
            "not-us",
            Action::Allow,
            Rule {
                when: vec![Condition {
                    header: "x-region".into(),
                    values: vec![],
                    not_values: vec![Prefix("us-".into())],
                }],
                ..Default::default()
            },
        );
        let rbac = compile(&[&allow], true);
        let with_region = |region: Option<&str>| {
            let mut r = get(CLIENT, "/");
            r.http.as_mut().unwrap().headers = region
                .map(|v| vec![("X-Region".to_string(), v.to_string())])
                .unwrap_or_default();
            rbac.evaluate(&r)
        };
        assert!(with_region(Some("eu-west")).allowed);
        assert!(
            with_region(None).allowed,
            "no header: none of the notValues"
        );
        let v = with_region(Some("us-east"));
        assert_eq!(v.denied_by.as_deref(), Some("none"), "{v:?}");
    }

    /// `principals: ["*"]` is any caller with a certificate; `paths: ["*"]` any path.
    #[test]
    fn star_principal_and_path() {
        let allow = policy(
            "any-peer",
            Action::Allow,
            Rule {
                from: vec![Source {
                    principals: vec![crate::model::authorization::StringMatch::Any],
                    ..Default::default()
                }],
                to: vec![Operation {
                    paths: vec![crate::model::authorization::StringMatch::Any],
                    ..Default::default()
                }],
                ..Default::default()
            },
        );
        let rbac = compile(&[&allow], true);
        assert!(rbac.evaluate(&get(OTHER, "/x/y?z")).allowed);
        let mut plaintext = get(CLIENT, "/");
        plaintext.principal = None;
        assert_eq!(rbac.evaluate(&plaintext).denied_by.as_deref(), Some("none"));
    }
}
