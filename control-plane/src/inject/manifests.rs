//! `meshctl inject -f`: [`super::patch`] applied to manifests offline, as
//! `istioctl kube-inject` does: Pods, and the pod templates of Deployments,
//! StatefulSets, DaemonSets, ReplicaSets, Jobs and CronJobs (in `v1` Lists too). Every
//! other object comes out unchanged; all of them come out in their order. One refused
//! pod fails the whole run (nothing is printed), with the document, object and field
//! named.

use serde_json::Value;

use super::{InjectConfig, Outcome};
use crate::admission::workload::template_pointer;

/// What one run did, for the summary on stderr.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// `Kind/name` of each injected object.
    pub injected: Vec<String>,
    /// `Kind/name: reason` of each pod template left alone.
    pub left_alone: Vec<String>,
}

/// Injects every pod template in the YAML `text` (one or more documents) and returns
/// the documents as YAML, with what was done.
pub fn inject_yaml(text: &str, config: &InjectConfig) -> Result<(String, Report), String> {
    let documents: Vec<Value> = serde_saphyr::from_multiple(text).map_err(|e| e.to_string())?;
    let mut report = Report::default();
    let mut out = Vec::new();
    for (i, mut doc) in documents.into_iter().enumerate() {
        if doc.is_null() {
            continue;
        }
        inject_object(&mut doc, config, &mut report)
            .map_err(|e| format!("document {}: {e}", i + 1))?;
        out.push(doc);
    }
    let yaml = out
        .iter()
        .map(|d| serde_saphyr::to_string(d).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?
        .join("---\n");
    Ok((yaml, report))
}

fn inject_object(
    doc: &mut Value,
    config: &InjectConfig,
    report: &mut Report,
) -> Result<(), String> {
    let text = |v: &Value, key: &str| v.get(key).and_then(Value::as_str).unwrap_or("").to_string();
    let (api_version, kind) = (text(doc, "apiVersion"), text(doc, "kind"));
    let meta = doc.get("metadata").cloned().unwrap_or_default();
    let label = format!("{kind}/{}", text(&meta, "name"));
    if (api_version.as_str(), kind.as_str()) == ("v1", "List") {
        let items = doc
            .get_mut("items")
            .and_then(Value::as_array_mut)
            .ok_or("List: items must be a list")?;
        for (i, item) in items.iter_mut().enumerate() {
            inject_object(item, config, report).map_err(|e| format!("items[{i}]: {e}"))?;
        }
        return Ok(());
    }
    let Some(pointer) = template_pointer(&api_version, &kind) else {
        return Ok(());
    };
    let namespace = meta
        .get("namespace")
        .and_then(Value::as_str)
        .unwrap_or("default")
        .to_string();
    let template = doc
        .pointer_mut(pointer)
        .ok_or_else(|| format!("{label}: no pod template at {pointer}"))?;
    let at = |field: String| match pointer {
        "" => field,
        _ => format!(
            "{}.{field}",
            pointer.trim_start_matches('/').replace('/', ".")
        ),
    };
    let (outcome, patch) = super::patch(template, &namespace, config)
        .map_err(|e| format!("{label}: {}: {}", at(e.field), e.message))?;
    match outcome {
        Outcome::Injected => {
            json_patch::patch(template, &patch)
                .map_err(|e| format!("{label}: cannot apply the injection: {e}"))?;
            report.injected.push(label);
        }
        Outcome::LeftAlone(reason) => report
            .left_alone
            .push(format!("{label}: {}", reason.reason())),
    }
    Ok(())
}
