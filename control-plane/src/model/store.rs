//! The store: the current set of mesh objects, and the debounced publisher of snapshots.
//!
//! Sources send [`StoreEvent`]s. The store applies them to its state and, once a burst
//! has been quiet for `debounce` (or `debounce_max` after its first event, whichever
//! comes first), builds one new immutable [`MeshSnapshot`] and publishes it on a
//! `watch` channel. Events that change nothing publish nothing, so a source may resend
//! its whole state freely.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::snapshot::{Changes, MeshSnapshot};
use super::{MeshDefaults, MeshObject, ObjectKey, ObjectKind};

#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Mesh-wide settings every snapshot carries.
    pub defaults: MeshDefaults,
    /// Quiet time after the last event of a burst before a snapshot is built.
    pub debounce: Duration,
    /// Upper bound on how long a continuous burst can hold a snapshot back.
    pub debounce_max: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            defaults: MeshDefaults::default(),
            debounce: Duration::from_millis(100),
            debounce_max: Duration::from_secs(1),
        }
    }
}

#[derive(Debug)]
pub enum StoreEvent {
    Upsert(MeshObject),
    Delete(ObjectKind, ObjectKey),
    /// The source's complete state: everything not in it is removed.
    Replace(Vec<MeshObject>),
    /// Every object of one kind (a watcher's re-list): objects of that kind not in it
    /// are removed, other kinds are untouched.
    ReplaceKind(ObjectKind, Vec<MeshObject>),
    /// Publish what came before now, without waiting for the debounce, and answer with
    /// the version of the snapshot that holds it.
    Flush(tokio::sync::oneshot::Sender<u64>),
}

/// Handle to the running store. Cloning shares it.
#[derive(Clone, Debug)]
pub struct Store {
    events: mpsc::UnboundedSender<StoreEvent>,
    snapshots: watch::Receiver<Arc<MeshSnapshot>>,
}

impl Store {
    /// Starts the store task with `initial` objects, published at once as version 1.
    pub fn start(config: StoreConfig, initial: Vec<MeshObject>) -> Store {
        let mut state = State {
            defaults: config.defaults.clone(),
            objects: BTreeMap::new(),
            changes: Changes::new(),
            last: None,
        };
        state.replace(initial);
        let first = state.snapshot(1, None);
        let (snap_tx, snap_rx) = watch::channel(first);
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        tokio::spawn(run(config, state, ev_rx, snap_tx));
        Store {
            events: ev_tx,
            snapshots: snap_rx,
        }
    }

    pub fn send(&self, event: StoreEvent) {
        // The store task only ends when every handle is gone, so this cannot fail
        // while `self` exists.
        let _ = self.events.send(event);
    }

    /// The version of a published snapshot that holds every event sent before this
    /// call (published at once if needed).
    pub async fn flush(&self) -> u64 {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(StoreEvent::Flush(tx));
        rx.await.unwrap_or_else(|_| self.snapshots.borrow().version)
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<MeshSnapshot>> {
        self.snapshots.clone()
    }
}

async fn run(
    config: StoreConfig,
    mut state: State,
    mut events: mpsc::UnboundedReceiver<StoreEvent>,
    snapshots: watch::Sender<Arc<MeshSnapshot>>,
) {
    let mut version = 1;
    while let Some(first) = events.recv().await {
        if let StoreEvent::Flush(reply) = first {
            let _ = reply.send(version);
            continue;
        }
        let burst_start = Instant::now();
        let mut changed = state.apply(first);
        let hard_deadline = burst_start + config.debounce_max;
        let mut flushed = None;
        loop {
            let deadline = (Instant::now() + config.debounce).min(hard_deadline);
            tokio::select! {
                ev = events.recv() => match ev {
                    Some(StoreEvent::Flush(reply)) => {
                        flushed = Some(reply);
                        break;
                    }
                    Some(ev) => changed |= state.apply(ev),
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        if changed {
            version += 1;
            let built = Instant::now();
            let snap = state.snapshot(version, Some(burst_start.into_std()));
            let m = crate::metrics::metrics();
            m.snapshots.inc();
            crate::metrics::Metrics::observe(&m.snapshot_build, built.elapsed());
            crate::metrics::Metrics::observe(&m.debounce, burst_start.elapsed());
            tracing::debug!(
                version,
                debounce_ms = burst_start.elapsed().as_millis() as u64,
                services = snap.services.len(),
                workloads = snap.workloads.len(),
                derived_service_ports = snap.derived_service_ports,
                "published mesh snapshot"
            );
            snapshots.send_replace(snap);
        }
        if let Some(reply) = flushed {
            let _ = reply.send(version);
        }
    }
}

/// The objects as of now, kept as `Arc`s so that snapshots share unchanged objects,
/// and what changed since the last snapshot, so that the next one derives only what
/// those changes touch.
pub(crate) struct State {
    defaults: MeshDefaults,
    objects: BTreeMap<(ObjectKind, ObjectKey), MeshObject>,
    changes: Changes,
    last: Option<Arc<MeshSnapshot>>,
}

impl State {
    /// Applies one event; returns whether anything changed.
    fn apply(&mut self, event: StoreEvent) -> bool {
        match event {
            StoreEvent::Upsert(obj) => self.upsert(obj),
            StoreEvent::Delete(kind, key) => {
                let id = (kind, key);
                let removed = self.objects.remove(&id).is_some();
                if removed {
                    self.changes.insert(id);
                }
                removed
            }
            StoreEvent::Replace(objs) => self.replace(objs),
            StoreEvent::ReplaceKind(kind, objs) => self.replace_kind(kind, objs),
            // Handled by the run loop.
            StoreEvent::Flush(_) => false,
        }
    }

    fn upsert(&mut self, obj: MeshObject) -> bool {
        let id = (obj.kind(), obj.key());
        if self.objects.get(&id).is_some_and(|old| *old == obj) {
            return false;
        }
        self.changes.insert(id.clone());
        self.objects.insert(id, obj);
        true
    }

    fn replace(&mut self, objs: Vec<MeshObject>) -> bool {
        let mut next = BTreeMap::new();
        let mut changed = false;
        for obj in objs {
            let id = (obj.kind(), obj.key());
            let kept = match self.objects.get(&id) {
                Some(old) if *old == obj => old.clone(),
                _ => {
                    changed = true;
                    self.changes.insert(id.clone());
                    obj
                }
            };
            next.insert(id, kept);
        }
        for id in self.objects.keys().filter(|id| !next.contains_key(*id)) {
            self.changes.insert(id.clone());
            changed = true;
        }
        self.objects = next;
        changed
    }

    fn replace_kind(&mut self, kind: ObjectKind, objs: Vec<MeshObject>) -> bool {
        let incoming: BTreeMap<_, _> = objs
            .into_iter()
            .filter(|o| o.kind() == kind)
            .map(|o| ((kind, o.key()), o))
            .collect();
        let gone: Vec<_> = self
            .objects
            .keys()
            .filter(|(k, key)| *k == kind && !incoming.contains_key(&(kind, key.clone())))
            .cloned()
            .collect();
        let mut changed = !gone.is_empty();
        for id in gone {
            self.objects.remove(&id);
            self.changes.insert(id);
        }
        for (_, obj) in incoming {
            changed |= self.upsert(obj);
        }
        changed
    }

    /// The next snapshot: derived from the last one and what changed since.
    pub(crate) fn snapshot(
        &mut self,
        version: u64,
        changed_at: Option<std::time::Instant>,
    ) -> Arc<MeshSnapshot> {
        let objects = self.objects.values().cloned();
        let mut snap = match &self.last {
            Some(last) => {
                MeshSnapshot::update(last, version, self.defaults.clone(), objects, &self.changes)
            }
            None => MeshSnapshot::build(version, self.defaults.clone(), objects),
        };
        self.changes.clear();
        snap.changed_at = changed_at;
        log_problems(self.last.as_deref(), &snap);
        let snap = Arc::new(snap);
        self.last = Some(snap.clone());
        snap
    }
}

/// Logs the problems `snap` has that `previous` did not, and those it no longer has.
fn log_problems(previous: Option<&MeshSnapshot>, snap: &MeshSnapshot) {
    let before = previous.map(|p| &p.port_problems);
    for (key, problem) in &snap.port_problems {
        if before.and_then(|b| b.get(key)) != Some(problem) {
            tracing::warn!(version = snap.version, "mesh problem: {problem}");
        }
    }
    for (key, problem) in before.into_iter().flatten() {
        if !snap.port_problems.contains_key(key) {
            tracing::info!(version = snap.version, "mesh problem resolved: {problem}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Namespace;

    fn ns(name: &str) -> MeshObject {
        MeshObject::Namespace(Arc::new(Namespace {
            name: name.into(),
            labels: Default::default(),
        }))
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_becomes_one_snapshot() {
        let store = Store::start(StoreConfig::default(), vec![]);
        let mut rx = store.subscribe();
        assert_eq!(rx.borrow_and_update().version, 1);
        for i in 0..10 {
            store.send(StoreEvent::Upsert(ns(&format!("n{i}"))));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        rx.changed().await.unwrap();
        let snap = rx.borrow_and_update().clone();
        assert_eq!(snap.version, 2);
        assert_eq!(snap.namespaces.len(), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn a_continuous_burst_is_capped_by_debounce_max() {
        let config = StoreConfig {
            debounce: Duration::from_millis(100),
            debounce_max: Duration::from_millis(500),
            ..StoreConfig::default()
        };
        let store = Store::start(config, vec![]);
        let mut rx = store.subscribe();
        rx.borrow_and_update();
        let start = Instant::now();
        let sender = store.clone();
        tokio::spawn(async move {
            for i in 0..100 {
                sender.send(StoreEvent::Upsert(ns(&format!("n{i}"))));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        rx.changed().await.unwrap();
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(500) && waited < Duration::from_millis(600),
            "first snapshot after {waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_replace_with_the_same_state_publishes_nothing() {
        let store = Store::start(StoreConfig::default(), vec![ns("a"), ns("b")]);
        let mut rx = store.subscribe();
        rx.borrow_and_update();
        store.send(StoreEvent::Replace(vec![ns("b"), ns("a")]));
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(!rx.has_changed().unwrap());
        store.send(StoreEvent::Replace(vec![ns("a")]));
        rx.changed().await.unwrap();
        assert_eq!(rx.borrow().namespaces.len(), 1);
        assert_eq!(rx.borrow().version, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn replace_kind_leaves_other_kinds_alone() {
        use crate::model::Workload;
        let pod = |name: &str| {
            MeshObject::Workload(Arc::new(Workload {
                scope: None,
                capture: Default::default(),
                key: ObjectKey::new("a", name),
                uid: None,
                labels: Default::default(),
                service_account: "default".into(),
                address: None,
                ready: true,
                container_ports: vec![],
                app_ports: Default::default(),
                upstreams: vec![],
                egress: None,
            }))
        };
        let store = Store::start(StoreConfig::default(), vec![ns("a"), pod("p1"), pod("p2")]);
        let mut rx = store.subscribe();
        rx.borrow_and_update();
        store.send(StoreEvent::ReplaceKind(
            ObjectKind::Workload,
            vec![pod("p2")],
        ));
        rx.changed().await.unwrap();
        let snap = rx.borrow_and_update().clone();
        assert_eq!(snap.namespaces.len(), 1);
        assert_eq!(
            snap.workloads.keys().cloned().collect::<Vec<_>>(),
            vec![ObjectKey::new("a", "p2")]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn flush_publishes_at_once() {
        let store = Store::start(StoreConfig::default(), vec![]);
        let rx = store.subscribe();
        assert_eq!(store.flush().await, 1, "nothing to publish");
        store.send(StoreEvent::Upsert(ns("a")));
        let start = Instant::now();
        let v = store.flush().await;
        assert_eq!(v, 2);
        assert!(
            start.elapsed() < Duration::from_millis(100),
            "waited for the debounce"
        );
        assert_eq!(rx.borrow().version, 2);
        assert_eq!(rx.borrow().namespaces.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn delete_removes_an_object() {
        let store = Store::start(StoreConfig::default(), vec![ns("a")]);
        let mut rx = store.subscribe();
        rx.borrow_and_update();
        store.send(StoreEvent::Delete(
            ObjectKind::Namespace,
            ObjectKey::new("", "a"),
        ));
        rx.changed().await.unwrap();
        assert!(rx.borrow().namespaces.is_empty());
    }
}
