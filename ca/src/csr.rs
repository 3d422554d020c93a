//! Certificate signing requests: a workload that made its own key (meshd-agent) asks
//! for a certificate.
//!
//! A CSR is accepted only if its signature verifies (the requester holds the key), its
//! key is ECDSA P-256, and it names exactly one identity: one URI SAN, a workload SPIFFE
//! id, and no other name (no DNS name, address or e-mail). meshd never copies anything
//! else from a CSR: the certificate is built from meshd's own template, and the caller's
//! identity is the one it authenticated as ([`Csr::check_identity`]), never merely the
//! one it asked for.

use std::fmt;

use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
use x509_parser::prelude::FromDer;

use crate::spiffe::SpiffeId;

/// Why a CSR is refused. Each message says what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("not a PKCS#10 certificate signing request: {0}")]
    Unreadable(String),
    #[error("the CSR's signature does not verify against its own key")]
    BadSignature,
    #[error("the CSR's key is {0}; meshd signs ECDSA P-256 keys only")]
    UnsupportedKey(String),
    #[error(
        "the CSR must name exactly one identity, as its only subjectAltName (a URI, \
         spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>): {0}"
    )]
    BadIdentity(String),
    #[error("the CSR asks for {requested}, but the caller is {caller}")]
    WrongIdentity { requested: String, caller: String },
}

/// A CSR whose signature verified and whose key meshd signs.
pub struct Csr {
    /// The requester's public key (its DER SubjectPublicKeyInfo).
    public_key: rcgen::SubjectPublicKeyInfo,
    requested: SpiffeId,
}

impl fmt::Debug for Csr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Csr")
            .field("requested", &self.requested.to_string())
            .finish_non_exhaustive()
    }
}

impl Csr {
    /// Reads and checks a CSR in PEM (`CERTIFICATE REQUEST`).
    pub fn from_pem(text: &str) -> Result<Csr, CsrError> {
        let block = pem::parse(text).map_err(|e| CsrError::Unreadable(format!("not PEM: {e}")))?;
        if block.tag() != "CERTIFICATE REQUEST" {
            return Err(CsrError::Unreadable(format!(
                "the PEM block is {:?}, expected \"CERTIFICATE REQUEST\"",
                block.tag()
            )));
        }
        Csr::from_der(block.contents())
    }

    /// Reads and checks a DER-encoded CSR.
    pub fn from_der(der: &[u8]) -> Result<Csr, CsrError> {
        let (rest, csr) = X509CertificationRequest::from_der(der)
            .map_err(|e| CsrError::Unreadable(e.to_string()))?;
        if !rest.is_empty() {
            return Err(CsrError::Unreadable(format!(
                "{} bytes after the request",
                rest.len()
            )));
        }
        let spki = &csr.certification_request_info.subject_pki;
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY || curve != Some(OID_EC_P256) {
            let kind = match curve {
                Some(c) if spki.algorithm.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY => {
                    format!("an elliptic-curve key on curve {c}")
                }
                _ => format!("of type {}", spki.algorithm.algorithm),
            };
            return Err(CsrError::UnsupportedKey(kind));
        }
        csr.verify_signature().map_err(|_| CsrError::BadSignature)?;
        let requested = requested_identity(&csr)?;
        let public_key = rcgen::SubjectPublicKeyInfo::from_der(spki.raw)
            .map_err(|e| CsrError::Unreadable(format!("its public key: {e}")))?;
        Ok(Csr {
            public_key,
            requested,
        })
    }

    /// The identity the CSR asks for.
    pub fn requested(&self) -> &SpiffeId {
        &self.requested
    }

    /// Refuses a CSR that asks for any identity but the caller's.
    pub fn check_identity(&self, caller: &SpiffeId) -> Result<(), CsrError> {
        if self.requested != *caller {
            return Err(CsrError::WrongIdentity {
                requested: self.requested.to_string(),
                caller: caller.to_string(),
            });
        }
        Ok(())
    }

    pub(crate) fn public_key(&self) -> &rcgen::SubjectPublicKeyInfo {
        &self.public_key
    }
}

/// The one URI SAN of the request, as a workload id.
fn requested_identity(csr: &X509CertificationRequest<'_>) -> Result<SpiffeId, CsrError> {
    let mut names = Vec::new();
    for ext in csr.requested_extensions().into_iter().flatten() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext {
            names.extend(san.general_names.iter());
        }
    }
    match names.as_slice() {
        [GeneralName::URI(uri)] => uri
            .parse()
            .map_err(|e: crate::SpiffeIdError| CsrError::BadIdentity(e.to_string())),
        [] => Err(CsrError::BadIdentity("it has none".into())),
        more => Err(CsrError::BadIdentity(format!(
            "it has {}: {}",
            more.len(),
            // Debug quotes and escapes what the requester wrote.
            more.iter()
                .map(|n| format!("{n:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rcgen::{CertificateParams, KeyPair, SanType};

    use super::*;
    use crate::store::{CaSource, open_or_create};

    fn csr_for(key: &KeyPair, sans: Vec<SanType>) -> String {
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.serialize_request(key).unwrap().pem().unwrap()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

    #[test]
    fn a_p256_csr_for_the_callers_identity_is_signed_with_its_own_key() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = open_or_create(
            &CaSource::Directory(dir.path().join("ca")),
            Default::default(),
        )
        .unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = Csr::from_pem(&csr_for(&key, vec![uri(WEB)])).unwrap();
        let caller: SpiffeId = WEB.parse().unwrap();
        csr.check_identity(&caller).unwrap();
        let signed = ca
            .sign_csr(&csr, &caller, Duration::from_secs(600))
            .unwrap();
        let der = pem::parse(&signed.chain_pem).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(der.contents()).unwrap();
        assert_eq!(
            cert.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw()
        );
        assert_eq!(crate::leaf_uri(der.contents()).unwrap(), WEB);
        let life = signed.not_after.duration_since(signed.issued_at).unwrap();
        assert_eq!(life.as_secs(), 600);
    }

    #[test]
    fn a_csr_for_another_identity_is_refused_naming_both() {
        let key = KeyPair::generate().unwrap();
        let csr = Csr::from_pem(&csr_for(&key, vec![uri(WEB)])).unwrap();
        let caller: SpiffeId = "spiffe://cluster.local/ns/shop/sa/db".parse().unwrap();
        let err = csr.check_identity(&caller).unwrap_err().to_string();
        assert!(
            err.contains("asks for spiffe://cluster.local/ns/shop/sa/web"),
            "{err}"
        );
        assert!(
            err.contains("caller is spiffe://cluster.local/ns/shop/sa/db"),
            "{err}"
        );
    }

    #[test]
    fn other_keys_and_names_are_refused() {
        let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let err = Csr::from_pem(&csr_for(&p384, vec![uri(WEB)])).unwrap_err();
        assert!(matches!(err, CsrError::UnsupportedKey(_)), "{err}");
        assert!(err.to_string().contains("1.3.132.0.34"), "{err}");
        let ed = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let err = Csr::from_pem(&csr_for(&ed, vec![uri(WEB)])).unwrap_err();
        assert!(matches!(err, CsrError::UnsupportedKey(_)), "{err}");

        let key = KeyPair::generate().unwrap();
        for sans in [
            vec![],
            vec![uri(WEB), SanType::DnsName("web".try_into().unwrap())],
            vec![uri("spiffe://cluster.local/meshd/operator/alice")],
        ] {
            let err = Csr::from_pem(&csr_for(&key, sans)).unwrap_err();
            assert!(matches!(err, CsrError::BadIdentity(_)), "{err}");
        }
        let err = Csr::from_pem("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
            .unwrap_err();
        assert!(
            err.to_string().contains("expected \"CERTIFICATE REQUEST\""),
            "{err}"
        );
    }

    #[test]
    fn a_csr_whose_signature_does_not_verify_is_refused() {
        let key = KeyPair::generate().unwrap();
        let pem_text = csr_for(&key, vec![uri(WEB)]);
        let mut der = pem::parse(&pem_text).unwrap().into_contents();
        // The signature is the last field: flip a bit in its final byte.
        *der.last_mut().unwrap() ^= 1;
        assert_eq!(Csr::from_der(&der).unwrap_err(), CsrError::BadSignature);
    }
}
