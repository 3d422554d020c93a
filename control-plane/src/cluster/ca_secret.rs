//! The mesh root in a Kubernetes Secret, shared by every replica.
//!
//! The Secret (`<namespace>/meshd-ca`, keys `root-cert.pem` and `root-key.pem`) is
//! created by whichever replica finds it missing first. Creation is atomic on the API
//! server: a replica whose create fails with `AlreadyExists` lost the race and reads the
//! winner's root. The private key never leaves the Secret and meshd's memory; it is not
//! logged.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{Context, bail};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use meshd_ca::PrivateKeyPem;
use meshd_ca::store::{CaSource, ROOT_CERT_FILE, ROOT_KEY_FILE, ROOT_VALIDITY};

pub const SECRET_NAME: &str = "meshd-ca";

/// The root from `namespace/meshd-ca`, generated and stored there if it is missing.
pub async fn root(client: Client, namespace: &str, trust_domain: &str) -> anyhow::Result<CaSource> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let origin = format!("Secret {namespace}/{SECRET_NAME}");
    for _ in 0..3 {
        if let Some(secret) = api
            .get_opt(SECRET_NAME)
            .await
            .with_context(|| format!("cannot read {origin}"))?
        {
            tracing::info!("using the mesh root from {origin}");
            return from_secret(&secret, origin);
        }
        let (cert_pem, key_pem) = meshd_ca::generate_root(trust_domain, ROOT_VALIDITY)?;
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(SECRET_NAME.to_string()),
                namespace: Some(namespace.to_string()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".to_string(),
                    "meshd".to_string(),
                )])),
                ..Default::default()
            },
            type_: Some("Opaque".to_string()),
            data: Some(BTreeMap::from([
                (
                    ROOT_CERT_FILE.to_string(),
                    ByteString(cert_pem.clone().into_bytes()),
                ),
                (
                    ROOT_KEY_FILE.to_string(),
                    ByteString(key_pem.secret_pem().as_bytes().to_vec()),
                ),
            ])),
            ..Default::default()
        };
        match api.create(&PostParams::default(), &secret).await {
            Ok(_) => {
                tracing::info!("generated the mesh root and stored it in {origin}");
                return Ok(CaSource::Pem {
                    origin,
                    chain_pem: cert_pem,
                    key_pem: Arc::new(key_pem),
                });
            }
            // Another replica created it first: use theirs.
            Err(kube::Error::Api(e)) if e.code == 409 => {
                tracing::info!("{origin} was created by another replica; reading it");
            }
            Err(e) => return Err(e).with_context(|| format!("cannot create {origin}")),
        }
    }
    bail!("{origin} keeps appearing and disappearing; is something deleting it?")
}

fn from_secret(secret: &Secret, origin: String) -> anyhow::Result<CaSource> {
    let data = secret.data.clone().unwrap_or_default();
    let text = |key: &str| -> anyhow::Result<String> {
        let bytes = data
            .get(key)
            .with_context(|| format!("{origin} has no key {key:?}"))?;
        String::from_utf8(bytes.0.clone())
            .with_context(|| format!("{origin} key {key:?} is not text"))
    };
    Ok(CaSource::Pem {
        chain_pem: text(ROOT_CERT_FILE)?,
        key_pem: Arc::new(PrivateKeyPem::new(text(ROOT_KEY_FILE)?)),
        origin,
    })
}
