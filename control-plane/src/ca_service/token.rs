//! ServiceAccount tokens: who a pod is, as the API server says.
//!
//! A token is first read locally, unverified, only to refuse the obviously wrong at no
//! cost to the API server: not a JWT, expired, for another audience, not bound to a pod.
//! What decides is a TokenReview (`authentication.k8s.io/v1`) with meshd's audience: it
//! checks the signature, the times, the audience, and that the ServiceAccount and the
//! bound pod still exist with the token's uids. Its answer is cached by the token's
//! SHA-256 (never the token itself) until the token expires, at most [`MAX_AGE`], for at
//! most [`MAX_CACHED`] tokens, so that renewals do not load the API server; reviews in
//! flight are bounded by [`MAX_CONCURRENT_REVIEWS`].
//!
//! The token is never logged or echoed; what the API server says about it is, escaped.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::Api;
use kube::api::PostParams;
use serde::Deserialize;
use tokio::sync::Semaphore;

use crate::logging::Escaped;

/// Longest a review is trusted without asking again.
pub const MAX_AGE: Duration = Duration::from_secs(300);
/// Reviews kept; beyond, expired ones go first, then any.
pub const MAX_CACHED: usize = 16_384;
/// TokenReviews meshd has open at once; more callers wait.
pub const MAX_CONCURRENT_REVIEWS: usize = 32;
/// How old a review must be before a mismatch with meshd's view sends the token to
/// the API server again: a token whose pod meshd does not see costs at most one
/// review per this long, however often it is presented.
pub const RECHECK_AFTER: Duration = Duration::from_secs(5);
/// Longer is not a ServiceAccount token.
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// The pod a token speaks for, as the API server confirmed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodCaller {
    pub namespace: String,
    pub service_account: String,
    pub pod: String,
    pub pod_uid: String,
}

/// Why a token is refused. The messages never contain the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the bearer token is not a JWT: {0}")]
    NotAJwt(&'static str),
    #[error("the token expired at {0}")]
    Expired(String),
    #[error(
        "the token's audiences {got:?} do not include {want:?} (mint it with `--audience \
         {want}`, or a projected volume with `audience: {want}`)"
    )]
    WrongAudience { got: Vec<String>, want: String },
    #[error(
        "the token is not bound to a pod: use the pod's projected ServiceAccount token \
         (or `kubectl create token … --bound-object-kind Pod`)"
    )]
    NotPodBound,
    #[error("the API server refused the token: {0}")]
    Refused(String),
    #[error("cannot review the token now: {0}")]
    Unavailable(String),
}

impl TokenError {
    pub fn reason(&self) -> &'static str {
        match self {
            TokenError::NotAJwt(_) => "token_malformed",
            TokenError::Expired(_) => "token_expired",
            TokenError::WrongAudience { .. } => "token_audience",
            TokenError::NotPodBound => "token_not_pod_bound",
            TokenError::Refused(_) => "token_refused",
            TokenError::Unavailable(_) => "token_review_unavailable",
        }
    }
}

/// Reviews tokens with the API server, for one audience.
pub struct TokenReviewer {
    client: kube::Client,
    audience: String,
    cache: Mutex<HashMap<[u8; 32], Cached>>,
    in_flight: Semaphore,
}

impl std::fmt::Debug for TokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewer")
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
struct Cached {
    caller: PodCaller,
    until: SystemTime,
    reviewed_at: SystemTime,
}

impl TokenReviewer {
    pub fn new(client: kube::Client, audience: String) -> TokenReviewer {
        TokenReviewer {
            client,
            audience,
            cache: Mutex::new(HashMap::new()),
            in_flight: Semaphore::new(MAX_CONCURRENT_REVIEWS),
        }
    }

    /// The pod `token` speaks for, and when the API server said so: from the cache, or
    /// from a TokenReview.
    pub async fn review(&self, token: &str) -> Result<(PodCaller, SystemTime), TokenError> {
        let claims = Claims::read(token)?;
        let now = SystemTime::now();
        claims.check(&self.audience, now)?;
        let key = digest(token);
        if let Some(hit) = self.cached(&key, now) {
            return Ok((hit.caller, hit.reviewed_at));
        }
        let _permit = self
            .in_flight
            .acquire()
            .await
            .map_err(|_| TokenError::Unavailable("meshd is shutting down".into()))?;
        let caller = self.ask_api_server(token).await;
        crate::metrics::metrics()
            .token_reviews
            .get_or_create(&crate::metrics::ReasonLabel {
                reason: match &caller {
                    Ok(_) => "authenticated",
                    Err(e) => e.reason(),
                },
            })
            .inc();
        let caller = caller?;
        let until = claims.expires().unwrap_or(now + MAX_AGE).min(now + MAX_AGE);
        self.remember(key, caller.clone(), until, now);
        Ok((caller, now))
    }

    /// Drops a cached review (the pod it named is not as meshd sees it): the next call
    /// asks the API server again.
    pub fn forget(&self, token: &str) {
        lock(&self.cache).remove(&digest(token));
    }

    fn cached(&self, key: &[u8; 32], now: SystemTime) -> Option<Cached> {
        let cache = lock(&self.cache);
        cache.get(key).filter(|c| c.until > now).cloned()
    }

    fn remember(&self, key: [u8; 32], caller: PodCaller, until: SystemTime, now: SystemTime) {
        let mut cache = lock(&self.cache);
        if cache.len() >= MAX_CACHED {
            cache.retain(|_, c| c.until > now);
        }
        if cache.len() >= MAX_CACHED
            && let Some(any) = cache.keys().next().copied()
        {
            cache.remove(&any);
        }
        cache.insert(
            key,
            Cached {
                caller,
                until,
                reviewed_at: now,
            },
        );
    }

    async fn ask_api_server(&self, token: &str) -> Result<PodCaller, TokenError> {
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let answer = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| match e {
                kube::Error::Api(s) if s.code == 401 || s.code == 403 => {
                    TokenError::Unavailable(format!(
                        "meshd may not create TokenReviews ({}: {}); its ServiceAccount \
                         needs `tokenreviews: create` (the chart's ClusterRole has it)",
                        s.code,
                        Escaped(&s.message)
                    ))
                }
                other => TokenError::Unavailable(format!(
                    "the TokenReview failed: {}",
                    Escaped(&other.to_string())
                )),
            })?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let why = status
                .error
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| "not authenticated".into());
            return Err(TokenError::Refused(Escaped(&why).to_string()));
        }
        // No audiences in the answer means the API server's own, not meshd's.
        if !status
            .audiences
            .as_ref()
            .is_some_and(|a| a.contains(&self.audience))
        {
            return Err(TokenError::WrongAudience {
                got: status.audiences.unwrap_or_default(),
                want: self.audience.clone(),
            });
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let (namespace, service_account) = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split_once(':'))
            .ok_or_else(|| {
                TokenError::Refused(format!(
                    "it belongs to {}, not to a ServiceAccount",
                    Escaped(&username)
                ))
            })?;
        let extra = |key: &str| {
            user.extra
                .as_ref()
                .and_then(|e| e.get(key))
                .and_then(|v| v.first())
                .filter(|v| !v.is_empty())
                .cloned()
        };
        let (Some(pod), Some(pod_uid)) = (
            extra("authentication.kubernetes.io/pod-name"),
            extra("authentication.kubernetes.io/pod-uid"),
        ) else {
            return Err(TokenError::NotPodBound);
        };
        Ok(PodCaller {
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
            pod,
            pod_uid,
        })
    }
}

/// The claims meshd reads before asking the API server. Unverified: they only let meshd
/// refuse early; nothing is granted on them.
#[derive(Debug, Deserialize)]
pub struct Claims {
    #[serde(default)]
    aud: Audiences,
    exp: Option<i64>,
    #[serde(rename = "kubernetes.io")]
    kubernetes: Option<KubernetesClaims>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(untagged)]
enum Audiences {
    One(String),
    Many(Vec<String>),
    #[default]
    None,
}

#[derive(Debug, Deserialize)]
struct KubernetesClaims {
    /// Only whether there is one: the review says which.
    pod: Option<serde::de::IgnoredAny>,
}

impl Claims {
    /// The payload of a JWT, decoded.
    pub fn read(token: &str) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::NotAJwt("longer than 16 KiB"));
        }
        let mut parts = token.split('.');
        let (Some(_header), Some(payload), Some(_signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::NotAJwt("expected three dot-separated parts"));
        };
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload.trim_end_matches('='))
            .map_err(|_| TokenError::NotAJwt("its payload is not base64url"))?;
        serde_json::from_slice(&json)
            .map_err(|_| TokenError::NotAJwt("its payload is not JSON claims"))
    }

    fn expires(&self) -> Option<SystemTime> {
        let exp = u64::try_from(self.exp?).ok()?;
        Some(UNIX_EPOCH + Duration::from_secs(exp))
    }

    fn check(&self, audience: &str, now: SystemTime) -> Result<(), TokenError> {
        if let Some(exp) = self.expires()
            && exp <= now
        {
            return Err(TokenError::Expired(
                humantime::format_rfc3339_seconds(exp).to_string(),
            ));
        }
        let audiences: Vec<String> = match &self.aud {
            Audiences::One(a) => vec![a.clone()],
            Audiences::Many(a) => a.clone(),
            Audiences::None => Vec::new(),
        };
        if !audiences.iter().any(|a| a == audience) {
            return Err(TokenError::WrongAudience {
                got: audiences.iter().map(|a| Escaped(a).to_string()).collect(),
                want: audience.to_string(),
            });
        }
        if self
            .kubernetes
            .as_ref()
            .and_then(|k| k.pod.as_ref())
            .is_none()
        {
            return Err(TokenError::NotPodBound);
        }
        Ok(())
    }
}

fn digest(token: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    d.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: serde_json::Value) -> String {
        let enc = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        format!(
            "{}.{}.{}",
            enc(br#"{"alg":"ES256"}"#),
            enc(claims.to_string().as_bytes()),
            enc(b"signature")
        )
    }

    fn now_secs() -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    fn check(token: &str) -> Result<(), TokenError> {
        Claims::read(token)?.check("meshd", SystemTime::now())
    }

    #[test]
    fn obviously_wrong_tokens_are_refused_before_any_review() {
        let pod =
            serde_json::json!({ "namespace": "shop", "pod": { "name": "web-0", "uid": "u" } });
        let good = jwt(
            serde_json::json!({ "aud": ["meshd"], "exp": now_secs() + 600, "kubernetes.io": pod }),
        );
        assert_eq!(check(&good), Ok(()));
        assert!(matches!(check("garbage"), Err(TokenError::NotAJwt(_))));
        assert!(matches!(check("a.!!!.c"), Err(TokenError::NotAJwt(_))));
        let expired =
            jwt(serde_json::json!({ "aud": "meshd", "exp": now_secs() - 5, "kubernetes.io": pod }));
        assert!(matches!(check(&expired), Err(TokenError::Expired(_))));
        let other = jwt(
            serde_json::json!({ "aud": ["https://kubernetes.default.svc"], "exp": now_secs() + 600, "kubernetes.io": pod }),
        );
        let err = check(&other).unwrap_err();
        assert!(
            err.to_string().contains("do not include \"meshd\""),
            "{err}"
        );
        let unbound = jwt(
            serde_json::json!({ "aud": ["meshd"], "exp": now_secs() + 600, "kubernetes.io": { "namespace": "shop" } }),
        );
        assert_eq!(check(&unbound), Err(TokenError::NotPodBound));
    }

    #[test]
    fn no_message_repeats_the_token() {
        let token = jwt(serde_json::json!({ "aud": ["x"], "exp": now_secs() + 600 }));
        let err = check(&token).unwrap_err().to_string();
        assert!(
            !err.contains(&token) && !err.contains(token.split('.').nth(1).unwrap()),
            "{err}"
        );
    }
}
