//! Opening a model for a node: resolve (and fetch) the file, read its
//! tokenizer and chat template, and load the layers this node holds,
//! fetching their bytes first when the file is a Hub model held in part.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use kernels::{Device, LayerRange, ModelFile, Shard};

use crate::cli::RuntimeConfig;
use crate::hub::{self, FetchProgress, HubClient, HubFiles, HubModel};
use crate::model_store::{Downloads, StoreError};
use crate::prompt::PromptBuilder;

/// A model file opened (header, tokenizer, chat template), no layers yet.
pub struct OpenedModel {
    /// The id API clients use.
    pub name: String,
    pub file: ModelFile,
    pub prompt: PromptBuilder,
    /// For a Hub model: its files, which fetch the bytes of the layers a
    /// shard needs before it loads, and which peers may fetch from.
    pub hub_files: Option<Arc<HubFiles>>,
}

/// Where a model's file is.
struct Located {
    name: String,
    /// The file, or the parts of a split Hub model in order. (A local split
    /// model is named by its first part, which finds the others.)
    paths: Vec<PathBuf>,
    hub_files: Option<Arc<HubFiles>>,
}

/// Finds `model`: a GGUF path, a catalogue name (fetched when missing), or
/// a Hugging Face repository `ORG/REPO[:QUANT][@REVISION]`, of which only
/// the header is fetched here (from the Hub, else from `peers`).
async fn locate(runtime: &RuntimeConfig, model: &str, peers: &[String]) -> anyhow::Result<Located> {
    let unknown = match runtime.store.resolve_or_fetch(model).await {
        Ok(resolved) => {
            return Ok(Located {
                name: resolved.name,
                paths: vec![resolved.path],
                hub_files: None,
            });
        }
        Err(error @ StoreError::UnknownModel { .. }) => error,
        Err(error) => return Err(error.into()),
    };
    let looks_like_a_path = model.ends_with(".gguf") || model.starts_with(['/', '.', '~']);
    let hub_model = match HubModel::parse(model) {
        Ok(hub_model) if !looks_like_a_path => hub_model,
        _ if looks_like_a_path => anyhow::bail!("{model}: no such model file"),
        _ => return Err(unknown.into()),
    };
    let client = HubClient::new(runtime.hub.clone())?;
    let file = hub::open(&client, &hub_model, peers).await?;
    Ok(Located {
        name: file.name,
        paths: file.paths,
        hub_files: Some(file.files),
    })
}

impl OpenedModel {
    /// Resolves and opens a model; reads no weights (and, for a Hub model
    /// not in the cache, downloads only the header).
    pub async fn open(runtime: &RuntimeConfig, model: &str) -> anyhow::Result<Self> {
        Self::open_with_peers(runtime, model, &[]).await
    }

    /// Like [`open`](Self::open); a Hub model's header comes from `peers`
    /// (HOST:PORT) when the Hub cannot be reached.
    pub async fn open_with_peers(
        runtime: &RuntimeConfig,
        model: &str,
        peers: &[String],
    ) -> anyhow::Result<Self> {
        let Located {
            name,
            paths,
            hub_files,
        } = locate(runtime, model, peers).await?;
        tokio::task::spawn_blocking(move || {
            let file = match paths.as_slice() {
                [path] => ModelFile::open(path)?,
                parts => ModelFile::open_parts(parts)?,
            };
            let tokenizer = Arc::new(file.tokenizer()?);
            let template = file.chat_template(&tokenizer)?;
            let prompt = PromptBuilder::new(tokenizer, template, file.config().context_length);
            Ok::<_, anyhow::Error>(Self {
                name,
                file,
                prompt,
                hub_files,
            })
        })
        .await
        .context("the model opening task failed")?
        .with_context(|| format!("cannot open model `{model}`"))
    }
}

/// A model file opened and its shard loaded.
pub struct LoadedModel {
    /// The id API clients use.
    pub name: String,
    pub file: ModelFile,
    pub prompt: PromptBuilder,
    pub shard: Shard,
}

impl LoadedModel {
    /// Loads the whole model (every layer) for a single node.
    pub async fn load_whole(runtime: &RuntimeConfig, model: &str) -> anyhow::Result<Self> {
        let OpenedModel {
            name,
            file,
            prompt,
            hub_files,
        } = OpenedModel::open(runtime, model).await?;
        let range = LayerRange::new(0, file.config().n_layers);
        if let Some(files) = hub_files {
            fetch_slice(&files, &file, range, &name, &Downloads::default(), &[]).await?;
        }
        let device = runtime.device.clone();
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let shard = file.load_shard(range, &device)?;
            tracing::info!(
                model = %name,
                title = file.display_name().unwrap_or("unnamed"),
                layers = %range,
                weight_mib = format!("{:.1}", shard.weight_bytes() as f64 / (1 << 20) as f64),
                device = ?device,
                load_ms = started.elapsed().as_millis() as u64,
                "model loaded"
            );
            Ok::<_, anyhow::Error>(Self {
                name,
                file,
                prompt,
                shard,
            })
        })
        .await
        .context("the model loading task failed")?
        .with_context(|| format!("cannot load model `{model}`"))
    }
}

/// Fetches the bytes of the layers `range` of a Hub model held in part,
/// with a progress bar, reporting progress to `downloads` under `name`.
pub async fn fetch_slice(
    files: &HubFiles,
    file: &ModelFile,
    range: LayerRange,
    name: &str,
    downloads: &Downloads,
    peers: &[String],
) -> anyhow::Result<()> {
    if files.is_complete() {
        return Ok(());
    }
    let ranges = file.shard_byte_ranges(range)?;
    let progress = FetchProgress::new(format!("{name} layers {range}"), |done, total| {
        downloads.running(name, done, total)
    });
    let started = Instant::now();
    let fetched = files
        .ensure(&ranges, peers, &|done, total| progress.update(done, total))
        .await;
    drop(progress);
    downloads.ended(
        name,
        fetched.as_ref().map(|_| ()).map_err(ToString::to_string),
    );
    let fetched = fetched.with_context(|| format!("cannot fetch layers {range} of {name}"))?;
    tracing::info!(
        layers = %range,
        wanted_mib = format!("{:.1}", fetched.wanted as f64 / (1 << 20) as f64),
        on_disk_mib = format!("{:.1}", fetched.on_disk as f64 / (1 << 20) as f64),
        downloaded_bytes = fetched.downloaded,
                ms = started.elapsed().as_millis() as u64,
        "this node's slice of the model is on disk"
    );
    Ok(())
}

/// What fetching a plan's slice of a Hub model needs.
pub struct SliceFetch {
    pub files: Arc<HubFiles>,
    /// The model's name, under which progress is reported.
    pub name: String,
    pub downloads: Downloads,
    /// The cluster's other nodes (HOST:PORT), asked first.
    pub peers: Vec<String>,
}

/// Loads the layers `range` for a plan: fetches their bytes first when the
/// file is held in part, then reads them on a blocking thread.
pub async fn load_layers(
    file: Arc<ModelFile>,
    range: LayerRange,
    device: Device,
    fetch: Option<SliceFetch>,
) -> Result<Shard, String> {
    if let Some(fetch) = fetch {
        let SliceFetch {
            files,
            name,
            downloads,
            peers,
        } = fetch;
        fetch_slice(&files, &file, range, &name, &downloads, &peers)
            .await
            .map_err(|error| format!("{error:#}"))?;
    }
    tokio::task::spawn_blocking(move || file.load_shard(range, &device).map_err(|e| e.to_string()))
        .await
        .map_err(|error| format!("the loading task failed: {error}"))?
}
