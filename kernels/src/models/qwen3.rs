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

use super::llama::PreNormFamily;
use crate::blocks::AttentionOptions;
use crate::config::RopeStyle;

/// The Qwen 3 architecture.
pub(super) static QWEN3: PreNormFamily = PreNormFamily {
    names: &["qwen3"],
    rope_style: RopeStyle::Halves,
    options: AttentionOptions {
        qkv_bias: false,
        qk_norm: true,
        rope_table: 0,
        window: None,
        query_scale: None,
    },
};
