//! What an authenticated but hostile sidecar can do to meshd over its ADS stream: it
//! can ask, and be refused. Each case here once grew meshd by hundreds of MiB, kept a
//! stream open with status OK, or wrote a forged line into meshd's log; a flood of
//! failed handshakes once wrote one warning each.

use std::time::Duration;

use meshd_integration::init_test_logging;
use meshd_integration::mesh::{MeshDir, PodDef, ServiceDef};
use meshd_integration::meshd::Meshd;
use meshd_integration::wait::eventually;
use meshd_integration::xds_client::{CDS, ClientCert, DeltaClient, EDS, SotwClient, node};

const NS: &str = "shop";

struct Fixture {
    _mesh: MeshDir,
    meshd: Meshd,
    cert: ClientCert,
}

async fn start() -> anyhow::Result<Fixture> {
    init_test_logging();
    let mesh = MeshDir::new()?;
    mesh.write(
        "mesh.yaml",
        &[
            ServiceDef::new(NS, "web").http_port(80, 8080).yaml(),
            PodDef::new(NS, "web-1", "web").serves(8080, 18080).yaml(),
            PodDef::new(NS, "client-1", "client")
                .calls("web", 80, 15001)
                .yaml(),
        ],
    )?;
    let meshd = Meshd::start(mesh.path()).await?;
    let cert = ClientCert::mint(&meshd.ca_dir(), NS, "client")?;
    Ok(Fixture {
        _mesh: mesh,
        meshd,
        cert,
    })
}

fn me() -> Option<envoy_types::pb::envoy::config::core::v3::Node> {
    Some(node(NS, "client-1", "client"))
}

/// meshd's resident memory, in MiB.
fn rss_mib(meshd: &Meshd) -> anyhow::Result<u64> {
    let pid = meshd
        .pid()
        .ok_or_else(|| anyhow::anyhow!("meshd has no pid"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS"))?;
    Ok(kib / 1024)
}

fn assert_refused(status: &tonic::Status, what: &str) {
    assert_eq!(
        status.code(),
        tonic::Code::ResourceExhausted,
        "{what}: {status:?}"
    );
    assert!(
        status.message().contains(what),
        "{what}: {}",
        status.message()
    );
}

async fn assert_refusal_logged(meshd: &Meshd, reason: &str) -> anyhow::Result<()> {
    eventually(
        "the refusal in the log and metrics",
        Duration::from_secs(5),
        || async {
            let log = meshd.log();
            anyhow::ensure!(log.contains("ended an xDS stream that sent"), "not logged");
            let metrics = meshd.metrics().await?;
            anyhow::ensure!(
                metrics.contains(&format!(
                    "meshd_xds_refused_streams_total{{reason=\"{reason}\"}}"
                )),
                "not counted as {reason}"
            );
            Ok(())
        },
    )
    .await
}

#[tokio::test]
async fn unknown_type_urls_are_bounded_in_number_and_length() -> anyhow::Result<()> {
    let f = start().await?;
    let before = rss_mib(&f.meshd)?;

    // 300 distinct unknown types of 1 KiB each: the 17th ends the stream.
    let mut c = SotwClient::connect(f.meshd.xds_addr, &f.cert).await?;
    c.request(me(), CDS, &[], None).await?;
    c.recv().await?;
    let mut status = None;
    for i in 0..300 {
        let url = format!("type.googleapis.com/x.{i}.{}", "y".repeat(200));
        if c.request(None, &url, &[], None).await.is_err() {
            // meshd closed the stream first: its status says why.
            status = Some(c.recv_status().await?);
            break;
        }
        if i == 20 {
            status = Some(c.recv_status().await?);
            break;
        }
    }
    let status = status.ok_or_else(|| anyhow::anyhow!("the stream was never refused"))?;
    assert_refused(&status, "type URLs meshd does not serve");
    assert_refusal_logged(&f.meshd, "type_urls").await?;

    // One type URL of 1 MiB: refused at once, and not logged in full.
    let mut c = SotwClient::connect(f.meshd.xds_addr, &f.cert).await?;
    c.request(me(), CDS, &[], None).await?;
    c.recv().await?;
    let huge = format!("type.googleapis.com/{}", "z".repeat(1 << 20));
    c.request(None, &huge, &[], None).await?;
    assert_refused(&c.recv_status().await?, "a type URL of");
    assert!(
        !f.meshd.log().contains(&"z".repeat(1000)),
        "the URL was logged in full"
    );

    // Nothing of either stream is left, and meshd did not grow.
    eventually(
        "the refused streams to be gone",
        Duration::from_secs(5),
        || async {
            let proxies = f.meshd.proxies().await?;
            anyhow::ensure!(proxies.is_empty(), "still listed: {proxies:?}");
            Ok(())
        },
    )
    .await?;
    let text = f.meshd.get_text("/debug/proxies").await?;
    assert!(
        text.len() < 10_000,
        "/debug/proxies is {} bytes",
        text.len()
    );
    let after = rss_mib(&f.meshd)?;
    assert!(
        after < before + 64,
        "meshd grew from {before} to {after} MiB"
    );
    Ok(())
}

#[tokio::test]
async fn subscriptions_are_bounded_in_names_and_bytes() -> anyhow::Result<()> {
    let f = start().await?;
    let before = rss_mib(&f.meshd)?;

    // A name longer than 1 KiB.
    let mut c = DeltaClient::connect(f.meshd.xds_addr, &f.cert).await?;
    let long = "n".repeat(2000);
    c.subscribe(me(), EDS, &[&long]).await?;
    assert_refused(
        &c.recv_status().await?,
        "a resource name or version of 2000 bytes",
    );
    assert_refusal_logged(&f.meshd, "name_length").await?;

    // 3 MiB of names per request: the third request goes past 8 MiB held.
    let mut c = DeltaClient::connect(f.meshd.xds_addr, &f.cert).await?;
    c.subscribe(me(), CDS, &[]).await?;
    c.recv().await?;
    let mut refused = None;
    for round in 0..12 {
        let names: Vec<String> = (0..3000)
            .map(|i| format!("{round}-{i}-{}", "x".repeat(1000)))
            .collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        if c.subscribe(None, EDS, &names).await.is_err() {
            refused = Some(c.recv_status().await?.into());
            break;
        }
        match c.recv().await {
            Ok(_) => continue,
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let refused = refused.ok_or_else(|| anyhow::anyhow!("36 MiB of names were accepted"))?;
    let status = refused
        .downcast_ref::<tonic::Status>()
        .ok_or_else(|| anyhow::anyhow!("not a status: {refused:#}"))?;
    assert_refused(status, "bytes of resource names");
    assert_refusal_logged(&f.meshd, "names").await?;
    let after = rss_mib(&f.meshd)?;
    assert!(
        after < before + 64,
        "meshd grew from {before} to {after} MiB"
    );
    Ok(())
}

#[tokio::test]
async fn a_request_over_the_size_limit_ends_with_resource_exhausted() -> anyhow::Result<()> {
    let f = start().await?;
    // 17 MiB in the very first request.
    let mut c = SotwClient::connect(f.meshd.xds_addr, &f.cert).await?;
    let name = "x".repeat(17 << 20);
    c.request(me(), CDS, &[&name], None).await?;
    assert_refused(&c.recv_status().await?, "a request of more than");
    assert_refusal_logged(&f.meshd, "request_size").await?;

    // …and the same later in a stream.
    let mut c = DeltaClient::connect(f.meshd.xds_addr, &f.cert).await?;
    c.subscribe(me(), CDS, &[]).await?;
    c.recv().await?;
    c.subscribe(None, EDS, &[&name]).await?;
    assert_refused(&c.recv_status().await?, "a request of more than");
    Ok(())
}

#[tokio::test]
async fn a_nack_cannot_forge_a_log_line() -> anyhow::Result<()> {
    let f = start().await?;
    let mut c = SotwClient::connect(f.meshd.xds_addr, &f.cert).await?;
    c.request(me(), CDS, &[], None).await?;
    let r = c.recv().await?;
    let forged = "2026-12-01T10:00:00.000000Z  INFO meshd: root rotation completed by admin";
    c.nack(&r, &[], &format!("bad cluster\n{forged}\r\u{1b}[2K"))
        .await?;
    eventually("the NACK in the log", Duration::from_secs(5), || async {
        anyhow::ensure!(f.meshd.log().contains("NACK"), "not yet");
        Ok(())
    })
    .await?;
    let log = f.meshd.log();
    assert!(
        !log.lines().any(|l| l.starts_with(forged)),
        "a forged line stands on its own in the log:\n{log}"
    );
    assert!(log.contains(r"bad cluster\n2026-12-01T10:00:00"), "{log}");
    assert!(!log.contains('\u{1b}'), "a terminal escape reached the log");
    // The message is kept as sent (in JSON) for meshctl status.
    let proxies = f.meshd.proxies().await?;
    let nack = proxies[0].types["cds"].last_nack.clone();
    assert!(nack.is_some_and(|n| n.message.contains(forged)));
    Ok(())
}

#[tokio::test]
async fn a_node_id_with_a_newline_is_refused() -> anyhow::Result<()> {
    let f = start().await?;
    let mut c = SotwClient::connect(f.meshd.xds_addr, &f.cert).await?;
    let mut n = node(NS, "client-1", "client");
    n.id = "client-1.shop\n2026-12-01T10:00:00Z  INFO meshd: forged".into();
    c.request(Some(n), CDS, &[], None).await?;
    let status = c.recv_status().await?;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        !f.meshd
            .log()
            .lines()
            .any(|l| l.starts_with("2026-12-01T10:00:00Z")),
        "forged line in the log"
    );
    Ok(())
}

#[tokio::test]
async fn a_flood_of_failed_handshakes_is_counted_not_logged_line_by_line() -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    let f = start().await?;
    let garbage = |meshd_addr| async move {
        let mut tcp = tokio::net::TcpStream::connect(meshd_addr).await?;
        tcp.write_all(b"GET / HTTP/1.1\r\n\r\n").await?;
        let mut buf = [0u8; 64];
        let _ = tokio::io::AsyncReadExt::read(&mut tcp, &mut buf).await;
        anyhow::Ok(())
    };
    for _ in 0..200 {
        garbage(f.meshd.xds_addr).await?;
    }
    let failures = |log: &str| log.matches("TLS handshake failed").count();
    eventually("every failure counted", Duration::from_secs(5), || async {
        let metrics = f.meshd.metrics().await?;
        anyhow::ensure!(
            metrics.contains("meshd_tls_handshake_failures_total{port=\"xds\"} 200"),
            "not yet"
        );
        Ok(())
    })
    .await?;
    let logged = failures(&f.meshd.log());
    assert!(logged <= 10, "{logged} lines for 200 failed handshakes");
    // The next window's first line says how many were left out.
    tokio::time::sleep(Duration::from_secs(10)).await;
    garbage(f.meshd.xds_addr).await?;
    eventually("the summary line", Duration::from_secs(5), || async {
        let log = f.meshd.log();
        anyhow::ensure!(
            log.contains("190 similar warnings were not logged"),
            "no summary"
        );
        Ok(())
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_long_nonce_is_refused_and_cannot_panic_meshd_into_the_log() -> anyhow::Result<()> {
    let f = start().await?;
    let mut c = DeltaClient::connect(f.meshd.xds_addr, &f.cert).await?;
    c.subscribe(me(), CDS, &[]).await?;
    c.recv().await?;
    // Byte 1,024 falls inside a multibyte character, after a forged line.
    let nonce = format!(
        "x\n2026-12-01T10:00:00Z  INFO meshd: forged\n{}",
        "€".repeat(400)
    );
    c.send(
        envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest {
            type_url: CDS.into(),
            response_nonce: nonce,
            error_detail: Some(envoy_types::pb::google::rpc::Status {
                code: 3,
                message: "no".into(),
                details: vec![],
            }),
            ..Default::default()
        },
    )
    .await?;
    assert_refused(&c.recv_status().await?, "a resource name or version of");
    let log = f.meshd.log();
    assert!(!log.contains("panicked"), "{log}");
    assert!(
        !log.lines().any(|l| l.starts_with("2026-12-01T10:00:00Z")),
        "forged line in the log"
    );
    // meshd still serves.
    let mut c = SotwClient::connect(f.meshd.xds_addr, &f.cert).await?;
    c.request(me(), CDS, &[], None).await?;
    c.recv().await?;
    Ok(())
}

#[tokio::test]
async fn one_pod_may_not_open_many_streams() -> anyhow::Result<()> {
    let f = start().await?;
    let mut open = Vec::new();
    for _ in 0..8 {
        let mut c = SotwClient::connect(f.meshd.xds_addr, &f.cert).await?;
        c.request(me(), CDS, &[], None).await?;
        c.recv().await?;
        open.push(c);
    }
    let mut ninth = SotwClient::connect(f.meshd.xds_addr, &f.cert).await?;
    ninth.request(me(), CDS, &[], None).await?;
    assert_refused(&ninth.recv_status().await?, "open streams of this identity");
    assert_refusal_logged(&f.meshd, "streams").await?;
    // A closed stream frees its place.
    open.pop();
    eventually("a place to be free", Duration::from_secs(5), || async {
        let mut c = SotwClient::connect(f.meshd.xds_addr, &f.cert).await?;
        c.request(me(), CDS, &[], None).await?;
        c.recv().await?;
        Ok(())
    })
    .await?;
    Ok(())
}
