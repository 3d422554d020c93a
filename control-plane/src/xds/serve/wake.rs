//! Waking exactly the streams a snapshot concerns.
//!
//! Each stream registers its proxy's [`Interest`] (what its config depends on) in one
//! index from [`Key`] to streams, and waits on a [`Notify`] of its own. One task follows
//! the xDS snapshots: for each, it looks up the keys the snapshot touched
//! ([`XdsSnapshot::touched`]) and notifies those streams, and only those; a stream no
//! snapshot concerns never runs. Everything is woken when a snapshot touched everything,
//! or when this task missed one (a `watch` hands over only the newest): then it cannot
//! know what changed in between.
//!
//! No wake is lost to a race: the task records the newest version it has handled, under
//! the index's lock, before it notifies. A stream registers the interest of the config
//! it computed from version `v` under the same lock, and wakes itself if a newer version
//! has been handled meanwhile, since that one was looked up with its old interest. The
//! stream then reads the newest snapshot, so the newest state wins, and a slow stream
//! only delays itself (a `Notify` holds one wake however many snapshots pass).
//!
//! Certificate changes reach every stream through their own channel
//! ([`crate::identity::CertManager::changes`]), not through this index.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{Notify, watch};

use crate::xds::translate::cache::XdsSnapshot;
use crate::xds::translate::touched::{Interest, Key};

#[derive(Debug, Default)]
struct Index {
    /// The newest snapshot whose streams have been notified.
    handled: u64,
    /// The snapshots' channel closed: meshd is shutting down.
    closed: bool,
    next_id: u64,
    streams: HashMap<u64, Arc<Notify>>,
    /// Streams notified that have not computed their config again yet.
    pending: HashSet<u64>,
    by_key: HashMap<Key, HashSet<u64>>,
}

impl Index {
    fn add(&mut self, id: u64, interest: &Interest) {
        for key in interest.keys() {
            self.by_key.entry(key).or_default().insert(id);
        }
    }

    fn remove(&mut self, id: u64, interest: &Interest) {
        for key in interest.keys() {
            if let Some(ids) = self.by_key.get_mut(&key) {
                ids.remove(&id);
                if ids.is_empty() {
                    self.by_key.remove(&key);
                }
            }
        }
    }

    /// Marks the streams `snapshot` concerns pending and returns them, given that
    /// `previous` was the last snapshot handled.
    fn concerned(&mut self, snapshot: &XdsSnapshot, previous: u64) -> Vec<Arc<Notify>> {
        let ids: HashSet<u64> = if snapshot.touched.everything || snapshot.after != Some(previous) {
            self.streams.keys().copied().collect()
        } else {
            let mut ids = HashSet::new();
            for key in snapshot.touched.keys() {
                if let Some(streams) = self.by_key.get(&key) {
                    ids.extend(streams.iter().copied());
                }
            }
            ids
        };
        let woken = ids
            .iter()
            .filter_map(|id| self.streams.get(id).cloned())
            .collect();
        self.pending.extend(ids);
        woken
    }
}

/// The index of streams by what their config depends on. Cloning shares it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Wakers {
    index: Arc<Mutex<Index>>,
}

impl Wakers {
    fn lock(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts the task that follows `snapshots` and wakes the streams each concerns.
    pub fn follow(mut snapshots: watch::Receiver<Arc<XdsSnapshot>>) -> Wakers {
        let wakers = Wakers::default();
        wakers.lock().handled = snapshots.borrow_and_update().version();
        let index = wakers.clone();
        tokio::spawn(async move {
            while snapshots.changed().await.is_ok() {
                let snapshot = snapshots.borrow_and_update().clone();
                index.handle(&snapshot);
            }
            let woken = {
                let mut index = index.lock();
                index.closed = true;
                index.streams.values().cloned().collect::<Vec<_>>()
            };
            woken.iter().for_each(|n| n.notify_one());
        });
        wakers
    }

    /// Notifies the streams `snapshot` concerns; returns how many.
    fn handle(&self, snapshot: &XdsSnapshot) -> usize {
        let woken = {
            let mut index = self.lock();
            let previous = index.handled;
            let woken = index.concerned(snapshot, previous);
            index.handled = snapshot.version();
            woken
        };
        // Outside the lock: the streams woken first would only wait for it.
        woken.iter().for_each(|n| n.notify_one());
        crate::metrics::metrics()
            .woken_streams
            .observe(woken.len() as f64);
        woken.len()
    }

    /// The newest version stream `id`'s config is current for, if it was computed from
    /// `computed`: the newest snapshot handled, unless one of them concerned it and it
    /// has not computed its config again yet.
    fn current_through(&self, id: u64, computed: u64) -> u64 {
        let index = self.lock();
        if index.pending.contains(&id) {
            computed
        } else {
            computed.max(index.handled)
        }
    }

    /// A new stream's entry; it has no interest until [`Subscription::update`].
    pub fn subscribe(&self) -> Subscription {
        let notify = Arc::new(Notify::new());
        let mut index = self.lock();
        index.next_id += 1;
        let id = index.next_id;
        index.streams.insert(id, notify.clone());
        Subscription {
            id,
            notify,
            interest: None,
            wakers: self.clone(),
        }
    }
}

/// One stream's entry in the index; removed when dropped.
#[derive(Debug)]
pub(crate) struct Subscription {
    id: u64,
    notify: Arc<Notify>,
    interest: Option<Interest>,
    wakers: Wakers,
}

impl Subscription {
    /// Waits until a snapshot concerns this stream. Returns `false` once meshd is
    /// shutting down.
    pub async fn woken(&self) -> bool {
        self.notify.notified().await;
        !self.wakers.lock().closed
    }

    /// Records that the stream's config was computed from snapshot `version` and
    /// depends on `interest`.
    pub fn update(&mut self, interest: Interest, version: u64) {
        let mut index = self.wakers.lock();
        index.pending.remove(&self.id);
        if self.interest.as_ref() != Some(&interest) {
            if let Some(old) = &self.interest {
                index.remove(self.id, old);
            }
            index.add(self.id, &interest);
            self.interest = Some(interest);
        }
        if index.handled > version {
            // Handled with the old interest: look again.
            index.pending.insert(self.id);
            self.notify.notify_one();
        }
    }

    /// What the stream's status reads to say how current its config is.
    pub fn currency(&self) -> Currency {
        Currency {
            id: self.id,
            wakers: self.wakers.clone(),
        }
    }
}

/// How current a stream's config is: the snapshots that did not concern it leave it
/// as current for them as for the one it was computed from. Read by the proxies'
/// status ([`super::status::ProxyRegistry::list`]).
#[derive(Debug, Clone)]
pub(crate) struct Currency {
    id: u64,
    wakers: Wakers,
}

impl Currency {
    pub fn current_through(&self, computed: u64) -> u64 {
        self.wakers.current_through(self.id, computed)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut index = self.wakers.lock();
        index.streams.remove(&self.id);
        index.pending.remove(&self.id);
        if let Some(old) = &self.interest {
            index.remove(self.id, old);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{MeshDefaults, MeshObject, ObjectKey, ScopeEntry};

    fn snapshot(version: u64, previous: Option<&XdsSnapshot>) -> XdsSnapshot {
        let mesh = crate::model::MeshSnapshot::build(
            version,
            MeshDefaults::default(),
            Vec::<MeshObject>::new(),
        );
        XdsSnapshot::build(Arc::new(mesh), previous, "cluster.local")
    }

    fn interest(pod: &str, services: &[&str], scope: Vec<ScopeEntry>) -> Interest {
        Interest {
            workload: ObjectKey::new("a", pod),
            services: services.iter().map(|s| ObjectKey::new("a", *s)).collect(),
            scope,
        }
    }

    async fn was_woken(s: &Subscription) -> bool {
        tokio::time::timeout(std::time::Duration::from_millis(20), s.notify.notified())
            .await
            .is_ok()
    }

    /// A snapshot touching one service wakes the streams that call it or whose scope
    /// covers it, and no other; one that touched everything, or follows a snapshot the
    /// index never saw, wakes every stream.
    #[tokio::test]
    async fn only_the_concerned_streams_are_woken() {
        let wakers = Wakers::default();
        let first = snapshot(1, None);
        wakers.lock().handled = 1;
        let mut caller = wakers.subscribe();
        caller.update(interest("web-1", &["api"], vec![]), 1);
        let mut other = wakers.subscribe();
        other.update(interest("batch-1", &["db"], vec![]), 1);
        let mut scoped = wakers.subscribe();
        scoped.update(
            interest("gw-1", &[], vec![ScopeEntry::Namespace("a".into())]),
            1,
        );
        let mut elsewhere = wakers.subscribe();
        elsewhere.update(
            interest("x-1", &[], vec![ScopeEntry::Namespace("b".into())]),
            1,
        );

        let mut second = snapshot(2, Some(&first));
        second.touched = Default::default();
        second.touched.services.insert(ObjectKey::new("a", "api"));
        assert_eq!(wakers.handle(&second), 2);
        assert!(was_woken(&caller).await);
        assert!(was_woken(&scoped).await);
        assert!(!was_woken(&other).await);
        assert!(!was_woken(&elsewhere).await);

        // Woken streams are behind until they compute again; the others are current.
        assert_eq!(other.currency().current_through(1), 2);
        assert_eq!(caller.currency().current_through(1), 1);
        caller.update(interest("web-1", &["api"], vec![]), 2);
        assert_eq!(caller.currency().current_through(2), 2);

        // Its own pod changed: only that stream.
        let mut third = snapshot(3, Some(&second));
        third.touched = Default::default();
        third
            .touched
            .workloads
            .insert(ObjectKey::new("a", "batch-1"));
        assert_eq!(wakers.handle(&third), 1);
        assert!(was_woken(&other).await);

        // Snapshot 5 after 3: 4 was never seen, so nobody can be spared.
        let mut fifth = snapshot(5, Some(&third));
        fifth.after = Some(4);
        fifth.touched = Default::default();
        assert_eq!(wakers.handle(&fifth), 4);
        for s in [&caller, &other, &scoped, &elsewhere] {
            assert!(was_woken(s).await);
        }
        drop(elsewhere);
        assert_eq!(wakers.lock().streams.len(), 3);
        assert!(
            !wakers
                .lock()
                .by_key
                .contains_key(&Key::Namespace("b".into())),
            "a dropped stream leaves the index"
        );
    }

    /// A stream that registers the interest of an older snapshot than the index has
    /// handled wakes itself: that snapshot was looked up with its previous interest.
    #[tokio::test]
    async fn a_stream_behind_the_index_wakes_itself() {
        let wakers = Wakers::default();
        wakers.lock().handled = 7;
        let mut s = wakers.subscribe();
        s.update(interest("web-1", &[], vec![]), 7);
        assert!(!was_woken(&s).await);
        s.update(interest("web-1", &["api"], vec![]), 6);
        assert!(was_woken(&s).await);
    }
}
