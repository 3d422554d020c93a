//! An immutable, versioned view of the whole mesh, with the derived facts every
//! consumer needs (endpoints per service port, inbound ports per workload) computed once.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use crate::authz::AuthorizationPolicy;

use super::{
    EndpointSlice, MeshDefaults, MeshObject, MtlsMode, Namespace, ObjectKey, PeerAuthentication,
    Protocol, Service, ServicePort, TargetPort, Workload,
};

/// One address:port that serves a service port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct Endpoint {
    pub address: IpAddr,
    pub port: u16,
    pub ready: bool,
    /// The pod behind the endpoint, when known (by `targetRef` or by its pod IP).
    pub workload: Option<ObjectKey>,
    /// How the endpoint's port accepts traffic: callers send plaintext only to
    /// DISABLE ports. Unknown pods count as the mesh default.
    pub mtls: MtlsMode,
}

/// A port on which a workload receives mesh traffic, and the services that send it there.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct InboundPort {
    pub port: u16,
    pub protocol: Protocol,
    pub services: Vec<ObjectKey>,
    pub mtls: MtlsMode,
}

/// `(service, service port number)`
pub type ServicePortKey = (ObjectKey, u16);

#[derive(Debug, Default)]
pub struct MeshSnapshot {
    pub version: u64,
    pub defaults: MeshDefaults,
    pub peer_authentications: BTreeMap<ObjectKey, Arc<PeerAuthentication>>,
    pub authorization_policies: BTreeMap<ObjectKey, Arc<AuthorizationPolicy>>,
    pub namespaces: BTreeMap<String, Arc<Namespace>>,
    pub services: BTreeMap<ObjectKey, Arc<Service>>,
    pub endpoint_slices: BTreeMap<ObjectKey, Arc<EndpointSlice>>,
    pub workloads: BTreeMap<ObjectKey, Arc<Workload>>,
    /// Every port of every service, with its endpoints (ready or not), sorted.
    pub endpoints: BTreeMap<ServicePortKey, Arc<Vec<Endpoint>>>,
    /// Per workload, the ports on which some service sends it traffic.
    pub inbound: HashMap<ObjectKey, Vec<InboundPort>>,
}

impl MeshSnapshot {
    pub fn build(
        version: u64,
        defaults: MeshDefaults,
        objects: impl IntoIterator<Item = MeshObject>,
    ) -> MeshSnapshot {
        let mut snap = MeshSnapshot {
            version,
            defaults,
            ..Default::default()
        };
        for obj in objects {
            match obj {
                MeshObject::Namespace(n) => {
                    snap.namespaces.insert(n.name.clone(), n);
                }
                MeshObject::Service(s) => {
                    snap.services.insert(s.key.clone(), s);
                }
                MeshObject::EndpointSlice(s) => {
                    snap.endpoint_slices.insert(s.key.clone(), s);
                }
                MeshObject::Workload(w) => {
                    snap.workloads.insert(w.key.clone(), w);
                }
                MeshObject::PeerAuthentication(p) => {
                    snap.peer_authentications.insert(p.key.clone(), p);
                }
                MeshObject::AuthorizationPolicy(p) => {
                    snap.authorization_policies.insert(p.key.clone(), p);
                }
            }
        }
        snap.derive_endpoints();
        snap
    }

    pub fn service_endpoints(&self, service: &ObjectKey, port: u16) -> &[Endpoint] {
        self.endpoints
            .get(&(service.clone(), port))
            .map(|e| e.as_slice())
            .unwrap_or_default()
    }

    /// The AuthorizationPolicies that apply to `workload`: those of its namespace whose
    /// selector matches it (or that have none), and those of the root namespace.
    pub fn authorization_policies_for(&self, workload: &Workload) -> Vec<&AuthorizationPolicy> {
        let root = self.defaults.root_namespace.as_str();
        self.authorization_policies
            .values()
            .filter(|p| {
                let ns = p.key.namespace.as_str();
                (ns == workload.key.namespace || ns == root)
                    && p.selector.as_ref().is_none_or(|sel| {
                        sel.iter().all(|(k, v)| workload.labels.get(k) == Some(v))
                    })
            })
            .map(|p| &**p)
            .collect()
    }

    /// The mTLS mode of `port` on `workload`: the most specific PeerAuthentication that
    /// sets one wins — the workload's own (by selector, port level first), then its
    /// namespace's, then the root namespace's — else the mesh default. Among equally
    /// specific policies the first by name counts.
    pub fn mtls_mode(&self, workload: &Workload, port: u16) -> MtlsMode {
        let selects = |p: &PeerAuthentication| {
            p.selector
                .as_ref()
                .is_some_and(|sel| sel.iter().all(|(k, v)| workload.labels.get(k) == Some(v)))
        };
        let ns = workload.key.namespace.as_str();
        let root = self.defaults.root_namespace.as_str();
        let own: Vec<&PeerAuthentication> = self
            .peer_authentications
            .values()
            .filter(|p| p.key.namespace == ns)
            .map(|p| &**p)
            .collect();
        let mesh_wide = self
            .peer_authentications
            .values()
            .filter(|p| p.key.namespace == root && p.selector.is_none())
            .find_map(|p| p.mode);
        let candidates = [
            own.iter()
                .filter(|p| selects(p))
                .find_map(|p| p.port_modes.get(&port).copied()),
            own.iter().filter(|p| selects(p)).find_map(|p| p.mode),
            own.iter()
                .filter(|p| p.selector.is_none())
                .find_map(|p| p.mode),
            mesh_wide,
        ];
        candidates
            .into_iter()
            .flatten()
            .next()
            .unwrap_or(self.defaults.mtls_mode)
    }

    fn derive_endpoints(&mut self) {
        let mut slices_by_service: HashMap<ObjectKey, Vec<&EndpointSlice>> = HashMap::new();
        for slice in self.endpoint_slices.values() {
            slices_by_service
                .entry(ObjectKey::new(&slice.key.namespace, &slice.service))
                .or_default()
                .push(slice);
        }
        let by_address: HashMap<(&str, IpAddr), &Workload> = self
            .workloads
            .values()
            .filter_map(|w| Some(((w.key.namespace.as_str(), w.address?), &**w)))
            .collect();

        let mut endpoints = BTreeMap::new();
        let mut inbound: HashMap<ObjectKey, Vec<InboundPort>> = HashMap::new();
        for svc in self.services.values() {
            let slices = slices_by_service.get(&svc.key);
            for port in &svc.ports {
                let mut eps = match slices {
                    Some(slices) => from_slices(svc, port, slices, &by_address),
                    None => from_selector(svc, port, self.workloads.values()),
                };
                for ep in &mut eps {
                    ep.mtls = match ep.workload.as_ref().and_then(|w| self.workloads.get(w)) {
                        Some(w) => self.mtls_mode(w, ep.port),
                        None => self.defaults.mtls_mode,
                    };
                }
                eps.sort();
                eps.dedup();
                for ep in &eps {
                    let Some(workload) = &ep.workload else {
                        continue;
                    };
                    let ports = inbound.entry(workload.clone()).or_default();
                    match ports.iter_mut().find(|p| p.port == ep.port) {
                        Some(existing) => {
                            if !existing.services.contains(&svc.key) {
                                existing.services.push(svc.key.clone());
                            }
                        }
                        None => ports.push(InboundPort {
                            port: ep.port,
                            protocol: port.protocol,
                            services: vec![svc.key.clone()],
                            mtls: ep.mtls,
                        }),
                    }
                }
                endpoints.insert((svc.key.clone(), port.port), Arc::new(eps));
            }
        }
        for ports in inbound.values_mut() {
            ports.sort_by_key(|p| p.port);
        }
        self.endpoints = endpoints;
        self.inbound = inbound;
    }
}

fn from_slices(
    svc: &Service,
    port: &ServicePort,
    slices: &[&EndpointSlice],
    by_address: &HashMap<(&str, IpAddr), &Workload>,
) -> Vec<Endpoint> {
    let wanted = port.name.as_deref().unwrap_or("");
    let mut out = Vec::new();
    for slice in slices {
        let Some(slice_port) = slice
            .ports
            .iter()
            .find(|p| p.name.as_deref().unwrap_or("") == wanted)
        else {
            continue;
        };
        for ep in &slice.endpoints {
            for &address in &ep.addresses {
                let workload = match &ep.pod {
                    Some(pod) => Some(ObjectKey::new(&svc.key.namespace, pod)),
                    None => by_address
                        .get(&(svc.key.namespace.as_str(), address))
                        .map(|w| w.key.clone()),
                };
                out.push(Endpoint {
                    address,
                    port: slice_port.port,
                    ready: ep.ready,
                    workload,
                    mtls: MtlsMode::Strict,
                });
            }
        }
    }
    out
}

fn from_selector<'a>(
    svc: &Service,
    port: &ServicePort,
    workloads: impl Iterator<Item = &'a Arc<Workload>>,
) -> Vec<Endpoint> {
    let Some(selector) = svc.selector.as_ref().filter(|s| !s.is_empty()) else {
        return Vec::new();
    };
    workloads
        .filter(|w| w.key.namespace == svc.key.namespace)
        .filter(|w| selector.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
        .filter_map(|w| {
            let target = match &port.target_port {
                TargetPort::Number(n) => *n,
                TargetPort::Named(name) => w.container_port_named(name)?,
            };
            Some(Endpoint {
                address: w.address?,
                port: target,
                ready: w.ready,
                workload: Some(w.key.clone()),
                mtls: MtlsMode::Strict,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{EndpointSlicePort, SliceEndpoint};

    fn pod(name: &str, ip: &str, app: &str) -> MeshObject {
        MeshObject::Workload(Arc::new(Workload {
            key: ObjectKey::new("default", name),
            labels: [("app".to_string(), app.to_string())].into(),
            service_account: "default".into(),
            address: Some(ip.parse().unwrap()),
            ready: true,
            container_ports: vec![super::super::ContainerPort {
                name: Some("http".into()),
                port: 8080,
            }],
            app_ports: Default::default(),
            upstreams: vec![],
        }))
    }

    fn svc(name: &str, target: TargetPort) -> MeshObject {
        MeshObject::Service(Arc::new(Service {
            key: ObjectKey::new("default", name),
            cluster_ip: None,
            ports: vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                target_port: target,
                protocol: Protocol::Http,
            }],
            selector: Some([("app".to_string(), name.to_string())].into()),
        }))
    }

    #[test]
    fn selector_endpoints_resolve_named_target_ports() {
        let snap = MeshSnapshot::build(
            1,
            MeshDefaults::default(),
            vec![
                svc("web", TargetPort::Named("http".into())),
                pod("web-1", "10.0.0.1", "web"),
                pod("web-2", "10.0.0.2", "web"),
                pod("db-1", "10.0.0.3", "db"),
            ],
        );
        let eps = snap.service_endpoints(&ObjectKey::new("default", "web"), 80);
        let addrs: Vec<String> = eps
            .iter()
            .map(|e| format!("{}:{}", e.address, e.port))
            .collect();
        assert_eq!(addrs, ["10.0.0.1:8080", "10.0.0.2:8080"]);
        let inbound = &snap.inbound[&ObjectKey::new("default", "web-1")];
        assert_eq!(inbound.len(), 1);
        assert_eq!(inbound[0].port, 8080);
        assert!(
            !snap
                .inbound
                .contains_key(&ObjectKey::new("default", "db-1"))
        );
    }

    #[test]
    fn endpoint_slices_take_precedence_over_the_selector() {
        let slice = MeshObject::EndpointSlice(Arc::new(EndpointSlice {
            key: ObjectKey::new("default", "web-abc"),
            service: "web".into(),
            ports: vec![EndpointSlicePort {
                name: Some("http".into()),
                port: 9090,
            }],
            endpoints: vec![SliceEndpoint {
                addresses: vec!["10.0.0.2".parse().unwrap()],
                ready: false,
                pod: None,
            }],
        }));
        let snap = MeshSnapshot::build(
            1,
            MeshDefaults::default(),
            vec![
                svc("web", TargetPort::Number(8080)),
                pod("web-1", "10.0.0.1", "web"),
                pod("web-2", "10.0.0.2", "web"),
                slice,
            ],
        );
        let eps = snap.service_endpoints(&ObjectKey::new("default", "web"), 80);
        assert_eq!(eps.len(), 1);
        assert_eq!(eps[0].port, 9090);
        assert!(!eps[0].ready);
        // The pod is found by its IP even without a targetRef.
        assert_eq!(eps[0].workload, Some(ObjectKey::new("default", "web-2")));
    }

    fn pa(
        ns: &str,
        name: &str,
        app: Option<&str>,
        mode: Option<MtlsMode>,
        ports: &[(u16, MtlsMode)],
    ) -> MeshObject {
        MeshObject::PeerAuthentication(Arc::new(PeerAuthentication {
            key: ObjectKey::new(ns, name),
            selector: app.map(|a| [("app".to_string(), a.to_string())].into()),
            mode,
            port_modes: ports.iter().copied().collect(),
        }))
    }

    #[test]
    fn the_most_specific_peer_authentication_decides() {
        let other = MeshObject::Workload(Arc::new(Workload {
            key: ObjectKey::new("other", "x-1"),
            ..match pod("x-1", "10.0.0.9", "x") {
                MeshObject::Workload(w) => (*w).clone(),
                _ => unreachable!(),
            }
        }));
        let snap = MeshSnapshot::build(
            1,
            MeshDefaults::default(),
            vec![
                pod("web-1", "10.0.0.1", "web"),
                pod("db-1", "10.0.0.2", "db"),
                other,
                pa(
                    "meshd-system",
                    "mesh",
                    None,
                    Some(MtlsMode::Permissive),
                    &[],
                ),
                pa("default", "ns", None, Some(MtlsMode::Strict), &[]),
                pa(
                    "default",
                    "web",
                    Some("web"),
                    Some(MtlsMode::Disable),
                    &[(8080, MtlsMode::Permissive)],
                ),
            ],
        );
        let w = |ns: &str, n: &str| snap.workloads[&ObjectKey::new(ns, n)].clone();
        assert_eq!(
            snap.mtls_mode(&w("default", "web-1"), 8080),
            MtlsMode::Permissive
        );
        assert_eq!(
            snap.mtls_mode(&w("default", "web-1"), 9090),
            MtlsMode::Disable
        );
        assert_eq!(
            snap.mtls_mode(&w("default", "db-1"), 8080),
            MtlsMode::Strict
        );
        let web_svc = MeshSnapshot::build(
            1,
            MeshDefaults::default(),
            vec![
                svc("web", TargetPort::Number(8080)),
                pod("web-1", "10.0.0.1", "web"),
                pa("default", "web", Some("web"), Some(MtlsMode::Disable), &[]),
            ],
        );
        let eps = web_svc.service_endpoints(&ObjectKey::new("default", "web"), 80);
        assert_eq!(
            eps[0].mtls,
            MtlsMode::Disable,
            "endpoints carry their port's mode"
        );
        assert_eq!(
            web_svc.inbound[&ObjectKey::new("default", "web-1")][0].mtls,
            MtlsMode::Disable,
            "inbound ports carry their mode"
        );
        assert_eq!(
            snap.mtls_mode(&w("other", "x-1"), 8080),
            MtlsMode::Permissive
        );

        let bare = MeshSnapshot::build(
            1,
            MeshDefaults::default(),
            vec![pod("web-1", "10.0.0.1", "web")],
        );
        let web = bare.workloads[&ObjectKey::new("default", "web-1")].clone();
        assert_eq!(
            bare.mtls_mode(&web, 8080),
            MtlsMode::Strict,
            "STRICT by default"
        );
        // UNSET inherits.
        let unset = MeshSnapshot::build(
            1,
            MeshDefaults::default(),
            vec![
                pod("web-1", "10.0.0.1", "web"),
                pa("default", "web", Some("web"), None, &[]),
                pa("default", "ns", None, Some(MtlsMode::Permissive), &[]),
            ],
        );
        assert_eq!(unset.mtls_mode(&web, 8080), MtlsMode::Permissive);
    }
}
