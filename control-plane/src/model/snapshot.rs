//! An immutable, versioned view of the whole mesh, with the derived facts every
//! consumer needs (endpoints per service port, inbound ports per workload) computed once.
//!
//! Deriving endpoints also finds what keeps a service port from pods it selects: a
//! named `targetPort` that no container port of a pod declares leaves that pod
//! without the port's traffic. Kubernetes accepts such a Service, so meshd does too,
//! and says so: [`MeshSnapshot::problems`] (the log, `/debug/snapshot`, `meshctl
//! status` and `meshctl analyze` show them); the rest of the mesh is served as usual.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use crate::model::authorization::AuthorizationPolicy;
use crate::model::workload_policy::WorkloadPolicy;

use super::{
    EndpointSlice, MeshDefaults, MeshObject, MtlsMode, Namespace, ObjectKey, ObjectKind,
    PeerAuthentication, Protocol, Service, ServicePort, TargetPort, Workload,
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
    /// What may run in the mesh: read by admission ([`crate::admission`]), never by xDS.
    pub workload_policies: BTreeMap<ObjectKey, Arc<WorkloadPolicy>>,
    pub namespaces: BTreeMap<String, Arc<Namespace>>,
    pub services: BTreeMap<ObjectKey, Arc<Service>>,
    pub endpoint_slices: BTreeMap<ObjectKey, Arc<EndpointSlice>>,
    pub workloads: BTreeMap<ObjectKey, Arc<Workload>>,
    /// Every port of every service, with its endpoints (ready or not), sorted.
    pub endpoints: BTreeMap<ServicePortKey, Arc<Vec<Endpoint>>>,
    /// Per workload, the ports on which some service sends it traffic.
    pub inbound: HashMap<ObjectKey, Arc<Vec<InboundPort>>>,
    /// Per service port, why pods it selects get none of its traffic (see the module
    /// doc). Derived with the endpoints.
    pub port_problems: BTreeMap<ServicePortKey, Arc<str>>,
    /// How many service ports this snapshot derived endpoints for (the others were
    /// reused from the previous snapshot): what one change cost.
    pub derived_service_ports: usize,
    /// When the first change this snapshot carries happened (`None` for the first).
    pub changed_at: Option<std::time::Instant>,
}

/// The objects that changed since the previous snapshot.
pub type Changes = BTreeSet<(ObjectKind, ObjectKey)>;

impl MeshSnapshot {
    /// A snapshot of `objects`, every derived fact computed from scratch.
    pub fn build(
        version: u64,
        defaults: MeshDefaults,
        objects: impl IntoIterator<Item = MeshObject>,
    ) -> MeshSnapshot {
        let mut snap = Self::collect(version, defaults, objects);
        snap.derive_all();
        snap
    }

    /// The snapshot after `previous` once `changes` happened: endpoints and inbound
    /// ports are derived again only for the services those changes can touch (and
    /// their workloads); everything else is the previous snapshot's, shared. A change
    /// of mTLS settings (PeerAuthentication, defaults) can touch every endpoint and
    /// derives everything.
    pub fn update(
        previous: &MeshSnapshot,
        version: u64,
        defaults: MeshDefaults,
        objects: impl IntoIterator<Item = MeshObject>,
        changes: &Changes,
    ) -> MeshSnapshot {
        let mut snap = Self::collect(version, defaults, objects);
        let everything = snap.defaults != previous.defaults
            || changes
                .iter()
                .any(|(kind, _)| *kind == ObjectKind::PeerAuthentication);
        if everything {
            snap.derive_all();
        } else {
            snap.derive_changed(previous, changes);
        }
        snap
    }

    fn collect(
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
                MeshObject::WorkloadPolicy(p) => {
                    snap.workload_policies.insert(p.key.clone(), p);
                }
            }
        }
        snap
    }

    /// What is wrong in the mesh as a whole, one line each, in service order.
    pub fn problems(&self) -> impl Iterator<Item = &str> {
        self.port_problems.values().map(|p| &**p)
    }

    pub fn service_endpoints(&self, service: &ObjectKey, port: u16) -> &[Endpoint] {
        self.endpoints
            .get(&(service.clone(), port))
            .map(|e| e.as_slice())
            .unwrap_or_default()
    }

    /// The AuthorizationPolicies that apply to `workload`: those of its namespace whose
    /// selector matches it (or that have none), and those of the root namespace.
    pub fn authorization_policies_for(
        &self,
        workload: &Workload,
    ) -> Vec<&Arc<AuthorizationPolicy>> {
        let root = self.defaults.root_namespace.as_str();
        self.authorization_policies
            .values()
            .filter(|p| p.applies_to(workload, root))
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

    /// The mTLS mode of `namespace` as a whole: its own PeerAuthentication without a
    /// selector, else the root namespace's, else the mesh default. (A workload's
    /// selector or port can say otherwise: [`Self::mtls_mode`].)
    pub fn namespace_mtls(&self, namespace: &str) -> MtlsMode {
        let root = self.defaults.root_namespace.as_str();
        let wide = |ns: &str| {
            self.peer_authentications
                .values()
                .filter(|p| p.key.namespace == ns && p.selector.is_none())
                .find_map(|p| p.mode)
        };
        wide(namespace)
            .or_else(|| wide(root))
            .unwrap_or(self.defaults.mtls_mode)
    }

    /// The workloads of `namespace`.
    fn workloads_in<'a>(&'a self, namespace: &'a str) -> impl Iterator<Item = &'a Arc<Workload>> {
        self.workloads
            .range(ObjectKey::new(namespace, "")..)
            .take_while(move |(k, _)| k.namespace == namespace)
            .map(|(_, w)| w)
    }

    /// The endpoint slices of `namespace`.
    fn slices_in<'a>(&'a self, namespace: &'a str) -> impl Iterator<Item = &'a Arc<EndpointSlice>> {
        self.endpoint_slices
            .range(ObjectKey::new(namespace, "")..)
            .take_while(move |(k, _)| k.namespace == namespace)
            .map(|(_, s)| s)
    }

    /// The endpoints of every port of `svc`, from its EndpointSlices if it has any,
    /// else from the pods its selector picks, and what keeps selected pods from a port.
    fn service_port_endpoints(&self, svc: &Service) -> Vec<DerivedPort> {
        let ns = svc.key.namespace.as_str();
        let slices: Vec<&EndpointSlice> = self
            .slices_in(ns)
            .filter(|s| s.service == svc.key.name)
            .map(|s| &**s)
            .collect();
        let selected: Vec<&Arc<Workload>> = match svc.selector.as_ref().filter(|s| !s.is_empty()) {
            Some(sel) if slices.is_empty() => self
                .workloads_in(ns)
                .filter(|w| sel.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
                .collect(),
            _ => Vec::new(),
        };
        let by_address = |address: IpAddr| {
            self.workloads_in(ns)
                .find(|w| w.address == Some(address))
                .map(|w| w.key.clone())
        };
        svc.ports
            .iter()
            .map(|port| {
                let (mut eps, problem) = if slices.is_empty() {
                    (
                        from_selector(port, &selected),
                        unresolved_target(svc, port, &selected),
                    )
                } else {
                    (from_slices(svc, port, &slices, &by_address), None)
                };
                for ep in &mut eps {
                    ep.mtls = match ep.workload.as_ref().and_then(|w| self.workloads.get(w)) {
                        Some(w) => self.mtls_mode(w, ep.port),
                        None => self.defaults.mtls_mode,
                    };
                }
                eps.sort();
                eps.dedup();
                DerivedPort {
                    port: port.port,
                    endpoints: Arc::new(eps),
                    problem,
                }
            })
            .collect()
    }

    fn derive_all(&mut self) {
        let mut endpoints = BTreeMap::new();
        let mut problems = BTreeMap::new();
        for svc in self.services.values() {
            for derived in self.service_port_endpoints(svc) {
                let key = (svc.key.clone(), derived.port);
                if let Some(problem) = derived.problem {
                    problems.insert(key.clone(), problem);
                }
                endpoints.insert(key, derived.endpoints);
            }
        }
        self.derived_service_ports = endpoints.len();
        self.endpoints = endpoints;
        self.port_problems = problems;
        let workloads: BTreeSet<ObjectKey> = self
            .endpoints
            .values()
            .flat_map(|eps| eps.iter().filter_map(|e| e.workload.clone()))
            .collect();
        let mut services_of: HashMap<ObjectKey, BTreeSet<ObjectKey>> = HashMap::new();
        for ((svc, _), eps) in &self.endpoints {
            for w in eps.iter().filter_map(|e| e.workload.as_ref()) {
                services_of
                    .entry(w.clone())
                    .or_default()
                    .insert(svc.clone());
            }
        }
        self.inbound = workloads
            .into_iter()
            .map(|w| {
                let ports = self.inbound_ports(&w, services_of.get(&w).into_iter().flatten());
                (w, Arc::new(ports))
            })
            .collect();
    }

    fn derive_changed(&mut self, previous: &MeshSnapshot, changes: &Changes) {
        // The services whose endpoints a change can touch.
        let mut services: BTreeSet<ObjectKey> = BTreeSet::new();
        let mut touched_workloads: BTreeSet<ObjectKey> = BTreeSet::new();
        for (kind, key) in changes {
            match kind {
                ObjectKind::Service => {
                    services.insert(key.clone());
                }
                ObjectKind::EndpointSlice => {
                    for snap in [previous, &*self] {
                        if let Some(slice) = snap.endpoint_slices.get(key) {
                            services.insert(ObjectKey::new(&key.namespace, &slice.service));
                        }
                    }
                }
                ObjectKind::Workload => {
                    touched_workloads.insert(key.clone());
                    // The services it served…
                    for port in previous.inbound.get(key).into_iter().flat_map(|p| p.iter()) {
                        services.extend(port.services.iter().cloned());
                    }
                    // …and those that select it, or list its address, now or before.
                    for snap in [previous, &*self] {
                        let Some(w) = snap.workloads.get(key) else {
                            continue;
                        };
                        let ns = key.namespace.as_str();
                        for svc in self.services.values().filter(|s| s.key.namespace == ns) {
                            if svc.selector.as_ref().is_some_and(|sel| {
                                !sel.is_empty()
                                    && sel.iter().all(|(k, v)| w.labels.get(k) == Some(v))
                            }) {
                                services.insert(svc.key.clone());
                            }
                        }
                        if let Some(address) = w.address {
                            for slice in self.slices_in(ns) {
                                if slice
                                    .endpoints
                                    .iter()
                                    .any(|e| e.addresses.contains(&address))
                                {
                                    services.insert(ObjectKey::new(ns, &slice.service));
                                }
                            }
                        }
                    }
                }
                ObjectKind::Namespace
                | ObjectKind::AuthorizationPolicy
                | ObjectKind::WorkloadPolicy
                | ObjectKind::PeerAuthentication => {}
            }
        }

        let mut endpoints = previous.endpoints.clone();
        endpoints.retain(|(svc, _), _| !services.contains(svc));
        let mut problems = previous.port_problems.clone();
        problems.retain(|(svc, _), _| !services.contains(svc));
        let mut derived = 0;
        for key in &services {
            // Their workloads before the change need their inbound ports again too.
            for ((svc, _), eps) in previous
                .endpoints
                .range((key.clone(), 0)..=(key.clone(), u16::MAX))
            {
                debug_assert_eq!(svc, key);
                touched_workloads.extend(eps.iter().filter_map(|e| e.workload.clone()));
            }
            let Some(svc) = self.services.get(key) else {
                continue;
            };
            for port in self.service_port_endpoints(svc) {
                let eps = port.endpoints;
                touched_workloads.extend(eps.iter().filter_map(|e| e.workload.clone()));
                if let Some(problem) = port.problem {
                    problems.insert((key.clone(), port.port), problem);
                }
                endpoints.insert((key.clone(), port.port), eps);
                derived += 1;
            }
        }
        self.endpoints = endpoints;
        self.port_problems = problems;
        self.derived_service_ports = derived;

        // Which affected services send traffic to which workload now.
        let mut affected_sources: HashMap<&ObjectKey, BTreeSet<&ObjectKey>> = HashMap::new();
        for svc in &services {
            for (_, eps) in self
                .endpoints
                .range((svc.clone(), 0)..=(svc.clone(), u16::MAX))
            {
                for w in eps.iter().filter_map(|e| e.workload.as_ref()) {
                    affected_sources.entry(w).or_default().insert(svc);
                }
            }
        }
        let mut inbound = previous.inbound.clone();
        for w in &touched_workloads {
            // Every service that sends it traffic now: unaffected ones it had before,
            // and affected ones whose new endpoints name it.
            let mut sources: BTreeSet<ObjectKey> = previous
                .inbound
                .get(w)
                .into_iter()
                .flat_map(|p| p.iter().flat_map(|p| p.services.iter().cloned()))
                .filter(|s| !services.contains(s))
                .collect();
            sources.extend(
                affected_sources
                    .get(w)
                    .into_iter()
                    .flatten()
                    .map(|s| (*s).clone()),
            );
            let ports = self.inbound_ports(w, sources.iter());
            if ports.is_empty() {
                inbound.remove(w);
            } else {
                inbound.insert(w.clone(), Arc::new(ports));
            }
        }
        self.inbound = inbound;
    }

    /// The inbound ports of workload `w`, from the endpoints of `services`.
    fn inbound_ports<'a>(
        &self,
        w: &ObjectKey,
        services: impl Iterator<Item = &'a ObjectKey>,
    ) -> Vec<InboundPort> {
        let mut ports: Vec<InboundPort> = Vec::new();
        for key in services {
            let Some(svc) = self.services.get(key) else {
                continue;
            };
            for port in &svc.ports {
                let Some(eps) = self.endpoints.get(&(key.clone(), port.port)) else {
                    continue;
                };
                for ep in eps.iter().filter(|e| e.workload.as_ref() == Some(w)) {
                    match ports.iter_mut().find(|p| p.port == ep.port) {
                        Some(existing) => {
                            if !existing.services.contains(key) {
                                existing.services.push(key.clone());
                            }
                        }
                        None => ports.push(InboundPort {
                            port: ep.port,
                            protocol: port.protocol,
                            services: vec![key.clone()],
                            mtls: ep.mtls,
                        }),
                    }
                }
            }
        }
        ports.sort_by_key(|p| p.port);
        ports
    }
}

fn from_slices(
    svc: &Service,
    port: &ServicePort,
    slices: &[&EndpointSlice],
    by_address: &dyn Fn(IpAddr) -> Option<ObjectKey>,
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
                    None => by_address(address),
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

/// One service port's derived facts.
struct DerivedPort {
    port: u16,
    endpoints: Arc<Vec<Endpoint>>,
    problem: Option<Arc<str>>,
}

/// How many pods a problem names before it says "and N more".
const NAMED_PODS: usize = 5;

/// The selected pods a named `targetPort` does not resolve on (none of their container
/// ports has that name), as a problem line; `None` if it resolves on every one.
fn unresolved_target(
    svc: &Service,
    port: &ServicePort,
    selected: &[&Arc<Workload>],
) -> Option<Arc<str>> {
    let TargetPort::Named(name) = &port.target_port else {
        return None;
    };
    let missing: Vec<String> = selected
        .iter()
        .filter(|w| w.container_port_named(name).is_none())
        .map(|w| w.key.to_string())
        .collect();
    if missing.is_empty() {
        return None;
    }
    let mut pods = missing[..missing.len().min(NAMED_PODS)].join(", ");
    if missing.len() > NAMED_PODS {
        pods.push_str(&format!(" and {} more", missing.len() - NAMED_PODS));
    }
    let (pod, they) = match missing.len() {
        1 => ("pod", "it gets"),
        _ => ("pods", "they get"),
    };
    Some(
        format!(
            "Service {} port {}: targetPort {name:?} is the name of no container port of \
             {pod} {pods}, so {they} none of this port's traffic",
            svc.key, port.port
        )
        .into(),
    )
}

fn from_selector(port: &ServicePort, selected: &[&Arc<Workload>]) -> Vec<Endpoint> {
    selected
        .iter()
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
            scope: None,
            capture: Default::default(),
            key: ObjectKey::new("default", name),
            uid: None,
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
            egress: None,
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

    /// A named targetPort that a selected pod does not declare gave that pod no
    /// traffic, and nothing said so.
    #[test]
    fn a_named_target_port_no_selected_pod_declares_is_a_problem() {
        let without_http = |name: &str, ip: &str| {
            let MeshObject::Workload(w) = pod(name, ip, "web") else {
                unreachable!()
            };
            let mut w = (*w).clone();
            w.container_ports[0].name = Some("web".into());
            MeshObject::Workload(Arc::new(w))
        };
        let snap = MeshSnapshot::build(
            1,
            MeshDefaults::default(),
            vec![
                svc("web", TargetPort::Named("http".into())),
                pod("web-1", "10.0.0.1", "web"),
                without_http("web-2", "10.0.0.2"),
                svc("db", TargetPort::Named("http".into())),
            ],
        );
        let eps = snap.service_endpoints(&ObjectKey::new("default", "web"), 80);
        assert_eq!(eps.len(), 1, "web-1 still serves");
        assert_eq!(
            snap.problems().collect::<Vec<_>>(),
            [
                "Service default/web port 80: targetPort \"http\" is the name of no container \
              port of pod default/web-2, so it gets none of this port's traffic"
            ]
        );

        let mut objects = vec![svc("web", TargetPort::Named("http".into()))];
        for i in 0..7 {
            objects.push(without_http(
                &format!("web-{i}"),
                &format!("10.0.0.{}", i + 1),
            ));
        }
        let snap = MeshSnapshot::build(1, MeshDefaults::default(), objects);
        assert_eq!(
            snap.problems().collect::<Vec<_>>(),
            [
                "Service default/web port 80: targetPort \"http\" is the name of no container \
              port of pods default/web-0, default/web-1, default/web-2, default/web-3, \
              default/web-4 and 2 more, so they get none of this port's traffic"
            ]
        );
        assert!(
            snap.service_endpoints(&ObjectKey::new("default", "web"), 80)
                .is_empty()
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
            uid: None,
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

    /// Random changes applied one by one: the incremental snapshot must always equal
    /// one derived from scratch, and must derive only what the change touched.
    #[test]
    fn incremental_updates_equal_full_rebuilds() {
        use crate::model::{EndpointSlicePort, SliceEndpoint};
        use std::collections::BTreeMap as Map;
        let mut seed: u64 = 0x9e3779b97f4a7c15;
        let mut rand = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let pod = |i: u64, app: u64, ready: bool, ip: bool| {
            MeshObject::Workload(Arc::new(Workload {
                scope: None,
                capture: Default::default(),
                key: ObjectKey::new("default", format!("p{i}")),
                uid: None,
                labels: [("app".to_string(), format!("s{app}"))].into(),
                service_account: format!("sa{app}"),
                address: ip.then(|| format!("10.0.{}.{}", i / 200, i % 200 + 1).parse().unwrap()),
                ready,
                // Some pods do not declare the services' named target port.
                container_ports: vec![super::super::ContainerPort {
                    name: Some(if i % 7 == 3 { "web" } else { "http" }.into()),
                    port: 8080,
                }],
                app_ports: Default::default(),
                upstreams: vec![],
                egress: None,
            }))
        };
        let slice = |svc: u64, pods: &[u64], by_ip: bool| {
            MeshObject::EndpointSlice(Arc::new(EndpointSlice {
                key: ObjectKey::new("default", format!("s{svc}-slice")),
                service: format!("s{svc}"),
                ports: vec![EndpointSlicePort {
                    name: Some("http".into()),
                    port: 8080,
                }],
                endpoints: pods
                    .iter()
                    .map(|i| SliceEndpoint {
                        addresses: vec![
                            format!("10.0.{}.{}", i / 200, i % 200 + 1).parse().unwrap(),
                        ],
                        ready: i % 3 != 0,
                        pod: (!by_ip).then(|| format!("p{i}")),
                    })
                    .collect(),
            }))
        };
        let mut objects: Map<(ObjectKind, ObjectKey), MeshObject> = Map::new();
        let put = |objects: &mut Map<_, _>, o: MeshObject| {
            objects.insert((o.kind(), o.key()), o);
        };
        for i in 0..10 {
            put(
                &mut objects,
                svc(&format!("s{i}"), TargetPort::Named("http".into())),
            );
        }
        for i in 0..60 {
            put(&mut objects, pod(i, i % 10, true, true));
        }
        let mut last = Arc::new(MeshSnapshot::build(
            1,
            MeshDefaults::default(),
            objects.values().cloned(),
        ));
        let mut problems_seen = false;
        for step in 0..400u64 {
            let mut changes = Changes::new();
            for _ in 0..=rand(3) {
                let o = match rand(6) {
                    0 | 1 => pod(rand(70), rand(12), rand(2) == 0, rand(5) != 0),
                    2 => svc(&format!("s{}", rand(12)), TargetPort::Named("http".into())),
                    3 => {
                        let pods: Vec<u64> = (0..rand(4)).map(|_| rand(70)).collect();
                        slice(rand(12), &pods, rand(2) == 0)
                    }
                    _ => {
                        // A deletion of whatever is there.
                        let keys: Vec<_> = objects.keys().cloned().collect();
                        let id = keys[rand(keys.len() as u64) as usize].clone();
                        objects.remove(&id);
                        changes.insert(id);
                        continue;
                    }
                };
                changes.insert((o.kind(), o.key()));
                put(&mut objects, o);
            }
            let next = MeshSnapshot::update(
                &last,
                step + 2,
                MeshDefaults::default(),
                objects.values().cloned(),
                &changes,
            );
            let full =
                MeshSnapshot::build(step + 2, MeshDefaults::default(), objects.values().cloned());
            assert_eq!(
                next.endpoints, full.endpoints,
                "endpoints after step {step}: {changes:?}"
            );
            assert_eq!(
                next.inbound, full.inbound,
                "inbound after step {step}: {changes:?}"
            );
            assert_eq!(
                next.port_problems, full.port_problems,
                "problems after step {step}: {changes:?}"
            );
            problems_seen |= !full.port_problems.is_empty();
            assert!(
                next.derived_service_ports <= 3 * 2 + 4,
                "step {step} derived {}",
                next.derived_service_ports
            );
            last = Arc::new(next);
        }
        assert!(problems_seen, "the changes never made a problem to derive");
    }
}
