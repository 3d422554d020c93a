//! xDS resource types and encoded resources.
//!
//! A [`Resource`] is encoded once, when it is translated, and carries a content version
//! (a hash of its bytes). Streams compare versions to decide what to send, and many
//! proxies share the same `Arc<Resource>`.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;

/// The xDS resource types meshd serves, in the order a change is pushed: secrets
/// before the clusters and listeners that use them, clusters before the endpoints that
/// fill them, listeners before the routes they name, and clusters before the listeners
/// that send traffic to them. Listeners name the routes they use (inbound HTTP routes
/// carry the port's RBAC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum ResourceType {
    Secret,
    Cluster,
    Endpoint,
    Listener,
    Route,
}

impl ResourceType {
    pub const PUSH_ORDER: [ResourceType; 5] = [
        ResourceType::Secret,
        ResourceType::Cluster,
        ResourceType::Endpoint,
        ResourceType::Listener,
        ResourceType::Route,
    ];

    pub fn type_url(self) -> String {
        match self {
            ResourceType::Secret => Secret::type_url(),
            ResourceType::Cluster => Cluster::type_url(),
            ResourceType::Endpoint => ClusterLoadAssignment::type_url(),
            ResourceType::Listener => Listener::type_url(),
            ResourceType::Route => RouteConfiguration::type_url(),
        }
    }

    pub fn from_type_url(url: &str) -> Option<ResourceType> {
        Self::PUSH_ORDER.into_iter().find(|t| t.type_url() == url)
    }

    /// The short name used in logs, metrics and the admin API.
    pub fn short(self) -> &'static str {
        match self {
            ResourceType::Secret => "sds",
            ResourceType::Cluster => "cds",
            ResourceType::Endpoint => "eds",
            ResourceType::Listener => "lds",
            ResourceType::Route => "rds",
        }
    }

    /// Clusters and listeners are subscribed to as a whole ("wildcard"); endpoints
    /// and routes by name.
    pub fn is_wildcard_type(self) -> bool {
        matches!(self, ResourceType::Cluster | ResourceType::Listener)
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// One encoded resource with its content version. `Debug` leaves out the body: a
/// secret's body holds a private key. Name and version are `Arc<str>`s so that the
/// per-proxy maps that hold them (thousands of streams, dozens of resources each) share them.
#[derive(Clone, PartialEq)]
pub struct Resource {
    pub name: Arc<str>,
    pub version: Arc<str>,
    pub body: Any,
}

impl std::fmt::Debug for Resource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resource")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("type_url", &self.body.type_url)
            .field("bytes", &self.body.value.len())
            .finish()
    }
}

impl Resource {
    pub fn encode<M: Message + Name>(name: impl Into<Arc<str>>, msg: &M) -> Arc<Resource> {
        let value = msg.encode_to_vec();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        value.hash(&mut h);
        Arc::new(Resource {
            name: name.into(),
            version: format!("{:016x}", h.finish()).into(),
            body: Any {
                type_url: M::type_url(),
                value,
            },
        })
    }
}

/// Resources of one type by name.
pub type ResourceSet = BTreeMap<Arc<str>, Arc<Resource>>;

/// Everything one proxy should have, by type.
#[derive(Debug, Default, Clone)]
pub struct ProxyResources {
    sets: [ResourceSet; ResourceType::PUSH_ORDER.len()],
}

impl ProxyResources {
    pub fn get(&self, t: ResourceType) -> &ResourceSet {
        &self.sets[t.index()]
    }

    pub fn insert(&mut self, t: ResourceType, r: Arc<Resource>) {
        self.sets[t.index()].insert(r.name.clone(), r);
    }
}

/// A version string for a set of resources: changes whenever any member changes.
pub fn set_version<'a>(resources: impl Iterator<Item = &'a Resource>) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for r in resources {
        r.name.hash(&mut h);
        r.version.hash(&mut h);
    }
    format!("{:016x}", h.finish())
}

/// `m` as a protobuf `Any` (type URL `type.googleapis.com/<full name>`).
pub fn any<M: Message + Name>(m: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}
