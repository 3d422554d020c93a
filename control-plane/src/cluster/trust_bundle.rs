//! The trust bundle in every mesh namespace: ConfigMap `meshd-trust-bundle`, key
//! `trust-bundle.pem`, written by the Lease holder.
//!
//! A pod's agent must verify meshd before it holds any certificate: it mounts this
//! ConfigMap and trusts meshd by it for its first `Sign` (meshd-agent's
//! `--trust-bundle`). From then on the agent follows `WatchTrustBundle`; the ConfigMap
//! follows the bundle too (a root rotation's steps), so a pod started at any step
//! trusts the root meshd serves with. Server-side apply, field manager
//! `meshd/<replica>`: the write is idempotent, and a new Lease holder writes everything
//! again.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::watch;

use crate::identity::CertManager;
use crate::model::MeshSnapshot;

pub const CONFIG_MAP_NAME: &str = "meshd-trust-bundle";
pub const KEY: &str = "trust-bundle.pem";

pub fn spawn(
    client: Client,
    certs: Arc<CertManager>,
    mut mesh: watch::Receiver<Arc<MeshSnapshot>>,
    mut is_leader: watch::Receiver<bool>,
    replica: String,
) {
    tokio::spawn(async move {
        let params = PatchParams::apply(&format!("meshd/{replica}")).force();
        let mut changes = certs.changes();
        // namespace → the bundle written there.
        let mut written: BTreeMap<String, String> = BTreeMap::new();
        loop {
            changes.borrow_and_update();
            if *is_leader.borrow_and_update() {
                let bundle = certs.trust_bundle().pem();
                let namespaces: Vec<String> = mesh
                    .borrow_and_update()
                    .namespaces
                    .keys()
                    .cloned()
                    .collect();
                written.retain(|ns, _| namespaces.contains(ns));
                for ns in namespaces {
                    if written.get(&ns) == Some(&bundle) {
                        continue;
                    }
                    match write(&client, &params, &ns, &bundle).await {
                        Ok(()) => {
                            written.insert(ns, bundle.clone());
                        }
                        Err(e) => tracing::warn!(
                            namespace = %ns,
                            "cannot write ConfigMap {CONFIG_MAP_NAME}: {e} (retrying)"
                        ),
                    }
                }
            } else {
                written.clear();
            }
            tokio::select! {
                r = mesh.changed() => if r.is_err() { return },
                r = is_leader.changed() => if r.is_err() { return },
                r = changes.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(Duration::from_secs(30)) => {}
            }
        }
    });
}

async fn write(
    client: &Client,
    params: &PatchParams,
    namespace: &str,
    bundle: &str,
) -> Result<(), kube::Error> {
    let object = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": CONFIG_MAP_NAME,
            "namespace": namespace,
            "labels": { "app.kubernetes.io/managed-by": "meshd" },
        },
        "data": { KEY: bundle },
    });
    Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .patch(CONFIG_MAP_NAME, params, &Patch::Apply(&object))
        .await
        .map(drop)
}
