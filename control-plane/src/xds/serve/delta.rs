//! Incremental (delta) ADS streams.
//!
//! Per type the stream tracks the subscription (wildcard and/or explicit names) and
//! what the proxy has: name → version, seeded from `initial_resource_versions` when a
//! proxy reconnects. A response carries only resources whose version differs from what
//! the proxy has, and `removed_resources` for what it has that is gone. Explicitly
//! subscribed names that do not exist are reported once in `removed_resources`, so the
//! proxy does not wait for them. A NACK is recorded; the proxy keeps its config, except
//! for resources that carry policy ([`super::fail_closed`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use super::stream::Queued;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource as DeltaResource,
};
use tokio::sync::mpsc;

use super::fail_closed;
use crate::xds::translate::resources::{Resource, ResourceType};
use envoy_types::pb::envoy::config::core::v3::Node;

use super::limits::{self, Held, StreamEnd};
use super::status::XdsFlavor;
use super::stream::{ProxyConn, StreamFlavor};

#[derive(Debug, Default)]
struct TypeState {
    wildcard: bool,
    names: BTreeSet<String>,
    /// What the proxy has: name → version.
    has: HashMap<Arc<str>, Arc<str>>,
    /// Subscribed names already reported as not existing.
    told_missing: BTreeSet<String>,
    answered_once: bool,
    /// Responses not answered yet: nonce, and the resources in it that carry policy
    /// (what a NACK of it may have rejected, [`super::fail_closed`]).
    unanswered: VecDeque<(String, Vec<Arc<Resource>>)>,
}

/// Unanswered responses remembered per type; a proxy answers each in turn, and at most
/// a stream's channel buffer of them are in flight.
const MAX_UNANSWERED: usize = 16;

type Tx = mpsc::Sender<Queued<DeltaDiscoveryResponse>>;

pub(crate) struct DeltaStream {
    conn: ProxyConn,
    types: BTreeMap<ResourceType, TypeState>,
    tx: Tx,
}

impl DeltaStream {
    /// The names (and versions) this stream holds because the proxy sent them.
    fn held(&self) -> Held {
        let mut held = Held::default();
        for state in self.types.values() {
            state.names.iter().for_each(|n| held.add(n));
            state.told_missing.iter().for_each(|n| held.add(n));
            for (name, version) in &state.has {
                held.add(name);
                held.bytes += version.len();
            }
        }
        held
    }
}

impl StreamFlavor for DeltaStream {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;
    const FLAVOR: XdsFlavor = XdsFlavor::Delta;

    fn node(req: &DeltaDiscoveryRequest) -> Option<&Node> {
        req.node.as_ref()
    }

    fn new(conn: ProxyConn, tx: Tx) -> Self {
        DeltaStream {
            conn,
            types: BTreeMap::new(),
            tx,
        }
    }

    fn conn(&mut self) -> &mut ProxyConn {
        &mut self.conn
    }

    async fn on_request(&mut self, req: DeltaDiscoveryRequest) -> Result<(), StreamEnd> {
        limits::check_type_url(&req.type_url)?;
        let Some(t) = ResourceType::from_type_url(&req.type_url) else {
            self.conn.record_unknown_type(&req.type_url)?;
            return Ok(());
        };
        limits::check_names(
            std::iter::once(&req.response_nonce)
                .chain(&req.resource_names_subscribe)
                .chain(&req.resource_names_unsubscribe)
                .chain(req.initial_resource_versions.keys())
                .chain(req.initial_resource_versions.values())
                .map(String::as_str),
        )?;
        if !req.response_nonce.is_empty() {
            let sent = self
                .types
                .get_mut(&t)
                .and_then(|s| {
                    let i = s
                        .unanswered
                        .iter()
                        .position(|(n, _)| *n == req.response_nonce)?;
                    s.unanswered.remove(i)
                })
                .map(|(_, sent)| sent)
                .unwrap_or_default();
            self.conn.record_answer(
                t,
                &req.response_nonce,
                req.error_detail.as_ref().map(|e| e.message.as_str()),
                &sent,
            );
        }
        // Only subscriptions and reported versions grow what the stream holds; an ACK
        // (the request of every push) is not counted again.
        let adds =
            !req.resource_names_subscribe.is_empty() || !req.initial_resource_versions.is_empty();
        let first_for_type = !self.types.contains_key(&t);
        let state = self.types.entry(t).or_default();
        if first_for_type {
            // An empty first subscription is the legacy form of a wildcard.
            state.wildcard = req.resource_names_subscribe.is_empty();
            state.has = req
                .initial_resource_versions
                .into_iter()
                .map(|(name, version)| (name.into(), version.into()))
                .collect();
        }
        for name in req.resource_names_subscribe {
            if name == "*" {
                state.wildcard = true;
                continue;
            }
            // A (re)subscription asks for the resource even if the proxy had it.
            if !first_for_type {
                state.has.remove(name.as_str());
            }
            state.told_missing.remove(&name);
            state.names.insert(name);
        }
        for name in req.resource_names_unsubscribe {
            if name == "*" {
                state.wildcard = false;
                continue;
            }
            state.names.remove(&name);
            state.has.remove(name.as_str());
            state.told_missing.remove(&name);
        }
        if adds {
            self.held().check()?;
        }
        self.respond(t).await
    }

    async fn respond(&mut self, t: ResourceType) -> Result<(), StreamEnd> {
        let started = std::time::Instant::now();
        let Some(state) = self.types.get_mut(&t) else {
            return Ok(());
        };
        let set = self.conn.resources.get(t);
        let wants = |name: &str| state.wildcard || state.names.contains(name);
        let updates: Vec<_> = set
            .values()
            .filter(|r| wants(&r.name) && state.has.get(&r.name) != Some(&r.version))
            .cloned()
            .collect();
        let mut removed: Vec<String> = state
            .has
            .keys()
            .filter(|n| !set.contains_key(*n) || !wants(n))
            .map(|n| n.to_string())
            .collect();
        let missing: Vec<String> = state
            .names
            .iter()
            .filter(|n| {
                !set.contains_key(n.as_str())
                    && !state.has.contains_key(n.as_str())
                    && !state.told_missing.contains(*n)
            })
            .cloned()
            .collect();
        removed.extend(missing.iter().cloned());
        if updates.is_empty() && removed.is_empty() && state.answered_once {
            return Ok(());
        }
        for r in &updates {
            state.has.insert(r.name.clone(), r.version.clone());
            state.told_missing.remove(&*r.name);
        }
        for name in &removed {
            state.has.remove(name.as_str());
        }
        state.told_missing.extend(missing);
        state.answered_once = true;
        let nonce = self.conn.next_nonce();
        let guarded: Vec<_> = updates
            .iter()
            .filter(|r| fail_closed::guards(t, &r.name))
            .cloned()
            .collect();
        if !guarded.is_empty() {
            if state.unanswered.len() == MAX_UNANSWERED {
                state.unanswered.pop_front();
            }
            state.unanswered.push_back((nonce.clone(), guarded));
        }
        let version = self.conn.version.to_string();
        let now_has = state.has.len();
        let response = DeltaDiscoveryResponse {
            system_version_info: version.clone(),
            resources: updates
                .iter()
                .map(|r| DeltaResource {
                    name: r.name.to_string(),
                    version: r.version.to_string(),
                    resource: Some(r.body.clone()),
                    ..Default::default()
                })
                .collect(),
            type_url: t.type_url(),
            removed_resources: removed,
            nonce: nonce.clone(),
            ..Default::default()
        };
        tracing::debug!(
            node = %self.conn.id.node_id, type = t.short(),
            updated = response.resources.len(), removed = response.removed_resources.len(),
            "push"
        );
        let bytes = prost::Message::encoded_len(&response);
        self.conn.record_sent(t, now_has, version, nonce, bytes);
        self.tx
            .send(Box::new(Ok(response)))
            .await
            .map_err(|_| StreamEnd::Gone("the proxy went away".into()))?;
        crate::metrics::Metrics::observe(
            &crate::metrics::metrics().push_duration,
            started.elapsed(),
        );
        Ok(())
    }
}
