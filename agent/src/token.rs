//! The pod's projected ServiceAccount token, as the kubelet writes it.
//!
//! The agent reads the pod's namespace, name and ServiceAccount from the token's own
//! claims (`kubernetes.io.{namespace, pod.name, serviceaccount.name}`), so what the
//! agent asks for can never disagree with what the token proves. It checks no
//! signature: meshd does, with a TokenReview against the API server. The token itself
//! is a credential: it never appears in a message, only the file's path does.

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use zeroize::Zeroizing;

/// Who a pod-bound token says the pod is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodClaims {
    pub namespace: String,
    pub pod: String,
    pub service_account: String,
}

/// Reads the token at `path`: the token (for the `authorization` metadata) and its
/// claims.
pub fn read(path: &Path) -> anyhow::Result<(Zeroizing<String>, PodClaims)> {
    let text =
        Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
            anyhow::anyhow!("the token file {}: {e} (--token-file)", path.display())
        })?);
    let token = Zeroizing::new(text.trim().to_string());
    let claims = claims(&token)
        .map_err(|reason| anyhow::anyhow!("the token file {}: {reason}", path.display()))?;
    Ok((token, claims))
}

#[derive(Deserialize)]
struct Payload {
    #[serde(rename = "kubernetes.io")]
    kubernetes: Option<KubernetesClaims>,
}

#[derive(Deserialize)]
struct KubernetesClaims {
    namespace: Option<String>,
    pod: Option<Named>,
    serviceaccount: Option<Named>,
}

#[derive(Deserialize)]
struct Named {
    name: String,
}

/// The claims of a JWT (`header.payload.signature`, base64url). Errors say which part
/// or claim is wrong, never what the token holds.
pub fn claims(token: &str) -> Result<PodClaims, String> {
    let mut parts = token.split('.');
    let (Some(_header), Some(payload), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("not a JWT (expected three parts separated by '.')".into());
    };
    let json = URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| "the JWT's payload is not base64url".to_string())?;
    let payload: Payload = serde_json::from_slice(&json)
        .map_err(|e| format!("the JWT's payload is not the claims of a token: {e}"))?;
    let missing = |claim: &str| {
        format!(
            "the token has no {claim} claim: it is not a pod-bound ServiceAccount token \
             (mount a projected serviceAccountToken with audience meshd)"
        )
    };
    let k = payload.kubernetes.ok_or_else(|| missing("kubernetes.io"))?;
    Ok(PodClaims {
        namespace: k
            .namespace
            .ok_or_else(|| missing("kubernetes.io.namespace"))?,
        pod: k.pod.ok_or_else(|| missing("kubernetes.io.pod.name"))?.name,
        service_account: k
            .serviceaccount
            .ok_or_else(|| missing("kubernetes.io.serviceaccount.name"))?
            .name,
    })
}

#[cfg(test)]
pub(crate) fn fake_token(payload: &serde_json::Value) -> String {
    let enc = |v: &serde_json::Value| URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap());
    format!(
        "{}.{}.c2lnbmF0dXJl",
        enc(&serde_json::json!({"alg": "ES256", "kid": "k"})),
        enc(payload)
    )
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// The claims kube-apiserver's TokenRequest puts into a pod-bound token.
    fn pod_bound() -> serde_json::Value {
        json!({
            "aud": ["meshd"],
            "exp": 1_900_000_000u64,
            "iss": "https://kubernetes.default.svc.cluster.local",
            "sub": "system:serviceaccount:shop:web",
            "kubernetes.io": {
                "namespace": "shop",
                "pod": { "name": "web-0", "uid": "1b0c…" },
                "serviceaccount": { "name": "web", "uid": "9f3e…" },
            },
        })
    }

    #[test]
    fn a_pod_bound_token_names_namespace_pod_and_service_account() {
        assert_eq!(
            claims(&fake_token(&pod_bound())).unwrap(),
            PodClaims {
                namespace: "shop".into(),
                pod: "web-0".into(),
                service_account: "web".into(),
            }
        );
    }

    #[test]
    fn a_token_not_bound_to_a_pod_is_refused_naming_the_claim() {
        let mut secret_bound = pod_bound();
        secret_bound["kubernetes.io"]
            .as_object_mut()
            .unwrap()
            .remove("pod");
        let err = claims(&fake_token(&secret_bound)).unwrap_err();
        assert!(err.contains("no kubernetes.io.pod.name claim"), "{err}");
        let err = claims(&fake_token(&json!({"sub": "x"}))).unwrap_err();
        assert!(err.contains("no kubernetes.io claim"), "{err}");
    }

    #[test]
    fn garbage_is_refused_without_echoing_it() {
        for garbage in ["s3cr3t", "a.b", "a.!!!.c", "a.bm90IGpzb24.c", "a.b.c.d"] {
            let err = claims(garbage).unwrap_err();
            assert!(!err.contains(garbage), "{err}");
        }
    }

    #[test]
    fn reading_names_the_file_and_never_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meshd-token");
        std::fs::write(&path, "s3cr3t-not-a-jwt\n").unwrap();
        let err = read(&path).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(!err.contains("s3cr3t"), "{err}");
        std::fs::write(&path, fake_token(&pod_bound()) + "\n").unwrap();
        let (token, claims) = read(&path).unwrap();
        assert!(!token.ends_with('\n'));
        assert_eq!(claims.pod, "web-0");
    }
}
