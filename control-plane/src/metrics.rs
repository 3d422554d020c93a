//! meshd's Prometheus metrics, served at `GET /metrics` on the health port.
//!
//! | metric | what |
//! |---|---|
//! | `meshd_connected_proxies` | ADS streams identified as a proxy right now |
//! | `meshd_xds_pushes_total{type}` | responses sent, by type (`cds`, `eds`, …) |
//! | `meshd_xds_sent_bytes_total{type}` | encoded bytes of those responses |
//! | `meshd_xds_nacks_total{type}` | responses a proxy rejected |
//! | `meshd_xds_push_duration_seconds` | building and queueing one response |
//! | `meshd_xds_convergence_seconds` | from the first change of a burst until a proxy has ACKed the snapshot with it |
//! | `meshd_xds_woken_streams` | streams one xDS snapshot woke: those it concerns ([`crate::xds::serve::wake`]) |
//! | `meshd_snapshot_debounce_seconds` | from the first change of a burst until its snapshot is published |
//! | `meshd_snapshot_build_seconds` | deriving one mesh snapshot |
//! | `meshd_snapshots_total` | mesh snapshots published |
//! | `meshd_tls_handshake_failures_total{port}` | TLS handshakes refused or timed out on the `xds` / `admin` port |
//! | `meshd_xds_fail_closed_resources` | inbound listeners and routes served as deny-all right now, because their proxy rejected the compiled policy ([`crate::xds::serve::fail_closed`]) |
//! | `meshd_ca_signed_total{auth}` | certificates signed for a CSR, by how the caller authenticated (`token`, `certificate`) |
//! | `meshd_ca_refused_total{reason}` | CA calls refused, by the check that failed (`token_expired`, `csr_identity`, `pod_uid`, …) |
//! | `meshd_token_reviews_total{reason}` | TokenReviews sent to the API server, by outcome (`authenticated`, `token_refused`, …) |
//! | `meshd_xds_refused_streams_total{reason}` | ADS streams ended by meshd for exceeding a limit (`request_size`, `type_urls`, `names`, `name_length`) |
//! | `meshd_workload_policy_pods{policy}` | running pods a WorkloadPolicy applies to (Lease holder only, [`crate::cluster::admission_report`]) |
//! | `meshd_workload_policy_violating_pods{policy,mode}` | of those, the pods that break it |
//! | `meshd_workload_policy_rule_violating_pods{policy,mode,rule}` | the pods that break one rule of it (only rules some pod breaks) |
//!
//! One process-wide set ([`metrics()`]): metrics are a property of the process, and
//! passing a handle through every layer would buy nothing.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabel {
    pub r#type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PortLabel {
    pub port: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthLabel {
    pub auth: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// A WorkloadPolicy, `namespace/name`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct PolicyLabel {
    pub policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct PolicyModeLabel {
    pub policy: String,
    pub mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct PolicyRuleLabel {
    pub policy: String,
    pub mode: &'static str,
    /// A Pod Security Standards control id or a rule name.
    pub rule: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub connected_proxies: Gauge,
    pub pushes: Family<TypeLabel, Counter>,
    pub sent_bytes: Family<TypeLabel, Counter>,
    pub nacks: Family<TypeLabel, Counter>,
    pub push_duration: Histogram,
    pub convergence: Histogram,
    pub woken_streams: Histogram,
    pub debounce: Histogram,
    pub snapshot_build: Histogram,
    pub snapshots: Counter,
    pub handshake_failures: Family<PortLabel, Counter>,
    pub refused_streams: Family<ReasonLabel, Counter>,
    pub fail_closed: Gauge,
    pub ca_signed: Family<AuthLabel, Counter>,
    pub ca_refused: Family<ReasonLabel, Counter>,
    pub token_reviews: Family<ReasonLabel, Counter>,
    pub admission_reviews: Family<AdmissionLabel, Counter>,
    pub admission_duration: Histogram,
    pub admission_violations: Family<PolicyRuleLabel, Counter>,
    pub workload_policy_pods: Family<PolicyLabel, Gauge>,
    pub workload_policy_violating_pods: Family<PolicyModeLabel, Gauge>,
    pub workload_policy_rule_violating_pods: Family<PolicyRuleLabel, Gauge>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdmissionLabel {
    /// The webhook's path, e.g. `/inject`.
    pub webhook: &'static str,
    /// What it answered: `injected`, `unchanged`, `denied`, `invalid`.
    pub result: &'static str,
}

/// 0.5 ms … ~65 s.
fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.0005, 2.0, 18)
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let mut registry = Registry::with_prefix("meshd");
    let m = Metrics {
        connected_proxies: Gauge::default(),
        pushes: Family::default(),
        sent_bytes: Family::default(),
        nacks: Family::default(),
        push_duration: Histogram::new(latency_buckets()),
        convergence: Histogram::new(latency_buckets()),
        // 1 … ~500,000 streams.
        woken_streams: Histogram::new(exponential_buckets(1.0, 4.0, 10)),
        debounce: Histogram::new(latency_buckets()),
        snapshot_build: Histogram::new(latency_buckets()),
        snapshots: Counter::default(),
        handshake_failures: Family::default(),
        refused_streams: Family::default(),
        fail_closed: Gauge::default(),
        ca_signed: Family::default(),
        ca_refused: Family::default(),
        token_reviews: Family::default(),
        admission_reviews: Family::default(),
        admission_duration: Histogram::new(exponential_buckets(0.00005, 2.0, 16)),
        admission_violations: Family::default(),
        workload_policy_pods: Family::default(),
        workload_policy_violating_pods: Family::default(),
        workload_policy_rule_violating_pods: Family::default(),
        registry: Registry::default(),
    };
    registry.register(
        "connected_proxies",
        "ADS streams identified as a proxy",
        m.connected_proxies.clone(),
    );
    registry.register(
        "xds_pushes",
        "xDS responses sent, by type",
        m.pushes.clone(),
    );
    registry.register(
        "xds_sent_bytes",
        "Encoded bytes of xDS responses sent, by type",
        m.sent_bytes.clone(),
    );
    registry.register(
        "xds_nacks",
        "xDS responses rejected by proxies, by type",
        m.nacks.clone(),
    );
    registry.register(
        "xds_push_duration_seconds",
        "Time to build and queue one xDS response",
        m.push_duration.clone(),
    );
    registry.register(
        "xds_convergence_seconds",
        "From the first change of a burst until a proxy ACKed the snapshot holding it",
        m.convergence.clone(),
    );
    registry.register(
        "xds_woken_streams",
        "ADS streams one xDS snapshot woke (the ones it concerns)",
        m.woken_streams.clone(),
    );
    registry.register(
        "snapshot_debounce_seconds",
        "From the first change of a burst until its snapshot is published",
        m.debounce.clone(),
    );
    registry.register(
        "snapshot_build_seconds",
        "Time to derive one mesh snapshot",
        m.snapshot_build.clone(),
    );
    registry.register("snapshots", "Mesh snapshots published", m.snapshots.clone());
    registry.register(
        "tls_handshake_failures",
        "TLS handshakes refused or timed out, by port",
        m.handshake_failures.clone(),
    );
    registry.register(
        "xds_refused_streams",
        "ADS streams ended for exceeding a limit, by reason",
        m.refused_streams.clone(),
    );
    registry.register(
        "xds_fail_closed_resources",
        "Inbound listeners and routes served as deny-all because their proxy rejected the compiled policy",
        m.fail_closed.clone(),
    );
    registry.register(
        "ca_signed",
        "Certificates signed for a CSR, by how the caller authenticated",
        m.ca_signed.clone(),
    );
    registry.register(
        "ca_refused",
        "CA calls refused, by the check that failed",
        m.ca_refused.clone(),
    );
    registry.register(
        "token_reviews",
        "TokenReviews sent to the API server, by outcome",
        m.token_reviews.clone(),
    );
    registry.register(
        "admission_reviews",
        "AdmissionReviews answered, by webhook and answer",
        m.admission_reviews.clone(),
    );
    registry.register(
        "admission_review_duration_seconds",
        "Time to answer one AdmissionReview, from its body to the answer",
        m.admission_duration.clone(),
    );
    registry.register(
        "admission_policy_violations",
        "Violations the validating webhook found in the objects it reviewed, by policy, mode and rule (Audit ones are admitted and only counted here)",
        m.admission_violations.clone(),
    );
    registry.register(
        "workload_policy_pods",
        "Running pods a WorkloadPolicy applies to (on the Lease holder)",
        m.workload_policy_pods.clone(),
    );
    registry.register(
        "workload_policy_violating_pods",
        "Running pods that break a WorkloadPolicy (on the Lease holder)",
        m.workload_policy_violating_pods.clone(),
    );
    registry.register(
        "workload_policy_rule_violating_pods",
        "Running pods that break one rule of a WorkloadPolicy (on the Lease holder)",
        m.workload_policy_rule_violating_pods.clone(),
    );
    Metrics { registry, ..m }
});

pub fn metrics() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    pub fn observe(histogram: &Histogram, d: Duration) {
        histogram.observe(d.as_secs_f64());
    }
}
