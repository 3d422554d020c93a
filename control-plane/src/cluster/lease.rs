//! Leader election on a `coordination.k8s.io/v1` Lease (`<namespace>/meshd-leader`),
//! by kube-lease-manager (server-side apply, so two replicas cannot both take it).
//!
//! [`Leadership::is_leader`] says whether this replica holds the Lease right now. On
//! an API error it turns `false` until the Lease is confirmed again — better no
//! singleton work for a moment than two replicas doing it. On shutdown the Lease is
//! released, so another replica takes over at once instead of after it expires.

use std::time::Duration;

use kube::Client;
use kube_lease_manager::{LeaseManagerBuilder, LeaseParams};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub const LEASE_NAME: &str = "meshd-leader";

pub struct Leadership {
    pub identity: String,
    is_leader: watch::Receiver<bool>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Leadership {
    /// Starts competing for the Lease as `identity`; a holder that stops renewing loses
    /// it after `duration`.
    pub async fn start(
        client: Client,
        namespace: &str,
        identity: &str,
        duration: Duration,
    ) -> anyhow::Result<Leadership> {
        let secs = duration.as_secs().max(2);
        let manager = LeaseManagerBuilder::new(client, LEASE_NAME)
            .with_namespace(namespace)
            .with_parameters(
                LeaseParams::new(identity, secs, (secs / 3).max(1))
                    .with_field_manager(format!("meshd/{identity}")),
            )
            .build()
            .await?;
        let (tx, is_leader) = watch::channel(false);
        let (stop, mut stopped) = watch::channel(false);
        let who = identity.to_string();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stopped.changed() => {
                        if let Err(e) = manager.release().await {
                            tracing::warn!("cannot release the Lease: {e}");
                        }
                        let _ = tx.send(false);
                        return;
                    }
                    changed = manager.changed() => match changed {
                        Ok(leader) => {
                            tracing::info!(replica = %who, leader, "Lease {LEASE_NAME}: leadership changed");
                            let _ = tx.send(leader);
                        }
                        Err(e) => {
                            tracing::warn!("Lease {LEASE_NAME}: {e}; not leading until it is confirmed");
                            let _ = tx.send(false);
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    },
                }
            }
        });
        Ok(Leadership {
            identity: identity.to_string(),
            is_leader,
            stop,
            task,
        })
    }

    pub fn is_leader(&self) -> watch::Receiver<bool> {
        self.is_leader.clone()
    }

    /// Releases the Lease (if held) and stops competing.
    pub async fn release(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(3), self.task).await;
    }
}
