//! `/v1/cluster/models`: the models the cluster knows, and fetching a
//! catalogue model onto every node that lacks it.

use api_types::{DownloadStarted, KnownModel, KnownModels, SwitchModel, SwitchStarted};
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};

use super::admin::{self, Admin};
use super::{ApiError, AppState};
use crate::hub::{HubConfig, HubModel, quant_of};
use crate::limits::MAX_MODEL_NAME_BYTES;
use crate::model_store::{CATALOGUE, catalogue_entry};

/// The models ringlet can fetch by name, the one served, and those nodes
/// report opening for a switch (or failing to). Which nodes have them is
/// in `GET /v1/cluster` (`nodes[].models`).
pub(super) async fn known_models(State(state): State<AppState>) -> Json<KnownModels> {
    let served = &state.model.get().name;
    let is_hub = |name: &str| HubModel::parse(name).is_ok() && !std::path::Path::new(name).exists();
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
        let description = if is_hub(served) {
            "from Hugging Face; each node holds only its layers"
        } else {
            "a GGUF file given by its path"
        };
        models.push(KnownModel {
            id: served.clone(),
            description: description.into(),
            size_bytes: None,
            served: true,
            downloadable: false,
        });
    }
    // Hub models in this node's Hugging Face cache, whole.
    for name in hub_cache_models(&HubConfig::from_env().cache_dir) {
        if models.iter().all(|m| m.id != name) {
            models.push(KnownModel {
                id: name,
                description: "from Hugging Face, in this node's cache".into(),
                size_bytes: None,
                served: false,
                downloadable: false,
            });
        }
    }
    let reported = state
        .cluster
        .iter()
        .flat_map(|cluster| cluster.view().nodes);
    for availability in reported.flat_map(|node| node.models) {
        if models.iter().all(|m| m.id != availability.name) {
            models.push(KnownModel {
                description: if is_hub(&availability.name) {
                    "from Hugging Face, asked for by a switch".into()
                } else {
                    "asked for by a switch".into()
                },
                id: availability.name,
                size_bytes: None,
                served: false,
                downloadable: false,
            });
        }
    }
    Json(KnownModels { models })
}

/// The GGUF models whole in a Hugging Face cache, named as `ORG/REPO:QUANT`
/// (the first part of a split one), from each repository's snapshots.
fn hub_cache_models(cache_dir: &std::path::Path) -> Vec<String> {
    let Ok(repos) = std::fs::read_dir(cache_dir) else {
        return Vec::new();
    };
    let mut names = Vec::new();
    for repo in repos.filter_map(Result::ok) {
        let folder = repo.file_name().to_string_lossy().into_owned();
        let Some((org, name)) = folder
            .strip_prefix("models--")
            .and_then(|id| id.split_once("--"))
        else {
            continue;
        };
        let Ok(snapshots) = std::fs::read_dir(repo.path().join("snapshots")) else {
            continue;
        };
        let files = snapshots
            .filter_map(Result::ok)
            .filter_map(|snapshot| std::fs::read_dir(snapshot.path()).ok())
            .flat_map(|files| files.filter_map(Result::ok));
        for file in files {
            let file_name = file.file_name().to_string_lossy().into_owned();
            // A link whose blob is there; a split model by its first part.
            let whole = file.path().is_file();
            let first = !file_name.contains("-of-") || file_name.contains("-00001-of-");
            if whole && first && file_name.ends_with(".gguf") {
                names.push(match quant_of(&file_name) {
                    Some(quant) => format!("{org}/{name}:{quant}"),
                    None => format!("{org}/{name}"),
                });
            }
        }
    }
    names.sort();
    names.dedup();
    names
}

/// `POST /v1/cluster/models` with `{"model": NAME}`: every node opens
/// the model (a Hub model's header only) and serves it from then on, and
/// the cluster re-plans; running requests fail with the reason. The
/// progress and any node's failure show in `GET /v1/cluster`; a node that
/// cannot open the model keeps serving the old one. Needs the admin token.
pub(super) async fn switch_model(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<SwitchStarted>), ApiError> {
    let cluster = state.cluster("/v1/cluster/models")?;
    admin::check(&state, &headers, Admin::Switch)?;
    let SwitchModel { model } = super::chat::parse_json(&body?)?;
    let model = model.trim().to_string();
    if model.is_empty() || model.len() > MAX_MODEL_NAME_BYTES {
        return Err(ApiError::invalid_param(
            "model",
            format!(
                "`model` must be 1 to {MAX_MODEL_NAME_BYTES} bytes: a catalogue name, a GGUF path or ORG/REPO[:QUANT]."
            ),
        ));
    }
    if model == state.model.get().name {
        let message = format!("The cluster serves {model} already.");
        let nodes = Vec::new();
        return Ok((
            StatusCode::OK,
            Json(SwitchStarted {
                message,
                model,
                nodes,
            }),
        ));
    }
    let nodes = cluster
        .switch_model(model.clone())
        .await
        .ok_or_else(|| ApiError::internal("the node is stopping; nothing was switched"))?;
    let message = format!(
        "Switching {} to {model}; GET /v1/cluster shows each node's progress, and GET /v1/models the model served.",
        nodes.join(", ")
    );
    Ok((
        StatusCode::ACCEPTED,
        Json(SwitchStarted {
            message,
            model,
            nodes,
        }),
    ))
}

/// `POST /v1/cluster/models/{name}/download`: every node that lacks the
/// catalogue model fetches it in the background (202, naming them); the
/// progress shows in `GET /v1/cluster`. Needs the admin token.
pub(super) async fn download_model(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<(StatusCode, Json<DownloadStarted>), ApiError> {
    let cluster = state.cluster("/v1/cluster/models")?;
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the report

    use super::hub_cache_models;

    #[test]
    fn whole_gguf_files_in_the_hugging_face_cache_are_listed_by_name() {
        let cache = std::env::temp_dir().join(format!("ringlet-hub-cache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&cache);
        let snapshot = |repo: &str| {
            let dir = cache.join(repo).join("snapshots").join("abc");
            std::fs::create_dir_all(&dir).expect("snapshot folder");
            dir
        };
        let one = snapshot("models--org--repo");
        std::fs::write(one.join("repo-Q4_K_M.gguf"), b"x").expect("file");
        std::fs::write(one.join("README.md"), b"x").expect("file");
        // A link whose blob is missing is not a whole file.
        std::os::unix::fs::symlink("../../blobs/gone", one.join("repo-Q8_0.gguf")).expect("link");
        let split = snapshot("models--org--split");
        std::fs::write(split.join("split-Q8_0-00001-of-00002.gguf"), b"x").expect("file");
        std::fs::write(split.join("split-Q8_0-00002-of-00002.gguf"), b"x").expect("file");
        snapshot("datasets--org--data");
        let listed = hub_cache_models(&cache);
        let _ = std::fs::remove_dir_all(&cache);
        assert_eq!(listed, ["org/repo:Q4_K_M", "org/split:Q8_0"]);
    }
}
