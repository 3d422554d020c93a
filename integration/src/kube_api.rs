//! A real Kubernetes API server for tests (`../shared/tools/kube-test-apiserver`: kube's
//! own server libraries on etcd), with meshd's CRDs installed, and helpers to create the
//! objects a cluster's controllers would (Pods with status, EndpointSlices).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::net::free_port;
use crate::tools::workspace_root;
use crate::wait::eventually;

pub struct KubeApi {
    dir: TempDir,
    pub kubeconfig: PathBuf,
    pub client: Client,
    api_port: u16,
    etcd_port: u16,
}

/// The test API server's script: `../shared/tools/` beside the checkout (or, for a
/// checkout elsewhere, the workplace's `/work/shared/tools/`).
fn script() -> anyhow::Result<PathBuf> {
    const SCRIPT: &str = "shared/tools/kube-test-apiserver/apiserver.sh";
    let beside = workspace_root().join("..").join(SCRIPT);
    let workplace = Path::new("/work").join(SCRIPT);
    [&beside, &workplace]
        .into_iter()
        .find(|p| p.exists())
        .cloned()
        .with_context(|| {
            format!(
                "{} is missing: the Kubernetes tests need the shared test tools beside the checkout",
                beside.display()
            )
        })
}

impl KubeApi {
    /// Starts an API server on free ports, installs meshd's CRDs and creates meshd's
    /// namespace `meshd-system`.
    pub async fn start() -> anyhow::Result<KubeApi> {
        let api = Self::start_bare().await?;
        api.install_crds().await?;
        api.create_namespace("meshd-system", &[]).await?;
        Ok(api)
    }

    /// Starts an API server with nothing installed.
    pub async fn start_bare() -> anyhow::Result<KubeApi> {
        let dir = tempfile::Builder::new().prefix("meshd-kube-").tempdir()?;
        let (api_port, etcd_port) = (free_port(), free_port_pair());
        let mut api = KubeApi {
            kubeconfig: dir.path().join("kubeconfig"),
            dir,
            client: Client::try_from(kube::Config::new("http://127.0.0.1:1".parse()?))?,
            api_port,
            etcd_port,
        };
        api.run_script("start").await?;
        api.client = api.connect().await?;
        Ok(api)
    }

    async fn run_script(&self, command: &str) -> anyhow::Result<()> {
        let key = self.sa_key_file();
        if !key.exists() {
            let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            std::fs::write(&key, pair.serialize_pem())?;
        }
        let out = tokio::process::Command::new("bash")
            .env("KUBE_TEST_SA_KEY_FILE", &key)
            .arg(script()?)
            .arg(command)
            .arg(self.dir.path())
            .arg(self.api_port.to_string())
            .arg(self.etcd_port.to_string())
            .output()
            .await
            .context("cannot run apiserver.sh")?;
        if !out.status.success() {
            bail!(
                "apiserver.sh {command} failed: {}{}\napiserver log:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(self.dir.path().join("kube-apiserver.log"))
                    .unwrap_or_default()
            );
        }
        Ok(())
    }

    async fn connect(&self) -> anyhow::Result<Client> {
        let kc = kube::config::Kubeconfig::read_from(&self.kubeconfig)?;
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
        Ok(Client::try_from(config)?)
    }

    /// Stops and starts the API server on the same etcd data: every watch is cut, and
    /// the new server's watch cache starts at the current revision.
    pub async fn restart(&self) -> anyhow::Result<()> {
        self.run_script("start").await
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    pub async fn install_crds(&self) -> anyhow::Result<()> {
        let crds: Api<CustomResourceDefinition> = Api::all(self.client.clone());
        for crd in meshd::sources::crd::crds() {
            let name = crd.metadata.name.clone().context("CRD without a name")?;
            crds.patch(&name, &apply(), &Patch::Apply(&crd)).await?;
            eventually(
                &format!("CRD {name} established"),
                Duration::from_secs(15),
                || {
                    let crds = crds.clone();
                    let name = name.clone();
                    async move {
                        let crd = crds.get(&name).await?;
                        let established = crd
                            .status
                            .and_then(|s| s.conditions)
                            .unwrap_or_default()
                            .iter()
                            .any(|c| c.type_ == "Established" && c.status == "True");
                        ensure!(established, "not established yet");
                        Ok(())
                    }
                },
            )
            .await?;
        }
        Ok(())
    }

    pub async fn create_namespace(
        &self,
        name: &str,
        labels: &[(&str, &str)],
    ) -> anyhow::Result<()> {
        // kube-apiserver labels every namespace with its name (what webhook
        // configurations select namespaces by); the test server does not.
        let labels: serde_json::Map<String, Value> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .chain([("kubernetes.io/metadata.name".to_string(), json!(name))])
            .collect();
        let ns = json!({"apiVersion": "v1", "kind": "Namespace",
                        "metadata": {"name": name, "labels": labels}});
        Api::<Namespace>::all(self.client.clone())
            .patch(name, &apply(), &Patch::Apply(&ns))
            .await
            .with_context(|| format!("apply Namespace {name}"))?;
        Ok(())
    }

    /// Server-side applies `object` (JSON in Kubernetes form) as field manager `test`.
    pub async fn apply<K>(&self, namespace: &str, object: Value) -> anyhow::Result<()>
    where
        K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + serde::Serialize
            + std::fmt::Debug,
    {
        let name = object["metadata"]["name"]
            .as_str()
            .context("object without metadata.name")?
            .to_string();
        let api: Api<K> = Api::namespaced(self.client.clone(), namespace);
        api.patch(&name, &apply(), &Patch::Apply(&object))
            .await
            .with_context(|| format!("apply {} {name}", K::kind(&())))?;
        Ok(())
    }

    pub async fn delete<K>(&self, namespace: &str, name: &str) -> anyhow::Result<()>
    where
        K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        Api::<K>::namespaced(self.client.clone(), namespace)
            .delete(name, &DeleteParams::default())
            .await?;
        Ok(())
    }

    /// A Service selecting `app: <app>` with one HTTP port.
    pub async fn http_service(
        &self,
        ns: &str,
        name: &str,
        port: u16,
        target: u16,
    ) -> anyhow::Result<()> {
        self.apply::<Service>(
            ns,
            json!({"apiVersion": "v1", "kind": "Service",
                   "metadata": {"name": name, "namespace": ns},
                   "spec": {"selector": {"app": name},
                            "ports": [{"name": "http", "port": port, "targetPort": target,
                                       "appProtocol": "http"}]}}),
        )
        .await
    }

    /// A Pod as the kubelet would report it: `ip`, running, Ready or not.
    pub async fn pod(&self, pod: &PodSpec<'_>, ready: bool) -> anyhow::Result<()> {
        let mut annotations = serde_json::Map::new();
        for (k, v) in pod.annotations {
            annotations.insert(k.to_string(), json!(v));
        }
        let ports: Vec<Value> = pod
            .ports
            .iter()
            .map(|p| json!({"containerPort": p}))
            .collect();
        self.apply::<Pod>(
            pod.namespace,
            json!({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": pod.name, "namespace": pod.namespace,
                                "labels": {"app": pod.app}, "annotations": annotations},
                   "spec": {"serviceAccountName": pod.service_account,
                            "containers": [{"name": "app", "image": "app", "ports": ports}]}}),
        )
        .await?;
        self.pod_status(pod, ready).await
    }

    pub async fn pod_status(&self, pod: &PodSpec<'_>, ready: bool) -> anyhow::Result<()> {
        let ready = if ready { "True" } else { "False" };
        let status = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod.name, "namespace": pod.namespace},
            "status": {"phase": "Running", "podIP": pod.ip, "podIPs": [{"ip": pod.ip}],
                       "conditions": [{"type": "Ready", "status": ready}]}});
        Api::<Pod>::namespaced(self.client.clone(), pod.namespace)
            .patch_status(pod.name, &apply(), &Patch::Apply(&status))
            .await
            .with_context(|| format!("status of pod {}", pod.name))?;
        Ok(())
    }

    /// The EndpointSlice the endpoint-slice controller would keep for `service`:
    /// one endpoint per `(pod, ip, ready)`.
    pub async fn endpoint_slice(
        &self,
        ns: &str,
        service: &str,
        port: u16,
        endpoints: &[(&str, &str, bool)],
    ) -> anyhow::Result<()> {
        let eps: Vec<Value> = endpoints
            .iter()
            .map(|(pod, ip, ready)| {
                json!({"addresses": [ip], "conditions": {"ready": ready},
                       "targetRef": {"kind": "Pod", "name": pod, "namespace": ns}})
            })
            .collect();
        self.apply::<EndpointSlice>(
            ns,
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                   "metadata": {"name": format!("{service}-1"), "namespace": ns,
                                "labels": {"kubernetes.io/service-name": service}},
                   "addressType": "IPv4",
                   "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
                   "endpoints": eps}),
        )
        .await
    }

    /// Creates the ServiceAccount `ns/name`.
    pub async fn service_account(&self, ns: &str, name: &str) -> anyhow::Result<()> {
        self.apply::<ServiceAccount>(
            ns,
            json!({"apiVersion": "v1", "kind": "ServiceAccount",
                   "metadata": {"name": name, "namespace": ns}}),
        )
        .await
    }

    /// The uid of pod `ns/name`.
    pub async fn pod_uid(&self, ns: &str, name: &str) -> anyhow::Result<String> {
        Api::<Pod>::namespaced(self.client.clone(), ns)
            .get(name)
            .await?
            .metadata
            .uid
            .context("the pod has no uid")
    }

    /// Deletes pod `ns/name` at once, as the kubelet finally does.
    pub async fn delete_pod_now(&self, ns: &str, name: &str) -> anyhow::Result<()> {
        Api::<Pod>::namespaced(self.client.clone(), ns)
            .delete(name, &DeleteParams::default().grace_period(0))
            .await?;
        Ok(())
    }

    /// A token of ServiceAccount `ns/sa` for `audience` (TokenRequest, what
    /// `kubectl create token` does), bound to `pod` if given (its uid looked up).
    pub async fn token(
        &self,
        ns: &str,
        sa: &str,
        audience: &str,
        pod: Option<&str>,
    ) -> anyhow::Result<String> {
        use k8s_openapi::api::authentication::v1::{
            BoundObjectReference, TokenRequest, TokenRequestSpec,
        };
        let bound = match pod {
            Some(name) => Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(name.into()),
                uid: Some(self.pod_uid(ns, name).await?),
            }),
            None => None,
        };
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec![audience.into()],
                bound_object_ref: bound,
                expiration_seconds: Some(600),
            },
            ..Default::default()
        };
        let answer = Api::<ServiceAccount>::namespaced(self.client.clone(), ns)
            .create_token_request(sa, &Default::default(), &request)
            .await
            .with_context(|| format!("TokenRequest for {ns}/{sa}"))?;
        Ok(answer.status.context("no token in the answer")?.token)
    }

    /// `token` with its times moved into the past (`exp` two minutes ago, beyond the
    /// API server's leeway), signed again with the API server's own signing key: a
    /// genuine token that has expired. TokenRequest cannot mint one (at least 10 min).
    pub fn expired(&self, token: &str) -> anyhow::Result<String> {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut parts = token.split('.');
        let (header, payload) = (
            parts.next().context("header")?,
            parts.next().context("payload")?,
        );
        let mut claims: Value = serde_json::from_slice(&b64.decode(payload)?)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs() as i64;
        claims["iat"] = json!(now - 900);
        claims["nbf"] = json!(now - 900);
        claims["exp"] = json!(now - 120);
        let signing_input = format!("{header}.{}", b64.encode(claims.to_string()));
        let key_pem = std::fs::read_to_string(self.sa_key_file())?;
        let der = pem::parse(&key_pem)?.into_contents();
        let rng = ring::rand::SystemRandom::new();
        let key = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &der,
            &rng,
        )
        .map_err(|e| anyhow::anyhow!("the ServiceAccount signing key: {e}"))?;
        let signature = key
            .sign(&rng, signing_input.as_bytes())
            .map_err(|e| anyhow::anyhow!("signing: {e}"))?;
        Ok(format!(
            "{signing_input}.{}",
            b64.encode(signature.as_ref())
        ))
    }

    /// The key the API server signs ServiceAccount tokens with: PKCS#8, made here
    /// (the server's own default is SEC1, which ring does not read).
    fn sa_key_file(&self) -> PathBuf {
        self.dir.path().join("sa-signing-key.pem")
    }

    /// The trust bundle meshd keeps in `ns` (ConfigMap `meshd-trust-bundle`), once it
    /// is there.
    pub async fn trust_bundle_config_map(&self, ns: &str) -> anyhow::Result<String> {
        let api = Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(self.client.clone(), ns);
        eventually(
            "the meshd-trust-bundle ConfigMap",
            Duration::from_secs(20),
            || async {
                let cm = api.get("meshd-trust-bundle").await?;
                cm.data
                    .and_then(|d| d.get("trust-bundle.pem").cloned())
                    .context("no trust-bundle.pem")
            },
        )
        .await
    }

    /// meshd's root as stored in its Secret: (certificate PEM, key PEM).
    pub async fn mesh_root(&self) -> anyhow::Result<(String, String)> {
        let secret = Api::<Secret>::namespaced(self.client.clone(), "meshd-system")
            .get("meshd-ca")
            .await?;
        let data = secret.data.unwrap_or_default();
        let text = |k: &str| -> anyhow::Result<String> {
            Ok(String::from_utf8(
                data.get(k).with_context(|| format!("no {k}"))?.0.clone(),
            )?)
        };
        Ok((text("root-cert.pem")?, text("root-key.pem")?))
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        if let Ok(script) = script() {
            let _ = std::process::Command::new("bash")
                .arg(script)
                .arg("stop")
                .arg(self.dir.path())
                .output();
        }
    }
}

/// A pod for [`KubeApi::pod`].
pub struct PodSpec<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub app: &'a str,
    pub service_account: &'a str,
    pub ip: &'a str,
    pub ports: &'a [u16],
    pub annotations: &'a [(&'a str, &'a str)],
}

fn apply() -> PatchParams {
    PatchParams::apply("test").force()
}

/// etcd takes a client port and the next one as its peer port.
fn free_port_pair() -> u16 {
    loop {
        let (p, q) = (free_port(), free_port());
        if q == p + 1 {
            return p;
        }
    }
}
