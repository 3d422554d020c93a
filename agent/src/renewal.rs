//! The credential task: it gets the first certificate, then keeps the agent's
//! directory current for as long as the agent runs.
//!
//! - Every signature is for a fresh key ([`keys`](crate::keys)); the set (chain, key,
//!   meshd's trust bundle) is written with `CredentialDir::write`, one atomic swap
//!   that Envoy's watched directory picks up without a restart.
//! - Renewal at half the lifetime ±10 % ([`schedule`](crate::schedule)), and at once
//!   when `WatchTrustBundle` announces a signing root (`roots_pem[0]`) that did not
//!   sign the certificate held (a root rotation's signing step).
//! - Every change of the bundle rewrites the set with it, so Envoy checks meshd with
//!   the roots meshd trusts now, and the agent verifies meshd with them too.
//! - Failures (meshd unreachable, a refusal, an unreadable token) are retried with
//!   exponential backoff up to 30 s, each logged with meshd's reason, escaped; the
//!   watch stream reconnects the same way whenever it breaks.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use meshd_proto::ca::TrustBundle;
use meshd_sidecar::credentials::{CredentialDir, Credentials};
use tokio::sync::{oneshot, watch};
use tokio::time::{Instant, sleep, sleep_until};
use tonic::Streaming;
use tracing::{debug, info, warn};

use crate::ca_client::{CaClient, bundle_pem};
use crate::certs::{self, Leaf};
use crate::health::Stage;
use crate::identity::{Mode, Pod};
use crate::keys::new_key_and_csr;
use crate::schedule::{Backoff, renew_after};

pub struct Renewer {
    mode: Mode,
    pod: Pod,
    ca: CaClient,
    dir: CredentialDir,
    /// The roots meshd must chain to: those configured (and those the agent's
    /// directory kept from a previous run) until meshd sends its own.
    roots: String,
    /// The set in the agent's directory, and its leaf.
    held: Option<(Credentials, Leaf)>,
    renew_at: Instant,
    stage: Arc<watch::Sender<Stage>>,
}

impl Renewer {
    pub fn new(
        mode: Mode,
        pod: Pod,
        ca: CaClient,
        dir: CredentialDir,
        configured_roots: String,
        stage: Arc<watch::Sender<Stage>>,
    ) -> Renewer {
        // A restarted agent finds its last set: its bundle may know a root that the
        // configured one does not yet (a rotation since), and in local mode its
        // certificate may be the only valid one left.
        let held = dir
            .read()
            .ok()
            .and_then(|c| Some((certs::leaf(&c.cert_chain_pem).ok()?, c)))
            .filter(|(leaf, _)| leaf.id == pod.id)
            .map(|(leaf, c)| (c, leaf));
        let mut roots = configured_roots;
        if let Some((c, _)) = &held
            && certs::is_certificates(&c.trust_bundle_pem)
        {
            if !roots.ends_with('\n') {
                roots.push('\n');
            }
            roots.push_str(&c.trust_bundle_pem);
        }
        Renewer {
            mode,
            pod,
            ca,
            dir,
            roots,
            held,
            renew_at: Instant::now(),
            stage,
        }
    }

    /// Gets the first certificate (retrying until it has one), reports it on `first`,
    /// then renews for ever.
    pub async fn run(mut self, first: oneshot::Sender<()>) {
        let mut backoff = Backoff::default();
        while let Err(e) = self.sign().await {
            let delay = backoff.next_delay();
            warn!("no certificate yet: {e:#}; trying again in {delay:.1?}");
            self.stage
                .send_replace(Stage::WaitingForCertificate(Some(format!("{e:#}"))));
            sleep(delay).await;
        }
        let _ = first.send(());
        backoff.reset();
        let mut watch: Option<Streaming<TrustBundle>> = None;
        let mut watch_backoff = Backoff::default();
        let mut reconnect_at = Instant::now();
        loop {
            tokio::select! {
                _ = sleep_until(self.renew_at) => match self.sign().await {
                    Ok(()) => backoff.reset(),
                    Err(e) => {
                        let delay = backoff.next_delay();
                        self.renew_at = Instant::now() + delay;
                        warn!("{}; trying again in {delay:.1?}", self.renewal_failure(&e));
                    }
                },
                _ = sleep_until(reconnect_at), if watch.is_none() => match self.open_watch().await {
                    Ok(stream) => watch = Some(stream),
                    Err(e) => {
                        let delay = watch_backoff.next_delay();
                        reconnect_at = Instant::now() + delay;
                        warn!("cannot watch meshd's trust bundle: {e:#}; trying again in {delay:.1?}");
                    }
                },
                message = next_bundle(&mut watch), if watch.is_some() => match message {
                    Ok(Some(bundle)) => {
                        watch_backoff.reset();
                        if let Err(e) = self.follow_bundle(&bundle) {
                            warn!("{e:#}");
                        }
                    }
                    ended => {
                        watch = None;
                        let delay = watch_backoff.next_delay();
                        reconnect_at = Instant::now() + delay;
                        let why = match ended {
                            Err(status) => crate::ca_client::CallError::from(status).to_string(),
                            Ok(_) => "meshd closed it".into(),
                        };
                        warn!("the trust bundle watch ended ({why}); reconnecting in {delay:.1?}");
                    }
                },
            }
        }
    }

    /// A failed renewal, with how long the certificate held has left.
    fn renewal_failure(&self, e: &anyhow::Error) -> String {
        let left = self
            .held
            .as_ref()
            .map(|(_, leaf)| leaf.not_after)
            .and_then(|t| t.duration_since(SystemTime::now()).ok());
        match left {
            Some(left) => format!(
                "renewal failed: {e:#} (the certificate held is valid {} more)",
                humantime::format_duration(Duration::from_secs(left.as_secs()))
            ),
            None => format!("renewal failed: {e:#} (the certificate held has expired)"),
        }
    }

    /// One `Sign` for a new key; on success the set is written and the next renewal
    /// scheduled.
    async fn sign(&mut self) -> anyhow::Result<()> {
        let proof = self
            .mode
            .proof(&self.pod, self.held.as_ref().map(|(c, _)| c))?;
        let made = new_key_and_csr(&self.pod.id)?;
        let response = self
            .ca
            .sign(&self.roots, &proof.credential(), made.csr_pem.clone())
            .await
            .map_err(|e| anyhow::anyhow!("meshd at {} did not sign: {e}", self.ca.address()))?;
        let received = SystemTime::now();
        let leaf = certs::leaf(&response.certificate_chain_pem)
            .map_err(|e| anyhow::anyhow!("meshd's certificate chain: {e}"))?;
        if leaf.id != self.pod.id {
            bail!(
                "meshd signed a certificate for {}, not for {} as asked",
                leaf.id,
                self.pod.id
            );
        }
        if leaf.public_key != made.public_key {
            bail!("meshd's certificate is not for the key the agent sent");
        }
        let bundle = response
            .trust_bundle
            .context("meshd's answer holds no trust bundle")?;
        let trust_bundle_pem = self.checked_bundle(&bundle)?;
        let creds = Credentials {
            cert_chain_pem: response.certificate_chain_pem,
            key_pem: made.key_pem,
            trust_bundle_pem,
        };
        self.dir.write(&creds)?;
        let lifetime = leaf.not_after.duration_since(received).unwrap_or_default();
        let renew_in = renew_after(lifetime);
        self.renew_at = Instant::now() + renew_in;
        info!(
            identity = %leaf.id,
            serial = %leaf.serial,
            valid_until = %humantime::format_rfc3339_seconds(leaf.not_after),
            renew_in = ?renew_in,
            "certificate signed by meshd and written to {}",
            self.dir.certs_dir().display()
        );
        if !bundle
            .roots_pem
            .first()
            .is_some_and(|root| certs::signed_by(&creds.cert_chain_pem, root))
        {
            // Renewing again would get the same answer: say so once per signature.
            warn!("meshd's certificate is not signed by the first root of its own bundle");
        }
        self.roots = creds.trust_bundle_pem.clone();
        self.held = Some((creds, leaf));
        Ok(())
    }

    async fn open_watch(&self) -> anyhow::Result<Streaming<TrustBundle>> {
        let proof = self
            .mode
            .proof(&self.pod, self.held.as_ref().map(|(c, _)| c))?;
        let stream = self
            .ca
            .watch_trust_bundle(&self.roots, &proof.credential())
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        debug!("watching meshd's trust bundle");
        Ok(stream)
    }

    /// The bundle as PEM, if it is one the agent can use.
    fn checked_bundle(&self, bundle: &TrustBundle) -> anyhow::Result<String> {
        if bundle.trust_domain != self.pod.id.trust_domain() {
            bail!(
                "meshd's trust bundle is for trust domain {:?}, the pod's is {:?}",
                bundle.trust_domain,
                self.pod.id.trust_domain()
            );
        }
        let pem = bundle_pem(bundle);
        if !certs::is_certificates(&pem) {
            bail!("meshd's trust bundle holds no readable certificate");
        }
        Ok(pem)
    }

    /// A bundle from the watch: written if it changed; a renewal now if its signing
    /// root did not sign the certificate held.
    fn follow_bundle(&mut self, bundle: &TrustBundle) -> anyhow::Result<()> {
        let pem = self
            .checked_bundle(bundle)
            .context("ignoring a trust bundle")?;
        let Some((held, leaf)) = &mut self.held else {
            return Ok(());
        };
        if pem != held.trust_bundle_pem {
            let mut creds = held.clone();
            creds.trust_bundle_pem = pem.clone();
            self.dir.write(&creds)?;
            *held = creds;
            info!(
                roots = bundle.roots_pem.len(),
                "meshd's trust bundle changed: written"
            );
        }
        self.roots = pem;
        let signing_root = &bundle.roots_pem[0];
        if !certs::signed_by(&held.cert_chain_pem, signing_root) {
            info!(
                serial = %leaf.serial,
                "meshd signs with a new root: renewing the certificate now"
            );
            self.renew_at = Instant::now();
        }
        Ok(())
    }
}

async fn next_bundle(
    watch: &mut Option<Streaming<TrustBundle>>,
) -> Result<Option<TrustBundle>, tonic::Status> {
    match watch {
        Some(stream) => stream.message().await,
        None => std::future::pending().await,
    }
}
