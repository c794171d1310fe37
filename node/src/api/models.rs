//! `/v1/cluster/models`: the models the cluster knows, and fetching a
//! catalogue model onto every node that lacks it.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::admin::{self, Admin};
use super::{ApiError, AppState};
use crate::model_store::{CATALOGUE, catalogue_entry};

/// A model the node knows: the catalogue's, and the one it serves.
#[derive(Debug, serde::Serialize)]
struct KnownModel {
    id: String,
    description: String,
    size_bytes: Option<u64>,
    /// The model this node (and so the cluster) serves.
    served: bool,
    /// In the catalogue, so nodes can fetch it by name.
    downloadable: bool,
}

/// The models ringlet can fetch by name, and the one served. Which nodes
/// have them is in `GET /v1/cluster` (`nodes[].models`).
pub(super) async fn known_models(State(state): State<AppState>) -> Json<serde_json::Value> {
    let served = &state.model.name;
    let mut models: Vec<KnownModel> = CATALOGUE
        .iter()
        .map(|entry| KnownModel {
            id: entry.name.to_string(),
            description: entry.description.to_string(),
            size_bytes: Some(entry.bytes),
            served: entry.name == served,
            downloadable: true,
        })
        .collect();
    if !models.iter().any(|m| m.served) {
        models.push(KnownModel {
            id: served.clone(),
            description: "a GGUF file given by its path".into(),
            size_bytes: None,
            served: true,
            downloadable: false,
        });
    }
    Json(json!({ "models": models }))
}

/// `POST /v1/cluster/models/{name}/download`: every node that lacks the
/// catalogue model fetches it in the background (202, naming them); the
/// progress shows in `GET /v1/cluster`. Needs the admin token.
pub(super) async fn download_model(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Response> {
    let cluster = state
        .cluster
        .as_ref()
        .ok_or_else(|| ApiError::not_found("/v1/cluster/models").into_response())?;
    if let Some(refused) = admin::refusal(&state, &headers, Admin::Models) {
        return Err(refused);
    }
    let entry = catalogue_entry(&name).ok_or_else(|| {
        let known: Vec<String> = CATALOGUE.iter().map(|e| e.name.to_string()).collect();
        ApiError {
            message: format!(
                "`{name}` is not in ringlet's catalogue, so nodes cannot fetch it by name; known \
                 models: {}. Copy another GGUF file to each node and start it with --model PATH.",
                known.join(", ")
            ),
            ..ApiError::model_not_found(&name, &known)
        }
        .into_response()
    })?;
    let fetching = cluster.fetch_model(entry).await.ok_or_else(|| {
        ApiError::internal("the node is stopping; nothing was fetched").into_response()
    })?;
    let status = if fetching.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    let message = if fetching.is_empty() {
        format!("Every node already has {name}.")
    } else {
        format!(
            "Fetching {name} ({} MiB) on {}; GET /v1/cluster shows the progress.",
            entry.download_bytes() >> 20,
            fetching.join(", ")
        )
    };
    Ok((
        status,
        Json(json!({ "model": name, "fetching_on": fetching, "message": message })),
    )
        .into_response())
}
