//! The Qwen 2 architecture (Qwen 2, Qwen 2.5, DeepSeek-R1-Distill-Qwen):
//! llama's pre-norm layer with biases on the Q, K and V projections, and
//! NEOX RoPE (halves of each head rotate together).
//!
//! - Paper: Yang et al., "Qwen2 Technical Report",
//!   <https://arxiv.org/abs/2407.10671>.
//! - Reference implementation: llama.cpp (`src/models/qwen2.cpp`): the
//!   biases are added right after each projection, before RoPE.
//!
//! Shapes: Q `[n, H*d]` + bias `[H*d]`; K and V `[n, KV*d]` + bias `[KV*d]`.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;

use super::llama::PreNormBlock;
use crate::architecture::{Architecture, Layer};
use crate::blocks::AttentionOptions;
use crate::config::{ModelConfig, RopeStyle};
use crate::error::Result;
use crate::weights::Weights;

/// The Qwen 2 architecture.
#[derive(Debug)]
pub(crate) struct Qwen2;

const OPTIONS: AttentionOptions = AttentionOptions {
    qkv_bias: true,
    qk_norm: false,
    rope_table: 0,
    window: None,
    query_scale: None,
};

impl Architecture for Qwen2 {
    fn names(&self) -> &'static [&'static str] {
        &["qwen2"]
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
