//! The scenario: `services` HTTP services with `endpoints` backend pods spread over
//! them, and `proxies` client pods, each calling `upstreams` services (its sidecar's
//! outbound listeners and clusters) and serving HTTP on 8080 behind the Service
//! `client` (its inbound listener and route, where AuthorizationPolicies land), written
//! as a config directory in meshd's file-source layout (Kubernetes YAML), and the CA
//! whose certificates the proxies present.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;

use crate::xds_client::ClientCert;

pub const NAMESPACE: &str = "load";

#[derive(Debug, Clone)]
pub struct Scenario {
    pub services: usize,
    pub endpoints: usize,
    pub proxies: usize,
    pub upstreams: usize,
    /// Whether proxies also have an egress port, and what it reaches; in transparent
    /// capture, what the virtual outbound listener reaches (`None`: the namespace,
    /// here the whole mesh).
    pub egress: Option<EgressScope>,
    /// Proxies are `meshd.io/capture: transparent` (virtual listeners, no egress port).
    pub transparent: bool,
}

/// The scope of every proxy's egress port (`meshd.io/scope`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EgressScope {
    /// The services the proxy calls anyway: a scoped proxy.
    Upstreams,
    /// `*`: every service of the mesh, as an unscoped proxy would have.
    All,
}

impl Scenario {
    pub fn service(i: usize) -> String {
        format!("svc{i}")
    }

    pub fn proxy(i: usize) -> String {
        format!("proxy-{i}")
    }

    /// The services proxy `i` calls.
    pub fn upstreams_of(&self, i: usize) -> Vec<usize> {
        (0..self.upstreams.min(self.services))
            .map(|k| (i * 7 + k) % self.services)
            .collect()
    }

    /// Writes the whole mesh into `dir` (one file per kind of object).
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        let mut services =
            format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NAMESPACE}}}\n");
        for s in 0..self.services {
            let _ = write!(
                services,
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {}, namespace: {NAMESPACE}}}\nspec:\n  clusterIP: 10.96.{}.{}\n  selector: {{app: {}}}\n  ports: [{{name: http, port: 80, targetPort: 8080, appProtocol: http}}]\n",
                Self::service(s),
                s / 250,
                s % 250 + 1,
                Self::service(s)
            );
        }
        // Every client also serves HTTP on 8080, behind the Service `client`.
        let _ = write!(
            services,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: client, namespace: {NAMESPACE}}}\nspec:\n  selector: {{app: client}}\n  ports: [{{name: http, port: 80, targetPort: 8080, appProtocol: http}}]\n"
        );
        write_split(dir, "services", &services)?;
        // The first backend of each service in a file of its own (`roll-<s>.yaml`),
        // which a `pod-roll` rewrites with a pod of a new name and address.
        let mut backends = String::new();
        for e in 0..self.endpoints {
            let s = e % self.services;
            if e < self.services {
                std::fs::write(dir.join(Self::roll_file(s)), self.backend(e, s))?;
            } else {
                let _ = write!(backends, "{}", self.backend(e, s));
            }
        }
        write_split(dir, "backends", &backends)?;
        let mut proxies = String::new();
        for p in 0..self.proxies {
            let ups: Vec<String> = self
                .upstreams_of(p)
                .iter()
                .enumerate()
                .map(|(k, s)| format!("{}:80={}", Self::service(*s), 20000 + k))
                .collect();
            let port = match self.transparent {
                true => ", meshd.io/capture: transparent",
                false => ", meshd.io/egress-port: \"15080\"",
            };
            let egress = match self.egress {
                None if self.transparent => port.to_string(),
                None => String::new(),
                Some(EgressScope::All) => format!("{port}, meshd.io/scope: \"*\""),
                Some(EgressScope::Upstreams) => {
                    let scope: Vec<String> = self
                        .upstreams_of(p)
                        .iter()
                        .map(|s| format!("{NAMESPACE}/{}", Self::service(*s)))
                        .collect();
                    format!("{port}, meshd.io/scope: \"{}\"", scope.join(", "))
                }
            };
            let _ = write!(
                proxies,
                "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: {NAMESPACE}\n  labels: {{app: client}}\n  annotations: {{meshd.io/upstreams: \"{}\"{egress}}}\nspec:\n  serviceAccountName: client\n  containers: [{{name: app, image: app, ports: [{{containerPort: 8080}}]}}]\nstatus:\n  podIP: {}\n  conditions: [{{type: Ready, status: \"True\"}}]\n",
                Self::proxy(p),
                ups.join(", "),
                ip(1 << 20 | p)
            );
        }
        write_split(dir, "proxies", &proxies)?;
        Ok(())
    }

    /// The file holding the pod of service `s` that a `pod-roll` replaces.
    pub fn roll_file(s: usize) -> String {
        format!("roll-{s}.yaml")
    }

    /// Backend pod `e`, serving service `s`.
    pub fn backend(&self, e: usize, s: usize) -> String {
        self.pod(&format!("backend-{e}"), e, s)
    }

    /// A backend pod `name` at address number `e`, serving service `s`.
    pub fn pod(&self, name: &str, e: usize, s: usize) -> String {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {NAMESPACE}\n  labels: {{app: {}}}\nspec:\n  serviceAccountName: {}\n  containers: [{{name: app, image: app, ports: [{{containerPort: 8080}}]}}]\nstatus:\n  podIP: {}\n  conditions: [{{type: Ready, status: \"True\"}}]\n",
            Self::service(s),
            Self::service(s),
            ip(e)
        )
    }
}

/// Documents per file: meshd reads at most 1,024 from one file.
const DOCUMENTS_PER_FILE: usize = 1000;

/// Writes the YAML documents of `text` as `<stem>-<n>.yaml`, [`DOCUMENTS_PER_FILE`] in
/// each.
fn write_split(dir: &Path, stem: &str, text: &str) -> anyhow::Result<()> {
    let docs: Vec<&str> = text.split("---\n").filter(|d| !d.is_empty()).collect();
    for (n, chunk) in docs.chunks(DOCUMENTS_PER_FILE).enumerate() {
        let file: String = chunk.iter().map(|d| format!("---\n{d}")).collect();
        std::fs::write(dir.join(format!("{stem}-{n}.yaml")), file)?;
    }
    Ok(())
}

pub(crate) fn ip(i: usize) -> String {
    format!("10.{}.{}.{}", (i >> 16) & 0xff, (i >> 8) & 0xff, i & 0xff)
}

/// Issues a client certificate for every proxy (all `load/client`) from `ca_dir`.
pub fn certificates(ca_dir: &Path, count: usize) -> anyhow::Result<Vec<ClientCert>> {
    let ca = meshd_ca::store::open(
        &meshd_ca::store::CaSource::Directory(ca_dir.to_path_buf()),
        meshd_ca::CaConfig::default(),
    )
    .context("open meshd's CA")?;
    let id = ca.workload_id(NAMESPACE, "client")?;
    (0..count)
        .map(|_| Ok(ClientCert::from_issued(&ca, &ca.issue(&id)?)))
        .collect()
}

/// Files [`write_ca`] leaves beside the CA for a server that is not meshd.
#[derive(Debug, Clone)]
pub struct ServingFiles {
    /// The serving certificate chain (PEM): SPIFFE id of meshd, DNS names `meshd` and
    /// `localhost` (the name the proxies check).
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    /// The roots proxies' certificates chain to (PEM).
    pub trust_bundle: std::path::PathBuf,
}

/// Creates a CA in `ca_dir` (meshd's `--ca-dir` layout), unless one is there, and
/// writes a serving certificate, its key and the trust bundle into `out`.
pub fn write_ca(ca_dir: &Path, out: &Path) -> anyhow::Result<ServingFiles> {
    let (ca, _) = meshd_ca::store::open_or_create(
        &meshd_ca::store::CaSource::Directory(ca_dir.to_path_buf()),
        meshd_ca::CaConfig::default(),
    )
    .with_context(|| format!("create a CA in {}", ca_dir.display()))?;
    let id = ca.workload_id(
        meshd_ca::DEFAULT_MESHD_NAMESPACE,
        meshd_ca::MESHD_SERVICE_ACCOUNT,
    )?;
    let issued = ca.issue_with_dns(&id, Duration::from_secs(24 * 3600), &["meshd", "localhost"])?;
    let files = ServingFiles {
        cert: out.join("server-cert.pem"),
        key: out.join("server-key.pem"),
        trust_bundle: out.join("trust-bundle.pem"),
    };
    meshd_ca::store::write_file(&files.cert, &issued.chain_pem, 0o644, true)?;
    meshd_ca::store::write_file(&files.key, issued.key.secret_pem(), 0o600, true)?;
    meshd_ca::store::write_file(&files.trust_bundle, &ca.trust_bundle().pem(), 0o644, true)?;
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// meshd rejects a file of more than 1,024 documents (its pods then never appear
    /// and their proxies get an empty config).
    #[test]
    fn no_file_holds_more_documents_than_meshd_reads() {
        let dir = tempfile::tempdir().unwrap();
        let scenario = Scenario {
            services: 1100,
            endpoints: 2500,
            proxies: 2100,
            upstreams: 10,
            egress: None,
            transparent: false,
        };
        scenario.write(dir.path()).unwrap();
        let mut pods = 0;
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
            let docs = text.matches("kind: ").count();
            assert!(docs <= 1024, "{docs} documents in one file");
            pods += text.matches("kind: Pod").count();
        }
        assert_eq!(pods, 2500 + 2100);
    }
}
