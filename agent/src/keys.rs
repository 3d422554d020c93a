//! The pod's key and the CSR meshd signs.
//!
//! A fresh ECDSA P-256 key for every signature, made in memory: it reaches disk only
//! when the signed certificate is written beside it into the agent's own directory
//! (`certs/key.pem`, 0600), and it is never sent anywhere. The CSR names exactly one
//! identity, as its only subjectAltName (a URI, the SPIFFE id) and with an empty
//! subject, which is all meshd accepts.

use meshd_ca::SpiffeId;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use zeroize::Zeroizing;

/// A new key and a CSR for it.
pub struct KeyAndCsr {
    pub key_pem: Zeroizing<String>,
    /// The public key, raw (an uncompressed EC point), to check what meshd signed.
    pub public_key: Vec<u8>,
    pub csr_pem: String,
}

impl std::fmt::Debug for KeyAndCsr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyAndCsr").finish_non_exhaustive()
    }
}

pub fn new_key_and_csr(id: &SpiffeId) -> anyhow::Result<KeyAndCsr> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
    let csr_pem = params.serialize_request(&key)?.pem()?;
    Ok(KeyAndCsr {
        key_pem: Zeroizing::new(key.serialize_pem()),
        public_key: key.public_key_raw().to_vec(),
        csr_pem,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// meshd's own check (meshd-ca) accepts what the agent sends.
    #[test]
    fn meshd_accepts_the_csr_for_exactly_the_pods_identity() {
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        let made = new_key_and_csr(&id).unwrap();
        let csr = meshd_ca::csr::Csr::from_pem(&made.csr_pem).unwrap();
        assert_eq!(csr.requested(), &id);
        assert!(made.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        // A new key every time.
        let again = new_key_and_csr(&id).unwrap();
        assert_ne!(again.public_key, made.public_key);
    }
}
