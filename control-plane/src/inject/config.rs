//! The injection template's settings: one YAML file (`--inject-config`, the chart's
//! `injection` values rendered into a ConfigMap), read by meshd's webhook and by
//! `meshctl inject` alike, so both produce the same pod. Every field has a default, so
//! an empty file (or none) is a valid configuration for meshd's default namespace.

use std::path::Path;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use serde::{Deserialize, Serialize};

use meshd_ca::{DEFAULT_MESHD_NAMESPACE, DEFAULT_TRUST_DOMAIN};

/// meshd's `--token-audience` default.
pub const DEFAULT_TOKEN_AUDIENCE: &str = "meshd";

/// How injected pods reach meshd and what their sidecar runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct InjectConfig {
    /// The image with `meshd-agent` and `envoy` on its PATH (sidecar and init container).
    pub proxy_image: String,
    pub image_pull_policy: String,
    /// The sidecar's resources.
    pub resources: ResourceRequirements,
    /// The init container's resources (it runs once, for a moment).
    pub init_resources: ResourceRequirements,
    /// The agent's log filter (`MESHD_AGENT_LOG`).
    pub log_level: String,
    /// meshd's xDS and CA address as pods reach it, `host:port`; default
    /// `meshd.<meshdNamespace>.svc:15012`.
    pub xds_address: Option<String>,
    /// meshd's namespace: part of the identity the agent requires meshd to present.
    /// meshd fills this and the next two from its own flags when the file has none.
    pub meshd_namespace: Option<String>,
    pub trust_domain: Option<String>,
    /// The audience of the projected token the agent presents (meshd's `--token-audience`).
    pub token_audience: Option<String>,
    /// The projected token's lifetime; the kubelet renews it at 80 %.
    pub token_expiration_seconds: i64,
    /// Capture for pods without `meshd.io/capture`: `transparent` (the init container
    /// redirects the pod's TCP) or `explicit` (no init container).
    pub default_capture: String,
}

impl Default for InjectConfig {
    fn default() -> Self {
        InjectConfig {
            proxy_image: format!("meshd-proxy:{}", env!("CARGO_PKG_VERSION")),
            image_pull_policy: "IfNotPresent".into(),
            resources: resources(
                &[("cpu", "50m"), ("memory", "64Mi")],
                &[("memory", "256Mi")],
            ),
            init_resources: resources(&[("cpu", "10m"), ("memory", "16Mi")], &[("memory", "64Mi")]),
            log_level: "info".into(),
            xds_address: None,
            meshd_namespace: None,
            trust_domain: None,
            token_audience: None,
            token_expiration_seconds: 3600,
            default_capture: "transparent".into(),
        }
    }
}

fn resources(requests: &[(&str, &str)], limits: &[(&str, &str)]) -> ResourceRequirements {
    let map = |pairs: &[(&str, &str)]| {
        Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
                .collect(),
        )
    };
    ResourceRequirements {
        requests: map(requests),
        limits: map(limits),
        ..Default::default()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the injection config {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("injection config {path}: {message}")]
    Invalid { path: String, message: String },
}

impl InjectConfig {
    /// Reads and checks `path` (YAML).
    pub fn load(path: &Path) -> Result<InjectConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|message| ConfigError::Invalid {
            path: path.display().to_string(),
            message,
        })
    }

    /// Parses and checks YAML text; the error names the field.
    pub fn parse(text: &str) -> Result<InjectConfig, String> {
        let config: InjectConfig = if text.trim().is_empty() {
            InjectConfig::default()
        } else {
            let de =
                serde_saphyr::from_str::<serde_json::Value>(text).map_err(|e| e.to_string())?;
            serde_path_to_error::deserialize(de).map_err(|e| {
                let path = e.path().to_string();
                format!("{path}: {}", e.into_inner())
            })?
        };
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> Result<(), String> {
        if self.proxy_image.trim().is_empty() {
            return Err("proxyImage: must not be empty".into());
        }
        if !["Always", "IfNotPresent", "Never"].contains(&self.image_pull_policy.as_str()) {
            return Err(format!(
                "imagePullPolicy: {:?} is not Always, IfNotPresent or Never",
                self.image_pull_policy
            ));
        }
        if crate::model::Capture::parse(&self.default_capture).is_none() {
            return Err(format!(
                "defaultCapture: {:?} is not a capture mode (explicit, transparent)",
                self.default_capture
            ));
        }
        if !(600..=86_400 * 2).contains(&self.token_expiration_seconds) {
            return Err(format!(
                "tokenExpirationSeconds: {} is outside 600..172800 (the API server's range)",
                self.token_expiration_seconds
            ));
        }
        if let Some(addr) = &self.xds_address
            && addr
                .rsplit_once(':')
                .is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
        {
            return Err(format!("xdsAddress: {addr:?} is not host:port"));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log_level).is_err() {
            return Err(format!(
                "logLevel: {:?} is not a log filter",
                self.log_level
            ));
        }
        Ok(())
    }

    /// Takes meshd's own settings for what the file leaves unset.
    pub fn fill(&mut self, meshd_namespace: &str, trust_domain: &str, token_audience: &str) {
        self.meshd_namespace
            .get_or_insert_with(|| meshd_namespace.into());
        self.trust_domain.get_or_insert_with(|| trust_domain.into());
        self.token_audience
            .get_or_insert_with(|| token_audience.into());
    }

    pub fn meshd_namespace(&self) -> &str {
        self.meshd_namespace
            .as_deref()
            .unwrap_or(DEFAULT_MESHD_NAMESPACE)
    }

    pub fn trust_domain(&self) -> &str {
        self.trust_domain.as_deref().unwrap_or(DEFAULT_TRUST_DOMAIN)
    }

    pub fn token_audience(&self) -> &str {
        self.token_audience
            .as_deref()
            .unwrap_or(DEFAULT_TOKEN_AUDIENCE)
    }

    /// meshd's address as pods reach it.
    pub fn xds_address(&self) -> String {
        self.xds_address
            .clone()
            .unwrap_or_else(|| format!("meshd.{}.svc:15012", self.meshd_namespace()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_is_the_default() {
        let config = InjectConfig::parse("").unwrap();
        assert_eq!(config, InjectConfig::default());
        assert_eq!(config.xds_address(), "meshd.meshd-system.svc:15012");
    }

    #[test]
    fn fields_override_the_defaults() {
        let config = InjectConfig::parse(
            "proxyImage: registry.example/meshd-proxy:1.2.3\n\
             xdsAddress: meshd.mesh.svc:15012\n\
             resources: {limits: {memory: 128Mi}}\n",
        )
        .unwrap();
        assert_eq!(config.proxy_image, "registry.example/meshd-proxy:1.2.3");
        assert_eq!(config.xds_address(), "meshd.mesh.svc:15012");
        assert_eq!(
            config.resources.limits.unwrap()["memory"],
            Quantity("128Mi".into())
        );
        assert_eq!(config.log_level, "info");
    }

    #[test]
    fn errors_name_the_field() {
        for (text, field) in [
            ("proxyImage: ''", "proxyImage"),
            ("imagePullPolicy: Sometimes", "imagePullPolicy"),
            ("defaultCapture: magic", "defaultCapture"),
            ("tokenExpirationSeconds: 60", "tokenExpirationSeconds"),
            ("xdsAddress: meshd", "xdsAddress"),
            ("proxyImag: x", "proxyImag"),
            ("resources: {limits: 3}", "resources.limits"),
        ] {
            let err = InjectConfig::parse(text).unwrap_err();
            assert!(err.contains(field), "{text}: {err}");
        }
    }
}
