//! The llama architecture: pre-norm residual layers of grouped-query
//! attention and a SwiGLU MLP, RoPE on adjacent pairs.
//!
//! - Paper: Touvron et al., "LLaMA: Open and Efficient Foundation Language
//!   Models", <https://arxiv.org/abs/2302.13971>; grouped-query attention from
//!   Ainslie et al., <https://arxiv.org/abs/2305.13245>.
//! - Reference implementations: llama.cpp (`src/models/llama.cpp`) and
//!   candle-transformers (`models/quantized_llama.rs`). Unlike the latter,
//!   a shard loads only the layers it is given and passes hidden states in
//!   and out (see `shard`).
//!
//! Covers Llama 2/3, Mistral and SmolLM2 GGUF files (`general.architecture`
//! = `llama` or `mistral`), with every quantized type Candle reads. What is
//! llama's own is here: which files it runs, its layer's tensors, and how
//! a layer wires the shared blocks (`blocks`). Qwen 2 and Qwen 3 wire their
//! layers the same way with other attention options, so they are
//! [`PreNormFamily`] values too.
//!
//! Shapes are written `[rows, cols]`; `n` is the number of new tokens in a
//! forward call.

use std::collections::HashMap;

use candle_core::Tensor;
use candle_core::quantized::gguf_file::Value;

use crate::architecture::{Architecture, Layer};
use crate::blocks::{Attention, AttentionOptions, Gate, Mlp, Step, add, rms_norm};
use crate::config::{ModelConfig, RopeStyle};
use crate::error::Result;
use crate::kv_cache::LayerCache;
use crate::tensor_names::{ATTN_NORM, FFN_NORM, in_layer};
use crate::weights::Weights;

/// A family whose layers are llama's [`PreNormBlock`]: llama itself, and
/// (in their own files) Qwen 2 and Qwen 3 with other attention options
/// and NEOX RoPE.
#[derive(Debug)]
pub(super) struct PreNormFamily {
    /// The `general.architecture` values it runs.
    pub(super) names: &'static [&'static str],
    /// Which dimensions its RoPE rotates together.
    pub(super) rope_style: RopeStyle,
    /// What its attention adds to llama's.
    pub(super) options: AttentionOptions,
}

/// The llama architecture (and Mistral, whose GGUF layout and maths are
/// llama's).
pub(super) static LLAMA: PreNormFamily = PreNormFamily {
    names: &["llama", "mistral"],
    rope_style: RopeStyle::Pairs,
    options: AttentionOptions {
        qkv_bias: false,
        qk_norm: false,
        rope_table: 0,
        window: None,
        query_scale: None,
    },
};

impl Architecture for PreNormFamily {
    fn names(&self) -> &'static [&'static str] {
        self.names
    }

    /// The shared hyper-parameters, with the family's RoPE style.
    fn config(
        &self,
        metadata: &HashMap<String, Value>,
        architecture: String,
    ) -> Result<ModelConfig> {
        let mut config = ModelConfig::from_metadata(metadata, architecture)?;
        config.rope_style = self.rope_style;
        Ok(config)
    }

    fn layer_tensors(&self, layer: usize) -> Vec<String> {
        PreNormBlock::tensors(layer, self.options)
    }

    fn load_layer(
        &self,
        weights: &mut Weights<'_>,
        layer: usize,
        config: &ModelConfig,
    ) -> Result<Box<dyn Layer>> {
        PreNormBlock::load(weights, layer, config, self.options)
    }
}

/// One transformer layer: pre-norm attention and a SwiGLU MLP, each added
/// back to the residual stream.
struct PreNormBlock {
    attn_norm: Tensor, // [hidden]
    attention: Attention,
    ffn_norm: Tensor, // [hidden]
    mlp: Mlp,
}

impl PreNormBlock {
    /// Reads layer `layer` with attention `options`.
    fn load(
        weights: &mut Weights<'_>,
        layer: usize,
        config: &ModelConfig,
        options: AttentionOptions,
    ) -> Result<Box<dyn Layer>> {
        let hidden = config.hidden_size;
        Ok(Box::new(Self {
            attn_norm: weights.vector(&in_layer(layer, ATTN_NORM), hidden)?,
            attention: Attention::load(weights, layer, config, options)?,
            ffn_norm: weights.vector(&in_layer(layer, FFN_NORM), hidden)?,
            mlp: Mlp::load(weights, layer, config, Gate::Silu)?,
        }))
    }

    /// The GGUF names of the tensors of layer `layer` (nine for llama).
    fn tensors(layer: usize, options: AttentionOptions) -> Vec<String> {
        let mut names = vec![in_layer(layer, ATTN_NORM), in_layer(layer, FFN_NORM)];
        names.extend(Attention::tensors(layer, options));
        names.extend(Mlp::tensors(layer));
        names
    }
}

impl Layer for PreNormBlock {
    /// `x`: `[n, hidden]` → `[n, hidden]`.
    fn forward(
        &self,
        x: &Tensor,
        step: &Step<'_>,
        caches: &mut [&mut LayerCache],
    ) -> Result<Tensor> {
        let eps = step.config.rms_norm_eps;
        let h = rms_norm(x, &self.attn_norm, eps)?;
        let attn = self.attention.forward(&h, step, caches)?;
        let x = add(x, &attn)?;
        let h = rms_norm(&x, &self.ffn_norm, eps)?;
        let mlp = self.mlp.forward(&h, step.sequence_rows)?;
        add(&x, &mlp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_names_are_gguf_names() {
        let names = PreNormBlock::tensors(7, AttentionOptions::default());
        assert_eq!(names.len(), 9);
        assert!(names.contains(&"blk.7.attn_q.weight".to_string()));
        assert!(names.contains(&"blk.7.ffn_down.weight".to_string()));
    }
}
