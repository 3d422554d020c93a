//! Probes as the kubelet sends them: from the node (the lab's bridge namespace, which has
//! the node's address on the bridge) to the pod's IP.
//!
//! - `httpGet`: `GET scheme://host:port/path` with `User-Agent: kube-probe/1.33` and
//!   `Accept: */*` unless `httpHeaders` set them, `Connection: close`, `httpHeaders` added (a `Host` header
//!   sets the request's host), `host` defaulting to the pod's IP, the port by number or
//!   by the container's named port. Success is a status in 200..400; redirects are
//!   followed (at most 10) only to the same host, any other redirect counts as its 3xx.
//!   At most 10 KiB of the body is read. `HTTPS` is not supported (this harness's HTTP
//!   client has no TLS): an error.
//! - `tcpSocket`: a connection opened within the timeout.
//! - `grpc`: `grpc.health.v1.Health/Check` for `service` (default ""), success when
//!   SERVING.
//! - `exec`: an error (no runtime to exec in).
//!
//! `timeoutSeconds` (default 1) bounds each attempt.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::netns::Netns;

/// The kubelet's version in its probes' User-Agent (the API the harness speaks).
const USER_AGENT: &str = "kube-probe/1.33";
/// The kubelet reads at most this much of a probe's response body.
const MAX_BODY: usize = 10 * 1024;

/// Which of a container's probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProbeKind {
    Startup,
    Readiness,
    Liveness,
}

impl ProbeKind {
    pub fn of(self, container: &Container) -> Option<&Probe> {
        match self {
            ProbeKind::Startup => container.startup_probe.as_ref(),
            ProbeKind::Readiness => container.readiness_probe.as_ref(),
            ProbeKind::Liveness => container.liveness_probe.as_ref(),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ProbeKind::Startup => "startupProbe",
            ProbeKind::Readiness => "readinessProbe",
            ProbeKind::Liveness => "livenessProbe",
        }
    }
}

/// What one probe attempt saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeOutcome {
    pub success: bool,
    /// The HTTP status (httpGet only).
    pub status: Option<u16>,
    /// The start of the response body (httpGet), or why the probe failed.
    pub detail: String,
}

/// The probe's timing, with Kubernetes' defaults.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

impl Timing {
    pub fn of(probe: &Probe) -> Timing {
        let secs = |v: Option<i32>, default: i32, min: i32| {
            Duration::from_secs(v.unwrap_or(default).max(min) as u64)
        };
        let count = |v: Option<i32>, default: i32| v.unwrap_or(default).max(1) as u32;
        Timing {
            initial_delay: secs(probe.initial_delay_seconds, 0, 0),
            period: secs(probe.period_seconds, 10, 1),
            timeout: secs(probe.timeout_seconds, 1, 1),
            success_threshold: count(probe.success_threshold, 1),
            failure_threshold: count(probe.failure_threshold, 3),
        }
    }
}

/// Sends probes from the node to a pod.
#[derive(Debug, Clone)]
pub struct Prober {
    pub node: Netns,
    pub pod_ip: Ipv4Addr,
}

impl Prober {
    /// One attempt of `probe` of `container`. An error is a probe the harness cannot
    /// send; a failed probe is `Ok` with `success: false`.
    pub async fn probe(
        &self,
        container: &Container,
        probe: &Probe,
    ) -> anyhow::Result<ProbeOutcome> {
        let timeout = Timing::of(probe).timeout;
        if let Some(http) = &probe.http_get {
            let scheme = http.scheme.as_deref().unwrap_or("HTTP");
            if !scheme.eq_ignore_ascii_case("HTTP") {
                bail!("httpGet.scheme {scheme:?}: only HTTP probes are supported by the harness");
            }
            let port = port(container, &http.port)?;
            let host = http.host.clone().unwrap_or_else(|| self.pod_ip.to_string());
            let path = http.path.clone().unwrap_or_default();
            let path = if path.starts_with('/') {
                path
            } else {
                format!("/{path}")
            };
            let url = format!("http://{}{path}", join_host_port(&host, port));
            let headers: Vec<(String, String)> = http
                .http_headers
                .iter()
                .flatten()
                .map(|h| (h.name.clone(), h.value.clone()))
                .collect();
            return self
                .node
                .run(async move { Ok(http_get(&url, &headers, timeout).await) })
                .await;
        }
        if let Some(tcp) = &probe.tcp_socket {
            let port = port(container, &tcp.port)?;
            let host = tcp.host.clone().unwrap_or_else(|| self.pod_ip.to_string());
            let addr = join_host_port(&host, port);
            return self
                .node
                .run(async move {
                    let outcome =
                        match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(&addr))
                            .await
                        {
                            Ok(Ok(_)) => ProbeOutcome {
                                success: true,
                                status: None,
                                detail: format!("connected to {addr}"),
                            },
                            Ok(Err(e)) => failed(format!("dial tcp {addr}: {e}")),
                            Err(_) => failed(format!("dial tcp {addr}: timeout after {timeout:?}")),
                        };
                    Ok(outcome)
                })
                .await;
        }
        if let Some(grpc) = &probe.grpc {
            let port = u16::try_from(grpc.port)
                .with_context(|| format!("grpc.port {} is not a port", grpc.port))?;
            let url = format!("http://{}", join_host_port(&self.pod_ip.to_string(), port));
            let service = grpc.service.clone().unwrap_or_default();
            return self
                .node
                .run(async move { Ok(grpc_check(url, service, timeout).await) })
                .await;
        }
        if probe.exec.is_some() {
            bail!("exec probes are not supported by the harness (no runtime to exec in)");
        }
        bail!("the probe names no action (httpGet, tcpSocket, grpc or exec)")
    }
}

fn failed(detail: String) -> ProbeOutcome {
    ProbeOutcome {
        success: false,
        status: None,
        detail,
    }
}

fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// A probe's port: a number, or the name of one of the container's ports.
fn port(container: &Container, port: &IntOrString) -> anyhow::Result<u16> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n)
            .ok()
            .filter(|p| *p > 0)
            .with_context(|| format!("port {n} is not a port")),
        IntOrString::String(name) => {
            if let Ok(n) = name.parse::<u16>() {
                return Ok(n);
            }
            container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .and_then(|p| u16::try_from(p.container_port).ok())
                .with_context(|| format!("container {} has no port named {name:?}", container.name))
        }
    }
}

async fn http_get(url: &str, headers: &[(String, String)], timeout: Duration) -> ProbeOutcome {
    let original_host = reqwest::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string));
    let policy = reqwest::redirect::Policy::custom(move |attempt| {
        let same = attempt.url().host_str().map(str::to_string) == original_host;
        if attempt.previous().len() >= 10 {
            attempt.error("stopped after 10 redirects")
        } else if same {
            attempt.follow()
        } else {
            attempt.stop()
        }
    });
    let client = match reqwest::Client::builder()
        .no_proxy()
        .redirect(policy)
        .timeout(timeout)
        .build()
    {
        Ok(c) => c,
        Err(e) => return failed(format!("cannot build the HTTP client: {e}")),
    };
    let mut request = client.get(url);
    let has = |name: &str| headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
    if !has("user-agent") {
        request = request.header("user-agent", USER_AGENT);
    }
    if !has("accept") {
        request = request.header("accept", "*/*");
    }
    for (name, value) in headers {
        request = request.header(name.as_str(), value.as_str());
    }
    // The kubelet's probe transport keeps no connection alive (Go then says so).
    request = request.header("connection", "close");
    let response = match request.send().await {
        Ok(r) => r,
        Err(e) => return failed(format!("GET {url}: {e:#}")),
    };
    let status = response.status().as_u16();
    let mut body = Vec::new();
    let mut response = response;
    while body.len() < MAX_BODY {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            _ => break,
        }
    }
    body.truncate(MAX_BODY);
    ProbeOutcome {
        success: (200..400).contains(&status),
        status: Some(status),
        detail: String::from_utf8_lossy(&body).into_owned(),
    }
}

async fn grpc_check(url: String, service: String, timeout: Duration) -> ProbeOutcome {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let endpoint = match tonic::transport::Endpoint::from_shared(url.clone()) {
        Ok(e) => e
            .connect_timeout(timeout)
            .timeout(timeout)
            .user_agent(USER_AGENT),
        Err(e) => return failed(format!("{url}: {e}")),
    };
    let endpoint = match endpoint {
        Ok(e) => e,
        Err(e) => return failed(format!("{url}: {e}")),
    };
    let channel = match endpoint.connect().await {
        Ok(c) => c,
        Err(e) => return failed(format!("cannot connect to {url}: {e:#}")),
    };
    match HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.clone(),
        })
        .await
    {
        Ok(answer) => {
            let status = answer.into_inner().status();
            ProbeOutcome {
                success: status == ServingStatus::Serving,
                status: None,
                detail: format!("service {service:?}: {}", status.as_str_name()),
            }
        }
        Err(e) => failed(format!("service {service:?}: {} {}", e.code(), e.message())),
    }
}
