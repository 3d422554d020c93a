//! A NACK of a resource that carries policy fails closed.
//!
//! When a sidecar rejects an update, Envoy keeps the version it had. For most resources
//! that is the right outcome; for one that carries a port's authorization policy it means
//! the older — perhaps looser — policy silently stays in force. So, per stream and per
//! resource name, for the **guarded** resources (a workload's inbound listeners and
//! inbound routes, which carry its RBAC):
//!
//! 1. **Rejected.** A NACK names no resource reliably, so every guarded resource of the
//!    rejected response that the proxy had not accepted at that version is taken as
//!    rejected (Envoy may have applied some of a partly rejected response, or stopped at
//!    the first failure, so none of them can be trusted). Each is recorded with the
//!    compiled version that was rejected.
//! 2. **Denying.** While the compiled version is still the rejected one, the proxy is
//!    served instead a version of the resource that denies every request on it
//!    ([`XdsSnapshot::denying`]: a direct 403 with `x-meshd-denied-by: invalid-policy: …`
//!    on HTTP, a deny-all network RBAC on TCP). Both flavours push it as they push any
//!    changed resource. It is reported as a problem of the proxy (`meshctl status`, the
//!    log) and counted in `meshd_xds_fail_closed_resources`.
//! 3. **Retried.** When the config changes and the resource compiles to another version,
//!    that version is sent (never the rejected one again). If the proxy accepts it, the
//!    rejection is forgotten: the compiled policy is back. If it rejects it, step 1 again.
//!
//! A rejection also ends when the resource leaves the proxy's config, and with the stream
//! (a reconnecting proxy is sent the compiled version and answers anew). A rejected
//! deny-all version is only recorded as a NACK: there is nothing safer to send.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::status::now_rfc3339;
use crate::logging::Escaped;
use crate::metrics::metrics;
use crate::model::ObjectKey;
use crate::xds::translate::cache::XdsSnapshot;
use crate::xds::translate::resources::{ProxyResources, Resource, ResourceType};

/// The longest part of Envoy's reason kept in a problem line.
const REASON_BYTES: usize = 300;

type Key = (ResourceType, Arc<str>);

#[derive(Debug)]
struct Rejection {
    /// The compiled version the proxy rejected.
    version: Arc<str>,
    /// The deny-all resource served instead, once it is. Built once: its per-filter
    /// configs are a protobuf map, which encodes in hash order, and another encoding
    /// would be another version and another push.
    denying: Option<Arc<Resource>>,
    /// Envoy's reason, shortened and escaped.
    reason: String,
    at: String,
}

/// One stream's guarded resources: what the proxy accepted, and what it rejected.
#[derive(Debug, Default)]
pub(crate) struct FailClosed {
    accepted: HashMap<Key, Arc<str>>,
    rejected: BTreeMap<Key, Rejection>,
}

/// Whether resource `name` of type `t` carries a workload's policy.
pub fn guards(t: ResourceType, name: &str) -> bool {
    matches!(t, ResourceType::Listener | ResourceType::Route) && name.starts_with("inbound|")
}

impl FailClosed {
    /// The proxy rejected a response of type `t` that held `sent`; Envoy said
    /// `message`. Returns whether a resource is newly rejected.
    pub fn on_nack(&mut self, t: ResourceType, sent: &[Arc<Resource>], message: &str) -> bool {
        let mut changed = false;
        for r in sent.iter().filter(|r| guards(t, &r.name)) {
            let key = (t, r.name.clone());
            if self.accepted.get(&key) == Some(&r.version) {
                continue;
            }
            if let Some(old) = self.rejected.get(&key) {
                if old.version == r.version || old.is_denying(&r.version) {
                    // Already denying; a rejected deny-all version has no fallback.
                    continue;
                }
            } else {
                metrics().fail_closed.inc();
            }
            // Logged as the proxy's new problem line (see `problems`).
            self.rejected.insert(
                key,
                Rejection {
                    version: r.version.clone(),
                    denying: None,
                    reason: reason(message),
                    at: now_rfc3339(),
                },
            );
            changed = true;
        }
        changed
    }

    /// The proxy `node` accepted a response of type `t` that held `sent`. Returns
    /// whether a rejection ended (the compiled policy is back).
    pub fn on_ack(&mut self, node: &str, t: ResourceType, sent: &[Arc<Resource>]) -> bool {
        let mut changed = false;
        for r in sent.iter().filter(|r| guards(t, &r.name)) {
            let key = (t, r.name.clone());
            self.accepted.insert(key.clone(), r.version.clone());
            let restored = self
                .rejected
                .get(&key)
                .is_some_and(|rej| rej.version != r.version && !rej.is_denying(&r.version));
            if restored {
                self.rejected.remove(&key);
                metrics().fail_closed.dec();
                tracing::info!(
                    node = %Escaped(node), type = t.short(), resource = %Escaped(&r.name),
                    "proxy accepted the compiled policy again; no longer denying everything"
                );
                changed = true;
            }
        }
        changed
    }

    /// Serves the deny-all version in `resources` for every resource whose compiled
    /// version is the rejected one; forgets rejections of resources that are gone.
    pub fn apply(
        &mut self,
        snapshot: &XdsSnapshot,
        workload: &ObjectKey,
        resources: &mut ProxyResources,
    ) {
        self.accepted
            .retain(|(t, name), _| resources.get(*t).contains_key(name));
        self.rejected.retain(|(t, name), rej| {
            let Some(compiled) = resources.get(*t).get(name) else {
                metrics().fail_closed.dec();
                return false;
            };
            if compiled.version == rej.version {
                if rej.denying.is_none() {
                    rej.denying = snapshot.denying(workload, *t, name);
                }
                if let Some(denying) = &rej.denying {
                    resources.insert(*t, denying.clone());
                }
            }
            true
        });
    }

    /// One line per resource served as deny-all, for the proxy's problems.
    pub fn problems(&self) -> impl Iterator<Item = String> + '_ {
        self.rejected.iter().map(|((t, name), rej)| {
            format!(
                "{} {}: the proxy rejected the policy meshd compiled for it ({}, at {}); \
                 every request on it is denied (invalid-policy) until a changed policy is accepted",
                t.short(),
                Escaped(name),
                rej.reason,
                rej.at
            )
        })
    }
}

impl Rejection {
    fn is_denying(&self, version: &str) -> bool {
        self.denying
            .as_ref()
            .is_some_and(|d| &*d.version == version)
    }
}

impl Drop for FailClosed {
    fn drop(&mut self) {
        metrics().fail_closed.dec_by(self.rejected.len() as i64);
    }
}

/// The gist of Envoy's NACK message: its last line (Envoy puts the reason after a dump
/// of the rejected proto), shortened and escaped for logs and `meshctl status`.
fn reason(message: &str) -> String {
    let last = message
        .lines()
        .rev()
        .map(|l| l.trim().trim_start_matches(':').trim())
        .find(|l| !l.is_empty())
        .unwrap_or("no reason given");
    let mut end = last.len().min(REASON_BYTES);
    while !last.is_char_boundary(end) {
        end -= 1;
    }
    let cut = if end < last.len() { "…" } else { "" };
    format!("{}{cut}", Escaped(&last[..end]))
}
