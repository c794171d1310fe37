//! The seam between the shared machinery and a model family.
//!
//! Everything that is the same for every decoder-only architecture lives
//! outside `models`: the GGUF reader (`gguf`), the hyper-parameters
//! (`config`), the shard with its KV caches, embedding and head (`shard`),
//! and the blocks layers are built from (`blocks`). A model family adds
//! one file in `models/` that implements [`Architecture`] (which
//! `general.architecture` values it runs, its configuration checks, its
//! layer's tensors) and [`Layer`] (how its blocks are wired), and one line
//! in `models::ARCHITECTURES`.

use std::collections::HashMap;
use std::fmt;

use candle_core::Tensor;
use candle_core::quantized::gguf_file::Value;

use crate::blocks::Step;
use crate::config::{ModelConfig, RopeFrequencies};
use crate::error::Result;
use crate::kv_cache::LayerCache;
use crate::weights::Weights;

/// A model family: how its files are read into layers.
pub(crate) trait Architecture: fmt::Debug + Sync {
    /// The `general.architecture` values this implementation runs.
    fn names(&self) -> &'static [&'static str];

    /// The model's hyper-parameters from its metadata, checked against
    /// what this implementation handles. `architecture` is the file's
    /// `general.architecture`, one of [`names`](Self::names).
    fn config(
        &self,
        metadata: &HashMap<String, Value>,
        architecture: String,
    ) -> Result<ModelConfig>;

    /// The GGUF names of the tensors of layer `layer`: what the directory
    /// check requires and what a layer's bytes are counted from.
    fn layer_tensors(&self, layer: usize) -> Vec<String>;

    /// The RoPE frequency bases the layers use, each of which gets a table
    /// per forward step; a layer's attention picks one by index
    /// (`AttentionOptions::rope_table`). Most families have one base.
    fn rope_bases(&self, config: &ModelConfig) -> Vec<RopeFrequencies> {
        vec![config.rope()]
    }

    /// What the token embeddings are multiplied by before the first layer
    /// (Gemma: `√hidden`), if anything.
    fn embedding_scale(&self, _config: &ModelConfig) -> Option<f32> {
        None
    }

    /// The family's chat template, for files that carry none in
    /// `tokenizer.chat_template` (ChatML is used when this is `None` too).
    fn default_chat_template(&self) -> Option<&'static str> {
        None
    }

    /// Reads layer `layer`.
    fn load_layer(
        &self,
        weights: &mut Weights<'_>,
        layer: usize,
        config: &ModelConfig,
    ) -> Result<Box<dyn Layer>>;
}

/// One transformer layer of some architecture.
pub(crate) trait Layer: Send + Sync {
    /// `x`: `[n, hidden]` → `[n, hidden]`, the rows of the step's
    /// sequences (see [`Step`]), appending the keys and values of each
    /// sequence's new positions to its cache of this layer, `caches[i]`
    /// for the `i`-th.
    fn forward(
        &self,
        x: &Tensor,
        step: &Step<'_>,
        caches: &mut [&mut LayerCache],
    ) -> Result<Tensor>;
}
