//! The node's HTTP API: OpenAI-compatible endpoints under `/v1` and a
//! health check. Its JSON types are `api_types`'s, shared with the
//! dashboard. Handlers return `Result<_, ApiError>`; every error leaves in
//! OpenAI's JSON shape, and every request has an id (`request_id.rs`).

mod access;
mod admin;
pub mod chat;
mod cluster;
mod completions;
mod dashboard;
pub mod error;
mod files;
mod membership;
mod metrics;
mod models;
mod policy;
mod request_id;

use std::sync::Arc;

use api_types::{ModelCard, ModelList, Object};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{StatusCode, Uri};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde_json::json;

use crate::cluster::ClusterHandle;
use crate::current::Current;
use crate::engine::EngineHandle;
use crate::hub::HubFiles;
use crate::limits::MAX_REQUEST_BODY_BYTES;
use crate::prompt::PromptBuilder;
use crate::stopping::Stopping;
pub use access::ApiAccess;
pub use admin::Admin;
pub use error::ApiError;

/// The model a node serves, with what the API needs to talk about it.
#[derive(Debug)]
pub struct ServedModel {
    /// The id clients pass as `model`.
    pub name: String,
    pub prompt: PromptBuilder,
    /// Unix time the model was loaded.
    pub created: u64,
    /// Changes when the model file or the ringlet version changes.
    pub system_fingerprint: String,
}

#[derive(Clone, Debug)]
pub struct AppState {
    pub engine: EngineHandle,
    /// The model served now; a switch replaces it.
    pub model: Current<ServedModel>,
    /// The cluster this node is part of; `None` when the engine runs its
    /// own local stage (in-process tests).
    pub cluster: Option<ClusterHandle>,
    /// The files of the Hub model served, which peers may fetch from; a
    /// switch replaces them.
    pub hub_files: Current<Option<Arc<HubFiles>>>,
    /// The secret that policy changes must carry; `None` refuses them.
    pub admin_token: Option<AdminToken>,
    /// The API keys, and who gets in without one.
    pub access: ApiAccess,
    /// What peers' requests for model files must carry; `None` outside a
    /// cluster.
    pub peer_pass: Option<crate::identity::PeerPass>,
    /// Set when the node begins to stop.
    pub stopping: Stopping,
}

impl AppState {
    /// The cluster, for a route only a node in one serves (`path` names
    /// the route in the 404 of an in-process engine).
    pub(crate) fn cluster(&self, path: &str) -> Result<&ClusterHandle, ApiError> {
        self.cluster
            .as_ref()
            .ok_or_else(|| ApiError::NoRoute { path: path.into() })
    }
}

/// The admin token; its `Debug` does not show it.
#[derive(Clone)]
pub struct AdminToken(Arc<str>);

impl AdminToken {
    /// `None` for an empty token, which would protect nothing.
    pub fn new(token: &str) -> Option<Self> {
        (!token.is_empty()).then(|| Self(Arc::from(token)))
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(<hidden>)")
    }
}

pub fn router(state: AppState) -> Router {
    let routes = Router::new()
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/completions", post(completions::completions))
        .route("/metrics", get(metrics::metrics))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .route("/v1/cluster", get(cluster::cluster_view))
        .route("/v1/cluster/events", get(cluster::cluster_events))
        .route(
            "/v1/cluster/models",
            get(models::known_models).post(models::switch_model),
        )
        .route(
            "/v1/cluster/models/{name}/download",
            post(models::download_model),
        )
        .route(
            "/v1/cluster/policy",
            get(policy::get_policy)
                .delete(policy::delete_policy)
                // The handler reads the body itself, with the policy limit.
                .merge(put(policy::put_policy).layer(DefaultBodyLimit::disable())),
        )
        .route("/v1/cluster/invite", get(membership::invite))
        .route(
            "/v1/cluster/nodes/{id}",
            axum::routing::delete(membership::remove_node),
        )
        .route("/v1/cluster/secret/rotate", post(membership::rotate_secret))
        .route("/v1/ring/link", get(cluster::ring_link))
        .route("/v1/ring/model", get(files::served_model))
        .route("/v1/ring/files/{etag}", get(files::file_range))
        .route("/v1/ring/files/{etag}/held", get(files::held_ranges))
        .merge(dashboard::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_REQUEST_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            access::require_key,
        ))
        .layer(axum::middleware::from_fn(metrics::count_requests));
    request_id::layers(routes).with_state(state)
}

fn model_card(model: &ServedModel) -> ModelCard {
    ModelCard {
        id: model.name.clone(),
        object: Object::Model,
        created: model.created,
        owned_by: "ringlet".into(),
    }
}

async fn list_models(State(state): State<AppState>) -> Json<ModelList> {
    Json(ModelList {
        object: Object::List,
        data: vec![model_card(&state.model.get())],
    })
}

async fn get_model(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<ModelCard>, ApiError> {
    chat::served_model(&state, &id).map(|model| Json(model_card(&model)))
}

/// Readiness: 200 once this node can serve a chat (its cluster has an
/// active plan), 503 with the reason before (the plan still loading, no
/// plan), once its engine has stopped, and once its own stage was lost (its
/// thread died or stopped making progress), as llama.cpp's server answers
/// while it loads; a script that waits for 200 gets no 503 on its first
/// request.
async fn healthz(State(state): State<AppState>) -> (StatusCode, Json<serde_json::Value>) {
    let stats = state.engine.stats().borrow().clone();
    let model = state.model.get().name.clone();
    let not_ready = if !state.engine.is_running() {
        Some((
            "stopped",
            "the inference engine stopped; restart the node".to_string(),
        ))
    } else {
        state.cluster.as_ref().and_then(|cluster| {
            let view = cluster.view();
            if let Some(error) = &view.stage_error {
                return Some((
                    "stage_lost",
                    format!("this node's stage was lost ({error}); it serves no layers until it is restarted"),
                ));
            }
            view.active_plan()
                .is_none()
                .then(|| ("loading", view.not_ready_reason()))
        })
    };
    match not_ready {
        None => (
            StatusCode::OK,
            Json(json!({ "status": "ok", "model": model, "engine": stats })),
        ),
        Some((word, reason)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": word, "reason": reason, "model": model, "engine": stats })),
        ),
    }
}

/// Liveness: 200 while the process runs and answers, whatever its plan.
async fn livez() -> Json<serde_json::Value> {
    Json(json!({ "status": "alive" }))
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::NoRoute {
        path: uri.path().to_string(),
    }
}

async fn method_not_allowed(uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed {
        path: uri.path().to_string(),
    }
}
