//! `/v1/cluster/policy`: see the scheduling policy, upload a new one, or go
//! back to the built-in one. Changes need the node's admin token.

use axum::Json;
use axum::body::{Body, to_bytes};
use axum::extract::State;
use axum::http::HeaderMap;

use super::admin::{self, Admin};
use super::{ApiError, AppState};
use crate::cluster::PolicyStatus;
use crate::limits::MAX_POLICY_BYTES;
use crate::policy::PolicyError;

/// The policy this node runs (the same on every node once a change has
/// reached them all).
pub async fn get_policy(State(state): State<AppState>) -> Result<Json<PolicyStatus>, ApiError> {
    let cluster = state.cluster("/v1/cluster/policy")?;
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
) -> Result<Json<PolicyStatus>, ApiError> {
    let cluster = state.cluster("/v1/cluster/policy")?;
    admin::check(&state, &headers, Admin::Policy)?;
    // Read one byte past the limit, so that a too-large upload is told
    // its limit rather than cut off.
    let bytes = to_bytes(body, MAX_POLICY_BYTES + 1)
        .await
        .map_err(|error| {
            let too_large = std::error::Error::source(&error)
                .is_some_and(|e| e.to_string().contains("length limit"));
            if too_large {
                ApiError::from(PolicyError::TooLarge {
                    bytes: MAX_POLICY_BYTES + 1,
                })
            } else {
                ApiError::invalid_request(format!("Cannot read the uploaded policy: {error}"))
            }
        })?;
    if bytes.is_empty() {
        return Err(ApiError::invalid_request(
            "The body is empty: send the policy's .wasm file as the request body, e.g. \
             `curl -T policy.wasm -H 'Authorization: Bearer <token>' http://<node>/v1/cluster/policy`.",
        ));
    }
    tracing::info!(size_bytes = bytes.len(), "policy upload received");
    Ok(Json(cluster.set_policy(Some(bytes.to_vec())).await?))
}

/// Goes back to the built-in policy.
pub async fn delete_policy(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<PolicyStatus>, ApiError> {
    let cluster = state.cluster("/v1/cluster/policy")?;
    admin::check(&state, &headers, Admin::Policy)?;
    Ok(Json(cluster.set_policy(None).await?))
}
