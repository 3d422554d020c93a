//! SPIFFE identities in meshd's two forms:
//!
//! - workloads: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>` ([`SpiffeId`]);
//! - operators of meshd's admin API: `spiffe://<trust-domain>/meshd/operator/<name>`
//!   ([`OperatorId`]). The two paths cannot be mistaken for each other, so no workload
//!   certificate ever passes as an operator's, and no operator certificate opens an
//!   xDS stream.

use std::fmt;
use std::str::FromStr;

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The default trust domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// The service account meshd's own serving certificate names: every client of meshd
/// (Envoy, meshctl, meshd-agent) checks for `spiffe://<td>/ns/<meshd's namespace>/sa/meshd`.
pub const MESHD_SERVICE_ACCOUNT: &str = "meshd";
/// meshd's own namespace unless told otherwise: part of its serving identity.
pub const DEFAULT_MESHD_NAMESPACE: &str = "meshd-system";

/// A workload identity in meshd's form.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not {form}: {reason}")]
pub struct SpiffeIdError {
    input: String,
    form: &'static str,
    reason: &'static str,
}

const WORKLOAD_FORM: &str =
    "a workload SPIFFE id (spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>)";
const OPERATOR_FORM: &str = "an operator id (spiffe://<trust-domain>/meshd/operator/<name>)";

impl SpiffeIdError {
    fn new(input: &str, form: &'static str, reason: &'static str) -> Self {
        SpiffeIdError {
            input: input.to_string(),
            form,
            reason,
        }
    }

    /// The same reason, for the whole `input` it was found in.
    fn of_input(self, input: &str, form: &'static str) -> Self {
        SpiffeIdError::new(input, form, self.reason)
    }

    /// What is wrong, without the input (for messages that show the input as the user
    /// wrote it).
    pub fn reason(&self) -> &'static str {
        self.reason
    }
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
            form: WORKLOAD_FORM,
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
        let (td, path) = split_uri(s, WORKLOAD_FORM)?;
        match path.as_slice() {
            ["ns", ns, "sa", sa] => {
                SpiffeId::new(td, ns, sa).map_err(|e| e.of_input(s, WORKLOAD_FORM))
            }
            _ => Err(SpiffeIdError::new(
                s,
                WORKLOAD_FORM,
                "the path must be /ns/<namespace>/sa/<service-account>",
            )),
        }
    }
}

/// An operator of meshd's admin API: `spiffe://<trust-domain>/meshd/operator/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OperatorId {
    trust_domain: String,
    name: String,
}

impl OperatorId {
    pub fn new(trust_domain: &str, name: &str) -> Result<OperatorId, SpiffeIdError> {
        let id = OperatorId {
            trust_domain: trust_domain.to_string(),
            name: name.to_string(),
        };
        let err = |reason| SpiffeIdError {
            form: OPERATOR_FORM,
            input: id.to_string(),
            reason,
        };
        validate_trust_domain(trust_domain).map_err(err)?;
        validate_segment(name).map_err(err)?;
        Ok(id)
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl fmt::Display for OperatorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/meshd/operator/{}",
            self.trust_domain, self.name
        )
    }
}

impl FromStr for OperatorId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (td, path) = split_uri(s, OPERATOR_FORM)?;
        match path.as_slice() {
            ["meshd", "operator", name] => {
                OperatorId::new(td, name).map_err(|e| e.of_input(s, OPERATOR_FORM))
            }
            _ => Err(SpiffeIdError::new(
                s,
                OPERATOR_FORM,
                "the path must be /meshd/operator/<name>",
            )),
        }
    }
}

/// `spiffe://<td>/<a>/<b>…` → (`td`, [`a`, `b`, …]).
fn split_uri<'a>(s: &'a str, form: &'static str) -> Result<(&'a str, Vec<&'a str>), SpiffeIdError> {
    let rest = s
        .strip_prefix("spiffe://")
        .ok_or_else(|| SpiffeIdError::new(s, form, "must start with spiffe://"))?;
    let (td, path) = rest
        .split_once('/')
        .ok_or_else(|| SpiffeIdError::new(s, form, "has no path"))?;
    Ok((td, path.split('/').collect()))
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

/// The one URI SAN of a leaf certificate (DER): the identity a peer presented.
pub fn leaf_uri(der: &[u8]) -> Result<String, String> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| format!("unreadable certificate: {e}"))?;
    let sans = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .ok_or_else(|| "no subjectAltName".to_string())?;
    let uris: Vec<&str> = sans
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [one] => Ok(one.to_string()),
        _ => Err(format!(
            "expected exactly one URI SAN, found {}",
            uris.len()
        )),
    }
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
    fn operator_and_workload_ids_never_pass_for_each_other() {
        let op: OperatorId = "spiffe://cluster.local/meshd/operator/alice"
            .parse()
            .unwrap();
        assert_eq!(op.name(), "alice");
        assert_eq!(
            op.to_string(),
            "spiffe://cluster.local/meshd/operator/alice"
        );
        assert!(
            "spiffe://cluster.local/meshd/operator/alice"
                .parse::<SpiffeId>()
                .is_err()
        );
        assert!(
            "spiffe://cluster.local/ns/meshd/sa/operator"
                .parse::<OperatorId>()
                .is_err()
        );
        assert!(OperatorId::new("cluster.local", "a/b").is_err());
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
