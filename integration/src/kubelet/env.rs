//! A container's environment as the kubelet builds it: the spec's `env` in order, each
//! `value` expanded against the variables before it, `valueFrom.fieldRef` from the pod
//! (the downward API), and `$(VAR)` expansion of command and args.

use std::collections::BTreeMap;

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::{Container, ObjectFieldSelector};

/// What the downward API can say about a pod.
#[derive(Debug, Clone)]
pub struct PodFacts {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub service_account: String,
    pub node_name: String,
    pub pod_ip: String,
    pub host_ip: String,
}

impl PodFacts {
    /// The value of `fieldRef.fieldPath` (as in an env var, or a downwardAPI volume
    /// file when `in_volume`: only there may the whole label and annotation maps be
    /// asked for).
    pub fn field(&self, selector: &ObjectFieldSelector, in_volume: bool) -> anyhow::Result<String> {
        let path = selector.field_path.as_str();
        if let Some(v) = selector.api_version.as_deref().filter(|v| *v != "v1") {
            bail!("fieldRef apiVersion {v:?} (only v1 exists)");
        }
        let quoted = |map: &BTreeMap<String, String>, rest: &str| -> Option<String> {
            let key = rest.strip_prefix("['")?.strip_suffix("']")?;
            Some(map.get(key).cloned().unwrap_or_default())
        };
        Ok(match path {
            "metadata.name" => self.name.clone(),
            "metadata.namespace" => self.namespace.clone(),
            "metadata.uid" => self.uid.clone(),
            "spec.serviceAccountName" => self.service_account.clone(),
            "spec.nodeName" => self.node_name.clone(),
            "status.podIP" | "status.podIPs" => self.pod_ip.clone(),
            "status.hostIP" | "status.hostIPs" => self.host_ip.clone(),
            "metadata.labels" if in_volume => map_lines(&self.labels),
            "metadata.annotations" if in_volume => map_lines(&self.annotations),
            _ => {
                if let Some(v) = path
                    .strip_prefix("metadata.labels")
                    .and_then(|r| quoted(&self.labels, r))
                {
                    v
                } else if let Some(v) = path
                    .strip_prefix("metadata.annotations")
                    .and_then(|r| quoted(&self.annotations, r))
                {
                    v
                } else {
                    bail!("fieldRef.fieldPath {path:?} is not supported");
                }
            }
        })
    }
}

/// A whole label or annotation map as a downwardAPI volume file holds it: `key="value"`
/// lines, sorted by key, values quoted (JSON's quoting, Go's `%q` for printable text).
fn map_lines(map: &BTreeMap<String, String>) -> String {
    map.iter()
        .map(|(k, v)| format!("{k}={}", serde_json::Value::from(v.as_str())))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The container's environment from its spec, in order (a later entry of the same name
/// replaces the earlier one, as the runtime sees it), after the image's PATH (none for
/// an app the test serves).
pub fn resolve(
    container: &Container,
    image_path: Option<&str>,
    pod: &PodFacts,
) -> anyhow::Result<Vec<(String, String)>> {
    if container.env_from.as_ref().is_some_and(|e| !e.is_empty()) {
        bail!("envFrom is not supported by the harness");
    }
    let mut env: Vec<(String, String)> = image_path
        .map(|path| ("PATH".to_string(), path.to_string()))
        .into_iter()
        .collect();
    // What `$(VAR)` in a value sees: the variables defined before it (and the image's).
    let mut defined: BTreeMap<String, String> = env.iter().cloned().collect();
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (_, Some(from)) => {
                if let Some(field) = &from.field_ref {
                    pod.field(field, false)
                        .with_context(|| format!("env {}: valueFrom.fieldRef", var.name))?
                } else if from.resource_field_ref.is_some() {
                    bail!(
                        "env {}: valueFrom.resourceFieldRef is not supported by the harness",
                        var.name
                    );
                } else if from.config_map_key_ref.is_some() {
                    bail!(
                        "env {}: valueFrom.configMapKeyRef is not supported by the harness",
                        var.name
                    );
                } else if from.secret_key_ref.is_some() {
                    bail!(
                        "env {}: valueFrom.secretKeyRef is not supported by the harness",
                        var.name
                    );
                } else {
                    bail!("env {}: valueFrom names no source", var.name);
                }
            }
            (Some(value), None) => expand(value, &defined),
            (None, None) => String::new(),
        };
        defined.insert(var.name.clone(), value.clone());
        env.retain(|(name, _)| *name != var.name);
        env.push((var.name.clone(), value));
    }
    Ok(env)
}

/// Kubernetes' `$(VAR)` expansion (`third_party/forked/golang/expansion`): `$(NAME)`
/// becomes NAME's value, or stays as written when NAME is unknown; `$$` is one `$` (so
/// `$$(NAME)` is the text `$(NAME)`); an unclosed `$(` and any other `$` stay.
pub fn expand(input: &str, vars: &BTreeMap<String, String>) -> String {
    let bytes = input.as_bytes();
    let mut out: Vec<u8> = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'$' || i + 1 == bytes.len() {
            out.push(bytes[i]);
            i += 1;
            continue;
        }
        match bytes[i + 1] {
            b'$' => {
                out.push(b'$');
                i += 2;
            }
            b'(' => match bytes[i + 2..].iter().position(|b| *b == b')') {
                Some(len) => {
                    let name = &input[i + 2..i + 2 + len];
                    match vars.get(name) {
                        Some(value) => out.extend_from_slice(value.as_bytes()),
                        None => out.extend_from_slice(format!("$({name})").as_bytes()),
                    }
                    i += len + 3;
                }
                None => {
                    out.extend_from_slice(b"$(");
                    i += 2;
                }
            },
            other => {
                out.push(b'$');
                out.push(other);
                i += 2;
            }
        }
    }
    // Only whole UTF-8 sequences were copied or inserted.
    String::from_utf8(out).expect("expansion keeps UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> BTreeMap<String, String> {
        [("A", "1"), ("POD", "web-0")]
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .into()
    }

    #[test]
    fn expansion_follows_kubernetes() {
        let cases = [
            ("$(A)", "1"),
            ("x$(POD)y", "xweb-0y"),
            ("$$(A)", "$(A)"),
            ("$$$(A)", "$1"),
            ("$(UNKNOWN)", "$(UNKNOWN)"),
            ("$(A", "$(A"),
            ("$A", "$A"),
            ("a$", "a$"),
            ("$$", "$"),
            ("$()", "$()"),
            ("é$(A)é", "é1é"),
            ("$é", "$é"),
        ];
        for (input, want) in cases {
            assert_eq!(expand(input, &vars()), want, "{input}");
        }
    }
}
