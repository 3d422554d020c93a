//! The `Accepted` condition of every AuthorizationPolicy, PeerAuthentication and
//! WorkloadPolicy, written by the replica that holds the Lease.
//!
//! The source publishes a verdict per policy and generation; this task writes the ones
//! it has not written yet (a merge patch of `status` on the status subresource, field
//! manager `meshd/<replica>`). Losing the Lease forgets what was written, so whoever
//! holds it next writes every condition again: status writes move with the Lease.

use std::collections::BTreeMap;
use std::time::Duration;

use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::watch;

use crate::model::ObjectKind;
use crate::sources::crd;
use crate::sources::kubernetes::{PolicyRef, PolicyVerdict, Verdicts};

pub fn spawn(
    client: Client,
    mut verdicts: watch::Receiver<Verdicts>,
    mut is_leader: watch::Receiver<bool>,
    replica: String,
) {
    tokio::spawn(async move {
        let params = PatchParams {
            field_manager: Some(format!("meshd/{replica}")),
            ..Default::default()
        };
        let mut written: BTreeMap<PolicyRef, PolicyVerdict> = BTreeMap::new();
        loop {
            if *is_leader.borrow_and_update() {
                let current = verdicts.borrow_and_update().clone();
                written.retain(|r, _| current.contains_key(r));
                for (policy, verdict) in current.iter() {
                    if written.get(policy) == Some(verdict) {
                        continue;
                    }
                    match write(&client, &params, policy, verdict).await {
                        Ok(()) => {
                            written.insert(policy.clone(), verdict.clone());
                        }
                        Err(e) => tracing::warn!(
                            "cannot write the status of {} {}: {e} (retrying)",
                            policy.kind,
                            policy.key
                        ),
                    }
                }
            } else {
                written.clear();
            }
            // Failed writes are retried on the next change or after a while.
            tokio::select! {
                r = verdicts.changed() => if r.is_err() { return },
                r = is_leader.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    });
}

async fn write(
    client: &Client,
    params: &PatchParams,
    policy: &PolicyRef,
    verdict: &PolicyVerdict,
) -> Result<(), kube::Error> {
    let (status, reason, message) = match &verdict.error {
        None => ("True", "Accepted", String::new()),
        Some(e) => (
            "False",
            "Invalid",
            format!("{e}; the previous version, if any, still applies"),
        ),
    };
    let condition = crd::PolicyCondition {
        type_: "Accepted".to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message,
        observed_generation: verdict.generation,
        last_transition_time: crate::xds::serve::status::now_rfc3339(),
    };
    let patch = Patch::Merge(json!({ "status": { "conditions": [condition] } }));
    let (ns, name) = (&policy.key.namespace, &policy.key.name);
    let result = match policy.kind {
        ObjectKind::AuthorizationPolicy => {
            Api::<crd::AuthorizationPolicy>::namespaced(client.clone(), ns)
                .patch_status(name, params, &patch)
                .await
                .map(drop)
        }
        ObjectKind::WorkloadPolicy => Api::<crd::WorkloadPolicy>::namespaced(client.clone(), ns)
            .patch_status(name, params, &patch)
            .await
            .map(drop),
        _ => Api::<crd::PeerAuthentication>::namespaced(client.clone(), ns)
            .patch_status(name, params, &patch)
            .await
            .map(drop),
    };
    match result {
        // Deleted meanwhile: nothing to say about it.
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        other => other,
    }
}
