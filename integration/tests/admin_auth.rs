//! Who may call meshd: the admin API (debug pages, root rotation) admits only
//! operators with a certificate from the mesh CA; the health port serves health and
//! metrics to anyone and nothing else; loopback ports refuse foreign `Host` headers.
//! Each attack here is one that worked before the admin API was authenticated.

use std::os::unix::process::CommandExt;
use std::time::Duration;

use anyhow::Context;
use meshd::identity::RotationStatus;
use meshd_integration::init_test_logging;
use meshd_integration::mesh::{MeshDir, PodDef, ServiceDef};
use meshd_integration::meshd::Meshd;
use meshd_integration::tls::connect;
use meshd_integration::tools::meshd_binary;
use meshd_integration::wait::eventually;
use meshd_integration::xds_client::{ClientCert, SotwClient, node};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const NS: &str = "shop";
const ROTATE: &str = "POST /ca/rotate-root HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: http://attacker.example\r\nContent-Type: text/plain\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx";

async fn start() -> anyhow::Result<(MeshDir, Meshd)> {
    init_test_logging();
    let mesh = MeshDir::new()?;
    mesh.write(
        "mesh.yaml",
        &[
            ServiceDef::new(NS, "web").http_port(80, 8080).yaml(),
            PodDef::new(NS, "web-1", "web").serves(8080, 18080).yaml(),
        ],
    )?;
    let meshd = Meshd::start(mesh.path()).await?;
    Ok((mesh, meshd))
}

/// Sends `request` over `stream` and returns whatever came back, or the error.
async fn exchange<S>(stream: &mut S, request: &str) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    if let Err(e) = stream.write_all(request.as_bytes()).await {
        return format!("write failed: {e}");
    }
    let mut buf = Vec::new();
    match tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf)).await {
        Ok(Ok(_)) => String::from_utf8_lossy(&buf).into_owned(),
        Ok(Err(e)) => format!("read failed: {e}"),
        Err(_) => "no answer within 5s".into(),
    }
}

async fn assert_no_rotation(meshd: &Meshd) -> anyhow::Result<()> {
    let s: RotationStatus = meshd.get_json("/ca/status").await?;
    anyhow::ensure!(
        s.phase == "idle" && s.trusted_roots.len() == 1,
        "a root rotation was started: {s:?}"
    );
    Ok(())
}

#[tokio::test]
async fn only_an_operator_certificate_opens_the_admin_api() -> anyhow::Result<()> {
    let (_mesh, meshd) = start().await?;
    let bundle = std::fs::read_to_string(meshd.ca_dir().join("root-cert.pem"))?;

    // A web page's simple POST (no preflight) in plaintext: no HTTP answer at all.
    let mut tcp = tokio::net::TcpStream::connect(meshd.admin_addr).await?;
    let answer = exchange(&mut tcp, ROTATE).await;
    assert!(
        !answer.contains("HTTP/1.1 2"),
        "plaintext POST answered: {answer}"
    );

    // TLS without a client certificate: refused in the handshake.
    let refused = match connect(meshd.admin_addr, &bundle, None).await {
        Err(e) => format!("{e:#}"),
        Ok((mut tls, _)) => exchange(&mut tls, ROTATE).await,
    };
    assert!(
        !refused.contains("HTTP/1.1 2"),
        "no-certificate POST answered: {refused}"
    );
    assert!(
        refused.contains("CertificateRequired") || refused.contains("failed"),
        "{refused}"
    );

    // A sidecar's workload certificate from the same CA: refused (access denied).
    let workload = ClientCert::mint(&meshd.ca_dir(), NS, "web")?;
    let refused = match connect(meshd.admin_addr, &bundle, Some(&workload)).await {
        Err(e) => format!("{e:#}"),
        Ok((mut tls, _)) => exchange(&mut tls, ROTATE).await,
    };
    assert!(
        !refused.contains("HTTP/1.1 2"),
        "a workload certificate opened the admin API: {refused}"
    );
    assert!(refused.contains("fatal alert"), "{refused}");
    eventually(
        "meshd to log why it refused",
        Duration::from_secs(5),
        || async {
            anyhow::ensure!(meshd.log().contains("not an operator id"), "not logged");
            Ok(())
        },
    )
    .await?;

    // An operator certificate of another mesh's CA: refused.
    let foreign_ca = tempfile::tempdir()?;
    let foreign = ClientCert::operator(foreign_ca.path(), "mallory")?;
    let refused = match connect(meshd.admin_addr, &bundle, Some(&foreign)).await {
        Err(e) => format!("{e:#}"),
        Ok((mut tls, _)) => exchange(&mut tls, ROTATE).await,
    };
    assert!(
        !refused.contains("HTTP/1.1 2"),
        "a foreign operator opened the admin API: {refused}"
    );

    // An operator of this mesh gets in.
    let operator = ClientCert::operator(&meshd.ca_dir(), "alice")?;
    let (mut tls, server) = connect(meshd.admin_addr, &bundle, Some(&operator)).await?;
    assert_eq!(
        server.uri_sans,
        ["spiffe://cluster.local/ns/meshd-system/sa/meshd"],
        "the admin API presents meshd's identity"
    );
    let answer = exchange(
        &mut tls,
        "GET /ca/status HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    assert_no_rotation(&meshd).await?;
    let log = meshd.log();
    assert!(
        log.contains("port=\"admin\""),
        "refused handshakes are logged:\n{log}"
    );
    let metrics = meshd.metrics().await?;
    assert!(
        metrics.contains("meshd_tls_handshake_failures_total{port=\"admin\"}"),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test]
async fn meshctl_as_another_local_user_cannot_rotate_the_root() -> anyhow::Result<()> {
    let (_mesh, meshd) = start().await?;
    // `nobody` cannot read meshd's CA directory, so it cannot mint an operator
    // certificate; without one, the admin API does not let it in.
    let out = std::process::Command::new(meshd_binary("meshctl")?)
        .args(["ca", "rotate-root"])
        .env("MESHD_ADMIN", meshd.admin_url())
        .env("MESHD_CA_DIR", meshd.ca_dir())
        .uid(65534)
        .gid(65534)
        .output()
        .context("run meshctl as nobody")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "meshctl as nobody succeeded: {stderr}"
    );
    assert!(stderr.contains("operator certificate"), "{stderr}");
    assert_no_rotation(&meshd).await?;

    // The operator (who can read the CA directory) can.
    let out = meshd.meshctl(&["ca", "rotate-root"]).await?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s: RotationStatus = meshd.get_json("/ca/status").await?;
    assert_eq!(s.trusted_roots.len(), 2, "{s:?}");
    Ok(())
}

#[tokio::test]
async fn issued_operator_credentials_work_and_changes_name_the_operator() -> anyhow::Result<()> {
    let (_mesh, meshd) = start().await?;
    let creds = tempfile::tempdir()?;
    let dir = creds.path().join("alice");
    let out = meshd
        .meshctl(&[
            "ca",
            "operator-cert",
            "--name",
            "alice",
            "--ttl",
            "1h",
            "-o",
            dir.to_str().context("utf-8")?,
        ])
        .await?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.join("operator-key.pem"))?
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the operator key is private");

    // With the credentials and no CA directory at all.
    let out = tokio::process::Command::new(meshd_binary("meshctl")?)
        .args(["ca", "rotate-root"])
        .env("MESHD_ADMIN", meshd.admin_url())
        .env("MESHD_OPERATOR", &dir)
        .env("MESHD_CA_DIR", creds.path().join("no-such-ca"))
        .output()
        .await?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = meshd.log();
    assert!(
        log.lines().any(|l| l.contains("root rotation requested")
            && l.contains("spiffe://cluster.local/meshd/operator/alice")),
        "the change is logged with its operator:\n{log}"
    );

    // A plain http:// address is refused by meshctl before it sends anything.
    let out = tokio::process::Command::new(meshd_binary("meshctl")?)
        .args(["status"])
        .env("MESHD_ADMIN", format!("http://{}", meshd.admin_addr))
        .env("MESHD_OPERATOR", &dir)
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("HTTPS"),
        "{stderr}"
    );
    Ok(())
}

#[tokio::test]
async fn the_health_port_serves_health_and_metrics_and_nothing_else() -> anyhow::Result<()> {
    let (_mesh, meshd) = start().await?;
    let http = reqwest::Client::builder().no_proxy().build()?;
    let base = meshd.health_url();
    for path in ["/healthz", "/readyz", "/metrics"] {
        let r = http.get(format!("{base}{path}")).send().await?;
        assert_eq!(r.status(), 200, "{path}");
    }
    for path in ["/debug/snapshot", "/debug/proxies", "/ca/status"] {
        let r = http.get(format!("{base}{path}")).send().await?;
        assert_eq!(r.status(), 404, "{path} must not be on the health port");
    }
    let r = http
        .post(format!("{base}/ca/rotate-root"))
        .body("x")
        .send()
        .await?;
    assert_eq!(r.status(), 404);
    assert_no_rotation(&meshd).await?;
    Ok(())
}

#[tokio::test]
async fn loopback_ports_refuse_requests_for_other_hosts() -> anyhow::Result<()> {
    let (_mesh, meshd) = start().await?;
    // DNS rebinding: the browser connects to 127.0.0.1, but asks for its own name.
    let mut tcp = tokio::net::TcpStream::connect(meshd.health_addr).await?;
    let answer = exchange(
        &mut tcp,
        "GET /metrics HTTP/1.1\r\nHost: attacker.example:15021\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 421"), "{answer}");
    for host in ["localhost:9000", "127.0.0.1", "[::1]:15021"] {
        let mut tcp = tokio::net::TcpStream::connect(meshd.health_addr).await?;
        let answer = exchange(
            &mut tcp,
            &format!("GET /healthz HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{host}: {answer}");
    }
    // The admin API checks too, even for an operator.
    let bundle = std::fs::read_to_string(meshd.ca_dir().join("root-cert.pem"))?;
    let operator = ClientCert::operator(&meshd.ca_dir(), "alice")?;
    let (mut tls, _) = connect(meshd.admin_addr, &bundle, Some(&operator)).await?;
    let answer = exchange(
        &mut tls,
        "GET /debug/snapshot HTTP/1.1\r\nHost: attacker.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 421"), "{answer}");
    Ok(())
}

#[tokio::test]
async fn an_operator_certificate_opens_no_xds_stream() -> anyhow::Result<()> {
    let (_mesh, meshd) = start().await?;
    let operator = ClientCert::operator(&meshd.ca_dir(), "alice")?;
    let mut c = SotwClient::connect(meshd.xds_addr, &operator).await?;
    c.request(
        Some(node(NS, "web-1", "web")),
        "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        &[],
        None,
    )
    .await?;
    let status = c.recv_status().await?;
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("not a workload SPIFFE id"),
        "{}",
        status.message()
    );
    Ok(())
}
