//! Certificates for the proxies meshd serves, and for meshd's own xDS port.
//!
//! The [`CertManager`] owns the CA. A proxy's workload certificate is issued the first
//! time a stream of that identity needs it, shared by every proxy of the identity, and
//! re-issued at half its lifetime by [`CertManager::spawn_rotation`]. Every change bumps
//! a generation on a `watch` channel; streams follow it and push the new secret (SDS),
//! and the xDS TLS acceptor follows it to serve with a fresh certificate.
//!
//! Private keys stay inside [`meshd_ca::IssuedCertificate`]s: they leave this process
//! only as the SDS secret of the proxy whose identity they certify.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use meshd_ca::{Authority, CaError, IssuedCertificate, SpiffeId, TrustBundle};
use tokio::sync::watch;

/// The service account meshd's own serving certificate names.
pub const MESHD_SERVICE_ACCOUNT: &str = "meshd";
/// DNS names in meshd's serving certificate, for clients that check names.
pub const MESHD_DNS_NAMES: &[&str] = &["meshd", "localhost"];

#[derive(Debug)]
pub struct CertManager {
    authority: Authority,
    /// Identity of meshd's xDS server.
    server_id: SpiffeId,
    server: Mutex<Option<Arc<IssuedCertificate>>>,
    workloads: Mutex<HashMap<SpiffeId, Arc<IssuedCertificate>>>,
    generation: watch::Sender<u64>,
}

impl CertManager {
    /// `namespace` is meshd's own namespace, used in its serving identity.
    pub fn new(authority: Authority, namespace: &str) -> Result<Arc<CertManager>, CaError> {
        let server_id = authority
            .workload_id(namespace, MESHD_SERVICE_ACCOUNT)
            .map_err(|e| CaError::Issue {
                id: format!("meshd in namespace {namespace:?}"),
                message: e.to_string(),
            })?;
        Ok(Arc::new(CertManager {
            authority,
            server_id,
            server: Mutex::new(None),
            workloads: Mutex::new(HashMap::new()),
            generation: watch::Sender::new(0),
        }))
    }

    pub fn trust_domain(&self) -> &str {
        &self.authority.config().trust_domain
    }

    pub fn trust_bundle(&self) -> &TrustBundle {
        self.authority.trust_bundle()
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
        let issued = Arc::new(self.authority.issue(id)?);
        tracing::info!(identity = %id, not_after = %humantime::format_rfc3339_seconds(issued.not_after), "issued workload certificate");
        certs.insert(id.clone(), issued.clone());
        Ok(issued)
    }

    /// meshd's own serving certificate for the xDS port.
    pub fn server_certificate(&self) -> Result<Arc<IssuedCertificate>, CaError> {
        let mut server = lock(&self.server);
        if let Some(c) = server
            .as_ref()
            .filter(|c| c.refresh_at() > SystemTime::now())
        {
            return Ok(c.clone());
        }
        let ttl = self.authority.config().workload_ttl;
        let issued = Arc::new(self.authority.issue_with_dns(
            &self.server_id,
            ttl,
            MESHD_DNS_NAMES,
        )?);
        *server = Some(issued.clone());
        Ok(issued)
    }

    /// Re-issues every certificate that reached half its lifetime. Returns when the
    /// next one is due.
    fn rotate_due(&self) -> Option<SystemTime> {
        let now = SystemTime::now();
        let mut rotated = 0;
        let mut next: Option<SystemTime> = None;
        {
            let mut certs = lock(&self.workloads);
            for (id, cert) in certs.iter_mut() {
                if cert.refresh_at() <= now {
                    match self.authority.issue(id) {
                        Ok(fresh) => {
                            *cert = Arc::new(fresh);
                            rotated += 1;
                        }
                        Err(e) => tracing::error!(identity = %id, "cannot rotate certificate: {e}"),
                    }
                }
                next = Some(next.map_or(cert.refresh_at(), |n| n.min(cert.refresh_at())));
            }
        }
        let server_due = lock(&self.server).as_ref().map(|c| c.refresh_at());
        if server_due.is_some_and(|t| t <= now) {
            match self.server_certificate() {
                Ok(_) => rotated += 1,
                Err(e) => tracing::error!("cannot rotate meshd's serving certificate: {e}"),
            }
        }
        if let Some(t) = lock(&self.server).as_ref().map(|c| c.refresh_at()) {
            next = Some(next.map_or(t, |n| n.min(t)));
        }
        if rotated > 0 {
            tracing::info!(rotated, "rotated certificates at half their lifetime");
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
                drop(manager);
                let wait = next
                    .and_then(|t| t.duration_since(SystemTime::now()).ok())
                    .unwrap_or(Duration::from_secs(1))
                    .clamp(Duration::from_millis(50), Duration::from_secs(30));
                tokio::time::sleep(wait).await;
            }
        });
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
