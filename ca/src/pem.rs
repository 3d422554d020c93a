//! PEM and X.509 helpers shared by the loader and the authority.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use x509_parser::prelude::{FromDer, X509Certificate};

/// The `CERTIFICATE` blocks of a PEM bundle: (PEM text of the block, DER).
pub fn certificate_blocks(text: &str) -> Result<Vec<(String, Vec<u8>)>, String> {
    let blocks = pem::parse_many(text).map_err(|e| format!("not valid PEM: {e}"))?;
    Ok(blocks
        .into_iter()
        .filter(|p| p.tag() == "CERTIFICATE")
        .map(|p| {
            let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
            (pem::encode_config(&p, config), p.into_contents())
        })
        .collect())
}

/// The private key of a PEM file: its first `… PRIVATE KEY` block, wherever it stands
/// (meshd's own key files hold the key followed by its certificate).
pub fn private_key(text: &str) -> Result<rcgen::KeyPair, String> {
    let blocks = pem::parse_many(text).map_err(|e| format!("not valid PEM: {e}"))?;
    let der = blocks
        .into_iter()
        .find(|p| p.tag().ends_with("PRIVATE KEY"))
        .map(|p| zeroize::Zeroizing::new(p.into_contents()))
        .ok_or("holds no PRIVATE KEY block")?;
    rcgen::KeyPair::try_from(der.as_slice()).map_err(|e| e.to_string())
}

pub fn parse(der: &[u8]) -> Result<X509Certificate<'_>, String> {
    X509Certificate::from_der(der)
        .map(|(_, c)| c)
        .map_err(|e| format!("not a valid X.509 certificate: {e}"))
}

pub fn not_after(cert: &X509Certificate<'_>) -> SystemTime {
    to_system_time(cert.validity().not_after.timestamp())
}

pub fn not_before(cert: &X509Certificate<'_>) -> SystemTime {
    to_system_time(cert.validity().not_before.timestamp())
}

fn to_system_time(unix: i64) -> SystemTime {
    if unix >= 0 {
        UNIX_EPOCH + Duration::from_secs(unix as u64)
    } else {
        UNIX_EPOCH
    }
}
