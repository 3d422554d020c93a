//! A real Envoy sidecar for one pod, bootstrapped by `meshctl bootstrap`.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tempfile::TempDir;
use tokio::process::{Child, Command};

use crate::mesh::PodDef;
use crate::meshd::{Meshd, XdsFlavor};
use crate::net::free_port;
use crate::tools::envoy_binary;

#[derive(Debug)]
pub struct Sidecar {
    child: Child,
    pub node_id: String,
    pub admin_port: u16,
    work: TempDir,
    http: reqwest::Client,
}

impl Sidecar {
    /// Starts Envoy for the pod `pod`.
    pub async fn for_pod(
        meshd: &Meshd,
        pod: &PodDef,
        flavor: XdsFlavor,
    ) -> anyhow::Result<Sidecar> {
        Self::start(
            meshd,
            &pod.namespace,
            &pod.name,
            &pod.service_account,
            flavor,
        )
        .await
    }

    /// Starts Envoy for `namespace/pod` running as `service_account`, against `meshd`,
    /// and waits until Envoy is live (its initial xDS fetch is done).
    pub async fn start(
        meshd: &Meshd,
        namespace: &str,
        pod: &str,
        service_account: &str,
        flavor: XdsFlavor,
    ) -> anyhow::Result<Sidecar> {
        Self::start_with_args(meshd, namespace, pod, service_account, flavor, &[]).await
    }

    /// [`Sidecar::start`] with more Envoy command-line arguments.
    pub async fn start_with_args(
        meshd: &Meshd,
        namespace: &str,
        pod: &str,
        service_account: &str,
        flavor: XdsFlavor,
        extra: &[&str],
    ) -> anyhow::Result<Sidecar> {
        let work = tempfile::Builder::new().prefix("meshd-envoy-").tempdir()?;
        let admin_port = free_port();
        let bootstrap = meshd
            .bootstrap(
                namespace,
                pod,
                service_account,
                flavor,
                admin_port,
                work.path(),
            )
            .await?;
        let log = std::fs::File::create(work.path().join("envoy.log"))?;
        let child = Command::new(envoy_binary()?)
            .arg("-c")
            .arg(&bootstrap)
            .args([
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "--log-level",
                "info",
            ])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("cannot start envoy")?;
        let mut sidecar = Sidecar {
            child,
            node_id: format!("{pod}.{namespace}"),
            admin_port,
            work,
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(5))
                .build()?,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = sidecar.child.try_wait()? {
                bail!(
                    "envoy {pod}.{namespace} exited ({status})\nenvoy log:\n{}",
                    sidecar.log()
                );
            }
            match sidecar.admin("/ready").await {
                Ok(body) if body.trim() == "LIVE" => break,
                other if tokio::time::Instant::now() > deadline => bail!(
                    "envoy {pod}.{namespace} not live within 30s ({other:?})\nenvoy log:\n{}",
                    sidecar.log()
                ),
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        Ok(sidecar)
    }

    /// GET on Envoy's admin interface.
    pub async fn admin(&self, path: &str) -> anyhow::Result<String> {
        let url = format!("http://127.0.0.1:{}{path}", self.admin_port);
        let resp = self.http.get(&url).send().await?;
        Ok(resp.text().await?)
    }

    /// One counter or gauge from `/stats`, if Envoy has it.
    pub async fn stat(&self, name: &str) -> anyhow::Result<Option<u64>> {
        let text = self
            .admin(&format!("/stats?filter=^{}$", regex_escape(name)))
            .await?;
        Ok(text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .and_then(|v| v.trim().parse().ok()))
    }

    /// Everything Envoy has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.work.path().join("envoy.log")).unwrap_or_default()
    }

    /// Stops Envoy now.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        Ok(())
    }
}

fn regex_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                vec![c]
            } else {
                vec!['\\', c]
            }
        })
        .collect()
}

/// Whether the sidecar uses SotW or delta xDS, for test names and loops.
pub const FLAVORS: [XdsFlavor; 2] = [XdsFlavor::Sotw, XdsFlavor::Delta];
