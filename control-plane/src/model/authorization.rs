//! The AuthorizationPolicy types, validated and ready to compile. What they mean is
//! [`crate::authz`]'s module doc; how they become Envoy RBAC is [`crate::authz::compile`].

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::model::ObjectKey;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    Allow,
    Deny,
    Audit,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
            Action::Audit => "AUDIT",
        }
    }
}

/// A string pattern: `*`, `prefix*`, `*suffix` or an exact value.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StringMatch {
    Any,
    Exact(String),
    Prefix(String),
    Suffix(String),
}

impl StringMatch {
    pub fn parse(s: &str) -> StringMatch {
        if s == "*" {
            StringMatch::Any
        } else if let Some(p) = s.strip_suffix('*') {
            StringMatch::Prefix(p.to_string())
        } else if let Some(p) = s.strip_prefix('*') {
            StringMatch::Suffix(p.to_string())
        } else {
            StringMatch::Exact(s.to_string())
        }
    }

    pub fn matches(&self, v: &str) -> bool {
        match self {
            StringMatch::Any => true,
            StringMatch::Exact(e) => v == e,
            StringMatch::Prefix(p) => v.starts_with(p.as_str()),
            StringMatch::Suffix(s) => v.ends_with(s.as_str()),
        }
    }
}

/// An IP block, `addr/len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    pub address: IpAddr,
    pub prefix_len: u8,
}

/// Who sends the request. Principals are SPIFFE ids (`spiffe://` included).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Source {
    pub principals: Vec<StringMatch>,
    pub not_principals: Vec<StringMatch>,
    pub namespaces: Vec<StringMatch>,
    pub not_namespaces: Vec<StringMatch>,
    pub ip_blocks: Vec<Cidr>,
    pub not_ip_blocks: Vec<Cidr>,
}

/// What the request does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Operation {
    pub ports: Vec<u16>,
    pub not_ports: Vec<u16>,
    pub methods: Vec<StringMatch>,
    pub not_methods: Vec<StringMatch>,
    pub paths: Vec<StringMatch>,
    pub not_paths: Vec<StringMatch>,
    pub hosts: Vec<StringMatch>,
    pub not_hosts: Vec<StringMatch>,
}

impl Operation {
    pub fn uses_http_fields(&self) -> bool {
        !(self.methods.is_empty()
            && self.not_methods.is_empty()
            && self.paths.is_empty()
            && self.not_paths.is_empty()
            && self.hosts.is_empty()
            && self.not_hosts.is_empty())
    }
}

/// `when: [{key: request.headers[<name>], values, notValues}]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    /// Lower-case header name.
    pub header: String,
    pub values: Vec<StringMatch>,
    pub not_values: Vec<StringMatch>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rule {
    pub from: Vec<Source>,
    pub to: Vec<Operation>,
    pub when: Vec<Condition>,
}

impl Rule {
    /// Whether the rule looks at anything only HTTP has.
    pub fn uses_http_fields(&self) -> bool {
        !self.when.is_empty() || self.to.iter().any(Operation::uses_http_fields)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorizationPolicy {
    pub key: ObjectKey,
    /// `None` selects every workload of the namespace (of the mesh, in the root namespace).
    pub selector: Option<BTreeMap<String, String>>,
    pub action: Action,
    pub rules: Vec<Rule>,
}

impl AuthorizationPolicy {
    /// Whether the policy applies to `workload`: its own namespace's or the root
    /// namespace's, and its selector (none: every pod) matches the pod's labels.
    pub fn applies_to(&self, workload: &super::Workload, root_namespace: &str) -> bool {
        let ns = self.key.namespace.as_str();
        (ns == workload.key.namespace || ns == root_namespace)
            && self
                .selector
                .as_ref()
                .is_none_or(|sel| sel.iter().all(|(k, v)| workload.labels.get(k) == Some(v)))
    }

    /// The name a rule carries in Envoy and in denials: `<namespace>/<name>#<index>`.
    pub fn rule_id(&self, index: usize) -> String {
        format!("{}/{}#{}", self.key.namespace, self.key.name, index)
    }
}
