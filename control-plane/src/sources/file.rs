//! The file source: a directory of Kubernetes-style YAML, the embedded default.
//!
//! Every `*.yaml`/`*.yml` file under the directory (recursively; names starting with `.`
//! are skipped, which also makes Kubernetes ConfigMap mounts work) may hold several
//! documents of kind `v1` Namespace, Service and Pod, `discovery.k8s.io/v1`
//! EndpointSlice, and `security.meshd.io/v1alpha1` PeerAuthentication.
//!
//! Each file is all or nothing: if any document in it is wrong, the file's last good
//! content stays in force and the error is reported with file, document, object and
//! field. After every change on disk the whole directory is rescanned (unchanged files
//! are not parsed again) and the full set is handed to the store, which publishes a
//! snapshot only if something really changed.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use notify::Watcher;
use serde::Deserialize;

use super::SharedErrors;
use super::convert::{self, FieldError};
use super::crd;
use crate::model::{MeshObject, ObjectKey, Store, StoreEvent};

/// One problem in the config directory.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based index of the YAML document in the file.
    pub document: Option<usize>,
    /// `Kind namespace/name`, when it could be read.
    pub object: Option<String>,
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(doc) = self.document {
            write!(f, ": document {doc}")?;
        }
        if let Some(obj) = &self.object {
            write!(f, " ({obj})")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Parses one file's text. All documents or none.
pub fn parse_file(path: &Path, text: &str) -> Result<Vec<MeshObject>, Vec<ConfigError>> {
    let mut objects = Vec::new();
    let mut errors = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let document = i + 1;
        let err = |object: Option<String>, field: Option<String>, message: String| ConfigError {
            file: path.to_path_buf(),
            document: Some(document),
            object,
            field,
            message,
        };
        let value = match serde_yaml::Value::deserialize(doc) {
            Ok(serde_yaml::Value::Null) => continue,
            Ok(v) => v,
            Err(e) => {
                errors.push(err(None, None, format!("not valid YAML: {e}")));
                // The parser cannot resynchronise after a syntax error.
                break;
            }
        };
        match parse_document(value) {
            Ok(obj) => objects.push(obj),
            Err((object, e)) => errors.push(err(object, e.field_opt(), e.message)),
        }
    }
    if errors.is_empty() {
        Ok(objects)
    } else {
        Err(errors)
    }
}

impl FieldError {
    fn field_opt(&self) -> Option<String> {
        Some(self.field.clone()).filter(|f| !f.is_empty())
    }
}

fn parse_document(value: serde_yaml::Value) -> Result<MeshObject, (Option<String>, FieldError)> {
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
fn typed<T: serde::de::DeserializeOwned>(value: serde_yaml::Value) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { String::new() } else { path };
        FieldError::new(field, e.into_inner().to_string())
    })
}

/// The directory's content as of the last scan, file by file.
#[derive(Debug)]
pub struct FileSource {
    dir: PathBuf,
    /// Last good content of every file: (text it was parsed from, objects).
    good: BTreeMap<PathBuf, (String, Vec<MeshObject>)>,
    errors: Vec<ConfigError>,
}

impl FileSource {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            good: BTreeMap::new(),
            errors: Vec::new(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Problems found by the last [`FileSource::scan`].
    pub fn errors(&self) -> &[ConfigError] {
        &self.errors
    }

    /// Rereads the directory and returns every object now in force.
    pub fn scan(&mut self) -> Vec<MeshObject> {
        let mut errors = Vec::new();
        let mut files = Vec::new();
        if let Err(e) = list_yaml_files(&self.dir, &mut files) {
            errors.push(ConfigError {
                file: self.dir.clone(),
                document: None,
                object: None,
                field: None,
                message: format!("cannot read the config directory: {e}"),
            });
            // Keep serving the last good state rather than an empty mesh.
            self.errors = errors;
            return self.objects();
        }
        files.sort();
        self.good.retain(|path, _| files.contains(path));
        for path in files {
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) => {
                    errors.push(ConfigError {
                        file: path.clone(),
                        document: None,
                        object: None,
                        field: None,
                        message: format!("cannot read: {e}"),
                    });
                    continue;
                }
            };
            if self.good.get(&path).is_some_and(|(t, _)| *t == text) {
                continue;
            }
            match parse_file(&path, &text) {
                Ok(objs) => {
                    self.good.insert(path, (text, objs));
                }
                Err(errs) => errors.extend(errs),
            }
        }
        // A file with an error keeps its previous content; report errors of unchanged
        // broken files again, since they are still broken.
        let (objects, dup_errors) = self.merge();
        errors.extend(dup_errors);
        self.errors = errors;
        objects
    }

    fn objects(&self) -> Vec<MeshObject> {
        self.merge().0
    }

    /// Joins all files; an object defined in two files is taken from the first one.
    fn merge(&self) -> (Vec<MeshObject>, Vec<ConfigError>) {
        let mut seen: HashMap<(crate::model::ObjectKind, ObjectKey), &Path> = HashMap::new();
        let mut objects = Vec::new();
        let mut errors = Vec::new();
        for (path, (_, objs)) in &self.good {
            for obj in objs {
                let id = (obj.kind(), obj.key());
                if let Some(first) = seen.get(&id) {
                    errors.push(ConfigError {
                        file: path.clone(),
                        document: None,
                        object: Some(format!("{} {}", id.0, id.1)),
                        field: None,
                        message: format!(
                            "also defined in {}; that definition is used",
                            first.display()
                        ),
                    });
                    continue;
                }
                seen.insert(id, path);
                objects.push(obj.clone());
            }
        }
        (objects, errors)
    }

    /// Starts watching the directory: after every change, the directory's state goes to
    /// the store. Fails now if the directory cannot be watched.
    pub fn spawn_watch(mut self, store: Store, shared: SharedErrors) -> notify::Result<()> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut watcher =
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
                // Reading the files (our own scan) raises access events; reacting to
                // them would rescan forever and keep the store's debounce from ever
                // settling.
                if res.is_ok_and(|e| !matches!(e.kind, notify::EventKind::Access(_))) {
                    let _ = tx.send(());
                }
            })?;
        watcher.watch(&self.dir, notify::RecursiveMode::Recursive)?;
        publish_errors(&shared, &self.errors, &[]);
        tokio::spawn(async move {
            let _watcher = watcher;
            while rx.recv().await.is_some() {
                // Editors write in several steps; let the burst land before reading.
                tokio::time::sleep(Duration::from_millis(50)).await;
                while rx.try_recv().is_ok() {}
                let before = self.errors.clone();
                let objects = self.scan();
                publish_errors(&shared, &self.errors, &before);
                store.send(StoreEvent::Replace(objects));
            }
        });
        Ok(())
    }
}

/// Logs what is newly broken or fixed, and shares the current list.
fn publish_errors(shared: &SharedErrors, now: &[ConfigError], before: &[ConfigError]) {
    for e in now.iter().filter(|e| !before.contains(e)) {
        tracing::warn!("config error (last good state kept): {e}");
    }
    if now.is_empty() && !before.is_empty() {
        tracing::info!("config directory is free of errors again");
    }
    *shared.lock().unwrap_or_else(|p| p.into_inner()) = now.iter().map(|e| e.to_string()).collect();
}

fn list_yaml_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        // Follows symlinks: ConfigMap mounts link each file into a hidden `..data` dir.
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            list_yaml_files(&path, out)?;
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            out.push(path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata:
  name: web-1
  namespace: shop
  labels: {app: web}
  annotations: {meshd.io/upstreams: "db:5432=15002"}
spec:
  containers: [{name: app, image: web}]
status: {podIP: 10.0.0.1}
"#;

    fn p() -> PathBuf {
        PathBuf::from("mesh/web.yaml")
    }

    #[test]
    fn a_good_file_parses_every_document() {
        let objs = parse_file(&p(), GOOD).unwrap();
        assert_eq!(objs.len(), 2);
        let MeshObject::Workload(w) = &objs[1] else {
            panic!("expected a pod")
        };
        assert_eq!(w.upstreams[0].service, ObjectKey::new("shop", "db"));
    }

    #[test]
    fn a_wrong_field_is_named_with_file_document_and_object() {
        let text = GOOD.replace("port: 80,", "port: eighty,");
        let errs = parse_file(&p(), &text).unwrap_err();
        assert_eq!(errs.len(), 1);
        let msg = errs[0].to_string();
        assert!(
            msg.starts_with("mesh/web.yaml: document 1 (Service shop/web): spec.ports[0].port: "),
            "{msg}"
        );
    }

    #[test]
    fn a_semantic_error_names_the_field() {
        let text = GOOD.replace("podIP: 10.0.0.1", "podIP: 10.0.0.300");
        let msg = parse_file(&p(), &text).unwrap_err()[0].to_string();
        assert_eq!(
            msg,
            "mesh/web.yaml: document 2 (Pod shop/web-1): status.podIP: \"10.0.0.300\" is not an IP address"
        );
    }

    #[test]
    fn missing_name_and_unknown_kind_are_reported() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {}\nspec: {}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\n";
        let errs = parse_file(&p(), text).unwrap_err();
        assert_eq!(errs.len(), 2);
        assert_eq!(errs[0].field.as_deref(), Some("metadata.name"));
        assert_eq!(errs[1].document, Some(2));
        assert!(
            errs[1]
                .message
                .contains("apps/v1 Deployment is not supported")
        );
    }

    #[test]
    fn broken_yaml_is_reported() {
        let errs = parse_file(&p(), "apiVersion: v1\nkind: [unclosed\n").unwrap_err();
        assert!(errs[0].message.starts_with("not valid YAML"), "{:?}", errs);
    }

    #[test]
    fn a_broken_file_keeps_its_last_good_content() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("web.yaml");
        std::fs::write(&file, GOOD).unwrap();
        let mut src = FileSource::new(dir.path());
        assert_eq!(src.scan().len(), 2);
        std::fs::write(&file, GOOD.replace("port: 80,", "port: -1,")).unwrap();
        let objs = src.scan();
        assert_eq!(objs.len(), 2, "last good content stays");
        assert_eq!(src.errors().len(), 1);
        std::fs::remove_file(&file).unwrap();
        assert!(src.scan().is_empty(), "a deleted file removes its objects");
        assert!(src.errors().is_empty());
    }

    #[test]
    fn an_object_defined_twice_is_taken_from_the_first_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), GOOD).unwrap();
        std::fs::write(dir.path().join("b.yaml"), GOOD).unwrap();
        std::fs::write(dir.path().join(".swap.yaml"), "garbage: [").unwrap();
        let mut src = FileSource::new(dir.path());
        assert_eq!(src.scan().len(), 2);
        assert_eq!(src.errors().len(), 2);
        assert!(src.errors()[0].to_string().contains("also defined in"));
    }

    #[test]
    fn peer_authentications_parse_and_bad_ones_name_the_field() {
        let good = "apiVersion: security.meshd.io/v1alpha1\nkind: PeerAuthentication\nmetadata: {name: web, namespace: shop}\nspec:\n  selector: {matchLabels: {app: web}}\n  mtls: {mode: STRICT}\n  portLevelMtls: {\"8080\": {mode: PERMISSIVE}}\n";
        let objs = parse_file(&p(), good).unwrap();
        let MeshObject::PeerAuthentication(pa) = &objs[0] else {
            panic!("{objs:?}")
        };
        assert_eq!(pa.port_modes[&8080], crate::model::MtlsMode::Permissive);
        for (bad, field, says) in [
            (
                good.replace("mode: STRICT", "mode: strict"),
                "spec.mtls.mode",
                "is not a mode",
            ),
            (
                good.replace("  selector: {matchLabels: {app: web}}\n", ""),
                "spec.portLevelMtls[\"8080\"]",
                "need spec.selector",
            ),
            (
                good.replace("\"8080\"", "http"),
                "spec.portLevelMtls[\"http\"]",
                "port number",
            ),
            (
                good.replace("mtls: {mode: STRICT}", "mtsl: {mode: STRICT}"),
                "spec.mtsl",
                "unknown field `mtsl`",
            ),
        ] {
            let errs = parse_file(&p(), &bad).unwrap_err();
            let e = &errs[0];
            assert_eq!(e.object.as_deref(), Some("PeerAuthentication shop/web"));
            assert_eq!(e.field.as_deref(), Some(field), "{e}");
            assert!(e.message.contains(says), "{e}");
        }
    }

    #[test]
    fn authorization_policies_parse_and_bad_ones_name_the_field() {
        let good = "apiVersion: security.meshd.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: web, namespace: shop}\nspec:\n  selector: {matchLabels: {app: web}}\n  action: DENY\n  rules:\n    - from: [{source: {principals: [\"cluster.local/ns/shop/sa/client\"], ipBlocks: [\"10.0.0.0/8\"]}}]\n      to: [{operation: {methods: [POST], paths: [\"/admin*\"], ports: [\"8080\"]}}]\n      when: [{key: \"request.headers[X-Env]\", values: [prod]}]\n";
        let objs = parse_file(&p(), good).unwrap();
        let MeshObject::AuthorizationPolicy(ap) = &objs[0] else {
            panic!("{objs:?}")
        };
        assert_eq!(ap.action, crate::authz::Action::Deny);
        assert_eq!(ap.rule_id(0), "shop/web#0");
        assert_eq!(ap.rules[0].when[0].header, "x-env");
        assert_eq!(
            ap.rules[0].from[0].principals[0],
            crate::authz::StringMatch::Exact("spiffe://cluster.local/ns/shop/sa/client".into())
        );
        for (bad, field, says) in [
            (good.replace("action: DENY", "action: BLOCK"), "spec.action", "is not an action"),
            (good.replace("10.0.0.0/8", "10.0.0.0/33"), "spec.rules[0].from[0].source.ipBlocks[0]", "CIDR"),
            (good.replace("cluster.local/ns/shop/sa/client", "web"), "spec.rules[0].from[0].source.principals[0]", "SPIFFE"),
            (good.replace("request.headers[X-Env]", "source.ip"), "spec.rules[0].when[0].key", "request.headers"),
            (good.replace("\"8080\"", "\"http\""), "spec.rules[0].to[0].operation.ports[0]", "port number"),
            (good.replace("source: {principals: [\"cluster.local/ns/shop/sa/client\"], ipBlocks: [\"10.0.0.0/8\"]}", "source: {}"), "spec.rules[0].from[0].source", "matches every caller"),
            (format!("{}    - {{}}\n", good), "spec.rules[1]", "an empty rule matches every request"),
        ] {
            let errs = parse_file(&p(), &bad).unwrap_err();
            let e = &errs[0];
            assert_eq!(e.object.as_deref(), Some("AuthorizationPolicy shop/web"));
            assert_eq!(e.field.as_deref(), Some(field), "{e}");
            assert!(e.message.contains(says), "{e}");
        }
    }

    /// The source reads its files after every change; those reads raise inotify access
    /// events. Taken for changes, they made it rescan every 50 ms forever, so a burst
    /// never went quiet and every snapshot waited for `--debounce-max`.
    #[tokio::test]
    async fn its_own_reads_do_not_hold_a_change_back() {
        use crate::model::store::{Store, StoreConfig};
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), GOOD).unwrap();
        let mut source = FileSource::new(dir.path());
        let initial = source.scan();
        let store = Store::start(
            StoreConfig {
                defaults: Default::default(),
                debounce: Duration::from_millis(100),
                debounce_max: Duration::from_secs(20),
            },
            initial,
        );
        source
            .spawn_watch(store.clone(), SharedErrors::default())
            .unwrap();
        let mut snapshots = store.subscribe();
        let before = snapshots.borrow_and_update().version;
        let written = std::time::Instant::now();
        std::fs::write(
            dir.path().join("b.yaml"),
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: other}\n",
        )
        .unwrap();
        tokio::time::timeout(
            Duration::from_secs(10),
            snapshots.wait_for(|s| s.version > before),
        )
        .await
        .expect("the change is published before --debounce-max")
        .unwrap();
        let took = written.elapsed();
        assert!(took < Duration::from_secs(2), "the change took {took:?}");
    }
}
