//! Model math for ringlet.
//!
//! Reads a GGUF model file, loads a contiguous range of its transformer
//! layers as a [`Shard`], and runs it: the first shard takes token ids,
//! later shards take hidden states, the last returns logits. Also the
//! model's tokenizer, chat template and sampler.
//!
//! This crate does no networking, spawns no tasks or threads of its own
//! (its compute parallelism runs on rayon's global pool, as Candle's does)
//! and reads no environment variables: the node decides all of that.

pub mod chat_template;
mod cpu_ops;
pub mod error;
mod kv_cache;
pub mod layers;
pub mod llama;
mod matrix;
pub mod model_file;
pub mod profile;
pub mod quant;
pub mod sampler;
pub mod tokenizer;

pub use candle_core::{DType, Device, Tensor};
pub use chat_template::{ChatMessage, ChatTemplate};
pub use error::{KernelError, Result};
pub use layers::{LayerRange, SequenceId};
pub use llama::{LlamaConfig, Shard, ShardInput, ShardOutput};
pub use model_file::ModelFile;
pub use sampler::{Sampler, SamplingParams};
pub use tokenizer::Tokenizer;

/// Lowercase hexadecimal of `bytes` (digests in logs, fingerprints, checks).
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
