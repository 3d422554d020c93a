//! Staged root rotation with the root in the Kubernetes Secret, for several replicas.
//!
//! The three steps are those of [`crate::identity`] (trust the next root, sign with it,
//! drop the old one); here their state lives in the Secret
//! ([`ca_secret`](super::ca_secret) has the layout), so that:
//!
//! - **only the Lease holder moves a rotation on.** It generates the next root and
//!   writes each step into the Secret when it is due. Each write carries the Secret's
//!   `resourceVersion`, so a replica that lost the Lease a moment ago cannot overwrite
//!   the new holder's step; a new holder carries on from the timestamps in the Secret.
//! - **every replica follows the Secret.** A watch on it hands each version to
//!   [`CertManager::follow_roots`], so the replicas trust and sign alike (within a
//!   watch event of each other; the grace period before signing covers that).
//! - **any replica takes a request.** `POST /ca/rotate-root` on any replica marks the
//!   Secret with a request; the Lease holder starts the rotation from it, and the
//!   request returns once this replica follows step 1.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::PostParams;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use meshd_ca::store::{
    NEXT_ROOT_CERT_FILE, NEXT_ROOT_KEY_FILE, PREVIOUS_ROOT_CERT_FILE, ROOT_CERT_FILE,
    ROOT_KEY_FILE, ROOT_VALIDITY,
};
use tokio::sync::watch;

use super::ca_secret::{
    self, COMPLETED_ANNOTATION, PHASE_ANNOTATION, REQUESTED_ANNOTATION, SECRET_NAME, SIGNING,
    SINCE_ANNOTATION, TRUSTING,
};
use crate::identity::{CertManager, RotationError, RotationStatus, SharedPhase, SharedRoots};

/// How long a request waits for the Lease holder to start the rotation.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Takes rotation requests (`POST /ca/rotate-root`) on this replica.
#[derive(Debug, Clone)]
pub struct Requests {
    api: Api<Secret>,
    origin: String,
    field_manager: String,
}

impl Requests {
    /// Marks the Secret with a request and waits until this replica follows step 1.
    pub async fn request(&self, certs: &CertManager) -> Result<RotationStatus, RotationError> {
        let failed = |e: kube::Error| RotationError::Request(format!("{}: {e}", self.origin));
        let mut marked = false;
        for _ in 0..3 {
            let mut secret = self.api.get(SECRET_NAME).await.map_err(failed)?;
            let annotations = secret.metadata.annotations.get_or_insert_default();
            if let Some(phase) = annotations.get(PHASE_ANNOTATION) {
                return Err(RotationError::InProgress(phase.clone()));
            }
            annotations.insert(REQUESTED_ANNOTATION.to_string(), now_rfc3339());
            match self.api.replace(SECRET_NAME, &self.params(), &secret).await {
                Ok(_) => {
                    marked = true;
                    break;
                }
                // Someone wrote the Secret in between: look again.
                Err(kube::Error::Api(e)) if e.code == 409 => continue,
                Err(e) => return Err(failed(e)),
            }
        }
        if !marked {
            return Err(RotationError::Request(format!(
                "{} kept changing while the request was written",
                self.origin
            )));
        }
        tracing::info!("root rotation requested in {}", self.origin);
        let mut changes = certs.changes();
        let started = tokio::time::timeout(START_TIMEOUT, async {
            while !certs.rotating() {
                if changes.changed().await.is_err() {
                    break;
                }
            }
        })
        .await;
        match started {
            Ok(()) if certs.rotating() => Ok(certs.rotation_status()),
            _ => Err(RotationError::NotStarted(self.origin.clone())),
        }
    }

    fn params(&self) -> PostParams {
        PostParams {
            field_manager: Some(self.field_manager.clone()),
            ..Default::default()
        }
    }
}

/// Follows the Secret on this replica, and moves rotations on while it holds the Lease.
pub fn spawn(
    client: Client,
    namespace: &str,
    certs: Arc<CertManager>,
    mut leader: watch::Receiver<bool>,
    replica: &str,
) -> Requests {
    let requests = Requests {
        api: Api::namespaced(client, namespace),
        origin: ca_secret::origin(namespace),
        field_manager: format!("meshd/{replica}"),
    };
    let driver = requests.clone();
    tokio::spawn(async move {
        let config = watcher::Config::default().fields(&format!("metadata.name={SECRET_NAME}"));
        let mut secrets = watcher(driver.api.clone(), config)
            .default_backoff()
            .applied_objects()
            .boxed();
        // The last version of the Secret this replica could follow, and its roots.
        let mut latest: Option<(Secret, SharedRoots)> = None;
        let mut leader_alive = true;
        loop {
            let leading = leader_alive && *leader.borrow();
            let wait = latest
                .as_ref()
                .filter(|_| leading)
                .and_then(|(secret, roots)| due_at(secret, roots, &certs))
                .map_or(Duration::from_secs(60), |due| {
                    due.duration_since(SystemTime::now())
                        .unwrap_or(Duration::ZERO)
                });
            tokio::select! {
                next = secrets.next() => match next {
                    Some(Ok(secret)) => {
                        if let Some(roots) = follow(&certs, &secret, &driver.origin) {
                            latest = Some((secret, roots));
                        }
                    }
                    Some(Err(e)) => tracing::warn!("watching {}: {e}", driver.origin),
                    None => return,
                },
                changed = leader.changed(), if leader_alive => leader_alive = changed.is_ok(),
                _ = tokio::time::sleep(wait) => {}
            }
            if !(leader_alive && *leader.borrow()) {
                continue;
            }
            let Some((secret, roots)) = &latest else {
                continue;
            };
            let step = match next_step(secret, roots, SystemTime::now(), &certs) {
                Ok(Some(step)) => step,
                Ok(None) => continue,
                Err(e) => {
                    tracing::error!("root rotation cannot proceed: {e:#}");
                    continue;
                }
            };
            let (what, secret) = step;
            match driver
                .api
                .replace(SECRET_NAME, &driver.params(), &secret)
                .await
            {
                Ok(written) => {
                    tracing::info!("root rotation: {what}");
                    if let Some(roots) = follow(&certs, &written, &driver.origin) {
                        latest = Some((written, roots));
                    }
                }
                // The Secret changed under us (a request, another holder): the watch
                // brings the new version and the step is reconsidered then.
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => tracing::error!("root rotation: cannot write {}: {e}", driver.origin),
            }
        }
    });
    requests
}

/// Has this replica sign and trust as `secret` says; returns its roots, or `None`
/// (logged) if the Secret cannot be followed.
fn follow(certs: &CertManager, secret: &Secret, origin: &str) -> Option<SharedRoots> {
    let result = ca_secret::shared_roots(secret, origin).and_then(|roots| {
        certs.follow_roots(&roots)?;
        Ok(roots)
    });
    result
        .map_err(|e| tracing::error!("cannot follow the roots in {origin}: {e:#}"))
        .ok()
}

/// When the rotation in `secret` has its next step due, if one is under way or
/// requested.
fn due_at(secret: &Secret, roots: &SharedRoots, certs: &CertManager) -> Option<SystemTime> {
    match roots.phase {
        SharedPhase::Idle => requested(secret).then_some(SystemTime::UNIX_EPOCH),
        SharedPhase::Trusting { since } => Some(since + certs.rotation_grace()),
        SharedPhase::Signing { since } => Some(certs.shared_old_leaves_expire(since)),
    }
}

fn requested(secret: &Secret) -> bool {
    secret
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(REQUESTED_ANNOTATION))
}

/// The step due at `now`, as a description and the Secret that records it.
fn next_step(
    secret: &Secret,
    roots: &SharedRoots,
    now: SystemTime,
    certs: &CertManager,
) -> anyhow::Result<Option<(&'static str, Secret)>> {
    if due_at(secret, roots, certs).is_none_or(|due| due > now) {
        return Ok(None);
    }
    // The time bound covers every replica's certificates; this replica's ledger says
    // so for its own (it issued them, it knows).
    if matches!(roots.phase, SharedPhase::Signing { .. }) && certs.valid_under_old_roots() > 0 {
        return Ok(None);
    }
    let mut next = secret.clone();
    next.metadata.managed_fields = None;
    let annotations = next.metadata.annotations.get_or_insert_default();
    let data = next.data.get_or_insert_default();
    let what = match roots.phase {
        SharedPhase::Idle => {
            let (cert, key) = meshd_ca::generate_root(certs.trust_domain(), ROOT_VALIDITY)?;
            data.insert(NEXT_ROOT_CERT_FILE.into(), ByteString(cert.into_bytes()));
            data.insert(
                NEXT_ROOT_KEY_FILE.into(),
                ByteString(key.secret_pem().as_bytes().to_vec()),
            );
            annotations.remove(REQUESTED_ANNOTATION);
            annotations.insert(PHASE_ANNOTATION.into(), TRUSTING.into());
            "step 1/3: a new root is trusted alongside the old one"
        }
        SharedPhase::Trusting { .. } => {
            annotations.insert(PHASE_ANNOTATION.into(), SIGNING.into());
            "step 2/3: certificates are now signed by the new root"
        }
        SharedPhase::Signing { .. } => {
            let take = |data: &mut std::collections::BTreeMap<String, ByteString>, key: &str| {
                data.remove(key)
                    .ok_or_else(|| anyhow::anyhow!("the Secret has no {key:?}"))
            };
            let old_cert = take(data, ROOT_CERT_FILE)?;
            let new_cert = take(data, NEXT_ROOT_CERT_FILE)?;
            let new_key = take(data, NEXT_ROOT_KEY_FILE)?;
            data.insert(PREVIOUS_ROOT_CERT_FILE.into(), old_cert);
            data.insert(ROOT_CERT_FILE.into(), new_cert);
            data.insert(ROOT_KEY_FILE.into(), new_key);
            annotations.remove(PHASE_ANNOTATION);
            annotations.remove(SINCE_ANNOTATION);
            annotations.insert(COMPLETED_ANNOTATION.into(), rfc3339(now));
            "step 3/3: the old root is no longer trusted; rotation complete"
        }
    };
    if annotations.contains_key(PHASE_ANNOTATION) {
        annotations.insert(SINCE_ANNOTATION.into(), rfc3339(now));
    }
    Ok(Some((what, next)))
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

fn now_rfc3339() -> String {
    rfc3339(SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::api::ObjectMeta;

    const GRACE: Duration = Duration::from_secs(30);
    const TTL: Duration = Duration::from_secs(3600);

    /// A Secret as `ca_secret::root` creates it, and a replica following it.
    fn start() -> (Secret, Arc<CertManager>) {
        let (cert, key) = meshd_ca::generate_root("cluster.local", ROOT_VALIDITY).unwrap();
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(SECRET_NAME.into()),
                ..Default::default()
            },
            data: Some(
                [
                    (ROOT_CERT_FILE.into(), ByteString(cert.into_bytes())),
                    (
                        ROOT_KEY_FILE.into(),
                        ByteString(key.secret_pem().as_bytes().to_vec()),
                    ),
                ]
                .into(),
            ),
            ..Default::default()
        };
        let roots = ca_secret::shared_roots(&secret, "test").unwrap();
        let config = meshd_ca::CaConfig {
            workload_ttl: TTL,
            ..Default::default()
        };
        let certs = CertManager::open(roots.current, config, "meshd", GRACE).unwrap();
        (secret, certs)
    }

    fn text(secret: &Secret, key: &str) -> Option<String> {
        let bytes = secret.data.as_ref()?.get(key)?;
        Some(String::from_utf8(bytes.0.clone()).unwrap())
    }

    /// Applies the step due at `now` (if any) and has the replica follow the result.
    fn step(secret: &Secret, now: SystemTime, certs: &CertManager) -> Option<Secret> {
        let roots = ca_secret::shared_roots(secret, "test").unwrap();
        let (_, next) = next_step(secret, &roots, now, certs).unwrap()?;
        certs
            .follow_roots(&ca_secret::shared_roots(&next, "test").unwrap())
            .unwrap();
        Some(next)
    }

    #[test]
    fn a_request_walks_the_secret_through_the_three_steps() {
        let (mut secret, certs) = start();
        let t0 = SystemTime::now();
        let old_root = text(&secret, ROOT_CERT_FILE).unwrap();
        assert!(step(&secret, t0, &certs).is_none(), "nothing requested");

        secret
            .metadata
            .annotations
            .get_or_insert_default()
            .insert(REQUESTED_ANNOTATION.into(), rfc3339(t0));
        let trusting = step(&secret, t0, &certs).expect("step 1 is due at once");
        let roots = ca_secret::shared_roots(&trusting, "test").unwrap();
        assert!(matches!(roots.phase, SharedPhase::Trusting { .. }));
        let new_root = text(&trusting, NEXT_ROOT_CERT_FILE).unwrap();
        let bundle = certs.trust_bundle();
        assert_eq!(bundle.roots(), [old_root.clone(), new_root.clone()]);
        let annotations = trusting.metadata.annotations.as_ref().unwrap();
        assert!(!annotations.contains_key(REQUESTED_ANNOTATION));

        let t1 = t0 + GRACE;
        assert!(step(&trusting, t1 - Duration::from_secs(1), &certs).is_none());
        let signing = step(&trusting, t1, &certs).expect("step 2 after the grace period");
        assert_eq!(
            certs.trust_bundle().roots(),
            [new_root.clone(), old_root.clone()],
            "the new root signs; both are trusted"
        );

        // Old leaves live up to a lifetime, plus the grace replicas take to switch.
        let t2 = t1 + TTL + GRACE;
        assert!(step(&signing, t2 - Duration::from_secs(1), &certs).is_none());
        let done = step(&signing, t2, &certs).expect("step 3 once old leaves expired");
        assert_eq!(text(&done, ROOT_CERT_FILE).unwrap(), new_root);
        assert_eq!(text(&done, PREVIOUS_ROOT_CERT_FILE).unwrap(), old_root);
        assert_eq!(text(&done, NEXT_ROOT_CERT_FILE), None);
        assert_eq!(text(&done, NEXT_ROOT_KEY_FILE), None);
        assert_eq!(certs.trust_bundle().roots(), [new_root]);
        assert!(!certs.rotating());
        assert!(certs.rotation_status().last_completed_at.is_some());
        assert!(
            step(&done, t2 + TTL, &certs).is_none(),
            "nothing more to do"
        );
    }

    #[test]
    fn a_broken_rotation_state_is_reported_with_the_secret_and_key() {
        let (mut secret, _) = start();
        secret
            .metadata
            .annotations
            .get_or_insert_default()
            .insert(PHASE_ANNOTATION.into(), "sideways".into());
        let e = ca_secret::shared_roots(&secret, "Secret meshd-system/meshd-ca").unwrap_err();
        assert!(
            e.to_string()
                .contains("Secret meshd-system/meshd-ca annotation meshd.io/root-rotation-phase"),
            "{e}"
        );
    }
}
