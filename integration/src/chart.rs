//! meshd's Helm chart (`charts/meshd`) as real Helm 4 renders it, and its manifests as
//! `kubernetes-validate` judges them against Kubernetes' own schemas.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, bail, ensure};
use serde_json::Value;

use crate::tools::{helm_binary, kubernetes_validate, workspace_root};

/// The chart's directory in the checkout.
pub fn chart_dir() -> PathBuf {
    workspace_root().join("charts").join("meshd")
}

/// `helm ARGS…`, with Helm's own config, cache and data in a directory of the test cache
/// (no repositories or plugins of the user's leak into a test).
pub fn helm() -> anyhow::Result<Command> {
    let home = crate::tools::cache_dir().join("helm-home");
    let mut cmd = Command::new(helm_binary()?);
    cmd.env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_DATA_HOME", home.join("data"));
    Ok(cmd)
}

/// Runs a Helm command that must succeed; its stdout.
pub fn helm_ok(args: &[&str]) -> anyhow::Result<String> {
    let out = helm()?.args(args).output().context("cannot run helm")?;
    ensure!(
        out.status.success(),
        "helm {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// What `helm template` printed, and the objects in it.
#[derive(Debug)]
pub struct Rendered {
    pub yaml: String,
    pub objects: Vec<Value>,
}

/// `helm template RELEASE charts/meshd --namespace NAMESPACE ARGS…` (ARGS: `--set`,
/// `--set-string`, `-f`…), which must succeed.
pub fn render(release: &str, namespace: &str, args: &[&str]) -> anyhow::Result<Rendered> {
    let out = template(&chart_dir(), release, namespace, args)?;
    ensure!(
        out.status.success(),
        "helm template {release} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = String::from_utf8(out.stdout)?;
    let objects = serde_saphyr::from_multiple::<Value>(&yaml)
        .context("helm template printed YAML that does not parse")?
        .into_iter()
        .filter(|o| !o.is_null())
        .collect();
    Ok(Rendered { yaml, objects })
}

/// The same, for values the chart must refuse: Helm's error message.
pub fn refused(release: &str, namespace: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = template(&chart_dir(), release, namespace, args)?;
    if out.status.success() {
        bail!(
            "helm template {} rendered, but should have refused the values",
            args.join(" ")
        );
    }
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

fn template(chart: &Path, release: &str, namespace: &str, args: &[&str]) -> anyhow::Result<Output> {
    helm()?
        .arg("template")
        .arg(release)
        .arg(chart)
        .args(["--namespace", namespace])
        .args(args)
        .output()
        .context("cannot run helm template")
}

impl Rendered {
    /// Every object of `kind`.
    pub fn all(&self, kind: &str) -> Vec<&Value> {
        self.objects.iter().filter(|o| o["kind"] == kind).collect()
    }

    /// The one object of `kind`.
    pub fn one(&self, kind: &str) -> anyhow::Result<&Value> {
        match self.all(kind)[..] {
            [one] => Ok(one),
            ref many => bail!("expected one {kind}, rendered {}", many.len()),
        }
    }

    /// `(kind, namespace, name)` of every object.
    pub fn names(&self) -> Vec<(String, String, String)> {
        self.objects
            .iter()
            .map(|o| {
                let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
                (
                    text(&o["kind"]),
                    text(&o["metadata"]["namespace"]),
                    text(&o["metadata"]["name"]),
                )
            })
            .collect()
    }

    /// `kubernetes-validate --strict` for Kubernetes `version` (e.g. `1.33.0`): every
    /// object must match its kind's schema, with no field the schema does not know.
    pub fn validate(&self, version: &str) -> anyhow::Result<()> {
        let file = tempfile::Builder::new()
            .prefix("meshd-chart-")
            .suffix(".yaml")
            .tempfile()?;
        std::fs::write(file.path(), &self.yaml)?;
        let out = kubernetes_validate()?
            .args(["--strict", "--quiet", "--kubernetes-version", version])
            .arg(file.path())
            .output()
            .context("cannot run kubernetes-validate")?;
        ensure!(
            out.status.success(),
            "kubernetes-validate --strict (Kubernetes {version}) refused the chart:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }
}
