//! Small real applications behind the sidecars, and clients that talk to them.
//!
//! [`HttpApp`] answers every request with its own name (body and `x-app` header);
//! [`TcpApp`] answers each line with `<name>: <line>`. Both count what they served, so a
//! test can tell which backend a request reached, and remember their peers' addresses, so
//! a test can tell whether a connection came through a proxy.
//!
//! An app serves on a listener it is given ([`HttpApp::serve`], [`TcpApp::serve`]): one
//! bound inside a lab pod's network namespace ([`crate::netns::Netns::listen`]) makes
//! the app serve in that pod.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use axum::extract::ConnectInfo;
use axum::http::HeaderMap;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// An HTTP server on 127.0.0.1 that names itself in every response.
#[derive(Debug)]
pub struct HttpApp {
    pub name: String,
    pub addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    peers: Peers,
    task: JoinHandle<()>,
}

impl HttpApp {
    pub async fn start(name: &str) -> anyhow::Result<HttpApp> {
        Self::start_on(name, "127.0.0.1:0".parse()?).await
    }

    pub async fn start_on(name: &str, addr: SocketAddr) -> anyhow::Result<HttpApp> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("app {name}: cannot listen on {addr}"))?;
        Self::serve(name, listener)
    }

    /// The app on `listener`.
    pub fn serve(name: &str, listener: TcpListener) -> anyhow::Result<HttpApp> {
        let addr = listener.local_addr()?;
        let hits = Arc::new(AtomicUsize::new(0));
        let peers = Peers::default();
        let (n, h, p) = (name.to_string(), hits.clone(), peers.clone());
        let app = axum::Router::new().fallback(
            move |ConnectInfo(peer): ConnectInfo<SocketAddr>, headers: HeaderMap| {
                let (n, h) = (n.clone(), h.clone());
                p.push(peer);
                async move {
                    h.fetch_add(1, Ordering::Relaxed);
                    let via = headers
                        .get("x-forwarded-proto")
                        .map(|_| " (via proxy)")
                        .unwrap_or("");
                    ([("x-app", n.clone())], format!("{n}{via}\n"))
                }
            },
        );
        let task = tokio::spawn(async move {
            let app = app.into_make_service_with_connect_info::<SocketAddr>();
            let _ = axum::serve(listener, app).await;
        });
        Ok(HttpApp {
            name: name.to_string(),
            addr,
            hits,
            peers,
            task,
        })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::Relaxed)
    }

    /// The peer address of every request served, in order.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.get()
    }
}

impl Drop for HttpApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A TCP server on 127.0.0.1 that answers each line with `<name>: <line>`.
#[derive(Debug)]
pub struct TcpApp {
    pub name: String,
    pub addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    peers: Peers,
    task: JoinHandle<()>,
}

impl TcpApp {
    pub async fn start(name: &str) -> anyhow::Result<TcpApp> {
        Self::start_on(name, "127.0.0.1:0".parse()?).await
    }

    pub async fn start_on(name: &str, addr: SocketAddr) -> anyhow::Result<TcpApp> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("app {name}: cannot listen on {addr}"))?;
        Self::serve(name, listener)
    }

    /// The app on `listener`.
    pub fn serve(name: &str, listener: TcpListener) -> anyhow::Result<TcpApp> {
        let addr = listener.local_addr()?;
        let connections = Arc::new(AtomicUsize::new(0));
        let peers = Peers::default();
        let (n, c, p) = (name.to_string(), connections.clone(), peers.clone());
        let task = tokio::spawn(async move {
            while let Ok((sock, peer)) = listener.accept().await {
                c.fetch_add(1, Ordering::Relaxed);
                p.push(peer);
                let n = n.clone();
                tokio::spawn(async move {
                    let (r, mut w) = sock.into_split();
                    let mut lines = BufReader::new(r).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        if w.write_all(format!("{n}: {line}\n").as_bytes())
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                });
            }
        });
        Ok(TcpApp {
            name: name.to_string(),
            addr,
            connections,
            peers,
            task,
        })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// The peer address of every connection accepted, in order.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.get()
    }
}

/// Peer addresses an app saw.
#[derive(Debug, Clone, Default)]
struct Peers(Arc<Mutex<Vec<SocketAddr>>>);

impl Peers {
    fn push(&self, peer: SocketAddr) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(peer);
    }

    fn get(&self) -> Vec<SocketAddr> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for TcpApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What an HTTP client saw.
#[derive(Debug, Clone)]
pub struct HttpReply {
    pub status: u16,
    /// The `x-app` header: which app answered, if any did.
    pub app: Option<String>,
    pub body: String,
}

/// A GET through whatever listens at `addr` (e.g. a sidecar's outbound port).
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<HttpReply> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()?;
    let resp = client
        .get(format!("http://{addr}{path}"))
        .send()
        .await
        .with_context(|| format!("GET http://{addr}{path}"))?;
    let status = resp.status().as_u16();
    let app = resp
        .headers()
        .get("x-app")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = resp.text().await?;
    Ok(HttpReply { status, app, body })
}

/// Which apps answered `n` GETs at `addr`; fails unless every one answered 200.
pub async fn answering_apps(addr: SocketAddr, n: usize) -> anyhow::Result<BTreeSet<String>> {
    let mut seen = BTreeSet::new();
    for _ in 0..n {
        let reply = http_get(addr, "/").await?;
        anyhow::ensure!(
            reply.status == 200,
            "status {} body {:?}",
            reply.status,
            reply.body
        );
        seen.insert(reply.app.context("no x-app header")?);
    }
    Ok(seen)
}

/// Sends one line over a new TCP connection to `addr` and returns the reply line.
pub async fn tcp_roundtrip(addr: SocketAddr, line: &str) -> anyhow::Result<String> {
    let fut = async {
        let mut sock = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect {addr}"))?;
        sock.write_all(format!("{line}\n").as_bytes()).await?;
        let mut reply = String::new();
        BufReader::new(&mut sock).read_line(&mut reply).await?;
        if reply.is_empty() {
            anyhow::bail!("connection to {addr} closed without a reply");
        }
        Ok(reply.trim_end().to_string())
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .with_context(|| format!("no reply from {addr} within 5s"))?
}

/// GETs `/` through `addr` every 20 ms until stopped, counting what did not answer 200
/// (each request on a new connection to the sidecar).
pub struct Traffic {
    sent: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    stop: Arc<tokio::sync::Notify>,
    task: JoinHandle<()>,
}

impl Traffic {
    pub fn start(addr: SocketAddr) -> Traffic {
        let sent = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(tokio::sync::Notify::new());
        let task = {
            let (sent, failed, stop) = (sent.clone(), failed.clone(), stop.clone());
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.notified() => break,
                        r = http_get(addr, "/") => {
                            sent.fetch_add(1, Ordering::Relaxed);
                            if !r.is_ok_and(|r| r.status == 200) {
                                failed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        };
        Traffic {
            sent,
            failed,
            stop,
            task,
        }
    }

    /// (requests sent, requests failed) so far.
    pub fn counts(&self) -> (usize, usize) {
        (
            self.sent.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }

    /// Stops and returns (requests sent, requests failed).
    pub async fn stop(self) -> (usize, usize) {
        self.stop.notify_one();
        let _ = self.task.await;
        (
            self.sent.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}
