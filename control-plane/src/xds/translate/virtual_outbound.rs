//! Transparent proxies' virtual outbound listeners, shared by scope.
//!
//! The listener on 15001 depends only on a proxy's scope (its scope entries, its
//! declared upstreams, the outbound policy: [`TransparentView`]), not on the proxy:
//! every proxy with an equal scope gets the same listener. So the scope is resolved to
//! service ports and chains once per scope and snapshot ([`SharedOutbound::get`]; a
//! stream only hashes its small scope), and the encoding is kept from the previous
//! snapshot while the chains are equal — an endpoint change re-encodes one listener per
//! scope it touches, not one per proxy.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use super::listeners::OutboundChain;
use super::resources::Resource;
use crate::model::proxy_view::TransparentView;
use crate::model::snapshot::ServicePortKey;
use crate::model::{MeshSnapshot, MtlsMode};
use crate::xds::translate;

/// One scope's virtual outbound listener and what it needs sent with it.
#[derive(Debug)]
pub struct VirtualOutbound {
    chains: Vec<OutboundChain>,
    /// The service ports whose VIP chain the listener has (their EDS cluster, endpoints
    /// and route go with it), and those with an endpoint chain over mTLS (their direct
    /// cluster): nothing the listener does not use is sent.
    pub vip_services: Vec<ServicePortKey>,
    pub direct_services: Vec<ServicePortKey>,
    pub listener: Arc<Resource>,
}

/// One snapshot's listeners by scope, filled on first use; the previous snapshot's, to
/// keep encodings whose chains did not change.
#[derive(Debug, Default)]
pub struct SharedOutbound {
    current: Mutex<HashMap<TransparentView, Arc<VirtualOutbound>>>,
    previous: HashMap<TransparentView, Arc<VirtualOutbound>>,
}

impl SharedOutbound {
    /// The next snapshot's: the scopes `previous` served are the ones to reuse.
    pub fn after(previous: Option<&SharedOutbound>) -> SharedOutbound {
        let previous = previous
            .map(|p| p.current.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .unwrap_or_default();
        SharedOutbound {
            current: Mutex::default(),
            previous,
        }
    }

    /// The virtual outbound listener of scope `t` in `mesh`.
    pub fn get(&self, mesh: &MeshSnapshot, t: &TransparentView) -> Arc<VirtualOutbound> {
        let current = || self.current.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(hit) = current().get(t) {
            return hit.clone();
        }
        // Built outside the lock; if two streams of one scope build at once, the first
        // to store wins and both use it, so they agree on versions.
        let (chains, vip_services, direct_services) = outbound_chains(mesh, t);
        let built = match self.previous.get(t) {
            Some(old) if old.chains == chains => old.clone(),
            _ => Arc::new(VirtualOutbound {
                listener: Resource::encode(
                    translate::names::virtual_outbound_listener_name(),
                    &translate::listeners::virtual_outbound_listener(&chains, t.outbound_policy),
                ),
                chains,
                vip_services,
                direct_services,
            }),
        };
        current().entry(t.clone()).or_insert(built).clone()
    }
}

/// The virtual outbound listener's chains: first every service VIP and port, then each
/// endpoint address and port not already matched (a pod IP dialled directly, a headless
/// service's pods). An address and port belongs to the first service that has it:
/// Envoy refuses two chains with the same match.
/// Returns the chains and the service ports of VIP chains and of mTLS endpoint chains.
fn outbound_chains(
    mesh: &MeshSnapshot,
    t: &TransparentView,
) -> (Vec<OutboundChain>, Vec<ServicePortKey>, Vec<ServicePortKey>) {
    let services = t.services(mesh);
    let mut chains = Vec::new();
    let (mut vip_services, mut direct_services) = (Vec::new(), Vec::new());
    let mut taken: HashSet<(IpAddr, u16)> = HashSet::new();
    for (svc, port) in &services {
        let Some(vip) = svc.cluster_ip else { continue };
        if !taken.insert((vip, port.port)) {
            continue;
        }
        let cluster = translate::names::service_cluster_name(svc, port.port);
        vip_services.push((svc.key.clone(), port.port));
        chains.push(OutboundChain {
            name: format!("outbound|{}", std::net::SocketAddr::new(vip, port.port)),
            port: port.port,
            addresses: vec![vip],
            http_route: port.protocol.is_http().then(|| cluster.clone()),
            cluster,
        });
    }
    for (svc, port) in &services {
        let key = (svc.key.clone(), port.port);
        let Some(endpoints) = mesh.endpoints.get(&key) else {
            continue;
        };
        // By the endpoint's port (a named targetPort may differ per pod), mTLS or not.
        let mut groups: BTreeMap<(u16, bool), Vec<IpAddr>> = BTreeMap::new();
        for e in endpoints.iter() {
            if taken.insert((e.address, e.port)) {
                groups
                    .entry((e.port, e.mtls == MtlsMode::Disable))
                    .or_default()
                    .push(e.address);
            }
        }
        for ((endpoint_port, plaintext), mut addresses) in groups {
            addresses.sort();
            let cluster = if plaintext {
                translate::names::PASSTHROUGH_CLUSTER.to_string()
            } else {
                if direct_services.last() != Some(&key) {
                    direct_services.push(key.clone());
                }
                translate::names::direct_cluster_name(svc, port.port)
            };
            chains.push(OutboundChain {
                name: format!("direct|{endpoint_port}||{}", svc.hostname()),
                port: endpoint_port,
                addresses,
                cluster,
                http_route: None,
            });
        }
    }
    (chains, vip_services, direct_services)
}
