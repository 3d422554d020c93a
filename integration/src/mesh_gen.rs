//! Random meshes, as a user writes them: proptest strategies for a config directory's
//! documents — Namespaces, Services (HTTP and TCP ports, named and numbered target
//! ports, every protocol spelling), Pods (IPv4, IPv6 and loopback addresses, container
//! ports, the upstream, app-port, egress-port and scope annotations), EndpointSlices,
//! PeerAuthentications (every mode, `portLevelMtls`) and AuthorizationPolicies (every
//! action; `from`, `to` and `when` with every field and its `not*` form; exact,
//! `prefix*`, `*suffix`, `*` and empty values, and odd strings: spaces, quotes,
//! control characters, non-ASCII).
//!
//! Names come from small pools, so selectors, upstreams, endpoint slices and policies
//! mostly refer to objects that exist. Documents are rendered to YAML and read by the
//! file source's own parser ([`parse`]): what meshd accepts from them is exactly what
//! it would accept from a file. Some documents are invalid on purpose (meshd must
//! reject those with an error, not translate them).

use std::collections::BTreeSet;
use std::path::Path;

use meshd::model::{MeshDefaults, MeshObject, MtlsMode, OutboundPolicy, ScopeEntry};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use proptest::sample::select;
use serde_json::{Map, Value, json};

pub const NAMESPACES: [&str; 3] = ["shop", "edge", "meshd-system"];
const APPS: [&str; 3] = ["web", "db", "api"];
const SERVICES: [&str; 3] = ["web", "db", "api"];
const SERVICE_ACCOUNTS: [&str; 4] = ["web", "db", "client", ""];
const POD_IPS: [&str; 6] = [
    "10.0.0.1",
    "10.0.0.2",
    "127.0.1.1",
    "127.0.0.1",
    "fd00::1",
    "::1",
];
const CONTAINER_PORTS: [(u16, &str); 5] = [
    (80, "http"),
    (8080, ""),
    (9090, "grpc"),
    (5432, "db"),
    (15001, ""),
];
const SERVICE_PORTS: [u16; 4] = [80, 8080, 5432, 9090];
const LOCAL_PORTS: [u16; 5] = [15001, 15002, 15003, 8080, 9090];
const MODES: [&str; 4] = ["STRICT", "PERMISSIVE", "DISABLE", "UNSET"];

/// One generated config directory, and meshd's own settings.
#[derive(Debug, Clone)]
pub struct GenMesh {
    pub docs: Vec<Value>,
    pub defaults: MeshDefaults,
}

impl GenMesh {
    /// The documents as one YAML file, for failure messages.
    pub fn yaml(&self) -> String {
        self.docs
            .iter()
            .map(|d| serde_saphyr::to_string(d).expect("JSON values serialize"))
            .collect::<Vec<_>>()
            .join("---\n")
    }
}

/// What the file source made of a [`GenMesh`].
#[derive(Debug)]
pub struct Parsed {
    /// Accepted objects, one per kind and key (the first wins).
    pub objects: Vec<MeshObject>,
    /// Documents meshd refused, with its reason.
    pub rejected: Vec<String>,
}

/// Reads every document of `mesh` as a file of its own, with the file source's parser.
pub fn parse(mesh: &GenMesh) -> Parsed {
    let mut seen = BTreeSet::new();
    let mut parsed = Parsed {
        objects: Vec::new(),
        rejected: Vec::new(),
    };
    for (i, doc) in mesh.docs.iter().enumerate() {
        let text = serde_saphyr::to_string(doc).expect("JSON values serialize");
        let path = format!("doc-{i}.yaml");
        match meshd::sources::file::parse::parse_file(Path::new(&path), &text) {
            Ok(objects) => {
                for o in objects.defined.into_iter().map(|d| d.object) {
                    if seen.insert((o.kind(), o.key())) {
                        parsed.objects.push(o);
                    }
                }
            }
            Err(errors) => parsed
                .rejected
                .extend(errors.iter().map(ToString::to_string)),
        }
    }
    parsed
}

/// A whole mesh.
pub fn mesh() -> impl Strategy<Value = GenMesh> {
    (
        vec(namespace(), 0..3),
        vec(service(), 1..5),
        (1..5usize).prop_flat_map(|n| (0..n).map(pod).collect::<Vec<_>>()),
        vec(endpoint_slice(), 0..2),
        vec(peer_authentication(), 0..3),
        vec(authorization_policy(), 0..5),
        defaults(),
    )
        .prop_map(|(ns, svcs, pods, slices, pas, aps, defaults)| {
            let mut docs = Vec::new();
            docs.extend(ns);
            docs.extend(svcs);
            docs.extend(pods);
            docs.extend(slices);
            docs.extend(pas);
            docs.extend(aps);
            GenMesh { docs, defaults }
        })
}

fn defaults() -> impl Strategy<Value = MeshDefaults> {
    (
        select(vec![
            MtlsMode::Strict,
            MtlsMode::Permissive,
            MtlsMode::Disable,
        ]),
        option::of(select(vec![
            vec![ScopeEntry::All],
            vec![ScopeEntry::Namespace("shop".into())],
        ])),
        select(vec![OutboundPolicy::AllowAny, OutboundPolicy::RegistryOnly]),
    )
        .prop_map(|(mtls_mode, scope, outbound_policy)| MeshDefaults {
            mtls_mode,
            scope,
            outbound_policy,
            ..MeshDefaults::default()
        })
}

fn meta(kind: &str, api_version: &str, namespace: &str, name: &str) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("apiVersion".into(), api_version.into());
    m.insert("kind".into(), kind.into());
    m.insert(
        "metadata".into(),
        json!({"name": name, "namespace": namespace}),
    );
    m
}

fn namespace() -> impl Strategy<Value = Value> {
    (select(&NAMESPACES[..]), any::<bool>()).prop_map(|(name, labelled)| {
        let mut labels = Map::new();
        if labelled {
            labels.insert("meshd.io/mesh".into(), "enabled".into());
        }
        json!({"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": name, "labels": labels}})
    })
}

fn service() -> impl Strategy<Value = Value> {
    let port = (
        option::weighted(
            0.8,
            select(vec![
                "http-web", "grpc-api", "http2-x", "tcp-db", "db", "web",
            ]),
        ),
        option::of(prop_oneof![
            select(&CONTAINER_PORTS[..]).prop_map(|(n, _)| json!(n)),
            select(vec!["http", "grpc", "db", "missing", "8080"]).prop_map(|s| json!(s)),
        ]),
        option::of(select(vec![
            "http",
            "http2",
            "grpc",
            "kubernetes.io/h2c",
            "tcp",
            "HTTP",
            "mongo",
        ])),
        option::weighted(0.1, select(vec!["TCP", "UDP"])),
    );
    (
        select(&NAMESPACES[..]),
        select(&SERVICES[..]),
        proptest::sample::subsequence(SERVICE_PORTS.to_vec(), 1..3),
        vec(port, 2),
        option::weighted(0.8, select(&APPS[..])),
        option::of(select(vec!["10.96.0.10", "None", "fd00:96::1"])),
    )
        .prop_map(|(ns, name, numbers, attrs, app, cluster_ip)| {
            let several = numbers.len() > 1;
            let ports: Vec<Value> = numbers
                .into_iter()
                .zip(attrs)
                .enumerate()
                .map(|(i, (port, (port_name, target, app_protocol, protocol)))| {
                    let mut p = Map::new();
                    p.insert("port".into(), port.into());
                    match port_name {
                        // Several ports need distinct names.
                        Some(n) if several => {
                            p.insert("name".into(), format!("{n}{i}").into());
                        }
                        None if several => {
                            p.insert("name".into(), format!("p{i}").into());
                        }
                        Some(n) => {
                            p.insert("name".into(), n.into());
                        }
                        None => {}
                    }
                    if let Some(t) = target {
                        p.insert("targetPort".into(), t);
                    }
                    if let Some(a) = app_protocol {
                        p.insert("appProtocol".into(), a.into());
                    }
                    if let Some(proto) = protocol {
                        p.insert("protocol".into(), proto.into());
                    }
                    Value::Object(p)
                })
                .collect();
            let mut spec = Map::new();
            spec.insert("ports".into(), ports.into());
            if let Some(app) = app {
                spec.insert("selector".into(), json!({"app": app}));
            }
            if let Some(ip) = cluster_ip {
                spec.insert("clusterIP".into(), ip.into());
            }
            let mut doc = meta("Service", "v1", ns, name);
            doc.insert("spec".into(), spec.into());
            Value::Object(doc)
        })
}

fn upstream_entry() -> impl Strategy<Value = String> {
    (
        select(&SERVICES[..]),
        option::of(select(&NAMESPACES[..])),
        select(&SERVICE_PORTS[..]),
        select(&LOCAL_PORTS[..]),
    )
        .prop_map(|(svc, ns, port, local)| match ns {
            Some(ns) => format!("{svc}.{ns}:{port}={local}"),
            None => format!("{svc}:{port}={local}"),
        })
}

fn pod(index: usize) -> impl Strategy<Value = Value> {
    let annotations = (
        option::of(vec(upstream_entry(), 1..4)),
        option::weighted(0.3, select(vec!["8080=18081", "80=18080, 9090=19090"])),
        option::weighted(
            0.4,
            (
                select(vec![15080u16, 15001, 8080]),
                option::of(select(vec!["shop", "*", "shop, edge/web", "edge/db"])),
            ),
        ),
        option::weighted(0.35, option::of(select(vec!["shop", "*", "edge/db"]))),
    );
    (
        select(&NAMESPACES[..]),
        select(&APPS[..]),
        select(&SERVICE_ACCOUNTS[..]),
        option::weighted(0.9, select(&POD_IPS[..])),
        option::weighted(0.2, any::<bool>()),
        vec(vec(select(&CONTAINER_PORTS[..]), 0..3), 1..3),
        annotations,
    )
        .prop_map(
            move |(ns, app, sa, ip, ready, containers, (ups, app_ports, egress, transparent))| {
                let mut annotations = Map::new();
                if let Some(ups) = ups {
                    annotations.insert("meshd.io/upstreams".into(), ups.join(", ").into());
                }
                if let Some(a) = app_ports {
                    annotations.insert("meshd.io/app-ports".into(), a.into());
                }
                // A transparent pod has a scope of its own, or none, and no egress port.
                if let Some(scope) = transparent {
                    annotations.insert("meshd.io/capture".into(), "transparent".into());
                    if let Some(s) = scope {
                        annotations.insert("meshd.io/scope".into(), s.into());
                    }
                } else if let Some((port, scope)) = egress {
                    annotations.insert("meshd.io/egress-port".into(), port.to_string().into());
                    if let Some(s) = scope {
                        annotations.insert("meshd.io/scope".into(), s.into());
                    }
                }
                let containers: Vec<Value> = containers
                    .into_iter()
                    .enumerate()
                    .map(|(c, ports)| {
                        let ports: Vec<Value> = ports
                            .into_iter()
                            .map(|(port, name)| {
                                if name.is_empty() {
                                    json!({"containerPort": port})
                                } else {
                                    json!({"containerPort": port, "name": name})
                                }
                            })
                            .collect();
                        json!({"name": format!("c{c}"), "image": "app", "ports": ports})
                    })
                    .collect();
                let mut status = Map::new();
                if let Some(ip) = ip {
                    status.insert("podIP".into(), ip.into());
                }
                if let Some(ready) = ready {
                    status.insert(
                        "conditions".into(),
                        json!([{"type": "Ready", "status": if ready { "True" } else { "False" }}]),
                    );
                }
                let mut spec = Map::new();
                spec.insert("containers".into(), containers.into());
                if !sa.is_empty() {
                    spec.insert("serviceAccountName".into(), sa.into());
                }
                json!({
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": format!("p{index}"), "namespace": ns,
                                 "labels": {"app": app}, "annotations": annotations},
                    "spec": spec,
                    "status": status,
                })
            },
        )
}

fn endpoint_slice() -> impl Strategy<Value = Value> {
    let endpoint = (
        vec(select(&POD_IPS[..]), 1..3),
        option::of(any::<bool>()),
        option::of(0..5usize),
    );
    (
        select(&NAMESPACES[..]),
        select(&SERVICES[..]),
        any::<bool>(),
        vec(select(&CONTAINER_PORTS[..]), 0..3),
        vec(endpoint, 0..3),
    )
        .prop_map(|(ns, svc, v6, ports, endpoints)| {
            let ports: Vec<Value> = ports
                .into_iter()
                .map(|(port, name)| json!({"port": port, "name": name}))
                .collect();
            let endpoints: Vec<Value> = endpoints
                .into_iter()
                .map(|(addresses, ready, pod)| {
                    let addresses: Vec<&str> = addresses
                        .into_iter()
                        .filter(|a| a.contains(':') == v6)
                        .collect();
                    let mut e = Map::new();
                    e.insert(
                        "addresses".into(),
                        if addresses.is_empty() {
                            json!([if v6 { "fd00::9" } else { "10.0.0.9" }])
                        } else {
                            json!(addresses)
                        },
                    );
                    if let Some(ready) = ready {
                        e.insert("conditions".into(), json!({"ready": ready}));
                    }
                    if let Some(pod) = pod {
                        e.insert(
                            "targetRef".into(),
                            json!({"kind": "Pod", "name": format!("p{pod}"), "namespace": ns}),
                        );
                    }
                    Value::Object(e)
                })
                .collect();
            json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": format!("{svc}-slice"), "namespace": ns,
                             "labels": {"kubernetes.io/service-name": svc}},
                "addressType": if v6 { "IPv6" } else { "IPv4" },
                "ports": ports,
                "endpoints": endpoints,
            })
        })
}

fn peer_authentication() -> impl Strategy<Value = Value> {
    (
        select(&NAMESPACES[..]),
        0..3usize,
        option::weighted(0.7, select(&APPS[..])),
        option::weighted(0.9, select(&MODES[..])),
        option::weighted(
            0.5,
            vec(
                (
                    select(vec!["8080", "80", "5432", "9090", "15001"]),
                    select(&MODES[..3]),
                ),
                1..3,
            ),
        ),
    )
        .prop_map(|(ns, i, app, mode, ports)| {
            // Port-level settings need a selector (a few without, to be refused).
            let ports = ports.filter(|p| app.is_some() || p.len() > 1);
            let mut spec = Map::new();
            if let Some(app) = app {
                spec.insert("selector".into(), json!({"matchLabels": {"app": app}}));
            }
            if let Some(mode) = mode {
                spec.insert("mtls".into(), json!({ "mode": mode }));
            }
            if let Some(ports) = ports {
                let m: Map<String, Value> = ports
                    .into_iter()
                    .map(|(p, mode)| (p.to_string(), json!({ "mode": mode })))
                    .collect();
                spec.insert("portLevelMtls".into(), m.into());
            }
            let mut doc = meta(
                "PeerAuthentication",
                "security.meshd.io/v1alpha1",
                ns,
                &format!("pa{i}"),
            );
            doc.insert("spec".into(), spec.into());
            Value::Object(doc)
        })
}

/// An odd string: any characters (spaces, quotes, control characters, non-ASCII),
/// maybe as `prefix*`, `*suffix` or `*`.
fn odd() -> impl Strategy<Value = String> {
    let c = prop_oneof![
        4 => proptest::char::range('a', 'z'),
        2 => select(vec!['/', '.', ':', '-', '_', '*', ' ', '"', '\'', ',', '[', ']', '\\']),
        1 => proptest::char::range('\0', '\u{1f}'),
        1 => any::<char>(),
    ];
    (vec(c, 0..6), 0..4u8).prop_map(|(chars, affix)| {
        let s: String = chars.into_iter().collect();
        match affix {
            0 | 1 => s,
            2 => format!("{s}*"),
            _ => format!("*{s}"),
        }
    })
}

/// A value from `pool` (mostly) or an odd string.
fn pattern(pool: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop_oneof![
        6 => select(pool).prop_map(str::to_string),
        1 => odd(),
    ]
}

/// A field's list: usually absent, else one to three patterns.
fn field(pool: &'static [&'static str]) -> impl Strategy<Value = Vec<String>> {
    prop_oneof![2 => Just(Vec::new()), 1 => vec(pattern(pool), 1..4)]
}

const PRINCIPALS: &[&str] = &[
    "*",
    "cluster.local/ns/shop/sa/web",
    "spiffe://cluster.local/ns/edge/sa/client",
    "cluster.local/ns/shop/sa/*",
    "*/sa/db",
    "spiffe://*",
];
const NAMESPACE_PATTERNS: &[&str] = &["*", "shop", "edge", "", "sh*", "*op", "ünï"];
const IP_BLOCKS: &[&str] = &[
    "10.0.0.0/8",
    "127.0.1.1",
    "::1/128",
    "fd00::/8",
    "0.0.0.0/0",
    "10.1.2.3/16",
    "::ffff:10.0.0.1/128",
];
const PORTS: &[&str] = &["80", "8080", "5432", "9090", "65535"];
const METHODS: &[&str] = &["GET", "POST", "*", "", "G*", "*T", "get"];
const PATHS: &[&str] = &[
    "/", "/admin*", "*", "", "*.json", "/a b", "/x\"y", "/ü", "/*",
];
const HOSTS: &[&str] = &["web.shop", "*.shop", "*", "", "WEB:80", "web.shop.svc*"];
const HEADERS: &[&str] = &[
    "x-team",
    "X-Region",
    "x y",
    ":authority",
    "x_1",
    "user-agent",
    "x\ny",
    "a\0b",
    "é",
];
const HEADER_VALUES: &[&str] = &["blue", "", "*", "us-*", "*-1", "a,b", "ü", "\t", "**"];

fn source() -> impl Strategy<Value = Value> {
    (
        field(PRINCIPALS),
        field(PRINCIPALS),
        field(NAMESPACE_PATTERNS),
        field(NAMESPACE_PATTERNS),
        field(IP_BLOCKS),
        field(IP_BLOCKS),
    )
        .prop_map(|(p, np, n, nn, ip, nip)| {
            let mut s = Map::new();
            for (k, v) in [
                ("principals", p),
                ("notPrincipals", np),
                ("namespaces", n),
                ("notNamespaces", nn),
                ("ipBlocks", ip),
                ("notIpBlocks", nip),
            ] {
                if !v.is_empty() {
                    s.insert(k.into(), v.into());
                }
            }
            if s.is_empty() {
                // An empty source is refused; say something.
                s.insert("namespaces".into(), json!(["*"]));
            }
            json!({ "source": s })
        })
}

fn operation() -> impl Strategy<Value = Value> {
    (
        (field(PORTS), field(PORTS)),
        (field(METHODS), field(METHODS)),
        (field(PATHS), field(PATHS)),
        (field(HOSTS), field(HOSTS)),
    )
        .prop_map(|((p, np), (m, nm), (pa, npa), (h, nh))| {
            let mut o = Map::new();
            for (k, v) in [
                ("ports", p),
                ("notPorts", np),
                ("methods", m),
                ("notMethods", nm),
                ("paths", pa),
                ("notPaths", npa),
                ("hosts", h),
                ("notHosts", nh),
            ] {
                if !v.is_empty() {
                    o.insert(k.into(), v.into());
                }
            }
            if o.is_empty() {
                o.insert("paths".into(), json!(["/"]));
            }
            json!({ "operation": o })
        })
}

fn condition() -> impl Strategy<Value = Value> {
    (
        pattern(HEADERS),
        0..3u8,
        vec(pattern(HEADER_VALUES), 1..3),
        vec(pattern(HEADER_VALUES), 1..3),
    )
        .prop_map(|(header, which, values, not_values)| {
            let mut c = Map::new();
            c.insert("key".into(), format!("request.headers[{header}]").into());
            if which != 1 {
                c.insert("values".into(), values.into());
            }
            if which != 0 {
                c.insert("notValues".into(), not_values.into());
            }
            Value::Object(c)
        })
}

fn rule() -> impl Strategy<Value = Value> {
    (
        vec(source(), 0..3),
        vec(operation(), 0..3),
        vec(condition(), 0..3),
    )
        .prop_map(|(from, to, when)| {
            let mut r = Map::new();
            if from.is_empty() && to.is_empty() && when.is_empty() {
                r.insert("from".into(), json!([{"source": {"principals": ["*"]}}]));
            }
            for (k, v) in [("from", from), ("to", to), ("when", when)] {
                if !v.is_empty() {
                    r.insert(k.into(), v.into());
                }
            }
            Value::Object(r)
        })
}

fn authorization_policy() -> impl Strategy<Value = Value> {
    (
        select(&NAMESPACES[..]),
        0..4usize,
        option::weighted(0.7, select(&APPS[..])),
        option::weighted(0.8, select(vec!["ALLOW", "DENY", "AUDIT"])),
        vec(rule(), 0..4),
    )
        .prop_map(|(ns, i, app, action, rules)| {
            let mut spec = Map::new();
            if let Some(app) = app {
                spec.insert("selector".into(), json!({"matchLabels": {"app": app}}));
            }
            if let Some(action) = action {
                spec.insert("action".into(), action.into());
            }
            spec.insert("rules".into(), rules.into());
            let mut doc = meta(
                "AuthorizationPolicy",
                "security.meshd.io/v1alpha1",
                ns,
                &format!("ap{i}"),
            );
            doc.insert("spec".into(), spec.into());
            Value::Object(doc)
        })
}
