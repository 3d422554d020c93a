//! Reading an AdmissionReview and writing the answer.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};

use crate::metrics::{AdmissionLabel, metrics};

/// The request of the review in `body`, or why there is none (for [`invalid`]).
pub fn request(body: &[u8]) -> Result<AdmissionRequest<DynamicObject>, String> {
    let review: AdmissionReview<DynamicObject> =
        serde_json::from_slice(body).map_err(|e| format!("not an AdmissionReview: {e}"))?;
    if review.types.api_version != "admission.k8s.io/v1" || review.types.kind != "AdmissionReview" {
        return Err(format!(
            "apiVersion {:?}, kind {:?}: only admission.k8s.io/v1 AdmissionReview is served",
            review.types.api_version, review.types.kind
        ));
    }
    review
        .try_into()
        .map_err(|_| "the AdmissionReview has no request".to_string())
}

/// The namespace and name of the object `request` is about; `generateName*` while it
/// has no name yet.
pub fn object_name(
    request: &AdmissionRequest<DynamicObject>,
    object: &DynamicObject,
) -> (String, String) {
    let namespace = request
        .namespace
        .clone()
        .or_else(|| object.metadata.namespace.clone())
        .unwrap_or_else(|| "default".into());
    let name = object
        .metadata
        .name
        .clone()
        .or_else(|| {
            object
                .metadata
                .generate_name
                .as_ref()
                .map(|g| format!("{g}*"))
        })
        .unwrap_or_default();
    (namespace, name)
}

/// The `400` for a body that is not a review, with the reason.
pub fn invalid(webhook: &'static str, reason: &str) -> Response {
    count(webhook, "invalid");
    (StatusCode::BAD_REQUEST, format!("{reason}\n")).into_response()
}

/// The review answering with `response`, counted as `result`.
pub fn answer(
    webhook: &'static str,
    result: &'static str,
    response: AdmissionResponse,
) -> Response {
    count(webhook, result);
    axum::Json(response.into_review()).into_response()
}

fn count(webhook: &'static str, result: &'static str) {
    metrics()
        .admission_reviews
        .get_or_create(&AdmissionLabel { webhook, result })
        .inc();
}
