//! The signing CA, the trust bundle, and workload certificate issuance.

use std::fmt;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use zeroize::Zeroizing;

use crate::pem::{not_after, parse};
use crate::spiffe::{OperatorId, SpiffeId};

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A CA file is missing, unreadable or wrong.
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    /// A CA directory holds no CA (only meshd creates one, on its first start).
    #[error("{}: no CA here (there is no root-key.pem)", .0.display())]
    Missing(PathBuf),
    #[error("cannot issue a certificate for {id}: {message}")]
    Issue { id: String, message: String },
    #[error("cannot generate a root CA: {0}")]
    Generate(String),
}

impl CaError {
    pub(crate) fn file(path: impl Into<PathBuf>, message: impl Into<String>) -> CaError {
        CaError::File {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// How workload certificates are made.
#[derive(Debug, Clone)]
pub struct CaConfig {
    pub trust_domain: String,
    /// Lifetime of a workload certificate.
    pub workload_ttl: Duration,
    /// How far `notBefore` lies in the past, for peers whose clocks run behind.
    pub backdate: Duration,
}

impl Default for CaConfig {
    fn default() -> Self {
        Self {
            trust_domain: crate::DEFAULT_TRUST_DOMAIN.to_string(),
            workload_ttl: Duration::from_secs(3600),
            backdate: Duration::from_secs(60),
        }
    }
}

/// A private key in PEM (PKCS#8). Zeroized on drop; `Debug` never shows it.
pub struct PrivateKeyPem(Zeroizing<String>);

impl PrivateKeyPem {
    pub fn new(pem: String) -> Self {
        Self(Zeroizing::new(pem))
    }

    /// The key itself, for the one place that must hand it over (a file, an SDS secret).
    pub fn secret_pem(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for PrivateKeyPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKeyPem([redacted])")
    }
}

/// A workload certificate, without its key: what meshd signs for a CSR, whose key
/// never leaves the workload.
#[derive(Debug, Clone)]
pub struct SignedCertificate {
    pub id: SpiffeId,
    /// The leaf followed by any intermediates up to (not including) the root.
    pub chain_pem: String,
    /// `notBefore`: the issue time less the backdate.
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub issued_at: SystemTime,
    /// Big-endian serial number.
    pub serial: Vec<u8>,
}

impl SignedCertificate {
    /// When the certificate should be replaced: half its lifetime after it was issued
    /// (the backdate does not count, or short lifetimes would be due at once).
    pub fn refresh_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.issued_at)
            .unwrap_or_default();
        self.issued_at + life / 2
    }

    /// The serial number in hex, as logs and `meshctl` show it.
    pub fn serial_hex(&self) -> String {
        self.serial.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// A workload certificate and the key meshd made for it (served to the workload's
/// proxy over SDS).
#[derive(Debug)]
pub struct IssuedCertificate {
    pub cert: SignedCertificate,
    pub key: PrivateKeyPem,
}

impl std::ops::Deref for IssuedCertificate {
    type Target = SignedCertificate;

    fn deref(&self) -> &SignedCertificate {
        &self.cert
    }
}

/// The roots a proxy trusts. Several during a root rotation.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TrustBundle {
    roots: Vec<String>,
}

impl TrustBundle {
    pub fn new(roots: Vec<String>) -> Self {
        Self { roots }
    }

    pub fn roots(&self) -> &[String] {
        &self.roots
    }

    /// All roots, concatenated PEM.
    pub fn pem(&self) -> String {
        self.roots.concat()
    }
}

/// The certificate and key that sign workload certificates.
pub struct Authority {
    config: CaConfig,
    issuer: Issuer<'static, KeyPair>,
    /// The signing certificate and intermediates above it, without the root (PEM).
    chain_above_leaf: String,
    signer_not_after: SystemTime,
    bundle: TrustBundle,
}

impl fmt::Debug for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authority")
            .field("config", &self.config)
            .field("roots", &self.bundle.roots.len())
            .finish_non_exhaustive()
    }
}

impl Authority {
    /// An authority signing with `chain[0]` (whose key is `key_pem`); `chain` runs up
    /// to and including the root. `origin` names where the material came from, for
    /// error messages. Checks were done by [`crate::store`]; this only assembles.
    pub(crate) fn from_parts(
        config: CaConfig,
        chain: &[(String, Vec<u8>)],
        key: KeyPair,
        extra_roots: Vec<String>,
        origin: &std::path::Path,
    ) -> Result<Authority, CaError> {
        let (signer_pem, signer_der) = chain
            .first()
            .ok_or_else(|| CaError::file(origin, "holds no certificate"))?;
        let signer_not_after = not_after(&parse(signer_der).map_err(|m| CaError::file(origin, m))?);
        let issuer = Issuer::from_ca_cert_pem(signer_pem, key)
            .map_err(|e| CaError::file(origin, format!("cannot sign with this CA: {e}")))?;
        let root = &chain.last().expect("non-empty").0;
        let chain_above_leaf = if chain.len() > 1 {
            chain[..chain.len() - 1]
                .iter()
                .map(|(p, _)| p.as_str())
                .collect()
        } else {
            String::new()
        };
        let mut roots = vec![root.clone()];
        for r in extra_roots {
            if !roots.contains(&r) {
                roots.push(r);
            }
        }
        Ok(Authority {
            config,
            issuer,
            chain_above_leaf,
            signer_not_after,
            bundle: TrustBundle::new(roots),
        })
    }

    pub fn config(&self) -> &CaConfig {
        &self.config
    }

    /// The same signer, also trusting `roots` (during a root rotation).
    pub fn with_extra_roots(mut self, roots: &[String]) -> Authority {
        for r in roots {
            if !self.bundle.roots.contains(r) {
                self.bundle.roots.push(r.clone());
            }
        }
        self
    }

    pub fn trust_bundle(&self) -> &TrustBundle {
        &self.bundle
    }

    /// A workload identity in this CA's trust domain.
    pub fn workload_id(
        &self,
        namespace: &str,
        service_account: &str,
    ) -> Result<SpiffeId, crate::SpiffeIdError> {
        SpiffeId::new(&self.config.trust_domain, namespace, service_account)
    }

    /// Issues a certificate for `id` with the configured lifetime.
    pub fn issue(&self, id: &SpiffeId) -> Result<IssuedCertificate, CaError> {
        self.issue_for(id, self.config.workload_ttl)
    }

    /// Issues a certificate for `id` valid for `ttl` (never past the signing CA's own
    /// expiry).
    pub fn issue_for(&self, id: &SpiffeId, ttl: Duration) -> Result<IssuedCertificate, CaError> {
        self.issue_with_dns(id, ttl, &[])
    }

    /// Like [`Authority::issue_for`], with DNS names beside the SPIFFE id — for servers
    /// that clients reach by name (meshd's own xDS port).
    pub fn issue_with_dns(
        &self,
        id: &SpiffeId,
        ttl: Duration,
        dns_names: &[&str],
    ) -> Result<IssuedCertificate, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| CaError::Issue {
            id: id.to_string(),
            message: e.to_string(),
        })?;
        let leaf = self.sign_leaf(&id.to_string(), ttl, dns_names, WORKLOAD_USAGES, &key)?;
        Ok(IssuedCertificate {
            cert: leaf.into_signed(id),
            key: PrivateKeyPem::new(key.serialize_pem()),
        })
    }

    /// Signs the key of a verified CSR for `id` (the caller's authenticated identity,
    /// never what the CSR asks for: [`crate::csr::Csr::check_identity`] compares them),
    /// valid for `ttl` (never past the signing CA's own expiry).
    pub fn sign_csr(
        &self,
        csr: &crate::csr::Csr,
        id: &SpiffeId,
        ttl: Duration,
    ) -> Result<SignedCertificate, CaError> {
        let leaf = self.sign_leaf(&id.to_string(), ttl, &[], WORKLOAD_USAGES, csr.public_key())?;
        Ok(leaf.into_signed(id))
    }

    /// A client certificate for an operator of meshd's admin API, valid for `ttl`.
    /// Client authentication only: it cannot serve, and its SPIFFE path is not a
    /// workload's, so it opens no xDS stream.
    pub fn issue_operator(
        &self,
        id: &OperatorId,
        ttl: Duration,
    ) -> Result<OperatorCertificate, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| CaError::Issue {
            id: id.to_string(),
            message: e.to_string(),
        })?;
        let leaf = self.sign_leaf(
            &id.to_string(),
            ttl,
            &[],
            &[ExtendedKeyUsagePurpose::ClientAuth],
            &key,
        )?;
        Ok(OperatorCertificate {
            id: id.clone(),
            chain_pem: leaf.chain_pem,
            key: PrivateKeyPem::new(key.serialize_pem()),
            not_after: leaf.not_after,
        })
    }

    fn sign_leaf(
        &self,
        uri: &str,
        ttl: Duration,
        dns_names: &[&str],
        extended_key_usages: &[ExtendedKeyUsagePurpose],
        public_key: &impl rcgen::PublicKeyData,
    ) -> Result<Leaf, CaError> {
        let err = |message: String| CaError::Issue {
            id: uri.to_string(),
            message,
        };
        let now = SystemTime::now();
        let not_before = now - self.config.backdate;
        let not_after = (now + ttl).min(self.signer_not_after);
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            uri.to_string()
                .try_into()
                .map_err(|e| err(format!("{e}")))?,
        )];
        for name in dns_names {
            params.subject_alt_names.push(SanType::DnsName(
                (*name)
                    .try_into()
                    .map_err(|e| err(format!("{name:?}: {e}")))?,
            ));
        }
        params.not_before = to_offset(not_before);
        params.not_after = to_offset(not_after);
        let serial = next_serial();
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = extended_key_usages.to_vec();
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(public_key, &self.issuer)
            .map_err(|e| err(e.to_string()))?;
        Ok(Leaf {
            chain_pem: cert.pem() + &self.chain_above_leaf,
            not_before,
            not_after,
            issued_at: now,
            serial,
        })
    }
}

/// What a workload certificate may be used for: both ends of mutual TLS.
const WORKLOAD_USAGES: &[ExtendedKeyUsagePurpose] = &[
    ExtendedKeyUsagePurpose::ServerAuth,
    ExtendedKeyUsagePurpose::ClientAuth,
];

/// A signed leaf, before it is given its identity's type.
struct Leaf {
    chain_pem: String,
    not_before: SystemTime,
    not_after: SystemTime,
    issued_at: SystemTime,
    serial: Vec<u8>,
}

impl Leaf {
    fn into_signed(self, id: &SpiffeId) -> SignedCertificate {
        SignedCertificate {
            id: id.clone(),
            chain_pem: self.chain_pem,
            not_before: self.not_before,
            not_after: self.not_after,
            issued_at: self.issued_at,
            serial: self.serial,
        }
    }
}

/// An operator's client certificate and its key.
#[derive(Debug)]
pub struct OperatorCertificate {
    pub id: OperatorId,
    /// The leaf followed by any intermediates up to (not including) the root.
    pub chain_pem: String,
    pub key: PrivateKeyPem,
    pub not_after: SystemTime,
}

/// Generates a self-signed root: ECDSA P-256, CA, valid for `validity`.
pub fn generate_root(
    trust_domain: &str,
    validity: Duration,
) -> Result<(String, PrivateKeyPem), CaError> {
    let now = SystemTime::now();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    dn.push(DnType::CommonName, "meshd root CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = to_offset(now - Duration::from_secs(60));
    params.not_after = to_offset(now + validity);
    params.serial_number = Some(SerialNumber::from_slice(&next_serial()));
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|e| CaError::Generate(e.to_string()))?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| CaError::Generate(e.to_string()))?;
    Ok((cert.pem(), PrivateKeyPem::new(key.serialize_pem())))
}

/// 16-byte serials: a positive marker byte, a process-wide counter that never repeats
/// (seeded from the clock), and random bytes that keep replicas apart.
fn next_serial() -> Vec<u8> {
    static COUNTER: OnceLock<AtomicU64> = OnceLock::new();
    let n = COUNTER
        .get_or_init(|| {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos() as u64;
            AtomicU64::new(nanos)
        })
        .fetch_add(1, Ordering::Relaxed);
    let mut out = vec![0x01];
    out.extend_from_slice(&n.to_be_bytes());
    let mut random = [0u8; 7];
    getrandom::fill(&mut random).expect("the OS random source works");
    out.extend_from_slice(&random);
    out
}

fn to_offset(t: SystemTime) -> time::OffsetDateTime {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    time::OffsetDateTime::from_unix_timestamp(secs).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use x509_parser::extensions::GeneralName;

    use super::*;
    use crate::store::{CaSource, open_or_create};

    fn authority(ttl: Duration) -> (tempfile::TempDir, Authority) {
        let dir = tempfile::tempdir().unwrap();
        let config = CaConfig {
            workload_ttl: ttl,
            ..CaConfig::default()
        };
        let (a, _) = open_or_create(&CaSource::Directory(dir.path().join("ca")), config).unwrap();
        (dir, a)
    }

    #[test]
    fn a_workload_certificate_names_only_its_identity_and_lives_as_configured() {
        let (_dir, ca) = authority(Duration::from_secs(600));
        let id = ca.workload_id("shop", "web").unwrap();
        let issued = ca.issue(&id).unwrap();
        let blocks = crate::pem::certificate_blocks(&issued.chain_pem).unwrap();
        assert_eq!(blocks.len(), 1, "a root-signed leaf has no intermediates");
        let cert = parse(&blocks[0].1).unwrap();

        let sans: Vec<String> = cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| match n {
                GeneralName::URI(u) => u.to_string(),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(sans, ["spiffe://cluster.local/ns/shop/sa/web"]);
        let life = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        assert_eq!(life, 600 + 60, "ttl plus the backdate");
        assert!(!cert.basic_constraints().unwrap().unwrap().value.ca);
        assert_eq!(
            cert.public_key()
                .algorithm
                .parameters
                .as_ref()
                .unwrap()
                .as_oid()
                .unwrap()
                .to_id_string(),
            "1.2.840.10045.3.1.7",
            "P-256"
        );
        // Signed by the root in the trust bundle.
        let root_der = crate::pem::certificate_blocks(&ca.trust_bundle().pem()).unwrap();
        let root = parse(&root_der[0].1).unwrap();
        cert.verify_signature(Some(root.public_key())).unwrap();
        assert!(
            issued
                .key
                .secret_pem()
                .starts_with("-----BEGIN PRIVATE KEY-----")
        );
        assert!(
            !format!("{issued:?}").contains("PRIVATE KEY"),
            "Debug shows no key"
        );
        assert_eq!(
            issued.refresh_at(),
            issued.issued_at + Duration::from_secs(300)
        );
    }

    #[test]
    fn serial_numbers_never_repeat() {
        let (_dir, ca) = authority(Duration::from_secs(60));
        let id = ca.workload_id("a", "b").unwrap();
        let serials: HashSet<Vec<u8>> = (0..500)
            .map(|_| ca.issue(&id).unwrap().cert.serial)
            .collect();
        assert_eq!(serials.len(), 500);
    }
}
