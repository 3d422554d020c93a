//! What every connected proxy has been sent, has ACKed and has rejected — the answer to
//! "why does this proxy not have my config?", served by the admin API and `meshctl`.
//!
//! Each stream owns its own `Mutex<ProxyStatus>`; the registry's map is only locked when
//! a stream connects or disconnects, or when someone reads it, never on a push.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use std::time::Instant;

use crate::metrics::{self, metrics};
use crate::xds::serve::limits::{self, LimitError};
use crate::xds::serve::wake::Currency;
use serde::{Deserialize, Serialize};

pub use meshd_sidecar::XdsFlavor;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Nack {
    pub nonce: String,
    pub message: String,
    pub at: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TypeStatus {
    /// Names of the resources the proxy should now have.
    pub resources: usize,
    pub sent_version: String,
    pub sent_nonce: String,
    pub acked_nonce: String,
    /// The last response was neither ACKed nor NACKed yet.
    pub pending: bool,
    /// The last answered response was rejected; cleared by the next ACK.
    pub nacked: bool,
    pub last_nack: Option<Nack>,
    pub responses: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProxyStatus {
    pub stream: u64,
    pub node_id: String,
    /// `namespace/pod`
    pub workload: String,
    /// The SPIFFE id from the proxy's verified client certificate.
    pub identity: String,
    pub flavor: XdsFlavor,
    pub connected_at: String,
    /// The newest mesh snapshot this stream has computed its config from. Snapshots
    /// after it did not concern the proxy ([`super::wake`]): its config is the same.
    pub snapshot_version: u64,
    /// The newest snapshot whose responses have all been sent (what the proxy
    /// subscribes to so far).
    pub pushed_version: u64,
    /// The newest snapshot whose every response the proxy has ACKed.
    pub synced_version: Option<u64>,
    /// When the change behind `snapshot_version` / `pushed_version` happened.
    #[serde(skip)]
    pub snapshot_changed_at: Option<Instant>,
    #[serde(skip)]
    pub pushed_changed_at: Option<Instant>,
    /// By short type name (`cds`, `eds`, `lds`, `rds`, `sds`).
    pub types: BTreeMap<String, TypeStatus>,
    /// Type URLs the proxy asked for that meshd does not serve.
    pub unknown_type_urls: Vec<String>,
    /// Why part of this proxy's config is missing, if it is.
    pub problems: Vec<String>,
    /// How current the config is beyond `snapshot_version` (snapshots that did not
    /// concern the proxy); applied by [`ProxyRegistry::list`].
    #[serde(skip)]
    pub(crate) currency: Option<Currency>,
}

impl ProxyStatus {
    pub fn new(node_id: String, workload: String, identity: String, flavor: XdsFlavor) -> Self {
        Self {
            stream: 0,
            node_id,
            workload,
            identity,
            flavor,
            connected_at: now_rfc3339(),
            snapshot_version: 0,
            pushed_version: 0,
            synced_version: None,
            snapshot_changed_at: None,
            pushed_changed_at: None,
            types: BTreeMap::new(),
            unknown_type_urls: Vec::new(),
            problems: Vec::new(),
            currency: None,
        }
    }

    pub fn type_mut(&mut self, short: &str) -> &mut TypeStatus {
        if !self.types.contains_key(short) {
            self.types.insert(short.to_string(), TypeStatus::default());
        }
        self.types.get_mut(short).expect("just inserted")
    }

    /// Marks the proxy in sync with the last snapshot pushed if nothing is
    /// outstanding. Not with `snapshot_version`: between computing a snapshot's config
    /// and sending it, nothing is pending, yet the proxy does not have it.
    pub fn recompute_sync(&mut self) {
        if self.pushed_version > 0
            && !self.types.is_empty()
            && self.types.values().all(|t| !t.pending && !t.nacked)
        {
            if self.synced_version < Some(self.pushed_version)
                && let Some(changed) = self.pushed_changed_at
            {
                metrics::Metrics::observe(&metrics().convergence, changed.elapsed());
            }
            self.synced_version = Some(self.pushed_version);
        }
    }
}

#[derive(Debug, Default)]
struct Entries {
    by_stream: BTreeMap<u64, Arc<Mutex<ProxyStatus>>>,
    /// Open streams per (identity, workload): a sidecar has one, two while it
    /// reconnects.
    per_workload: HashMap<(String, String), usize>,
}

/// All connected proxies. Cloning shares it.
#[derive(Debug, Clone, Default)]
pub struct ProxyRegistry {
    entries: Arc<Mutex<Entries>>,
    next: Arc<AtomicU64>,
}

impl ProxyRegistry {
    /// Registers a stream; refused past [`limits::MAX_STREAMS_PER_WORKLOAD`] open
    /// streams of one identity for one workload.
    pub fn register(&self, mut status: ProxyStatus) -> Result<ProxyHandle, LimitError> {
        let key = (status.identity.clone(), status.workload.clone());
        let mut entries = lock(&self.entries);
        let open = entries.per_workload.entry(key.clone()).or_default();
        if *open >= limits::MAX_STREAMS_PER_WORKLOAD {
            return Err(LimitError::Streams(*open));
        }
        *open += 1;
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        status.stream = id;
        let status = Arc::new(Mutex::new(status));
        entries.by_stream.insert(id, status.clone());
        metrics().connected_proxies.inc();
        Ok(ProxyHandle {
            id,
            key,
            entries: self.entries.clone(),
            status,
        })
    }

    /// A copy of every connected proxy's status, by stream id. A proxy no snapshot
    /// since its `snapshot_version` concerned is on the newest one: its config for it
    /// is the same, and so are what was pushed and ACKed.
    pub fn list(&self) -> Vec<ProxyStatus> {
        let entries: Vec<_> = lock(&self.entries).by_stream.values().cloned().collect();
        entries
            .iter()
            .map(|s| {
                let mut s = lock(s).clone();
                let computed = s.snapshot_version;
                if let Some(current) = s.currency.as_ref().map(|c| c.current_through(computed))
                    && current > computed
                {
                    if s.pushed_version == computed {
                        s.pushed_version = current;
                    }
                    if s.synced_version == Some(computed) {
                        s.synced_version = Some(current);
                    }
                    s.snapshot_version = current;
                }
                s
            })
            .collect()
    }

    pub fn len(&self) -> usize {
        lock(&self.entries).by_stream.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One stream's entry; dropping it removes the proxy from the registry.
#[derive(Debug)]
pub struct ProxyHandle {
    id: u64,
    key: (String, String),
    entries: Arc<Mutex<Entries>>,
    status: Arc<Mutex<ProxyStatus>>,
}

impl ProxyHandle {
    pub fn update<R>(&self, f: impl FnOnce(&mut ProxyStatus) -> R) -> R {
        let mut status = lock(&self.status);
        let r = f(&mut status);
        status.recompute_sync();
        r
    }
}

impl Drop for ProxyHandle {
    fn drop(&mut self) {
        let mut entries = lock(&self.entries);
        entries.by_stream.remove(&self.id);
        if let Some(open) = entries.per_workload.get_mut(&self.key) {
            *open -= 1;
            if *open == 0 {
                entries.per_workload.remove(&self.key);
            }
        }
        metrics().connected_proxies.dec();
    }
}

/// A poisoned lock only means another stream panicked mid-update; the status data is
/// still the best we have.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}
