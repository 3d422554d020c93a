//! `POST /inject`: Pods being created get meshd's sidecar.

use axum::response::Response;
use kube::core::admission::{AdmissionResponse, Operation};

use super::review;
use crate::inject::{self, InjectConfig, Outcome};
use crate::logging::Escaped;

pub const PATH: &str = "/inject";

pub fn handle(config: &InjectConfig, body: &[u8]) -> Response {
    let request = match review::request(body) {
        Ok(r) => r,
        Err(reason) => return review::invalid(PATH, &reason),
    };
    let allowed = AdmissionResponse::from(&request);
    let is_pod = request.kind.group.is_empty()
        && request.kind.version == "v1"
        && request.kind.kind == "Pod"
        && request.sub_resource.as_deref().unwrap_or("").is_empty();
    let (true, Operation::Create, Some(object)) = (is_pod, &request.operation, &request.object)
    else {
        return review::answer(PATH, "unchanged", allowed);
    };
    let (namespace, name) = review::object_name(&request, object);
    let value = match serde_json::to_value(object) {
        Ok(v) => v,
        Err(e) => {
            return review::answer(
                PATH,
                "denied",
                allowed.deny(format!("cannot read the pod: {e}")),
            );
        }
    };
    match inject::patch(&value, &namespace, config) {
        Ok((Outcome::Injected, patch)) => match allowed.clone().with_patch(patch) {
            Ok(response) => {
                tracing::debug!(pod = %Escaped(&format!("{namespace}/{name}")), "injected");
                review::answer(PATH, "injected", response)
            }
            Err(e) => review::answer(
                PATH,
                "denied",
                allowed.deny(format!("cannot encode the patch: {e}")),
            ),
        },
        Ok((Outcome::LeftAlone(reason), _)) => {
            tracing::debug!(pod = %Escaped(&format!("{namespace}/{name}")), "not injected: {}", reason.reason());
            review::answer(PATH, "unchanged", allowed)
        }
        Err(e) => {
            let message = format!("meshd cannot inject pod {namespace}/{name}: {e}");
            tracing::info!("{}", Escaped(&message));
            review::answer(PATH, "denied", allowed.deny(message))
        }
    }
}
