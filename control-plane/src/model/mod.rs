//! The mesh model: what meshd knows about the world, independent of where it came from.
//!
//! Sources (the config directory, later Kubernetes) turn the outside world into
//! [`MeshObject`]s; the [`store`] keeps the current set and publishes immutable,
//! versioned [`snapshot::MeshSnapshot`]s; [`proxy_view`] cuts out what one proxy needs.
//! Nothing in here knows about gRPC, Envoy or the Kubernetes API.

pub mod authorization;
pub mod proxy_view;
pub mod snapshot;
pub mod store;
pub mod workload_policy;

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

pub use proxy_view::ProxyView;
pub use snapshot::MeshSnapshot;
pub use store::{Store, StoreConfig, StoreEvent};

/// The DNS suffix of services, as in `web.default.svc.cluster.local`.
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// A namespaced object's identity.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// How a port's bytes are understood by the sidecars.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 (and HTTP/2 if the client speaks it) through an HTTP connection manager.
    Http,
    /// HTTP/2 end to end, also towards the upstream.
    Http2,
    /// gRPC: HTTP/2 end to end.
    Grpc,
    /// Opaque bytes through a TCP proxy.
    Tcp,
}

impl Protocol {
    pub fn is_http(self) -> bool {
        !matches!(self, Protocol::Tcp)
    }

    /// Whether the upstream connection must be HTTP/2.
    pub fn needs_http2_upstream(self) -> bool {
        matches!(self, Protocol::Http2 | Protocol::Grpc)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

/// The port a service port forwards to on its endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    /// A container port name, resolved per pod.
    Named(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    pub target_port: TargetPort,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub key: ObjectKey,
    /// The virtual IP (`spec.clusterIP`), if the service has one.
    pub cluster_ip: Option<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// Pods selected by these labels become endpoints, unless EndpointSlices name the service.
    pub selector: Option<BTreeMap<String, String>>,
}

impl Service {
    /// `name.namespace.svc.cluster.local`
    pub fn hostname(&self) -> String {
        format!(
            "{}.{}.svc.{CLUSTER_DOMAIN}",
            self.key.name, self.key.namespace
        )
    }

    pub fn port(&self, port: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.port == port)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSlicePort {
    pub name: Option<String>,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceEndpoint {
    pub addresses: Vec<IpAddr>,
    pub ready: bool,
    /// The pod behind this endpoint (`targetRef` of kind Pod), if named.
    pub pod: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSlice {
    pub key: ObjectKey,
    /// The service (same namespace) this slice belongs to.
    pub service: String,
    pub ports: Vec<EndpointSlicePort>,
    pub endpoints: Vec<SliceEndpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerPort {
    pub name: Option<String>,
    pub port: u16,
}

/// A service this workload calls, and the local port its sidecar listens on for it
/// (`explicit` capture mode).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct Upstream {
    pub service: ObjectKey,
    pub port: u16,
    pub local_port: u16,
}

/// What a workload may reach through its egress port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum ScopeEntry {
    /// Every service of the mesh (`*`).
    All,
    /// Every service of a namespace (`shop`).
    Namespace(String),
    /// One service (`shop/web`).
    Service(ObjectKey),
}

impl ScopeEntry {
    pub fn covers(&self, service: &ObjectKey) -> bool {
        match self {
            ScopeEntry::All => true,
            ScopeEntry::Namespace(ns) => service.namespace == *ns,
            ScopeEntry::Service(key) => key == service,
        }
    }
}

/// The sidecar's HTTP egress port (`explicit` capture): one port on 127.0.0.1 through
/// which the app reaches every HTTP service in scope, chosen by the Host header (or as
/// an HTTP proxy: `HTTP_PROXY=http://127.0.0.1:<port>`). The proxy receives those
/// services and no others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Egress {
    pub port: u16,
}

/// A pod: one sidecar's worth of application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub key: ObjectKey,
    /// The pod's `metadata.uid` (the CA checks a pod-bound token against it).
    pub uid: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    /// The pod IP. In explicit mode the sidecar's inbound listeners bind here.
    pub address: Option<IpAddr>,
    pub ready: bool,
    pub container_ports: Vec<ContainerPort>,
    /// Inbound port → the local port the application really listens on (default: the same).
    pub app_ports: BTreeMap<u16, u16>,
    pub upstreams: Vec<Upstream>,
    pub egress: Option<Egress>,
    /// The services its sidecar receives beyond its declared upstreams: through the
    /// egress port (explicit capture) or the virtual outbound listener (transparent).
    /// `None`: the mesh-wide default ([`MeshDefaults::scope`]), else the pod's own
    /// namespace.
    pub scope: Option<Vec<ScopeEntry>>,
    /// How the app's traffic reaches the sidecar (`meshd.io/capture`).
    pub capture: Capture,
}

impl Workload {
    /// The port on 127.0.0.1 where the application serves what arrives on `port`.
    pub fn app_port(&self, port: u16) -> u16 {
        self.app_ports.get(&port).copied().unwrap_or(port)
    }

    pub fn container_port_named(&self, name: &str) -> Option<u16> {
        self.container_ports
            .iter()
            .find(|p| p.name.as_deref() == Some(name))
            .map(|p| p.port)
    }
}

/// How a pod's traffic reaches its sidecar (`meshd.io/capture`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Capture {
    /// The app calls local ports the config names (`meshd.io/upstreams`, the egress
    /// port); inbound listeners bind the pod IP. No root needed: the local default.
    #[default]
    Explicit,
    /// `meshd-agent init` redirects the pod's TCP with iptables: outbound to the virtual
    /// listener on 15001, inbound to 15006. The app calls Service VIPs as it would
    /// without a mesh.
    Transparent,
}

impl Capture {
    pub fn parse(value: &str) -> Option<Capture> {
        match value {
            "explicit" => Some(Capture::Explicit),
            "transparent" => Some(Capture::Transparent),
            _ => None,
        }
    }
}

/// What a transparent sidecar does with a connection to a destination the mesh does
/// not know (`--outbound-policy`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutboundPolicy {
    /// Pass it through to its original destination, in plaintext, as without a mesh.
    #[default]
    AllowAny,
    /// Refuse it; the access log says the destination is not in the mesh.
    RegistryOnly,
}

/// How an inbound port accepts traffic (`PeerAuthentication` `mtls.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    /// Mutual TLS only.
    Strict,
    /// Mutual TLS and plaintext on the same port.
    Permissive,
    /// Plaintext only.
    Disable,
}

/// A `security.meshd.io/v1alpha1` PeerAuthentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAuthentication {
    pub key: ObjectKey,
    /// `selector.matchLabels`; `None` applies to the whole namespace (or, in the root
    /// namespace, to the whole mesh).
    pub selector: Option<BTreeMap<String, String>>,
    /// `None` is UNSET: inherit from the next wider policy.
    pub mode: Option<MtlsMode>,
    /// `portLevelMtls`: per container port.
    pub port_modes: BTreeMap<u16, MtlsMode>,
}

/// Mesh-wide settings from meshd's configuration that shape the snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshDefaults {
    /// Policies in this namespace apply to every workload.
    pub root_namespace: String,
    /// The mode when no PeerAuthentication says otherwise.
    pub mtls_mode: MtlsMode,
    /// The scope of egress ports whose pod does not say (`--default-scope`); `None`:
    /// the pod's own namespace.
    pub scope: Option<Vec<ScopeEntry>>,
    /// Transparent sidecars: destinations outside the mesh (`--outbound-policy`).
    pub outbound_policy: OutboundPolicy,
}

impl Default for MeshDefaults {
    fn default() -> Self {
        Self {
            root_namespace: "meshd-system".to_string(),
            mtls_mode: MtlsMode::Strict,
            scope: None,
            outbound_policy: OutboundPolicy::AllowAny,
        }
    }
}

/// Anything a source can tell the store about.
/// Objects are `Arc`s so that snapshots share everything that did not change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MeshObject {
    Namespace(Arc<Namespace>),
    Service(Arc<Service>),
    EndpointSlice(Arc<EndpointSlice>),
    Workload(Arc<Workload>),
    PeerAuthentication(Arc<PeerAuthentication>),
    AuthorizationPolicy(Arc<crate::model::authorization::AuthorizationPolicy>),
    WorkloadPolicy(Arc<crate::model::workload_policy::WorkloadPolicy>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectKind {
    Namespace,
    Service,
    EndpointSlice,
    Workload,
    PeerAuthentication,
    AuthorizationPolicy,
    WorkloadPolicy,
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ObjectKind::Namespace => "Namespace",
            ObjectKind::Service => "Service",
            ObjectKind::EndpointSlice => "EndpointSlice",
            ObjectKind::Workload => "Pod",
            ObjectKind::PeerAuthentication => "PeerAuthentication",
            ObjectKind::AuthorizationPolicy => "AuthorizationPolicy",
            ObjectKind::WorkloadPolicy => "WorkloadPolicy",
        })
    }
}

impl MeshObject {
    pub fn kind(&self) -> ObjectKind {
        match self {
            MeshObject::Namespace(_) => ObjectKind::Namespace,
            MeshObject::Service(_) => ObjectKind::Service,
            MeshObject::EndpointSlice(_) => ObjectKind::EndpointSlice,
            MeshObject::Workload(_) => ObjectKind::Workload,
            MeshObject::PeerAuthentication(_) => ObjectKind::PeerAuthentication,
            MeshObject::AuthorizationPolicy(_) => ObjectKind::AuthorizationPolicy,
            MeshObject::WorkloadPolicy(_) => ObjectKind::WorkloadPolicy,
        }
    }

    /// Namespaces are keyed with an empty namespace.
    pub fn key(&self) -> ObjectKey {
        match self {
            MeshObject::Namespace(n) => ObjectKey::new("", n.name.clone()),
            MeshObject::Service(s) => s.key.clone(),
            MeshObject::EndpointSlice(s) => s.key.clone(),
            MeshObject::Workload(w) => w.key.clone(),
            MeshObject::PeerAuthentication(p) => p.key.clone(),
            MeshObject::AuthorizationPolicy(p) => p.key.clone(),
            MeshObject::WorkloadPolicy(p) => p.key.clone(),
        }
    }
}
