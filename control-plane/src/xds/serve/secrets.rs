//! SDS secrets, encoded once per certificate and per trust bundle and shared by every
//! stream that needs them.
//!
//! Every replica of a deployment runs as the same identity and gets the same
//! certificate ([`CertManager::workload_certificate`] caches it per identity), so its
//! encoded secret is shared too: at 10,000 proxies that is tens of MiB not held twice.
//! A workload secret holds its identity's private key; it is only ever handed to
//! streams that authenticated as that identity, as before.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use meshd_ca::{CaError, IssuedCertificate, SpiffeId};

use crate::identity::CertManager;
use crate::xds::translate;
use crate::xds::translate::resources::Resource;

#[derive(Debug, Clone)]
pub struct SecretCache {
    certs: Arc<CertManager>,
    encoded: Arc<Mutex<Encoded>>,
}

#[derive(Debug, Default)]
struct Encoded {
    /// Per identity: the certificate it was encoded from, and the secret.
    workloads: HashMap<SpiffeId, (Arc<IssuedCertificate>, Arc<Resource>)>,
    /// The trust bundle's roots it was encoded from, and the secret.
    root: Option<(Vec<String>, Arc<Resource>)>,
}

impl SecretCache {
    pub fn new(certs: Arc<CertManager>) -> SecretCache {
        SecretCache {
            certs,
            encoded: Arc::default(),
        }
    }

    /// The current secrets of a proxy of identity `id`: its own certificate and key,
    /// and the trust bundle.
    pub fn secrets(&self, id: &SpiffeId) -> Result<[Arc<Resource>; 2], CaError> {
        let cert = self.certs.workload_certificate(id)?;
        let bundle = self.certs.trust_bundle();
        let mut encoded = self.encoded.lock().unwrap_or_else(|p| p.into_inner());
        let workload = match encoded.workloads.get(id) {
            Some((from, secret)) if Arc::ptr_eq(from, &cert) => secret.clone(),
            _ => {
                let secret = Resource::encode(
                    translate::secrets::WORKLOAD_SECRET,
                    &translate::secrets::workload_secret(&cert),
                );
                encoded.workloads.insert(id.clone(), (cert, secret.clone()));
                secret
            }
        };
        let root = match &encoded.root {
            Some((roots, secret)) if roots.as_slice() == bundle.roots() => secret.clone(),
            _ => {
                let secret = Resource::encode(
                    translate::secrets::ROOT_SECRET,
                    &translate::secrets::root_secret(&bundle),
                );
                encoded.root = Some((bundle.roots().to_vec(), secret.clone()));
                secret
            }
        };
        Ok([workload, root])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxies_of_one_identity_share_their_encoded_secrets_until_a_new_certificate() {
        let (cert, key) =
            meshd_ca::generate_root("cluster.local", std::time::Duration::from_secs(3600)).unwrap();
        let source = meshd_ca::store::CaSource::Pem {
            origin: "test".into(),
            chain_pem: cert,
            key_pem: Arc::new(key),
        };
        let certs = CertManager::open(
            source,
            meshd_ca::CaConfig::default(),
            "meshd",
            std::time::Duration::from_secs(30),
        )
        .unwrap();
        let cache = SecretCache::new(certs.clone());
        let web = SpiffeId::new("cluster.local", "shop", "web").unwrap();
        let db = SpiffeId::new("cluster.local", "shop", "db").unwrap();
        let [a, root_a] = cache.secrets(&web).unwrap();
        let [b, root_b] = cache.secrets(&web).unwrap();
        assert!(Arc::ptr_eq(&a, &b) && Arc::ptr_eq(&root_a, &root_b));
        let [c, root_c] = cache.secrets(&db).unwrap();
        assert_ne!(
            a.version, c.version,
            "each identity has its own certificate"
        );
        assert!(Arc::ptr_eq(&root_a, &root_c), "one trust bundle for all");
    }
}
