//! SDS secrets: a proxy's certificate and key, and the trust bundle.

use super::inline;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, TlsCertificate, secret,
};
use meshd_ca::{IssuedCertificate, TrustBundle};

/// SDS name of a proxy's own certificate and key.
pub const WORKLOAD_SECRET: &str = "default";
/// SDS name of the trust bundle.
pub const ROOT_SECRET: &str = "ROOTCA";

/// A proxy's own certificate and key, as the SDS secret [`WORKLOAD_SECRET`].
pub fn workload_secret(cert: &IssuedCertificate) -> Secret {
    Secret {
        name: WORKLOAD_SECRET.to_string(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: Some(inline(&cert.chain_pem)),
            private_key: Some(inline(cert.key.secret_pem())),
            ..Default::default()
        })),
    }
}

/// The trust bundle, as the SDS secret [`ROOT_SECRET`].
pub fn root_secret(bundle: &TrustBundle) -> Secret {
    Secret {
        name: ROOT_SECRET.to_string(),
        r#type: Some(secret::Type::ValidationContext(
            CertificateValidationContext {
                trusted_ca: Some(inline(&bundle.pem())),
                ..Default::default()
            },
        )),
    }
}
