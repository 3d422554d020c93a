//! What one proxy needs from a snapshot: its own inbound ports, the upstream services
//! it declared, and the services its scope covers — never the whole mesh. In explicit
//! capture the scope is what the egress port reaches (HTTP services); in transparent
//! capture, what the virtual outbound listener matches (every port of every service in
//! scope, and the declared upstreams' services).

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use super::snapshot::{InboundPort, MeshSnapshot};
use super::{
    Capture, ObjectKey, OutboundPolicy, ScopeEntry, Service, ServicePort, Upstream, Workload,
};

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

/// Transparent capture: what the virtual outbound listener covers. Only the scope's
/// definition: the services it resolves to are the same for every proxy with an equal
/// one, and are resolved once per scope ([`TransparentView::services`], called by the
/// shared listener's builder), not per proxy.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TransparentView {
    pub scope: Vec<ScopeEntry>,
    /// The services of the declared upstreams that exist and `scope` does not cover,
    /// sorted.
    pub upstreams: Vec<ObjectKey>,
    pub outbound_policy: OutboundPolicy,
}

impl TransparentView {
    /// Every port of every service in scope or declared as an upstream, in service order.
    pub fn services(&self, snap: &MeshSnapshot) -> Vec<(Arc<Service>, ServicePort)> {
        snap.services
            .values()
            .filter(|s| {
                self.scope.iter().any(|entry| entry.covers(&s.key))
                    || self.upstreams.binary_search(&s.key).is_ok()
            })
            .flat_map(|s| s.ports.iter().map(|p| (s.clone(), p.clone())))
            .collect()
    }
}

#[derive(Debug, Clone)]
pub struct ProxyView {
    pub workload: Arc<Workload>,
    pub inbound: Vec<InboundPort>,
    pub outbound: Vec<Outbound>,
    pub egress: Option<EgressView>,
    /// Transparent capture only; `outbound` and `egress` are then empty.
    pub transparent: Option<TransparentView>,
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
        // Outbound and egress listeners bind 127.0.0.1; a pod whose own address is
        // 127.0.0.1 has its inbound listeners there too, and Envoy refuses two listeners
        // on one address. The inbound one wins: it serves the pod and carries its policy.
        let inbound_port = |local_port: u16| {
            (workload.address == Some(IpAddr::V4(Ipv4Addr::LOCALHOST)))
                .then(|| inbound.iter().find(|p| p.port == local_port))
                .flatten()
        };
        for up in &workload.upstreams {
            if let Some(p) = inbound_port(up.local_port) {
                problems.push(format!(
                    "upstream {}:{} (local port {}): 127.0.0.1:{} is already this pod's inbound \
                     port {} (its IP is 127.0.0.1); not served",
                    up.service, up.port, up.local_port, up.local_port, p.port
                ));
                continue;
            }
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
        let scope = workload
            .scope
            .clone()
            .or_else(|| snap.defaults.scope.clone())
            .unwrap_or_else(|| vec![ScopeEntry::Namespace(workload.key.namespace.clone())]);
        if workload.capture == Capture::Transparent {
            // The sidecar's own ports: Envoy listens on the capture ports and init
            // passes the agent's port by, so an app cannot be reached there.
            let own = [
                meshd_sidecar::capture::OUTBOUND_PORT,
                meshd_sidecar::capture::INBOUND_PORT,
                meshd_sidecar::capture::AGENT_HEALTH_PORT,
            ];
            let mut inbound = inbound;
            inbound.retain(|p| {
                let clash = own.contains(&p.port);
                if clash {
                    problems.push(format!(
                        "inbound port {}: in transparent capture it is the sidecar's own port \
                         ({} outbound, {} inbound, {} the agent's); not served",
                        p.port, own[0], own[1], own[2]
                    ));
                }
                !clash
            });
            let mut upstreams: Vec<ObjectKey> =
                outbound.iter().map(|o| o.service.key.clone()).collect();
            // Only those the scope does not cover already: proxies whose scopes cover
            // the same services then have equal views, and share one listener.
            upstreams.retain(|u| !scope.iter().any(|entry| entry.covers(u)));
            upstreams.sort();
            upstreams.dedup();
            return Some(ProxyView {
                workload,
                inbound,
                outbound: Vec::new(),
                egress: None,
                transparent: Some(TransparentView {
                    scope,
                    upstreams,
                    outbound_policy: snap.defaults.outbound_policy,
                }),
                problems,
            });
        }
        let egress = workload
            .egress
            .as_ref()
            .filter(|e| match inbound_port(e.port) {
                Some(p) => {
                    problems.push(format!(
                        "egress port {}: 127.0.0.1:{} is already this pod's inbound port {} \
                     (its IP is 127.0.0.1); not served",
                        e.port, e.port, p.port
                    ));
                    false
                }
                None => true,
            });
        let egress = egress.map(|e| {
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
            transparent: None,
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
            scope: None,
            capture: Default::default(),
            key: ObjectKey::new("shop", "client-1"),
            uid: None,
            labels: Default::default(),
            service_account: "client".into(),
            address: None,
            ready: true,
            container_ports: vec![],
            app_ports: Default::default(),
            upstreams: vec![],
            egress: Some(Egress { port: 15080 }),
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

    /// A pod on 127.0.0.1 has its inbound listeners where its upstream and egress
    /// listeners are; Envoy refuses two listeners on one address, so a clash drops the
    /// outbound one, with the reason.
    #[test]
    fn an_upstream_or_egress_port_on_an_inbound_port_of_a_loopback_pod_is_not_served() {
        let pod = Workload {
            scope: None,
            capture: Default::default(),
            key: ObjectKey::new("shop", "web-1"),
            uid: None,
            labels: [("app".to_string(), "web".to_string())].into(),
            service_account: "web".into(),
            address: Some("127.0.0.1".parse().unwrap()),
            ready: true,
            container_ports: vec![],
            app_ports: Default::default(),
            upstreams: vec![
                Upstream {
                    service: ObjectKey::new("shop", "web"),
                    port: 80,
                    local_port: 8080,
                },
                Upstream {
                    service: ObjectKey::new("shop", "web"),
                    port: 80,
                    local_port: 15001,
                },
            ],
            egress: Some(Egress { port: 8080 }),
        };
        let mut web = service("shop", "web", Protocol::Http);
        if let MeshObject::Service(s) = &mut web {
            Arc::make_mut(s).selector = Some(pod.labels.clone());
        }
        let snap = MeshSnapshot::build(
            1,
            MeshDefaults::default(),
            vec![web, MeshObject::Workload(Arc::new(pod))],
        );
        let view = ProxyView::build(&snap, &ObjectKey::new("shop", "web-1")).unwrap();
        assert_eq!(view.inbound.len(), 1, "inbound 8080");
        let locals: Vec<u16> = view
            .outbound
            .iter()
            .map(|o| o.upstream.local_port)
            .collect();
        assert_eq!(locals, [15001]);
        assert!(view.egress.is_none());
        assert_eq!(view.problems.len(), 2, "{:?}", view.problems);
        assert!(
            view.problems[0].contains("shop/web:80 (local port 8080)")
                && view.problems[0].contains("inbound port 8080"),
            "{:?}",
            view.problems
        );
        assert!(
            view.problems[1].starts_with("egress port 8080"),
            "{:?}",
            view.problems
        );
    }
}
