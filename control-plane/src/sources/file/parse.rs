//! One config file's text → model objects, within budgets.
//!
//! The YAML parser is `serde-saphyr` with explicit [budgets](self#constants): however a
//! file is built (100,000 nested `[`, an alias bomb, a million tiny documents), parsing
//! it stops early with an error naming the limit, instead of taking seconds and memory.
//! Budgets bound the work; that the work never runs on the async workers is the
//! watcher's part ([`super::FileSource::spawn`]).
//!
//! A document is read into a `serde_json::Value` first (to learn its `apiVersion` and
//! `kind`), then into the Kubernetes type through `serde_path_to_error`, so an error
//! names the field. Documents are numbered from 1, counting the file's non-empty
//! documents (an empty document between two `---` holds nothing to point at).
//!
//! What `kubectl get … -o yaml` writes is read as it is:
//! - a `v1` **List** stands for its `items`, each read like a document of its own and
//!   named by its index (`document 1, items[3]`);
//! - an object of a **kind meshd does not read** (a ReplicaSet, a ConfigMap, an Istio
//!   policy) is ignored with a note, one per object, that says so; it does not refuse
//!   its file. Notes are not errors: the rest of the file applies. Only meshd's own
//!   group, `security.meshd.io`, refuses kinds and versions it does not know, since a
//!   misspelled policy must not pass for one that is in force.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use serde_json::Value;

use super::ConfigError;
use crate::model::MeshObject;
use crate::sources::convert::{self, FieldError};
use crate::sources::crd;

/// Larger files are refused unread (Kubernetes keeps objects under 1.5 MiB, and a
/// ConfigMap under 1 MiB).
pub const MAX_FILE_BYTES: u64 = 4 << 20;
/// Deepest nesting of mappings and sequences (a Kubernetes object needs about 20).
pub const MAX_DEPTH: usize = 64;
/// Most documents in one file.
pub const MAX_DOCUMENTS: usize = 1024;
/// Most YAML nodes (scalars, mappings, sequences) in one file.
pub const MAX_NODES: usize = 250_000;
/// Most nodes that aliases (`*name`) may copy in one file: aliases are what YAML bombs
/// are made of.
pub const MAX_ALIAS_EVENTS: usize = 100_000;

fn options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_depth: MAX_DEPTH,
            flow_nesting_limit: MAX_DEPTH,
            max_documents: MAX_DOCUMENTS,
            max_nodes: MAX_NODES,
        },
        alias_limits: serde_saphyr::alias_limits! {
            max_total_replayed_events: MAX_ALIAS_EVENTS,
        },
        // Errors are one line each (logs, `/debug/snapshot`, `meshctl status`).
        with_snippet: false,
    }
}

/// One object read from a file, with the document (and List item) it came from.
#[derive(Debug, Clone)]
pub struct Defined {
    /// 1-based, as in [`ConfigError::document`].
    pub document: usize,
    /// Its index in the document's `items`, when the document is a List.
    pub item: Option<usize>,
    pub object: MeshObject,
}

/// Where in its file an object is: `document 2` or `document 1, items[3]`.
pub fn place(document: usize, item: Option<usize>) -> String {
    match item {
        Some(i) => format!("document {document}, items[{i}]"),
        None => format!("document {document}"),
    }
}

/// A file's content as meshd reads it.
#[derive(Debug, Clone, Default)]
pub struct Parsed {
    pub defined: Vec<Defined>,
    /// What was ignored, and why (objects of kinds meshd does not read).
    pub notes: Vec<ConfigError>,
}

/// `Kind namespace/name` (`Namespace name` for namespaces), as errors name objects.
pub fn label(object: &MeshObject) -> String {
    match object {
        MeshObject::Namespace(n) => format!("Namespace {}", n.name),
        o => format!("{} {}", o.kind(), o.key()),
    }
}

/// Parses one file's text. All documents or none; objects meshd does not read are
/// left out with a note each.
pub fn parse_file(path: &Path, text: &str) -> Result<Parsed, Vec<ConfigError>> {
    let err = |document: Option<usize>, item, object, field, message| ConfigError {
        file: path.to_path_buf(),
        document,
        item,
        object,
        field,
        message,
    };
    let values = documents(path, text).map_err(|e| vec![*e])?;
    let mut parsed = Parsed::default();
    let mut errors = Vec::new();
    let mut seen = HashMap::new();
    for (i, value) in values.into_iter().enumerate() {
        let document = i + 1;
        let entries = match objects_of(value) {
            Ok(entries) => entries,
            Err(e) => {
                let list = Some("List".to_string());
                errors.push(err(Some(document), None, list, e.field_opt(), e.message));
                continue;
            }
        };
        for (item, value) in entries {
            match parse_document(value) {
                Ok(Read::Object(object)) => {
                    let id = (object.kind(), object.key());
                    if let Some(first) = seen.insert(id, place(document, item)) {
                        errors.push(err(
                            Some(document),
                            item,
                            Some(label(&object)),
                            None,
                            format!("already defined in {first} of this file"),
                        ));
                    }
                    parsed.defined.push(Defined {
                        document,
                        item,
                        object,
                    });
                }
                Ok(Read::Ignored { object, why }) => {
                    parsed
                        .notes
                        .push(err(Some(document), item, Some(object), None, why));
                }
                Err((object, e)) => {
                    errors.push(err(Some(document), item, object, e.field_opt(), e.message))
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(parsed)
    } else {
        Err(errors)
    }
}

/// The YAML documents of one file's text, within meshd's budgets (`meshctl admission
/// check` reads manifests with it too).
pub fn documents(path: &Path, text: &str) -> Result<Vec<Value>, Box<ConfigError>> {
    serde_saphyr::from_multiple_with_options(text, options()).map_err(|e| {
        Box::new(ConfigError {
            file: path.to_path_buf(),
            document: None,
            item: None,
            object: None,
            field: None,
            message: yaml_error(&e),
        })
    })
}

/// The objects a document stands for: itself, or the items of a `v1` List, each with
/// its index.
pub fn objects_of(mut value: Value) -> Result<Vec<(Option<usize>, Value)>, FieldError> {
    let is_list = value.get("apiVersion").and_then(Value::as_str) == Some("v1")
        && value.get("kind").and_then(Value::as_str) == Some("List");
    if !is_list {
        return Ok(vec![(None, value)]);
    }
    match value.get_mut("items").map(Value::take) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => Ok(items
            .into_iter()
            .enumerate()
            .map(|(i, item)| (Some(i), item))
            .collect()),
        Some(_) => Err(FieldError::new("items", "must be a sequence of objects")),
    }
}

/// Says which of meshd's limits a file is over, or what is wrong with its YAML.
fn yaml_error(e: &serde_saphyr::Error) -> String {
    use serde_saphyr::budget::BudgetBreach;
    let over = match e.without_snippet() {
        serde_saphyr::Error::Budget { breach, .. } => match breach {
            BudgetBreach::Documents { .. } => format!("more than {MAX_DOCUMENTS} documents"),
            BudgetBreach::Nodes { .. } => format!("more than {MAX_NODES} YAML nodes"),
            BudgetBreach::Depth { .. } => format!("nesting deeper than {MAX_DEPTH} levels"),
            other => format!("{other:?}"),
        },
        _ => return format!("not valid YAML: {e}"),
    };
    let at = e
        .location()
        .map(|l| format!(" (at line {}, column {})", l.line(), l.column()))
        .unwrap_or_default();
    format!("over meshd's limits for a config file: {over}{at}")
}

impl FieldError {
    pub(crate) fn field_opt(&self) -> Option<String> {
        Some(self.field.clone()).filter(|f| !f.is_empty())
    }
}

/// What one document (or List item) is to meshd.
pub enum Read {
    Object(MeshObject),
    /// A kind meshd does not read: `object` names it, `why` says so.
    Ignored {
        object: String,
        why: String,
    },
}

/// The kinds meshd reads, by `apiVersion` and `kind`.
const READ: [(&str, &str); 7] = [
    ("v1", "Namespace"),
    ("v1", "Service"),
    ("v1", "Pod"),
    ("discovery.k8s.io/v1", "EndpointSlice"),
    (crd::GROUP_VERSION, "AuthorizationPolicy"),
    (crd::GROUP_VERSION, "PeerAuthentication"),
    (crd::GROUP_VERSION, "WorkloadPolicy"),
];

/// One document (or List item) as meshd reads it; an error comes with the object's
/// label (`WorkloadPolicy shop/x`) when it has one.
pub fn parse_document(value: Value) -> Result<Read, (Option<String>, FieldError)> {
    let text = |key: &str| value.get(key).and_then(|v| v.as_str()).map(str::to_string);
    let api_version =
        text("apiVersion").ok_or_else(|| (None, FieldError::new("apiVersion", "is required")))?;
    let kind = text("kind").ok_or_else(|| (None, FieldError::new("kind", "is required")))?;
    let meta = value.get("metadata");
    let meta_text = |key: &str| meta.and_then(|m| m.get(key)).and_then(|v| v.as_str());
    let (name, given_namespace) = (meta_text("name"), meta_text("namespace"));
    let namespace = given_namespace.unwrap_or("default");
    let label = Some(match (kind.as_str(), name) {
        ("Namespace", Some(n)) => format!("Namespace {n}"),
        (k, Some(n)) => format!("{k} {namespace}/{n}"),
        (k, None) => k.to_string(),
    });
    let result = match (api_version.as_str(), kind.as_str()) {
        ("v1", "Namespace") => typed::<core::Namespace>(value)
            .and_then(|n| convert::namespace(&n))
            .map(|n| MeshObject::Namespace(Arc::new(n))),
        ("v1", "Service") => typed::<core::Service>(value)
            .and_then(|s| convert::service(&s))
            .map(|s| MeshObject::Service(Arc::new(s))),
        ("v1", "Pod") => typed::<core::Pod>(value)
            .and_then(|p| convert::pod(&p))
            .map(|w| MeshObject::Workload(Arc::new(w))),
        ("discovery.k8s.io/v1", "EndpointSlice") => typed::<discovery::EndpointSlice>(value)
            .and_then(|s| convert::endpoint_slice(&s))
            .map(|s| MeshObject::EndpointSlice(Arc::new(s))),
        (crd::GROUP_VERSION, "AuthorizationPolicy") => typed::<crd::AuthorizationPolicy>(value)
            .and_then(|p| crd::authorization_policy(&p))
            .map(|p| MeshObject::AuthorizationPolicy(Arc::new(p))),
        (crd::GROUP_VERSION, "PeerAuthentication") => typed::<crd::PeerAuthentication>(value)
            .and_then(|p| crd::peer_authentication(&p))
            .map(|p| MeshObject::PeerAuthentication(Arc::new(p))),
        (crd::GROUP_VERSION, "WorkloadPolicy") => typed::<crd::WorkloadPolicy>(value)
            .and_then(|p| crd::workload_policy(&p))
            .map(|p| MeshObject::WorkloadPolicy(Arc::new(p))),
        // meshd's own group: anything else there is a mistake, not someone else's object.
        (group_version, _) if group_version.split('/').next() == Some(crd::GROUP) => {
            Err(FieldError::new(
                "kind",
                format!(
                    "{api_version} {kind} is not a kind meshd knows; its group holds {} \
                     PeerAuthentication, AuthorizationPolicy and WorkloadPolicy",
                    crd::GROUP_VERSION
                ),
            ))
        }
        _ => {
            // Cluster-scoped kinds have no namespace: name them without one.
            let object = match (name, given_namespace) {
                (Some(n), Some(ns)) => format!("{kind} {ns}/{n}"),
                (Some(n), None) => format!("{kind} {n}"),
                (None, _) => kind.clone(),
            };
            let read_as = READ
                .iter()
                .find(|(_, k)| *k == kind)
                .map(|(v, k)| format!(" (it reads {v} {k})"))
                .unwrap_or_default();
            return Ok(Read::Ignored {
                object,
                why: format!("{api_version} {kind} is not read by meshd{read_as}: ignored"),
            });
        }
    };
    result.map(Read::Object).map_err(|e| (label, e))
}

/// Deserializes into a Kubernetes type, keeping the path of the field that failed.
fn typed<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { String::new() } else { path };
        FieldError::new(field, e.into_inner().to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path() -> &'static Path {
        Path::new("mesh/x.yaml")
    }

    fn refused(text: &str) -> String {
        let errs = parse_file(path(), text).unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].document, None);
        errs[0].to_string()
    }

    /// 100,000 nested `[` in 200 KB took serde_yaml 37 s to refuse (its recursion limit
    /// applied after the parser had built everything).
    #[test]
    fn deep_nesting_is_refused() {
        let namespace = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n";
        let flow = format!("{namespace}x: {}", "[".repeat(100_000));
        let msg = refused(&flow);
        assert!(
            msg.starts_with("mesh/x.yaml: not valid YAML: recursion limit exceeded at line 4"),
            "{msg}"
        );
        let mut block = format!("{namespace}x:\n");
        for depth in 1..=MAX_DEPTH + 1 {
            block.push_str(&format!("{}- \n", "  ".repeat(depth)));
        }
        let msg = refused(&block);
        assert!(
            msg.starts_with(&format!(
                "mesh/x.yaml: over meshd's limits for a config file: nesting deeper than {MAX_DEPTH} levels (at line "
            )),
            "{msg}"
        );
        let within = format!(
            "{namespace}x: {}{}",
            "[".repeat(MAX_DEPTH - 2),
            "]".repeat(MAX_DEPTH - 2)
        );
        parse_file(path(), &within).unwrap();
    }

    /// The billion laughs: nine levels of aliases, each repeating the one before nine
    /// times, so a 500-byte file expands to 9^10 strings.
    #[test]
    fn an_alias_bomb_is_refused() {
        let mut text = String::from(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\nx0: &x0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n",
        );
        for i in 1..10 {
            let refs = vec![format!("*x{}", i - 1); 9].join(", ");
            text.push_str(&format!("x{i}: &x{i} [{refs}]\n"));
        }
        let msg = refused(&text);
        assert!(
            msg.starts_with(&format!(
                "mesh/x.yaml: not valid YAML: alias replay limit exceeded: total_replayed_events={} > {MAX_ALIAS_EVENTS}",
                MAX_ALIAS_EVENTS + 1
            )),
            "{msg}"
        );
    }

    #[test]
    fn too_many_documents_or_nodes_are_refused() {
        let namespace = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n";
        let msg = refused(&format!("{namespace}---\n").repeat(MAX_DOCUMENTS + 1));
        assert!(
            msg.contains(&format!("over meshd's limits for a config file: more than {MAX_DOCUMENTS} documents (at line ")),
            "{msg}"
        );
        let msg = refused(&format!("{namespace}x: [{}]\n", "1,".repeat(MAX_NODES)));
        assert!(
            msg.contains(&format!(
                "over meshd's limits for a config file: more than {MAX_NODES} YAML nodes (at line "
            )),
            "{msg}"
        );
    }
}
