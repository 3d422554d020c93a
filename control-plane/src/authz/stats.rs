//! Reads meshd's RBAC counters back from an Envoy's `/stats` text, per rule.
//!
//! What [`rbac`](super::compile) makes Envoy count:
//!
//! | stat | meaning |
//! |---|---|
//! | `http.<listener>.rbac.deny.policy.<rule>.denied` | requests DENY rule `<rule>` denied |
//! | `http.<listener>.rbac.allow.policy.<rule>.allowed` | requests ALLOW rule `<rule>` admitted |
//! | `http.<listener>.rbac.allow.denied` | requests no ALLOW rule admitted |
//! | `http.<listener>.rbac.audit_.policy.<rule>.shadow_allowed` | requests AUDIT rule `<rule>` matched |
//! | `<listener>.deny.<ns>/<name>.rbac.denied` | connections DENY policy `<ns>/<name>` denied |
//! | `<listener>.allow.rbac.denied` | connections no ALLOW rule admitted |
//! | `<listener>.audit.<rule>.rbac.audit_.shadow_denied` | connections AUDIT rule `<rule>` matched |
//!
//! AUDIT runs before DENY and ALLOW, so its counts include requests they denied.

use serde::{Deserialize, Serialize};

/// One counter: on `listener`, `rule` (`<ns>/<name>#<i>`, a TCP DENY policy
/// `<ns>/<name>`, or `none` for "no ALLOW rule matched") had `outcome` `count` times.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RuleCount {
    pub listener: String,
    pub rule: String,
    /// `denied`, `allowed` or `audited`.
    pub outcome: String,
    pub count: u64,
}

pub fn parse(stats: &str) -> Vec<RuleCount> {
    let mut rows: Vec<RuleCount> = stats
        .lines()
        .filter_map(|line| {
            let (name, value) = line.split_once(": ")?;
            let count = value.trim().parse::<u64>().ok()?;
            let (listener, rule, outcome) = split(name)?;
            Some(RuleCount {
                listener: listener.to_string(),
                rule: rule.to_string(),
                outcome: outcome.to_string(),
                count,
            })
        })
        .collect();
    rows.sort();
    rows
}

/// `(listener, rule, outcome)` of one of meshd's RBAC counters.
fn split(name: &str) -> Option<(&str, &str, &str)> {
    if let Some(http) = name.strip_prefix("http.") {
        let (listener, stat) = http.split_once(".rbac.")?;
        let per_rule = [
            ("deny.policy.", ".denied", "denied"),
            ("allow.policy.", ".allowed", "allowed"),
            ("audit_.policy.", ".shadow_allowed", "audited"),
        ];
        for (prefix, suffix, outcome) in per_rule {
            if let Some(rule) = stat
                .strip_prefix(prefix)
                .and_then(|r| r.strip_suffix(suffix))
            {
                return Some((listener, rule, outcome));
            }
        }
        return (stat == "allow.denied").then_some((listener, "none", "denied"));
    }
    if let Some(body) = name.strip_suffix(".rbac.audit_.shadow_denied") {
        let (listener, rule) = body.split_once(".audit.")?;
        return Some((listener, rule, "audited"));
    }
    let body = name.strip_suffix(".rbac.denied")?;
    if let Some(listener) = body.strip_suffix(".allow") {
        return Some((listener, "none", "denied"));
    }
    let (listener, policy) = body.split_once(".deny.")?;
    Some((listener, policy, "denied"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_rules_from_http_and_tcp_counters() {
        let text = "\
http.inbound|10.0.0.1:8080.rbac.allow.allowed: 7
http.inbound|10.0.0.1:8080.rbac.allow.denied: 2
http.inbound|10.0.0.1:8080.rbac.allow.policy.shop/web#1.allowed: 5
http.inbound|10.0.0.1:8080.rbac.deny.denied: 3
http.inbound|10.0.0.1:8080.rbac.deny.policy.shop/no.admin#0.denied: 3
http.inbound|10.0.0.1:8080.rbac.audit_.policy.shop/watch#0.shadow_allowed: 9
http.inbound|10.0.0.1:8080.rbac.audit_.shadow_allowed: 9
inbound|10.0.0.3:5432.deny.shop/no.dots.rbac.denied: 4
inbound|10.0.0.3:5432.deny.shop/no.dots.rbac.allowed: 6
inbound|10.0.0.3:5432.allow.rbac.denied: 1
inbound|10.0.0.3:5432.audit.shop/watch#1.rbac.audit_.shadow_denied: 2
inbound|10.0.0.3:5432.audit.shop/watch#1.rbac.audit_.shadow_allowed: 5
http.inbound|10.0.0.1:8080.rbac.audit_.shadow_denied: 4
cluster.x.upstream_rq: 5
";
        let got: Vec<(String, String, String, u64)> = parse(text)
            .into_iter()
            .map(|r| (r.listener, r.rule, r.outcome, r.count))
            .collect();
        let row = |l: &str, r: &str, o: &str, c: u64| (l.into(), r.into(), o.into(), c);
        assert_eq!(
            got,
            vec![
                row("inbound|10.0.0.1:8080", "none", "denied", 2),
                row("inbound|10.0.0.1:8080", "shop/no.admin#0", "denied", 3),
                row("inbound|10.0.0.1:8080", "shop/watch#0", "audited", 9),
                row("inbound|10.0.0.1:8080", "shop/web#1", "allowed", 5),
                row("inbound|10.0.0.3:5432", "none", "denied", 1),
                row("inbound|10.0.0.3:5432", "shop/no.dots", "denied", 4),
                row("inbound|10.0.0.3:5432", "shop/watch#1", "audited", 2),
            ]
        );
    }
}
