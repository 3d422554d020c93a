//! Figures from the proxies' timelines: when each change reached each proxy it
//! concerns (the arrival that carried its probe), what that cost in bytes, what the
//! others received meanwhile, and, for a run that stalls, what the streams saw.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::bail;

use super::changes::{Applied, ChangeKind, counts_as_config};
use super::proxy::SharedTimeline;

/// For each proxy `change` concerns: how long until the push carrying it arrived, and
/// that push's size.
pub fn reached(change: &Applied, timelines: &[SharedTimeline]) -> Vec<Option<(Duration, usize)>> {
    change
        .concerned
        .iter()
        .map(|p| {
            let t = timelines[*p].lock().expect("timeline");
            let from = t.arrivals.partition_point(|a| a.at < change.at);
            t.arrivals[from..]
                .iter()
                .find(|a| a.carries.contains(&change.probe))
                .map(|a| (a.at - change.at, a.bytes))
        })
        .collect()
}

/// Waits until `change` (number `k`) reached every proxy it concerns, for up to
/// `timeout`.
pub async fn wait_reached(
    change: &Applied,
    timelines: &[SharedTimeline],
    k: usize,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = change.at + timeout;
    loop {
        let missing = (reached(change, timelines).iter())
            .filter(|r| r.is_none())
            .count();
        if missing == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "change {k} ({:?}) did not reach {missing} of {} proxies within {timeout:?}",
                change.kind,
                change.concerned.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The figures of one kind of change.
#[derive(Debug, serde::Serialize)]
pub struct KindReport {
    pub kind: ChangeKind,
    pub changes: usize,
    /// Proxies each change concerns, on average.
    pub proxies_per_change: f64,
    pub convergence_p50_ms: f64,
    pub convergence_p99_ms: f64,
    pub convergence_max_ms: f64,
    /// What one concerned proxy received for one change.
    pub bytes_per_proxy_per_change: f64,
    /// What proxies the change does not concern received (should be 0); only measured
    /// when changes run one after the other (at a rate, pushes of one change overlap
    /// the next).
    pub bytes_to_others: Option<usize>,
}

/// The figures of the changes `of_kind` (of all changes `all`).
pub fn kind_report(
    kind: ChangeKind,
    of_kind: &[&Applied],
    all: &[Applied],
    timelines: &[SharedTimeline],
    sequential: bool,
) -> KindReport {
    let mut convergence: Vec<Duration> = Vec::new();
    let mut bytes: Vec<usize> = Vec::new();
    let mut bytes_to_others = 0;
    for change in of_kind {
        for (d, b) in reached(change, timelines).into_iter().flatten() {
            convergence.push(d);
            bytes.push(b);
        }
        // What proxies it does not concern received between it and the next change
        // (or the end), when no other change concerns them in that span.
        let index = (all.iter())
            .position(|a| a.probe == change.probe)
            .expect("a change of the run");
        let until = all.get(index + 1).map(|n| n.at);
        let busy: HashSet<usize> = all
            .iter()
            .filter(|a| a.probe != change.probe)
            .filter(|a| until.is_none_or(|u| a.at < u) && a.at >= change.at)
            .flat_map(|a| a.concerned.iter().copied())
            .collect();
        let concerned: HashSet<usize> = change.concerned.iter().copied().collect();
        for (p, t) in timelines.iter().enumerate() {
            if concerned.contains(&p) || busy.contains(&p) {
                continue;
            }
            let t = t.lock().expect("timeline");
            let from = t.arrivals.partition_point(|a| a.at < change.at);
            for a in t.arrivals[from..]
                .iter()
                .filter(|a| until.is_none_or(|u| a.at < u) && counts_as_config(a.type_url))
            {
                if std::env::var("XDS_LOAD_DEBUG").is_ok() {
                    eprintln!(
                        "{kind:?}: proxy {p} got {} {:?} {}",
                        a.type_url, a.names, a.bytes
                    );
                }
                bytes_to_others += a.bytes;
            }
        }
    }
    convergence.sort();
    let pct = |p: f64| -> f64 {
        if convergence.is_empty() {
            return 0.0;
        }
        let i = ((convergence.len() as f64 - 1.0) * p).round() as usize;
        convergence[i].as_secs_f64() * 1e3
    };
    KindReport {
        kind,
        changes: of_kind.len(),
        proxies_per_change: of_kind.iter().map(|a| a.concerned.len()).sum::<usize>() as f64
            / of_kind.len().max(1) as f64,
        convergence_p50_ms: pct(0.5),
        convergence_p99_ms: pct(0.99),
        convergence_max_ms: pct(1.0),
        bytes_per_proxy_per_change: bytes.iter().sum::<usize>() as f64 / bytes.len().max(1) as f64,
        bytes_to_others: sequential.then_some(bytes_to_others),
    }
}

/// Proxies whose config is complete.
pub fn completed(timelines: &[SharedTimeline]) -> usize {
    (timelines.iter())
        .filter(|t| t.lock().expect("timeline").complete.is_some())
        .count()
}

/// (reconnects in all, proxies that reconnected at least once, the last error one saw).
pub fn reconnects(timelines: &[SharedTimeline]) -> (usize, usize, Option<String>) {
    let mut total = 0;
    let mut proxies = 0;
    let mut error = None;
    for t in timelines {
        let t = t.lock().expect("timeline");
        total += t.reconnects;
        proxies += usize::from(t.reconnects > 0);
        if t.error.is_some() {
            error.clone_from(&t.error);
        }
    }
    (total, proxies, error)
}

/// What the incomplete proxies' streams saw, for a run that stalls: how many are in
/// each state, the most common first, e.g. `5 stream open, waiting for the first
/// response`, `2 missing SDS` or `3 reconnecting after: <error>`.
pub fn stalled(timelines: &[SharedTimeline]) -> String {
    let mut states: BTreeMap<String, usize> = BTreeMap::new();
    let mut responses = 0;
    for t in timelines {
        let t = t.lock().expect("timeline");
        responses += t.arrivals.len();
        if t.complete.is_none() {
            *states.entry(t.state.clone()).or_default() += 1;
        }
    }
    let mut states: Vec<(String, usize)> = states.into_iter().collect();
    states.sort_by_key(|s| std::cmp::Reverse(s.1));
    let (reconnects, _, _) = reconnects(timelines);
    let mut text: Vec<String> = (states.iter().take(5))
        .map(|(state, n)| format!("{n} {state}"))
        .collect();
    if states.len() > 5 {
        text.push(format!("{} other states", states.len() - 5));
    }
    format!(
        "{}; {responses} responses and {reconnects} reconnects in all",
        text.join("; ")
    )
}
