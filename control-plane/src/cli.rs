//! Command-line pieces `meshd` and `meshctl` share, so a flag means the same in both.

use std::path::PathBuf;
use std::time::Duration;

use meshd_ca::store::{CaSource, Opened, open};
use meshd_ca::{Authority, CaConfig, CaError, DEFAULT_TRUST_DOMAIN};

/// Where the mesh CA lives and how it issues.
#[derive(Debug, Clone, clap::Args)]
pub struct CaArgs {
    /// Directory of meshd's own root CA (root-cert.pem, root-key.pem); the root is
    /// generated there on first start.
    #[arg(
        long,
        env = "MESHD_CA_DIR",
        default_value = ".meshd/ca",
        value_name = "DIR"
    )]
    pub ca_dir: PathBuf,

    /// Plug-in CA instead of --ca-dir: PEM chain, signing certificate first, root last.
    #[arg(long, value_name = "FILE", requires = "ca_key")]
    pub ca_cert_chain: Option<PathBuf>,

    /// Plug-in CA: the signing certificate's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "ca_cert_chain")]
    pub ca_key: Option<PathBuf>,

    /// The mesh's SPIFFE trust domain.
    #[arg(long, env = "MESHD_TRUST_DOMAIN", default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
}

impl CaArgs {
    pub fn source(&self) -> CaSource {
        match (&self.ca_cert_chain, &self.ca_key) {
            (Some(chain), Some(key)) => CaSource::PlugIn {
                cert_chain: chain.clone(),
                key: key.clone(),
            },
            _ => CaSource::Directory(self.ca_dir.clone()),
        }
    }

    /// How the CA issues: this trust domain, certificates valid for `ttl`.
    pub fn config(&self, ttl: Duration) -> CaConfig {
        CaConfig {
            trust_domain: self.trust_domain.clone(),
            workload_ttl: ttl,
            ..CaConfig::default()
        }
    }

    /// Opens a CA that must already exist (meshctl never creates one), with the trust
    /// bundle meshd may serve with: the root, and during a rotation the next root too.
    pub fn open_existing(&self, ttl: Duration) -> Result<ExistingCa, CaError> {
        let source = self.source();
        if let CaSource::Directory(dir) = &source {
            let cert = dir.join(meshd_ca::store::ROOT_CERT_FILE);
            if !cert.exists() {
                return Err(CaError::File {
                    path: cert,
                    message: "does not exist: no mesh CA here. meshd creates its root on \
                              first start; point --ca-dir (or MESHD_CA_DIR) at meshd's CA \
                              directory"
                        .into(),
                });
            }
        }
        let (signer, _) = open(&source, self.config(ttl))?;
        let mut trust_bundle_pem = signer.trust_bundle().pem();
        if let CaSource::Directory(dir) = &source
            && let Some(next) = meshd_ca::store::load_next_root(dir, self.config(ttl))?
        {
            trust_bundle_pem.push_str(&next.trust_bundle().pem());
        }
        Ok(ExistingCa {
            signer,
            trust_bundle_pem,
        })
    }

    /// Opens (or on first use creates) the CA, issuing certificates valid for `ttl`.
    pub fn open(&self, ttl: Duration) -> Result<(Authority, Opened), CaError> {
        open(&self.source(), self.config(ttl))
    }
}

/// A CA opened by [`CaArgs::open_existing`].
#[derive(Debug)]
pub struct ExistingCa {
    pub signer: Authority,
    /// Every root meshd may present a certificate from.
    pub trust_bundle_pem: String,
}

/// meshd's own namespace: part of its serving identity
/// (`spiffe://<td>/ns/<namespace>/sa/meshd`).
pub const DEFAULT_MESHD_NAMESPACE: &str = "meshd-system";
