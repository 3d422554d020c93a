//! What a snapshot changed, and what one proxy's config depends on: so that a change
//! reaches exactly the streams it concerns and every other stream does no work at all.
//!
//! A proxy's resources ([`XdsSnapshot::proxy_resources`]) are made of
//! - its workload's own resources, built from the workload, its inbound ports and the
//!   AuthorizationPolicies that select it (and, mesh-wide, from PeerAuthentications
//!   and meshd's defaults);
//! - the shared resources of the service ports it reaches: of the upstreams it declares
//!   (by service, also one that does not exist yet: when it appears, the proxy's config
//!   changes) and of the services its scope covers (an egress port's or transparent
//!   capture's: a namespace, one service, or `*`).
//!
//! [`Touched`] is the difference of two consecutive snapshots in exactly those terms, and
//! [`Interest`] one proxy's dependencies; both speak in [`Key`]s, so the serving side can
//! index streams by key and wake only those whose keys a snapshot touched. A proxy is
//! concerned by a snapshot iff one of its keys is touched (or the snapshot touched
//! everything). The property test below checks the one direction that matters for
//! correctness — a proxy that is not concerned has an equal config in both snapshots —
//! against real recomputation over random changes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::Hash;
use std::sync::Arc;

use super::cache::{ServicePortResources, XdsSnapshot};
use crate::model::snapshot::ServicePortKey;
use crate::model::{MeshSnapshot, ObjectKey, ProxyView, ScopeEntry};

/// One thing a proxy's config can depend on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    /// A workload's own resources (its inbound side, egress listener, bound clusters).
    Workload(ObjectKey),
    /// A service: its existence, its ports, and every port's shared resources.
    Service(ObjectKey),
    /// Every service of a namespace (a scope entry `ns`).
    Namespace(String),
    /// Every service of the mesh (a scope entry `*`).
    AnyService,
}

/// What one snapshot changed relative to the one before it.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Touched {
    /// Mesh-wide inputs changed (meshd's defaults, a PeerAuthentication), or there is
    /// no previous snapshot: every proxy is concerned.
    pub everything: bool,
    pub workloads: HashSet<ObjectKey>,
    pub services: HashSet<ObjectKey>,
}

impl Touched {
    pub fn everything() -> Touched {
        Touched {
            everything: true,
            ..Default::default()
        }
    }

    /// Whether this snapshot changed what `key` stands for.
    pub fn contains(&self, key: &Key) -> bool {
        self.everything
            || match key {
                Key::Workload(w) => self.workloads.contains(w),
                Key::Service(s) => self.services.contains(s),
                Key::Namespace(ns) => self.services.iter().any(|s| s.namespace == *ns),
                Key::AnyService => !self.services.is_empty(),
            }
    }

    /// Every key this snapshot touched (without [`Self::everything`], which is not a key).
    pub fn keys(&self) -> impl Iterator<Item = Key> + '_ {
        let workloads = self.workloads.iter().cloned().map(Key::Workload);
        let services = self.services.iter().cloned().map(Key::Service);
        let namespaces: HashSet<&str> = self.services.iter().map(|s| &*s.namespace).collect();
        let namespaces = namespaces
            .into_iter()
            .map(|ns| Key::Namespace(ns.to_string()));
        let any = (!self.services.is_empty()).then_some(Key::AnyService);
        workloads.chain(services).chain(namespaces).chain(any)
    }

    /// What `new` (mesh snapshot `mesh`, shared service resources `services`) changed
    /// relative to `old`.
    pub fn between(
        old: &XdsSnapshot,
        mesh: &MeshSnapshot,
        services: &HashMap<ServicePortKey, Arc<ServicePortResources>>,
    ) -> Touched {
        let before = &*old.mesh;
        if before.defaults != mesh.defaults
            || !differing(&before.peer_authentications, &mesh.peer_authentications).is_empty()
        {
            return Touched::everything();
        }
        let mut t = Touched::default();
        t.workloads.extend(
            differing(&before.workloads, &mesh.workloads)
                .into_iter()
                .cloned(),
        );
        t.workloads.extend(
            differing(&before.inbound, &mesh.inbound)
                .into_iter()
                .cloned(),
        );
        // A policy concerns the workloads it selects, before and after.
        let root = mesh.defaults.root_namespace.as_str();
        for key in differing(&before.authorization_policies, &mesh.authorization_policies) {
            let versions = [
                before.authorization_policies.get(key),
                mesh.authorization_policies.get(key),
            ];
            for snap in [before, mesh] {
                let selected = snap
                    .workloads
                    .values()
                    .filter(|w| versions.iter().flatten().any(|p| p.applies_to(w, root)));
                t.workloads.extend(selected.map(|w| w.key.clone()));
            }
        }
        t.services.extend(
            differing(&before.services, &mesh.services)
                .into_iter()
                .cloned(),
        );
        for (key, _) in old
            .services
            .iter()
            .filter(|(k, v)| services.get(*k).is_none_or(|n| !Arc::ptr_eq(n, v)))
            .chain(
                services
                    .iter()
                    .filter(|(k, _)| !old.services.contains_key(*k)),
            )
        {
            t.services.insert(key.0.clone());
        }
        t
    }
}

/// A map both snapshots have, by key.
trait Lookup<K, V> {
    fn lookup(&self, key: &K) -> Option<&Arc<V>>;
}

impl<K: Ord, V> Lookup<K, V> for BTreeMap<K, Arc<V>> {
    fn lookup(&self, key: &K) -> Option<&Arc<V>> {
        self.get(key)
    }
}

impl<K: Eq + Hash, V> Lookup<K, V> for HashMap<K, Arc<V>> {
    fn lookup(&self, key: &K) -> Option<&Arc<V>> {
        self.get(key)
    }
}

/// The keys whose values differ between `a` and `b`: present in only one, or unequal
/// (the same `Arc` is equal without a look inside).
fn differing<'a, K: 'a, V: PartialEq + 'a, M>(a: &'a M, b: &'a M) -> Vec<&'a K>
where
    M: Lookup<K, V>,
    &'a M: IntoIterator<Item = (&'a K, &'a Arc<V>)>,
{
    let mut out = Vec::new();
    for (k, v) in a {
        if b.lookup(k).is_none_or(|n| !Arc::ptr_eq(n, v) && **n != **v) {
            out.push(k);
        }
    }
    for (k, _) in b {
        if a.lookup(k).is_none() {
            out.push(k);
        }
    }
    out
}

/// What one proxy's config depends on (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interest {
    pub workload: ObjectKey,
    /// The services of its declared upstreams, sorted, whether they exist or not.
    pub services: Vec<ObjectKey>,
    /// Its egress port's or transparent capture's scope.
    pub scope: Vec<ScopeEntry>,
}

impl Interest {
    /// The interest of a proxy whose pod is not in the mesh (yet): only the pod.
    pub fn of_absent(workload: &ObjectKey) -> Interest {
        Interest {
            workload: workload.clone(),
            services: Vec::new(),
            scope: Vec::new(),
        }
    }

    /// The interest of the proxy with `view`.
    pub fn of(view: &ProxyView) -> Interest {
        let mut services: Vec<ObjectKey> = view
            .workload
            .upstreams
            .iter()
            .map(|u| u.service.clone())
            .collect();
        services.sort();
        services.dedup();
        let scope = match (&view.egress, &view.transparent) {
            (_, Some(t)) => t.scope.clone(),
            (Some(e), None) => e.scope.clone(),
            (None, None) => Vec::new(),
        };
        Interest {
            workload: view.workload.key.clone(),
            services,
            scope,
        }
    }

    pub fn keys(&self) -> impl Iterator<Item = Key> + '_ {
        let own = std::iter::once(Key::Workload(self.workload.clone()));
        let services = self.services.iter().cloned().map(Key::Service);
        let scope = self.scope.iter().map(|entry| match entry {
            ScopeEntry::All => Key::AnyService,
            ScopeEntry::Namespace(ns) => Key::Namespace(ns.clone()),
            ScopeEntry::Service(s) => Key::Service(s.clone()),
        });
        own.chain(services).chain(scope)
    }

    /// Whether `touched` may have changed this proxy's config.
    pub fn concerned(&self, touched: &Touched) -> bool {
        touched.everything || self.keys().any(|k| touched.contains(&k))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::authorization::{Action, AuthorizationPolicy, Rule};
    use crate::model::{
        Capture, ContainerPort, Egress, MeshDefaults, MeshObject, ObjectKind, PeerAuthentication,
        Protocol, Service, ServicePort, TargetPort, Upstream, Workload,
    };
    use crate::xds::translate::resources::ResourceType;

    type Objects = BTreeMap<(ObjectKind, ObjectKey), MeshObject>;

    /// A small xorshift: the same sequence every run, so a failure can be replayed.
    struct Rand(u64);
    impl Rand {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    const NAMESPACES: [&str; 3] = ["a", "b", "meshd-system"];

    fn service(r: &mut Rand) -> MeshObject {
        let ns = NAMESPACES[r.below(2) as usize];
        let app = r.below(5);
        let protocol = if r.below(3) == 0 {
            Protocol::Tcp
        } else {
            Protocol::Http
        };
        let mut ports = vec![ServicePort {
            name: None,
            port: 80,
            target_port: TargetPort::Number(8080),
            protocol,
        }];
        if r.below(3) == 0 {
            ports.push(ServicePort {
                name: Some("admin".into()),
                port: 9000,
                target_port: TargetPort::Number(9000),
                protocol: Protocol::Http,
            });
        }
        MeshObject::Service(Arc::new(Service {
            key: ObjectKey::new(ns, format!("s{app}")),
            cluster_ip: (r.below(2) == 0).then(|| format!("10.96.0.{}", app + 1).parse().unwrap()),
            ports,
            selector: Some([("app".to_string(), format!("s{app}"))].into()),
        }))
    }

    fn scope(r: &mut Rand) -> Option<Vec<ScopeEntry>> {
        match r.below(4) {
            0 => None,
            1 => Some(vec![ScopeEntry::All]),
            2 => Some(vec![ScopeEntry::Namespace(
                NAMESPACES[r.below(2) as usize].into(),
            )]),
            _ => Some(vec![ScopeEntry::Service(ObjectKey::new(
                NAMESPACES[r.below(2) as usize],
                format!("s{}", r.below(5)),
            ))]),
        }
    }

    fn pod(r: &mut Rand) -> MeshObject {
        let i = r.below(24);
        let ns = NAMESPACES[(i % 2) as usize];
        let upstreams = (0..r.below(3))
            .map(|k| Upstream {
                service: ObjectKey::new(
                    NAMESPACES[r.below(2) as usize],
                    format!("s{}", r.below(6)),
                ),
                port: if r.below(4) == 0 { 9000 } else { 80 },
                local_port: 15100 + k as u16,
            })
            .collect();
        MeshObject::Workload(Arc::new(Workload {
            scope: scope(r),
            capture: if r.below(3) == 0 {
                Capture::Transparent
            } else {
                Capture::Explicit
            },
            key: ObjectKey::new(ns, format!("p{i}")),
            uid: None,
            labels: [
                ("app".to_string(), format!("s{}", r.below(5))),
                ("tier".to_string(), format!("t{}", r.below(2))),
            ]
            .into(),
            service_account: format!("sa{}", r.below(3)),
            address: (r.below(6) != 0).then(|| {
                format!("10.0.{}.{}", i % 2, i + 1 + 100 * r.below(2))
                    .parse()
                    .unwrap()
            }),
            ready: r.below(4) != 0,
            container_ports: vec![ContainerPort {
                name: None,
                port: 8080,
            }],
            app_ports: Default::default(),
            upstreams,
            egress: (r.below(2) == 0).then_some(Egress { port: 15080 }),
        }))
    }

    fn policy(r: &mut Rand) -> MeshObject {
        let ns = NAMESPACES[r.below(3) as usize];
        MeshObject::AuthorizationPolicy(Arc::new(AuthorizationPolicy {
            key: ObjectKey::new(ns, format!("ap{}", r.below(3))),
            selector: (r.below(2) == 0)
                .then(|| [("app".to_string(), format!("s{}", r.below(5)))].into()),
            action: if r.below(2) == 0 {
                Action::Allow
            } else {
                Action::Deny
            },
            rules: vec![Rule::default(); 1 + r.below(2) as usize],
        }))
    }

    fn peer_authentication(r: &mut Rand) -> MeshObject {
        MeshObject::PeerAuthentication(Arc::new(PeerAuthentication {
            key: ObjectKey::new(NAMESPACES[r.below(3) as usize], "default"),
            selector: None,
            mode: Some(match r.below(3) {
                0 => crate::model::MtlsMode::Strict,
                1 => crate::model::MtlsMode::Permissive,
                _ => crate::model::MtlsMode::Disable,
            }),
            port_modes: Default::default(),
        }))
    }

    fn change(r: &mut Rand, objects: &mut Objects) {
        let o = match r.below(20) {
            0..=7 => pod(r),
            8..=11 => service(r),
            12..=14 => policy(r),
            15 => peer_authentication(r),
            _ => {
                // A deletion of whatever is there.
                let n = objects.len() as u64;
                if n > 0 {
                    let key = objects.keys().nth(r.below(n) as usize).unwrap().clone();
                    objects.remove(&key);
                }
                return;
            }
        };
        objects.insert((o.kind(), o.key()), o);
    }

    fn defaults() -> MeshDefaults {
        MeshDefaults {
            root_namespace: "meshd-system".into(),
            ..Default::default()
        }
    }

    /// A proxy's problems, and every resource's name and version by type.
    type Config = (Vec<String>, Vec<Vec<(String, String)>>);

    /// What the proxy would be sent, and the problems it is told of.
    fn config(x: &XdsSnapshot, pod: &ObjectKey) -> Option<Config> {
        let (view, resources) = x.proxy_resources(pod)?;
        let sets = ResourceType::PUSH_ORDER
            .into_iter()
            .map(|t| {
                resources
                    .get(t)
                    .values()
                    .map(|r| (r.name.to_string(), r.version.to_string()))
                    .collect()
            })
            .collect();
        Some((view.problems, sets))
    }

    fn interest(x: &XdsSnapshot, pod: &ObjectKey) -> Interest {
        match x.proxy_resources(pod) {
            Some((view, _)) => Interest::of(&view),
            None => Interest::of_absent(pod),
        }
    }

    /// Random meshes, random changes: a proxy the change does not concern has exactly
    /// the config it had (names, versions, problems), and changes that concern some
    /// proxies leave others alone (else the test would pass by waking everyone).
    #[test]
    fn an_unconcerned_proxy_has_an_equal_config() {
        let mut r = Rand(0x2545f4914f6cdd1d);
        let mut objects = Objects::new();
        for _ in 0..60 {
            change(&mut r, &mut objects);
        }
        let mut previous = XdsSnapshot::build(
            Arc::new(MeshSnapshot::build(
                1,
                defaults(),
                objects.values().cloned(),
            )),
            None,
            "cluster.local",
        );
        let pods: Vec<ObjectKey> = (0..24)
            .map(|i| ObjectKey::new(NAMESPACES[i % 2], format!("p{i}")))
            .collect();
        let (mut spared, mut woken) = (0, 0);
        for step in 2..600u64 {
            for _ in 0..=r.below(2) {
                change(&mut r, &mut objects);
            }
            let mesh = Arc::new(MeshSnapshot::build(
                step,
                defaults(),
                objects.values().cloned(),
            ));
            let next = XdsSnapshot::build(mesh, Some(&previous), "cluster.local");
            for pod in &pods {
                let before = interest(&previous, pod);
                if before.concerned(&next.touched) {
                    woken += 1;
                    continue;
                }
                spared += 1;
                assert_eq!(
                    config(&previous, pod),
                    config(&next, pod),
                    "step {step}: {pod} was not concerned by {:?} ({before:?})",
                    next.touched
                );
            }
            previous = next;
        }
        assert!(spared > woken / 4, "spared {spared}, woken {woken}");
    }

    /// One endpoint change: the callers of that service are concerned, nobody else.
    #[test]
    fn an_endpoint_change_concerns_its_callers_only() {
        let caller = |name: &str, upstream: Option<&str>| {
            MeshObject::Workload(Arc::new(Workload {
                scope: None,
                capture: Capture::Explicit,
                key: ObjectKey::new("a", name),
                uid: None,
                labels: [("app".to_string(), name.to_string())].into(),
                service_account: name.into(),
                address: Some(format!("10.0.0.{}", name.len() + 10).parse().unwrap()),
                ready: true,
                container_ports: vec![],
                app_ports: Default::default(),
                upstreams: upstream
                    .map(|s| Upstream {
                        service: ObjectKey::new("a", s),
                        port: 80,
                        local_port: 15100,
                    })
                    .into_iter()
                    .collect(),
                egress: None,
            }))
        };
        let backend = |i: u8, app: &str| {
            MeshObject::Workload(Arc::new(Workload {
                scope: None,
                capture: Capture::Explicit,
                key: ObjectKey::new("a", format!("{app}-{i}")),
                uid: None,
                labels: [("app".to_string(), app.to_string())].into(),
                service_account: app.into(),
                address: Some(format!("10.0.1.{i}").parse().unwrap()),
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
        let svc = |app: &str| {
            MeshObject::Service(Arc::new(Service {
                key: ObjectKey::new("a", app),
                cluster_ip: None,
                ports: vec![ServicePort {
                    name: None,
                    port: 80,
                    target_port: TargetPort::Number(8080),
                    protocol: Protocol::Http,
                }],
                selector: Some([("app".to_string(), app.to_string())].into()),
            }))
        };
        let objects = |extra: Vec<MeshObject>| {
            let mut o = vec![
                caller("web", Some("api")),
                caller("webb", Some("api")),
                caller("batch", Some("db")),
                backend(1, "api"),
                backend(2, "db"),
                svc("api"),
                svc("db"),
            ];
            o.extend(extra);
            Arc::new(MeshSnapshot::build(1, defaults(), o))
        };
        let first = XdsSnapshot::build(objects(vec![]), None, "cluster.local");
        assert!(first.touched.everything);
        let second = XdsSnapshot::build(
            objects(vec![backend(3, "api")]),
            Some(&first),
            "cluster.local",
        );
        let concerned: Vec<&str> = ["web", "webb", "batch", "api-1", "db-2"]
            .into_iter()
            .filter(|p| interest(&first, &ObjectKey::new("a", *p)).concerned(&second.touched))
            .collect();
        assert_eq!(concerned, ["web", "webb"], "{:?}", second.touched);
        // The new pod itself is touched too (it has no stream in this test).
        assert!(
            second
                .touched
                .workloads
                .contains(&ObjectKey::new("a", "api-3"))
        );
    }
}
