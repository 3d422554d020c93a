//! Envoy's admin API on 127.0.0.1, over plain HTTP/1 with hyper: what readiness and
//! draining need, nothing else.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;

/// One admin request may take this long.
const TIMEOUT: Duration = Duration::from_secs(2);

/// The counters that say Envoy accepted meshd's clusters and listeners.
pub const CDS_ACCEPTED: &str = "cluster_manager.cds.update_success";
pub const LDS_ACCEPTED: &str = "listener_manager.lds.update_success";

#[derive(Debug, Clone, Copy)]
pub struct EnvoyAdmin {
    port: u16,
}

/// Whether Envoy serves its full config, and if not, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    NotReady(String),
}

impl EnvoyAdmin {
    pub fn new(port: u16) -> EnvoyAdmin {
        EnvoyAdmin { port }
    }

    async fn request(&self, method: Method, path: &str) -> anyhow::Result<(StatusCode, String)> {
        tokio::time::timeout(TIMEOUT, self.request_now(method, path))
            .await
            .with_context(|| format!("no answer within {TIMEOUT:?}"))?
    }

    async fn request_now(
        &self,
        method: Method,
        path: &str,
    ) -> anyhow::Result<(StatusCode, String)> {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        // The connection is driven beside the request and ends with it.
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "127.0.0.1")
            .body(Empty::<Bytes>::new())?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    /// `/ready`: Envoy's server state (`LIVE`, `PRE_INITIALIZING`, ...).
    pub async fn server_state(&self) -> anyhow::Result<String> {
        let (_, body) = self.request(Method::GET, "/ready").await?;
        Ok(body.trim().to_string())
    }

    /// Counters and gauges whose names contain `filter` (a regex on Envoy's side).
    pub async fn stats(&self, filter: &str) -> anyhow::Result<BTreeMap<String, u64>> {
        let (status, body) = self
            .request(Method::GET, &format!("/stats?filter={filter}"))
            .await?;
        if !status.is_success() {
            bail!("/stats: {status}");
        }
        Ok(parse_stats(&body))
    }

    /// Ready when Envoy is LIVE and has accepted listeners and clusters from meshd.
    pub async fn readiness(&self) -> Readiness {
        let state = match self.server_state().await {
            Ok(state) => state,
            Err(e) => {
                return Readiness::NotReady(format!(
                    "envoy's admin on 127.0.0.1:{} does not answer: {e:#}",
                    self.port
                ));
            }
        };
        if state != "LIVE" {
            return Readiness::NotReady(format!("envoy is {state}, not LIVE"));
        }
        let stats = match self.stats("update_success").await {
            Ok(stats) => stats,
            Err(e) => return Readiness::NotReady(format!("envoy's stats: {e:#}")),
        };
        for (stat, what) in [(CDS_ACCEPTED, "clusters"), (LDS_ACCEPTED, "listeners")] {
            let n = stats.get(stat).copied().unwrap_or(0);
            if n == 0 {
                return Readiness::NotReady(format!(
                    "envoy has accepted no {what} from meshd yet ({stat} = 0)"
                ));
            }
        }
        Readiness::Ready
    }

    /// Starts Envoy's graceful drain of every listener.
    pub async fn drain_listeners(&self) -> anyhow::Result<()> {
        let (status, body) = self
            .request(Method::POST, "/drain_listeners?graceful")
            .await?;
        if !status.is_success() {
            bail!("/drain_listeners: {status}: {}", body.trim());
        }
        Ok(())
    }

    /// Open downstream connections on Envoy's listeners (its admin's own not counted).
    pub async fn active_downstream_connections(&self) -> anyhow::Result<u64> {
        let stats = self.stats("downstream_cx_active").await?;
        Ok(stats
            .iter()
            .filter(|(name, _)| {
                name.starts_with("listener.")
                    && name.ends_with(".downstream_cx_active")
                    && !name.starts_with("listener.admin.")
                    && !name.contains(".worker_")
            })
            .map(|(_, n)| n)
            .sum())
    }
}

/// Envoy's text stats (`name: value` per line); histograms and other non-numbers are
/// left out.
fn parse_stats(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|line| {
            let (name, value) = line.split_once(": ")?;
            Some((name.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_text_is_read_by_name() {
        let stats = parse_stats(
            "cluster_manager.cds.update_success: 2\n\
             listener.127.0.0.1_15001.downstream_cx_active: 1\n\
             listener.127.0.0.1_15001.worker_0.downstream_cx_active: 1\n\
             http.inbound.downstream_rq_time: P0(nan,0) P25(nan,0)\n",
        );
        assert_eq!(stats.get(CDS_ACCEPTED), Some(&2));
        assert_eq!(stats.len(), 3);
    }
}
