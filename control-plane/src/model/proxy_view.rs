//! What one proxy needs from a snapshot: its own inbound ports and the upstream services
//! it declared — never the whole mesh.

use std::sync::Arc;

use super::snapshot::{InboundPort, MeshSnapshot};
use super::{ObjectKey, Service, ServicePort, Upstream, Workload};

#[derive(Debug, Clone)]
pub struct Outbound {
    pub upstream: Upstream,
    pub service: Arc<Service>,
    pub port: ServicePort,
}

#[derive(Debug, Clone)]
pub struct ProxyView {
    pub workload: Arc<Workload>,
    pub inbound: Vec<InboundPort>,
    pub outbound: Vec<Outbound>,
    /// Declared upstreams that cannot be served right now, with the reason.
    pub problems: Vec<String>,
}

impl ProxyView {
    /// The view of the sidecar of `workload`, or `None` if the snapshot has no such pod.
    pub fn build(snap: &MeshSnapshot, workload: &ObjectKey) -> Option<ProxyView> {
        let workload = snap.workloads.get(workload)?.clone();
        let inbound = snap
            .inbound
            .get(&workload.key)
            .map(|p| p.to_vec())
            .unwrap_or_default();
        let mut outbound = Vec::new();
        let mut problems = Vec::new();
        for up in &workload.upstreams {
            let Some(service) = snap.services.get(&up.service) else {
                problems.push(format!(
                    "upstream {}:{} (local port {}): no such service",
                    up.service, up.port, up.local_port
                ));
                continue;
            };
            let Some(port) = service.port(up.port) else {
                problems.push(format!(
                    "upstream {}:{} (local port {}): the service has no port {}",
                    up.service, up.port, up.local_port, up.port
                ));
                continue;
            };
            outbound.push(Outbound {
                upstream: up.clone(),
                service: service.clone(),
                port: port.clone(),
            });
        }
        Some(ProxyView {
            workload,
            inbound,
            outbound,
            problems,
        })
    }
}
