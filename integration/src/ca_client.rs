//! A client of meshd's CA service (`meshd.ca.v1`), as an agent calls it: over the xDS
//! port, with a pod's token or a mesh certificate, and CSRs for keys made here.

use meshd_proto::ca::certificate_authority_client::CertificateAuthorityClient;
use meshd_proto::ca::{SignRequest, SignResponse};
use tonic::transport::Channel;

use crate::meshd::Meshd;

/// A key made by the caller and its CSR.
pub struct Csr {
    pub key: rcgen::KeyPair,
    pub pem: String,
}

/// A CSR for `uris` (normally one: the SPIFFE id) with a fresh key of `alg`.
pub fn csr_with(alg: &'static rcgen::SignatureAlgorithm, uris: &[&str]) -> Csr {
    let key = rcgen::KeyPair::generate_for(alg).expect("key generation");
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = uris
        .iter()
        .map(|u| rcgen::SanType::URI((*u).try_into().expect("a URI")))
        .collect();
    let pem = params
        .serialize_request(&key)
        .and_then(|r| r.pem())
        .expect("a CSR");
    Csr { key, pem }
}

/// A P-256 CSR for `id`.
pub fn csr_for(id: &str) -> Csr {
    csr_with(&rcgen::PKCS_ECDSA_P256_SHA256, &[id])
}

/// A client of `meshd`'s CA service presenting `client` (chain PEM, key PEM), if given.
pub async fn client(
    meshd: &Meshd,
    client: Option<(&str, &str)>,
) -> anyhow::Result<CertificateAuthorityClient<Channel>> {
    let roots = meshd.trust_bundle_pem().await?;
    let tls = meshd_proto::client::tls_config(&roots, &meshd.identity()?.to_string(), client)?;
    let channel = meshd_proto::client::channel(&meshd.xds_addr.to_string(), tls)?;
    Ok(CertificateAuthorityClient::new(channel))
}

/// A `Sign` call with `token` as its bearer, if given.
pub async fn sign(
    ca: &mut CertificateAuthorityClient<Channel>,
    token: Option<&str>,
    csr_pem: &str,
) -> Result<SignResponse, tonic::Status> {
    let mut request = tonic::Request::new(SignRequest {
        csr_pem: csr_pem.to_string(),
        lifetime: None,
    });
    if let Some(token) = token {
        request.metadata_mut().insert(
            meshd_proto::AUTHORIZATION,
            format!("{}{token}", meshd_proto::BEARER)
                .parse()
                .expect("ASCII token"),
        );
    }
    ca.sign(request).await.map(|r| r.into_inner())
}
