//! meshd's listen backlog, read from the kernel for a running meshd. With
//! `TcpListener::bind`'s (128, as `ss` showed) the accept queue of a storm of proxies
//! connecting at once can overflow, and each dropped handshake costs its proxy a SYN
//! retransmit (a second or more).

use meshd_integration::init_test_logging;
use meshd_integration::mesh::{MeshDir, PodDef, ServiceDef};
use meshd_integration::meshd::Meshd;

/// The accept queue size the kernel gives meshd's listening socket on `port`:
/// `ss` shows it as the Send-Q of a LISTEN socket (inet_diag's `idiag_wqueue`).
fn listen_backlog(port: u16) -> anyhow::Result<u32> {
    let out = std::process::Command::new("ss")
        .args(["-ltnH", &format!("sport = :{port}")])
        .output()?;
    anyhow::ensure!(out.status.success(), "ss failed: {out:?}");
    let text = String::from_utf8(out.stdout)?;
    // State Recv-Q Send-Q Local-Address:Port Peer-Address:Port
    let line = text
        .lines()
        .next()
        .ok_or_else(|| anyhow::anyhow!("nothing listens on port {port}: {text:?}"))?;
    let send_q = line
        .split_whitespace()
        .nth(2)
        .ok_or_else(|| anyhow::anyhow!("unexpected ss line {line:?}"))?;
    Ok(send_q.parse()?)
}

#[tokio::test]
async fn meshd_listens_with_a_backlog_for_a_connection_storm() -> anyhow::Result<()> {
    init_test_logging();
    let mesh = MeshDir::new()?;
    mesh.write(
        "mesh.yaml",
        &[
            ServiceDef::new("shop", "web").http_port(80, 8080).yaml(),
            PodDef::new("shop", "web-1", "web")
                .serves(8080, 18080)
                .yaml(),
        ],
    )?;
    let meshd = Meshd::start(mesh.path()).await?;
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")?
        .trim()
        .parse()?;
    let expected = meshd::listen::BACKLOG.min(somaxconn);
    assert!(
        expected > 128,
        "net.core.somaxconn is {somaxconn}: this machine caps every backlog at what meshd had before"
    );
    for (port, what) in [
        (meshd.xds_addr.port(), "xDS"),
        (meshd.admin_addr.port(), "admin"),
        (meshd.health_addr.port(), "health"),
    ] {
        assert_eq!(
            listen_backlog(port)?,
            expected,
            "the {what} port's accept queue (net.core.somaxconn {somaxconn})"
        );
    }
    if somaxconn < meshd::listen::BACKLOG {
        let log = meshd.log();
        assert!(
            log.contains("listen backlogs are capped by net.core.somaxconn"),
            "meshd did not say the kernel capped its backlog: {log}"
        );
    }
    Ok(())
}
