//! The pod's status as the kubelet reports it: phase, podIP(s), hostIP(s), startTime,
//! the conditions (PodReadyToStartContainers, Initialized, ContainersReady, Ready,
//! PodScheduled) and a status per init and app container, written with server-side
//! apply as field manager `kubelet`. Every write sends the whole status, under one lock,
//! so writes from the start sequence and the readiness probes never reorder.

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::{Value, json};

/// A container's state, as `containerStatuses[].state` says it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    Waiting {
        reason: &'static str,
    },
    Running {
        started_at: String,
    },
    Terminated {
        exit_code: i32,
        reason: &'static str,
        started_at: String,
        finished_at: String,
    },
}

#[derive(Debug, Clone)]
pub struct ContainerState {
    pub name: String,
    pub image: String,
    pub state: State,
    /// Its startup probe passed (or it has none) while it runs.
    pub started: bool,
    pub ready: bool,
}

/// Everything the status is made of.
#[derive(Debug, Clone)]
pub struct PodState {
    pub namespace: String,
    pub name: String,
    pub pod_ip: String,
    pub host_ip: String,
    pub start_time: String,
    pub init: Vec<ContainerState>,
    /// Which init containers are sidecars (`restartPolicy: Always`).
    pub sidecar: Vec<bool>,
    pub apps: Vec<ContainerState>,
    /// Each condition's status and when it last changed.
    pub transitions: std::collections::BTreeMap<&'static str, (bool, String)>,
}

impl PodState {
    /// Every init container has completed (or, for a sidecar, started).
    pub fn initialized(&self) -> bool {
        self.init.iter().zip(&self.sidecar).all(|(c, sidecar)| {
            if *sidecar {
                c.started
            } else {
                matches!(c.state, State::Terminated { exit_code: 0, .. })
            }
        })
    }

    /// Every app container and every sidecar is running and ready.
    pub fn ready(&self) -> bool {
        self.initialized()
            && !self.apps.is_empty()
            && self.apps.iter().all(|c| c.ready)
            && self
                .init
                .iter()
                .zip(&self.sidecar)
                .filter(|(_, sidecar)| **sidecar)
                .all(|(c, _)| c.ready)
    }

    fn phase(&self) -> &'static str {
        if self
            .apps
            .iter()
            .any(|c| matches!(c.state, State::Running { .. }))
        {
            "Running"
        } else {
            "Pending"
        }
    }

    /// The status, with each condition's last transition time kept from the write
    /// where it last changed.
    pub fn next_status(&mut self) -> Value {
        let now = now();
        let (initialized, ready) = (self.initialized(), self.ready());
        let mut condition = |kind: &'static str, ok: bool| {
            let (was, since) = self
                .transitions
                .entry(kind)
                .or_insert_with(|| (ok, now.clone()));
            if *was != ok {
                (*was, *since) = (ok, now.clone());
            }
            json!({"type": kind, "status": if ok { "True" } else { "False" },
                   "lastTransitionTime": since})
        };
        let conditions = [
            condition("PodReadyToStartContainers", true),
            condition("Initialized", initialized),
            condition("ContainersReady", ready),
            condition("Ready", ready),
            condition("PodScheduled", true),
        ];
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "status": {
                "phase": self.phase(),
                "podIP": self.pod_ip, "podIPs": [{"ip": self.pod_ip}],
                "hostIP": self.host_ip, "hostIPs": [{"ip": self.host_ip}],
                "startTime": self.start_time,
                "conditions": conditions,
                "initContainerStatuses": self.init.iter().map(container_json).collect::<Vec<_>>(),
                "containerStatuses": self.apps.iter().map(container_json).collect::<Vec<_>>(),
            }
        })
    }

    /// Writes the status to the API server.
    pub async fn write(&mut self, client: &kube::Client) -> anyhow::Result<()> {
        use anyhow::Context;
        let status = self.next_status();
        Api::<Pod>::namespaced(client.clone(), &self.namespace)
            .patch_status(
                &self.name,
                &PatchParams::apply("kubelet").force(),
                &Patch::Apply(status),
            )
            .await
            .with_context(|| format!("status of pod {}/{}", self.namespace, self.name))?;
        Ok(())
    }
}

fn container_json(c: &ContainerState) -> Value {
    let state = match &c.state {
        State::Waiting { reason } => json!({"waiting": {"reason": reason}}),
        State::Running { started_at } => json!({"running": {"startedAt": started_at}}),
        State::Terminated {
            exit_code,
            reason,
            started_at,
            finished_at,
        } => json!({"terminated": {"exitCode": exit_code, "reason": reason,
                                    "startedAt": started_at, "finishedAt": finished_at}}),
    };
    json!({"name": c.name, "image": c.image, "imageID": "", "state": state,
           "ready": c.ready, "started": c.started, "restartCount": 0})
}

/// Now, as the API's timestamps are written (RFC 3339, seconds, UTC).
pub fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}
