//! The Qwen 3 architecture (dense models): llama's pre-norm layer with an
//! RMS norm over each head of the queries and keys before RoPE, NEOX RoPE,
//! and no biases.
//!
//! - Paper: Yang et al., "Qwen3 Technical Report",
//!   <https://arxiv.org/abs/2505.09388>.
//! - Reference implementation: llama.cpp (`src/models/qwen3.cpp`).
//!
//! Shapes: Q `[n, H, d]` and K `[n, KV, d]` are normed over `d` with
//! weights `[d]`; the head dimension comes from `qwen3.attention.key_length`
//! (128 in every Qwen 3, whatever `hidden / H` is).

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;

use super::llama::PreNormBlock;
use crate::architecture::{Architecture, Layer};
use crate::blocks::AttentionOptions;
use crate::config::{ModelConfig, RopeStyle};
use crate::error::Result;
use crate::weights::Weights;

/// The Qwen 3 architecture.
#[derive(Debug)]
pub(crate) struct Qwen3;

const OPTIONS: AttentionOptions = AttentionOptions {
    qkv_bias: false,
    qk_norm: true,
    rope_table: 0,
    window: None,
    query_scale: None,
};

impl Architecture for Qwen3 {
    fn names(&self) -> &'static [&'static str] {
        &["qwen3"]
    }

    fn config(
        &self,
        metadata: &HashMap<String, Value>,
        architecture: String,
    ) -> Result<ModelConfig> {
        let mut config = ModelConfig::from_metadata(metadata, architecture)?;
        config.rope_style = RopeStyle::Halves;
        Ok(config)
    }

    fn layer_tensors(&self, layer: usize) -> Vec<String> {
        PreNormBlock::tensors(layer, OPTIONS)
    }

    fn load_layer(
        &self,
        weights: &mut Weights<'_>,
        layer: usize,
        config: &ModelConfig,
    ) -> Result<Box<dyn Layer>> {
        PreNormBlock::load(weights, layer, config, OPTIONS)
    }
}
