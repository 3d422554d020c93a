//! meshd's CA service (`meshd.ca.v1`) on the xDS port, as agents use it: a pod proves
//! who it is with its ServiceAccount token (checked by a real API server's TokenReview
//! and against meshd's own view of the pods) and gets a certificate for exactly its
//! identity, for a key meshd never sees; a holder of a mesh certificate renews exactly
//! that identity. Every refusal says which check failed.

use std::time::Duration;

use anyhow::{Context, ensure};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use meshd_integration::ca_client::{self, csr_for, csr_with, sign};
use meshd_integration::init_test_logging;
use meshd_integration::kube_api::{KubeApi, PodSpec};
use meshd_integration::mesh::MeshDir;
use meshd_integration::meshd::Meshd;
use meshd_integration::net::pod_ip;
use meshd_integration::wait::eventually;
use meshd_proto::ca::WatchTrustBundleRequest;
use tonic::Code;

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const DB: &str = "spiffe://cluster.local/ns/shop/sa/db";

/// The leaf of a PEM chain: its SPIFFE id and its public key.
fn leaf(chain_pem: &str) -> anyhow::Result<(String, Vec<u8>)> {
    let block = pem::parse_many(chain_pem)?
        .into_iter()
        .next()
        .context("an empty chain")?;
    let (_, cert) = x509_parser::parse_x509_certificate(block.contents())?;
    Ok((
        meshd_ca::leaf_uri(block.contents()).map_err(anyhow::Error::msg)?,
        cert.public_key().subject_public_key.data.to_vec(),
    ))
}

fn assert_refused<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: Code,
    says: &str,
) -> String {
    let status = result.expect_err("the call was refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(says),
        "{says:?} is not in {:?}",
        status.message()
    );
    status.message().to_string()
}

/// A workload certificate for `id`'s namespace and service account, minted from the CA
/// directory as `meshctl bootstrap` would: (chain, key).
fn minted(meshd: &Meshd, namespace: &str, sa: &str) -> anyhow::Result<(String, String)> {
    let ca = meshd::cli::CaArgs {
        ca_dir: meshd.ca_dir(),
        ca_cert_chain: None,
        ca_key: None,
        trust_domain: meshd_ca::DEFAULT_TRUST_DOMAIN.to_string(),
    }
    .open_existing_with_bundle(Duration::from_secs(600))?;
    let issued = ca.signer.issue(&ca.signer.workload_id(namespace, sa)?)?;
    Ok((
        issued.chain_pem.clone(),
        issued.key.secret_pem().to_string(),
    ))
}

#[tokio::test]
async fn a_mesh_certificate_renews_exactly_its_own_identity() -> anyhow::Result<()> {
    init_test_logging();
    let mesh = MeshDir::new()?;
    let meshd = Meshd::start_with(mesh.path(), &["--workload-cert-ttl", "10m"]).await?;
    let (chain, key) = minted(&meshd, "shop", "web")?;
    let mut ca = ca_client::client(&meshd, Some((&chain, &key))).await?;

    let csr = csr_for(WEB);
    let signed = sign(&mut ca, None, &csr.pem).await?;
    let (id, public_key) = leaf(&signed.certificate_chain_pem)?;
    assert_eq!(id, WEB);
    assert_eq!(signed.spiffe_id, WEB);
    // The certificate is for the key the caller made, not one meshd made.
    assert_eq!(public_key, csr.key.public_key_raw());
    let life = signed.not_after.context("not_after")?.seconds
        - std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs() as i64;
    ensure!((590..=600).contains(&life), "lifetime {life}s, want 10m");
    assert_eq!(
        signed.trust_bundle.context("bundle")?.roots_pem.concat(),
        meshd.trust_bundle_pem().await?
    );
    // The renewed certificate renews again: the agent's chain of renewals.
    let mut renewed = ca_client::client(
        &meshd,
        Some((&signed.certificate_chain_pem, &csr.key.serialize_pem())),
    )
    .await?;
    sign(&mut renewed, None, &csr_for(WEB).pem).await?;

    // Another identity, other keys, other names: refused, saying which.
    assert_refused(
        sign(&mut ca, None, &csr_for(DB).pem).await,
        Code::PermissionDenied,
        &format!("asks for {DB}, but the caller is {WEB}"),
    );
    let p384 = csr_with(&rcgen::PKCS_ECDSA_P384_SHA384, &[WEB]);
    assert_refused(
        sign(&mut ca, None, &p384.pem).await,
        Code::InvalidArgument,
        "meshd signs ECDSA P-256 keys only",
    );
    assert_refused(
        sign(
            &mut ca,
            None,
            &csr_with(&rcgen::PKCS_ECDSA_P256_SHA256, &[WEB, DB]).pem,
        )
        .await,
        Code::InvalidArgument,
        "exactly one identity",
    );
    assert_refused(
        sign(&mut ca, None, "not a csr").await,
        Code::InvalidArgument,
        "not a PKCS#10",
    );
    // Without Kubernetes, a token is no credential; no credential is none.
    assert_refused(
        sign(&mut ca, Some("a.b.c"), &csr_for(WEB).pem).await,
        Code::Unauthenticated,
        "only with --source kubernetes",
    );
    let mut anonymous = ca_client::client(&meshd, None).await?;
    assert_refused(
        sign(&mut anonymous, None, &csr_for(WEB).pem).await,
        Code::Unauthenticated,
        "no client certificate was presented",
    );
    let metrics = meshd.metrics().await?;
    assert!(
        metrics.contains("meshd_ca_signed_total{auth=\"certificate\"} 2"),
        "{metrics}"
    );
    assert!(
        meshd
            .log()
            .contains("signed a workload certificate (renewal over mutual TLS)")
    );
    Ok(())
}

/// The CA service makes a client certificate optional on the xDS port; ADS is not.
#[tokio::test]
async fn an_ads_stream_without_a_client_certificate_is_refused() -> anyhow::Result<()> {
    init_test_logging();
    let mesh = MeshDir::new()?;
    let meshd = Meshd::start(mesh.path()).await?;
    let tls = meshd_proto::client::tls_config(
        &meshd.trust_bundle_pem().await?,
        &meshd.identity()?.to_string(),
        None,
    )?;
    let channel = meshd_proto::client::channel(&meshd.xds_addr.to_string(), tls)?;
    let mut ads = AggregatedDiscoveryServiceClient::new(channel);
    let request = DiscoveryRequest {
        node: Some(Node {
            id: "web-1.shop".into(),
            ..Default::default()
        }),
        type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".into(),
        ..Default::default()
    };
    let status = match ads
        .stream_aggregated_resources(tokio_stream::iter([request]))
        .await
    {
        Err(status) => status,
        Ok(response) => response
            .into_inner()
            .message()
            .await
            .expect_err("no response to a stream without a certificate"),
    };
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(
        status.message().contains("no client certificate"),
        "{status:?}"
    );
    Ok(())
}

/// WatchTrustBundle sends the bundle, then each change: a root rotation's first step
/// reaches the watcher at once.
#[tokio::test]
async fn the_trust_bundle_stream_announces_a_root_rotation() -> anyhow::Result<()> {
    init_test_logging();
    let mesh = MeshDir::new()?;
    let meshd = Meshd::start_with(mesh.path(), &["--root-rotation-grace", "1h"]).await?;
    let (chain, key) = minted(&meshd, "shop", "web")?;
    let mut ca = ca_client::client(&meshd, Some((&chain, &key))).await?;
    let mut stream = ca
        .watch_trust_bundle(WatchTrustBundleRequest {})
        .await?
        .into_inner();
    let first = stream.message().await?.context("the bundle")?;
    assert_eq!(first.trust_domain, "cluster.local");
    assert_eq!(first.roots_pem.len(), 1);
    let out = meshd.meshctl(&["ca", "rotate-root"]).await?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let second = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .context("no bundle change within 5s")??
        .context("the stream ended")?;
    assert_eq!(second.roots_pem.len(), 2, "old and new root trusted");
    // Step 1: the old root still signs.
    assert_eq!(second.roots_pem[0], first.roots_pem[0]);
    Ok(())
}

const NS: &str = "shop";

fn pod<'a>(name: &'a str, sa: &'a str, ip: &'a str) -> PodSpec<'a> {
    PodSpec {
        namespace: NS,
        name,
        app: name,
        service_account: sa,
        ip,
        ports: &[8080],
        annotations: &[],
    }
}

#[tokio::test]
async fn a_pods_token_gets_exactly_its_identity_and_nothing_else() -> anyhow::Result<()> {
    init_test_logging();
    let api = KubeApi::start().await?;
    api.create_namespace(NS, &[]).await?;
    for sa in ["web", "db"] {
        api.service_account(NS, sa).await?;
    }
    let (web_ip, db_ip) = (pod_ip().to_string(), pod_ip().to_string());
    api.pod(&pod("web-0", "web", &web_ip), true).await?;
    api.pod(&pod("db-0", "db", &db_ip), true).await?;
    let meshd = Meshd::start_kubernetes(&api, &[]).await?;
    let mut ca = ca_client::client(&meshd, None).await?;

    let token = api.token(NS, "web", "meshd", Some("web-0")).await?;
    // meshd may not have seen the pods yet: that answer is UNAVAILABLE, to retry.
    let csr = csr_for(WEB);
    let signed = eventually("meshd signs web-0's CSR", Duration::from_secs(20), || {
        let (mut ca, token, pem) = (ca.clone(), token.clone(), csr.pem.clone());
        async move { Ok(sign(&mut ca, Some(&token), &pem).await?) }
    })
    .await?;
    let (id, public_key) = leaf(&signed.certificate_chain_pem)?;
    assert_eq!(id, WEB);
    assert_eq!(public_key, csr.key.public_key_raw());
    // Renewals come from the cached review: one TokenReview for several certificates.
    for _ in 0..4 {
        sign(&mut ca, Some(&token), &csr_for(WEB).pem).await?;
    }
    let metrics = meshd.metrics().await?;
    assert!(
        metrics.contains("meshd_token_reviews_total{reason=\"authenticated\"} 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("meshd_ca_signed_total{auth=\"token\"} 5"),
        "{metrics}"
    );
    let log = meshd.log();
    let line = log
        .lines()
        .find(|l| l.contains("signed a workload certificate (ServiceAccount token)"))
        .context("no log line for the certificate")?;
    for part in [
        "pod=shop/web-0",
        &format!("identity={WEB}"),
        "serial=",
        "not_after=",
    ] {
        assert!(line.contains(part), "{part:?} is not in {line:?}");
    }

    // The bundle the pod's agent trusts meshd by, before its first certificate.
    let bundle = meshd.trust_bundle_pem().await?;
    eventually(
        "the trust bundle ConfigMap",
        Duration::from_secs(20),
        || {
            let (client, bundle) = (api.client.clone(), bundle.clone());
            async move {
                let cm = kube::Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(client, NS)
                    .get("meshd-trust-bundle")
                    .await?;
                let data = cm.data.unwrap_or_default();
                ensure!(data.get("trust-bundle.pem") == Some(&bundle), "{data:?}");
                Ok(())
            }
        },
    )
    .await?;

    // Web's token cannot get db's identity.
    assert_refused(
        sign(&mut ca, Some(&token), &csr_for(DB).pem).await,
        Code::PermissionDenied,
        &format!("asks for {DB}, but the caller is {WEB}"),
    );
    // A token for another audience, an expired one, one bound to no pod, garbage, none.
    let other = api.token(NS, "web", "other", Some("web-0")).await?;
    assert_refused(
        sign(&mut ca, Some(&other), &csr.pem).await,
        Code::Unauthenticated,
        "do not include \"meshd\"",
    );
    let expired = api.expired(&token)?;
    assert_refused(
        sign(&mut ca, Some(&expired), &csr.pem).await,
        Code::Unauthenticated,
        "the token expired at",
    );
    let unbound = api.token(NS, "web", "meshd", None).await?;
    assert_refused(
        sign(&mut ca, Some(&unbound), &csr.pem).await,
        Code::Unauthenticated,
        "not bound to a pod",
    );
    assert_refused(
        sign(&mut ca, Some("garbage"), &csr.pem).await,
        Code::Unauthenticated,
        "not a JWT",
    );
    // A well-formed token the API server did not sign.
    let forged = {
        let mut parts: Vec<&str> = token.split('.').collect();
        parts[2] = "c2lnbmF0dXJl";
        parts.join(".")
    };
    assert_refused(
        sign(&mut ca, Some(&forged), &csr.pem).await,
        Code::Unauthenticated,
        "the API server refused the token",
    );
    assert_refused(
        sign(&mut ca, None, &csr.pem).await,
        Code::Unauthenticated,
        "ServiceAccount token",
    );

    // The pod goes away: its token, cached review or not, gets nothing more.
    api.delete_pod_now(NS, "web-0").await?;
    let refusal = eventually("web-0's token is refused", Duration::from_secs(20), || {
        let (mut ca, token, pem) = (ca.clone(), token.clone(), csr.pem.clone());
        async move {
            // Until the cached review is old enough to be asked about again, the pod's
            // absence from meshd's view refuses it; then the API server does.
            match sign(&mut ca, Some(&token), &pem).await {
                Ok(_) => anyhow::bail!("still signed"),
                Err(status) if status.code() == Code::Unauthenticated => Ok(status),
                Err(status) => anyhow::bail!("refused, but not yet by the API server: {status:?}"),
            }
        }
    })
    .await?;
    assert_eq!(refusal.code(), Code::Unauthenticated, "{refusal:?}");
    assert!(
        refusal
            .message()
            .contains("the API server refused the token"),
        "{refusal:?}"
    );

    // Not a token, in any of the log's lines.
    let log = meshd.log();
    for secret in [&token, &other, &expired, &unbound, &forged] {
        assert!(!log.contains(secret.as_str()), "a token was logged");
    }
    assert!(log.contains("refused a CA call"), "{log}");
    Ok(())
}

/// A certificate signed for a CSR counts for the root rotation like one served over
/// SDS: `meshctl ca status` shows it while it is valid under the old root, and the old
/// root leaves the bundle only once none is.
#[tokio::test]
async fn the_rotation_counts_certificates_signed_for_csrs() -> anyhow::Result<()> {
    init_test_logging();
    let mesh = MeshDir::new()?;
    let meshd = Meshd::start_with(
        mesh.path(),
        &["--workload-cert-ttl", "6s", "--root-rotation-grace", "1s"],
    )
    .await?;
    let (chain, key) = minted(&meshd, "shop", "web")?;
    let mut ca = ca_client::client(&meshd, Some((&chain, &key))).await?;
    let out = meshd.meshctl(&["ca", "rotate-root"]).await?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Signed by the old root while step 1 trusts both.
    sign(&mut ca, None, &csr_for(WEB).pem).await?;
    let counted = eventually(
        "step 2 with the CSR's certificate counted",
        Duration::from_secs(10),
        || async {
            let out = meshd.meshctl(&["ca", "status"]).await?;
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            ensure!(text.contains("signing-with-new-root"), "{text}");
            Ok(text)
        },
    )
    .await?;
    assert!(
        counted.contains("certificates still valid under the old root: 1"),
        "{counted}"
    );
    let (done, _) = meshd.wait_rotation_done(Duration::from_secs(20)).await?;
    assert_eq!(done.valid_under_old_roots, 0);
    Ok(())
}
