//! The blocks decoder layers are built from, shared by every architecture:
//! RMS norm, RoPE tables, grouped-query attention over a sequence's KV
//! cache (with the options families differ by: Q/K/V biases, per-head
//! Q/K norms, adjacent-pair or NEOX RoPE, a sliding window, a query
//! scale), the gated MLP (SiLU or GELU) and the residual add. Each computes with ggml's
//! arithmetic on the CPU (`cpu_ops`) and with Candle's ops on other
//! devices. An architecture (`models::*`) loads the blocks its layers have
//! and wires them in its own order.
//!
//! Shapes are written `[rows, cols]`; `n` is the number of new tokens in a
//! forward call, `len` the sequence length after it, `H` the query heads,
//! `KV` the key/value heads, `d` the head dimension, `ff` the MLP width.

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::config::{ModelConfig, RopeFrequencies, RopeStyle};
use crate::cpu_ops;
use crate::error::Result;
use crate::kv_cache::LayerCache;
use crate::matrix::Matrix;
use crate::profile::{self, Op};
use crate::tensor_names::{
    ATTN_K, ATTN_K_NORM, ATTN_OUTPUT, ATTN_Q, ATTN_Q_NORM, ATTN_V, FFN_DOWN, FFN_GATE, FFN_UP,
    bias_in_layer, in_layer,
};
use crate::weights::Weights;

/// What every layer of one forward call shares. The call's rows belong
/// to one or more sequences (a batch), in order: `sequence_rows[i]` rows
/// of the `i`-th (the RoPE tables hold each row's position). Everything
/// but attention treats the rows alike; attention runs per sequence,
/// against its own cache.
pub(crate) struct Step<'a> {
    pub(crate) config: &'a ModelConfig,
    /// RoPE for every row's position, one table per frequency base the
    /// architecture uses (`Architecture::rope_bases`); a layer's attention
    /// picks its own by index.
    pub(crate) ropes: &'a [RopeTables],
    pub(crate) sequence_rows: &'a [usize],
}

// ---------------------------------------------------------------------------
// Norm, residual, mask
// ---------------------------------------------------------------------------

/// RMS norm times `weight`: ggml's arithmetic on the CPU, Candle's elsewhere.
pub(crate) fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    let _norm = profile::span(Op::Norm);
    if x.device().is_cpu() {
        cpu_ops::rms_norm_mul(x, weight, eps)
    } else {
        Ok(candle_nn::ops::rms_norm(x, weight, eps)?)
    }
}

/// `x * factor`, as `ggml_scale` (one f32 multiply per value).
pub(crate) fn scale(x: &Tensor, factor: f32) -> Result<Tensor> {
    let _scale = profile::span(Op::Elementwise);
    Ok(x.affine(f64::from(factor), 0.0)?)
}

/// The residual addition `x + y`.
pub(crate) fn add(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    let _add = profile::span(Op::Elementwise);
    if x.device().is_cpu() {
        cpu_ops::add(x, y)
    } else {
        Ok((x + y)?)
    }
}

/// `x + bias` for each row of `x`.
fn add_bias(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() {
        cpu_ops::add_row(x, bias)
    } else {
        Ok(x.broadcast_add(bias)?)
    }
}

/// Additive causal mask `[n, position + n]`: query `i` (at absolute
/// position `position + i`) sees keys `position + i + 1 - window ..=
/// position + i` (pass `usize::MAX` for no window).
pub(crate) fn causal_mask(
    position: usize,
    n: usize,
    window: usize,
    device: &Device,
) -> Result<Tensor> {
    let len = position + n;
    let mask: Vec<f32> = (0..n)
        .flat_map(|i| {
            (0..len).map(move |j| {
                if j > position + i || position + i - j >= window {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(mask, (n, len), device)?)
}

// ---------------------------------------------------------------------------
// RoPE
// ---------------------------------------------------------------------------

/// RoPE cos/sin for the positions of one forward call's rows, `[n, d/2]`
/// each, as tensors (Candle's ops) and as plain values (the CPU ops),
/// computed once per call rather than once per layer.
pub(crate) struct RopeTables {
    cos: Tensor,
    sin: Tensor,
    cos_values: Vec<f32>,
    sin_values: Vec<f32>,
    half: usize,
}

impl RopeTables {
    /// The tables for the rows of sequences of `sequence_rows` rows at
    /// `positions` (see [`Step`]), computed as llama.cpp does
    /// (`theta_p,i = p * base^(-2i/d)` by repeated f32 multiplication,
    /// divided by the per-frequency factor when the model has them) so
    /// that greedy decoding matches it.
    pub(crate) fn new(
        config: &ModelConfig,
        frequencies: RopeFrequencies,
        freq_factors: Option<&[f32]>,
        sequence_rows: &[usize],
        positions: &[usize],
        device: &Device,
    ) -> Result<Self> {
        let half = config.rope_dim / 2;
        let theta_scale = frequencies.base.powf(-2.0 / config.rope_dim as f32);
        let freq_scale = frequencies.scale;
        let n: usize = sequence_rows.iter().sum();
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        let rows = sequence_rows
            .iter()
            .zip(positions)
            .flat_map(|(&n, &position)| position..position + n);
        for p in rows {
            let mut theta = p as f32;
            for i in 0..half {
                let factor = freq_factors.map_or(1.0, |f| f[i]);
                // ggml's `rope_yarn` without extrapolation: the
                // interpolated angle, `freq_scale * theta_extrap`.
                let t = freq_scale * (theta / factor);
                cos.push(t.cos());
                sin.push(t.sin());
                theta *= theta_scale;
            }
        }
        Ok(Self {
            cos: Tensor::from_slice(&cos, (n, half), device)?,
            sin: Tensor::from_slice(&sin, (n, half), device)?,
            cos_values: cos,
            sin_values: sin,
            half,
        })
    }

    /// The values of rows `start..start + n`, as `(cos, sin)`.
    fn values(&self, start: usize, n: usize) -> (&[f32], &[f32]) {
        let rows = start * self.half..(start + n) * self.half;
        (&self.cos_values[rows.clone()], &self.sin_values[rows])
    }

    /// The tensors of rows `start..start + n`, as `(cos, sin)`.
    fn tensors(&self, start: usize, n: usize) -> Result<(Tensor, Tensor)> {
        Ok((self.cos.narrow(0, start, n)?, self.sin.narrow(0, start, n)?))
    }
}

// ---------------------------------------------------------------------------
// Attention
// ---------------------------------------------------------------------------

/// What a family's attention adds to llama's; the default is llama's.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct AttentionOptions {
    /// Q, K and V projections have biases (Qwen 2).
    pub(crate) qkv_bias: bool,
    /// Queries and keys are RMS-normed per head before RoPE (Qwen 3, Gemma 3).
    pub(crate) qk_norm: bool,
    /// Which of the step's RoPE tables this layer uses (Gemma 3's local
    /// layers have a base of their own).
    pub(crate) rope_table: usize,
    /// A query at position `p` sees keys at `p - window + 1 ..= p` only
    /// (sliding-window layers).
    pub(crate) window: Option<usize>,
    /// Queries are multiplied by this after RoPE and the scores are not
    /// scaled again (Gemma 3); without it, scores are scaled by `1/√d`.
    pub(crate) query_scale: Option<f32>,
}

/// Q, K and V biases, `[H*d]`, `[KV*d]`, `[KV*d]`.
struct Biases {
    q: Tensor,
    k: Tensor,
    v: Tensor,
}

/// Per-head norm weights for queries and keys, `[d]` each.
struct QkNorm {
    q: Tensor,
    k: Tensor,
}

/// Grouped-query self-attention with separate Q, K, V projections, RoPE,
/// and K/V never repeated across the query heads that share them.
pub(crate) struct Attention {
    wq: Matrix, // [H*d, hidden]
    wk: Matrix, // [KV*d, hidden]
    wv: Matrix, // [KV*d, hidden]
    wo: Matrix, // [hidden, H*d]
    biases: Option<Biases>,
    qk_norm: Option<QkNorm>,
    options: AttentionOptions,
}

impl Attention {
    pub(crate) fn load(
        weights: &mut Weights<'_>,
        layer: usize,
        config: &ModelConfig,
        options: AttentionOptions,
    ) -> Result<Self> {
        let hidden = config.hidden_size;
        let d = config.head_dim;
        let q_rows = config.n_heads * d;
        let kv_rows = config.n_kv_heads * d;
        let biases = if options.qkv_bias {
            Some(Biases {
                q: weights.vector(&bias_in_layer(layer, ATTN_Q), q_rows)?,
                k: weights.vector(&bias_in_layer(layer, ATTN_K), kv_rows)?,
                v: weights.vector(&bias_in_layer(layer, ATTN_V), kv_rows)?,
            })
        } else {
            None
        };
        let qk_norm = if options.qk_norm {
            Some(QkNorm {
                q: weights.vector(&in_layer(layer, ATTN_Q_NORM), d)?,
                k: weights.vector(&in_layer(layer, ATTN_K_NORM), d)?,
            })
        } else {
            None
        };
        Ok(Self {
            wq: weights.matrix(&in_layer(layer, ATTN_Q), q_rows, hidden)?,
            wk: weights.matrix(&in_layer(layer, ATTN_K), kv_rows, hidden)?,
            wv: weights.matrix(&in_layer(layer, ATTN_V), kv_rows, hidden)?,
            wo: weights.matrix(&in_layer(layer, ATTN_OUTPUT), hidden, q_rows)?,
            biases,
            qk_norm,
            options,
        })
    }

    /// The GGUF names of the tensors [`load`](Self::load) reads with
    /// `options`, in layer `layer`.
    pub(crate) fn tensors(layer: usize, options: AttentionOptions) -> Vec<String> {
        let mut names: Vec<String> = [ATTN_Q, ATTN_K, ATTN_V, ATTN_OUTPUT]
            .iter()
            .map(|t| in_layer(layer, t))
            .collect();
        if options.qkv_bias {
            names.extend(
                [ATTN_Q, ATTN_K, ATTN_V]
                    .iter()
                    .map(|t| bias_in_layer(layer, t)),
            );
        }
        if options.qk_norm {
            names.extend(
                [ATTN_Q_NORM, ATTN_K_NORM]
                    .iter()
                    .map(|t| in_layer(layer, t)),
            );
        }
        names
    }

    /// Q, K, V as llama.cpp has them just before RoPE: projected, biased,
    /// and normed per head. `h`: `[n, hidden]`.
    fn project(&self, h: &Tensor, step: &Step<'_>) -> Result<(Tensor, Tensor, Tensor)> {
        let _qkv = profile::span(Op::AttentionMatmul);
        let mut qkv = Matrix::matmul_each(&[&self.wq, &self.wk, &self.wv], h, step.sequence_rows)?
            .into_iter();
        let (mut q, mut k, mut v) = match (qkv.next(), qkv.next(), qkv.next()) {
            (Some(q), Some(k), Some(v)) => (q, k, v), // [n, H*d], [n, KV*d], [n, KV*d]
            _ => return Err(candle_core::Error::Msg("a product went missing".into()).into()),
        };
        if let Some(b) = &self.biases {
            q = add_bias(&q, &b.q)?;
            k = add_bias(&k, &b.k)?;
            v = add_bias(&v, &b.v)?;
        }
        if let Some(norm) = &self.qk_norm {
            let (n, d, eps) = (h.dim(0)?, step.config.head_dim, step.config.rms_norm_eps);
            let per_head = |x: &Tensor, w: &Tensor| -> Result<Tensor> {
                let rows = x.elem_count() / d;
                rms_norm(&x.reshape((rows, d))?, w, eps)?
                    .reshape((n, rows / n * d))
                    .map_err(Into::into)
            };
            q = per_head(&q, &norm.q)?;
            k = per_head(&k, &norm.k)?;
        }
        Ok((q, k, v))
    }

    /// Causal attention of each sequence of the step over its own cache
    /// (`caches[i]` for the `i`-th); appends the new keys and values.
    /// `h`: `[n, hidden]` → `[n, hidden]`.
    pub(crate) fn forward(
        &self,
        h: &Tensor,
        step: &Step<'_>,
        caches: &mut [&mut LayerCache],
    ) -> Result<Tensor> {
        let (q, k, v) = self.project(h, step)?;
        let rope = step.ropes.get(self.options.rope_table).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "attention uses RoPE table {} of {}",
                self.options.rope_table,
                step.ropes.len()
            ))
        })?;
        let y = {
            let _attention = profile::span(Op::Attention);
            let starts: Vec<usize> = step
                .sequence_rows
                .iter()
                .scan(0, |start, &n| {
                    *start += n;
                    Some(*start - n)
                })
                .collect();
            if h.device().is_cpu() {
                // Out of the tensors once for the whole batch; then the
                // sequences share the compute pool (each one's rows and
                // heads share it too).
                let config = step.config;
                let q_row = config.n_heads * config.head_dim;
                let kv_row = config.n_kv_heads * config.head_dim;
                let values = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
                let (q, k, v) = (values(&q)?, values(&k)?, values(&v)?);
                let outs = step
                    .sequence_rows
                    .par_iter()
                    .zip(starts.par_iter())
                    .zip(caches.par_iter_mut())
                    .map(|((&n, &start), cache)| {
                        attention_cpu(
                            &q[start * q_row..(start + n) * q_row],
                            &k[start * kv_row..(start + n) * kv_row],
                            &v[start * kv_row..(start + n) * kv_row],
                            config,
                            rope.values(start, n),
                            &self.options,
                            cache,
                        )
                    })
                    .collect::<Result<Vec<Vec<f32>>>>()?;
                let rows = h.dim(0)?;
                Tensor::from_vec(
                    outs.concat(), // side by side in one buffer
                    (rows, step.config.n_heads * step.config.head_dim),
                    h.device(),
                )?
            } else {
                let sequences = step.sequence_rows.iter().zip(starts).zip(caches.iter_mut());
                let mut outs = Vec::with_capacity(step.sequence_rows.len());
                for ((&n, start), cache) in sequences {
                    let rows = |t: &Tensor| t.narrow(0, start, n);
                    outs.push(attention_candle(
                        &rows(&q)?,
                        &rows(&k)?,
                        &rows(&v)?,
                        step.config,
                        &rope.tensors(start, n)?,
                        &self.options,
                        cache,
                    )?);
                }
                Tensor::cat(&outs, 0)?
            }
        };
        let _o = profile::span(Op::AttentionMatmul);
        self.wo.matmul(&y, step.sequence_rows)
    }
}

/// One sequence's attention with ggml's arithmetic (see
/// `cpu_ops::attention`), as `[n, H*d]` values; `q` is `[n, H*d]`, `k` and
/// `v` `[n, KV*d]`, the sequence's rows of the projections.
fn attention_cpu(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    config: &ModelConfig,
    (cos, sin): (&[f32], &[f32]),
    options: &AttentionOptions,
    cache: &mut LayerCache,
) -> Result<Vec<f32>> {
    let (heads, kv_heads, d) = (config.n_heads, config.n_kv_heads, config.head_dim);
    let n = q.len() / (heads * d).max(1);
    let mut q = q.to_vec(); // [n, H, d]
    let mut k = k.to_vec(); // [n, KV, d]
    let rotate = match config.rope_style {
        RopeStyle::Pairs => cpu_ops::rope_pairs,
        RopeStyle::Halves => cpu_ops::rope_halves,
    };
    rotate(&mut q, heads, d, cos, sin);
    rotate(&mut k, kv_heads, d, cos, sin);
    // ggml_scale after RoPE: one multiply per value.
    let score_scale = match options.query_scale {
        Some(factor) => {
            q.iter_mut().for_each(|x| *x *= factor);
            1.0
        }
        None => 1.0 / (d as f32).sqrt(),
    };
    let cached = cache.append_rows(&k, v, kv_heads, d)?;
    let shape = cpu_ops::AttentionShape {
        n,
        heads,
        kv_heads,
        d,
        position: cached.len - n,
        len: cached.len,
        scale: score_scale,
        window: options.window,
    };
    Ok(cpu_ops::attention(&q, cached.keys, cached.values, &shape))
}

/// One sequence's attention with Candle's ops (GPU devices). The `H / KV`
/// query heads that share a KV head are stacked as rows of one matmul, so
/// K and V are never repeated.
fn attention_candle(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    config: &ModelConfig,
    (cos, sin): &(Tensor, Tensor),
    options: &AttentionOptions,
    cache: &mut LayerCache,
) -> Result<Tensor> {
    let rotate = match config.rope_style {
        RopeStyle::Pairs => candle_nn::rotary_emb::rope_i,
        RopeStyle::Halves => candle_nn::rotary_emb::rope,
    };
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
    let q = rotate(&q, cos, sin)?; // [1, H, n, d]
    let k = rotate(&k, cos, sin)?.squeeze(0)?; // [KV, n, d]
    let (q, scale) = match options.query_scale {
        Some(factor) => (q.affine(f64::from(factor), 0.0)?, 1.0),
        None => (q, 1.0 / (d as f64).sqrt()),
    };

    let (k_all, v_all) = cache.append(&k, &v, config.context_length)?; // [KV, len, d] each
    let len = k_all.dim(1)?;

    // Heads are ordered kv-major, so [H, n, d] = [KV, group, n, d].
    let q = q.reshape((kv_heads, group * n, d))?;
    let scores = q.matmul(&k_all.t()?)?.affine(scale, 0.0)?; // [KV, group*n, len]
    let mask = match options.window {
        Some(window) => Some(causal_mask(len - n, n, window, q.device())?),
        None if n > 1 => Some(causal_mask(len - n, n, usize::MAX, q.device())?),
        None => None,
    };
    let scores = match &mask {
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

// ---------------------------------------------------------------------------
// MLP
// ---------------------------------------------------------------------------

/// The gate's activation in a gated MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gate {
    /// SwiGLU (Llama, Qwen, Mistral).
    Silu,
    /// GeGLU with the tanh approximation of GELU (Gemma).
    GeluTanh,
}

/// The gated MLP: `down(act(gate(x)) * up(x))`.
pub(crate) struct Mlp {
    gate: Matrix, // [ff, hidden]
    up: Matrix,   // [ff, hidden]
    down: Matrix, // [hidden, ff]
    activation: Gate,
}

impl Mlp {
    pub(crate) fn load(
        weights: &mut Weights<'_>,
        layer: usize,
        config: &ModelConfig,
        activation: Gate,
    ) -> Result<Self> {
        let (hidden, ff) = (config.hidden_size, config.feed_forward_size);
        Ok(Self {
            gate: weights.matrix(&in_layer(layer, FFN_GATE), ff, hidden)?,
            up: weights.matrix(&in_layer(layer, FFN_UP), ff, hidden)?,
            down: weights.matrix(&in_layer(layer, FFN_DOWN), hidden, ff)?,
            activation,
        })
    }

    /// The GGUF names of the tensors [`load`](Self::load) reads in layer
    /// `layer`.
    pub(crate) fn tensors(layer: usize) -> Vec<String> {
        [FFN_GATE, FFN_UP, FFN_DOWN]
            .iter()
            .map(|t| in_layer(layer, t))
            .collect()
    }

    /// `h`: `[n, hidden]` → `[n, hidden]`, its rows belonging to
    /// sequences of `sequence_rows` rows each.
    pub(crate) fn forward(&self, h: &Tensor, sequence_rows: &[usize]) -> Result<Tensor> {
        let (gate, up) = {
            let _mlp = profile::span(Op::MlpMatmul);
            let mut both =
                Matrix::matmul_each(&[&self.gate, &self.up], h, sequence_rows)?.into_iter();
            match (both.next(), both.next()) {
                (Some(gate), Some(up)) => (gate, up), // [n, ff] each
                _ => return Err(candle_core::Error::Msg("a product went missing".into()).into()),
            }
        };
        let act = {
            let _gated = profile::span(Op::Elementwise);
            match self.activation {
                Gate::Silu => swiglu(&gate, &up)?,
                Gate::GeluTanh => geglu(&gate, &up)?,
            }
        };
        let _mlp = profile::span(Op::MlpMatmul);
        self.down.matmul(&act, sequence_rows) // [n, hidden]
    }
}

/// GELU(gate) * up (tanh approximation): ggml's arithmetic on the CPU,
/// Candle's elsewhere.
fn geglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.device().is_cpu() {
        cpu_ops::geglu(gate, up)
    } else {
        Ok((gate.gelu()? * up)?)
    }
}

/// SiLU(gate) * up: ggml's arithmetic on the CPU, Candle's elsewhere.
fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.device().is_cpu() {
        cpu_ops::swiglu(gate, up)
    } else {
        Ok((candle_nn::ops::silu(gate)? * up)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_mask_with_prefix() -> Result<()> {
        let m = causal_mask(2, 3, usize::MAX, &Device::Cpu)?.to_vec2::<f32>()?;
        let inf = f32::NEG_INFINITY;
        assert_eq!(
            m,
            vec![
                vec![0.0, 0.0, 0.0, inf, inf],
                vec![0.0, 0.0, 0.0, 0.0, inf],
                vec![0.0, 0.0, 0.0, 0.0, 0.0],
            ]
        );
        let m = causal_mask(2, 3, 2, &Device::Cpu)?.to_vec2::<f32>()?;
        assert_eq!(
            m,
            vec![
                vec![inf, 0.0, 0.0, inf, inf],
                vec![inf, inf, 0.0, 0.0, inf],
                vec![inf, inf, inf, 0.0, 0.0],
            ],
            "a window of two: each query sees itself and the key before"
        );
        Ok(())
    }
}
