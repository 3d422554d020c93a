//! What the agent needs to know about a certificate chain: whose it is, until when it
//! is valid, its serial, its public key, and whether a given root signed it (after a
//! root rotation's signing step, a chain from the old root is due for renewal).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshd_ca::SpiffeId;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The leaf of a chain, as the agent uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leaf {
    pub id: SpiffeId,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Hex, as meshd logs it.
    pub serial: String,
    /// The raw public key (for an EC key, the uncompressed point).
    pub public_key: Vec<u8>,
}

impl Leaf {
    pub fn valid_at(&self, t: SystemTime) -> bool {
        self.not_before <= t && t < self.not_after
    }
}

fn ders(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let ders = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM certificates: {e}"))?;
    if ders.is_empty() {
        return Err("holds no certificate".into());
    }
    Ok(ders)
}

/// Whether `pem` holds certificates and nothing unreadable.
pub fn is_certificates(pem: &str) -> bool {
    ders(pem).is_ok()
}

fn time(t: x509_parser::time::ASN1Time) -> SystemTime {
    let secs = t.timestamp();
    match u64::try_from(secs) {
        Ok(s) => UNIX_EPOCH + Duration::from_secs(s),
        Err(_) => UNIX_EPOCH,
    }
}

/// Reads the first certificate of `chain_pem`: a mesh workload certificate.
pub fn leaf(chain_pem: &str) -> Result<Leaf, String> {
    let ders = ders(chain_pem)?;
    let der = &ders[0];
    let uri = meshd_ca::leaf_uri(der)?;
    let id: SpiffeId = uri.parse().map_err(|e| format!("{e}"))?;
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    let validity = cert.validity();
    Ok(Leaf {
        id,
        not_before: time(validity.not_before),
        not_after: time(validity.not_after),
        serial: serial_hex(cert.raw_serial()),
        public_key: cert.public_key().subject_public_key.data.to_vec(),
    })
}

/// A serial number as meshd logs it: hex, without the sign byte DER may add.
fn serial_hex(raw: &[u8]) -> String {
    let start = raw
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(raw.len().saturating_sub(1));
    raw[start..].iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `root_pem` (one certificate) signed the top of `chain_pem` (the leaf, or
/// the last intermediate).
pub fn signed_by(chain_pem: &str, root_pem: &str) -> bool {
    let (Ok(chain), Ok(root)) = (ders(chain_pem), ders(root_pem)) else {
        return false;
    };
    let (Some(top), Some(root)) = (chain.last(), root.first()) else {
        return false;
    };
    let (Ok((_, top)), Ok((_, root))) = (
        X509Certificate::from_der(top),
        X509Certificate::from_der(root),
    ) else {
        return false;
    };
    top.verify_signature(Some(root.public_key())).is_ok()
}

#[cfg(test)]
pub(crate) mod test_ca {
    //! A real mesh CA for unit tests (meshd-ca, as meshd runs it).
    use std::time::Duration;

    use meshd_ca::store::{CaSource, open_or_create};
    use meshd_ca::{Authority, SpiffeId};

    pub fn authority(dir: &std::path::Path) -> Authority {
        open_or_create(&CaSource::Directory(dir.to_path_buf()), Default::default())
            .unwrap()
            .0
    }

    /// A chain for `id` over a key of the caller's (its CSR), as meshd's `Sign` makes.
    pub fn sign(ca: &Authority, csr_pem: &str, id: &SpiffeId, ttl: Duration) -> String {
        let csr = meshd_ca::csr::Csr::from_pem(csr_pem).unwrap();
        ca.sign_csr(&csr, id, ttl).unwrap().chain_pem
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::keys::new_key_and_csr;

    #[test]
    fn a_signed_chain_names_its_identity_key_and_signer() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = test_ca::authority(&tmp.path().join("a"));
        let other = test_ca::authority(&tmp.path().join("b"));
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        let made = new_key_and_csr(&id).unwrap();
        let chain = test_ca::sign(&ca, &made.csr_pem, &id, Duration::from_secs(600));
        let held = leaf(&chain).unwrap();
        assert_eq!(held.id, id);
        assert_eq!(held.public_key, made.public_key);
        assert!(held.valid_at(SystemTime::now()));
        assert!(!held.valid_at(SystemTime::now() + Duration::from_secs(601)));
        assert_eq!(held.serial.len() % 2, 0);
        assert_eq!(serial_hex(&[0, 0x8f, 1]), "8f01");
        assert_eq!(serial_hex(&[0]), "00");
        let root = &ca.trust_bundle().roots()[0];
        let other_root = &other.trust_bundle().roots()[0];
        assert!(signed_by(&chain, root));
        assert!(!signed_by(&chain, other_root));
        assert!(!signed_by(&chain, "not PEM"));
        assert!(leaf("not PEM").unwrap_err().contains("no certificate"));
    }
}
