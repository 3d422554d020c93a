//! The app's own probes, performed by the agent for the kubelet.
//!
//! The injector rewrites each liveness, readiness and startup probe of the app's
//! containers into `GET :15020/app-health/<container>/<livez|readyz|startupz>` and hands
//! the agent the originals in `MESHD_AGENT_APP_PROBES` (the contract is
//! [`meshd_sidecar::probes`]). For each configured path the agent performs the original
//! probe and answers with its outcome, whatever stage Envoy is in: an app's liveness must
//! not depend on its sidecar being ready.
//!
//! Where the probe goes: the pod's loopback, 127.0.0.1 (or the probe's `host`). The agent
//! runs as the proxy's uid (1337), whose connections the capture does not redirect, and
//! connections to the loopback address are never captured either, so the probe reaches
//! the app directly, past Envoy and its mTLS, as the kubelet's probe reached it before the
//! pod was meshed. One exception in the capture needs care: the proxy uid's connections
//! over `lo` to one of the pod's own addresses go to Envoy's inbound listener (so that
//! Envoy's self-calls meet the inbound checks), where a plaintext probe would meet STRICT
//! mTLS. So a `host` that is a local IPv4 address is reached from
//! [`INBOUND_PASSTHROUGH_SOURCE`] (127.0.0.6), the source the capture exempts, as Envoy's
//! own passthrough to the app does. (There is no such source for IPv6: a probe `host`
//! that is the pod's own IPv6 address is captured.)
//!
//! What it does, as the kubelet does it:
//!
//! - `httpGet`: one HTTP/1.1 GET on a fresh connection (`Connection: close`) with the
//!   probe's path and headers (a `Host` header sets the host; `User-Agent: kube-probe/…`
//!   and `Accept: */*` unless the probe sets them); HTTPS without verifying the app's
//!   certificate; redirects are not followed; at most [`MAX_BODY`] of the app's body is
//!   read and none of it is passed on or logged. The answer carries the app's own status
//!   code, so the kubelet's rule (200–399 passes) decides as before.
//! - `tcpSocket`: a connection → 200.
//! - `grpc`: `grpc.health.v1.Health/Check` for the probe's `service` (plaintext, as the
//!   kubelet's) → 200 for SERVING, 503 naming any other status or the error code.
//!
//! Everything, connecting included, happens within the probe's `timeoutSeconds`; a
//! refused connection, a timeout or a broken answer is 503 with a short reason. At most
//! [`MAX_IN_FLIGHT`] probes run at once (port 15020 is open to the pod's network, so
//! anyone could ask): a request that gets no slot within its probe's timeout is 503
//! too, and the app never sees more than that many probes of the agent at a time.
//!
//! The log says when a probe starts failing (with the reason) and when it passes again,
//! not at every ask of the kubelet; the app's body is never logged.
//!
//! The probes are checked once, at start: a path outside `/app-health/`, an HTTP path or
//! header that is not valid HTTP refuses the start, naming the probe and the field
//! (header values are never echoed: they may hold a token).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::uri::PathAndQuery;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use meshd_sidecar::capture::INBOUND_PASSTHROUGH_SOURCE;
use meshd_sidecar::probes::{self, AppProbe, AppProbes, Check, HttpScheme};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::{Instant, timeout_at};
use tokio_rustls::TlsConnector;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tracing::info;

/// How much of an app's HTTP body is read (the kubelet's limit); the rest is left unread.
pub const MAX_BODY: usize = 10 * 1024;
/// How many probes run at once.
pub const MAX_IN_FLIGHT: usize = 16;
/// Where a probe goes unless it names a host.
const LOOPBACK: &str = "127.0.0.1";
/// The kubelet's probes say `kube-probe/<version>`; apps that look for it still find it.
const USER_AGENT: &str = "kube-probe/meshd-agent";

/// The outcome of one probe, for the kubelet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: StatusCode,
    /// A short reason, never the app's body.
    pub reason: String,
}

impl Answer {
    fn ok(reason: String) -> Answer {
        Answer {
            status: StatusCode::OK,
            reason,
        }
    }

    fn unavailable(reason: String) -> Answer {
        Answer {
            status: StatusCode::SERVICE_UNAVAILABLE,
            reason,
        }
    }

    /// What the kubelet counts as success.
    pub fn passes(&self) -> bool {
        (200..400).contains(&self.status.as_u16())
    }
}

/// The configured probes, ready to run.
pub struct AppProber {
    probes: BTreeMap<String, Probe>,
    in_flight: Semaphore,
    max_in_flight: usize,
    tls: TlsConnector,
}

struct Probe {
    check: Prepared,
    timeout: Duration,
    /// Whether the last answer passed: the log says when that changes, not at every ask
    /// of the kubelet.
    passed: Mutex<Option<bool>>,
}

/// A [`Check`] with everything that can be checked at start checked and parsed.
enum Prepared {
    Http(HttpGet),
    Tcp { target: Target },
    Grpc { port: u16, service: String },
}

struct HttpGet {
    target: Target,
    tls: Option<ServerName<'static>>,
    path: PathAndQuery,
    /// The request's headers, `Host` and the kubelet's defaults included.
    headers: HeaderMap,
}

/// Where a probe connects.
struct Target {
    host: String,
    port: u16,
}

impl Target {
    fn new(host: Option<&str>, port: u16) -> Target {
        Target {
            host: host.unwrap_or(LOOPBACK).to_string(),
            port,
        }
    }

    /// `host:port`, an IPv6 address in brackets: for messages and the `Host` header.
    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// A connection to the first of the host's addresses that accepts one.
    async fn connect(&self) -> Result<TcpStream, String> {
        let fail = |e: std::io::Error| format!("cannot connect to {}: {e}", self.authority());
        let mut last = None;
        for addr in tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .map_err(fail)?
        {
            match connect_uncaptured(addr).await {
                Ok(tcp) => return Ok(tcp),
                Err(e) => last = Some(e),
            }
        }
        Err(fail(last.unwrap_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, "the host has no address")
        })))
    }
}

/// Connects to `addr` past the capture (see the module doc): from 127.0.0.6 if `addr` is
/// one of this pod's own IPv4 addresses other than 127.0.0.1 (the capture exempts
/// exactly that one, not all of 127/8).
async fn connect_uncaptured(addr: SocketAddr) -> std::io::Result<TcpStream> {
    match addr.ip() {
        IpAddr::V4(ip) if ip != Ipv4Addr::LOCALHOST && is_local(addr.ip()) => {
            let socket = TcpSocket::new_v4()?;
            socket.bind(SocketAddr::from((INBOUND_PASSTHROUGH_SOURCE, 0)))?;
            socket.connect(addr).await
        }
        _ => TcpStream::connect(addr).await,
    }
}

/// Whether `ip` is an address of this network namespace: only those can be bound.
fn is_local(ip: IpAddr) -> bool {
    std::net::UdpSocket::bind((ip, 0)).is_ok()
}

impl AppProber {
    /// The probes of `--app-probes` / `MESHD_AGENT_APP_PROBES` (none if unset); the error
    /// names the variable and what is wrong.
    pub fn from_flag(json: Option<&str>) -> anyhow::Result<AppProber> {
        let probes = match json {
            None => AppProbes::default(),
            Some(json) => AppProbes::from_json(json).map_err(|e| {
                anyhow::anyhow!(
                    "{} (--app-probes) is not the JSON of the app's probes: {e}",
                    probes::ENV
                )
            })?,
        };
        AppProber::new(&probes, MAX_IN_FLIGHT)
            .with_context(|| format!("{} (--app-probes)", probes::ENV))
    }

    pub fn new(probes: &AppProbes, max_in_flight: usize) -> anyhow::Result<AppProber> {
        let probes = probes
            .0
            .iter()
            .map(|(path, probe)| {
                let prepared = prepare(path, probe).with_context(|| format!("probe {path:?}"))?;
                Ok((path.clone(), prepared))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(AppProber {
            probes,
            in_flight: Semaphore::new(max_in_flight),
            max_in_flight,
            tls: TlsConnector::from(Arc::new(insecure_client_config())),
        })
    }

    pub fn len(&self) -> usize {
        self.probes.len()
    }

    /// Performs the probe configured for `path`; `None` if there is none.
    pub async fn answer(&self, path: &str) -> Option<Answer> {
        let (path, probe) = self.probes.get_key_value(path)?;
        let answer = self.perform(probe).await;
        let passes = answer.passes();
        let before = probe.passed.lock().unwrap().replace(passes);
        match (before, passes) {
            (None | Some(true), false) => info!(
                path = ?path,
                status = %answer.status,
                "app probe fails: {}",
                answer.reason
            ),
            (Some(false), true) => info!(path = ?path, "app probe passes again"),
            _ => {}
        }
        Some(answer)
    }

    async fn perform(&self, probe: &Probe) -> Answer {
        let deadline = Instant::now() + probe.timeout;
        let Ok(Ok(_slot)) = timeout_at(deadline, self.in_flight.acquire()).await else {
            return Answer::unavailable(format!(
                "{} app probes already in flight: this one did not start within its timeout \
                 ({}s)",
                self.max_in_flight,
                probe.timeout.as_secs()
            ));
        };
        match timeout_at(deadline, probe.check.run(&self.tls)).await {
            Ok(answer) => answer,
            Err(_) => Answer::unavailable(format!(
                "{}: no answer within the probe's timeout ({}s)",
                probe.check.what(),
                probe.timeout.as_secs()
            )),
        }
    }
}

fn prepare(path: &str, probe: &AppProbe) -> anyhow::Result<Probe> {
    if !path.starts_with(probes::PATH_PREFIX) {
        bail!(
            "the path is not under {}: the health port would never serve it",
            probes::PATH_PREFIX
        );
    }
    // Kubernetes refuses timeoutSeconds below 1.
    let timeout = Duration::from_secs(probe.timeout_seconds.max(1).into());
    let check = match &probe.check {
        Check::HttpGet {
            port,
            path,
            host,
            scheme,
            headers,
        } => {
            let target = Target::new(host.as_deref(), *port);
            let tls = match scheme {
                HttpScheme::Http => None,
                HttpScheme::Https => Some(
                    ServerName::try_from(target.host.clone())
                        .map_err(|e| anyhow::anyhow!("httpGet.host {:?}: {e}", target.host))?,
                ),
            };
            let path = if path.is_empty() { "/" } else { path };
            let path = PathAndQuery::try_from(path)
                .ok()
                .filter(|p| p.as_str().starts_with('/'))
                .ok_or_else(|| anyhow::anyhow!("httpGet.path {path:?} is not an HTTP path (/…)"))?;
            let mut map = HeaderMap::new();
            for (i, h) in headers.iter().enumerate() {
                let name = HeaderName::try_from(h.name.as_str()).map_err(|_| {
                    anyhow::anyhow!(
                        "httpGet.headers[{i}].name {:?} is not a header name",
                        h.name
                    )
                })?;
                let value = HeaderValue::try_from(h.value.as_str()).map_err(|_| {
                    anyhow::anyhow!(
                        "httpGet.headers[{i}].value (of {}) is not a valid header value",
                        h.name
                    )
                })?;
                // One Host: the first, as the kubelet takes it.
                if name == header::HOST {
                    if !map.contains_key(header::HOST) {
                        map.insert(name, value);
                    }
                } else {
                    map.append(name, value);
                }
            }
            if !map.contains_key(header::HOST) {
                let authority = HeaderValue::try_from(target.authority())
                    .map_err(|_| anyhow::anyhow!("httpGet.host {:?} is not a host", target.host))?;
                map.insert(header::HOST, authority);
            }
            for (name, default) in [(header::USER_AGENT, USER_AGENT), (header::ACCEPT, "*/*")] {
                if !map.contains_key(&name) {
                    map.insert(name, HeaderValue::from_static(default));
                }
            }
            map.insert(header::CONNECTION, HeaderValue::from_static("close"));
            Prepared::Http(HttpGet {
                target,
                tls,
                path,
                headers: map,
            })
        }
        Check::TcpSocket { port, host } => Prepared::Tcp {
            target: Target::new(host.as_deref(), *port),
        },
        Check::Grpc { port, service } => Prepared::Grpc {
            port: *port,
            service: service.clone(),
        },
    };
    Ok(Probe {
        check,
        timeout,
        passed: Mutex::new(None),
    })
}

impl Prepared {
    /// What the probe does, for its reasons.
    fn what(&self) -> String {
        match self {
            Prepared::Http(get) => format!(
                "GET {}://{}{}",
                if get.tls.is_some() { "https" } else { "http" },
                get.target.authority(),
                get.path
            ),
            Prepared::Tcp { target } => format!("TCP {}", target.authority()),
            Prepared::Grpc { port, service } => {
                format!("gRPC health check of {service:?} on {LOOPBACK}:{port}")
            }
        }
    }

    async fn run(&self, tls: &TlsConnector) -> Answer {
        let answer = match self {
            Prepared::Http(get) => get.run(tls).await,
            Prepared::Tcp { target } => target
                .connect()
                .await
                .map(|_| Answer::ok(format!("connected to {}", target.authority()))),
            Prepared::Grpc { port, service } => grpc_check(*port, service).await,
        };
        answer.unwrap_or_else(|reason| Answer::unavailable(format!("{}: {reason}", self.what())))
    }
}

impl HttpGet {
    async fn run(&self, tls: &TlsConnector) -> Result<Answer, String> {
        let tcp = self.target.connect().await?;
        let status = match &self.tls {
            None => self.exchange(tcp).await?,
            Some(name) => {
                let stream = tls
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| format!("TLS handshake: {e}"))?;
                self.exchange(stream).await?
            }
        };
        Ok(Answer {
            status,
            reason: format!("the app answered {status}"),
        })
    }

    /// The request on its own connection: the status, after reading at most
    /// [`MAX_BODY`] of the body. The connection is driven here rather than in a task of
    /// its own, so that a probe that times out closes it.
    async fn exchange<S>(&self, stream: S) -> Result<StatusCode, String>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP: {e}"))?;
        let mut request = Request::get(hyper::Uri::from(self.path.clone()))
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("HTTP request: {e}"))?;
        *request.headers_mut() = self.headers.clone();
        let exchange = async move {
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| format!("HTTP: {e}"))?;
            let status = response.status();
            let mut body = response.into_body();
            let mut read = 0;
            while read < MAX_BODY {
                match body.frame().await {
                    None => break,
                    Some(Ok(frame)) => read += frame.data_ref().map_or(0, Bytes::len),
                    Some(Err(e)) => return Err(format!("reading the app's answer: {e}")),
                }
            }
            Ok(status)
        };
        tokio::pin!(exchange);
        tokio::select! {
            biased;
            outcome = &mut exchange => outcome,
            // The connection ended (the app closed it, or an error): the exchange has
            // its outcome now, an answer or the error.
            _ = conn => exchange.await,
        }
    }
}

async fn grpc_check(port: u16, service: &str) -> Result<Answer, String> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{LOOPBACK}:{port}"))
        .map_err(|e| format!("gRPC endpoint: {e}"))?
        .connect()
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await
        .map_err(|status| format!("grpc.health.v1.Health/Check failed: {:?}", status.code()))?;
    let status = response.into_inner().status();
    let name = status.as_str_name();
    Ok(match status {
        ServingStatus::Serving => Answer::ok(name.to_string()),
        _ => Answer::unavailable(format!("{service:?} is {name}")),
    })
}

/// TLS as the kubelet's HTTPS probe does it: any certificate is accepted (the handshake's
/// signatures are still checked, so the session is with the certificate's key holder).
fn insecure_client_config() -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = AnyCertificate(provider.signature_verification_algorithms);
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth()
}

#[derive(Debug)]
struct AnyCertificate(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    //! Every probe against a real server in this process: hyper apps over HTTP and
    //! HTTPS (a self-signed certificate from rcgen), raw TCP listeners and tonic-health's
    //! own gRPC health server.

    use std::convert::Infallible;
    use std::sync::Mutex;

    use http_body_util::Full;
    use hyper::Response;
    use hyper::body::Incoming;
    use hyper::service::service_fn;
    use meshd_sidecar::probes::{Header, ProbeKind};
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;
    use tonic_health::ServingStatus as Reported;

    use super::*;

    const PATH: &str = "/app-health/app/readyz";

    fn prober_with(check: Check, timeout_seconds: u32, max_in_flight: usize) -> AppProber {
        let mut probes = AppProbes::default();
        probes.0.insert(
            probes::path("app", ProbeKind::Readiness),
            AppProbe {
                check,
                timeout_seconds,
            },
        );
        AppProber::new(&probes, max_in_flight).unwrap()
    }

    async fn probe(check: Check) -> Answer {
        prober_with(check, 1, MAX_IN_FLIGHT)
            .answer(PATH)
            .await
            .expect("configured")
    }

    fn http_get(port: u16, path: &str) -> Check {
        Check::HttpGet {
            port,
            path: path.into(),
            host: None,
            scheme: HttpScheme::Http,
            headers: vec![],
        }
    }

    /// What the app saw of each request: its URI and headers.
    type Seen = Arc<Mutex<Vec<(String, HeaderMap)>>>;

    /// A hyper app on 127.0.0.1 answering `/status/<code>` with that code (a 302 with a
    /// Location), `/slow` after 3 s, and 200 otherwise; each answer has a body the
    /// kubelet must never see.
    async fn app(tls: Option<tokio_rustls::TlsAcceptor>) -> (u16, Seen) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Seen::default();
        let log = seen.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let log = log.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let log = log.clone();
                        async move {
                            log.lock()
                                .unwrap()
                                .push((req.uri().to_string(), req.headers().clone()));
                            let path = req.uri().path().to_string();
                            if path == "/slow" {
                                tokio::time::sleep(Duration::from_secs(3)).await;
                            }
                            let code = path
                                .strip_prefix("/status/")
                                .map_or(200, |c| c.parse().unwrap());
                            let mut response =
                                Response::new(Full::new(Bytes::from("secret app body")));
                            *response.status_mut() = StatusCode::from_u16(code).unwrap();
                            if code == 302 {
                                response
                                    .headers_mut()
                                    .insert(header::LOCATION, HeaderValue::from_static("/else"));
                            }
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    let _ = match tls {
                        None => http.serve_connection(TokioIo::new(tcp), service).await,
                        Some(tls) => {
                            let Ok(stream) = tls.accept(tcp).await else {
                                return;
                            };
                            http.serve_connection(TokioIo::new(stream), service).await
                        }
                    };
                });
            }
        });
        (port, seen)
    }

    /// A port nothing listens on.
    async fn closed_port() -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap().port()
    }

    #[tokio::test]
    async fn the_apps_own_status_reaches_the_kubelet_and_its_body_does_not() {
        let (port, seen) = app(None).await;
        for (path, status) in [
            ("/healthz", StatusCode::OK),
            ("/status/500", StatusCode::INTERNAL_SERVER_ERROR),
            // Not followed: the kubelet counts the 302 itself as a pass.
            ("/status/302", StatusCode::FOUND),
            ("/status/404", StatusCode::NOT_FOUND),
        ] {
            let answer = probe(http_get(port, path)).await;
            assert_eq!(answer.status, status, "{path}: {answer:?}");
            assert!(!answer.reason.contains("secret"), "{answer:?}");
        }
        let seen = seen.lock().unwrap();
        let uris: Vec<&str> = seen.iter().map(|(uri, _)| uri.as_str()).collect();
        assert_eq!(
            uris,
            ["/healthz", "/status/500", "/status/302", "/status/404"],
            "the redirect was followed"
        );
    }

    #[tokio::test]
    async fn the_probes_path_query_and_headers_reach_the_app() {
        let (port, seen) = app(None).await;
        let answer = probe(Check::HttpGet {
            port,
            path: "/healthz?full=1".into(),
            host: None,
            scheme: HttpScheme::Http,
            headers: vec![
                Header {
                    name: "X-Probe".into(),
                    value: "one".into(),
                },
                Header {
                    name: "x-probe".into(),
                    value: "two".into(),
                },
                Header {
                    name: "Host".into(),
                    value: "app.example".into(),
                },
            ],
        })
        .await;
        assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
        let answer = probe(http_get(port, "")).await;
        assert_eq!(answer.status, StatusCode::OK, "{answer:?}");

        let seen = seen.lock().unwrap();
        let (uri, headers) = &seen[0];
        assert_eq!(uri, "/healthz?full=1");
        let probe_headers: Vec<_> = headers.get_all("x-probe").iter().collect();
        assert_eq!(probe_headers, ["one", "two"]);
        assert_eq!(headers[header::HOST], "app.example");
        assert_eq!(headers[header::USER_AGENT], USER_AGENT);
        assert_eq!(headers[header::ACCEPT], "*/*");
        // Without a Host header: the address, as the kubelet's URL has it.
        let (uri, headers) = &seen[1];
        assert_eq!(uri, "/");
        assert_eq!(headers[header::HOST], format!("127.0.0.1:{port}").as_str());
    }

    #[tokio::test]
    async fn https_apps_with_a_self_signed_certificate_are_probed() {
        let cert = rcgen::generate_simple_self_signed(vec!["app.invalid".into()]).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.cert.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into()),
        )
        .unwrap();
        let (port, seen) = app(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))).await;
        for (path, status) in [
            ("/healthz", StatusCode::OK),
            ("/status/503", StatusCode::SERVICE_UNAVAILABLE),
        ] {
            let answer = probe(Check::HttpGet {
                port,
                path: path.into(),
                host: None,
                scheme: HttpScheme::Https,
                headers: vec![],
            })
            .await;
            assert_eq!(answer.status, status, "{path}: {answer:?}");
        }
        assert_eq!(seen.lock().unwrap().len(), 2);
        // Plain HTTP to the HTTPS port is no answer.
        let answer = probe(http_get(port, "/healthz")).await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE, "{answer:?}");
    }

    #[tokio::test]
    async fn an_app_slower_than_the_timeout_fails_in_about_the_timeout() {
        let (port, _) = app(None).await;
        let started = std::time::Instant::now();
        let answer = probe(http_get(port, "/slow")).await;
        let took = started.elapsed();
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE, "{answer:?}");
        assert!(
            answer
                .reason
                .contains("no answer within the probe's timeout (1s)"),
            "{answer:?}"
        );
        assert!(
            took >= Duration::from_millis(950) && took < Duration::from_millis(1800),
            "{took:?}"
        );
    }

    #[tokio::test]
    async fn an_endless_body_is_read_only_up_to_the_kubelets_limit() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let _ = tcp
                .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                .await;
            let chunk = format!("400\r\n{}\r\n", "x".repeat(0x400));
            // Until the agent hangs up.
            while tcp.write_all(chunk.as_bytes()).await.is_ok() {}
        });
        let answer = probe(http_get(port, "/")).await;
        assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    }

    #[tokio::test]
    async fn a_refused_connection_is_503_with_the_reason() {
        let port = closed_port().await;
        let answer = probe(http_get(port, "/healthz")).await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE, "{answer:?}");
        assert!(
            answer.reason.contains(&format!(
                "GET http://127.0.0.1:{port}/healthz: cannot connect to 127.0.0.1:{port}"
            )),
            "{answer:?}"
        );
    }

    #[tokio::test]
    async fn tcp_probes_pass_on_an_open_port_and_fail_on_a_closed_one() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = listener.local_addr().unwrap().port();
        let answer = probe(Check::TcpSocket {
            port: open,
            host: None,
        })
        .await;
        assert_eq!(answer.status, StatusCode::OK, "{answer:?}");

        let closed = closed_port().await;
        let answer = probe(Check::TcpSocket {
            port: closed,
            host: Some("127.0.0.1".into()),
        })
        .await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE, "{answer:?}");
        assert!(answer.reason.contains("cannot connect"), "{answer:?}");
        drop(listener);
    }

    #[tokio::test]
    async fn grpc_probes_ask_the_apps_health_service() {
        let (reporter, service) = tonic_health::server::health_reporter();
        reporter.set_service_status("", Reported::Serving).await;
        reporter
            .set_service_status("shop.Cart", Reported::NotServing)
            .await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        let grpc = |service: &str| Check::Grpc {
            port,
            service: service.into(),
        };
        let answer = probe(grpc("")).await;
        assert_eq!(answer, Answer::ok("SERVING".into()));
        let answer = probe(grpc("shop.Cart")).await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE, "{answer:?}");
        assert!(
            answer.reason.contains(r#""shop.Cart" is NOT_SERVING"#),
            "{answer:?}"
        );
        let answer = probe(grpc("shop.Unknown")).await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE, "{answer:?}");
        assert!(answer.reason.contains("NotFound"), "{answer:?}");

        let answer = probe(Check::Grpc {
            port: closed_port().await,
            service: String::new(),
        })
        .await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE, "{answer:?}");
        assert!(answer.reason.contains("cannot connect"), "{answer:?}");
    }

    #[tokio::test]
    async fn probes_beyond_the_limit_in_flight_fail_rather_than_pile_up() {
        let (port, seen) = app(None).await;
        let mut probes = AppProbes::default();
        for (container, timeout_seconds) in [("slow", 3), ("app", 1)] {
            probes.0.insert(
                probes::path(container, ProbeKind::Readiness),
                AppProbe {
                    check: http_get(port, "/slow"),
                    timeout_seconds,
                },
            );
        }
        let prober = Arc::new(AppProber::new(&probes, 1).unwrap());
        let holder = prober.clone();
        let first = tokio::spawn(async move { holder.answer("/app-health/slow/readyz").await });
        // The first probe now holds the only slot, for up to 3 s.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let started = std::time::Instant::now();
        let second = prober.answer(PATH).await.unwrap();
        assert_eq!(second.status, StatusCode::SERVICE_UNAVAILABLE, "{second:?}");
        assert!(
            second.reason.contains(
                "1 app probes already in flight: this one did not start within its timeout (1s)"
            ),
            "{second:?}"
        );
        assert!(started.elapsed() < Duration::from_millis(1800));
        first.abort();
        assert_eq!(seen.lock().unwrap().len(), 1, "the app saw both");
    }

    #[tokio::test]
    async fn only_configured_paths_are_probed() {
        let prober = prober_with(http_get(1, "/"), 1, 1);
        assert!(prober.answer("/app-health/app/livez").await.is_none());
        assert!(prober.answer("/app-health/other/readyz").await.is_none());
    }

    #[test]
    fn bad_probes_refuse_the_start_naming_the_probe_and_the_field() {
        let err = |json: &str| match AppProber::from_flag(Some(json)) {
            Ok(_) => panic!("accepted {json}"),
            Err(e) => format!("{e:#}"),
        };
        let e = err("{not json");
        assert!(
            e.starts_with("MESHD_AGENT_APP_PROBES (--app-probes) is not the JSON"),
            "{e}"
        );
        assert!(e.contains("line 1 column 2"), "{e}");
        let e = err(r#"{"/app-health/a/livez":{"check":{"exec":{}},"timeoutSeconds":1}}"#);
        assert!(e.contains("unknown variant `exec`"), "{e}");
        let e = err(r#"{"/healthz":{"check":{"tcpSocket":{"port":1}},"timeoutSeconds":1}}"#);
        assert!(
            e.contains(r#"MESHD_AGENT_APP_PROBES (--app-probes): probe "/healthz": the path is not under /app-health/"#),
            "{e}"
        );
        let e = err(
            r#"{"/app-health/a/livez":{"check":{"httpGet":{"port":1,"path":"/a b","scheme":"HTTP"}},"timeoutSeconds":1}}"#,
        );
        assert!(
            e.contains(r#"httpGet.path "/a b" is not an HTTP path"#),
            "{e}"
        );
        let e = err(
            r#"{"/app-health/a/livez":{"check":{"httpGet":{"port":1,"path":"/","scheme":"HTTP","headers":[{"name":"Authorization","value":"Bearer s3cret\n"}]}},"timeoutSeconds":1}}"#,
        );
        assert!(
            e.contains("httpGet.headers[0].value (of Authorization) is not a valid header value"),
            "{e}"
        );
        assert!(!e.contains("s3cret"), "{e}");
        assert_eq!(AppProber::from_flag(None).unwrap().len(), 0);
    }
}
