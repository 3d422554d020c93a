//! The shop the Kubernetes tests run: Service `web` (pod web-1, an HTTP app) and pod
//! client-1 calling it through its sidecar, created in a real API server as a cluster's
//! controllers would (Pods with status, EndpointSlices).

use crate::apps::HttpApp;
use crate::envoy::{Sidecar, SidecarIdentity, SidecarOptions};
use crate::kube_api::{KubeApi, PodSpec};
use crate::meshd::{Meshd, XdsFlavor};
use crate::net::{free_port, pod_ip};

pub const NS: &str = "shop";

/// web (one pod, web-1, behind Service web:80) and client-1, which calls web through
/// its sidecar at 127.0.0.1:`local`.
pub struct Shop {
    pub web_ip: String,
    pub client_ip: String,
    pub web_app: HttpApp,
    pub local: u16,
}

impl Shop {
    pub async fn new() -> anyhow::Result<Shop> {
        Ok(Shop {
            web_ip: pod_ip().to_string(),
            client_ip: pod_ip().to_string(),
            web_app: HttpApp::start("web-1").await?,
            local: free_port(),
        })
    }

    pub fn web(&self) -> PodSpec<'_> {
        PodSpec {
            namespace: NS,
            name: "web-1",
            app: "web",
            service_account: "web",
            ip: &self.web_ip,
            ports: &[8080],
            annotations: &[],
        }
    }

    /// Creates the namespace, the service, both pods (web-1 `ready` or not) and web's
    /// EndpointSlice.
    pub async fn create(&self, api: &KubeApi, ready: bool) -> anyhow::Result<()> {
        api.create_namespace(NS, &[("meshd.io/mesh", "enabled")])
            .await?;
        api.http_service(NS, "web", 80, 8080).await?;
        let app_ports = format!("8080={}", self.web_app.port());
        let web = PodSpec {
            annotations: &[("meshd.io/app-ports", &app_ports)],
            ..self.web()
        };
        api.pod(&web, ready).await?;
        let upstreams = format!("web:80={}", self.local);
        api.pod(
            &PodSpec {
                namespace: NS,
                name: "client-1",
                app: "client",
                service_account: "client",
                ip: &self.client_ip,
                ports: &[],
                annotations: &[("meshd.io/upstreams", &upstreams)],
            },
            true,
        )
        .await?;
        self.set_ready(api, ready).await
    }

    /// What the kubelet and the endpoint-slice controller would do when web-1's
    /// readiness changes.
    pub async fn set_ready(&self, api: &KubeApi, ready: bool) -> anyhow::Result<()> {
        api.pod_status(&self.web(), ready).await?;
        api.endpoint_slice(NS, "web", 8080, &[("web-1", &self.web_ip, ready)])
            .await
    }

    pub async fn sidecars(&self, meshd: &Meshd) -> anyhow::Result<Vec<Sidecar>> {
        Ok(vec![
            Sidecar::start(meshd, NS, "web-1", "web", XdsFlavor::Delta).await?,
            Sidecar::start(meshd, NS, "client-1", "client", XdsFlavor::Sotw).await?,
        ])
    }

    pub fn outbound(&self) -> std::net::SocketAddr {
        ([127, 0, 0, 1], self.local).into()
    }
}

impl Shop {
    /// Both sidecars in token mode, as in a pod: each agent proves its pod with a
    /// pod-bound token (audience `meshd`, in `dir`) and trusts meshd by the
    /// `meshd-trust-bundle` ConfigMap of the namespace.
    pub async fn token_sidecars(
        &self,
        api: &KubeApi,
        meshd: &Meshd,
        dir: &std::path::Path,
    ) -> anyhow::Result<Vec<Sidecar>> {
        let bundle = dir.join("trust-bundle.pem");
        std::fs::write(&bundle, api.trust_bundle_config_map(NS).await?)?;
        let mut sidecars = Vec::new();
        for (pod, sa, flavor) in [
            ("web-1", "web", XdsFlavor::Delta),
            ("client-1", "client", XdsFlavor::Sotw),
        ] {
            api.service_account(NS, sa).await?;
            let token_file = dir.join(format!("{pod}.token"));
            std::fs::write(&token_file, api.token(NS, sa, "meshd", Some(pod)).await?)?;
            let options = SidecarOptions {
                identity: SidecarIdentity::Token {
                    token_file,
                    trust_bundle: bundle.clone(),
                },
                ..SidecarOptions::default()
            };
            sidecars.push(Sidecar::start_with(meshd, NS, pod, sa, flavor, options).await?);
        }
        Ok(sidecars)
    }
}
