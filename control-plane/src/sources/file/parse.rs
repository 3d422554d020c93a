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

/// One object read from a file, with the document it came from.
#[derive(Debug, Clone)]
pub struct Defined {
    /// 1-based, as in [`ConfigError::document`].
    pub document: usize,
    pub object: MeshObject,
}

/// `Kind namespace/name` (`Namespace name` for namespaces), as errors name objects.
pub fn label(object: &MeshObject) -> String {
    match object {
        MeshObject::Namespace(n) => format!("Namespace {}", n.name),
        o => format!("{} {}", o.kind(), o.key()),
    }
}

/// Parses one file's text. All documents or none.
pub fn parse_file(path: &Path, text: &str) -> Result<Vec<Defined>, Vec<ConfigError>> {
    let err = |document: Option<usize>, object, field, message| ConfigError {
        file: path.to_path_buf(),
        document,
        object,
        field,
        message,
    };
    let values: Vec<Value> = serde_saphyr::from_multiple_with_options(text, options())
        .map_err(|e| vec![err(None, None, None, yaml_error(&e))])?;
    let mut defined: Vec<Defined> = Vec::new();
    let mut errors = Vec::new();
    let mut seen = HashMap::new();
    for (i, value) in values.into_iter().enumerate() {
        let document = i + 1;
        match parse_document(value) {
            Ok(object) => {
                let id = (object.kind(), object.key());
                if let Some(first) = seen.insert(id, document) {
                    errors.push(err(
                        Some(document),
                        Some(label(&object)),
                        None,
                        format!("already defined in document {first} of this file"),
                    ));
                }
                defined.push(Defined { document, object });
            }
            Err((object, e)) => errors.push(err(Some(document), object, e.field_opt(), e.message)),
        }
    }
    if errors.is_empty() {
        Ok(defined)
    } else {
        Err(errors)
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
    fn field_opt(&self) -> Option<String> {
        Some(self.field.clone()).filter(|f| !f.is_empty())
    }
}

fn parse_document(value: Value) -> Result<MeshObject, (Option<String>, FieldError)> {
    let text = |key: &str| value.get(key).and_then(|v| v.as_str()).map(str::to_string);
    let api_version =
        text("apiVersion").ok_or_else(|| (None, FieldError::new("apiVersion", "is required")))?;
    let kind = text("kind").ok_or_else(|| (None, FieldError::new("kind", "is required")))?;
    let meta = value.get("metadata");
    let name = meta.and_then(|m| m.get("name")).and_then(|v| v.as_str());
    let namespace = meta
        .and_then(|m| m.get("namespace"))
        .and_then(|v| v.as_str())
        .unwrap_or("default");
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
        _ => Err(FieldError::new(
            "kind",
            format!(
                "{api_version} {kind} is not supported here; expected v1 Namespace, Service \
                 or Pod, discovery.k8s.io/v1 EndpointSlice, or {} PeerAuthentication and AuthorizationPolicy",
                crd::GROUP_VERSION
            ),
        )),
    };
    result.map_err(|e| (label, e))
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
