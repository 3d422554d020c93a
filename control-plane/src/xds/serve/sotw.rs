//! State-of-the-world ADS streams.
//!
//! Per type: the subscription (wildcard for CDS/LDS, names for EDS/RDS), the last
//! response sent (nonce, version, and the name→version of each resource in it) and
//! whether the proxy answered it. A response is sent when the set the proxy should have
//! differs from the last one sent — after a new snapshot or a changed subscription.
//! Requests carrying an older nonce than the last response are stale and ignored, as
//! the protocol says. A NACK is recorded and nothing is resent until the config
//! changes, so the proxy keeps its last accepted config — except for resources that
//! carry policy, which are replaced by deny-all versions ([`super::fail_closed`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::stream::Queued;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use tokio::sync::mpsc;

use crate::xds::translate::resources::{Resource, ResourceType, set_version};
use envoy_types::pb::envoy::config::core::v3::Node;

use super::limits::{self, Held, StreamEnd};
use super::status::XdsFlavor;
use super::stream::{ProxyConn, StreamFlavor};

#[derive(Debug)]
enum Subscription {
    Wildcard,
    Names(BTreeSet<String>),
}

#[derive(Debug)]
struct Sent {
    nonce: String,
    /// The resources sent, in name order.
    resources: Vec<Arc<Resource>>,
}

#[derive(Debug)]
struct TypeState {
    subscription: Subscription,
    sent: Option<Sent>,
}

type Tx = mpsc::Sender<Queued<DiscoveryResponse>>;

pub(crate) struct SotwStream {
    conn: ProxyConn,
    types: BTreeMap<ResourceType, TypeState>,
    tx: Tx,
}

impl SotwStream {
    /// The names this stream holds because the proxy sent them.
    fn held(&self) -> Held {
        let mut held = Held::default();
        for state in self.types.values() {
            if let Subscription::Names(names) = &state.subscription {
                names.iter().for_each(|n| held.add(n));
            }
        }
        held
    }
}

impl StreamFlavor for SotwStream {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;
    const FLAVOR: XdsFlavor = XdsFlavor::Sotw;

    fn node(req: &DiscoveryRequest) -> Option<&Node> {
        req.node.as_ref()
    }

    fn new(conn: ProxyConn, tx: Tx) -> Self {
        SotwStream {
            conn,
            types: BTreeMap::new(),
            tx,
        }
    }

    fn conn(&mut self) -> &mut ProxyConn {
        &mut self.conn
    }

    async fn on_request(&mut self, req: DiscoveryRequest) -> Result<(), StreamEnd> {
        limits::check_type_url(&req.type_url)?;
        let Some(t) = ResourceType::from_type_url(&req.type_url) else {
            self.conn.record_unknown_type(&req.type_url)?;
            return Ok(());
        };
        limits::check_names(
            std::iter::once(&req.response_nonce)
                .chain(&req.resource_names)
                .map(String::as_str),
        )?;
        let state = self.types.entry(t).or_insert(TypeState {
            subscription: Subscription::Names(BTreeSet::new()),
            sent: None,
        });
        if !req.response_nonce.is_empty() {
            let current = state.sent.as_ref().map(|s| s.nonce.as_str());
            if current != Some(req.response_nonce.as_str()) {
                tracing::trace!(node = %self.conn.id.node_id, type = t.short(), nonce = %crate::logging::Escaped(&req.response_nonce), "stale request ignored");
                return Ok(());
            }
            let sent = state.sent.as_ref().map(|s| s.resources.as_slice());
            self.conn.record_answer(
                t,
                &req.response_nonce,
                req.error_detail.as_ref().map(|e| e.message.as_str()),
                sent.unwrap_or_default(),
            );
        }
        let wildcard = t.is_wildcard_type()
            && (req.resource_names.is_empty() || req.resource_names.iter().any(|n| n == "*"));
        state.subscription = if wildcard {
            Subscription::Wildcard
        } else {
            Subscription::Names(req.resource_names.into_iter().collect())
        };
        self.held().check()?;
        self.respond(t).await
    }

    /// Sends type `t` if what the proxy should have differs from what it was last sent.
    async fn respond(&mut self, t: ResourceType) -> Result<(), StreamEnd> {
        let started = std::time::Instant::now();
        let Some(state) = self.types.get_mut(&t) else {
            return Ok(()); // never asked for
        };
        let set = self.conn.resources.get(t);
        let selected: Vec<_> = match &state.subscription {
            Subscription::Wildcard => set.values().cloned().collect(),
            Subscription::Names(names) => names
                .iter()
                .filter_map(|n| set.get(n.as_str()))
                .cloned()
                .collect(),
        };
        let same = |sent: &[Arc<Resource>]| {
            sent.len() == selected.len()
                && sent
                    .iter()
                    .zip(&selected)
                    .all(|(a, b)| a.name == b.name && a.version == b.version)
        };
        match &state.sent {
            Some(sent) if same(&sent.resources) => return Ok(()),
            // Named resources that do not exist: nothing to say yet.
            None if selected.is_empty() && matches!(state.subscription, Subscription::Names(_)) => {
                return Ok(());
            }
            _ => {}
        }
        let nonce = self.conn.next_nonce();
        let version = set_version(selected.iter().map(|r| &**r));
        let response = DiscoveryResponse {
            version_info: version.clone(),
            resources: selected.iter().map(|r| r.body.clone()).collect(),
            type_url: t.type_url(),
            nonce: nonce.clone(),
            ..Default::default()
        };
        let count = selected.len();
        state.sent = Some(Sent {
            nonce: nonce.clone(),
            resources: selected,
        });
        let bytes = prost::Message::encoded_len(&response);
        self.conn.record_sent(t, count, version, nonce, bytes);
        tracing::debug!(node = %self.conn.id.node_id, type = t.short(), resources = count, "push");
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
