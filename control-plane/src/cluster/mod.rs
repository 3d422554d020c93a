//! meshd as a Kubernetes controller with several replicas.
//!
//! Every replica watches the cluster ([`crate::sources::kubernetes`]) and serves xDS.
//! What must happen once per cluster happens once:
//!
//! - [`ca_secret`]: the mesh's root lives in a Secret that the first replica creates
//!   (create-if-absent: a replica that loses the race reads the winner's), so every
//!   replica signs with the same root, and a restarted meshd keeps it.
//! - [`lease`]: a `coordination.k8s.io/v1` Lease elects one replica; singleton duties
//!   follow it.
//! - [`policy_status`]: the Lease holder writes each policy's `Accepted` condition.
//! - [`admission_report`]: the Lease holder puts the running pods against every
//!   WorkloadPolicy and keeps a bounded summary in its `status.report` and `/metrics`.
//! - [`root_rotation`]: the Lease holder moves staged root rotations on, in the Secret;
//!   every replica follows it.
//! - [`trust_bundle`]: the Lease holder keeps the trust bundle in a ConfigMap in every
//!   mesh namespace, for pods' agents to trust meshd by before their first certificate.
//! - [`webhook_ca`]: the Lease holder keeps the `caBundle` of meshd's webhook
//!   configuration equal to the trust bundle.

pub mod admission_report;
pub mod ca_secret;
pub mod lease;
pub mod policy_status;
pub mod root_rotation;
pub mod trust_bundle;
pub mod webhook_ca;

/// The Kubernetes client: `kubeconfig` if given, else `KUBECONFIG`/`~/.kube/config`,
/// else the in-cluster service account.
pub async fn client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<kube::Client> {
    use anyhow::Context;
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("--kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .with_context(|| format!("--kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer().await.context(
            "no Kubernetes configuration: give --kubeconfig, set KUBECONFIG, or run in a pod",
        )?,
    };
    kube::Client::try_from(config).context("cannot build a Kubernetes client")
}

/// Fails at start, saying what to do, when meshd's own namespace does not exist: meshd
/// keeps the mesh root (Secret `meshd-ca`) and its Lease there, and it does not create
/// namespaces (that is the installer's choice: `helm install --create-namespace`).
/// Without the right to read namespaces, the steps that follow report what fails.
pub async fn require_namespace(client: &kube::Client, namespace: &str) -> anyhow::Result<()> {
    use anyhow::Context;
    use k8s_openapi::api::core::v1::Namespace;
    let api: kube::Api<Namespace> = kube::Api::all(client.clone());
    match api.get_opt(namespace).await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => anyhow::bail!(
            "namespace {namespace:?} does not exist. meshd keeps the mesh root (Secret \
             {namespace}/{}) and its Lease in the namespace that --namespace (MESHD_NAMESPACE) \
             names, and does not create it: create it (`kubectl create namespace {namespace}`; \
             the Helm chart's `helm install -n {namespace} --create-namespace` does), or give \
             --namespace the namespace meshd should use",
            ca_secret::SECRET_NAME
        ),
        Err(kube::Error::Api(e)) if e.code == 403 => Ok(()),
        Err(e) => {
            Err(e).with_context(|| format!("cannot read namespace {namespace:?} (--namespace)"))
        }
    }
}
