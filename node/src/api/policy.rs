//! `/v1/cluster/policy`: see the scheduling policy, upload a new one, or go
//! back to the built-in one. Changes need the node's admin token.

use axum::Json;
use axum::body::{Body, to_bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::admin::{self, Admin};
use super::{ApiError, AppState};
use crate::cluster::{ClusterHandle, PolicyStatus, SetPolicyError};
use crate::limits::MAX_POLICY_BYTES;
use crate::policy::PolicyError;

/// The policy this node runs (the same on every node once a change has
/// reached them all).
pub async fn get_policy(State(state): State<AppState>) -> Result<Json<PolicyStatus>, ApiError> {
    let cluster = cluster(&state)?;
    cluster
        .view()
        .policy
        .map(Json)
        .ok_or_else(|| ApiError::internal("the policy is not loaded yet"))
}

/// Uploads a policy component (the body is the `.wasm` file).
pub async fn put_policy(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<PolicyStatus>, Response> {
    let cluster = cluster(&state).map_err(IntoResponse::into_response)?;
    if let Some(refused) = admin::refusal(&state, &headers, Admin::Policy) {
        return Err(refused);
    }
    // Read one byte past the limit, so that a too-large upload is told
    // its limit rather than cut off.
    let bytes = to_bytes(body, MAX_POLICY_BYTES + 1)
        .await
        .map_err(|error| {
            let too_large = std::error::Error::source(&error)
                .is_some_and(|e| e.to_string().contains("length limit"));
            if too_large {
                policy_error(SetPolicyError::Refused(PolicyError::TooLarge {
                    bytes: MAX_POLICY_BYTES + 1,
                }))
            } else {
                ApiError::invalid_request(format!("Cannot read the uploaded policy: {error}"))
            }
            .into_response()
        })?;
    if bytes.is_empty() {
        return Err(ApiError::invalid_request(
            "The body is empty: send the policy's .wasm file as the request body, e.g. \
             `curl -T policy.wasm -H 'Authorization: Bearer <token>' http://<node>/v1/cluster/policy`.",
        )
        .into_response());
    }
    tracing::info!(size_bytes = bytes.len(), "policy upload received");
    cluster
        .set_policy(Some(bytes.to_vec()))
        .await
        .map(Json)
        .map_err(|e| policy_error(e).into_response())
}

/// Goes back to the built-in policy.
pub async fn delete_policy(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<PolicyStatus>, Response> {
    let cluster = cluster(&state).map_err(IntoResponse::into_response)?;
    if let Some(refused) = admin::refusal(&state, &headers, Admin::Policy) {
        return Err(refused);
    }
    cluster
        .set_policy(None)
        .await
        .map(Json)
        .map_err(|e| policy_error(e).into_response())
}

fn cluster(state: &AppState) -> Result<&ClusterHandle, ApiError> {
    state
        .cluster
        .as_ref()
        .ok_or_else(|| ApiError::not_found("/v1/cluster/policy"))
}

fn policy_error(error: SetPolicyError) -> ApiError {
    let error = match error {
        SetPolicyError::StillRunning => {
            return ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                code: Some("policy_change_pending"),
                ..ApiError::invalid_request(format!("No answer yet: {error}."))
            };
        }
        SetPolicyError::Refused(error) => error,
    };
    let status = match error {
        PolicyError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        PolicyError::Outdated => StatusCode::CONFLICT,
        PolicyError::Busy | PolicyError::Stopped => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::UNPROCESSABLE_ENTITY,
    };
    let message = match error {
        PolicyError::Outdated | PolicyError::Busy | PolicyError::Stopped => {
            format!("The policy was not changed: {error}.")
        }
        _ => format!("The policy was refused and nothing changed: {error}"),
    };
    ApiError {
        status,
        code: Some("policy_refused"),
        ..ApiError::invalid_request(message)
    }
}
