//! `GET /admission/report`: every WorkloadPolicy with its mode, its `Accepted`
//! condition and the report on running pods, as they stand in the policies' status.
//!
//! The report is the Lease holder's ([`crate::cluster::admission_report`]), kept in
//! the status; every replica reads it from the API server, so each answers the same,
//! whichever one `meshctl` reaches. With the file source there is no status and no
//! report: the answer says so.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use kube::Api;
use kube::api::ListParams;
use serde::{Deserialize, Serialize};

use super::AdminState;
use crate::sources::crd::{PolicyReport, WorkloadPolicy};

/// One policy in `GET /admission/report`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PolicyReportEntry {
    /// `namespace/name`
    pub policy: String,
    pub mode: String,
    /// The `Accepted` condition's status (`True`, `False`); `None`: not written yet.
    #[serde(default)]
    pub accepted: Option<String>,
    /// Why not accepted.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// `None`: the Lease holder has not evaluated the pods against it yet.
    #[serde(default)]
    pub report: Option<PolicyReport>,
}

pub const NEEDS_KUBERNETES: &str = "the admission report needs --source kubernetes: the replica \
     that holds the Lease writes it into each WorkloadPolicy's status; with a config \
     directory, check manifests with `meshctl admission check` instead";

pub(super) async fn report(State(state): State<AdminState>) -> axum::response::Response {
    let Some(client) = state.kube else {
        return (StatusCode::CONFLICT, format!("{NEEDS_KUBERNETES}\n")).into_response();
    };
    let policies = match Api::<WorkloadPolicy>::all(client)
        .list(&ListParams::default())
        .await
    {
        Ok(list) => list.items,
        Err(e) => {
            return (
                StatusCode::BAD_GATEWAY,
                format!("cannot list WorkloadPolicies from the API server: {e}\n"),
            )
                .into_response();
        }
    };
    let mut entries: Vec<PolicyReportEntry> = policies.into_iter().map(entry).collect();
    entries.sort_by(|a, b| a.policy.cmp(&b.policy));
    Json(entries).into_response()
}

fn entry(p: WorkloadPolicy) -> PolicyReportEntry {
    let status = p.status.unwrap_or_default();
    let accepted = status
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Accepted");
    PolicyReportEntry {
        policy: format!(
            "{}/{}",
            p.metadata.namespace.unwrap_or_default(),
            p.metadata.name.unwrap_or_default()
        ),
        mode: p.spec.mode,
        message: accepted
            .as_ref()
            .map(|c| c.message.clone())
            .unwrap_or_default(),
        accepted: accepted.map(|c| c.status),
        report: status.report,
    }
}
