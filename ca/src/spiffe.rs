//! SPIFFE workload identities: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::fmt;
use std::str::FromStr;

/// The default trust domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// A workload identity in meshd's form.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{input:?} is not a workload SPIFFE id (spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>): {reason}"
)]
pub struct SpiffeIdError {
    input: String,
    reason: &'static str,
}

impl SpiffeId {
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<SpiffeId, SpiffeIdError> {
        let id = SpiffeId {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        };
        let err = |reason| SpiffeIdError {
            input: id.to_string(),
            reason,
        };
        validate_trust_domain(trust_domain).map_err(err)?;
        validate_segment(namespace).map_err(err)?;
        validate_segment(service_account).map_err(err)?;
        Ok(id)
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| SpiffeIdError {
            input: s.to_string(),
            reason,
        };
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| err("must start with spiffe://"))?;
        let (td, path) = rest.split_once('/').ok_or_else(|| err("has no path"))?;
        let parts: Vec<&str> = path.split('/').collect();
        match parts.as_slice() {
            ["ns", ns, "sa", sa] => SpiffeId::new(td, ns, sa).map_err(|e| SpiffeIdError {
                input: s.to_string(),
                reason: e.reason,
            }),
            _ => Err(err("the path must be /ns/<namespace>/sa/<service-account>")),
        }
    }
}

fn validate_trust_domain(td: &str) -> Result<(), &'static str> {
    if td.is_empty() {
        return Err("the trust domain is empty");
    }
    if td.len() > 255 {
        return Err("the trust domain is longer than 255 characters");
    }
    if !td
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_'))
    {
        return Err("the trust domain may only hold lowercase letters, digits, '.', '-' and '_'");
    }
    Ok(())
}

fn validate_segment(seg: &str) -> Result<(), &'static str> {
    if seg.is_empty() {
        return Err("a path segment is empty");
    }
    if seg == "." || seg == ".." {
        return Err("a path segment is '.' or '..'");
    }
    if !seg
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
    {
        return Err("a path segment may only hold letters, digits, '.', '-' and '_'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_the_workload_form() {
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        assert_eq!(id.namespace(), "shop");
        assert_eq!(id.service_account(), "web");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
    }

    #[test]
    fn rejects_what_is_not_a_workload_id() {
        for bad in [
            "http://cluster.local/ns/shop/sa/web",
            "spiffe://cluster.local",
            "spiffe://cluster.local/ns/shop",
            "spiffe://cluster.local/ns/shop/sa/web/extra",
            "spiffe://Cluster.Local/ns/shop/sa/web",
            "spiffe:///ns/shop/sa/web",
            "spiffe://cluster.local/ns//sa/web",
            "spiffe://cluster.local/ns/../sa/web",
            "spiffe://cluster.local/ns/shop/sa/we b",
        ] {
            let err = bad.parse::<SpiffeId>().unwrap_err();
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }
}
