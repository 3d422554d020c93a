//! The `caBundle` of meshd's webhook configurations (`--webhook-configuration`: the
//! MutatingWebhookConfiguration of injection and the ValidatingWebhookConfiguration of
//! admission, both of that name), kept equal to the mesh's trust bundle by the Lease
//! holder, so that the API server trusts meshd's serving certificate without
//! cert-manager or a hand-made CA. One task per kind; a kind the chart does not
//! install (injection or admission turned off) is noted once and waited for.
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
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration, WebhookClientConfig,
};
use kube::api::PostParams;
use kube::runtime::watcher;
use kube::{Api, Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use crate::identity::CertManager;

/// A webhook configuration kind: where its webhooks keep their client config.
trait WebhookConfiguration:
    Resource<DynamicType = (), Scope = kube::core::ClusterResourceScope>
    + Clone
    + std::fmt::Debug
    + DeserializeOwned
    + Serialize
    + Send
    + Sync
    + 'static
{
    /// What the webhooks of this kind do, for the log.
    const PURPOSE: &'static str;
    fn client_configs(&mut self) -> Vec<&mut WebhookClientConfig>;
}

impl WebhookConfiguration for MutatingWebhookConfiguration {
    const PURPOSE: &'static str = "injection";
    fn client_configs(&mut self) -> Vec<&mut WebhookClientConfig> {
        self.webhooks
            .iter_mut()
            .flatten()
            .map(|w| &mut w.client_config)
            .collect()
    }
}

impl WebhookConfiguration for ValidatingWebhookConfiguration {
    const PURPOSE: &'static str = "admission";
    fn client_configs(&mut self) -> Vec<&mut WebhookClientConfig> {
        self.webhooks
            .iter_mut()
            .flatten()
            .map(|w| &mut w.client_config)
            .collect()
    }
}

/// Keeps the `caBundle` of both configurations named `name`.
pub fn spawn(
    client: Client,
    certs: Arc<CertManager>,
    is_leader: watch::Receiver<bool>,
    name: String,
) {
    keep::<MutatingWebhookConfiguration>(
        client.clone(),
        certs.clone(),
        is_leader.clone(),
        name.clone(),
    );
    keep::<ValidatingWebhookConfiguration>(client, certs, is_leader, name);
}

fn keep<K: WebhookConfiguration>(
    client: Client,
    certs: Arc<CertManager>,
    mut is_leader: watch::Receiver<bool>,
    name: String,
) {
    tokio::spawn(async move {
        let kind = K::kind(&());
        let api: Api<K> = Api::all(client);
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
                        tracing::info!(webhook_configuration = %name, %kind, webhooks = n, "caBundle set to the mesh's trust bundle");
                    }
                    Ok(Reconciled::Current) => missing_reported = false,
                    Ok(Reconciled::Missing) => {
                        if !missing_reported {
                            tracing::info!(webhook_configuration = %name, "{kind} not found: nothing calls meshd's {} webhook (off in the chart, or the chart not installed)", K::PURPOSE);
                            missing_reported = true;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(webhook_configuration = %name, %kind, "cannot set caBundle: {e} (retrying)");
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
                        tracing::debug!(webhook_configuration = %name, %kind, "watch: {e}");
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

async fn reconcile<K: WebhookConfiguration>(
    api: &Api<K>,
    name: &str,
    bundle: &str,
) -> Result<Reconciled, kube::Error> {
    let Some(mut config) = api.get_opt(name).await? else {
        return Ok(Reconciled::Missing);
    };
    let wanted = ByteString(bundle.as_bytes().to_vec());
    let mut written = 0;
    for client_config in config.client_configs() {
        if client_config.ca_bundle.as_ref() != Some(&wanted) {
            client_config.ca_bundle = Some(wanted.clone());
            written += 1;
        }
    }
    if written == 0 {
        return Ok(Reconciled::Current);
    }
    api.replace(name, &PostParams::default(), &config).await?;
    Ok(Reconciled::Written(written))
}
