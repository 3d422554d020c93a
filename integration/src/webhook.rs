//! meshd's admission webhooks as the API server uses them: the chart's webhook
//! configuration installed into a test API server (pointed at a meshd outside the
//! cluster with `injection.url`), and an HTTPS client that checks meshd's certificate
//! as the API server does (against the trust bundle, by DNS name).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use kube::Api;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::chart::render;
use crate::kube_api::KubeApi;
use crate::wait::eventually;

/// The chart's webhook configuration for release `meshd` in `meshd-system`.
pub const CONFIGURATION: &str = "meshd-meshd-system";

/// Renders the chart with the webhook calling `url` and creates its
/// MutatingWebhookConfiguration (and nothing else of the chart) in `api`.
pub async fn install(api: &KubeApi, url: &str) -> anyhow::Result<()> {
    let rendered = render(
        "meshd",
        "meshd-system",
        &["--set", &format!("injection.url={url}")],
    )?;
    let object = rendered.one("MutatingWebhookConfiguration")?;
    let config: MutatingWebhookConfiguration = serde_json::from_value(object.clone())?;
    Api::<MutatingWebhookConfiguration>::all(api.client.clone())
        .create(&Default::default(), &config)
        .await
        .context("create the chart's MutatingWebhookConfiguration")?;
    Ok(())
}

/// Renders the chart with the validating webhook calling `url` and creates its
/// ValidatingWebhookConfiguration (and nothing else of the chart) in `api`.
pub async fn install_validating(api: &KubeApi, url: &str) -> anyhow::Result<()> {
    let rendered = render(
        "meshd",
        "meshd-system",
        &["--set", &format!("admission.url={url}")],
    )?;
    let object = rendered.one("ValidatingWebhookConfiguration")?;
    let config: ValidatingWebhookConfiguration = serde_json::from_value(object.clone())?;
    Api::<ValidatingWebhookConfiguration>::all(api.client.clone())
        .create(&Default::default(), &config)
        .await
        .context("create the chart's ValidatingWebhookConfiguration")?;
    Ok(())
}

/// meshd on `api` serving its webhooks on `addr` with the injection settings
/// `inject_config`, once its Lease holder has written the mutating configuration's
/// caBundle (and the validating one's, with `validating`); and that trust bundle.
pub async fn start_meshd(
    api: &KubeApi,
    addr: SocketAddr,
    inject_config: &std::path::Path,
    validating: bool,
) -> anyhow::Result<(crate::meshd::Meshd, String)> {
    let meshd = crate::meshd::Meshd::start_kubernetes(
        api,
        &[
            "--webhook-address",
            &addr.to_string(),
            "--webhook-configuration",
            CONFIGURATION,
            "--inject-config",
            inject_config.to_str().context("path")?,
        ],
    )
    .await?;
    let bundle = meshd.trust_bundle_pem().await?;
    wait_ca_bundle(api, &bundle).await?;
    if validating {
        wait_validating_ca_bundle(api, &bundle).await?;
    }
    Ok((meshd, bundle))
}

/// The certificates of a PEM bundle, DER.
fn certificates(pem: &[u8]) -> Vec<Vec<u8>> {
    CertificateDer::pem_slice_iter(pem)
        .filter_map(Result::ok)
        .map(|c| c.to_vec())
        .collect()
}

/// Waits until every webhook of the MutatingWebhookConfiguration [`CONFIGURATION`]
/// trusts exactly the certificates of `bundle` (meshd's Lease holder writes them).
pub async fn wait_ca_bundle(api: &KubeApi, bundle: &str) -> anyhow::Result<()> {
    wait_bundles(api, bundle, |c: MutatingWebhookConfiguration| {
        let webhooks = c.webhooks.into_iter().flatten();
        webhooks
            .map(|w| (w.name, w.client_config.ca_bundle))
            .collect()
    })
    .await
}

/// [`wait_ca_bundle`] for the ValidatingWebhookConfiguration [`CONFIGURATION`].
pub async fn wait_validating_ca_bundle(api: &KubeApi, bundle: &str) -> anyhow::Result<()> {
    wait_bundles(api, bundle, |c: ValidatingWebhookConfiguration| {
        let webhooks = c.webhooks.into_iter().flatten();
        webhooks
            .map(|w| (w.name, w.client_config.ca_bundle))
            .collect()
    })
    .await
}

/// Waits until every webhook `webhooks` finds in [`CONFIGURATION`] of kind `K` trusts
/// exactly the certificates of `bundle`.
async fn wait_bundles<K>(
    api: &KubeApi,
    bundle: &str,
    webhooks: fn(K) -> Vec<(String, Option<k8s_openapi::ByteString>)>,
) -> anyhow::Result<()>
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::ClusterResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let want = certificates(bundle.as_bytes());
    anyhow::ensure!(!want.is_empty(), "no certificate in the expected bundle");
    let configs: Api<K> = Api::all(api.client.clone());
    eventually(
        "meshd wrote the webhooks' caBundle",
        Duration::from_secs(20),
        || {
            let configs = configs.clone();
            let want = want.clone();
            async move {
                for (name, ca_bundle) in webhooks(configs.get(CONFIGURATION).await?) {
                    let have = ca_bundle.as_ref().map(|b| b.0.as_slice());
                    anyhow::ensure!(
                        have.map(certificates).as_ref() == Some(&want),
                        "webhook {name} trusts {:?}",
                        have.map(String::from_utf8_lossy)
                    );
                }
                Ok(())
            }
        },
    )
    .await
}

/// An HTTPS/1.1 client of meshd's webhook port that trusts only the mesh's trust
/// bundle and checks the name `localhost`, keeping its connection open.
pub struct WebhookClient {
    addr: SocketAddr,
    connector: TlsConnector,
    conn: Option<SendRequest<Full<Bytes>>>,
}

impl WebhookClient {
    pub fn new(addr: SocketAddr, trust_bundle_pem: &str) -> anyhow::Result<WebhookClient> {
        let mut roots = rustls::RootCertStore::empty();
        for der in CertificateDer::pem_slice_iter(trust_bundle_pem.as_bytes()) {
            roots.add(der?)?;
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(WebhookClient {
            addr,
            connector: TlsConnector::from(Arc::new(config)),
            conn: None,
        })
    }

    async fn connect(&mut self) -> anyhow::Result<&mut SendRequest<Full<Bytes>>> {
        if self.conn.as_ref().is_none_or(|c| c.is_closed()) {
            let tcp = TcpStream::connect(self.addr).await?;
            tcp.set_nodelay(true)?;
            let tls = self
                .connector
                .connect(ServerName::try_from("localhost")?, tcp)
                .await
                .context("TLS handshake with meshd's webhook port")?;
            let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
            tokio::spawn(conn);
            self.conn = Some(send);
        }
        Ok(self.conn.as_mut().expect("connected"))
    }

    /// POSTs `body` to `path`: the status and the body of the answer.
    pub async fn post(&mut self, path: &str, body: Vec<u8>) -> anyhow::Result<(u16, Bytes)> {
        let request = hyper::Request::post(path)
            .header("host", "localhost")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))?;
        let send = self.connect().await?;
        send.ready().await?;
        let response = match send.send_request(request).await {
            Ok(r) => r,
            Err(e) => {
                self.conn = None;
                bail!("POST {path}: {e}");
            }
        };
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }

    /// Sends an AdmissionReview v1 for `object` (`operation` on `namespace`) to
    /// `path` and returns the `response` of the answer.
    pub async fn review(
        &mut self,
        path: &str,
        namespace: &str,
        operation: &str,
        object: &Value,
    ) -> anyhow::Result<Value> {
        let (status, body) = self
            .post(
                path,
                serde_json::to_vec(&review(namespace, operation, object))?,
            )
            .await?;
        anyhow::ensure!(
            status == 200,
            "{path} answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
        let answer: Value = serde_json::from_slice(&body)?;
        Ok(answer["response"].clone())
    }
}

/// The AdmissionReview v1 the API server sends for `object`.
pub fn review(namespace: &str, operation: &str, object: &Value) -> Value {
    let kind = object["kind"].as_str().unwrap_or("Pod");
    let api_version = object["apiVersion"].as_str().unwrap_or("v1");
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": group, "version": version, "kind": kind},
            "resource": {"group": group, "version": version, "resource": format!("{}s", kind.to_lowercase())},
            "name": object["metadata"]["name"],
            "namespace": namespace,
            "operation": operation,
            "userInfo": {"username": "admin"},
            "object": object,
            "oldObject": null,
            "dryRun": false,
        }
    })
}
