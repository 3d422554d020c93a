//! Nothing meshd can produce may be NACKed: random meshes ([`mesh_gen`]) go through
//! the file source's parser, the snapshot and meshd's real translation, and a real
//! Envoy (`envoy --mode validate`, [`validate`]) checks every proxy's whole config —
//! listeners, routes with their RBAC, clusters, endpoints, secrets — and, once per
//! mesh, the deny-all versions a proxy gets after rejecting its inbound routes or
//! listeners (`meshd::xds::serve::fail_closed`).
//!
//! The suite runs [`SUITE_CASES`] meshes; `MESHD_VALIDATE_CASES` runs more, e.g.
//! `MESHD_VALIDATE_CASES=2000 cargo test -p meshd-integration --test envoy_validate`.
//! A failure prints the mesh, shrunk by proptest to the smallest one Envoy refuses.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use meshd::model::authorization::{Action, AuthorizationPolicy, StringMatch};
use meshd::model::{MeshObject, MeshSnapshot, MtlsMode, ObjectKey};
use meshd::xds::serve::fail_closed;
use meshd::xds::translate;
use meshd::xds::translate::cache::XdsSnapshot;
use meshd::xds::translate::resources::{ProxyResources, Resource, ResourceType};
use meshd_integration::mesh_gen::{self, GenMesh};
use meshd_integration::validate::{bootstrap, envoy_validate};
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};

const SUITE_CASES: u32 = 160;

/// [`SUITE_CASES`] meshes from a fixed seed (the same meshes every run, so the coverage
/// check below cannot depend on luck), or `MESHD_VALIDATE_CASES` meshes from a fresh seed
/// for a longer, exploring run.
#[test]
fn envoy_accepts_every_config_meshd_translates() {
    match std::env::var("MESHD_VALIDATE_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
    {
        Some(cases) => run(
            cases,
            TestRng::from_seed(RngAlgorithm::ChaCha, &rand_seed()),
        ),
        None => run(
            SUITE_CASES,
            TestRng::deterministic_rng(RngAlgorithm::ChaCha),
        ),
    }
}

/// A seed from the clock, for exploring runs.
fn rand_seed() -> [u8; 32] {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let mut seed = [0u8; 32];
    seed[..16].copy_from_slice(&nanos.to_le_bytes());
    seed
}

fn run(cases: u32, rng: TestRng) {
    let ca = Ca::new().expect("a CA for the sidecars' certificates");
    let coverage = Mutex::new(Coverage::default());
    let mut runner = TestRunner::new_with_rng(
        Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        },
        rng,
    );
    let started = std::time::Instant::now();
    let result = runner.run(&mesh_gen::mesh(), |mesh| {
        check(&mesh, &ca, &coverage)
            .map_err(|e| TestCaseError::fail(format!("{e:#}\nthe mesh:\n{}", mesh.yaml())))
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let coverage = coverage.into_inner().unwrap();
    eprintln!(
        "{cases} meshes, {} proxies validated by Envoy in {:.1?}; {} of {} documents refused by meshd",
        coverage.proxies,
        started.elapsed(),
        coverage.rejected,
        coverage.documents
    );
    let missing: Vec<&str> = Coverage::ALL
        .iter()
        .copied()
        .filter(|f| !coverage.seen.contains(f))
        .collect();
    assert!(
        missing.is_empty(),
        "the generated meshes never reached Envoy with {missing:?}"
    );
}

/// One mesh: every proxy's config must pass `envoy --mode validate`.
fn check(mesh: &GenMesh, ca: &Ca, coverage: &Mutex<Coverage>) -> anyhow::Result<()> {
    let parsed = mesh_gen::parse(mesh);
    let snapshot = Arc::new(MeshSnapshot::build(
        1,
        mesh.defaults.clone(),
        parsed.objects.clone(),
    ));
    let xds = XdsSnapshot::build(snapshot.clone(), None, "cluster.local");
    let mut proxies = Vec::new();
    // Once per mesh and capture layout: the first proxy that has guarded resources.
    let mut denied_once = BTreeSet::new();
    for (key, workload) in &snapshot.workloads {
        let (_, mut resources) = xds.proxy_resources(key).context("a workload of the mesh")?;
        for secret in ca.secrets(&key.namespace, &workload.service_account)? {
            resources.insert(ResourceType::Secret, secret);
        }
        let node = format!("{}.{}", key.name, key.namespace);
        proxies.push((node.clone(), bootstrap(&node, &resources)?));
        // What the proxy gets instead after rejecting its inbound routes, or its
        // inbound listeners: once per mesh, for the first proxy that has them.
        let guarded = |t| resources.get(t).keys().any(|n| fail_closed::guards(t, n));
        if guarded(ResourceType::Listener) && denied_once.insert(workload.capture) {
            for (variant, denied) in [
                ("routes", ResourceType::Route),
                ("listeners", ResourceType::Listener),
            ] {
                let denying = fail_closed_variant(&xds, key, &resources, denied);
                let name = format!("{node}-denying-{variant}");
                proxies.push((name.clone(), bootstrap(&name, &denying)?));
            }
        }
    }
    let dir = tempfile::tempdir()?;
    // Envoy processes of one mesh run side by side.
    std::thread::scope(|s| {
        let runs: Vec<_> = proxies
            .iter()
            .map(|(node, b)| {
                let dir = dir.path();
                s.spawn(move || {
                    envoy_validate(b, dir, node).with_context(|| format!("proxy {node}"))
                })
            })
            .collect();
        runs.into_iter()
            .try_for_each(|r| r.join().expect("a validation thread"))
    })?;
    coverage
        .lock()
        .unwrap()
        .record(&parsed, &snapshot, &xds, mesh.docs.len());
    Ok(())
}

/// `resources` with each inbound resource of type `denied` replaced by the version that
/// denies everything, as meshd serves it after a NACK. A denying HTTP listener has its
/// route inline, so with denied listeners the inbound routes are left out (Envoy would
/// keep them, unused).
fn fail_closed_variant(
    xds: &XdsSnapshot,
    workload: &ObjectKey,
    resources: &ProxyResources,
    denied: ResourceType,
) -> ProxyResources {
    let mut out = ProxyResources::default();
    for t in ResourceType::PUSH_ORDER {
        for (name, r) in resources.get(t) {
            let guarded = fail_closed::guards(t, name);
            if guarded && denied == ResourceType::Listener && t == ResourceType::Route {
                continue;
            }
            let r = match guarded && t == denied {
                true => xds.denying(workload, t, name).expect("a denying version"),
                false => r.clone(),
            };
            out.insert(t, r);
        }
    }
    out
}

/// A throwaway mesh CA: each identity's workload secret and the trust bundle.
struct Ca {
    authority: meshd_ca::Authority,
    _dir: tempfile::TempDir,
    issued: Mutex<BTreeMap<(String, String), Arc<Resource>>>,
    root: Arc<Resource>,
}

impl Ca {
    fn new() -> anyhow::Result<Ca> {
        let dir = tempfile::tempdir()?;
        let (authority, _) = meshd_ca::store::open_or_create(
            &meshd_ca::store::CaSource::Directory(dir.path().to_path_buf()),
            meshd_ca::CaConfig::default(),
        )?;
        let root = Resource::encode(
            translate::secrets::ROOT_SECRET,
            &translate::secrets::root_secret(authority.trust_bundle()),
        );
        Ok(Ca {
            authority,
            _dir: dir,
            issued: Mutex::default(),
            root,
        })
    }

    fn secrets(
        &self,
        namespace: &str,
        service_account: &str,
    ) -> anyhow::Result<[Arc<Resource>; 2]> {
        let mut issued = self.issued.lock().unwrap();
        let key = (namespace.to_string(), service_account.to_string());
        let secret = match issued.get(&key) {
            Some(s) => s.clone(),
            None => {
                let id = self.authority.workload_id(namespace, service_account)?;
                let cert = self.authority.issue(&id)?;
                let s = Resource::encode(
                    translate::secrets::WORKLOAD_SECRET,
                    &translate::secrets::workload_secret(&cert),
                );
                issued.insert(key, s.clone());
                s
            }
        };
        Ok([secret, self.root.clone()])
    }
}

/// Which features of the input reached Envoy in a mesh it accepted: the run fails if
/// the generator never produced one of [`Coverage::ALL`].
#[derive(Default)]
struct Coverage {
    seen: BTreeSet<&'static str>,
    proxies: usize,
    documents: usize,
    rejected: usize,
}

impl Coverage {
    const ALL: &'static [&'static str] = &[
        "action ALLOW",
        "action DENY",
        "action AUDIT",
        "policy without selector",
        "policy in the root namespace",
        "policy without rules",
        "principals",
        "notPrincipals",
        "namespaces",
        "notNamespaces",
        "ipBlocks",
        "notIpBlocks",
        "ports",
        "notPorts",
        "methods",
        "notMethods",
        "paths",
        "notPaths",
        "hosts",
        "notHosts",
        "when values",
        "when notValues only",
        "when values and notValues",
        "pattern *",
        "pattern exact",
        "pattern empty",
        "pattern prefix*",
        "pattern *suffix",
        "mode STRICT",
        "mode PERMISSIVE",
        "mode DISABLE",
        "mode UNSET",
        "portLevelMtls",
        "inbound HTTP port with policies",
        "inbound TCP port with policies",
        "inbound PERMISSIVE port",
        "inbound IPv6 port",
        "upstream HTTP",
        "upstream TCP",
        "egress port",
        "endpoint slice",
        "transparent pod",
        "transparent VIP chain",
        "transparent endpoint chain",
        "transparent PERMISSIVE port",
        "transparent registry-only",
    ];

    fn record(
        &mut self,
        parsed: &mesh_gen::Parsed,
        snapshot: &MeshSnapshot,
        xds: &XdsSnapshot,
        documents: usize,
    ) {
        self.documents += documents;
        self.rejected += parsed.rejected.len();
        let seen = &mut self.seen;
        for o in &parsed.objects {
            match o {
                MeshObject::AuthorizationPolicy(p) => policy(seen, p, snapshot),
                MeshObject::PeerAuthentication(p) => {
                    seen.insert(match p.mode {
                        Some(MtlsMode::Strict) => "mode STRICT",
                        Some(MtlsMode::Permissive) => "mode PERMISSIVE",
                        Some(MtlsMode::Disable) => "mode DISABLE",
                        None => "mode UNSET",
                    });
                    if !p.port_modes.is_empty() {
                        seen.insert("portLevelMtls");
                    }
                }
                MeshObject::EndpointSlice(_) => {
                    seen.insert("endpoint slice");
                }
                _ => {}
            }
        }
        for (key, workload) in &snapshot.workloads {
            self.proxies += 1;
            let Some(address) = workload.address else {
                continue;
            };
            let policies = !snapshot.authorization_policies_for(workload).is_empty();
            for port in snapshot.inbound.get(key).iter().flat_map(|p| p.iter()) {
                if policies {
                    seen.insert(if port.protocol.is_http() {
                        "inbound HTTP port with policies"
                    } else {
                        "inbound TCP port with policies"
                    });
                }
                if port.mtls == MtlsMode::Permissive {
                    seen.insert("inbound PERMISSIVE port");
                }
                if address.is_ipv6() {
                    seen.insert("inbound IPv6 port");
                }
            }
            if let Some((view, _)) = xds.proxy_resources(key) {
                for out in &view.outbound {
                    seen.insert(if out.port.protocol.is_http() {
                        "upstream HTTP"
                    } else {
                        "upstream TCP"
                    });
                }
                if view.egress.is_some() {
                    seen.insert("egress port");
                }
                if let Some(t) = &view.transparent {
                    seen.insert("transparent pod");
                    let services = t.services(snapshot);
                    if services.iter().any(|(s, _)| s.cluster_ip.is_some()) {
                        seen.insert("transparent VIP chain");
                    }
                    if services.iter().any(|(s, p)| {
                        snapshot
                            .endpoints
                            .get(&(s.key.clone(), p.port))
                            .is_some_and(|e| !e.is_empty())
                    }) {
                        seen.insert("transparent endpoint chain");
                    }
                    if view.inbound.iter().any(|p| p.mtls == MtlsMode::Permissive) {
                        seen.insert("transparent PERMISSIVE port");
                    }
                    if t.outbound_policy == meshd::model::OutboundPolicy::RegistryOnly {
                        seen.insert("transparent registry-only");
                    }
                }
            }
        }
    }
}

fn policy(seen: &mut BTreeSet<&'static str>, p: &AuthorizationPolicy, snapshot: &MeshSnapshot) {
    seen.insert(match p.action {
        Action::Allow => "action ALLOW",
        Action::Deny => "action DENY",
        Action::Audit => "action AUDIT",
    });
    if p.selector.is_none() {
        seen.insert("policy without selector");
    }
    if p.key.namespace == snapshot.defaults.root_namespace {
        seen.insert("policy in the root namespace");
    }
    if p.rules.is_empty() {
        seen.insert("policy without rules");
    }
    for rule in &p.rules {
        for s in &rule.from {
            patterns(seen, &s.principals, "principals");
            patterns(seen, &s.not_principals, "notPrincipals");
            patterns(seen, &s.namespaces, "namespaces");
            patterns(seen, &s.not_namespaces, "notNamespaces");
            if !s.ip_blocks.is_empty() {
                seen.insert("ipBlocks");
            }
            if !s.not_ip_blocks.is_empty() {
                seen.insert("notIpBlocks");
            }
        }
        for o in &rule.to {
            patterns(seen, &o.methods, "methods");
            patterns(seen, &o.not_methods, "notMethods");
            patterns(seen, &o.paths, "paths");
            patterns(seen, &o.not_paths, "notPaths");
            patterns(seen, &o.hosts, "hosts");
            patterns(seen, &o.not_hosts, "notHosts");
            if !o.ports.is_empty() {
                seen.insert("ports");
            }
            if !o.not_ports.is_empty() {
                seen.insert("notPorts");
            }
        }
        for c in &rule.when {
            seen.insert(match (c.values.is_empty(), c.not_values.is_empty()) {
                (false, true) => "when values",
                (true, false) => "when notValues only",
                _ => "when values and notValues",
            });
            patterns(seen, &c.values, "when values");
        }
    }
}

/// Notes field `name` and the kinds of pattern in `list`, if it has any.
fn patterns(seen: &mut BTreeSet<&'static str>, list: &[StringMatch], name: &'static str) {
    if !list.is_empty() {
        seen.insert(name);
    }
    for m in list {
        seen.insert(match m {
            StringMatch::Any => "pattern *",
            StringMatch::Exact(e) if e.is_empty() => "pattern empty",
            StringMatch::Exact(_) => "pattern exact",
            StringMatch::Prefix(_) => "pattern prefix*",
            StringMatch::Suffix(_) => "pattern *suffix",
        });
    }
}
