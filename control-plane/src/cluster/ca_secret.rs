//! The mesh root in a Kubernetes Secret, shared by every replica.
//!
//! The Secret (`<namespace>/meshd-ca`, keys `root-cert.pem` and `root-key.pem`) is
//! created by whichever replica finds it missing first. Creation is atomic on the API
//! server: a replica whose create fails with `AlreadyExists` lost the race and reads the
//! winner's root. The private key never leaves the Secret and meshd's memory; it is not
//! logged.
//!
//! A root rotation ([`super::root_rotation`]) keeps its state in the same Secret:
//!
//! | where | what |
//! |---|---|
//! | `next-root-cert.pem`, `next-root-key.pem` | the root being rotated in |
//! | `previous-root-cert.pem` | the root last rotated out (its key is dropped) |
//! | annotation `meshd.io/root-rotation-phase` | `trusting` or `signing` |
//! | annotation `meshd.io/root-rotation-since` | when that phase began (RFC 3339) |
//! | annotation `meshd.io/root-rotation-requested` | a rotation was asked for |
//! | annotation `meshd.io/root-rotation-completed` | when the last one completed |

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{Context, bail};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use meshd_ca::PrivateKeyPem;
use meshd_ca::store::{
    CaSource, NEXT_ROOT_CERT_FILE, NEXT_ROOT_KEY_FILE, ROOT_CERT_FILE, ROOT_KEY_FILE, ROOT_VALIDITY,
};

use crate::identity::{SharedPhase, SharedRoots};

pub const SECRET_NAME: &str = "meshd-ca";
pub const PHASE_ANNOTATION: &str = "meshd.io/root-rotation-phase";
pub const SINCE_ANNOTATION: &str = "meshd.io/root-rotation-since";
pub const REQUESTED_ANNOTATION: &str = "meshd.io/root-rotation-requested";
pub const COMPLETED_ANNOTATION: &str = "meshd.io/root-rotation-completed";
pub const TRUSTING: &str = "trusting";
pub const SIGNING: &str = "signing";

/// How the Secret is named in logs and errors.
pub fn origin(namespace: &str) -> String {
    format!("Secret {namespace}/{SECRET_NAME}")
}

/// The roots from `namespace/meshd-ca` (and the state of a rotation under way),
/// generated and stored there if it is missing.
pub async fn root(
    client: Client,
    namespace: &str,
    trust_domain: &str,
) -> anyhow::Result<SharedRoots> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let origin = origin(namespace);
    for _ in 0..3 {
        if let Some(secret) = api
            .get_opt(SECRET_NAME)
            .await
            .with_context(|| format!("cannot read {origin}"))?
        {
            tracing::info!("using the mesh root from {origin}");
            return shared_roots(&secret, &origin);
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
                return Ok(SharedRoots {
                    current: CaSource::Pem {
                        origin,
                        chain_pem: cert_pem,
                        key_pem: Arc::new(key_pem),
                    },
                    next: None,
                    phase: SharedPhase::Idle,
                    last_completed: None,
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

/// The roots and rotation state the Secret holds.
pub fn shared_roots(secret: &Secret, origin: &str) -> anyhow::Result<SharedRoots> {
    let data = secret.data.clone().unwrap_or_default();
    let text = |key: &str| -> anyhow::Result<Option<String>> {
        data.get(key)
            .map(|bytes| {
                String::from_utf8(bytes.0.clone())
                    .with_context(|| format!("{origin} key {key:?} is not text"))
            })
            .transpose()
    };
    let pem = |cert: &str, key: &str, label: &str| -> anyhow::Result<Option<CaSource>> {
        match (text(cert)?, text(key)?) {
            (Some(chain_pem), Some(key_pem)) => Ok(Some(CaSource::Pem {
                origin: format!("{origin}{label}"),
                chain_pem,
                key_pem: Arc::new(PrivateKeyPem::new(key_pem)),
            })),
            (None, None) => Ok(None),
            (Some(_), None) => bail!("{origin} has {cert:?} but no {key:?}"),
            (None, Some(_)) => bail!("{origin} has {key:?} but no {cert:?}"),
        }
    };
    let current = pem(ROOT_CERT_FILE, ROOT_KEY_FILE, "")?
        .with_context(|| format!("{origin} has no {ROOT_CERT_FILE:?} and {ROOT_KEY_FILE:?}"))?;
    let next = pem(NEXT_ROOT_CERT_FILE, NEXT_ROOT_KEY_FILE, " (next root)")?;
    let annotations = secret.metadata.annotations.clone().unwrap_or_default();
    let time = |name: &str| -> anyhow::Result<Option<std::time::SystemTime>> {
        annotations
            .get(name)
            .map(|t| {
                humantime::parse_rfc3339(t)
                    .with_context(|| format!("{origin} annotation {name}: {t:?} is not RFC 3339"))
            })
            .transpose()
    };
    let since = || {
        time(SINCE_ANNOTATION)?
            .with_context(|| format!("{origin} has a rotation phase but no {SINCE_ANNOTATION}"))
    };
    let phase = match annotations.get(PHASE_ANNOTATION).map(String::as_str) {
        None => SharedPhase::Idle,
        Some(TRUSTING) => SharedPhase::Trusting { since: since()? },
        Some(SIGNING) => SharedPhase::Signing { since: since()? },
        Some(other) => bail!(
            "{origin} annotation {PHASE_ANNOTATION}: {other:?} is neither {TRUSTING:?} nor {SIGNING:?}"
        ),
    };
    if phase != SharedPhase::Idle && next.is_none() {
        bail!("{origin} is in a rotation but has no {NEXT_ROOT_CERT_FILE:?}");
    }
    Ok(SharedRoots {
        current,
        next,
        phase,
        last_completed: time(COMPLETED_ANNOTATION)?,
    })
}
