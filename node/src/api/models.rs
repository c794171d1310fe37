//! `/v1/cluster/models`: the models the cluster knows, and fetching a
//! catalogue model onto every node that lacks it.

use api_types::{DownloadStarted, KnownModel, KnownModels};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};

use super::admin::{self, Admin};
use super::{ApiError, AppState};
use crate::model_store::{CATALOGUE, catalogue_entry};

/// The models ringlet can fetch by name, and the one served. Which nodes
/// have them is in `GET /v1/cluster` (`nodes[].models`).
pub(super) async fn known_models(State(state): State<AppState>) -> Json<KnownModels> {
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
    Json(KnownModels { models })
}

/// `POST /v1/cluster/models/{name}/download`: every node that lacks the
/// catalogue model fetches it in the background (202, naming them); the
/// progress shows in `GET /v1/cluster`. Needs the admin token.
pub(super) async fn download_model(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<(StatusCode, Json<DownloadStarted>), ApiError> {
    let cluster = state.cluster.as_ref().ok_or_else(|| ApiError::NoRoute {
        path: "/v1/cluster/models".into(),
    })?;
    admin::check(&state, &headers, Admin::Models)?;
    let entry = catalogue_entry(&name).ok_or_else(|| ApiError::NotInCatalogue {
        name: name.clone(),
        known: CATALOGUE.iter().map(|e| e.name.to_string()).collect(),
    })?;
    let fetching_on = cluster
        .fetch_model(entry)
        .await
        .ok_or_else(|| ApiError::internal("the node is stopping; nothing was fetched"))?;
    let (status, message) = if fetching_on.is_empty() {
        (StatusCode::OK, format!("Every node already has {name}."))
    } else {
        let message = format!(
            "Fetching {name} ({} MiB) on {}; GET /v1/cluster shows the progress.",
            entry.download_bytes() >> 20,
            fetching_on.join(", ")
        );
        (StatusCode::ACCEPTED, message)
    };
    let started = DownloadStarted {
        fetching_on,
        message,
        model: name,
    };
    Ok((status, Json(started)))
}
