//! The `caBundle` of meshd's MutatingWebhookConfiguration (`--webhook-configuration`),
//! kept equal to the mesh's trust bundle by the Lease holder, so that the API server
//! trusts meshd's serving certificate without cert-manager or a hand-made CA.
//!
//! The chart installs the configuration with an empty `caBundle`; the Lease holder
//! writes it at once, again whenever the trust bundle changes (a root rotation's
//! steps: both roots while they overlap, so the webhook never stops being trusted), and
//! whenever someone else writes it (a `helm upgrade` renders it empty again): it
//! watches the one object. Until the first write, the API server cannot call the
//! webhook and `failurePolicy: Fail` refuses pods in injected namespaces: fail closed.
//! The write is a `replace` carrying the read `resourceVersion`, so a concurrent
//! change is never overwritten blindly (a conflict is read again and retried).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use kube::api::PostParams;
use kube::runtime::watcher;
use kube::{Api, Client};
use tokio::sync::watch;

use crate::identity::CertManager;

pub fn spawn(
    client: Client,
    certs: Arc<CertManager>,
    mut is_leader: watch::Receiver<bool>,
    name: String,
) {
    tokio::spawn(async move {
        let api: Api<MutatingWebhookConfiguration> = Api::all(client);
        let mut events = watcher::watcher(
            api.clone(),
            watcher::Config::default().fields(&format!("metadata.name={name}")),
        )
        .boxed();
        let mut changes = certs.changes();
        let mut missing_reported = false;
        loop {
            changes.borrow_and_update();
            let mut retry = Duration::from_secs(60);
            if *is_leader.borrow_and_update() {
                match reconcile(&api, &name, &certs.trust_bundle().pem()).await {
                    Ok(Reconciled::Written(n)) => {
                        missing_reported = false;
                        tracing::info!(webhook_configuration = %name, webhooks = n, "caBundle set to the mesh's trust bundle");
                    }
                    Ok(Reconciled::Current) => missing_reported = false,
                    Ok(Reconciled::Missing) => {
                        if !missing_reported {
                            tracing::warn!(webhook_configuration = %name, "MutatingWebhookConfiguration not found: nothing calls meshd's injection webhook (is the chart installed?)");
                            missing_reported = true;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(webhook_configuration = %name, "cannot set caBundle: {e} (retrying)");
                        retry = Duration::from_secs(2);
                    }
                }
            }
            tokio::select! {
                r = is_leader.changed() => if r.is_err() { return },
                r = changes.changed() => if r.is_err() { return },
                event = events.next() => match event {
                    None => return,
                    Some(Err(e)) => {
                        tracing::debug!(webhook_configuration = %name, "watch: {e}");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    Some(Ok(_)) => {}
                },
                _ = tokio::time::sleep(retry) => {}
            }
        }
    });
}

#[derive(Debug, PartialEq, Eq)]
enum Reconciled {
    /// `caBundle` written into this many webhooks.
    Written(usize),
    Current,
    Missing,
}

async fn reconcile(
    api: &Api<MutatingWebhookConfiguration>,
    name: &str,
    bundle: &str,
) -> Result<Reconciled, kube::Error> {
    let Some(mut config) = api.get_opt(name).await? else {
        return Ok(Reconciled::Missing);
    };
    let wanted = ByteString(bundle.as_bytes().to_vec());
    let mut written = 0;
    for webhook in config.webhooks.iter_mut().flatten() {
        if webhook.client_config.ca_bundle.as_ref() != Some(&wanted) {
            webhook.client_config.ca_bundle = Some(wanted.clone());
            written += 1;
        }
    }
    if written == 0 {
        return Ok(Reconciled::Current);
    }
    api.replace(name, &PostParams::default(), &config).await?;
    Ok(Reconciled::Written(written))
}
