//! Llama-architecture decoder, cut into shards of contiguous layers.
//!
//! - Paper: Touvron et al., "LLaMA: Open and Efficient Foundation Language
//!   Models", <https://arxiv.org/abs/2302.13971>; grouped-query attention from
//!   Ainslie et al., <https://arxiv.org/abs/2305.13245>.
//! - Reference implementations: llama.cpp (`src/models/llama.cpp`) and
//!   candle-transformers (`models/quantized_llama.rs`). Unlike the latter, a
//!   [`Shard`] loads only the layers `[start, end)` it is given, keeps one KV
//!   cache per sequence so that many requests can share it, and passes hidden
//!   states in and out so that shards can be chained across machines.
//!
//! Covers Llama 2/3, Mistral and SmolLM2 GGUF files (`general.architecture`
//! = `llama`), with every quantized type Candle reads.
//!
//! Shapes are written `[rows, cols]`; `n` is the number of new tokens in a
//! forward call, `len` the sequence length after it, `H` the query heads,
//! `KV` the key/value heads, `d` the head dimension.

use std::cell::Cell;
use std::collections::HashMap;

use candle_core::quantized::QTensor;
use candle_core::quantized::gguf_file::Value;
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{KernelError, Result};
use crate::kv_cache::{LayerCache, SequenceCache};
use crate::layers::{LayerRange, SequenceId};
use crate::matrix::Matrix;
use crate::model_file::TensorReader;
use crate::profile::{self, Op};

// ---------------------------------------------------------------------------
// Tensor names (GGUF convention)
// ---------------------------------------------------------------------------

pub(crate) const TOKEN_EMBEDDING: &str = "token_embd.weight";
pub(crate) const OUTPUT_NORM: &str = "output_norm.weight";
pub(crate) const OUTPUT: &str = "output.weight";
/// Llama 3.1 style per-frequency RoPE scaling factors.
pub(crate) const ROPE_FREQS: &str = "rope_freqs.weight";

const BLOCK_TENSORS: [&str; 9] = [
    "attn_norm",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_norm",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
];

/// The GGUF names of the nine tensors of transformer layer `layer`.
pub(crate) fn block_tensor_names(layer: usize) -> Vec<String> {
    BLOCK_TENSORS
        .iter()
        .map(|t| format!("blk.{layer}.{t}.weight"))
        .collect()
}

// ---------------------------------------------------------------------------
// Configuration: the model's own hyper-parameters, read from GGUF metadata
// ---------------------------------------------------------------------------

/// Hyper-parameters of a llama-architecture model, as its GGUF metadata
/// states them. Runtime settings (threads, device, budgets) live elsewhere.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
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
    /// `{arch}.attention.layer_norm_rms_epsilon`.
    pub rms_norm_eps: f32,
    /// `{arch}.context_length`.
    pub context_length: usize,
    /// Rows of the token embedding.
    pub vocab_size: usize,
}

/// Architectures whose GGUF layout and maths are llama's.
const LLAMA_ARCHITECTURES: [&str; 2] = ["llama", "mistral"];

impl LlamaConfig {
    pub fn from_metadata(metadata: &HashMap<String, Value>) -> Result<Self> {
        let architecture = get_string(metadata, "general.architecture")?;
        if !LLAMA_ARCHITECTURES.contains(&architecture.as_str()) {
            return Err(KernelError::UnsupportedArchitecture { architecture });
        }
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
            rms_norm_eps: opt_f32(metadata, &key("attention.layer_norm_rms_epsilon"))?
                .unwrap_or(1e-5),
            context_length: get_usize(metadata, &key("context_length"))?,
            vocab_size,
            architecture,
        })
    }

    /// Bytes of KV cache one token takes in one layer (f32 keys and values).
    pub fn kv_bytes_per_token_per_layer(&self) -> u64 {
        (2 * self.n_kv_heads * self.head_dim * DType::F32.size_in_bytes()) as u64
    }
}

fn get_value<'a>(metadata: &'a HashMap<String, Value>, key: &str) -> Result<&'a Value> {
    metadata
        .get(key)
        .ok_or_else(|| KernelError::MissingMetadata {
            key: key.to_string(),
        })
}

fn get_string(metadata: &HashMap<String, Value>, key: &str) -> Result<String> {
    get_value(metadata, key)?
        .to_string()
        .cloned()
        .map_err(|_| KernelError::BadMetadata {
            key: key.to_string(),
            expected: "a string",
        })
}

fn get_usize(metadata: &HashMap<String, Value>, key: &str) -> Result<usize> {
    opt_usize(metadata, key)?.ok_or_else(|| KernelError::MissingMetadata {
        key: key.to_string(),
    })
}

fn opt_usize(metadata: &HashMap<String, Value>, key: &str) -> Result<Option<usize>> {
    let Some(value) = metadata.get(key) else {
        return Ok(None);
    };
    let n = match value {
        Value::U8(v) => u64::from(*v),
        Value::U16(v) => u64::from(*v),
        Value::U32(v) => u64::from(*v),
        Value::U64(v) => *v,
        Value::I8(v) => u64::try_from(*v).unwrap_or(u64::MAX),
        Value::I16(v) => u64::try_from(*v).unwrap_or(u64::MAX),
        Value::I32(v) => u64::try_from(*v).unwrap_or(u64::MAX),
        Value::I64(v) => u64::try_from(*v).unwrap_or(u64::MAX),
        _ => u64::MAX,
    };
    // No real model has a hyper-parameter near 2^32; a larger value is a
    // corrupt or hostile file and would only overflow allocations later.
    if n > u64::from(u32::MAX) {
        return Err(KernelError::BadMetadata {
            key: key.to_string(),
            expected: "a non-negative integer below 2^32",
        });
    }
    Ok(Some(n as usize))
}

fn opt_f32(metadata: &HashMap<String, Value>, key: &str) -> Result<Option<f32>> {
    match metadata.get(key) {
        None => Ok(None),
        Some(Value::F32(v)) => Ok(Some(*v)),
        Some(Value::F64(v)) => Ok(Some(*v as f32)),
        Some(_) => Err(KernelError::BadMetadata {
            key: key.to_string(),
            expected: "a float",
        }),
    }
}

// ---------------------------------------------------------------------------
// Weights
// ---------------------------------------------------------------------------

/// One transformer layer: pre-norm attention and a SwiGLU MLP.
struct Block {
    attn_norm: Tensor, // [hidden]
    wq: Matrix,        // [H*d, hidden]
    wk: Matrix,        // [KV*d, hidden]
    wv: Matrix,        // [KV*d, hidden]
    wo: Matrix,        // [hidden, H*d]
    ffn_norm: Tensor,  // [hidden]
    w_gate: Matrix,    // [ff, hidden]
    w_up: Matrix,      // [ff, hidden]
    w_down: Matrix,    // [hidden, ff]
}

/// The last shard's final norm and vocabulary projection.
struct Head {
    norm: Tensor,   // [hidden]
    output: Matrix, // [vocab, hidden]
}

/// What a shard takes: token ids for the first shard, hidden states for
/// the others.
#[derive(Debug, Clone)]
pub enum ShardInput {
    Tokens(Vec<u32>),
    /// `[n, hidden]` f32.
    Hidden(Tensor),
}

impl ShardInput {
    fn kind(&self) -> &'static str {
        match self {
            ShardInput::Tokens(_) => "token ids",
            ShardInput::Hidden(_) => "hidden states",
        }
    }
}

/// What a shard returns: hidden states for the next shard, or, from the
/// last shard, the logits of the final input position.
#[derive(Debug, Clone)]
pub enum ShardOutput {
    /// `[n, hidden]` f32.
    Hidden(Tensor),
    /// `[vocab]` f32, for the last of the `n` positions.
    Logits(Tensor),
}

/// The layers `[start, end)` of a model, with one KV cache per sequence.
pub struct Shard {
    config: LlamaConfig,
    range: LayerRange,
    embedding: Option<Matrix>, // [vocab, hidden], first shard only
    blocks: Vec<Block>,
    head: Option<Head>,                  // last shard only
    rope_freq_factors: Option<Vec<f32>>, // [d/2]
    caches: HashMap<SequenceId, SequenceCache>,
    weight_bytes: u64,
    device: Device,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("range", &self.range)
            .field("weight_bytes", &self.weight_bytes)
            .field("sequences", &self.caches.len())
            .finish()
    }
}

impl Shard {
    pub(crate) fn load(reader: &mut TensorReader<'_>, range: LayerRange) -> Result<Self> {
        let config = reader.model.config().clone();
        let device = reader.device.clone();
        let first = range.is_first();
        let last = range.is_last(config.n_layers);
        let tied = reader.model.ties_embeddings();
        let hidden = config.hidden_size;
        let weight_bytes = Cell::new(0u64);
        let matrix = |reader: &mut TensorReader<'_>,
                      name: &str,
                      rows: usize,
                      cols: usize|
         -> Result<Matrix> {
            let m = Matrix::load(reader, name, rows, cols)?;
            weight_bytes.set(weight_bytes.get() + m.byte_len());
            Ok(m)
        };
        let vector = |reader: &mut TensorReader<'_>, name: &str, len: usize| -> Result<Tensor> {
            let qt = reader.read(name)?;
            expect_shape(name, &qt, &[len])?;
            weight_bytes.set(weight_bytes.get() + qt.storage_size_in_bytes() as u64);
            Ok(qt.dequantize(&reader.device.clone())?)
        };

        // The first shard embeds tokens; with tied embeddings the last shard
        // projects onto the same matrix. A shard that is both reads it once.
        let token_embedding = if first || (last && tied) {
            Some(matrix(reader, TOKEN_EMBEDDING, config.vocab_size, hidden)?)
        } else {
            None
        };

        let (q_rows, kv_rows) = (
            config.n_heads * config.head_dim,
            config.n_kv_heads * config.head_dim,
        );
        let ff = config.feed_forward_size;
        let mut blocks = Vec::with_capacity(range.len());
        for layer in range.start..range.end {
            let name = |t: &str| format!("blk.{layer}.{t}.weight");
            blocks.push(Block {
                attn_norm: vector(reader, &name("attn_norm"), hidden)?,
                wq: matrix(reader, &name("attn_q"), q_rows, hidden)?,
                wk: matrix(reader, &name("attn_k"), kv_rows, hidden)?,
                wv: matrix(reader, &name("attn_v"), kv_rows, hidden)?,
                wo: matrix(reader, &name("attn_output"), hidden, q_rows)?,
                ffn_norm: vector(reader, &name("ffn_norm"), hidden)?,
                w_gate: matrix(reader, &name("ffn_gate"), ff, hidden)?,
                w_up: matrix(reader, &name("ffn_up"), ff, hidden)?,
                w_down: matrix(reader, &name("ffn_down"), hidden, ff)?,
            });
        }

        let head = if last {
            let norm = vector(reader, OUTPUT_NORM, hidden)?;
            let output = match &token_embedding {
                Some(embedding) if tied => embedding.clone(),
                _ => matrix(reader, OUTPUT, config.vocab_size, hidden)?,
            };
            Some(Head { norm, output })
        } else {
            None
        };

        let rope_freq_factors = if reader.model.has_tensor(ROPE_FREQS) {
            let factors = vector(reader, ROPE_FREQS, config.rope_dim / 2)?;
            Some(factors.to_device(&Device::Cpu)?.to_vec1::<f32>()?)
        } else {
            None
        };

        let weight_bytes = weight_bytes.get();
        tracing::debug!(%range, weight_bytes, "shard loaded");
        Ok(Self {
            device,
            config,
            range,
            embedding: if first { token_embedding } else { None },
            blocks,
            head,
            rope_freq_factors,
            caches: HashMap::new(),
            weight_bytes,
        })
    }

    pub fn range(&self) -> LayerRange {
        self.range
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Bytes of weights this shard holds (each tensor counted once).
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    /// True for the shard that embeds token ids.
    pub fn takes_tokens(&self) -> bool {
        self.range.is_first()
    }

    /// Tokens cached so far for `sequence`, or `None` if it has no cache here.
    pub fn sequence_len(&self, sequence: SequenceId) -> Option<usize> {
        self.caches.get(&sequence).map(SequenceCache::len)
    }

    /// Drops the KV cache of `sequence`. Unknown sequences are ignored.
    pub fn release(&mut self, sequence: SequenceId) {
        self.caches.remove(&sequence);
    }

    /// Runs this shard's layers over `input`, the tokens at positions
    /// `position..position + n` of `sequence`, and extends its KV cache.
    ///
    /// `position` must equal the number of tokens already cached for the
    /// sequence (0 for a new one). On error the sequence's cache is dropped,
    /// so a failed step never leaves a half-written cache behind.
    pub fn forward(
        &mut self,
        sequence: SequenceId,
        position: usize,
        input: ShardInput,
    ) -> Result<ShardOutput> {
        // Run the whole step on a worker of the compute pool: the many
        // parallel loops inside then start on the pool's fast path instead
        // of each waking a worker and putting the caller to sleep (two
        // context switches per matrix, hundreds per token).
        let _step = profile::span(Op::Step);
        let result = rayon::scope(|_| self.forward_inner(sequence, position, input));
        if result.is_err() {
            self.caches.remove(&sequence);
        }
        result
    }

    fn forward_inner(
        &mut self,
        sequence: SequenceId,
        position: usize,
        input: ShardInput,
    ) -> Result<ShardOutput> {
        let x = {
            let _embed = profile::span(Op::Embed);
            self.embed(input)?
        }; // [n, hidden]
        let n = x.dim(0)?;
        if n == 0 {
            return Err(KernelError::EmptyInput { sequence });
        }
        let cached = self.caches.get(&sequence).map_or(0, SequenceCache::len);
        if cached != position {
            return Err(KernelError::PositionMismatch {
                sequence,
                expected: cached,
                got: position,
            });
        }
        let len = position + n;
        if len > self.config.context_length {
            return Err(KernelError::ContextExceeded {
                sequence,
                requested: len,
                context_length: self.config.context_length,
            });
        }

        let rope = self.rope_tables(position, n)?;
        // The CPU attention masks as it goes; Candle's needs the mask tensor.
        let mask = if n > 1 && !self.device.is_cpu() {
            Some(causal_mask(position, n, &self.device)?)
        } else {
            None
        };
        let n_layers = self.blocks.len();
        let cache = self
            .caches
            .entry(sequence)
            .or_insert_with(|| SequenceCache::new(n_layers));
        let mut x = x;
        for (block, layer_cache) in self.blocks.iter().zip(cache.layers_mut()) {
            x = block.forward(&x, &self.config, &rope, mask.as_ref(), layer_cache)?;
        }
        cache.set_len(len);

        match &self.head {
            Some(head) => {
                let last = x.narrow(0, n - 1, 1)?; // [1, hidden]
                let normed = rms_norm(&last, &head.norm, self.config.rms_norm_eps)?;
                let _head = profile::span(Op::Head);
                let logits = head.output.matmul(&normed)?.squeeze(0)?; // [vocab]
                Ok(ShardOutput::Logits(logits))
            }
            None => Ok(ShardOutput::Hidden(x)),
        }
    }

    /// Turns the input into `[n, hidden]` f32 hidden states.
    fn embed(&self, input: ShardInput) -> Result<Tensor> {
        let expected = if self.takes_tokens() {
            "token ids"
        } else {
            "hidden states"
        };
        match (input, &self.embedding) {
            (ShardInput::Tokens(ids), Some(embedding)) => {
                let vocab_size = self.config.vocab_size;
                if let Some(&token) = ids.iter().find(|&&t| t as usize >= vocab_size) {
                    return Err(KernelError::TokenOutOfVocabulary { token, vocab_size });
                }
                embedding.embed(&ids, &self.device)
            }
            (ShardInput::Hidden(h), None) => {
                let hidden_size = self.config.hidden_size;
                match h.dims() {
                    [_, cols] if *cols == hidden_size => {
                        Ok(h.to_device(&self.device)?.to_dtype(DType::F32)?)
                    }
                    dims => Err(KernelError::HiddenShape {
                        got: dims.to_vec(),
                        hidden_size,
                    }),
                }
            }
            (input, _) => Err(KernelError::WrongInput {
                range: self.range,
                expected,
                got: input.kind(),
            }),
        }
    }

    /// RoPE cos/sin tables for positions `position..position + n`, computed
    /// as llama.cpp does (`theta_p,i = p * base^(-2i/d)` by repeated f32
    /// multiplication) so that greedy decoding matches it.
    fn rope_tables(&self, position: usize, n: usize) -> Result<RopeTables> {
        let half = self.config.rope_dim / 2;
        let theta_scale = self
            .config
            .rope_freq_base
            .powf(-2.0 / self.config.rope_dim as f32);
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for p in position..position + n {
            let mut theta = p as f32;
            for i in 0..half {
                let factor = self.rope_freq_factors.as_ref().map_or(1.0, |f| f[i]);
                let t = theta / factor;
                cos.push(t.cos());
                sin.push(t.sin());
                theta *= theta_scale;
            }
        }
        Ok(RopeTables {
            cos: Tensor::from_slice(&cos, (n, half), &self.device)?,
            sin: Tensor::from_slice(&sin, (n, half), &self.device)?,
            cos_values: cos,
            sin_values: sin,
        })
    }
}

impl Block {
    /// `x`: `[n, hidden]` → `[n, hidden]`.
    fn forward(
        &self,
        x: &Tensor,
        config: &LlamaConfig,
        rope: &RopeTables,
        mask: Option<&Tensor>,
        cache: &mut LayerCache,
    ) -> Result<Tensor> {
        let eps = config.rms_norm_eps;
        let h = rms_norm(x, &self.attn_norm, eps)?;
        let attn = self.attention(&h, config, rope, mask, cache)?;
        let x = add(x, &attn)?;
        let h = rms_norm(&x, &self.ffn_norm, eps)?;
        let (gate, up) = {
            let _mlp = profile::span(Op::MlpMatmul);
            let mut both = Matrix::matmul_each(&[&self.w_gate, &self.w_up], &h)?.into_iter();
            match (both.next(), both.next()) {
                (Some(gate), Some(up)) => (gate, up), // [n, ff] each
                _ => return Err(candle_core::Error::Msg("a product went missing".into()).into()),
            }
        };
        let act = {
            let _swiglu = profile::span(Op::Elementwise);
            swiglu(&gate, &up)?
        };
        let mlp = {
            let _mlp = profile::span(Op::MlpMatmul);
            self.w_down.matmul(&act)? // [n, hidden]
        };
        add(&x, &mlp)
    }

    /// Causal grouped-query attention over the sequence's cache; appends
    /// the new keys and values. `h`: `[n, hidden]` → `[n, hidden]`.
    fn attention(
        &self,
        h: &Tensor,
        config: &LlamaConfig,
        rope: &RopeTables,
        mask: Option<&Tensor>,
        cache: &mut LayerCache,
    ) -> Result<Tensor> {
        let (q, k, v) = {
            let _qkv = profile::span(Op::AttentionMatmul);
            let mut qkv = Matrix::matmul_each(&[&self.wq, &self.wk, &self.wv], h)?.into_iter();
            match (qkv.next(), qkv.next(), qkv.next()) {
                (Some(q), Some(k), Some(v)) => (q, k, v), // [n, H*d], [n, KV*d], [n, KV*d]
                _ => return Err(candle_core::Error::Msg("a product went missing".into()).into()),
            }
        };
        let y = {
            let _attention = profile::span(Op::Attention);
            if h.device().is_cpu() {
                attention_cpu(&q, &k, &v, config, rope, cache)?
            } else {
                attention_candle(&q, &k, &v, config, rope, mask, cache)?
            }
        };
        let _o = profile::span(Op::AttentionMatmul);
        self.wo.matmul(&y)
    }
}

/// RoPE cos/sin for the positions of one forward call, `[n, d/2]` each,
/// as tensors (Candle's ops) and as plain values (the CPU ops), computed
/// once per call rather than once per layer.
struct RopeTables {
    cos: Tensor,
    sin: Tensor,
    cos_values: Vec<f32>,
    sin_values: Vec<f32>,
}

/// Attention with ggml's arithmetic (see `cpu_ops::attention`).
fn attention_cpu(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    config: &LlamaConfig,
    rope: &RopeTables,
    cache: &mut LayerCache,
) -> Result<Tensor> {
    let n = q.dim(0)?;
    let (heads, kv_heads, d) = (config.n_heads, config.n_kv_heads, config.head_dim);
    let mut q = q.flatten_all()?.to_vec1::<f32>()?; // [n, H, d]
    let mut k = k.flatten_all()?.to_vec1::<f32>()?; // [n, KV, d]
    crate::cpu_ops::rope_pairs(&mut q, heads, d, &rope.cos_values, &rope.sin_values);
    crate::cpu_ops::rope_pairs(&mut k, kv_heads, d, &rope.cos_values, &rope.sin_values);
    let device = Device::Cpu;
    let k = Tensor::from_vec(k, (n, kv_heads, d), &device)?
        .transpose(0, 1)?
        .contiguous()?; // [KV, n, d]
    let v = v.reshape((n, kv_heads, d))?.transpose(0, 1)?.contiguous()?; // [KV, n, d]
    let (k_all, _) = cache.append(&k, &v, config.context_length)?;
    let position = k_all.dim(1)? - n;
    let (keys, values, capacity) = cache.buffers()?;
    let shape = crate::cpu_ops::AttentionShape {
        n,
        heads,
        kv_heads,
        d,
        position,
        len: position + n,
        capacity,
    };
    let out = crate::cpu_ops::with_f32(keys, |keys| {
        crate::cpu_ops::with_f32(values, |values| {
            crate::cpu_ops::attention(&q, keys, values, &shape)
        })
    })??;
    Ok(Tensor::from_vec(out, (n, heads * d), &device)?)
}

/// Attention with Candle's ops (GPU devices). The `H / KV` query heads that
/// share a KV head are stacked as rows of one matmul, so K and V are never
/// repeated.
fn attention_candle(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    config: &LlamaConfig,
    rope: &RopeTables,
    mask: Option<&Tensor>,
    cache: &mut LayerCache,
) -> Result<Tensor> {
    let n = q.dim(0)?;
    let (heads, kv_heads, d) = (config.n_heads, config.n_kv_heads, config.head_dim);
    let group = heads / kv_heads;
    // [n, H*d] → [1, H, n, d]: rope_i wants (batch, heads, seq, dim).
    let q = q.reshape((1, n, heads, d))?.transpose(1, 2)?.contiguous()?;
    let k = k
        .reshape((1, n, kv_heads, d))?
        .transpose(1, 2)?
        .contiguous()?;
    let v = v.reshape((n, kv_heads, d))?.transpose(0, 1)?.contiguous()?; // [KV, n, d]
    let q = candle_nn::rotary_emb::rope_i(&q, &rope.cos, &rope.sin)?; // [1, H, n, d]
    let k = candle_nn::rotary_emb::rope_i(&k, &rope.cos, &rope.sin)?.squeeze(0)?; // [KV, n, d]

    let (k_all, v_all) = cache.append(&k, &v, config.context_length)?; // [KV, len, d] each
    let len = k_all.dim(1)?;

    // Heads are ordered kv-major, so [H, n, d] = [KV, group, n, d].
    let q = q.reshape((kv_heads, group * n, d))?;
    let scale = 1.0 / (d as f64).sqrt();
    let scores = q.matmul(&k_all.t()?)?.affine(scale, 0.0)?; // [KV, group*n, len]
    let scores = match mask {
        Some(mask) => scores
            .reshape((kv_heads, group, n, len))?
            .broadcast_add(mask)? // mask: [n, len]
            .reshape((kv_heads, group * n, len))?,
        None => scores,
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    let y = probs.matmul(&v_all)?; // [KV, group*n, d]
    Ok(y.reshape((heads, n, d))?
        .transpose(0, 1)?
        .reshape((n, heads * d))?)
}

/// SiLU(gate) * up: ggml's arithmetic on the CPU, Candle's elsewhere.
fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.device().is_cpu() {
        crate::cpu_ops::swiglu(gate, up)
    } else {
        Ok((candle_nn::ops::silu(gate)? * up)?)
    }
}

/// The residual addition `x + y`.
fn add(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    let _add = profile::span(Op::Elementwise);
    Ok((x + y)?)
}

/// RMS norm times `weight`: ggml's arithmetic on the CPU, Candle's elsewhere.
fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    let _norm = profile::span(Op::Norm);
    if x.device().is_cpu() {
        crate::cpu_ops::rms_norm_mul(x, weight, eps)
    } else {
        Ok(candle_nn::ops::rms_norm(x, weight, eps)?)
    }
}

/// Additive causal mask `[n, position + n]`: query `i` (at absolute
/// position `position + i`) sees keys `0..=position + i`.
fn causal_mask(position: usize, n: usize, device: &Device) -> Result<Tensor> {
    let len = position + n;
    let mask: Vec<f32> = (0..n)
        .flat_map(|i| {
            (0..len).map(move |j| {
                if j > position + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(mask, (n, len), device)?)
}

fn expect_shape(name: &str, qt: &QTensor, expected: &[usize]) -> Result<()> {
    if qt.shape().dims() != expected {
        return Err(KernelError::TensorShape {
            name: name.to_string(),
            expected: expected.to_vec(),
            got: qt.shape().dims().to_vec(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_mask_with_prefix() -> Result<()> {
        let m = causal_mask(2, 3, &Device::Cpu)?.to_vec2::<f32>()?;
        let inf = f32::NEG_INFINITY;
        assert_eq!(
            m,
            vec![
                vec![0.0, 0.0, 0.0, inf, inf],
                vec![0.0, 0.0, 0.0, 0.0, inf],
                vec![0.0, 0.0, 0.0, 0.0, 0.0],
            ]
        );
        Ok(())
    }

    #[test]
    fn block_names_are_gguf_names() {
        let names = block_tensor_names(7);
        assert_eq!(names.len(), 9);
        assert!(names.contains(&"blk.7.attn_q.weight".to_string()));
        assert!(names.contains(&"blk.7.ffn_down.weight".to_string()));
    }
}
