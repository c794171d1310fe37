//! Who may join: the join token an admin hands to a new machine
//! (`GET /v1/cluster/invite`), removing a node (`DELETE
//! /v1/cluster/nodes/{id}`) and rotating the cluster secret without
//! removing one (`POST /v1/cluster/secret/rotate`). All need the admin
//! token; both changes give every remaining node a new secret, so the old
//! token admits no one.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use scheduler::NodeId;
use serde_json::{Value, json};

use super::admin::{self, Admin};
use super::{ApiError, AppState};
use crate::cluster::{ClusterHandle, Rotated};

/// The join token, and the command that uses it.
pub async fn invite(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let cluster = state.cluster("/v1/cluster/invite")?;
    admin::check(&state, &headers, Admin::Membership)?;
    let token = cluster
        .invite()
        .await
        .ok_or_else(|| ApiError::internal("the cluster actor stopped"))?;
    Ok(Json(json!({
        "token": token.to_string(),
        "command": format!("ringlet --join {token}"),
    })))
}

/// Removes a node and rotates the secret.
pub async fn remove_node(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Rotated>, ApiError> {
    let cluster = state.cluster("/v1/cluster/nodes")?;
    admin::check(&state, &headers, Admin::Membership)?;
    let node = u64::from_str_radix(id.trim(), 16).map_err(|_| {
        ApiError::invalid_request(format!(
            "`{id}` is not a node id: use the 16 hex digits GET /v1/cluster shows as a node's `id`"
        ))
    })?;
    rotate(cluster, Some(NodeId(node))).await
}

/// Rotates the secret, removing no one.
pub async fn rotate_secret(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Rotated>, ApiError> {
    let cluster = state.cluster("/v1/cluster/secret/rotate")?;
    admin::check(&state, &headers, Admin::Membership)?;
    rotate(cluster, None).await
}

async fn rotate(cluster: &ClusterHandle, node: Option<NodeId>) -> Result<Json<Rotated>, ApiError> {
    cluster
        .rotate_secret(node)
        .await
        .map(Json)
        .map_err(ApiError::invalid_request)
}
