//! Reads the RBAC counters of meshd's stages back from an Envoy's `/stats` text.
//!
//! [`rbac`](super::rbac) gives each enforcing stage its own stat prefix:
//!
//! - HTTP: `http.<listener>.rbac.deny.denied`, `http.<listener>.rbac.allow.denied`
//! - TCP: `<listener>.deny.rbac.denied`, `<listener>.allow.rbac.denied`
//!
//! (and `.allowed` beside each). Envoy has no counter per RBAC policy; the rule behind
//! each single denial is in the response, the access log and `x-meshd-denied-by`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The counters of one RBAC filter of one listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageCounts {
    pub listener: String,
    /// `DENY rules` or `no ALLOW rule`.
    pub stage: String,
    pub denied: u64,
    pub allowed: u64,
}

pub fn parse(stats: &str) -> Vec<StageCounts> {
    let mut rows: BTreeMap<(String, String), StageCounts> = BTreeMap::new();
    for line in stats.lines() {
        let Some((name, value)) = line.split_once(": ") else {
            continue;
        };
        let Ok(value) = value.trim().parse::<u64>() else {
            continue;
        };
        let Some((listener, stage, counter)) = split(name) else {
            continue;
        };
        let row = rows
            .entry((listener.clone(), stage.clone()))
            .or_insert_with(|| StageCounts {
                listener,
                stage,
                denied: 0,
                allowed: 0,
            });
        match counter {
            "denied" => row.denied = value,
            _ => row.allowed = value,
        }
    }
    rows.into_values().collect()
}

/// `(listener, stage, "denied" | "allowed")` of one of meshd's RBAC counters.
fn split(name: &str) -> Option<(String, String, &str)> {
    let (rest, counter) = name.rsplit_once('.')?;
    if counter != "denied" && counter != "allowed" {
        return None;
    }
    // HTTP: http.<listener>.rbac.<stage>  TCP: <listener>.<stage>.rbac
    let (listener, stage) = match rest.strip_prefix("http.") {
        Some(http) => http.rsplit_once(".rbac.")?,
        None => rest.strip_suffix(".rbac")?.rsplit_once('.')?,
    };
    let stage = match stage {
        "deny" => "DENY rules",
        "allow" => "no ALLOW rule",
        _ => return None,
    };
    Some((listener.to_string(), stage.to_string(), counter))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_http_and_tcp_counters() {
        let text = "\
http.inbound|10.0.0.1:8080.rbac.allow.allowed: 7
http.inbound|10.0.0.1:8080.rbac.allow.denied: 2
http.inbound|10.0.0.1:8080.rbac.deny.allowed: 9
http.inbound|10.0.0.1:8080.rbac.deny.denied: 3
http.inbound|10.0.0.1:8080.rbac.audit_shadow_allowed: 9
inbound|10.0.0.3:5432.deny.rbac.denied: 4
inbound|10.0.0.3:5432.allow.rbac.denied: 1
cluster.x.upstream_rq: 5
";
        let rows = parse(text);
        let find = |l: &str, s: &str| {
            rows.iter()
                .find(|r| r.listener == l && r.stage == s)
                .unwrap_or_else(|| panic!("{l} {s} in {rows:?}"))
                .clone()
        };
        assert_eq!(find("inbound|10.0.0.1:8080", "DENY rules").denied, 3);
        assert_eq!(find("inbound|10.0.0.1:8080", "no ALLOW rule").denied, 2);
        assert_eq!(find("inbound|10.0.0.1:8080", "no ALLOW rule").allowed, 7);
        assert_eq!(find("inbound|10.0.0.3:5432", "DENY rules").denied, 4);
        assert_eq!(find("inbound|10.0.0.3:5432", "no ALLOW rule").denied, 1);
        assert_eq!(rows.len(), 4, "{rows:?}");
    }
}
