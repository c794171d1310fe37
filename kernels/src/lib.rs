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
//!
//! Layout, from the file up: `gguf` reads the container and knows no
//! architecture; `config` holds the shared hyper-parameters; `models` has
//! one file per architecture behind the `architecture` traits, built from
//! the shared `blocks`; `shard` runs any of them; `model_file` joins a
//! file to its architecture. The kernels underneath are `matrix`/`quant`
//! (quantized products) and `cpu_ops` (everything else on the CPU), whose
//! SIMD fast paths are chosen one way, `simd`'s. Only what is re-exported
//! below (and [`profile`]) is public.

mod architecture;
mod blocks;
mod chat_template;
mod config;
mod cpu_ops;
mod error;
mod gguf;
mod grammar;
mod kv_cache;
mod layers;
mod matrix;
mod model_file;
mod models;
pub mod profile;
mod quant;
mod sampler;
mod shard;
mod simd;
mod tensor_names;
#[cfg(test)]
mod test_random;
mod tokenizer;
mod weights;

pub use candle_core::{DType, Device, Tensor};
pub use chat_template::{ChatMessage, ChatTemplate, python_json};
pub use config::ModelConfig;
pub use error::{KernelError, Result};
pub use gguf::{header_len_in, to_hex};
pub use grammar::{Constraint, ConstraintMatcher, GrammarError, Grammars, compact_json_layout};
pub use kv_cache::{PAGE_TOKENS as KV_PAGE_TOKENS, kv_rows_for, kv_tokens_within};
pub use layers::{LayerRange, SequenceId};
pub use model_file::ModelFile;
pub use quant::{BlockFormat, QuantMatrix};
pub use sampler::{MAX_TOP_LOGPROBS, Sampled, Sampler, SamplingParams, TokenLogprobs};
pub use shard::{SequenceStep, Shard, ShardInput, ShardOutput};
pub use tokenizer::Tokenizer;
