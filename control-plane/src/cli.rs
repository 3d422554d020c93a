//! Command-line pieces `meshd` and `meshctl` share, so a flag means the same in both.

use std::path::PathBuf;
use std::time::Duration;

use meshd_ca::store::{self, CaSource};
use meshd_ca::{Authority, CaConfig, CaError, DEFAULT_TRUST_DOMAIN};

/// Where the mesh CA lives and how it issues.
#[derive(Debug, Clone, clap::Args)]
pub struct CaArgs {
    /// Directory of meshd's own root CA (root-key.pem, root-cert.pem); meshd generates
    /// the root there on its first start, meshctl only reads it.
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

    /// Opens the CA meshd created, issuing certificates valid for `ttl`. Never creates
    /// one (only meshd does, with [`crate::identity::CertManager::open`]): a root made
    /// here would be one meshd does not trust.
    pub fn open_existing(&self, ttl: Duration) -> Result<Authority, OpenError> {
        store::open(&self.source(), self.config(ttl)).map_err(|e| match e {
            // The default is relative: say where that was.
            CaError::Missing(dir) => OpenError::NoCa {
                dir: match std::path::absolute(&dir) {
                    Ok(abs) if abs != dir => format!("{} ({})", dir.display(), abs.display()),
                    _ => dir.display().to_string(),
                },
            },
            e => OpenError::Ca(e),
        })
    }

    /// [`CaArgs::open_existing`], with every root meshd may serve with: the root, and
    /// during a rotation the next root too (meshd signs its own certificate with the
    /// next root from step 2 on).
    pub fn open_existing_with_bundle(&self, ttl: Duration) -> Result<ExistingCa, OpenError> {
        let signer = self.open_existing(ttl)?;
        let mut trust_bundle_pem = signer.trust_bundle().pem();
        if let CaSource::Directory(dir) = self.source()
            && let Some(next) = store::load_next_root(&dir, self.config(ttl))?
        {
            trust_bundle_pem.push_str(&next.trust_bundle().pem());
        }
        Ok(ExistingCa {
            signer,
            trust_bundle_pem,
        })
    }
}

/// A CA opened by [`CaArgs::open_existing_with_bundle`].
#[derive(Debug)]
pub struct ExistingCa {
    pub signer: Authority,
    /// Every root meshd may present a certificate from.
    pub trust_bundle_pem: String,
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(
        "no mesh CA in {dir}: meshd creates it on its first start; point --ca-dir \
         (or MESHD_CA_DIR) at the directory meshd uses"
    )]
    NoCa { dir: String },
    #[error(transparent)]
    Ca(#[from] CaError),
}

pub use meshd_ca::DEFAULT_MESHD_NAMESPACE;
