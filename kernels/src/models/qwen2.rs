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

use super::llama::PreNormFamily;
use crate::blocks::AttentionOptions;
use crate::config::RopeStyle;

/// The Qwen 2 architecture.
pub(super) static QWEN2: PreNormFamily = PreNormFamily {
    names: &["qwen2"],
    rope_style: RopeStyle::Halves,
    options: AttentionOptions {
        qkv_bias: true,
        qk_norm: false,
        rope_table: 0,
        window: None,
        query_scale: None,
    },
};
