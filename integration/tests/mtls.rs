//! Mutual TLS between sidecars with meshd's CA, proven from the outside: the
//! certificates sidecars present, who they let in, rotation under load, identity
//! checks on the xDS port, and keys that never show up in meshd's output.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use meshd_integration::apps::{HttpApp, http_get};
use meshd_integration::envoy::Sidecar;
use meshd_integration::mesh::{MeshDir, PodDef, web_and_client};
use meshd_integration::meshd::Meshd;
use meshd_integration::tls::{connect, raw_http_get};
use meshd_integration::wait::eventually;
use meshd_integration::xds_client::{ClientCert, SotwClient, node};
use meshd_integration::{XdsFlavor, init_test_logging};

const NS: &str = "shop";
const WAIT: Duration = Duration::from_secs(15);
const WEB_ID: &str = "spiffe://cluster.local/ns/shop/sa/web";

struct Mesh {
    _dir: MeshDir,
    meshd: Meshd,
    web: PodDef,
    client: PodDef,
    _app: HttpApp,
    web_sidecar: Sidecar,
    client_sidecar: Sidecar,
}

/// web-1 (service account `web`) behind `web:80`, and client-1 (`client`) calling it.
async fn mesh(meshd_args: &[&str]) -> anyhow::Result<Mesh> {
    init_test_logging();
    let app = HttpApp::start("web-1").await?;
    let (dir, web, client) = web_and_client(NS, app.port())?;
    let meshd = Meshd::start_with(dir.path(), meshd_args).await?;
    let web_sidecar = Sidecar::for_pod(&meshd, &web, XdsFlavor::Delta).await?;
    let client_sidecar = Sidecar::for_pod(&meshd, &client, XdsFlavor::Delta).await?;
    eventually("traffic through the sidecars", WAIT, || async {
        let r = http_get(client.outbound(0), "/").await?;
        ensure!(r.status == 200, "HTTP {}: {}", r.status, r.body);
        Ok(())
    })
    .await?;
    Ok(Mesh {
        _dir: dir,
        meshd,
        web,
        client,
        _app: app,
        web_sidecar,
        client_sidecar,
    })
}

impl Mesh {
    fn cert(&self, service_account: &str) -> anyhow::Result<ClientCert> {
        ClientCert::mint(&self.meshd.ca_dir(), NS, service_account)
    }
}

#[tokio::test]
async fn sidecars_speak_mutual_tls_with_spiffe_certificates_of_the_configured_lifetime()
-> anyhow::Result<()> {
    let m = mesh(&["--debounce", "50ms", "--workload-cert-ttl", "10m"]).await?;
    let client_cert = m.cert("client")?;
    let (mut tls, server) = connect(
        m.web.inbound(8080),
        &client_cert.trust_bundle_pem,
        Some(&client_cert),
    )
    .await?;
    assert_eq!(server.uri_sans, [WEB_ID], "the server proves its SPIFFE id");
    let life = server.not_after.duration_since(server.not_before)?;
    assert_eq!(
        life,
        Duration::from_secs(600 + 60),
        "10m lifetime plus 1m backdate"
    );
    let reply = raw_http_get(&mut tls).await?;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");

    // The client's sidecar originated TLS for the request the fixture sent.
    let handshakes = m
        .client_sidecar
        .stat("cluster.outbound|80||web.shop.svc.cluster.local.ssl.handshake")
        .await?;
    assert!(
        handshakes >= Some(1),
        "client sidecar TLS handshakes: {handshakes:?}"
    );
    // And web-1's sidecar terminated TLS on its inbound listener.
    let inbound = m
        .web_sidecar
        .stat(&format!("listener.{}_8080.ssl.handshake", m.web.ip))
        .await?;
    assert!(
        inbound >= Some(2),
        "web-1 inbound TLS handshakes: {inbound:?}"
    );
    Ok(())
}

#[tokio::test]
async fn plaintext_certless_and_foreign_clients_are_refused_on_a_strict_port() -> anyhow::Result<()>
{
    let m = mesh(&["--debounce", "50ms"]).await?;
    let bundle = m.cert("client")?.trust_bundle_pem;

    // Plaintext HTTP straight to the inbound port.
    let mut plain = tokio::net::TcpStream::connect(m.web.inbound(8080)).await?;
    let reply = raw_http_get(&mut plain).await.unwrap_or_default();
    assert!(!reply.contains("200"), "plaintext got through: {reply:?}");

    // TLS without a client certificate.
    let refused = async {
        let (mut tls, _) = connect(m.web.inbound(8080), &bundle, None).await?;
        raw_http_get(&mut tls).await
    }
    .await;
    assert!(
        !refused.as_deref().unwrap_or("").contains("200"),
        "a client without a certificate got through: {refused:?}"
    );

    // TLS with a certificate for the right name from another CA.
    let foreign = ClientCert::from_foreign_ca(NS, "client", &bundle)?;
    let refused = async {
        let (mut tls, _) = connect(m.web.inbound(8080), &bundle, Some(&foreign)).await?;
        raw_http_get(&mut tls).await
    }
    .await;
    assert!(
        !refused.as_deref().unwrap_or("").contains("200"),
        "a foreign CA's certificate got through: {refused:?}"
    );

    // And the mesh's own client still works.
    let ok = http_get(m.client.outbound(0), "/").await?;
    assert_eq!(ok.status, 200);
    Ok(())
}

#[tokio::test]
async fn certificates_rotate_at_half_life_without_a_failed_request() -> anyhow::Result<()> {
    // 4 s certificates: a new one every 2 s.
    let m = mesh(&["--debounce", "50ms", "--workload-cert-ttl", "4s"]).await?;
    let probe = m.cert("client")?;
    let mut serials = BTreeSet::new();
    let mut requests = 0;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(9) {
        let r = http_get(m.client.outbound(0), "/").await?;
        assert_eq!(
            r.status, 200,
            "request {requests} failed during rotation: {}",
            r.body
        );
        requests += 1;
        if requests % 10 == 0 {
            let (_, server) =
                connect(m.web.inbound(8080), &probe.trust_bundle_pem, Some(&probe)).await?;
            assert_eq!(server.uri_sans, [WEB_ID]);
            serials.insert(server.serial);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        serials.len() >= 3,
        "web-1 presented {} distinct certificates in 9 s (want at least 2 rotations): {serials:?}",
        serials.len()
    );
    assert!(requests > 100, "only {requests} requests were sent");
    let proxies = m.meshd.proxies().await?;
    let web = proxies
        .iter()
        .find(|p| p.node_id == "web-1.shop")
        .context("web-1 connected")?;
    assert!(
        web.types["sds"].responses >= 3,
        "SDS pushes: {:?}",
        web.types["sds"]
    );
    Ok(())
}

#[tokio::test]
async fn a_proxy_claiming_another_identity_gets_no_config_and_no_secret() -> anyhow::Result<()> {
    let m = mesh(&["--debounce", "50ms"]).await?;
    let sds = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
    let client_cert = m.cert("client")?;

    // A's certificate (client), B's node metadata (web-1, service account web).
    let mut c = SotwClient::connect(m.meshd.xds_addr, &client_cert).await?;
    c.request(
        Some(node(NS, "web-1", "web")),
        sds,
        &["default", "ROOTCA"],
        None,
    )
    .await?;
    let status = c.recv_status().await?;
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert!(
        status.message().contains("claims service_account \"web\"")
            && status
                .message()
                .contains("spiffe://cluster.local/ns/shop/sa/client"),
        "{}",
        status.message()
    );
    assert!(
        m.meshd.log().contains("refused an xDS stream"),
        "the refusal is logged"
    );

    // Another namespace is refused the same way.
    let mut c = SotwClient::connect(m.meshd.xds_addr, &client_cert).await?;
    c.request(
        Some(node("other", "client-1", "client")),
        sds,
        &["default"],
        None,
    )
    .await?;
    assert_eq!(c.recv_status().await?.code(), tonic::Code::PermissionDenied);

    // Metadata that agrees with the certificate, but names a pod that runs as another
    // service account: the stream stays, and gets nothing.
    let mut c = SotwClient::connect(m.meshd.xds_addr, &client_cert).await?;
    c.request(
        Some(node(NS, "web-1", "client")),
        sds,
        &["default", "ROOTCA"],
        None,
    )
    .await?;
    let r = c.recv().await?;
    // Only its own identity's secrets ever, and no config of web-1.
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
    use prost::Message;
    let mut own_certificates = 0;
    for any in &r.resources {
        let s = Secret::decode(any.value.as_slice())?;
        if let Some(secret::Type::TlsCertificate(t)) = s.r#type {
            own_certificates += 1;
            let chain = match t.certificate_chain.and_then(|d| d.specifier) {
                Some(
                    envoy_types::pb::envoy::config::core::v3::data_source::Specifier::InlineString(
                        s,
                    ),
                ) => s,
                other => anyhow::bail!("unexpected chain {other:?}"),
            };
            let der = rustls_pki_types_pem(&chain)?;
            let info = meshd_integration::tls::cert_info(&der)?;
            assert_eq!(info.uri_sans, ["spiffe://cluster.local/ns/shop/sa/client"]);
        }
    }
    assert_eq!(
        own_certificates, 1,
        "exactly its own identity's certificate"
    );
    let mut lds = SotwClient::connect(m.meshd.xds_addr, &client_cert).await?;
    let listeners = "type.googleapis.com/envoy.config.listener.v3.Listener";
    lds.request(Some(node(NS, "web-1", "client")), listeners, &[], None)
        .await?;
    let r = lds.recv().await?;
    assert!(
        r.resources.is_empty(),
        "web-1's listeners went to a proxy of another identity"
    );
    let proxies = m.meshd.proxies().await?;
    assert!(
        proxies.iter().any(|p| p
            .problems
            .iter()
            .any(|x| x.contains("runs as service account \"web\""))),
        "{proxies:?}"
    );
    Ok(())
}

fn rustls_pki_types_pem(pem: &str) -> anyhow::Result<Vec<u8>> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    Ok(CertificateDer::from_pem_slice(pem.as_bytes())?.to_vec())
}

#[tokio::test]
async fn private_keys_never_appear_in_logs_or_admin_output() -> anyhow::Result<()> {
    let m = mesh(&["--debounce", "50ms", "--log", "trace"]).await?;
    // Fetch the key meshd hands web-1's identity, as a proxy of that identity would.
    let web_cert = m.cert("web")?;
    let mut c = SotwClient::connect(m.meshd.xds_addr, &web_cert).await?;
    let sds = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
    c.request(Some(node(NS, "web-1", "web")), sds, &["default"], None)
        .await?;
    let r = c.recv().await?;
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
    use prost::Message;
    let secret = Secret::decode(r.resources[0].value.as_slice())?;
    let Some(secret::Type::TlsCertificate(t)) = secret.r#type else {
        anyhow::bail!("not a TLS certificate secret");
    };
    let key = match t.private_key.and_then(|d| d.specifier) {
        Some(envoy_types::pb::envoy::config::core::v3::data_source::Specifier::InlineString(s)) => {
            s
        }
        other => anyhow::bail!("unexpected key {other:?}"),
    };
    // The base64 body lines of the key are what would leak; look for each.
    let body: Vec<&str> = key.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(!body.is_empty());

    let mut outputs = vec![("meshd log (trace)".to_string(), m.meshd.log())];
    assert!(
        outputs[0].1.contains("TRACE"),
        "meshd really logged at trace level"
    );
    for path in [
        "/debug/proxies",
        "/debug/snapshot",
        "/debug/proxy-config?workload=shop/web-1",
    ] {
        let text = m.meshd.get_text(path).await?;
        outputs.push((path.to_string(), text));
    }
    for (what, text) in &outputs {
        assert!(
            !text.contains("PRIVATE KEY"),
            "{what} mentions a private key"
        );
        for line in &body {
            assert!(!text.contains(line), "{what} contains key material");
        }
    }
    // The ca key file is private.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(m.meshd.ca_dir().join("root-key.pem"))?
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    Ok(())
}

#[tokio::test]
async fn meshd_refuses_a_broken_plug_in_ca_and_names_the_file() -> anyhow::Result<()> {
    init_test_logging();
    let dir = MeshDir::new()?;
    let ca = tempfile::tempdir()?;
    let (chain, key) = (ca.path().join("chain.pem"), ca.path().join("key.pem"));
    // A real CA certificate with the key of another one.
    let validity = meshd_ca::store::ROOT_VALIDITY;
    let (good, _) = meshd_ca::generate_root("cluster.local", validity)?;
    let (_, other_key) = meshd_ca::generate_root("cluster.local", validity)?;
    std::fs::write(&chain, good)?;
    std::fs::write(&key, other_key.secret_pem())?;
    let err = Meshd::start_with(
        dir.path(),
        &[
            "--ca-cert-chain",
            chain.to_str().context("utf-8")?,
            "--ca-key",
            key.to_str().context("utf-8")?,
        ],
    )
    .await
    .expect_err("meshd must not start with a key that does not match");
    let msg = format!("{err:#}");
    assert!(msg.contains("meshd exited"), "{msg}");
    assert!(
        msg.contains(&format!(
            "{}: does not belong to the signing certificate",
            key.display()
        )),
        "{msg}"
    );
    Ok(())
}
