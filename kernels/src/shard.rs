//! A shard: the layers `[start, end)` of a model, with one KV cache per
//! sequence so that many requests can share it, taking token ids (first
//! shard) or hidden states in and giving hidden states or logits (last
//! shard) out, so that shards can be chained across machines.
//!
//! Everything here is the same for every architecture: the embedding, the
//! final norm and vocabulary projection, the per-sequence caches, the
//! checks on each step's input, and the RoPE tables. The layers themselves
//! come from the model's [`Architecture`].
//!
//! Shapes are written `[rows, cols]`; `n` is the number of new tokens in a
//! forward call, `len` the sequence length after it.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use crate::architecture::{Architecture, Layer};
use crate::blocks::{RopeTables, Step, causal_mask, rms_norm, scale};
use crate::config::{ModelConfig, RopeFrequencies};
use crate::error::{KernelError, Result};
use crate::kv_cache::SequenceCache;
use crate::layers::{LayerRange, SequenceId};
use crate::matrix::Matrix;
use crate::profile::{self, Op};
use crate::tensor_names::{OUTPUT, OUTPUT_NORM, ROPE_FREQS, TOKEN_EMBEDDING};
use crate::weights::Weights;

/// What a shard takes: token ids for the first shard, hidden states for
/// the others.
#[derive(Debug, Clone)]
pub enum ShardInput {
    Tokens(Vec<u32>),
    /// `[n, hidden]` f32.
    Hidden(Tensor),
}

impl ShardInput {
    /// The number of positions (tokens or rows of hidden states).
    pub fn len(&self) -> usize {
        match self {
            ShardInput::Tokens(tokens) => tokens.len(),
            ShardInput::Hidden(hidden) => hidden.dims().first().copied().unwrap_or(0),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

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

/// The last shard's final norm and vocabulary projection.
struct Head {
    norm: Tensor,   // [hidden]
    output: Matrix, // [vocab, hidden]
}

/// The layers `[start, end)` of a model, with one KV cache per sequence.
pub struct Shard {
    config: ModelConfig,
    range: LayerRange,
    embedding: Option<Matrix>, // [vocab, hidden], first shard only
    layers: Vec<Box<dyn Layer>>,
    rope_bases: Vec<RopeFrequencies>,
    embedding_scale: Option<f32>,
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
    /// Reads the layers `range` of a model of `architecture`, plus the
    /// embedding for the first shard and the head for the last. With
    /// `tied` embeddings the last shard projects onto the token embedding;
    /// a shard that is both first and last reads it once.
    pub(crate) fn load(
        mut weights: Weights<'_>,
        architecture: &dyn Architecture,
        config: ModelConfig,
        range: LayerRange,
        tied: bool,
    ) -> Result<Self> {
        let device = weights.device().clone();
        let first = range.is_first();
        let last = range.is_last(config.n_layers);
        let (vocab, hidden) = (config.vocab_size, config.hidden_size);
        let token_embedding = if first || (last && tied) {
            Some(weights.matrix(TOKEN_EMBEDDING, vocab, hidden)?)
        } else {
            None
        };
        let layers = (range.start..range.end)
            .map(|layer| architecture.load_layer(&mut weights, layer, &config))
            .collect::<Result<Vec<_>>>()?;
        let head = if last {
            let norm = weights.vector(OUTPUT_NORM, hidden)?;
            let output = match &token_embedding {
                Some(embedding) if tied => embedding.clone(),
                _ => weights.matrix(OUTPUT, vocab, hidden)?,
            };
            Some(Head { norm, output })
        } else {
            None
        };
        let rope_freq_factors = if weights.has_tensor(ROPE_FREQS) {
            let factors = weights.vector(ROPE_FREQS, config.rope_dim / 2)?;
            Some(factors.to_device(&Device::Cpu)?.to_vec1::<f32>()?)
        } else {
            None
        };
        let weight_bytes = weights.bytes();
        let rope_bases = architecture.rope_bases(&config);
        let embedding_scale = architecture.embedding_scale(&config);
        tracing::debug!(%range, weight_bytes, "shard loaded");
        Ok(Self {
            device,
            config,
            range,
            embedding: if first { token_embedding } else { None },
            layers,
            rope_bases,
            embedding_scale,
            head,
            rope_freq_factors,
            caches: HashMap::new(),
            weight_bytes,
        })
    }

    pub fn range(&self) -> LayerRange {
        self.range
    }

    pub fn config(&self) -> &ModelConfig {
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
        self.check_step(sequence, position, n)?;
        let len = position + n;

        let ropes = self
            .rope_bases
            .iter()
            .map(|&frequencies| {
                RopeTables::new(
                    &self.config,
                    frequencies,
                    self.rope_freq_factors.as_deref(),
                    position,
                    n,
                    &self.device,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        // The CPU attention masks as it goes; Candle's needs the mask tensor.
        let mask = if n > 1 && !self.device.is_cpu() {
            Some(causal_mask(position, n, usize::MAX, &self.device)?)
        } else {
            None
        };
        let step = Step {
            config: &self.config,
            ropes: &ropes,
            mask: mask.as_ref(),
        };
        let n_layers = self.layers.len();
        let cache = self
            .caches
            .entry(sequence)
            .or_insert_with(|| SequenceCache::new(n_layers));
        let mut x = x;
        for (layer, layer_cache) in self.layers.iter().zip(cache.layers_mut()) {
            x = layer.forward(&x, &step, layer_cache)?;
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

    /// Checks that `n` new tokens at `position` continue `sequence` and fit
    /// the context.
    fn check_step(&self, sequence: SequenceId, position: usize, n: usize) -> Result<()> {
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
        Ok(())
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
                let x = embedding.embed(&ids, &self.device)?;
                match self.embedding_scale {
                    Some(factor) => scale(&x, factor),
                    None => Ok(x),
                }
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
}
