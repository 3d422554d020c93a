//! What one proxy needs from a snapshot: its own inbound ports, the upstream services
//! it declared, and the HTTP services its egress port's scope covers — never the whole
//! mesh.

use std::sync::Arc;

use super::snapshot::{InboundPort, MeshSnapshot};
use super::{ObjectKey, ScopeEntry, Service, ServicePort, Upstream, Workload};

#[derive(Debug, Clone)]
pub struct Outbound {
    pub upstream: Upstream,
    pub service: Arc<Service>,
    pub port: ServicePort,
}

/// The egress port and the HTTP service ports it reaches.
#[derive(Debug, Clone, PartialEq)]
pub struct EgressView {
    pub port: u16,
    pub scope: Vec<ScopeEntry>,
    /// In service order.
    pub services: Vec<(Arc<Service>, ServicePort)>,
}

#[derive(Debug, Clone)]
pub struct ProxyView {
    pub workload: Arc<Workload>,
    pub inbound: Vec<InboundPort>,
    pub outbound: Vec<Outbound>,
    pub egress: Option<EgressView>,
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
        let egress = workload.egress.as_ref().map(|e| {
            let scope = e
                .scope
                .clone()
                .or_else(|| snap.defaults.scope.clone())
                .unwrap_or_else(|| vec![ScopeEntry::Namespace(workload.key.namespace.clone())]);
            let services = snap
                .services
                .values()
                .filter(|s| scope.iter().any(|entry| entry.covers(&s.key)))
                .flat_map(|s| {
                    s.ports
                        .iter()
                        .filter(|p| p.protocol.is_http())
                        .map(|p| (s.clone(), p.clone()))
                })
                .collect();
            EgressView {
                port: e.port,
                scope,
                services,
            }
        });
        Some(ProxyView {
            workload,
            inbound,
            outbound,
            egress,
            problems,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Egress, MeshDefaults, MeshObject, Protocol, TargetPort};

    fn service(ns: &str, name: &str, protocol: Protocol) -> MeshObject {
        MeshObject::Service(Arc::new(Service {
            key: ObjectKey::new(ns, name),
            cluster_ip: None,
            ports: vec![ServicePort {
                name: None,
                port: 80,
                target_port: TargetPort::Number(8080),
                protocol,
            }],
            selector: None,
        }))
    }

    /// Without a scope of its own or a mesh-wide default, an egress port reaches the
    /// HTTP services of the pod's own namespace; TCP services are never in reach.
    #[test]
    fn the_scope_falls_back_to_the_own_namespace_and_takes_http_only() {
        let client = Workload {
            key: ObjectKey::new("shop", "client-1"),
            labels: Default::default(),
            service_account: "client".into(),
            address: None,
            ready: true,
            container_ports: vec![],
            app_ports: Default::default(),
            upstreams: vec![],
            egress: Some(Egress {
                port: 15080,
                scope: None,
            }),
        };
        let snap = MeshSnapshot::build(
            1,
            MeshDefaults::default(),
            vec![
                service("shop", "web", Protocol::Http),
                service("shop", "db", Protocol::Tcp),
                service("data", "api", Protocol::Http),
                MeshObject::Workload(Arc::new(client)),
            ],
        );
        let view = ProxyView::build(&snap, &ObjectKey::new("shop", "client-1")).unwrap();
        let egress = view.egress.expect("an egress port");
        let names: Vec<String> = egress
            .services
            .iter()
            .map(|(s, _)| s.key.to_string())
            .collect();
        assert_eq!(names, ["shop/web"]);
    }
}
