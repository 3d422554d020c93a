//! Changes to a running scenario, made by writing its config directory as meshd's
//! file source sees a cluster change (a server under `--target` or `--server-cmd` must
//! follow the same files), and how to recognise each change's own push.
//!
//! Each change registers a probe ([`Probes::add`]) before it touches a file: an EDS
//! change is carried by the assignment of its service's cluster that has (or, for a
//! removal, no longer has) the pod's address; a policy change by a route that names
//! its own namespace (`caller-<k>-ns`) or a later policy change's, which replaces it.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::bail;
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
use prost::Message;

use super::proxy::{ProbeFn, Probes, SDS};
use super::scenario::{EgressScope, NAMESPACE, Scenario, ip};
use crate::xds_client::{EDS, RDS};

/// The kinds of change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChangeKind {
    /// A new backend pod for one service (its callers get new EDS).
    EndpointAdd,
    /// The oldest of those pods goes away again.
    EndpointRemove,
    /// One of a service's pods is replaced by one with a new name and IP.
    PodRoll,
    /// A Service nobody calls (no proxy should receive anything).
    ServiceAdd,
    /// The AuthorizationPolicy on every client (each proxy's inbound route).
    Policy,
}

/// One change made, and who must receive it.
#[derive(Debug, Clone)]
pub struct Applied {
    pub kind: ChangeKind,
    /// When it was made (its probe counts from here).
    pub at: Instant,
    /// Proxies that must receive it.
    pub concerned: Vec<usize>,
    /// The probe an arrival carries when it brings this change.
    pub probe: usize,
}

/// Writes changes into the scenario's directory.
pub struct ChangeWriter<'a> {
    scenario: &'a Scenario,
    dir: &'a Path,
    probes: Probes,
    /// Pods of `endpoint-add` changes not yet removed, oldest first.
    added: VecDeque<Added>,
}

enum Edit {
    Write(PathBuf, String),
    Remove(PathBuf),
}

struct Added {
    file: PathBuf,
    service: usize,
    address: String,
    /// Index of the change that added it.
    change: usize,
}

impl<'a> ChangeWriter<'a> {
    pub fn new(scenario: &'a Scenario, dir: &'a Path, probes: Probes) -> Self {
        ChangeWriter {
            scenario,
            dir,
            probes,
            added: Default::default(),
        }
    }

    /// The change whose pod the next `endpoint-remove` removes.
    pub fn next_removal(&self) -> Option<usize> {
        self.added.front().map(|a| a.change)
    }

    /// Makes change `k` of `kind`.
    pub fn apply(&mut self, kind: ChangeKind, k: usize) -> anyhow::Result<Applied> {
        let sc = self.scenario;
        let svc = (k * 13) % sc.services;
        // A fresh address for every pod a change creates.
        let address = sc.endpoints + k;
        let (concerned, carries, edit) = match kind {
            ChangeKind::EndpointAdd => {
                let file = self.dir.join(format!("endpoint-{k}.yaml"));
                self.added.push_back(Added {
                    file: file.clone(),
                    service: svc,
                    address: ip(address),
                    change: k,
                });
                let edit = Edit::Write(file, sc.backend(address, svc));
                (self.callers(svc), endpoint(svc, ip(address), true), edit)
            }
            ChangeKind::EndpointRemove => {
                let Some(added) = self.added.pop_front() else {
                    bail!("endpoint-remove needs an endpoint-add before it (--kinds)");
                };
                let carries = endpoint(added.service, added.address, false);
                (
                    self.callers(added.service),
                    carries,
                    Edit::Remove(added.file),
                )
            }
            // The file holds one pod of the service: rewriting it replaces that pod by
            // one with a new name and address in one step, as a rollout does.
            ChangeKind::PodRoll => {
                let file = self.dir.join(Scenario::roll_file(svc));
                let edit = Edit::Write(file, sc.pod(&format!("roll-{svc}-{k}"), address, svc));
                (self.callers(svc), endpoint(svc, ip(address), true), edit)
            }
            ChangeKind::ServiceAdd => {
                let edit = Edit::Write(
                    self.dir.join(format!("service-{k}.yaml")),
                    format!(
                        "apiVersion: v1\nkind: Service\nmetadata: {{name: added-{k}, namespace: {NAMESPACE}}}\nspec:\n  selector: {{app: {}}}\n  ports: [{{name: http, port: 80, targetPort: 8080, appProtocol: http}}]\n",
                        Scenario::service(svc)
                    ),
                );
                let nothing: ProbeFn = Box::new(|_, _, _| false);
                (Vec::new(), nothing, edit)
            }
            ChangeKind::Policy => {
                let edit = Edit::Write(
                    self.dir.join("policy.yaml"),
                    format!(
                        "apiVersion: security.meshd.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: clients, namespace: {NAMESPACE}}}\nspec:\n  selector: {{matchLabels: {{app: client}}}}\n  action: ALLOW\n  rules:\n    - from: [{{source: {{namespaces: [{NAMESPACE}, caller-{k}-ns]}}}}]\n"
                    ),
                );
                let carries = policy_from(k);
                ((0..sc.proxies).collect(), carries, edit)
            }
        };
        let (probe, at) = self.probes.add(carries);
        match edit {
            Edit::Write(file, text) => std::fs::write(file, text)?,
            Edit::Remove(file) => std::fs::remove_file(file)?,
        }
        Ok(Applied {
            kind,
            at,
            concerned,
            probe,
        })
    }

    /// The proxies that call service `svc`.
    fn callers(&self, svc: usize) -> Vec<usize> {
        let sc = self.scenario;
        // A transparent proxy without a scope of its own covers its namespace: all.
        let everyone =
            sc.egress == Some(EgressScope::All) || (sc.transparent && sc.egress.is_none());
        (0..sc.proxies)
            .filter(|p| everyone || sc.upstreams_of(*p).contains(&svc))
            .collect()
    }
}

/// An endpoint assignment of service `svc`'s cluster that has (`present`) or lacks the
/// endpoint at `address`.
pub fn endpoint(svc: usize, address: String, present: bool) -> ProbeFn {
    let host = format!("{}.{NAMESPACE}.", Scenario::service(svc));
    Box::new(move |type_url, name, value| {
        type_url == EDS
            && names_host(name, &host)
            && ClusterLoadAssignment::decode(value).is_ok_and(|cla| {
                let has = cla
                    .endpoints
                    .iter()
                    .flat_map(|l| &l.lb_endpoints)
                    .any(|e| match &e.host_identifier {
                        Some(lb_endpoint::HostIdentifier::Endpoint(e)) => e
                            .address
                            .as_ref()
                            .and_then(|a| a.address.as_ref())
                            .is_some_and(|a| match a {
                                envoy_types::pb::envoy::config::core::v3::address::Address::SocketAddress(s) => s.address == address,
                                _ => false,
                            }),
                        _ => false,
                    });
                has == present
            })
    })
}

/// A route configuration carrying policy change `k` or a later one: each rewrites the
/// same policy, so a later one replaces it, and a server may push both in one
/// snapshot (the newest state wins). It names the change's namespace,
/// `caller-<j>-ns`.
pub fn policy_from(k: usize) -> ProbeFn {
    Box::new(move |type_url, _, value| type_url == RDS && policy_changes(value).any(|j| j >= k))
}

/// The `j` of every `caller-<j>-ns` in `bytes`.
fn policy_changes(bytes: &[u8]) -> impl Iterator<Item = usize> + '_ {
    const PREFIX: &[u8] = b"caller-";
    (0..bytes.len().saturating_sub(PREFIX.len())).filter_map(|i| {
        let rest = bytes[i..].strip_prefix(PREFIX)?;
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        rest[digits..].starts_with(b"-ns").then_some(())?;
        std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
    })
}

/// Whether the cluster `name` is for the host starting `host` (`svc3.load.`), not for
/// one that merely ends with it (`xsvc3.load.`).
fn names_host(name: &str, host: &str) -> bool {
    name.match_indices(host)
        .any(|(i, _)| i == 0 || !name.as_bytes()[i - 1].is_ascii_alphanumeric())
}

/// Whether an arrival of `type_url` counts as config a proxy received (secrets are
/// per proxy and rotate on their own).
pub fn counts_as_config(type_url: &str) -> bool {
    type_url != SDS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_change_is_carried_by_its_own_route_or_a_later_ones() {
        let route = |ns: &str| format!("\x12\x10/ns/{ns}/sa/\x1a").into_bytes();
        let carries = policy_from(2);
        assert!(carries(RDS, "inbound|8080", &route("caller-2-ns")));
        assert!(carries(RDS, "inbound|8080", &route("caller-12-ns")));
        assert!(!carries(RDS, "inbound|8080", &route("caller-1-ns")));
        assert!(!carries(RDS, "inbound|8080", &route("caller-2x-ns")));
        assert!(!carries(EDS, "inbound|8080", &route("caller-2-ns")));
    }
}
