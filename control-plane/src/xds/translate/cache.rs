//! Per-snapshot xDS resources.
//!
//! Every mesh snapshot becomes one [`XdsSnapshot`]: the encoded cluster, endpoints and
//! route of every service port, built once and shared by all proxies. A service port
//! whose inputs did not change keeps the previous snapshot's `Arc`s, so a change only
//! re-encodes what it touches. Outbound listeners are encoded once per service port and
//! local port, and shared by every proxy that declares that upstream. A service port's
//! cluster is encoded once per calling pod IP (it binds its connections to it, see
//! [`translate::clusters::bound_to`]), shared by that pod's streams, and dropped with the pod.
//!
//! A workload's own resources — the listener, static cluster and (HTTP) route of each
//! inbound port, the route carrying its RBAC; its egress listener and route — are
//! encoded on first use, in a cache the snapshots share, and reused while their inputs
//! (the workload, its inbound ports, the policies that select it, the services its
//! egress scope covers) stay equal. So a change re-encodes only the workloads it
//! touches, whatever the number of connected proxies, and a resource keeps its content
//! version until its content really changes. That matters beyond speed: protobuf map
//! fields (the route's per-filter configs) encode in hash order, so re-encoding equal
//! content can produce other bytes, another version, and a needless push.
//! A transparent proxy's virtual outbound listener depends only on its scope and is
//! shared by scope ([`super::virtual_outbound`]). [`XdsSnapshot::proxy_resources`]
//! assembles all of them.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::resources::{ProxyResources, Resource, ResourceType};
use super::touched::Touched;
use crate::authz::compile as rbac;
use crate::model::authorization::AuthorizationPolicy;
use crate::model::snapshot::{Endpoint, InboundPort, ServicePortKey};
use crate::xds::translate;
use meshd_ca::SpiffeId;

use super::listeners::VirtualInbound;
use super::names::{INBOUND_CAPTURE_PORT, OUTBOUND_CAPTURE_PORT};
use super::virtual_outbound::SharedOutbound;
use crate::model::proxy_view::{EgressView, Outbound};
use crate::model::{MeshSnapshot, MtlsMode, ObjectKey, ProxyView, Service, Workload};

/// The shared resources of one service port and the inputs they were built from.
#[derive(Debug)]
pub struct ServicePortResources {
    service: Arc<Service>,
    port: u16,
    endpoints: Arc<Vec<Endpoint>>,
    /// The SPIFFE ids of the endpoints' pods: whom the cluster's TLS accepts.
    identities: Vec<SpiffeId>,
    pub cluster: Arc<Resource>,
    /// Transparent capture: the cluster for calls to an endpoint's own address.
    pub direct: Arc<Resource>,
    pub load_assignment: Arc<Resource>,
    pub route: Option<Arc<Resource>>,
    /// Outbound listeners for this service port by local port, encoded once for every
    /// proxy that uses that local port (filled on first use; kept while the service
    /// itself does not change).
    listeners: Mutex<HashMap<u16, Arc<Resource>>>,
    /// The cluster bound to each calling pod's IP (filled on first use; kept while the
    /// service does not change and a pod has that IP).
    bound_clusters: Mutex<HashMap<IpAddr, Arc<Resource>>>,
}

impl ServicePortResources {
    /// This service port's cluster for a sidecar whose pod has `address`: connecting
    /// from it, or the unbound [`Self::cluster`] for a pod without an IP.
    pub fn cluster_for(&self, address: Option<IpAddr>) -> Arc<Resource> {
        let (Some(address), Some(port)) = (address, self.service.port(self.port)) else {
            return self.cluster.clone();
        };
        let mut bound = self
            .bound_clusters
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        bound
            .entry(address)
            .or_insert_with(|| {
                let cluster =
                    translate::clusters::service_cluster(&self.service, port, &self.identities);
                Resource::encode(
                    self.cluster.name.clone(),
                    &translate::clusters::bound_to(cluster, address),
                )
            })
            .clone()
    }

    /// The outbound listener through which a proxy reaches this service port.
    pub fn outbound_listener(&self, out: &Outbound) -> Arc<Resource> {
        let mut listeners = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
        listeners
            .entry(out.upstream.local_port)
            .or_insert_with(|| {
                Resource::encode(
                    translate::names::outbound_listener_name(out.upstream.local_port),
                    &translate::listeners::outbound_listener(out),
                )
            })
            .clone()
    }
}

/// A workload's own resources — its inbound listeners, clusters and routes, its egress
/// listener and route — and the inputs they were built from.
#[derive(Debug)]
struct WorkloadResources {
    workload: Arc<Workload>,
    ports: Option<Arc<Vec<InboundPort>>>,
    policies: Vec<Arc<AuthorizationPolicy>>,
    egress: Option<EgressView>,
    transparent: Option<TransparentInputs>,
    resources: Vec<(ResourceType, Arc<Resource>)>,
}

/// What a transparent workload's virtual inbound listener is built from beyond its
/// inbound ports and policies: the mTLS modes of ports no Service names. (Its virtual
/// outbound listener depends only on its scope, and is shared: [`SharedOutbound`].)
#[derive(Debug, Clone, PartialEq)]
struct TransparentInputs {
    other_ports: Vec<(Option<u16>, MtlsMode)>,
}

impl TransparentInputs {
    fn of(mesh: &MeshSnapshot, view: &ProxyView) -> Option<TransparentInputs> {
        view.transparent.as_ref()?;
        Some(TransparentInputs {
            other_ports: other_ports(mesh, view),
        })
    }
}

/// The mTLS modes of the ports of `view`'s pod that no Service names: the pod's own
/// mode for any port, and each port a PeerAuthentication's `portLevelMtls` gives
/// another mode.
fn other_ports(mesh: &MeshSnapshot, view: &ProxyView) -> Vec<(Option<u16>, MtlsMode)> {
    let workload = &view.workload;
    let any = mesh.mtls_mode(workload, 0);
    let named: HashSet<u16> = view.inbound.iter().map(|p| p.port).collect();
    let mut ports: Vec<u16> = mesh
        .peer_authentications
        .values()
        .flat_map(|p| p.port_modes.keys().copied())
        .filter(|p| !named.contains(p))
        .filter(|p| ![OUTBOUND_CAPTURE_PORT, INBOUND_CAPTURE_PORT].contains(p))
        .collect();
    ports.sort_unstable();
    ports.dedup();
    let mut out: Vec<(Option<u16>, MtlsMode)> = ports
        .into_iter()
        .map(|p| (Some(p), mesh.mtls_mode(workload, p)))
        .filter(|(_, mode)| *mode != any)
        .collect();
    out.push((None, any));
    out
}

/// What an inbound HTTP port's route is built from: its port and the policies that
/// select the pod (by value; hashed by their names).
#[derive(Debug, PartialEq, Eq)]
struct RouteInputs {
    port: u16,
    policies: Vec<Arc<AuthorizationPolicy>>,
}

impl std::hash::Hash for RouteInputs {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.port.hash(state);
        for p in &self.policies {
            p.key.hash(state);
        }
    }
}

/// Inbound routes by content, shared by the snapshots like the workload cache: a policy
/// that selects 10,000 pods is compiled and encoded once per port, not per pod, and every
/// one of those proxies is sent the same resource. Entries no workload holds any more are
/// dropped in the translator's pass.
#[derive(Debug, Default, Clone)]
struct SharedRoutes(Arc<Mutex<HashMap<RouteInputs, Arc<Resource>>>>);

impl SharedRoutes {
    fn get(&self, port: u16, policies: &[Arc<AuthorizationPolicy>]) -> Arc<Resource> {
        let inputs = RouteInputs {
            port,
            policies: policies.to_vec(),
        };
        let lock = || self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(hit) = lock().get(&inputs) {
            return hit.clone();
        }
        // Compiled and encoded outside the lock; if two streams raced, the first stored
        // wins and both use it, so every proxy gets one version.
        let refs: Vec<&AuthorizationPolicy> = policies.iter().map(|p| &**p).collect();
        let route = translate::routes::inbound_route(port, &rbac::compile(&refs, true));
        let encoded = Resource::encode(translate::names::inbound_route_name(port), &route);
        lock().entry(inputs).or_insert(encoded).clone()
    }

    /// Drops the routes only this cache still holds.
    fn prune(&self) {
        let mut routes = self.0.lock().unwrap_or_else(|p| p.into_inner());
        routes.retain(|_, r| Arc::strong_count(r) > 1);
    }
}

impl WorkloadResources {
    /// Builds the workload's resources; from `stale`, its previous entry, it takes the
    /// encoded resources that do not carry policy when only the policies changed (a
    /// policy selecting every pod then encodes no cluster or HTTP listener again).
    fn build(
        view: &ProxyView,
        ports: Option<&Arc<Vec<InboundPort>>>,
        policies: Vec<Arc<AuthorizationPolicy>>,
        transparent: Option<TransparentInputs>,
        routes: &SharedRoutes,
        stale: Option<&WorkloadResources>,
    ) -> WorkloadResources {
        let workload = &view.workload;
        let mut resources = Vec::new();
        let refs: Vec<&AuthorizationPolicy> = policies.iter().map(|p| &**p).collect();
        let unchanged = stale.filter(|s| s.built_from(view, ports, &s.policies, &transparent));
        let encoded = |t: ResourceType, name: String, encode: &dyn Fn() -> Arc<Resource>| {
            let kept = unchanged.and_then(|s| {
                s.resources
                    .iter()
                    .find(|(st, r)| *st == t && *r.name == *name)
            });
            kept.map(|(_, r)| r.clone()).unwrap_or_else(encode)
        };
        if let Some(address) = workload.address {
            // The explicit layout has a listener per port; the transparent one gathers
            // the ports' chains in one virtual listener. Clusters and routes are the same.
            let mut virtual_ports = Vec::new();
            // The view's ports: in transparent capture, without the sidecar's own.
            for port in &view.inbound {
                let app_port = workload.app_port(port.port);
                let name = translate::names::inbound_cluster_name(port.port);
                resources.push((
                    ResourceType::Cluster,
                    encoded(ResourceType::Cluster, name.clone(), &|| {
                        Resource::encode(
                            name.clone(),
                            &translate::clusters::inbound_cluster(port, app_port),
                        )
                    }),
                ));
                // An HTTP port's RBAC is all in its route (shared by content); its
                // listener's filters do not depend on it.
                let http = port.protocol.is_http();
                let rbac = if http {
                    resources.push((ResourceType::Route, routes.get(port.port, &policies)));
                    rbac::PortRbac::default()
                } else {
                    rbac::compile(&refs, false)
                };
                let listener = translate::names::inbound_listener_name(address, port.port);
                let encode = || {
                    Resource::encode(
                        listener.clone(),
                        &translate::listeners::inbound_listener(address, port, &rbac),
                    )
                };
                match transparent {
                    Some(_) => virtual_ports.push((port.clone(), rbac.clone())),
                    // A TCP port's listener carries its network RBAC: always built anew.
                    None if !http => resources.push((ResourceType::Listener, encode())),
                    None => resources.push((
                        ResourceType::Listener,
                        encoded(ResourceType::Listener, listener.clone(), &encode),
                    )),
                }
            }
            if let Some(t) = &transparent {
                let inbound = VirtualInbound {
                    address,
                    ports: virtual_ports,
                    other_ports: t.other_ports.clone(),
                    other_rbac: rbac::compile(&refs, false),
                };
                resources.push((
                    ResourceType::Listener,
                    Resource::encode(
                        translate::names::virtual_inbound_listener_name(),
                        &translate::listeners::virtual_inbound_listener(&inbound, false),
                    ),
                ));
            }
        }
        if transparent.is_some() {
            for cluster in PASSTHROUGH_CLUSTERS.iter() {
                resources.push((ResourceType::Cluster, cluster.clone()));
            }
        }
        if let Some(egress) = &view.egress {
            let name = translate::names::egress_listener_name(egress.port);
            resources.push((
                ResourceType::Route,
                encoded(ResourceType::Route, name.clone(), &|| {
                    Resource::encode(
                        name.clone(),
                        &translate::routes::egress_route(egress, &workload.key.namespace),
                    )
                }),
            ));
            resources.push((
                ResourceType::Listener,
                encoded(ResourceType::Listener, name.clone(), &|| {
                    Resource::encode(name.clone(), &translate::listeners::egress_listener(egress))
                }),
            ));
        }
        WorkloadResources {
            workload: workload.clone(),
            ports: ports.cloned(),
            policies,
            egress: view.egress.clone(),
            transparent,
            resources,
        }
    }

    fn built_from(
        &self,
        view: &ProxyView,
        ports: Option<&Arc<Vec<InboundPort>>>,
        policies: &[Arc<AuthorizationPolicy>],
        transparent: &Option<TransparentInputs>,
    ) -> bool {
        self.workload == view.workload
            && self.ports.as_ref() == ports
            && self.policies == policies
            && self.egress == view.egress
            && self.transparent == *transparent
    }
}

/// [`WorkloadResources`] by workload, shared by consecutive snapshots: an entry is
/// checked against its inputs on use and rebuilt when they changed.
type WorkloadCache = Arc<Mutex<HashMap<ObjectKey, Arc<WorkloadResources>>>>;

#[derive(Debug, Default)]
pub struct XdsSnapshot {
    pub mesh: Arc<MeshSnapshot>,
    pub services: HashMap<ServicePortKey, Arc<ServicePortResources>>,
    /// Workloads' own resources: filled on first use, shared with the previous and
    /// next snapshots, reused while their inputs are equal.
    workloads: WorkloadCache,
    /// Transparent proxies' virtual outbound listeners, one per scope.
    outbound: SharedOutbound,
    /// Inbound HTTP routes, one per port and set of policies.
    routes: SharedRoutes,
    /// What this snapshot changed since [`Self::after`]: which proxies it concerns.
    pub touched: Touched,
    /// The version of the snapshot [`Self::touched`] is relative to (`None` for the first).
    pub after: Option<u64>,
}

/// The passthrough, black-hole and inbound passthrough clusters: the same for every
/// transparent proxy, encoded once per process.
static PASSTHROUGH_CLUSTERS: std::sync::LazyLock<Vec<Arc<Resource>>> =
    std::sync::LazyLock::new(|| {
        translate::clusters::passthrough_clusters()
            .iter()
            .map(|c| Resource::encode(c.name.clone(), c))
            .collect()
    });

/// The SPIFFE ids of the pods behind `endpoints`, sorted and unique. Endpoints whose pod
/// is unknown contribute nothing: no identity can be verified for them.
fn endpoint_identities(
    mesh: &MeshSnapshot,
    endpoints: &[Endpoint],
    trust_domain: &str,
) -> Vec<SpiffeId> {
    let mut ids: Vec<SpiffeId> = endpoints
        .iter()
        .filter_map(|e| mesh.workloads.get(e.workload.as_ref()?))
        .filter_map(|w| SpiffeId::new(trust_domain, &w.key.namespace, &w.service_account).ok())
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

impl XdsSnapshot {
    pub fn build(
        mesh: Arc<MeshSnapshot>,
        previous: Option<&XdsSnapshot>,
        trust_domain: &str,
    ) -> XdsSnapshot {
        let mut services = HashMap::with_capacity(mesh.endpoints.len());
        let addresses: HashSet<IpAddr> =
            mesh.workloads.values().filter_map(|w| w.address).collect();
        for svc in mesh.services.values() {
            for port in &svc.ports {
                let key = (svc.key.clone(), port.port);
                let endpoints = mesh.endpoints.get(&key).cloned().unwrap_or_default();
                let identities = endpoint_identities(&mesh, &endpoints, trust_domain);
                let old = previous.and_then(|p| p.services.get(&key));
                let same_service =
                    old.is_some_and(|o| o.service == *svc && o.identities == identities);
                let same_endpoints = old.is_some_and(|o| o.endpoints == endpoints);
                let entry = match old {
                    Some(old) if same_service && same_endpoints => {
                        old.bound_clusters
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .retain(|ip, _| addresses.contains(ip));
                        old.clone()
                    }
                    _ => {
                        // One allocation for the three resources' names.
                        let name: Arc<str> =
                            translate::names::service_cluster_name(svc, port.port).into();
                        let (cluster, direct, route) = match old.filter(|_| same_service) {
                            Some(old) => {
                                (old.cluster.clone(), old.direct.clone(), old.route.clone())
                            }
                            None => (
                                Resource::encode(
                                    name.clone(),
                                    &translate::clusters::service_cluster(svc, port, &identities),
                                ),
                                Resource::encode(
                                    translate::names::direct_cluster_name(svc, port.port),
                                    &translate::clusters::direct_cluster(
                                        svc,
                                        port.port,
                                        &identities,
                                    ),
                                ),
                                port.protocol.is_http().then(|| {
                                    Resource::encode(
                                        name.clone(),
                                        &translate::routes::service_route(svc, port),
                                    )
                                }),
                            ),
                        };
                        let load_assignment = match old.filter(|_| same_endpoints) {
                            Some(old) => old.load_assignment.clone(),
                            None => Resource::encode(
                                name.clone(),
                                &translate::clusters::service_load_assignment(&name, &endpoints),
                            ),
                        };
                        let (listeners, mut bound_clusters) = match old.filter(|_| same_service) {
                            Some(old) => (
                                old.listeners
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .clone(),
                                old.bound_clusters
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .clone(),
                            ),
                            None => (HashMap::new(), HashMap::new()),
                        };
                        bound_clusters.retain(|ip, _| addresses.contains(ip));
                        Arc::new(ServicePortResources {
                            service: svc.clone(),
                            port: port.port,
                            endpoints,
                            identities,
                            cluster,
                            direct,
                            load_assignment,
                            route,
                            listeners: Mutex::new(listeners),
                            bound_clusters: Mutex::new(bound_clusters),
                        })
                    }
                };
                services.insert(key, entry);
            }
        }
        // One cache for all snapshots (entries are checked on use); only workloads
        // that left the mesh are dropped here.
        let workloads = previous.map(|p| p.workloads.clone()).unwrap_or_default();
        workloads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|key, _| mesh.workloads.contains_key(key));
        let outbound = SharedOutbound::after(previous.map(|p| &p.outbound));
        let routes = previous.map(|p| p.routes.clone()).unwrap_or_default();
        routes.prune();
        let touched = match previous {
            Some(p) => Touched::between(p, &mesh, &services),
            None => Touched::everything(),
        };
        XdsSnapshot {
            after: previous.map(|p| p.version()),
            mesh,
            services,
            workloads,
            outbound,
            routes,
            touched,
        }
    }

    /// The own resources of the workload of `view`, reused if nothing they depend on
    /// changed.
    fn workload_resources(&self, view: &ProxyView) -> Arc<WorkloadResources> {
        let key = &view.workload.key;
        let ports = self.mesh.inbound.get(key);
        let policies: Vec<Arc<AuthorizationPolicy>> = self
            .mesh
            .authorization_policies_for(&view.workload)
            .into_iter()
            .cloned()
            .collect();
        let transparent = TransparentInputs::of(&self.mesh, view);
        let cached = |cache: &HashMap<ObjectKey, Arc<WorkloadResources>>| {
            cache
                .get(key)
                .filter(|c| c.built_from(view, ports, &policies, &transparent))
                .cloned()
        };
        let stale = {
            let cache = self.workloads.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(hit) = cached(&cache) {
                return hit;
            }
            cache.get(key).cloned()
        };
        // Built outside the lock, so streams never wait for each other's builds; if two
        // streams of one workload built at once, the first to store wins, and both use
        // it, so they agree on versions.
        let built = Arc::new(WorkloadResources::build(
            view,
            ports,
            policies.clone(),
            transparent.clone(),
            &self.routes,
            stale.as_deref(),
        ));
        let mut cache = self.workloads.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(hit) = cached(&cache) {
            return hit;
        }
        cache.insert(key.clone(), built.clone());
        built
    }

    pub fn version(&self) -> u64 {
        self.mesh.version
    }

    /// The version of `workload`'s inbound listener or route `name` that denies every
    /// request on it, served while its proxy rejects the compiled one
    /// ([`crate::xds::serve::fail_closed`]); `None` if it is no such resource.
    pub fn denying(
        &self,
        workload: &ObjectKey,
        t: ResourceType,
        name: &str,
    ) -> Option<Arc<Resource>> {
        let w = self.mesh.workloads.get(workload)?;
        let address = w.address?;
        if t == ResourceType::Listener && name == translate::names::virtual_inbound_listener_name()
        {
            let view = ProxyView::build(&self.mesh, workload)?;
            let inbound = VirtualInbound {
                address,
                ports: view
                    .inbound
                    .iter()
                    .map(|p| (p.clone(), Default::default()))
                    .collect(),
                other_ports: other_ports(&self.mesh, &view),
                other_rbac: Default::default(),
            };
            return Some(Resource::encode(
                name,
                &translate::listeners::virtual_inbound_listener(&inbound, true),
            ));
        }
        let port = self.mesh.inbound.get(workload)?.iter().find(|p| match t {
            ResourceType::Route => translate::names::inbound_route_name(p.port) == name,
            _ => translate::names::inbound_listener_name(address, p.port) == name,
        })?;
        match t {
            ResourceType::Route if port.protocol.is_http() => Some(Resource::encode(
                name,
                &translate::routes::inbound_route_denied(name),
            )),
            ResourceType::Listener => Some(Resource::encode(
                name,
                &translate::listeners::inbound_listener_denied(address, port),
            )),
            _ => None,
        }
    }

    /// Everything the sidecar of `workload` should have, or `None` if the mesh has no
    /// such workload (yet).
    pub fn proxy_resources(&self, workload: &ObjectKey) -> Option<(ProxyView, ProxyResources)> {
        let mut view = ProxyView::build(&self.mesh, workload)?;
        let mut out = ProxyResources::default();
        if view.workload.address.is_none() && !view.inbound.is_empty() {
            view.problems
                .push("the pod has no IP (status.podIP): no inbound listeners".to_string());
        }
        let own = self.workload_resources(&view);
        for (t, r) in &own.resources {
            out.insert(*t, r.clone());
        }
        for out_port in &view.outbound {
            let key = (out_port.service.key.clone(), out_port.port.port);
            let Some(shared) = self.services.get(&key) else {
                continue;
            };
            out.insert(
                ResourceType::Cluster,
                shared.cluster_for(view.workload.address),
            );
            out.insert(ResourceType::Endpoint, shared.load_assignment.clone());
            if let Some(route) = &shared.route {
                out.insert(ResourceType::Route, route.clone());
            }
            out.insert(ResourceType::Listener, shared.outbound_listener(out_port));
        }
        if let Some(t) = &view.transparent {
            let t = self.outbound.get(&self.mesh, t);
            out.insert(ResourceType::Listener, t.listener.clone());
            for key in &t.vip_services {
                let Some(shared) = self.services.get(key) else {
                    continue;
                };
                // Unbound: in a pod of its own the kernel picks the pod IP anyway.
                out.insert(ResourceType::Cluster, shared.cluster.clone());
                out.insert(ResourceType::Endpoint, shared.load_assignment.clone());
                if let Some(route) = &shared.route {
                    out.insert(ResourceType::Route, route.clone());
                }
            }
            for key in &t.direct_services {
                if let Some(shared) = self.services.get(key) {
                    out.insert(ResourceType::Cluster, shared.direct.clone());
                }
            }
        }
        if let Some(egress) = &view.egress {
            for (svc, port) in &egress.services {
                let Some(shared) = self.services.get(&(svc.key.clone(), port.port)) else {
                    continue;
                };
                out.insert(
                    ResourceType::Cluster,
                    shared.cluster_for(view.workload.address),
                );
                out.insert(ResourceType::Endpoint, shared.load_assignment.clone());
            }
        }
        Some((view, out))
    }
}

/// Follows the mesh snapshots and publishes the matching xDS snapshots.
pub fn spawn_translator(
    mut mesh: watch::Receiver<Arc<MeshSnapshot>>,
    trust_domain: String,
) -> watch::Receiver<Arc<XdsSnapshot>> {
    let first = Arc::new(XdsSnapshot::build(
        mesh.borrow_and_update().clone(),
        None,
        &trust_domain,
    ));
    let (tx, rx) = watch::channel(first);
    tokio::spawn(async move {
        while mesh.changed().await.is_ok() {
            let snap = mesh.borrow_and_update().clone();
            let previous = tx.borrow().clone();
            let next = XdsSnapshot::build(snap, Some(&previous), &trust_domain);
            if tx.send(Arc::new(next)).is_err() {
                break;
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::authorization::{
        Action, AuthorizationPolicy, Operation, Rule, Source, StringMatch,
    };
    use crate::model::{
        ContainerPort, MeshDefaults, MeshObject, Protocol, ServicePort, TargetPort, Workload,
    };

    fn mesh(policies: Vec<AuthorizationPolicy>) -> Arc<MeshSnapshot> {
        let web = Workload {
            scope: None,
            capture: Default::default(),
            key: ObjectKey::new("shop", "web-1"),
            uid: None,
            labels: [("app".to_string(), "web".to_string())].into(),
            service_account: "web".into(),
            address: Some("10.0.0.1".parse().unwrap()),
            ready: true,
            container_ports: vec![ContainerPort {
                name: None,
                port: 8080,
            }],
            app_ports: Default::default(),
            upstreams: vec![],
            egress: None,
        };
        let svc = Service {
            key: ObjectKey::new("shop", "web"),
            cluster_ip: None,
            ports: vec![ServicePort {
                name: None,
                port: 80,
                target_port: TargetPort::Number(8080),
                protocol: Protocol::Http,
            }],
            selector: Some([("app".to_string(), "web".to_string())].into()),
        };
        let mut objects = vec![
            MeshObject::Workload(Arc::new(web)),
            MeshObject::Service(Arc::new(svc)),
        ];
        objects.extend(
            policies
                .into_iter()
                .map(|p| MeshObject::AuthorizationPolicy(Arc::new(p))),
        );
        Arc::new(MeshSnapshot::build(1, MeshDefaults::default(), objects))
    }

    fn policy(name: &str, action: Action, rule: Rule) -> AuthorizationPolicy {
        AuthorizationPolicy {
            key: ObjectKey::new("shop", name),
            selector: None,
            action,
            rules: vec![rule],
        }
    }

    /// The counterexample of a stage-by-stage swap: old = ALLOW only ns edge, new =
    /// DENY /x and no ALLOW. Both deny shop → /x, but the old DENY stage (empty) with
    /// the new ALLOW stage (none) allows it. So the whole change must reach Envoy as
    /// one resource, which Envoy swaps as one: the port's inbound route.
    #[test]
    fn a_policy_change_on_an_http_port_is_one_route_swap() {
        let old = mesh(vec![policy(
            "edge-only",
            Action::Allow,
            Rule {
                from: vec![Source {
                    namespaces: vec![StringMatch::Exact("edge".into())],
                    ..Default::default()
                }],
                ..Default::default()
            },
        )]);
        let new = mesh(vec![policy(
            "no-x",
            Action::Deny,
            Rule {
                to: vec![Operation {
                    paths: vec![StringMatch::Exact("/x".into())],
                    ..Default::default()
                }],
                ..Default::default()
            },
        )]);
        let web = ObjectKey::new("shop", "web-1");
        let resources = |m: Arc<MeshSnapshot>| {
            XdsSnapshot::build(m, None, "cluster.local")
                .proxy_resources(&web)
                .expect("web is in the mesh")
                .1
        };
        let (old, new) = (resources(old), resources(new));
        let changed: Vec<(ResourceType, &str)> = ResourceType::PUSH_ORDER
            .into_iter()
            .filter(|t| *t != ResourceType::Secret)
            .flat_map(|t| {
                let (o, n) = (old.get(t), new.get(t));
                assert_eq!(o.keys().collect::<Vec<_>>(), n.keys().collect::<Vec<_>>());
                o.iter()
                    .filter(|(name, r)| n[*name].version != r.version)
                    .map(move |(name, _)| (t, &**name))
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(changed, [(ResourceType::Route, "inbound|8080")]);
    }

    /// Each caller's cluster connects from its own pod IP (a pod without one gets the
    /// unbound cluster); a caller's streams share one encoding; it goes with the pod.
    #[test]
    fn a_callers_cluster_is_bound_to_its_pod_ip() {
        use envoy_types::pb::envoy::config::cluster::v3::Cluster;
        use prost::Message;
        let web = mesh(vec![]);
        let caller = |name: &str, ip: Option<&str>| {
            MeshObject::Workload(Arc::new(Workload {
                scope: None,
                capture: Default::default(),
                key: ObjectKey::new("shop", name),
                uid: None,
                labels: Default::default(),
                service_account: "client".into(),
                address: ip.map(|ip| ip.parse().unwrap()),
                ready: true,
                container_ports: vec![],
                app_ports: Default::default(),
                upstreams: vec![crate::model::Upstream {
                    service: ObjectKey::new("shop", "web"),
                    port: 80,
                    local_port: 15001,
                }],
                egress: None,
            }))
        };
        let with = |callers: Vec<MeshObject>| {
            let mut objects: Vec<MeshObject> = web
                .workloads
                .values()
                .cloned()
                .map(MeshObject::Workload)
                .collect();
            objects.extend(web.services.values().cloned().map(MeshObject::Service));
            objects.extend(callers);
            Arc::new(MeshSnapshot::build(2, MeshDefaults::default(), objects))
        };
        let name = "outbound|80||web.shop.svc.cluster.local";
        let source = |snap: &XdsSnapshot, pod: &str| {
            let (_, resources) = snap.proxy_resources(&ObjectKey::new("shop", pod)).unwrap();
            let r = resources.get(ResourceType::Cluster)[name].clone();
            let cluster = Cluster::decode(&r.body.value[..]).unwrap();
            let bound = cluster
                .upstream_bind_config
                .and_then(|b| b.source_address)
                .map(|a| a.address);
            (r, bound)
        };
        let first = XdsSnapshot::build(
            with(vec![
                caller("a-1", Some("10.0.0.2")),
                caller("b-1", Some("10.0.0.3")),
                caller("c-1", None),
            ]),
            None,
            "cluster.local",
        );
        let (a, a_source) = source(&first, "a-1");
        assert_eq!(a_source.as_deref(), Some("10.0.0.2"));
        assert_eq!(source(&first, "b-1").1.as_deref(), Some("10.0.0.3"));
        assert_eq!(source(&first, "c-1").1, None);
        assert!(
            Arc::ptr_eq(&a, &source(&first, "a-1").0),
            "encoded once per pod IP"
        );

        let key = (ObjectKey::new("shop", "web"), 80);
        let bound = |snap: &XdsSnapshot| {
            let entry = &snap.services[&key];
            let mut ips: Vec<IpAddr> = entry
                .bound_clusters
                .lock()
                .unwrap()
                .keys()
                .copied()
                .collect();
            ips.sort();
            ips
        };
        let next = XdsSnapshot::build(
            with(vec![caller("a-1", Some("10.0.0.2"))]),
            Some(&first),
            "cluster.local",
        );
        assert_eq!(
            bound(&next),
            ["10.0.0.2".parse::<IpAddr>().unwrap()],
            "b-1 left"
        );
        assert!(Arc::ptr_eq(&a, &source(&next, "a-1").0));
    }

    /// A snapshot that does not touch a workload hands its proxy the very same inbound
    /// resources (no re-encoding, no new version); one that changes its policies does not.
    #[test]
    fn inbound_resources_are_reused_until_their_inputs_change() {
        let web = ObjectKey::new("shop", "web-1");
        let route = |snap: &XdsSnapshot| {
            snap.proxy_resources(&web)
                .expect("web")
                .1
                .get(ResourceType::Route)["inbound|8080"]
                .clone()
        };
        let first = XdsSnapshot::build(mesh(vec![]), None, "cluster.local");
        let served = route(&first);
        // Every snapshot is a new MeshSnapshot, here with equal content.
        let same = XdsSnapshot::build(mesh(vec![]), Some(&first), "cluster.local");
        assert!(Arc::ptr_eq(&served, &route(&same)));
        let deny = policy("no-x", Action::Deny, Rule::default());
        let changed = XdsSnapshot::build(mesh(vec![deny]), Some(&same), "cluster.local");
        assert_ne!(served.version, route(&changed).version);
        // Only the route carries the policy: the cluster and HTTP listener are kept.
        let own = |snap: &XdsSnapshot, t: ResourceType, name: &str| {
            snap.proxy_resources(&web).expect("web").1.get(t)[name].clone()
        };
        for (t, name) in [
            (ResourceType::Cluster, "inbound|8080||"),
            (ResourceType::Listener, "inbound|10.0.0.1:8080"),
        ] {
            assert!(
                Arc::ptr_eq(&own(&same, t, name), &own(&changed, t, name)),
                "{name}"
            );
        }
    }

    /// Pods the same policies select share one encoded inbound route per port, and a
    /// policy change encodes it once for all of them.
    #[test]
    fn pods_with_the_same_policies_share_one_inbound_route() {
        let with = |policies: Vec<AuthorizationPolicy>| {
            let one = mesh(policies);
            let mut second = (*one.workloads[&ObjectKey::new("shop", "web-1")]).clone();
            second.key = ObjectKey::new("shop", "web-2");
            second.address = Some("10.0.0.2".parse().unwrap());
            let mut objects: Vec<MeshObject> = one
                .workloads
                .values()
                .cloned()
                .map(MeshObject::Workload)
                .collect();
            objects.push(MeshObject::Workload(Arc::new(second)));
            objects.extend(one.services.values().cloned().map(MeshObject::Service));
            objects.extend(
                one.authorization_policies
                    .values()
                    .cloned()
                    .map(MeshObject::AuthorizationPolicy),
            );
            Arc::new(MeshSnapshot::build(1, MeshDefaults::default(), objects))
        };
        let route = |x: &XdsSnapshot, pod: &str| {
            x.proxy_resources(&ObjectKey::new("shop", pod))
                .expect("pod")
                .1
                .get(ResourceType::Route)["inbound|8080"]
                .clone()
        };
        let first = XdsSnapshot::build(with(vec![]), None, "cluster.local");
        let open = route(&first, "web-1");
        assert!(Arc::ptr_eq(&open, &route(&first, "web-2")));
        let deny = policy("no-x", Action::Deny, Rule::default());
        let second = XdsSnapshot::build(with(vec![deny]), Some(&first), "cluster.local");
        let denying = route(&second, "web-1");
        assert!(Arc::ptr_eq(&denying, &route(&second, "web-2")));
        assert_ne!(denying.version, open.version);
        drop(open);
        // The old route is held only by the workload cache's stale entries until they
        // are rebuilt; once nothing holds it, the next snapshot drops it.
        let third = XdsSnapshot::build(
            with(vec![policy("no-x", Action::Deny, Rule::default())]),
            Some(&second),
            "cluster.local",
        );
        assert_eq!(third.routes.0.lock().unwrap().len(), 1);
    }

    /// A transparent pod gets the two virtual listeners and no explicit ones; pods of
    /// one scope share one encoded outbound listener, which an endpoint change in scope
    /// re-encodes once and a change elsewhere leaves alone.
    #[test]
    fn transparent_pods_share_the_outbound_listener_of_their_scope() {
        let workload = |name: &str, ns: &str, app: &str, ip: &str| {
            MeshObject::Workload(Arc::new(Workload {
                scope: None,
                capture: crate::model::Capture::Transparent,
                key: ObjectKey::new(ns, name),
                uid: None,
                labels: [("app".to_string(), app.to_string())].into(),
                service_account: app.into(),
                address: Some(ip.parse().unwrap()),
                ready: true,
                container_ports: vec![ContainerPort {
                    name: None,
                    port: 8080,
                }],
                app_ports: Default::default(),
                upstreams: vec![],
                egress: None,
            }))
        };
        let service = |ns: &str, app: &str, vip: &str| {
            MeshObject::Service(Arc::new(Service {
                key: ObjectKey::new(ns, app),
                cluster_ip: Some(vip.parse().unwrap()),
                ports: vec![ServicePort {
                    name: None,
                    port: 80,
                    target_port: TargetPort::Number(8080),
                    protocol: Protocol::Http,
                }],
                selector: Some([("app".to_string(), app.to_string())].into()),
            }))
        };
        // client-2 also declares shop/web, which its scope (its namespace) covers
        // anyway: the same view, the same listener.
        let client_2 = match workload("client-2", "shop", "client", "10.0.0.3") {
            MeshObject::Workload(mut w) => {
                Arc::make_mut(&mut w).upstreams = vec![crate::model::Upstream {
                    service: ObjectKey::new("shop", "web"),
                    port: 80,
                    local_port: 15001,
                }];
                MeshObject::Workload(w)
            }
            _ => unreachable!(),
        };
        let objects = |extra: Vec<MeshObject>| {
            let mut o = vec![
                workload("web-1", "shop", "web", "10.0.0.1"),
                workload("client-1", "shop", "client", "10.0.0.2"),
                client_2.clone(),
                service("shop", "web", "10.96.0.10"),
                workload("api-1", "edge", "api", "10.0.1.1"),
                service("edge", "api", "10.96.1.10"),
            ];
            o.extend(extra);
            Arc::new(MeshSnapshot::build(1, MeshDefaults::default(), o))
        };
        let first = XdsSnapshot::build(objects(vec![]), None, "cluster.local");
        let listeners = |x: &XdsSnapshot, pod: &str| {
            let (_, r) = x.proxy_resources(&ObjectKey::new("shop", pod)).unwrap();
            r.get(ResourceType::Listener).clone()
        };
        let client = listeners(&first, "client-1");
        let names: Vec<&str> = client.keys().map(|k| &**k).collect();
        assert_eq!(names, ["inbound|0.0.0.0:15006", "outbound|0.0.0.0:15001"]);
        let outbound =
            |l: &crate::xds::translate::resources::ResourceSet| l["outbound|0.0.0.0:15001"].clone();
        assert!(Arc::ptr_eq(
            &outbound(&client),
            &outbound(&listeners(&first, "client-2"))
        ));
        // Scope = own namespace: shop/web's VIP and endpoint, not edge/api.
        let (_, r) = first
            .proxy_resources(&ObjectKey::new("shop", "client-1"))
            .unwrap();
        let clusters: Vec<&str> = r.get(ResourceType::Cluster).keys().map(|k| &**k).collect();
        assert!(
            clusters.contains(&"outbound|80||web.shop.svc.cluster.local"),
            "{clusters:?}"
        );
        assert!(
            clusters.contains(&"direct|80||web.shop.svc.cluster.local"),
            "{clusters:?}"
        );
        assert!(
            !clusters.iter().any(|c| c.contains("api.edge")),
            "{clusters:?}"
        );

        // Another api pod (out of scope): the same listener, not even re-encoded.
        let second = XdsSnapshot::build(
            objects(vec![workload("api-2", "edge", "api", "10.0.1.2")]),
            Some(&first),
            "cluster.local",
        );
        assert!(Arc::ptr_eq(
            &outbound(&client),
            &outbound(&listeners(&second, "client-1"))
        ));
        // Another web pod (in scope): a new endpoint chain address.
        let third = XdsSnapshot::build(
            objects(vec![workload("web-2", "shop", "web", "10.0.0.4")]),
            Some(&second),
            "cluster.local",
        );
        let changed = outbound(&listeners(&third, "client-1"));
        assert_ne!(changed.version, outbound(&client).version);
        assert!(Arc::ptr_eq(
            &changed,
            &outbound(&listeners(&third, "client-2"))
        ));
    }
}
