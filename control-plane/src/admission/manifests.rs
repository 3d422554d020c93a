//! `meshctl admission check -f`: the webhook's evaluation, offline, on manifests.
//!
//! Inputs are files, directories (every `*.yaml`/`*.yml` under them, as the config
//! directory is walked, [`walk`]) or stdin (`-`), each read with the file source's
//! budgets and document parser ([`parse`]), `v1` Lists included. From every input it
//! takes the mesh's side: `WorkloadPolicy` (and anything else of meshd's group, so a
//! misspelled kind is an error), `PeerAuthentication` (a namespace's mTLS mode) and
//! `Namespace` (its labels); an invalid one is an error naming file, document, object
//! and field, never dropped. From the manifests (not the `--policy` files) it takes
//! every object with a pod ([`super::workload`]) and puts it through [`super::check`]
//! against a [`MeshSnapshot`] of those objects, after all inputs are read (a policy
//! applies wherever it is written). A pod that cannot be read is denied with the
//! reason, as the webhook denies it; every other object is passed over.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use super::workload::{pod_of, template_pointer};
use crate::inject::InjectConfig;
use crate::model::workload_policy::Mode;
use crate::model::{MeshDefaults, MeshObject, MeshSnapshot};
use crate::sources::crd;
use crate::sources::file::parse::{self, Read};
use crate::sources::file::{ConfigError, walk};

/// Why a run could not check its inputs (`meshctl` exits with status 2).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<ConfigError>),
}

/// One input file: its path as errors name it (`stdin` for `-`) and its text.
#[derive(Debug, Clone)]
pub struct Input {
    pub path: PathBuf,
    pub text: String,
}

/// The inputs `path` names: stdin for `-`, every `*.yaml`/`*.yml` file under a
/// directory (in name order), or the file itself.
pub fn load(path: &Path) -> Result<Vec<Input>, Error> {
    let read_error = |path: &Path, source| Error::Read {
        path: path.display().to_string(),
        source,
    };
    if path.as_os_str() == "-" {
        let text = io::read_to_string(io::stdin()).map_err(|e| read_error(path, e))?;
        return Ok(vec![Input {
            path: "stdin".into(),
            text,
        }]);
    }
    let files = if path.is_dir() {
        let listing = walk::yaml_files(path).map_err(|e| read_error(path, e))?;
        if let Some((entry, message)) = listing.problems.into_iter().next() {
            return Err(read_error(&entry, io::Error::other(message)));
        }
        listing.files
    } else {
        vec![path.to_path_buf()]
    };
    files
        .into_iter()
        .map(|file| {
            let text = std::fs::read_to_string(&file).map_err(|e| read_error(&file, e))?;
            Ok(Input { path: file, text })
        })
        .collect()
}

/// What a run found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Every `WorkloadPolicy` the pods were checked against, as `namespace/name`.
    pub policies: Vec<String>,
    /// Every object with a pod, in input order.
    pub objects: Vec<Checked>,
}

/// One object's verdict.
#[derive(Debug, Clone, Serialize)]
pub struct Checked {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub file: String,
    /// 1-based, as in config errors.
    pub document: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub item: Option<usize>,
    /// What decides: the strongest mode among the broken policies, `Enforce` for a pod
    /// that cannot be read; `None`: allowed.
    pub mode: Option<Mode>,
    /// Why the pod cannot be read (field and error).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The webhook's messages, one per broken policy.
    pub messages: Vec<String>,
    pub findings: Vec<Finding>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// `namespace/name`.
    pub policy: String,
    pub mode: Mode,
    pub violations: Vec<FindingViolation>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FindingViolation {
    /// The control (`runAsNonRoot`) or rule (`allowedRegistries`) broken.
    pub rule: &'static str,
    pub container: Option<String>,
    /// In the object: `spec.template.spec.containers[0].image` for a Deployment.
    pub field: String,
    pub message: String,
}

impl Report {
    /// Whether any object is denied (`meshctl` exits with status 1).
    pub fn denied(&self) -> bool {
        self.objects.iter().any(|o| o.mode == Some(Mode::Enforce))
    }

    /// Each object and its verdict, its messages indented below it.
    pub fn table(&self) -> String {
        let mut out = String::new();
        for o in &self.objects {
            let verdict = match (o.mode, &o.error) {
                (_, Some(_)) | (Some(Mode::Enforce), _) => "denied",
                (Some(Mode::Warn), _) => "allowed with warnings",
                (Some(Mode::Audit), _) => "allowed (audited)",
                (None, _) => "allowed",
            };
            let _ = writeln!(out, "{} {}/{}: {verdict}", o.kind, o.namespace, o.name);
            if let Some(e) = &o.error {
                let _ = writeln!(out, "  its pod cannot be read: {e}");
            }
            for m in &o.messages {
                let _ = writeln!(out, "  {m}");
            }
        }
        out
    }

    /// One line for stderr.
    pub fn summary(&self) -> String {
        let count = |mode| self.objects.iter().filter(|o| o.mode == mode).count();
        let (objects, policies) = (self.objects.len(), self.policies.len());
        format!(
            "{objects} object{} checked against {policies} {}: {} denied, {} with warnings, \
             {} audited, {} allowed",
            if objects == 1 { "" } else { "s" },
            if policies == 1 {
                "WorkloadPolicy"
            } else {
                "WorkloadPolicies"
            },
            count(Some(Mode::Enforce)),
            count(Some(Mode::Warn)),
            count(Some(Mode::Audit)),
            count(None),
        )
    }
}

/// An object with a pod, read but not yet checked.
struct Pending {
    api_version: String,
    checked: Checked,
    value: Value,
}

/// Checks every pod of `manifests` against the policies of `policies` and `manifests`
/// (see the module doc), with `inject` as the template meshd's own containers are
/// recognised by and `root_namespace` as the mesh's.
pub fn check(
    manifests: &[Input],
    policies: &[Input],
    inject: &InjectConfig,
    root_namespace: &str,
) -> Result<Report, Error> {
    let mut mesh = Vec::new();
    let mut pending = Vec::new();
    let mut errors = Vec::new();
    let mut seen: HashMap<_, String> = HashMap::new();
    let inputs = policies
        .iter()
        .map(|i| (i, false))
        .chain(manifests.iter().map(|i| (i, true)));
    for (input, with_pods) in inputs {
        let err = |document, item, object, field, message| ConfigError {
            file: input.path.clone(),
            document: Some(document),
            item,
            object,
            field,
            message,
        };
        let documents = match parse::documents(&input.path, &input.text) {
            Ok(d) => d,
            Err(e) => {
                errors.push(*e);
                continue;
            }
        };
        for (i, document) in documents.into_iter().enumerate() {
            let document_number = i + 1;
            if document.is_null() {
                continue;
            }
            let objects = match parse::objects_of(document) {
                Ok(objects) => objects,
                Err(e) => {
                    let list = Some("List".to_string());
                    errors.push(err(document_number, None, list, e.field_opt(), e.message));
                    continue;
                }
            };
            for (item, value) in objects {
                let text = |key: &str| value.get(key).and_then(Value::as_str).unwrap_or("");
                let (api_version, kind) = (text("apiVersion").to_string(), text("kind"));
                if template_pointer(&api_version, kind).is_some() {
                    if with_pods {
                        let meta = |key: &str| value.pointer(&format!("/metadata/{key}"));
                        let meta = |key| meta(key).and_then(Value::as_str).map(str::to_string);
                        pending.push(Pending {
                            checked: Checked {
                                kind: kind.to_string(),
                                namespace: meta("namespace").unwrap_or("default".into()),
                                name: meta("name").unwrap_or_default(),
                                file: input.path.display().to_string(),
                                document: document_number,
                                item,
                                mode: None,
                                error: None,
                                messages: Vec::new(),
                                findings: Vec::new(),
                            },
                            api_version,
                            value,
                        });
                    }
                    continue;
                }
                // The mesh's side, read as the file source reads it; other kinds
                // (Services, ConfigMaps, ...) are no business of admission.
                let mesh_side = (api_version.as_str(), kind) == ("v1", "Namespace")
                    || api_version.split('/').next() == Some(crd::GROUP)
                    || api_version.is_empty()
                    || kind.is_empty();
                if !mesh_side {
                    continue;
                }
                match parse::parse_document(value) {
                    Ok(Read::Object(object)) => {
                        if !matches!(
                            object,
                            MeshObject::Namespace(_)
                                | MeshObject::PeerAuthentication(_)
                                | MeshObject::WorkloadPolicy(_)
                        ) {
                            continue;
                        }
                        let here = format!(
                            "{}: {}",
                            input.path.display(),
                            parse::place(document_number, item)
                        );
                        if let Some(first) = seen.insert((object.kind(), object.key()), here) {
                            errors.push(err(
                                document_number,
                                item,
                                Some(parse::label(&object)),
                                None,
                                format!("already defined in {first}"),
                            ));
                        }
                        mesh.push(object);
                    }
                    Ok(Read::Ignored { .. }) => {}
                    Err((object, e)) => {
                        errors.push(err(document_number, item, object, e.field_opt(), e.message))
                    }
                }
            }
        }
    }
    if !errors.is_empty() {
        return Err(Error::Invalid(errors));
    }
    let defaults = MeshDefaults {
        root_namespace: root_namespace.to_string(),
        ..MeshDefaults::default()
    };
    let snapshot = MeshSnapshot::build(0, defaults, mesh);
    let policies = snapshot.workload_policies.keys().map(|k| k.to_string());
    let objects = pending
        .into_iter()
        .map(|p| {
            let mut checked = p.checked;
            match pod_of(&p.api_version, &checked.kind, &p.value) {
                Ok(Some(pod)) => {
                    let verdict = super::check(&snapshot, inject, &checked.namespace, &pod);
                    checked.mode = verdict.mode();
                    checked.messages = verdict.messages();
                    checked.findings = verdict
                        .findings
                        .into_iter()
                        .map(|f| Finding {
                            policy: f.policy.to_string(),
                            mode: f.mode,
                            violations: f
                                .violations
                                .into_iter()
                                .map(|v| FindingViolation {
                                    rule: v.control,
                                    container: v.container,
                                    field: v.field,
                                    message: v.message,
                                })
                                .collect(),
                        })
                        .collect();
                }
                // `template_pointer` said it has one.
                Ok(None) => {}
                Err(e) => {
                    checked.mode = Some(Mode::Enforce);
                    checked.error = Some(e);
                }
            }
            checked
        })
        .collect();
    Ok(Report {
        policies: policies.collect(),
        objects,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(path: &str, text: &str) -> Input {
        Input {
            path: path.into(),
            text: text.into(),
        }
    }

    fn policy(namespace: &str, name: &str, spec: &str) -> String {
        format!(
            "apiVersion: security.meshd.io/v1alpha1\nkind: WorkloadPolicy\n\
             metadata: {{name: {name}, namespace: {namespace}}}\nspec: {spec}\n"
        )
    }

    const LATEST: &str = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: shop}\n\
        spec: {template: {spec: {containers: [{name: app, image: 'nginx:latest'}]}}}\n";

    fn run(manifests: &[Input], policies: &[Input]) -> Result<Report, Error> {
        check(
            manifests,
            policies,
            &InjectConfig::default(),
            "meshd-system",
        )
    }

    fn verdicts(report: &Report) -> Vec<(String, Option<Mode>)> {
        report
            .objects
            .iter()
            .map(|o| (format!("{} {}/{}", o.kind, o.namespace, o.name), o.mode))
            .collect()
    }

    #[test]
    fn policies_come_from_policy_files_and_from_the_manifests() {
        let enforce = policy(
            "meshd-system",
            "latest",
            "{mode: Enforce, rules: {forbidLatestTag: true}}",
        );
        let warn = policy(
            "shop",
            "digest",
            "{mode: Warn, rules: {requireImageDigest: true}}",
        );
        let report = run(
            &[input("m.yaml", &format!("{LATEST}---\n{warn}"))],
            &[input("p.yaml", &enforce)],
        )
        .unwrap();
        assert_eq!(report.policies, ["meshd-system/latest", "shop/digest"]);
        assert_eq!(
            verdicts(&report),
            [("Deployment shop/web".to_string(), Some(Mode::Enforce))]
        );
        assert!(report.denied());
        let o = &report.objects[0];
        assert_eq!((o.file.as_str(), o.document), ("m.yaml", 1));
        assert_eq!(o.findings.len(), 2);
        let v = &o.findings[0].violations[0];
        assert_eq!(
            (v.rule, v.container.as_deref(), v.field.as_str()),
            (
                "forbidLatestTag",
                Some("app"),
                "spec.template.spec.containers[0].image"
            )
        );
        assert_eq!(o.findings[1].mode, Mode::Warn);
        assert_eq!(
            report.table(),
            "Deployment shop/web: denied\n  denied by meshd-system/latest (Enforce): container \"app\": \
             image \"nginx:latest\" uses the tag latest [forbidLatestTag]\n  warning by shop/digest (Warn): \
             container \"app\": image \"nginx:latest\" must be pinned by digest (@sha256:...) [requireImageDigest]\n"
        );
        assert_eq!(
            report.summary(),
            "1 object checked against 2 WorkloadPolicies: 1 denied, 0 with warnings, 0 audited, 0 allowed"
        );

        // A --policy file's pods are not checked; without policies everything passes.
        let report = run(&[input("m.yaml", &enforce)], &[input("p.yaml", LATEST)]).unwrap();
        assert!(report.objects.is_empty());
        let report = run(&[input("m.yaml", LATEST)], &[]).unwrap();
        assert!(report.policies.is_empty());
        assert_eq!(
            verdicts(&report),
            [("Deployment shop/web".to_string(), None)]
        );
    }

    #[test]
    fn namespaces_give_labels_and_peer_authentications_mtls() {
        let prod = policy(
            "meshd-system",
            "mesh",
            "{mode: Enforce, namespaceSelector: {matchLabels: {tier: prod}}, rules: {requireMesh: true}}",
        );
        let host = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: shop}\n\
                    spec: {hostNetwork: true, containers: [{name: app, image: x}]}\n";
        let namespace =
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {tier: prod}}\n";
        let permissive = "apiVersion: security.meshd.io/v1alpha1\nkind: PeerAuthentication\n\
                          metadata: {name: default, namespace: shop}\nspec: {mtls: {mode: PERMISSIVE}}\n";
        let mode = |manifests: &[&str]| {
            let text = manifests.join("---\n");
            run(&[input("m.yaml", &text)], &[input("p.yaml", &prod)])
                .unwrap()
                .objects[0]
                .mode
        };
        assert_eq!(mode(&[host]), None, "shop is not labelled tier=prod");
        assert_eq!(
            mode(&[host, namespace]),
            Some(Mode::Enforce),
            "STRICT by default"
        );
        assert_eq!(mode(&[host, namespace, permissive]), None);

        // Another root namespace: the policy in meshd-system is then shop's no more.
        let elsewhere = check(
            &[input("m.yaml", &[host, namespace].join("---\n"))],
            &[input("p.yaml", &prod)],
            &InjectConfig::default(),
            "mesh-root",
        )
        .unwrap();
        assert_eq!(elsewhere.objects[0].mode, None);
    }

    #[test]
    fn an_unreadable_pod_is_denied_with_the_field() {
        let list = "apiVersion: v1\nkind: List\nitems:\n\
            - {apiVersion: v1, kind: ConfigMap, metadata: {name: c}}\n\
            - {apiVersion: batch/v1, kind: CronJob, metadata: {name: nightly, namespace: ops},\n   \
               spec: {jobTemplate: {spec: {template: {spec: {containers: [{name: a, ports: [{containerPort: x}]}]}}}}}}\n";
        let report = run(&[input("m.yaml", list)], &[]).unwrap();
        let o = &report.objects[0];
        assert_eq!(
            (o.document, o.item, o.mode),
            (1, Some(1), Some(Mode::Enforce))
        );
        let e = o.error.as_deref().unwrap();
        assert!(
            e.starts_with("spec.jobTemplate.spec.template.spec.containers[0].ports[0].containerPort: invalid type"),
            "{e}"
        );
        assert!(report.table().starts_with(
            "CronJob ops/nightly: denied\n  its pod cannot be read: spec.jobTemplate"
        ));
        assert!(report.denied());
    }

    #[test]
    fn an_invalid_policy_is_an_error_naming_file_document_object_and_field() {
        let bad = policy("shop", "oops", "{mode: Deny, profile: baseline}");
        let err = run(&[input("m.yaml", &format!("{LATEST}---\n{bad}"))], &[])
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "m.yaml: document 2 (WorkloadPolicy shop/oops): spec.mode: \"Deny\" is not a mode: use Enforce, Warn or Audit"
        );
        let err = run(&[input("m.yaml", LATEST)], &[input("p.yaml", "apiVersion: security.meshd.io/v1alpha1\nkind: WorkloadPolicies\nmetadata: {name: x}\n")])
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("p.yaml: document 1 (WorkloadPolicies default/x): kind: "),
            "{err}"
        );
        let err = run(&[input("m.yaml", "kind: Deployment\n")], &[])
            .unwrap_err()
            .to_string();
        assert_eq!(err, "m.yaml: document 1: apiVersion: is required");
        let err = run(&[input("m.yaml", "a: [")], &[])
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("m.yaml: not valid YAML"), "{err}");

        let twice = policy("shop", "p", "{mode: Enforce, profile: baseline}");
        let err = run(&[input("m.yaml", &twice)], &[input("p.yaml", &twice)])
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "m.yaml: document 1 (WorkloadPolicy shop/p): already defined in p.yaml: document 1"
        );
    }

    #[test]
    fn a_directory_is_read_recursively() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("apps/web")).unwrap();
        std::fs::write(dir.path().join("apps/web/deploy.yml"), LATEST).unwrap();
        std::fs::write(dir.path().join("apps/notes.txt"), "not yaml: [").unwrap();
        std::fs::write(
            dir.path().join("policy.yaml"),
            policy(
                "meshd-system",
                "latest",
                "{mode: Audit, rules: {forbidLatestTag: true}}",
            ),
        )
        .unwrap();
        let inputs = load(dir.path()).unwrap();
        let names: Vec<_> = inputs
            .iter()
            .map(|i| {
                i.path
                    .strip_prefix(dir.path())
                    .unwrap()
                    .display()
                    .to_string()
            })
            .collect();
        assert_eq!(names, ["apps/web/deploy.yml", "policy.yaml"]);
        let report = run(&inputs, &[]).unwrap();
        assert_eq!(
            verdicts(&report),
            [("Deployment shop/web".to_string(), Some(Mode::Audit))]
        );
        assert!(!report.denied());
        let missing = load(&dir.path().join("gone.yaml")).unwrap_err().to_string();
        assert!(
            missing.starts_with("cannot read ") && missing.contains("gone.yaml: "),
            "{missing}"
        );
    }
}
