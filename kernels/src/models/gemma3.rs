//! The Gemma 3 architecture (text): pre- and post-norms around attention
//! and the MLP, per-head Q/K norms, a GELU-gated MLP, embeddings scaled by
//! `√hidden`, and attention that alternates five sliding-window layers
//! (local RoPE base 10 000) with one global layer (the file's base).
//!
//! - Paper: Gemma Team, "Gemma 3 Technical Report",
//!   <https://arxiv.org/abs/2503.19786>.
//! - Reference implementation: llama.cpp (`src/models/gemma3.cpp`, with the
//!   hyper-parameters from `src/llama-model.cpp`). Gemma's norms compute
//!   `x̂ · (1 + w)`; the GGUF converter stores `1 + w`, so the file's norms
//!   are plain RMS norms here as in llama.cpp.
//!
//! Shapes: `x` `[n, hidden]`; Q `[n, H, d]`, K and V `[n, KV, d]` with `d`
//! from `gemma3.attention.key_length` (256 in the 270M and 1B models, where
//! `hidden / H` is 160 and 288).

use std::collections::HashMap;

use candle_core::Tensor;
use candle_core::quantized::gguf_file::Value;

use crate::architecture::{Architecture, Layer};
use crate::blocks::{Attention, AttentionOptions, Gate, Mlp, Step, add, rms_norm};
use crate::config::{ModelConfig, RopeFrequencies, RopeStyle};
use crate::error::Result;
use crate::gguf::{get_usize, opt_f32};
use crate::kv_cache::LayerCache;
use crate::tensor_names::{ATTN_NORM, FFN_NORM, POST_ATTENTION_NORM, POST_FFN_NORM, in_layer};
use crate::weights::Weights;

/// The Gemma 3 architecture.
#[derive(Debug)]
pub(crate) struct Gemma3;

/// Of every six layers, the first five attend through a sliding window and
/// the sixth globally (llama.cpp: `set_swa_pattern(6)`).
const SLIDING_PATTERN: usize = 6;
/// The RoPE base of the sliding-window layers when the file does not say
/// (`gemma3.rope.freq_base_swa`; llama.cpp's default for Gemma 3).
const LOCAL_ROPE_BASE: f32 = 10_000.0;
/// The text part of the chat template Google ships with Gemma 3 instruct
/// models (`tokenizer_config.json`), for GGUFs converted without it.
const CHAT_TEMPLATE: &str = "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}{%- for message in loop_messages -%}{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}{%- set role = message['role'] -%}{%- endif -%}{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{%- endfor -%}{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}";

/// Index of each RoPE table in [`Architecture::rope_bases`]'s list.
const GLOBAL_ROPE: usize = 0;
const LOCAL_ROPE: usize = 1;
/// Gemma 3 27B's layer count: the one size whose query scale is
/// `1/√(hidden / H)` rather than `1/√d` (as llama.cpp decides it).
const LAYERS_OF_27B: usize = 62;

impl Gemma3 {
    /// Whether layer `layer` attends through the sliding window.
    fn is_sliding(layer: usize) -> bool {
        layer % SLIDING_PATTERN < SLIDING_PATTERN - 1
    }

    fn attention_options(layer: usize, config: &ModelConfig) -> AttentionOptions {
        let query_scale = if config.n_layers == LAYERS_OF_27B {
            1.0 / ((config.hidden_size / config.n_heads) as f32).sqrt()
        } else {
            1.0 / (config.head_dim as f32).sqrt()
        };
        let sliding = Self::is_sliding(layer);
        AttentionOptions {
            qkv_bias: false,
            qk_norm: true,
            rope_table: if sliding { LOCAL_ROPE } else { GLOBAL_ROPE },
            window: if sliding { config.sliding_window } else { None },
            query_scale: Some(query_scale),
        }
    }
}

impl Architecture for Gemma3 {
    fn names(&self) -> &'static [&'static str] {
        &["gemma3"]
    }

    fn config(
        &self,
        metadata: &HashMap<String, Value>,
        architecture: String,
    ) -> Result<ModelConfig> {
        let window = get_usize(
            metadata,
            &format!("{architecture}.attention.sliding_window"),
        )?;
        let local_base = opt_f32(metadata, &format!("{architecture}.rope.freq_base_swa"))?;
        let mut config = ModelConfig::from_metadata(metadata, architecture)?;
        config.rope_style = RopeStyle::Halves;
        config.sliding_window = Some(window);
        config.rope_freq_base_local = local_base.unwrap_or(LOCAL_ROPE_BASE);
        Ok(config)
    }

    /// The global layers' frequencies (with the file's linear scaling),
    /// then the local layers' (base 10 000, unscaled).
    fn rope_bases(&self, config: &ModelConfig) -> Vec<RopeFrequencies> {
        let local = RopeFrequencies {
            base: config.rope_freq_base_local,
            scale: 1.0,
        };
        let mut bases = vec![config.rope(); 2];
        bases[LOCAL_ROPE] = local;
        bases
    }

    /// Gemma 3's instruction template (text only): a system message goes
    /// in front of the first user turn, the assistant's role is `model`.
    fn default_chat_template(&self) -> Option<&'static str> {
        Some(CHAT_TEMPLATE)
    }

    /// `ggml_scale(x, sqrtf(n_embd))`.
    fn embedding_scale(&self, config: &ModelConfig) -> Option<f32> {
        Some((config.hidden_size as f32).sqrt())
    }

    fn layer_tensors(&self, layer: usize) -> Vec<String> {
        let mut names: Vec<String> = [ATTN_NORM, POST_ATTENTION_NORM, FFN_NORM, POST_FFN_NORM]
            .iter()
            .map(|t| in_layer(layer, t))
            .collect();
        // The options that name tensors (biases, Q/K norms) are the same
        // in every layer.
        let options = AttentionOptions {
            qk_norm: true,
            ..AttentionOptions::default()
        };
        names.extend(Attention::tensors(layer, options));
        names.extend(Mlp::tensors(layer));
        names
    }

    fn load_layer(
        &self,
        weights: &mut Weights<'_>,
        layer: usize,
        config: &ModelConfig,
    ) -> Result<Box<dyn Layer>> {
        let hidden = config.hidden_size;
        let options = Self::attention_options(layer, config);
        Ok(Box::new(Block {
            attn_norm: weights.vector(&in_layer(layer, ATTN_NORM), hidden)?,
            attention: Attention::load(weights, layer, config, options)?,
            post_attention_norm: weights.vector(&in_layer(layer, POST_ATTENTION_NORM), hidden)?,
            ffn_norm: weights.vector(&in_layer(layer, FFN_NORM), hidden)?,
            mlp: Mlp::load(weights, layer, config, Gate::GeluTanh)?,
            post_ffn_norm: weights.vector(&in_layer(layer, POST_FFN_NORM), hidden)?,
        }))
    }
}

/// One Gemma 3 layer: attention and the MLP each between two norms, each
/// added back to the residual stream.
struct Block {
    attn_norm: Tensor, // [hidden]
    attention: Attention,
    post_attention_norm: Tensor, // [hidden]
    ffn_norm: Tensor,            // [hidden]
    mlp: Mlp,
    post_ffn_norm: Tensor, // [hidden]
}

impl Layer for Block {
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
        let attn = rms_norm(&attn, &self.post_attention_norm, eps)?;
        let x = add(&attn, x)?;
        let h = rms_norm(&x, &self.ffn_norm, eps)?;
        let mlp = self.mlp.forward(&h, step.sequence_rows)?;
        let mlp = rms_norm(&mlp, &self.post_ffn_norm, eps)?;
        add(&mlp, &x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sixth_layer_is_global() {
        let sliding: Vec<bool> = (0..12).map(Gemma3::is_sliding).collect();
        assert_eq!(
            sliding,
            [
                true, true, true, true, true, false, true, true, true, true, true, false
            ]
        );
    }
}
