//! The hyper-parameters every decoder architecture here shares, as the
//! model's GGUF metadata states them under the `{arch}.*` keys llama.cpp
//! writes for all of them. An architecture (`models::*`) reads them with
//! [`ModelConfig::from_metadata`]; hyper-parameters of its own would live
//! in its own file. Runtime settings (threads, device, budgets) live
//! elsewhere.

use std::collections::HashMap;

use candle_core::DType;
use candle_core::quantized::gguf_file::Value;
use serde::{Deserialize, Serialize};

use crate::error::{KernelError, Result};
use crate::gguf::{get_usize, opt_f32, opt_usize};

/// One set of RoPE frequencies: `theta_i = scale * p * base^(-2i/d)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct RopeFrequencies {
    pub(crate) base: f32,
    pub(crate) scale: f32,
}

/// `1 / {arch}.rope.scaling.factor` for linear scaling (llama.cpp reads the
/// factor for every architecture), 1 without one. YaRN and the other
/// schemes change more than the positions and are refused by name.
fn rope_freq_scale(metadata: &HashMap<String, Value>, architecture: &str) -> Result<f32> {
    let kind = metadata
        .get(&format!("{architecture}.rope.scaling.type"))
        .and_then(|v| v.to_string().ok())
        .cloned();
    match kind.as_deref() {
        None | Some("none" | "linear") => {}
        Some(_) => {
            return Err(KernelError::BadMetadata {
                key: format!("{architecture}.rope.scaling.type"),
                expected: "`none` or `linear` (YaRN and other RoPE scaling are not supported yet)",
            });
        }
    }
    match opt_f32(metadata, &format!("{architecture}.rope.scaling.factor"))? {
        Some(factor) if factor > 0.0 && kind.as_deref() != Some("none") => Ok(1.0 / factor),
        _ => Ok(1.0),
    }
}

/// How RoPE pairs the dimensions of a head, as llama.cpp's `rope_type`
/// for the architecture says (it is not in the metadata).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RopeStyle {
    /// Adjacent pairs `(2i, 2i + 1)`: llama's "normal" RoPE.
    Pairs,
    /// Halves `(i, i + d/2)`: GPT-NeoX's, used by Qwen, Gemma and Phi-3.
    Halves,
}

/// Hyper-parameters of a model, as its GGUF metadata states them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// `general.architecture`.
    pub architecture: String,
    /// `{arch}.block_count`.
    pub n_layers: usize,
    /// `{arch}.embedding_length`.
    pub hidden_size: usize,
    /// `{arch}.feed_forward_length`.
    pub feed_forward_size: usize,
    /// `{arch}.attention.head_count`.
    pub n_heads: usize,
    /// `{arch}.attention.head_count_kv` (defaults to `n_heads`).
    pub n_kv_heads: usize,
    /// `{arch}.attention.key_length` (defaults to `hidden_size / n_heads`).
    pub head_dim: usize,
    /// `{arch}.rope.dimension_count` (defaults to `head_dim`).
    pub rope_dim: usize,
    /// `{arch}.rope.freq_base` (defaults to 10000).
    pub rope_freq_base: f32,
    /// Which dimensions RoPE rotates together (set by the architecture).
    pub rope_style: RopeStyle,
    /// The RoPE base of sliding-window layers where it differs from the
    /// global one (Gemma 3's `{arch}.rope.freq_base_swa`, 10 000 by
    /// default); the global base elsewhere.
    pub rope_freq_base_local: f32,
    /// Keys a sliding-window layer sees, `{arch}.attention.sliding_window`
    /// (set by architectures that have such layers).
    pub sliding_window: Option<usize>,
    /// Linear RoPE scaling: positions are multiplied by this, `1 /
    /// {arch}.rope.scaling.factor` (1 without scaling).
    pub rope_freq_scale: f32,
    /// `{arch}.attention.layer_norm_rms_epsilon` (defaults to 1e-5).
    pub rms_norm_eps: f32,
    /// `{arch}.context_length`.
    pub context_length: usize,
    /// Rows of the token embedding: the length of `tokenizer.ggml.tokens`,
    /// else `{arch}.vocab_size`.
    pub vocab_size: usize,
}

impl ModelConfig {
    /// Reads the keys of `architecture` (the file's `general.architecture`),
    /// with llama.cpp's defaults, and checks what the shared blocks need:
    /// grouped-query heads that divide evenly, and RoPE over whole heads.
    pub(crate) fn from_metadata(
        metadata: &HashMap<String, Value>,
        architecture: String,
    ) -> Result<Self> {
        let key = |k: &str| format!("{architecture}.{k}");
        let n_heads = get_usize(metadata, &key("attention.head_count"))?;
        let hidden_size = get_usize(metadata, &key("embedding_length"))?;
        let n_kv_heads = opt_usize(metadata, &key("attention.head_count_kv"))?.unwrap_or(n_heads);
        if n_heads == 0 || n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
            return Err(KernelError::BadMetadata {
                key: key("attention.head_count_kv"),
                expected: "a non-zero divisor of attention.head_count",
            });
        }
        let head_dim =
            opt_usize(metadata, &key("attention.key_length"))?.unwrap_or(hidden_size / n_heads);
        let rope_dim = opt_usize(metadata, &key("rope.dimension_count"))?.unwrap_or(head_dim);
        // The shared RoPE rotates pairs across the whole head.
        if rope_dim != head_dim || head_dim % 2 != 0 {
            return Err(KernelError::BadMetadata {
                key: key("rope.dimension_count"),
                expected: "an even number equal to the head dimension (partial RoPE is not llama)",
            });
        }
        let vocab_size = match metadata.get("tokenizer.ggml.tokens") {
            Some(Value::Array(tokens)) => tokens.len(),
            _ => get_usize(metadata, &key("vocab_size"))?,
        };
        Ok(Self {
            n_layers: get_usize(metadata, &key("block_count"))?,
            hidden_size,
            feed_forward_size: get_usize(metadata, &key("feed_forward_length"))?,
            n_heads,
            n_kv_heads,
            head_dim,
            rope_dim,
            rope_freq_base: opt_f32(metadata, &key("rope.freq_base"))?.unwrap_or(10_000.0),
            rope_style: RopeStyle::Pairs,
            rope_freq_scale: rope_freq_scale(metadata, &architecture)?,
            sliding_window: None,
            rope_freq_base_local: opt_f32(metadata, &key("rope.freq_base"))?.unwrap_or(10_000.0),
            rms_norm_eps: opt_f32(metadata, &key("attention.layer_norm_rms_epsilon"))?
                .unwrap_or(1e-5),
            context_length: get_usize(metadata, &key("context_length"))?,
            vocab_size,
            architecture,
        })
    }

    /// The RoPE frequencies of the model's (global) attention layers.
    pub(crate) fn rope(&self) -> RopeFrequencies {
        RopeFrequencies {
            base: self.rope_freq_base,
            scale: self.rope_freq_scale,
        }
    }

    /// Bytes of KV cache one token takes in one layer (f32 keys and values).
    pub fn kv_bytes_per_token_per_layer(&self) -> u64 {
        (2 * self.n_kv_heads * self.head_dim * DType::F32.size_in_bytes()) as u64
    }
}
