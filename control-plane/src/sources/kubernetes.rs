//! The Kubernetes source: watchers on the API server feeding the same store as the file
//! source.
//!
//! One kube-runtime `watcher` per kind — `v1` Namespaces, Services and Pods,
//! `discovery.k8s.io/v1` EndpointSlices, and meshd's AuthorizationPolicies,
//! PeerAuthentications and WorkloadPolicies — each converting with the same functions as the file source
//! ([`convert`], [`crd`]). Their updates meet in one task that owns the source's state:
//!
//! - **Re-lists never empty the mesh.** A watcher's (re-)list — at start, and after a
//!   `410 Gone` or a lost connection — is buffered until it is complete and then handed
//!   to the store as one [`StoreEvent::ReplaceKind`]: the objects that vanished go,
//!   the others stay, and no snapshot ever sees the kind half-listed or empty.
//! - **Errors back off and resume** (kube-runtime's default backoff); each is logged
//!   and shown in `/debug/snapshot` until the watcher recovers.
//! - **Ready after every initial list**: [`Running::pending`] names the kinds not yet
//!   listed; meshd serves xDS and reports ready only once it is empty.
//! - **A bad object keeps its last good version**: an object that does not convert
//!   (e.g. an AuthorizationPolicy with a bad CIDR) is reported, and the version before
//!   it stays in force. Every policy's verdict (accepted, or why not, per generation)
//!   is published for the status writer ([`crate::cluster::policy_status`]).
//! - **Namespace selection** (optional): with a label selector, only namespaces that
//!   carry the label — and the root namespace — are part of the mesh.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, watch};

use super::convert::{self, FieldError};
use super::{SharedErrors, crd};
use crate::model::{MeshObject, ObjectKey, ObjectKind, Store, StoreEvent};

/// Which policy a verdict is about.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyRef {
    pub kind: ObjectKind,
    pub key: ObjectKey,
}

/// Whether meshd accepted a policy's current generation, and if not, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyVerdict {
    pub generation: i64,
    /// `None`: accepted. `Some(field: message)`: rejected; the previous version, if
    /// any, keeps applying.
    pub error: Option<String>,
}

pub type Verdicts = Arc<BTreeMap<PolicyRef, PolicyVerdict>>;

#[derive(Debug, Clone)]
pub struct KubernetesOptions {
    /// Only namespaces with these labels (a label selector, `key=value,...`).
    pub namespace_selector: Option<String>,
    /// Always part of the mesh: its policies apply mesh-wide.
    pub root_namespace: String,
}

/// What the running source exposes.
#[derive(Debug, Clone)]
pub struct Running {
    /// Kinds whose initial list has not completed; empty once meshd is in sync.
    pub pending: watch::Receiver<Vec<String>>,
    pub errors: SharedErrors,
    pub verdicts: watch::Receiver<Verdicts>,
}

/// Starts one watcher per kind and the task that feeds `store`.
pub fn spawn(client: Client, store: Store, options: KubernetesOptions) -> Running {
    let (tx, rx) = mpsc::unbounded_channel();
    let all = watcher::Config::default();
    let namespaces = match &options.namespace_selector {
        Some(sel) => watcher::Config::default().labels(sel),
        None => watcher::Config::default(),
    };
    watch_kind(
        Api::<core::Namespace>::all(client.clone()),
        namespaces,
        ObjectKind::Namespace,
        |n| convert::namespace(n).map(|n| MeshObject::Namespace(Arc::new(n))),
        tx.clone(),
    );
    watch_kind(
        Api::<core::Service>::all(client.clone()),
        all.clone(),
        ObjectKind::Service,
        |s| convert::service(s).map(|s| MeshObject::Service(Arc::new(s))),
        tx.clone(),
    );
    watch_kind(
        Api::<discovery::EndpointSlice>::all(client.clone()),
        all.clone(),
        ObjectKind::EndpointSlice,
        |s| convert::endpoint_slice(s).map(|s| MeshObject::EndpointSlice(Arc::new(s))),
        tx.clone(),
    );
    watch_kind(
        Api::<core::Pod>::all(client.clone()),
        all.clone(),
        ObjectKind::Workload,
        |p| convert::pod(p).map(|w| MeshObject::Workload(Arc::new(w))),
        tx.clone(),
    );
    watch_kind(
        Api::<crd::AuthorizationPolicy>::all(client.clone()),
        all.clone(),
        ObjectKind::AuthorizationPolicy,
        |p| crd::authorization_policy(p).map(|p| MeshObject::AuthorizationPolicy(Arc::new(p))),
        tx.clone(),
    );
    watch_kind(
        Api::<crd::WorkloadPolicy>::all(client.clone()),
        all.clone(),
        ObjectKind::WorkloadPolicy,
        |p| crd::workload_policy(p).map(|p| MeshObject::WorkloadPolicy(Arc::new(p))),
        tx.clone(),
    );
    watch_kind(
        Api::<crd::PeerAuthentication>::all(client),
        all,
        ObjectKind::PeerAuthentication,
        |p| crd::peer_authentication(p).map(|p| MeshObject::PeerAuthentication(Arc::new(p))),
        tx,
    );
    let kinds = ALL_KINDS.iter().map(|k| k.to_string()).collect();
    let (pending_tx, pending) = watch::channel(kinds);
    let (verdicts_tx, verdicts) = watch::channel(Verdicts::default());
    let errors = SharedErrors::default();
    let core = Core {
        store,
        options,
        objects: BTreeMap::new(),
        problems: BTreeMap::new(),
        watch_errors: BTreeMap::new(),
        verdicts: BTreeMap::new(),
        pending: ALL_KINDS.into_iter().collect(),
        errors: errors.clone(),
        pending_tx,
        verdicts_tx,
    };
    tokio::spawn(core.run(rx));
    Running {
        pending,
        errors,
        verdicts,
    }
}

const ALL_KINDS: [ObjectKind; 7] = [
    ObjectKind::Namespace,
    ObjectKind::Service,
    ObjectKind::EndpointSlice,
    ObjectKind::Workload,
    ObjectKind::AuthorizationPolicy,
    ObjectKind::PeerAuthentication,
    ObjectKind::WorkloadPolicy,
];

type Id = (ObjectKind, ObjectKey);

/// One object as a watcher saw it, converted.
#[derive(Debug)]
struct Item {
    id: Id,
    result: Result<MeshObject, String>,
    generation: Option<i64>,
}

#[derive(Debug)]
enum Update {
    Apply(Item),
    Delete(Id),
    /// A complete (re-)list of one kind.
    Listed(ObjectKind, Vec<Item>),
    /// The watcher failed and will retry after a backoff.
    Failed(ObjectKind, String),
}

fn watch_kind<K>(
    api: Api<K>,
    config: watcher::Config,
    kind: ObjectKind,
    convert: fn(&K) -> Result<MeshObject, FieldError>,
    tx: mpsc::UnboundedSender<Update>,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default,
{
    let item = move |obj: &K| {
        let id = (kind, id_of(kind, obj));
        let result = convert(obj).map_err(|e| format!("{kind} {}: {e}", id.1));
        let generation = matches!(
            kind,
            ObjectKind::AuthorizationPolicy
                | ObjectKind::PeerAuthentication
                | ObjectKind::WorkloadPolicy
        )
        .then(|| obj.meta().generation.unwrap_or(0));
        Item {
            id,
            result,
            generation,
        }
    };
    tokio::spawn(async move {
        let mut events = watcher::watcher(api, config).default_backoff().boxed();
        let mut listing = Vec::new();
        while let Some(event) = events.next().await {
            let update = match event {
                Ok(Event::Init) => {
                    listing.clear();
                    continue;
                }
                Ok(Event::InitApply(obj)) => {
                    listing.push(item(&obj));
                    continue;
                }
                Ok(Event::InitDone) => Update::Listed(kind, std::mem::take(&mut listing)),
                Ok(Event::Apply(obj)) => Update::Apply(item(&obj)),
                Ok(Event::Delete(obj)) => Update::Delete((kind, id_of(kind, &obj))),
                Err(e) => {
                    tracing::warn!(%kind, "watch failed, retrying after a backoff: {e}");
                    Update::Failed(kind, e.to_string())
                }
            };
            if tx.send(update).is_err() {
                return;
            }
        }
    });
}

fn id_of<K: Resource>(kind: ObjectKind, obj: &K) -> ObjectKey {
    let name = obj.name_any();
    match kind {
        ObjectKind::Namespace => ObjectKey::new("", name),
        _ => ObjectKey::new(obj.namespace().unwrap_or_else(|| "default".into()), name),
    }
}

struct Core {
    store: Store,
    options: KubernetesOptions,
    /// The last good version of every object, whether or not its namespace is selected.
    objects: BTreeMap<Id, MeshObject>,
    /// Objects whose current version was refused, and why.
    problems: BTreeMap<Id, String>,
    /// Watchers that are failing right now.
    watch_errors: BTreeMap<ObjectKind, String>,
    verdicts: BTreeMap<PolicyRef, PolicyVerdict>,
    pending: BTreeSet<ObjectKind>,
    errors: SharedErrors,
    pending_tx: watch::Sender<Vec<String>>,
    verdicts_tx: watch::Sender<Verdicts>,
}

impl Core {
    async fn run(mut self, mut updates: mpsc::UnboundedReceiver<Update>) {
        while let Some(update) = updates.recv().await {
            let was_pending = !self.pending.is_empty();
            self.apply(update);
            if was_pending && self.pending.is_empty() {
                // In sync only once a published snapshot holds every initial list.
                let version = self.store.flush().await;
                tracing::info!(version, "every kind listed; the mesh snapshot holds them");
            }
            self.publish();
        }
    }

    fn apply(&mut self, update: Update) {
        match update {
            Update::Apply(item) => {
                self.watch_errors.remove(&item.id.0);
                let id = item.id.clone();
                if self.record(item) {
                    self.send_object(&id);
                }
                if id.0 == ObjectKind::Namespace {
                    self.reselect();
                }
            }
            Update::Delete(id) => {
                self.objects.remove(&id);
                self.problems.remove(&id);
                self.verdicts.remove(&PolicyRef {
                    kind: id.0,
                    key: id.1.clone(),
                });
                self.store.send(StoreEvent::Delete(id.0, id.1.clone()));
                if id.0 == ObjectKind::Namespace {
                    self.reselect();
                }
            }
            Update::Listed(kind, items) => {
                self.watch_errors.remove(&kind);
                let listed: BTreeSet<Id> = items.iter().map(|i| i.id.clone()).collect();
                // Gone from the list: gone from the mesh (the store drops them below).
                self.objects
                    .retain(|id, _| id.0 != kind || listed.contains(id));
                self.problems
                    .retain(|id, _| id.0 != kind || listed.contains(id));
                self.verdicts
                    .retain(|r, _| r.kind != kind || listed.contains(&(r.kind, r.key.clone())));
                for item in items {
                    self.record(item);
                }
                self.send_kind(kind);
                if kind == ObjectKind::Namespace {
                    self.reselect();
                }
                if self.pending.remove(&kind) {
                    tracing::info!(%kind, objects = listed.len(), "initial list done");
                } else {
                    // After a 410 Gone or a desync: the store got the new full set at once.
                    tracing::info!(%kind, objects = listed.len(), "re-list done");
                }
            }
            Update::Failed(kind, message) => {
                self.watch_errors.insert(kind, message);
            }
        }
    }

    /// Keeps `item` if it converted (else keeps the previous version and the problem);
    /// returns whether the object's good version changed.
    fn record(&mut self, item: Item) -> bool {
        if let Some(generation) = item.generation {
            self.verdicts.insert(
                PolicyRef {
                    kind: item.id.0,
                    key: item.id.1.clone(),
                },
                PolicyVerdict {
                    generation,
                    error: item.result.as_ref().err().cloned(),
                },
            );
        }
        match item.result {
            Ok(obj) => {
                self.problems.remove(&item.id);
                self.objects.insert(item.id, obj);
                true
            }
            Err(problem) => {
                if self.problems.get(&item.id) != Some(&problem) {
                    tracing::warn!(
                        "{} (the previous version, if any, stays in force)",
                        crate::logging::Escaped(&problem.to_string())
                    );
                }
                self.problems.insert(item.id, problem);
                false
            }
        }
    }

    /// Whether an object is part of the mesh under the namespace selection.
    fn selected(&self, id: &Id) -> bool {
        self.options.namespace_selector.is_none()
            || id.0 == ObjectKind::Namespace
            || id.1.namespace == self.options.root_namespace
            || self
                .objects
                .contains_key(&(ObjectKind::Namespace, ObjectKey::new("", &id.1.namespace)))
    }

    fn send_object(&self, id: &Id) {
        match self.objects.get(id) {
            Some(obj) if self.selected(id) => self.store.send(StoreEvent::Upsert(obj.clone())),
            _ => self.store.send(StoreEvent::Delete(id.0, id.1.clone())),
        }
    }

    fn send_kind(&self, kind: ObjectKind) {
        let objects = self
            .objects
            .iter()
            .filter(|(id, _)| id.0 == kind && self.selected(id))
            .map(|(_, o)| o.clone())
            .collect();
        self.store.send(StoreEvent::ReplaceKind(kind, objects));
    }

    /// The selected namespaces changed: resend every namespaced kind.
    fn reselect(&self) {
        if self.options.namespace_selector.is_some() {
            for kind in ALL_KINDS
                .into_iter()
                .filter(|k| *k != ObjectKind::Namespace)
            {
                self.send_kind(kind);
            }
        }
    }

    fn publish(&self) {
        let mut errors: Vec<String> = self
            .watch_errors
            .iter()
            .map(|(kind, e)| format!("watching {kind}s: {e} (retrying)"))
            .collect();
        errors.extend(self.problems.values().cloned());
        *self.errors.lock().unwrap_or_else(|p| p.into_inner()) = errors;
        let pending: Vec<String> = self.pending.iter().map(|k| k.to_string()).collect();
        self.pending_tx.send_if_modified(|p| {
            let changed = *p != pending;
            *p = pending.clone();
            changed
        });
        let verdicts = &self.verdicts;
        self.verdicts_tx.send_if_modified(|v| {
            let changed = **v != *verdicts;
            if changed {
                *v = Arc::new(verdicts.clone());
            }
            changed
        });
    }
}
