//! Certificates for the proxies meshd serves and for meshd's own xDS port, and the
//! staged rotation of the root.
//!
//! The [`CertManager`] owns the CA. A proxy's workload certificate is issued the first
//! time a stream of that identity needs it, shared by every proxy of the identity, and
//! re-issued at half its lifetime by [`CertManager::spawn_rotation`]. Every change bumps
//! a generation on a `watch` channel; streams follow it and push the new secrets (SDS),
//! and the xDS TLS acceptor follows it to serve with a fresh certificate and bundle.
//!
//! Root rotation runs in three steps, each pushed to every proxy before the next:
//! 1. **trusting**: a new root is generated and added to the trust bundle; leaves are
//!    still signed by the old root.
//! 2. **signing**: after `grace`, leaves are re-issued by the new root; both roots stay
//!    trusted, so old and new leaves verify each other.
//! 3. **done**: once no leaf signed by the old root can still be valid (one workload
//!    lifetime later), the old root leaves the bundle and the files are promoted.
//!
//! Where the rotation's state lives decides who moves it on:
//! - with `--ca-dir` this process does, on its own timer, and keeps the next root as
//!   files beside the current one;
//! - with the root in a Kubernetes Secret, the Lease holder does
//!   ([`crate::cluster::root_rotation`]) and writes roots and phase into the Secret;
//!   every replica follows the Secret through [`CertManager::follow_roots`], so all
//!   replicas trust and sign alike.
//!
//! Private keys stay inside [`meshd_ca::IssuedCertificate`]s: they leave this process
//! only as the SDS secret of the proxy whose identity they certify. Certificates for a
//! CSR ([`CertManager::sign_csr`], meshd-agent's xDS client certificate) carry a key
//! meshd never sees.
//!
//! Every certificate issued is kept in a ledger (serial-free: its expiry and the root
//! that signed it) until it expires, so that the step dropping a root can wait until
//! no certificate this replica issued under it is still valid, and `meshctl ca status`
//! can say how many are left.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, SystemTime};

use meshd_ca::csr::Csr;
use meshd_ca::store::{self, CaSource};
use meshd_ca::{Authority, CaError, IssuedCertificate, SignedCertificate, SpiffeId, TrustBundle};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

pub use meshd_ca::MESHD_SERVICE_ACCOUNT;
/// DNS names in meshd's serving certificate, for clients that check names.
pub const MESHD_DNS_NAMES: &[&str] = &["meshd", "localhost"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Idle,
    /// Step 1 done at `since`.
    Trusting {
        since: SystemTime,
    },
    /// Step 2 done; old leaves are all expired at `old_leaves_expire`.
    Signing {
        old_leaves_expire: SystemTime,
    },
}

/// What `meshctl ca status` shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RotationStatus {
    /// `idle`, `trusting-new-root` or `signing-with-new-root`.
    pub phase: String,
    /// Serial numbers of the roots in the trust bundle, the signing root first.
    pub trusted_roots: Vec<String>,
    pub next_step_at: Option<String>,
    pub last_completed_at: Option<String>,
    /// Certificates this replica issued (over SDS or for a CSR) that are still valid
    /// and signed by a root other than the one signing now. The step that drops the
    /// old root waits for 0.
    #[serde(default)]
    pub valid_under_old_roots: usize,
}

#[derive(Debug)]
struct Rotation {
    phase: Phase,
    last_completed: Option<SystemTime>,
}

#[derive(Debug)]
pub struct CertManager {
    source: CaSource,
    config: meshd_ca::CaConfig,
    authority: RwLock<Arc<Authority>>,
    /// How long proxies get to receive a new root before leaves are signed with it.
    grace: Duration,
    rotation: Mutex<Rotation>,
    /// Identity of meshd's xDS server.
    server_id: SpiffeId,
    server: Mutex<Option<Arc<IssuedCertificate>>>,
    /// DNS names of the serving certificate beside [`MESHD_DNS_NAMES`].
    server_dns_names: Mutex<Vec<String>>,
    workloads: Mutex<HashMap<SpiffeId, Arc<IssuedCertificate>>>,
    ledger: Mutex<Ledger>,
    generation: watch::Sender<u64>,
}

/// The certificates issued and not yet expired, counted by the second they expire
/// in and the serial of the root that signed them: its size is bounded by the
/// lifetime in seconds (times the roots, two at most), however many are signed. A
/// `BTreeMap` so that the expired ones leave from the front.
#[derive(Debug, Default)]
struct Ledger {
    valid: std::collections::BTreeMap<(u64, Arc<str>), usize>,
    /// The roots seen, so that an entry shares its root's name.
    signers: Vec<Arc<str>>,
}

impl Ledger {
    fn record(&mut self, not_after: SystemTime, signer: &str) {
        let now = SystemTime::now();
        self.prune(now);
        // One allocation per root, not per certificate.
        let signer = match self.signers.iter().find(|s| &***s == signer) {
            Some(s) => s.clone(),
            None => {
                let s: Arc<str> = signer.into();
                self.signers.truncate(3);
                self.signers.insert(0, s.clone());
                s
            }
        };
        // Rounded up: a certificate counts until its last second is over.
        *self
            .valid
            .entry((unix_seconds(not_after) + 1, signer))
            .or_default() += 1;
    }

    fn prune(&mut self, now: SystemTime) {
        let now = unix_seconds(now);
        while let Some(entry) = self.valid.first_entry() {
            if entry.key().0 > now {
                break;
            }
            entry.remove();
        }
    }

    /// Valid certificates signed by any root but `signer`.
    fn valid_not_signed_by(&mut self, signer: &str) -> usize {
        self.prune(SystemTime::now());
        self.valid
            .iter()
            .filter(|((_, s), _)| &**s != signer)
            .map(|(_, n)| n)
            .sum()
    }
}

fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    #[error("a root rotation is already under way ({0})")]
    InProgress(String),
    #[error(
        "the CA is a plug-in (--ca-cert-chain): rotate it where it is issued, then restart meshd"
    )]
    PlugIn,
    #[error("the root is kept in {0}: its rotation is requested there (meshd's Kubernetes mode)")]
    Shared(String),
    #[error(
        "root rotation requested in {0}, but no replica holding the Lease has started it \
         yet; it starts when one does (watch `meshctl ca status`)"
    )]
    NotStarted(String),
    #[error("cannot request the root rotation: {0}")]
    Request(String),
    #[error(transparent)]
    Ca(#[from] CaError),
}

/// A root rotation whose state is kept outside this process (in the Kubernetes Secret),
/// as the replica that performs the steps last wrote it.
#[derive(Debug, Clone)]
pub struct SharedRoots {
    /// The root, as `CaSource::Pem`.
    pub current: CaSource,
    /// The root being rotated in, while a rotation is under way.
    pub next: Option<CaSource>,
    pub phase: SharedPhase,
    pub last_completed: Option<SystemTime>,
}

/// Where a shared rotation stands, and since when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedPhase {
    Idle,
    /// Step 1: the next root is trusted alongside the current one.
    Trusting {
        since: SystemTime,
    },
    /// Step 2: certificates are signed by the next root; both are trusted.
    Signing {
        since: SystemTime,
    },
}

impl CertManager {
    /// Opens the CA from `source`, generating meshd's root in a directory that has none
    /// and finishing or undoing a step a crash interrupted. `namespace` is meshd's own
    /// namespace, used in its serving identity. A rotation staged before a restart
    /// resumes at step 1.
    pub fn open(
        source: CaSource,
        config: meshd_ca::CaConfig,
        namespace: &str,
        grace: Duration,
    ) -> Result<Arc<CertManager>, CaError> {
        let (mut authority, opened) = store::open_or_create(&source, config.clone())?;
        match opened {
            store::Opened::Generated => tracing::info!("generated a new mesh root in {source}"),
            store::Opened::Loaded { repaired } => {
                for repair in repaired {
                    tracing::warn!("{source}: {repair}");
                }
            }
        }
        let mut phase = Phase::Idle;
        if let CaSource::Directory(dir) = &source
            && let Some(next) = store::load_next_root(dir, config.clone())?
        {
            tracing::info!("resuming a staged root rotation at step 1 (trusting the new root)");
            authority = authority.with_extra_roots(next.trust_bundle().roots());
            phase = Phase::Trusting {
                since: SystemTime::now(),
            };
        }
        let server_id = authority
            .workload_id(namespace, MESHD_SERVICE_ACCOUNT)
            .map_err(|e| CaError::Issue {
                id: format!("meshd in namespace {namespace:?}"),
                message: e.to_string(),
            })?;
        Ok(Arc::new(CertManager {
            source,
            config,
            authority: RwLock::new(Arc::new(authority)),
            grace,
            rotation: Mutex::new(Rotation {
                phase,
                last_completed: None,
            }),
            server_id,
            server: Mutex::new(None),
            server_dns_names: Mutex::new(Vec::new()),
            workloads: Mutex::new(HashMap::new()),
            ledger: Mutex::new(Ledger::default()),
            generation: watch::Sender::new(0),
        }))
    }

    fn authority(&self) -> Arc<Authority> {
        self.authority
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Lifetime of workload certificates.
    pub fn workload_ttl(&self) -> Duration {
        self.config.workload_ttl
    }

    /// How long proxies get to receive a new root before certificates are signed by it.
    pub fn rotation_grace(&self) -> Duration {
        self.grace
    }

    /// In a shared rotation whose signing step began at `signing_since`: when no
    /// certificate from the old root can be valid any more. Replicas switch to the new
    /// signer within the grace period of each other, so it adds to the lifetime.
    pub fn shared_old_leaves_expire(&self, signing_since: SystemTime) -> SystemTime {
        signing_since + self.config.workload_ttl + self.grace
    }

    /// Whether a root rotation is under way.
    pub fn rotating(&self) -> bool {
        lock(&self.rotation).phase != Phase::Idle
    }

    pub fn trust_domain(&self) -> &str {
        &self.config.trust_domain
    }

    pub fn trust_bundle(&self) -> TrustBundle {
        self.authority().trust_bundle().clone()
    }

    pub fn server_id(&self) -> &SpiffeId {
        &self.server_id
    }

    /// Bumped whenever a certificate or the trust bundle changes.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// The current certificate of `id`, issued now if it has none or it is due.
    pub fn workload_certificate(&self, id: &SpiffeId) -> Result<Arc<IssuedCertificate>, CaError> {
        let mut certs = lock(&self.workloads);
        if let Some(c) = certs.get(id).filter(|c| c.refresh_at() > SystemTime::now()) {
            return Ok(c.clone());
        }
        let authority = self.authority();
        let issued = Arc::new(authority.issue(id)?);
        self.record(&authority, &issued);
        tracing::info!(identity = %id, not_after = %humantime::format_rfc3339_seconds(issued.not_after), "issued workload certificate");
        certs.insert(id.clone(), issued.clone());
        Ok(issued)
    }

    /// Signs a checked CSR for `id` (the caller's authenticated identity), valid for
    /// `ttl` but never longer than the workload lifetime, so the rotation's wait for old
    /// certificates to expire holds for these too. Returns the certificate and the
    /// trust bundle it goes with.
    pub fn sign_csr(
        &self,
        csr: &Csr,
        id: &SpiffeId,
        ttl: Duration,
    ) -> Result<(SignedCertificate, TrustBundle), CaError> {
        let authority = self.authority();
        let signed = authority.sign_csr(csr, id, ttl.min(self.config.workload_ttl))?;
        self.record(&authority, &signed);
        Ok((signed, authority.trust_bundle().clone()))
    }

    fn record(&self, authority: &Authority, cert: &SignedCertificate) {
        let signer = authority
            .trust_bundle()
            .roots()
            .first()
            .map(|r| root_serial(r))
            .unwrap_or_default();
        lock(&self.ledger).record(cert.not_after, &signer);
    }

    /// Valid certificates issued here under a root that no longer signs.
    pub fn valid_under_old_roots(&self) -> usize {
        let signer = self
            .authority()
            .trust_bundle()
            .roots()
            .first()
            .map(|r| root_serial(r))
            .unwrap_or_default();
        lock(&self.ledger).valid_not_signed_by(&signer)
    }

    /// Adds DNS names to meshd's serving certificate (the webhook Service's
    /// `<service>.<namespace>.svc`, which the API server checks); the next one has them.
    pub fn add_server_dns_names(&self, names: impl IntoIterator<Item = String>) {
        lock(&self.server_dns_names).extend(names);
        *lock(&self.server) = None;
        self.generation.send_modify(|g| *g += 1);
    }

    /// meshd's own serving certificate, for all its TLS ports.
    pub fn server_certificate(&self) -> Result<Arc<IssuedCertificate>, CaError> {
        let mut server = lock(&self.server);
        if let Some(c) = server
            .as_ref()
            .filter(|c| c.refresh_at() > SystemTime::now())
        {
            return Ok(c.clone());
        }
        let extra = lock(&self.server_dns_names).clone();
        let names: Vec<&str> = MESHD_DNS_NAMES
            .iter()
            .copied()
            .chain(extra.iter().map(String::as_str))
            .collect();
        let issued = Arc::new(self.authority().issue_with_dns(
            &self.server_id,
            self.config.workload_ttl,
            &names,
        )?);
        *server = Some(issued.clone());
        Ok(issued)
    }

    /// Step 1 of a root rotation: a new root joins the trust bundle.
    pub fn start_root_rotation(&self) -> Result<RotationStatus, RotationError> {
        let dir = match &self.source {
            CaSource::Directory(dir) => dir,
            CaSource::PlugIn { .. } => return Err(RotationError::PlugIn),
            CaSource::Pem { origin, .. } => return Err(RotationError::Shared(origin.clone())),
        };
        {
            let mut rotation = lock(&self.rotation);
            if rotation.phase != Phase::Idle {
                return Err(RotationError::InProgress(phase_name(rotation.phase).into()));
            }
            store::stage_next_root(dir, &self.config)?;
            let next = self.load_next(dir)?;
            let trusting = self
                .load_current(dir)?
                .with_extra_roots(next.trust_bundle().roots());
            self.install(trusting);
            rotation.phase = Phase::Trusting {
                since: SystemTime::now(),
            };
        }
        tracing::info!("root rotation step 1/3: the new root is trusted alongside the old one");
        self.generation.send_modify(|g| *g += 1);
        Ok(self.rotation_status())
    }

    /// Takes the roots and phase of a rotation that another replica may be driving:
    /// trusts what `roots` says to trust and signs with what it says to sign with.
    /// Certificates signed by a root that no longer signs are re-issued.
    pub fn follow_roots(&self, roots: &SharedRoots) -> Result<(), CaError> {
        let open = |source: &CaSource| store::open(source, self.config.clone());
        let current = open(&roots.current)?;
        let (authority, phase) = match (roots.phase, &roots.next) {
            (SharedPhase::Trusting { since }, Some(next)) => (
                current.with_extra_roots(open(next)?.trust_bundle().roots()),
                Phase::Trusting { since },
            ),
            (SharedPhase::Signing { since }, Some(next)) => (
                open(next)?.with_extra_roots(current.trust_bundle().roots()),
                Phase::Signing {
                    old_leaves_expire: self.shared_old_leaves_expire(since),
                },
            ),
            _ => (current, Phase::Idle),
        };
        let changed = self.authority().trust_bundle().roots() != authority.trust_bundle().roots();
        if changed {
            self.install(authority);
        }
        {
            let mut rotation = lock(&self.rotation);
            rotation.phase = phase;
            rotation.last_completed = roots.last_completed;
        }
        if changed {
            tracing::info!(
                phase = phase_name(phase),
                "following the shared root rotation"
            );
            self.generation.send_modify(|g| *g += 1);
        }
        Ok(())
    }

    /// Signs and trusts with `authority` from now on. Certificates signed by a root
    /// that no longer signs (the bundle's first) are dropped, to be issued again.
    /// The caller bumps the generation once its state is consistent.
    fn install(&self, authority: Authority) {
        let signer_changed = {
            let mut current = self.authority.write().unwrap_or_else(|p| p.into_inner());
            let changed =
                current.trust_bundle().roots().first() != authority.trust_bundle().roots().first();
            *current = Arc::new(authority);
            changed
        };
        // Not under the authority's lock: `workload_certificate` takes the two the other
        // way round.
        if signer_changed {
            lock(&self.workloads).clear();
            *lock(&self.server) = None;
        }
    }

    pub fn rotation_status(&self) -> RotationStatus {
        let rotation = lock(&self.rotation);
        let next = match rotation.phase {
            Phase::Idle => None,
            Phase::Trusting { since } => Some(since + self.grace),
            Phase::Signing { old_leaves_expire } => Some(old_leaves_expire),
        };
        RotationStatus {
            phase: phase_name(rotation.phase).to_string(),
            trusted_roots: self
                .trust_bundle()
                .roots()
                .iter()
                .map(|pem| root_serial(pem))
                .collect(),
            next_step_at: next.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
            last_completed_at: rotation
                .last_completed
                .map(|t| humantime::format_rfc3339_seconds(t).to_string()),
            valid_under_old_roots: self.valid_under_old_roots(),
        }
    }

    fn dir(&self) -> Option<&PathBuf> {
        match &self.source {
            CaSource::Directory(d) => Some(d),
            CaSource::PlugIn { .. } | CaSource::Pem { .. } => None,
        }
    }

    fn load_current(&self, dir: &std::path::Path) -> Result<Authority, CaError> {
        store::open(&CaSource::Directory(dir.to_path_buf()), self.config.clone())
    }

    fn load_next(&self, dir: &std::path::Path) -> Result<Authority, CaError> {
        store::load_next_root(dir, self.config.clone())?.ok_or_else(|| CaError::File {
            path: dir.join(store::NEXT_ROOT_CERT_FILE),
            message: "is missing: the staged root disappeared".into(),
        })
    }

    /// Moves a root rotation on when its step is due. Returns whether it changed
    /// anything.
    fn advance_rotation(&self) -> Result<bool, CaError> {
        let Some(dir) = self.dir() else {
            return Ok(false);
        };
        let now = SystemTime::now();
        let mut rotation = lock(&self.rotation);
        match rotation.phase {
            Phase::Trusting { since } if now >= since + self.grace => {
                let old = self.load_current(dir)?;
                let signing = self
                    .load_next(dir)?
                    .with_extra_roots(old.trust_bundle().roots());
                // Every leaf is re-issued by the new root now.
                self.install(signing);
                rotation.phase = Phase::Signing {
                    old_leaves_expire: now + self.config.workload_ttl + Duration::from_secs(1),
                };
                tracing::info!(
                    "root rotation step 2/3: certificates are now signed by the new root"
                );
                Ok(true)
            }
            Phase::Signing { old_leaves_expire }
                if now >= old_leaves_expire && self.valid_under_old_roots() == 0 =>
            {
                // Finishes a promotion an earlier tick left half done, too.
                store::promote_next_root(dir)?;
                let promoted = self.load_current(dir)?;
                // Trusting only a root other than the one leaves are signed with would
                // cut every sidecar off; stay in this step until the files agree.
                if promoted.trust_bundle().roots().first()
                    != self.authority().trust_bundle().roots().first()
                {
                    return Err(CaError::File {
                        path: dir.join(store::ROOT_KEY_FILE),
                        message: "after the promotion this is not the root certificates \
                                  are signed with: the CA directory changed under meshd"
                            .into(),
                    });
                }
                self.install(promoted);
                rotation.phase = Phase::Idle;
                rotation.last_completed = Some(now);
                tracing::info!(
                    "root rotation step 3/3: the old root is no longer trusted; rotation complete"
                );
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Re-issues every certificate that reached half its lifetime. Returns when the
    /// next one is due.
    fn rotate_due(&self) -> Option<SystemTime> {
        let now = SystemTime::now();
        let mut changed = match self.advance_rotation() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("root rotation cannot proceed: {e}");
                false
            }
        };
        let authority = self.authority();
        let mut next: Option<SystemTime> = None;
        {
            let mut certs = lock(&self.workloads);
            for (id, cert) in certs.iter_mut() {
                if cert.refresh_at() <= now {
                    match authority.issue(id) {
                        Ok(fresh) => {
                            self.record(&authority, &fresh);
                            *cert = Arc::new(fresh);
                            changed = true;
                        }
                        Err(e) => tracing::error!(identity = %id, "cannot rotate certificate: {e}"),
                    }
                }
                next = Some(next.map_or(cert.refresh_at(), |n| n.min(cert.refresh_at())));
            }
        }
        let server_due = lock(&self.server).as_ref().map(|c| c.refresh_at());
        if server_due.is_none_or(|t| t <= now) {
            match self.server_certificate() {
                Ok(_) => changed |= server_due.is_some(),
                Err(e) => tracing::error!("cannot issue meshd's serving certificate: {e}"),
            }
        }
        if let Some(t) = lock(&self.server).as_ref().map(|c| c.refresh_at()) {
            next = Some(next.map_or(t, |n| n.min(t)));
        }
        if changed {
            tracing::debug!("certificates or trust bundle changed");
            self.generation.send_modify(|g| *g += 1);
        }
        next
    }

    /// Rotates certificates as they come due, for as long as the manager lives.
    pub fn spawn_rotation(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(manager) = weak.upgrade() else { break };
                let next = manager.rotate_due();
                let rotating = lock(&manager.rotation).phase != Phase::Idle;
                drop(manager);
                let max = if rotating {
                    Duration::from_millis(250)
                } else {
                    Duration::from_secs(30)
                };
                let wait = next
                    .and_then(|t| t.duration_since(SystemTime::now()).ok())
                    .unwrap_or(Duration::from_secs(1))
                    .clamp(Duration::from_millis(50), max);
                tokio::time::sleep(wait).await;
            }
        });
    }
}

fn phase_name(p: Phase) -> &'static str {
    match p {
        Phase::Idle => "idle",
        Phase::Trusting { .. } => "trusting-new-root",
        Phase::Signing { .. } => "signing-with-new-root",
    }
}

/// A root's serial number, hex, to tell roots apart in status output.
fn root_serial(pem: &str) -> String {
    pem::parse(pem)
        .ok()
        .and_then(|p| {
            x509_parser::parse_x509_certificate(p.contents())
                .ok()
                .map(|(_, c)| c.raw_serial_as_string())
        })
        .unwrap_or_else(|| "?".to_string())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ledger_counts_by_second_and_root_so_signing_more_costs_no_memory() {
        let mut ledger = Ledger::default();
        let later = SystemTime::now() + Duration::from_secs(600);
        for _ in 0..10_000 {
            ledger.record(later, "old");
        }
        ledger.record(later, "new");
        ledger.record(SystemTime::now() - Duration::from_secs(1), "old");
        // The expired one is gone at the next look.
        assert_eq!(ledger.valid_not_signed_by("new"), 10_000);
        assert_eq!(ledger.valid_not_signed_by("old"), 1);
        assert_eq!(ledger.valid.len(), 2, "one entry per second and root");
        assert_eq!(ledger.signers.len(), 2);
    }
}
