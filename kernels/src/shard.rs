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
//! A step can take several sequences at once (a batch): their rows go
//! through every matrix together, so the weights are read once for all
//! of them, and attention runs per sequence against its own cache. Each
//! sequence gets the bits it would get alone (see `forward_batch`).
//!
//! Shapes are written `[rows, cols]`; `n` is the number of new tokens in a
//! forward call, `len` the sequence length after it.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use crate::architecture::{Architecture, Layer};
use crate::blocks::{RopeTables, Step, rms_norm, scale};
use crate::config::{ModelConfig, RopeFrequencies};
use crate::error::{KernelError, Result};
use crate::kv_cache::{LayerCache, SequenceCache};
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

/// One sequence's part of a step: its tokens (or hidden states) at
/// positions `position..position + n`.
#[derive(Debug, Clone)]
pub struct SequenceStep {
    pub sequence: SequenceId,
    pub position: usize,
    pub input: ShardInput,
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

/// A checked step of one sequence, its input embedded, waiting for the
/// batch's shared computation.
struct Prepared {
    /// Where its output goes among the batch's.
    index: usize,
    sequence: SequenceId,
    position: usize,
    x: Tensor, // [n, hidden]
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
    /// Set at load: see [`batches_exactly`](Self::batches_exactly).
    batches_exactly: bool,
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
        // The CPU attention and norms work per sequence and per row; the
        // products are exact only with ringlet's kernels.
        let batches_exactly = device.is_cpu() && weights.batches_exactly();
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
            batches_exactly,
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

    /// How many sequences have a KV cache here.
    pub fn sequences(&self) -> usize {
        self.caches.len()
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
        let step = SequenceStep {
            sequence,
            position,
            input,
        };
        match self.forward_batch(vec![step]).pop() {
            Some(result) => result,
            None => Err(KernelError::EmptyInput { sequence }),
        }
    }

    /// Runs one step over several sequences at once, each as
    /// [`forward`](Self::forward) would, and returns each one's output in
    /// the order given. Their rows share every matrix product, so the
    /// weights are read once for the whole batch.
    ///
    /// Each sequence gets the bits it would get alone: every product
    /// rounds a row as the kernel for its own sequence's row count would
    /// (`QuantMatrix::matmul_each`), norms and activations work row by
    /// row, and attention runs per sequence. Where that cannot be promised
    /// (matrices multiplied by Candle: other devices and formats) the
    /// sequences run one after another.
    ///
    /// A step that is wrong in itself (position, context, input) fails
    /// alone; a failure of the shared computation fails every sequence of
    /// the batch, and each failed sequence's cache is dropped.
    pub fn forward_batch(&mut self, steps: Vec<SequenceStep>) -> Vec<Result<ShardOutput>> {
        if steps.len() > 1 && !self.batches_exactly() {
            return steps
                .into_iter()
                .map(|s| self.forward(s.sequence, s.position, s.input))
                .collect();
        }
        let _step = profile::span(Op::Step);
        let mut results: Vec<Result<ShardOutput>> = Vec::with_capacity(steps.len());
        let mut batch: Vec<Prepared> = Vec::with_capacity(steps.len());
        for (index, step) in steps.into_iter().enumerate() {
            let sequence = step.sequence;
            let prepared = if batch.iter().any(|b| b.sequence == sequence) {
                Err(KernelError::RepeatedInBatch { sequence })
            } else {
                self.prepare(index, step)
            };
            match prepared {
                Ok(prepared) => {
                    batch.push(prepared);
                    // Replaced by the output below.
                    results.push(Err(KernelError::BatchFailed {
                        sequence,
                        reason: "it did not run".into(),
                    }));
                }
                Err(error) => {
                    self.caches.remove(&sequence);
                    results.push(Err(error));
                }
            }
        }
        if batch.is_empty() {
            return results;
        }
        let ran: Vec<(usize, SequenceId)> = batch.iter().map(|b| (b.index, b.sequence)).collect();
        // Run the whole step on a worker of the compute pool: the many
        // parallel loops inside then start on the pool's fast path instead
        // of each waking a worker and putting the caller to sleep (two
        // context switches per matrix, hundreds per token).
        match rayon::scope(|_| self.forward_prepared(batch)) {
            Ok(outputs) => {
                for (&(index, _), output) in ran.iter().zip(outputs) {
                    results[index] = Ok(output);
                }
            }
            Err(error) => {
                for &(_, sequence) in &ran {
                    self.caches.remove(&sequence);
                }
                if let [(index, _)] = ran[..] {
                    results[index] = Err(error);
                } else {
                    let reason = error.to_string();
                    for &(index, sequence) in &ran {
                        let reason = reason.clone();
                        results[index] = Err(KernelError::BatchFailed { sequence, reason });
                    }
                }
            }
        }
        results
    }

    /// Whether a batch of several sequences gives each the bits it gets
    /// alone here (see [`forward_batch`](Self::forward_batch)).
    pub fn batches_exactly(&self) -> bool {
        self.batches_exactly
    }

    /// Checks one sequence's step and embeds its input.
    fn prepare(&self, index: usize, step: SequenceStep) -> Result<Prepared> {
        let SequenceStep {
            sequence,
            position,
            input,
        } = step;
        let x = {
            let _embed = profile::span(Op::Embed);
            self.embed(input)?
        }; // [n, hidden]
        let n = x.dim(0)?;
        self.check_step(sequence, position, n)?;
        Ok(Prepared {
            index,
            sequence,
            position,
            x,
        })
    }

    /// The shared computation of a batch of checked steps: one output per
    /// step, in order.
    fn forward_prepared(&mut self, batch: Vec<Prepared>) -> Result<Vec<ShardOutput>> {
        let sequence_rows: Vec<usize> = batch.iter().map(|b| b.x.dims()[0]).collect();
        let positions: Vec<usize> = batch.iter().map(|b| b.position).collect();
        let rows: usize = sequence_rows.iter().sum();
        let mut x = if batch.len() == 1 {
            batch[0].x.clone()
        } else {
            // Side by side in one buffer (only CPU shards batch).
            let mut values = Vec::with_capacity(rows * self.config.hidden_size);
            for b in &batch {
                values.extend(b.x.flatten_all()?.to_vec1::<f32>()?);
            }
            Tensor::from_vec(values, (rows, self.config.hidden_size), &self.device)?
        };
        let ropes = self
            .rope_bases
            .iter()
            .map(|&frequencies| {
                RopeTables::new(
                    &self.config,
                    frequencies,
                    self.rope_freq_factors.as_deref(),
                    &sequence_rows,
                    &positions,
                    &self.device,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let step = Step {
            config: &self.config,
            ropes: &ropes,
            sequence_rows: &sequence_rows,
        };
        // The caches leave the map for the step, one per sequence; they
        // go back only if every layer ran.
        let n_layers = self.layers.len();
        let mut caches: Vec<SequenceCache> = batch
            .iter()
            .map(|b| {
                self.caches
                    .remove(&b.sequence)
                    .unwrap_or_else(|| SequenceCache::new(n_layers))
            })
            .collect();
        for (i, layer) in self.layers.iter().enumerate() {
            let mut layer_caches: Vec<&mut LayerCache> =
                caches.iter_mut().map(|c| c.layer_mut(i)).collect();
            x = layer.forward(&x, &step, &mut layer_caches)?;
        }
        for ((b, mut cache), &n) in batch.iter().zip(caches).zip(&sequence_rows) {
            cache.set_len(b.position + n);
            self.caches.insert(b.sequence, cache);
        }

        match &self.head {
            Some(head) => {
                // The last row of each sequence.
                let mut last = Vec::with_capacity(batch.len());
                let mut end = 0;
                for &n in &sequence_rows {
                    end += n;
                    last.push(x.narrow(0, end - 1, 1)?);
                }
                let last = if last.len() == 1 {
                    last.remove(0)
                } else {
                    let mut values = Vec::with_capacity(last.len() * self.config.hidden_size);
                    for row in &last {
                        values.extend(row.flatten_all()?.to_vec1::<f32>()?);
                    }
                    Tensor::from_vec(values, (last.len(), self.config.hidden_size), &self.device)?
                }; // [sequences, hidden]
                let normed = rms_norm(&last, &head.norm, self.config.rms_norm_eps)?;
                let _head = profile::span(Op::Head);
                let one_row_each = vec![1; batch.len()];
                let logits = head.output.matmul(&normed, &one_row_each)?; // [sequences, vocab]
                (0..batch.len())
                    .map(|i| Ok(ShardOutput::Logits(logits.get(i)?)))
                    .collect()
            }
            None => {
                let mut start = 0;
                sequence_rows
                    .iter()
                    .map(|&n| {
                        let rows = x.narrow(0, start, n)?;
                        start += n;
                        Ok(ShardOutput::Hidden(rows))
                    })
                    .collect()
            }
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
