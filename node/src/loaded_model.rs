//! Opening a model for a node: resolve (and fetch) the file, read its
//! tokenizer and chat template, and load the layers this node holds.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use kernels::{LayerRange, ModelFile, Shard};

use crate::cli::RuntimeConfig;
use crate::prompt::PromptBuilder;

/// A model file opened (header, tokenizer, chat template), no layers yet.
pub struct OpenedModel {
    /// The id API clients use.
    pub name: String,
    pub file: ModelFile,
    pub prompt: PromptBuilder,
}

impl OpenedModel {
    /// Resolves (fetching if needed) and opens a model; reads no weights.
    pub async fn open(runtime: &RuntimeConfig, model: &str) -> anyhow::Result<Self> {
        let resolved = runtime.store.resolve_or_fetch(model).await?;
        let name = resolved.name.clone();
        tokio::task::spawn_blocking(move || {
            let file = ModelFile::open(&resolved.path)?;
            let tokenizer = Arc::new(file.tokenizer()?);
            let template = file.chat_template(&tokenizer)?;
            let prompt = PromptBuilder::new(tokenizer, template, file.config().context_length);
            Ok::<_, anyhow::Error>(Self { name, file, prompt })
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
        let OpenedModel { name, file, prompt } = OpenedModel::open(runtime, model).await?;
        let device = runtime.device.clone();
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let range = LayerRange::new(0, file.config().n_layers);
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
