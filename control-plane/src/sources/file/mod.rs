//! The file source: a directory of Kubernetes-style YAML, the embedded default.
//!
//! Every `*.yaml`/`*.yml` file under the directory (recursively, through symlinks; see
//! [`walk`] for what is read and how loops are cut) may hold several documents of kind
//! `v1` Namespace, Service and Pod, `discovery.k8s.io/v1` EndpointSlice, and
//! `security.meshd.io/v1alpha1` PeerAuthentication, AuthorizationPolicy and
//! WorkloadPolicy. A Kubernetes
//! ConfigMap volume works as it is: its files are read through the visible links, and
//! an update (an atomic swap of `..data`) is one change.
//!
//! - **Each file is all or nothing**: if any document in it is wrong, the file's last good
//!   content stays in force and the error is reported with file, document, object and
//!   field ([`parse`], which also holds the parser's budgets).
//! - **`kubectl get … -o yaml` output works**: a `v1` List is read item by item, and
//!   objects of kinds meshd does not read are ignored with a *note* each (logged at
//!   debug, counted at info, listed by `meshctl analyze` and `meshctl status`), not
//!   refused: `kubectl get all -A -o yaml > mesh.yaml` is a valid config file.
//! - **An object has one definition**: the same kind, namespace and name in a second file
//!   does not replace the one in force, as the API server refuses a second object of one
//!   name. The newcomer's file is refused as a whole (all or nothing, as for any other
//!   error in it: its last good content stays), and reported naming both files. The
//!   definition in force is the one that was already in force; when none was (at start,
//!   after any restart, or when its file stops defining it), the file modified longest
//!   ago wins, then the first in path order: a newcomer cannot win by its name
//!   (`00-dup.yaml`), so a restart keeps what was in force.
//! - **Nothing here blocks the async workers**: reading and parsing run on tokio's
//!   blocking pool ([`FileSource::spawn`]). meshd answers health checks and serves ADS
//!   while a directory is read; it is ready (`pending` empty) once the first read is in
//!   a published snapshot.
//!
//! After every change on disk the whole directory is rescanned (unchanged files are not
//! parsed again) and the full set is handed to the store, which publishes a snapshot
//! only if something really changed.

pub mod parse;
pub mod walk;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use notify::Watcher;
use tokio::sync::watch;

use parse::{Defined, MAX_FILE_BYTES, label, parse_file, place};

use super::SharedErrors;
use crate::model::{MeshObject, ObjectKey, ObjectKind, Store, StoreEvent};

/// One problem in the config directory.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based index of the YAML document in the file (empty documents not counted).
    pub document: Option<usize>,
    /// Index in the document's `items`, when the document is a List.
    pub item: Option<usize>,
    /// `Kind namespace/name`, when it could be read.
    pub object: Option<String>,
    pub field: Option<String>,
    pub message: String,
}

impl ConfigError {
    fn file(file: &Path, message: String) -> Self {
        ConfigError {
            file: file.to_path_buf(),
            document: None,
            item: None,
            object: None,
            field: None,
            message,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(doc) = self.document {
            write!(f, ": {}", parse::place(doc, self.item))?;
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

/// What [`FileSource::spawn`]'s readiness waits for.
const PENDING: &str = "config directory";

type Id = (ObjectKind, ObjectKey);

/// One file's content: the text it was parsed from and the objects it defines.
#[derive(Debug)]
struct Content {
    text: String,
    /// When the file was last modified, as of the latest read: the tie-break between
    /// two definitions of which neither is in force (see the module doc).
    modified: SystemTime,
    objects: Vec<Defined>,
    /// What the file holds that meshd does not read.
    notes: Vec<ConfigError>,
}

/// The directory's content as of the last scan, file by file.
#[derive(Debug)]
pub struct FileSource {
    dir: PathBuf,
    /// Last good content of every file: the content last applied.
    good: BTreeMap<PathBuf, Content>,
    /// The file whose definition of each object is in force.
    in_force: HashMap<Id, PathBuf>,
    errors: Vec<ConfigError>,
    notes: Vec<ConfigError>,
}

/// A running [`FileSource`], as the rest of meshd sees it.
#[derive(Debug)]
pub struct Running {
    /// The problems found by the latest scan, one line each.
    pub errors: SharedErrors,
    /// What the latest scan ignored (objects of kinds meshd does not read), one line each.
    pub notes: SharedErrors,
    /// `["config directory"]` until the first scan is in a published snapshot, then empty.
    pub pending: watch::Receiver<Vec<String>>,
}

/// Which content of a file [`FileSource::merge`] is trying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Choice {
    /// What was just parsed.
    New,
    /// The last good content.
    Good,
    /// Nothing: the file applies nothing.
    Refused,
}

impl FileSource {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            good: BTreeMap::new(),
            in_force: HashMap::new(),
            errors: Vec::new(),
            notes: Vec::new(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Problems found by the last [`FileSource::scan`].
    pub fn errors(&self) -> &[ConfigError] {
        &self.errors
    }

    /// What the last [`FileSource::scan`] ignored: objects of kinds meshd does not read,
    /// in the content in force. Not problems.
    pub fn notes(&self) -> &[ConfigError] {
        &self.notes
    }

    /// Rereads the directory and returns every object now in force. Blocks: reads and
    /// parses files.
    pub fn scan(&mut self) -> Vec<MeshObject> {
        let mut errors = Vec::new();
        let mut parsed = BTreeMap::new();
        match walk::yaml_files(&self.dir) {
            Ok(listing) => {
                errors.extend(
                    (listing.problems.into_iter()).map(|(path, m)| ConfigError::file(&path, m)),
                );
                let present: BTreeSet<&PathBuf> = listing.files.iter().collect();
                self.good.retain(|path, _| present.contains(path));
                for path in listing.files {
                    let (text, modified) = match read_text(&path) {
                        Ok(t) => t,
                        Err(message) => {
                            errors.push(ConfigError::file(&path, message));
                            continue;
                        }
                    };
                    if let Some(good) = self.good.get_mut(&path).filter(|g| g.text == text) {
                        good.modified = modified;
                        continue;
                    }
                    match parse_file(&path, &text) {
                        Ok(file) => {
                            let content = Content {
                                text,
                                modified,
                                objects: file.defined,
                                notes: file.notes,
                            };
                            parsed.insert(path, content);
                        }
                        Err(errs) => errors.extend(errs),
                    }
                }
            }
            // Keep serving the last good state rather than an empty mesh.
            Err(e) => errors.push(ConfigError::file(
                &self.dir,
                format!("cannot read the config directory: {e}"),
            )),
        }
        // A file with an error keeps its previous content; errors of unchanged broken
        // files are reported again, since they are still broken.
        let (objects, duplicates) = self.merge(parsed);
        errors.extend(duplicates);
        errors.sort_by(|a, b| (&a.file, a.document, a.item).cmp(&(&b.file, b.document, b.item)));
        // A file refused in one round may be refused for the same object in the next.
        errors.dedup();
        self.errors = errors;
        self.notes = (self.good.values())
            .flat_map(|c| c.notes.iter().cloned())
            .collect();
        objects
    }

    /// Joins the files' good content with what was just `parsed`: one definition of each
    /// object is in force (see the module doc), and a file that defines an object in
    /// force elsewhere is refused as a whole, as any other error in it.
    fn merge(
        &mut self,
        mut parsed: BTreeMap<PathBuf, Content>,
    ) -> (Vec<MeshObject>, Vec<ConfigError>) {
        let paths: BTreeSet<PathBuf> = self.good.keys().chain(parsed.keys()).cloned().collect();
        let mut choice: BTreeMap<&PathBuf, Choice> = paths
            .iter()
            .map(|p| {
                (
                    p,
                    if parsed.contains_key(p) {
                        Choice::New
                    } else {
                        Choice::Good
                    },
                )
            })
            .collect();
        let mut errors = Vec::new();
        // Each round refuses the files that define an object another file holds, which
        // then fall back to their last good content, then to nothing; so it ends.
        let owners = loop {
            let mut definitions: BTreeMap<Id, Vec<(&PathBuf, &Content, &Defined)>> =
                BTreeMap::new();
            for (path, chosen) in &choice {
                let content = match chosen {
                    Choice::New => parsed.get(*path),
                    Choice::Good => self.good.get(*path),
                    Choice::Refused => None,
                };
                for d in content
                    .iter()
                    .flat_map(|c| c.objects.iter().map(move |d| (c, d)))
                {
                    let id = (d.1.object.kind(), d.1.object.key());
                    definitions.entry(id).or_default().push((*path, d.0, d.1));
                }
            }
            let mut owners = Vec::new();
            let mut losers: BTreeSet<&PathBuf> = BTreeSet::new();
            for (id, defs) in definitions {
                let held = self.in_force.get(&id);
                let winner = match defs.iter().position(|(path, ..)| Some(*path) == held) {
                    Some(i) => i,
                    // Nothing in force (at start, or its file stopped defining it): the
                    // oldest file, which a newcomer cannot become by its name.
                    None => (0..defs.len())
                        .min_by_key(|&i| (defs[i].1.modified, defs[i].0))
                        .unwrap_or(0),
                };
                let (owner, _, kept) = defs[winner];
                for (i, (path, _, d)) in defs.iter().enumerate() {
                    if i == winner {
                        continue;
                    }
                    losers.insert(path);
                    errors.push(ConfigError {
                        file: path.to_path_buf(),
                        document: Some(d.document),
                        item: d.item,
                        object: Some(label(&d.object)),
                        field: None,
                        message: format!(
                            "already defined in {} ({}), which stays in force: \
                             an object can be defined only once",
                            owner.display(),
                            place(kept.document, kept.item)
                        ),
                    });
                }
                owners.push((id, owner.clone(), kept.object.clone()));
            }
            if losers.is_empty() {
                break owners;
            }
            for path in losers {
                let c = choice.get_mut(path).expect("every file has a choice");
                *c = match c {
                    Choice::New if self.good.contains_key(path) => Choice::Good,
                    _ => Choice::Refused,
                };
            }
        };
        for (path, chosen) in &choice {
            if *chosen == Choice::New {
                let content = parsed.remove(*path).expect("parsed");
                self.good.insert((*path).clone(), content);
            }
        }
        let mut objects = Vec::with_capacity(owners.len());
        self.in_force = (owners.into_iter())
            .map(|(id, owner, object)| {
                objects.push(object);
                (id, owner)
            })
            .collect();
        (objects, errors)
    }

    /// Starts the source: a task that scans the directory now and after every change
    /// on disk, on tokio's blocking pool, and hands each result to the store. Fails now
    /// if the directory cannot be watched.
    pub fn spawn(self, store: Store) -> notify::Result<Running> {
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
        let errors = SharedErrors::default();
        let notes = SharedErrors::default();
        let (pending_tx, pending) = watch::channel(vec![PENDING.to_string()]);
        let (shared, shared_notes) = (errors.clone(), notes.clone());
        let mut source = self;
        tokio::spawn(async move {
            let _watcher = watcher;
            let mut first = true;
            loop {
                let before = (source.errors.clone(), source.notes.clone());
                let scanned = tokio::task::spawn_blocking(move || {
                    let objects = source.scan();
                    (source, objects)
                })
                .await;
                let Ok((scanned, objects)) = scanned else {
                    tracing::error!(
                        "reading the config directory panicked; it is no longer watched"
                    );
                    return;
                };
                source = scanned;
                publish_errors(&shared, &source.errors, &before.0);
                publish_notes(&shared_notes, &source.notes, &before.1);
                let count = objects.len();
                store.send(StoreEvent::Replace(objects));
                if first {
                    first = false;
                    let version = store.flush().await;
                    tracing::info!(
                        dir = %source.dir.display(),
                        objects = count,
                        errors = source.errors.len(),
                        ignored = source.notes.len(),
                        version,
                        "loaded config directory"
                    );
                    let _ = pending_tx.send(Vec::new());
                }
                if rx.recv().await.is_none() {
                    return;
                }
                // Editors write in several steps; let the burst land before reading.
                tokio::time::sleep(Duration::from_millis(50)).await;
                while rx.try_recv().is_ok() {}
            }
        });
        Ok(Running {
            errors,
            notes,
            pending,
        })
    }
}

/// A file's text, if it is UTF-8 and within [`MAX_FILE_BYTES`] (checked while
/// reading: the file may grow after it was listed), and when it was last modified.
///
/// The walk listed a regular file, but anything may have taken its name since: the file
/// is opened non-blocking (opening a FIFO for reading otherwise waits for a writer,
/// forever, holding up every later scan) and read only if what was opened is a regular
/// file.
fn read_text(path: &Path) -> Result<(String, SystemTime), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let cannot = |e: std::io::Error| format!("cannot read: {e}");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(cannot)?;
    let meta = file.metadata().map_err(cannot)?;
    if !meta.is_file() {
        return Err("not a regular file: not read".to_string());
    }
    // No modification time (no Linux filesystem lacks one): path order decides.
    let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
    let mut bytes = Vec::new();
    (file.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes)).map_err(cannot)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(format!(
            "larger than {} MiB: not read",
            MAX_FILE_BYTES >> 20
        ));
    }
    let text = String::from_utf8(bytes).map_err(|e| format!("not UTF-8 text: {e}"))?;
    Ok((text, modified))
}

/// Logs what is newly broken or fixed, and shares the current list.
fn publish_errors(shared: &SharedErrors, now: &[ConfigError], before: &[ConfigError]) {
    for e in now.iter().filter(|e| !before.contains(e)) {
        tracing::warn!(
            "config error (last good state kept): {}",
            crate::logging::Escaped(&e.to_string())
        );
    }
    if now.is_empty() && !before.is_empty() {
        tracing::info!("config directory is free of errors again");
    }
    *shared.lock().unwrap_or_else(|p| p.into_inner()) = now.iter().map(|e| e.to_string()).collect();
}

/// Logs what is newly ignored (each at debug, a count at info) and shares the list.
fn publish_notes(shared: &SharedErrors, now: &[ConfigError], before: &[ConfigError]) {
    let new: Vec<&ConfigError> = now.iter().filter(|n| !before.contains(n)).collect();
    for n in &new {
        tracing::debug!("config note: {n}");
    }
    if !new.is_empty() {
        let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
        for n in &new {
            let kind = n.object.as_deref().and_then(|o| o.split(' ').next());
            *kinds.entry(kind.unwrap_or("?")).or_default() += 1;
        }
        let kinds: Vec<String> = kinds.iter().map(|(k, n)| format!("{k} ×{n}")).collect();
        tracing::info!(
            "config directory: ignored {} object(s) of kinds meshd does not read ({}); \
             `meshctl analyze` lists them",
            new.len(),
            kinds.join(", ")
        );
    }
    *shared.lock().unwrap_or_else(|p| p.into_inner()) = now.iter().map(|n| n.to_string()).collect();
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
        let objs = parse_file(&p(), GOOD).unwrap().defined;
        assert_eq!(objs.len(), 2);
        let MeshObject::Workload(w) = &objs[1].object else {
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
    fn missing_name_and_unknown_kinds_of_meshds_group_are_errors() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {}\nspec: {}\n---\napiVersion: security.meshd.io/v1alpha1\nkind: AuthorisationPolicy\nmetadata: {name: x}\n---\napiVersion: security.meshd.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: y}\n";
        let errs = parse_file(&p(), text).unwrap_err();
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert_eq!(errs[0].field.as_deref(), Some("metadata.name"));
        assert_eq!(
            errs[1].to_string(),
            "mesh/web.yaml: document 2 (AuthorisationPolicy default/x): kind: \
             security.meshd.io/v1alpha1 AuthorisationPolicy is not a kind meshd knows; its \
             group holds security.meshd.io/v1alpha1 PeerAuthentication, AuthorizationPolicy and WorkloadPolicy"
        );
        assert_eq!(errs[2].document, Some(3));
    }

    /// What `kubectl get all,configmaps -n shop -o yaml` writes: one `v1` List, with
    /// the fields a real API server fills in. It loaded as an empty mesh: the List kind,
    /// and then the ReplicaSet, Deployment and ConfigMap in it, refused the file.
    const KUBECTL_EXPORT: &str = r#"apiVersion: v1
items:
- apiVersion: v1
  kind: Pod
  metadata:
    creationTimestamp: "2026-05-04T09:12:31Z"
    generateName: web-6d4cf56db6-
    labels: {app: web, pod-template-hash: 6d4cf56db6}
    name: web-6d4cf56db6-x7k2p
    namespace: shop
    ownerReferences:
    - apiVersion: apps/v1
      blockOwnerDeletion: true
      controller: true
      kind: ReplicaSet
      name: web-6d4cf56db6
      uid: 0b6e4a34-1c55-4d7e-9a3c-4c1f0e5b2a11
    resourceVersion: "48213"
    uid: 5f0e7d0a-8a65-4b1e-b0c4-1f3a2e6d7c90
  spec:
    containers:
    - image: registry.example/web:1.4.2
      imagePullPolicy: IfNotPresent
      name: web
      ports:
      - {containerPort: 8080, name: http, protocol: TCP}
      resources: {}
      terminationMessagePath: /dev/termination-log
      terminationMessagePolicy: File
    dnsPolicy: ClusterFirst
    nodeName: node-1
    restartPolicy: Always
    serviceAccount: web
    serviceAccountName: web
    terminationGracePeriodSeconds: 30
  status:
    conditions:
    - {lastProbeTime: null, lastTransitionTime: "2026-05-04T09:12:33Z", status: "True", type: Ready}
    hostIP: 192.168.49.2
    phase: Running
    podIP: 10.244.0.17
    podIPs:
    - {ip: 10.244.0.17}
    qosClass: BestEffort
    startTime: "2026-05-04T09:12:31Z"
- apiVersion: v1
  kind: Service
  metadata:
    creationTimestamp: "2026-05-01T08:00:00Z"
    labels: {component: apiserver, provider: kubernetes}
    name: kubernetes
    namespace: default
    resourceVersion: "192"
    uid: 8e0c1b6f-3f36-4a8b-9d1e-2c6a0f9e7b55
  spec:
    clusterIP: 10.96.0.1
    clusterIPs: [10.96.0.1]
    internalTrafficPolicy: Cluster
    ipFamilies: [IPv4]
    ipFamilyPolicy: SingleStack
    ports:
    - {name: https, port: 443, protocol: TCP, targetPort: 6443}
    sessionAffinity: None
    type: ClusterIP
  status:
    loadBalancer: {}
- apiVersion: v1
  kind: Service
  metadata:
    annotations:
      kubectl.kubernetes.io/last-applied-configuration: |
        {"apiVersion":"v1","kind":"Service","metadata":{"annotations":{},"name":"web","namespace":"shop"},"spec":{"ports":[{"name":"http","port":80,"targetPort":"http"}],"selector":{"app":"web"}}}
    name: web
    namespace: shop
    resourceVersion: "48001"
    uid: 2a9d8c7b-6e5f-4a3b-8c1d-0e9f8a7b6c5d
  spec:
    clusterIP: 10.96.12.40
    clusterIPs: [10.96.12.40]
    ports:
    - {name: http, port: 80, protocol: TCP, targetPort: http}
    selector: {app: web}
    sessionAffinity: None
    type: ClusterIP
  status:
    loadBalancer: {}
- apiVersion: apps/v1
  kind: Deployment
  metadata:
    annotations: {deployment.kubernetes.io/revision: "1"}
    generation: 1
    name: web
    namespace: shop
  spec:
    progressDeadlineSeconds: 600
    replicas: 1
    selector:
      matchLabels: {app: web}
    template:
      metadata:
        labels: {app: web}
      spec:
        containers:
        - {image: "registry.example/web:1.4.2", name: web, ports: [{containerPort: 8080, name: http}]}
  status:
    availableReplicas: 1
    readyReplicas: 1
    replicas: 1
- apiVersion: apps/v1
  kind: ReplicaSet
  metadata:
    labels: {app: web, pod-template-hash: 6d4cf56db6}
    name: web-6d4cf56db6
    namespace: shop
    ownerReferences:
    - {apiVersion: apps/v1, controller: true, kind: Deployment, name: web, uid: 9c8b7a6d-5e4f-4a3b-2c1d-0e9f8a7b6c5d}
  spec:
    replicas: 1
    selector:
      matchLabels: {app: web, pod-template-hash: 6d4cf56db6}
  status:
    replicas: 1
- apiVersion: v1
  data:
    ca.crt: |
      -----BEGIN CERTIFICATE-----
      MIIBdzCCAR2gAwIBAgIBADAKBggqhkjOPQQDAjAjMSEwHwYDVQQDDBhrM3Mtc2Vy
      -----END CERTIFICATE-----
  kind: ConfigMap
  metadata:
    name: kube-root-ca.crt
    namespace: shop
- apiVersion: rbac.authorization.k8s.io/v1
  kind: ClusterRole
  metadata: {name: view}
- apiVersion: discovery.k8s.io/v1beta1
  kind: EndpointSlice
  metadata: {name: web-abc, namespace: shop}
kind: List
metadata:
  resourceVersion: ""
"#;

    #[test]
    fn a_kubectl_export_is_read_and_what_meshd_does_not_read_is_noted() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("mesh.yaml");
        std::fs::write(&file, KUBECTL_EXPORT).unwrap();
        let mut src = FileSource::new(dir.path());
        let objects = src.scan();
        assert!(src.errors().is_empty(), "{:?}", src.errors());
        let mut read: Vec<String> = objects.iter().map(label).collect();
        read.sort();
        assert_eq!(
            read,
            [
                "Pod shop/web-6d4cf56db6-x7k2p",
                "Service default/kubernetes",
                "Service shop/web"
            ]
        );
        let notes: Vec<String> = src.notes().iter().map(|n| n.to_string()).collect();
        let at = |item: usize, rest: &str| {
            format!("{}: document 1, items[{item}] {rest}", file.display())
        };
        assert_eq!(
            notes,
            [
                at(
                    3,
                    "(Deployment shop/web): apps/v1 Deployment is not read by meshd: ignored"
                ),
                at(
                    4,
                    "(ReplicaSet shop/web-6d4cf56db6): apps/v1 ReplicaSet is not read by meshd: ignored"
                ),
                at(
                    5,
                    "(ConfigMap shop/kube-root-ca.crt): v1 ConfigMap is not read by meshd: ignored"
                ),
                at(
                    6,
                    "(ClusterRole view): rbac.authorization.k8s.io/v1 ClusterRole is not read by meshd: ignored"
                ),
                at(
                    7,
                    "(EndpointSlice shop/web-abc): discovery.k8s.io/v1beta1 EndpointSlice is not read \
                     by meshd (it reads discovery.k8s.io/v1 EndpointSlice): ignored"
                ),
            ]
        );
        let web = objects
            .iter()
            .find_map(|o| match o {
                MeshObject::Workload(w) => Some(w.clone()),
                _ => None,
            })
            .unwrap();
        assert_eq!(web.service_account, "web");
        assert_eq!(web.address, Some("10.244.0.17".parse().unwrap()));
        assert_eq!(web.container_port_named("http"), Some(8080));
    }

    #[test]
    fn an_error_in_a_list_item_names_document_item_object_and_field() {
        let broken = KUBECTL_EXPORT.replace("podIP: 10.244.0.17", "podIP: 10.244.0.300");
        let errs = parse_file(&p(), &broken).unwrap_err();
        assert_eq!(
            errs.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
            [
                "mesh/web.yaml: document 1, items[0] (Pod shop/web-6d4cf56db6-x7k2p): status.podIP: \
              \"10.244.0.300\" is not an IP address"
            ]
        );
        assert_eq!(errs[0].item, Some(0));
        let twice = format!("{KUBECTL_EXPORT}---\n{GOOD}");
        let errs = parse_file(&p(), &twice).unwrap_err();
        assert_eq!(
            errs[0].to_string(),
            "mesh/web.yaml: document 2 (Service shop/web): already defined in document 1, items[2] of this file"
        );
        let not_a_list = "apiVersion: v1\nkind: List\nitems: {a: b}\n";
        assert_eq!(
            parse_file(&p(), not_a_list).unwrap_err()[0].to_string(),
            "mesh/web.yaml: document 1 (List): items: must be a sequence of objects"
        );
        let empty = "apiVersion: v1\nkind: List\nitems: []\nmetadata: {resourceVersion: \"\"}\n";
        let parsed = parse_file(&p(), empty).unwrap();
        assert!(parsed.defined.is_empty() && parsed.notes.is_empty());
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

    /// A file is read only up to the limit: `ln -s /dev/zero x.yaml` or a runaway log
    /// named `x.yaml` must not fill meshd's memory.
    #[test]
    fn a_file_over_the_size_limit_is_refused_and_keeps_its_last_good_content() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("web.yaml");
        std::fs::write(&file, GOOD).unwrap();
        let mut src = FileSource::new(dir.path());
        assert_eq!(src.scan().len(), 2);
        let padding = "#".repeat(MAX_FILE_BYTES as usize);
        std::fs::write(&file, format!("{GOOD}{padding}\n")).unwrap();
        assert_eq!(src.scan().len(), 2, "last good content stays");
        let errors: Vec<String> = src.errors().iter().map(|e| e.to_string()).collect();
        assert_eq!(
            errors,
            [format!("{}: larger than 4 MiB: not read", file.display())]
        );
    }

    /// Sets `path`'s modification time to `secs` after the epoch.
    fn touch(path: &Path, secs: u64) {
        let file = std::fs::File::options().append(true).open(path).unwrap();
        file.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
            .unwrap();
    }

    /// With nothing in force yet (at start), the first file in path order won, so
    /// `00-dup.yaml` took over at every restart. The oldest file wins, then path order,
    /// and the other file is refused as a whole, naming both files.
    /// The walk checks that a file is regular; a FIFO that took its name before it was
    /// read blocked the open, and with it the scan thread and every later scan, forever.
    #[test]
    fn a_fifo_swapped_in_after_the_walk_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("web.yaml");
        let status = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(status.success());
        let (tx, rx) = std::sync::mpsc::channel();
        let read = fifo.clone();
        std::thread::spawn(move || tx.send(read_text(&read).map(|(t, _)| t)));
        let result = rx.recv_timeout(Duration::from_secs(5));
        if result.is_err() {
            // Lets the blocked reader go before failing.
            drop(std::fs::OpenOptions::new().write(true).open(&fifo));
        }
        assert_eq!(
            result.expect("reading a FIFO returns"),
            Err("not a regular file: not read".to_string())
        );
    }

    #[test]
    fn at_start_an_object_defined_twice_is_taken_from_the_oldest_file() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.yaml"), dir.path().join("b.yaml"));
        std::fs::write(&b, GOOD).unwrap();
        std::fs::write(&a, GOOD).unwrap();
        std::fs::write(dir.path().join(".swap.yaml"), "garbage: [").unwrap();
        touch(&b, 1_000);
        touch(&a, 2_000);
        let mut src = FileSource::new(dir.path());
        assert_eq!(src.scan().len(), 2);
        let errors: Vec<String> = src.errors().iter().map(|e| e.to_string()).collect();
        let dup = |document: usize| {
            format!(
                "{}: document {document} ({}): already defined in {} (document {document}), \
                 which stays in force: an object can be defined only once",
                a.display(),
                ["Service shop/web", "Pod shop/web-1"][document - 1],
                b.display()
            )
        };
        assert_eq!(errors, [dup(1), dup(2)]);
        // Equally old: path order.
        touch(&b, 2_000);
        let errors = FileSource::new(dir.path()).scan_errors();
        assert!(errors.iter().all(|e| e.file == b), "{errors:?}");
    }

    impl FileSource {
        fn scan_errors(&mut self) -> Vec<ConfigError> {
            self.scan();
            self.errors.clone()
        }
    }

    fn deny(paths: &str) -> String {
        format!(
            "apiVersion: security.meshd.io/v1alpha1\nkind: AuthorizationPolicy\n\
             metadata: {{name: no-admin, namespace: shop}}\nspec:\n  action: DENY\n  \
             rules: [{{to: [{{operation: {{paths: [\"{paths}\"]}}}}]}}]\n"
        )
    }

    fn denied_paths(objects: &[MeshObject]) -> Vec<String> {
        objects
            .iter()
            .filter_map(|o| match o {
                MeshObject::AuthorizationPolicy(p) => Some(format!("{:?}", p.rules[0].to[0])),
                _ => None,
            })
            .collect()
    }

    /// A new `00-dup.yaml` redefining the policy in force replaced it (it sorts first),
    /// and the error was reported against the old file.
    #[test]
    fn a_newcomer_does_not_replace_the_object_in_force() {
        let dir = tempfile::tempdir().unwrap();
        let (a, dup) = (dir.path().join("a.yaml"), dir.path().join("00-dup.yaml"));
        std::fs::write(&a, deny("/admin*")).unwrap();
        let mut src = FileSource::new(dir.path());
        let in_force = denied_paths(&src.scan());
        assert!(in_force[0].contains("/admin"), "{in_force:?}");

        let other = "apiVersion: v1\nkind: Namespace\nmetadata: {name: other}\n";
        std::fs::write(&dup, format!("{other}---\n{}", deny("/nothing"))).unwrap();
        let objects = src.scan();
        assert_eq!(denied_paths(&objects), in_force, "a.yaml's policy applies");
        assert_eq!(objects.len(), 1, "none of 00-dup.yaml applies: {objects:?}");
        assert_eq!(src.errors().len(), 1, "{:?}", src.errors());
        let e = &src.errors()[0];
        assert_eq!(e.file, dup, "the newcomer is the error: {e}");
        assert_eq!(e.document, Some(2));
        assert_eq!(
            e.object.as_deref(),
            Some("AuthorizationPolicy shop/no-admin")
        );
        assert!(e.message.contains(&a.display().to_string()), "{e}");

        // A restart (nothing in force) keeps it so: a.yaml is older.
        touch(&a, 1_000);
        let mut restarted = FileSource::new(dir.path());
        assert_eq!(denied_paths(&restarted.scan()), in_force, "after a restart");
        assert_eq!(restarted.errors(), src.errors());

        // It stays so while either file changes…
        std::fs::write(&dup, deny("/still-nothing")).unwrap();
        assert_eq!(denied_paths(&src.scan()), in_force);
        std::fs::write(&a, deny("/admin/*")).unwrap();
        let edited = denied_paths(&src.scan());
        assert!(edited[0].contains("/admin/"), "{edited:?}");
        // …and when a.yaml is broken, its last good content stays in force.
        std::fs::write(&a, "kind: [").unwrap();
        assert_eq!(denied_paths(&src.scan()), edited);

        // Once a.yaml no longer defines it, the other definition takes over.
        std::fs::remove_file(&a).unwrap();
        let now = denied_paths(&src.scan());
        assert!(now[0].contains("/still-nothing"), "{now:?}");
        assert!(src.errors().is_empty(), "{:?}", src.errors());
    }

    #[test]
    fn an_object_defined_twice_in_one_file_refuses_the_file() {
        let errs = parse_file(&p(), &format!("{}---\n{}", deny("/a"), deny("/b"))).unwrap_err();
        assert_eq!(errs.len(), 1);
        assert_eq!(
            errs[0].to_string(),
            "mesh/web.yaml: document 2 (AuthorizationPolicy shop/no-admin): \
             already defined in document 1 of this file"
        );
    }

    #[test]
    fn peer_authentications_parse_and_bad_ones_name_the_field() {
        let good = "apiVersion: security.meshd.io/v1alpha1\nkind: PeerAuthentication\nmetadata: {name: web, namespace: shop}\nspec:\n  selector: {matchLabels: {app: web}}\n  mtls: {mode: STRICT}\n  portLevelMtls: {\"8080\": {mode: PERMISSIVE}}\n";
        let objs = parse_file(&p(), good).unwrap().defined;
        let MeshObject::PeerAuthentication(pa) = &objs[0].object else {
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
        let objs = parse_file(&p(), good).unwrap().defined;
        let MeshObject::AuthorizationPolicy(ap) = &objs[0].object else {
            panic!("{objs:?}")
        };
        assert_eq!(ap.action, crate::model::authorization::Action::Deny);
        assert_eq!(ap.rule_id(0), "shop/web#0");
        assert_eq!(ap.rules[0].when[0].header, "x-env");
        assert_eq!(
            ap.rules[0].from[0].principals[0],
            crate::model::authorization::StringMatch::Exact(
                "spiffe://cluster.local/ns/shop/sa/client".into()
            )
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

    #[test]
    fn workload_policies_parse_and_bad_ones_name_the_field() {
        let good = "apiVersion: security.meshd.io/v1alpha1\nkind: WorkloadPolicy\nmetadata: {name: restricted, namespace: meshd-system}\nspec:\n  mode: Warn\n  profile: restricted\n  rules: {allowedRegistries: [registry.example.com/]}\n  exemptions: [{container: debug, reason: break glass}]\n";
        let objs = parse_file(&p(), good).unwrap().defined;
        let MeshObject::WorkloadPolicy(wp) = &objs[0].object else {
            panic!("{objs:?}")
        };
        assert_eq!(wp.mode, crate::model::workload_policy::Mode::Warn);
        assert_eq!(wp.rules.allowed_registries, ["registry.example.com/"]);
        for (bad, field, says) in [
            (good.replace("mode: Warn", "mode: Deny"), "spec.mode", "is not a mode"),
            (good.replace("profile: restricted", "profile: strict"), "spec.profile", "is not a profile"),
            (good.replace("registry.example.com/", "' '"), "spec.rules.allowedRegistries[0]", "is not a registry prefix"),
            (good.replace("reason: break glass", "reason: ''"), "spec.exemptions[0].reason", "needs its reason"),
            (good.replace("container: debug", "container: debug, image: x"), "spec.exemptions[0]", "exactly one"),
            (good.replace("  profile: restricted\n  rules: {allowedRegistries: [registry.example.com/]}\n", ""), "spec", "requires nothing"),
            (good.replace("mode: Warn", "mode: Warn\n  enforce: true"), "spec.enforce", "unknown field `enforce`"),
        ] {
            let errs = parse_file(&p(), &bad).unwrap_err();
            let e = &errs[0];
            assert_eq!(e.object.as_deref(), Some("WorkloadPolicy meshd-system/restricted"));
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
        let store = Store::start(
            StoreConfig {
                defaults: Default::default(),
                debounce: Duration::from_millis(100),
                debounce_max: Duration::from_secs(20),
            },
            Vec::new(),
        );
        let mut running = FileSource::new(dir.path()).spawn(store.clone()).unwrap();
        running.pending.wait_for(|p| p.is_empty()).await.unwrap();
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

    /// Reading and parsing ran on the async workers: with one worker (`#[tokio::test]`'s
    /// current-thread runtime stands for a pod with one CPU, where tokio starts one
    /// worker), nothing else ran until the directory was read: health checks and new
    /// ADS streams timed out.
    #[tokio::test]
    async fn reading_the_directory_never_holds_up_other_tasks() {
        let dir = tempfile::tempdir().unwrap();
        // Files within every budget that take a while to parse all the same.
        let slow = format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: slow}}\nx: [{}]\n",
            "abcdefgh,".repeat(parse::MAX_NODES - 10)
        );
        for i in 0..4 {
            std::fs::write(dir.path().join(format!("slow-{i}.yaml")), &slow).unwrap();
        }
        let store = Store::start(crate::model::StoreConfig::default(), Vec::new());
        let started = std::time::Instant::now();
        let running = FileSource::new(dir.path()).spawn(store).unwrap();
        let mut longest = Duration::ZERO;
        while !running.pending.borrow().is_empty() {
            let asked = std::time::Instant::now();
            tokio::time::sleep(Duration::from_millis(10)).await;
            longest = longest.max(asked.elapsed());
        }
        let read_in = started.elapsed();
        assert!(
            read_in > Duration::from_millis(300),
            "the directory was too quick to read ({read_in:?}) to show anything"
        );
        assert!(
            longest < Duration::from_millis(100),
            "a 10 ms sleep took {longest:?} while the directory was read (in {read_in:?})"
        );
    }
}
