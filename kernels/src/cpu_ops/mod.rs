//! The non-matmul ops of the forward pass on the CPU (RMS norm, RoPE,
//! attention, softmax, SwiGLU), with the same arithmetic as llama.cpp's CPU
//! back-end (ggml-cpu), so that ringlet and llama.cpp agree bit for bit
//! (see `quant` for why that matters). Each function documents the ggml
//! rounding it reproduces. Other devices use Candle's ops (`blocks`).
//!
//! The reductions are written lane by lane as ggml's AVX-512 build performs
//! them. Where ggml has AVX-512 code, `portable` holds the definition,
//! `x86` ggml's code itself, and `simd` picks one at run time (see
//! `crate::simd` for the convention).

use std::ops::Range;

use candle_core::{Device, Storage, Tensor};
use rayon::prelude::*;

use crate::error::Result;
use crate::kv_cache::{HeadRows, Pages};

mod portable;
#[cfg(target_arch = "x86_64")]
mod x86;

/// Runs `f` over the contiguous f32 data of a CPU tensor.
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("cpu op: tensor is not contiguous".into()))?;
    match &*storage {
        Storage::Cpu(cpu) => Ok(f(&cpu.as_slice::<f32>()?[start..end])),
        _ => Err(candle_core::Error::Msg("cpu op: tensor is not on the CPU".into()).into()),
    }
}

/// RMS norm then the weight, per row of `w.len()` values (ggml RMS_NORM
/// then MUL): squares are rounded to f32 and summed in f64, the mean is
/// rounded to f32, and each value is `(x * (1 / sqrt(mean + eps))) * w`.
pub(crate) fn rms_norm_mul(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    let weight = w.to_vec1::<f32>()?;
    let cols = weight.len();
    let out = with_f32(x, |x| {
        let mut out = Vec::with_capacity(x.len());
        // Each row's sum is one chain of dependent f64 additions (ggml's
        // order, so no reassociation); eight rows' chains run side by
        // side, so that a batch waits for one chain's latency, not for
        // eight in turn.
        for rows in x.chunks(SIDE_BY_SIDE_ROWS * cols.max(1)) {
            let sums = sums_of_squares(rows, cols);
            for (row, &sum) in rows.chunks_exact(cols).zip(&sums) {
                let mean = (sum / cols as f64) as f32;
                let scale = 1.0f32 / (mean + eps).sqrt();
                out.extend(row.iter().zip(&weight).map(|(&v, &w)| (v * scale) * w));
            }
        }
        out
    })?;
    Ok(Tensor::from_vec(out, x.shape(), &Device::Cpu)?)
}

/// Rows whose sums of squares [`sums_of_squares`] adds side by side.
const SIDE_BY_SIDE_ROWS: usize = 8;

/// `Σ f64(v * v)` over each row of `cols` values in `rows` (at most
/// [`SIDE_BY_SIDE_ROWS`] of them), each added in order from its first
/// value; the sums past the last row are zero.
fn sums_of_squares(rows: &[f32], cols: usize) -> [f64; SIDE_BY_SIDE_ROWS] {
    /// The sums of the first `N` rows, their chains side by side.
    fn side_by_side<const N: usize>(rows: &[f32], cols: usize) -> [f64; SIDE_BY_SIDE_ROWS] {
        let lanes: [&[f32]; N] = std::array::from_fn(|r| &rows[r * cols..(r + 1) * cols]);
        let mut sums = [0f64; SIDE_BY_SIDE_ROWS];
        // `c` picks the column in every row, `r` the row and its sum.
        #[allow(clippy::needless_range_loop)]
        for c in 0..cols {
            for r in 0..N {
                let v = lanes[r][c];
                sums[r] += f64::from(v * v);
            }
        }
        sums
    }
    match rows.len() / cols.max(1) {
        0 => [0.0; SIDE_BY_SIDE_ROWS],
        1 => side_by_side::<1>(rows, cols),
        2 => side_by_side::<2>(rows, cols),
        3 => side_by_side::<3>(rows, cols),
        4 => side_by_side::<4>(rows, cols),
        5 => side_by_side::<5>(rows, cols),
        6 => side_by_side::<6>(rows, cols),
        7 => side_by_side::<7>(rows, cols),
        _ => side_by_side::<8>(rows, cols),
    }
}

/// `x + y` for two f32 tensors of one shape (the residual additions), one
/// f32 add per value on the calling thread. Candle's binary ops hand large
/// tensors to a pool of its own whose threads then spin, taking the cores
/// the matmuls' pool runs on (about a sixth of a 2-core prefill).
pub(crate) fn add(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    if x.shape() != y.shape() {
        return Err(candle_core::Error::Msg(format!(
            "cpu add: shapes {:?} and {:?} differ",
            x.shape(),
            y.shape()
        ))
        .into());
    }
    let out = with_f32(x, |x| {
        with_f32(y, |y| {
            x.iter().zip(y).map(|(a, b)| a + b).collect::<Vec<f32>>()
        })
    })??;
    Ok(Tensor::from_vec(out, x.shape(), &Device::Cpu)?)
}

/// `x + bias` for each row of `x` (`[rows, bias.len()]`): the Q, K, V
/// biases, as [`add`] (ggml ADD with a broadcast row).
pub(crate) fn add_row(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let bias = bias.flatten_all()?.to_vec1::<f32>()?;
    let cols = x.dim(candle_core::D::Minus1)?;
    if cols != bias.len() {
        return Err(candle_core::Error::Msg(format!(
            "cpu bias add: rows of {cols} values, a bias of {}",
            bias.len()
        ))
        .into());
    }
    let out = with_f32(x, |x| {
        x.chunks_exact(cols)
            .flat_map(|row| row.iter().zip(&bias).map(|(a, b)| a + b))
            .collect::<Vec<f32>>()
    })?;
    Ok(Tensor::from_vec(out, x.shape(), &Device::Cpu)?)
}

// ---------------------------------------------------------------------------
// Reductions, written lane by lane as ggml's AVX-512 build performs them
// ---------------------------------------------------------------------------

/// `ggml_vec_dot_f32`: four 16-lane FMA accumulators over 64-element steps,
/// folded 0+2, 1+3, then 0+1, then reduced; leftovers added in order. The
/// definition [`dot_f32_rows`] is tested against.
#[cfg(test)]
fn dot_f32(x: &[f32], y: &[f32]) -> f32 {
    let n = x.len().min(y.len());
    let np = n & !63;
    let mut s = simd::dot_f32_steps(&x[..np], &y[..np]);
    for e in np..n {
        s = x[e].mul_add(y[e], s);
    }
    s
}

/// [`dot_f32`] of each `y.len()`-long row of `rows` with `y`, into `out`
/// (one per row): the keys' scores against one query.
pub(crate) fn dot_f32_rows(rows: &[f32], y: &[f32], out: &mut [f32]) {
    let d = y.len();
    let np = d & !63;
    simd::dot_f32_steps_rows(rows, d, &y[..np], out);
    for (row, s) in rows.chunks_exact(d).zip(out.iter_mut()) {
        for e in np..d {
            *s = row[e].mul_add(y[e], *s);
        }
    }
}

/// llamafile's tinyBLAS f32 kernel for one output: one 16-lane FMA
/// accumulator stepping through `k` (a multiple of 16), then reduced. The
/// definition that `SumScratch::tiny_blas` is tested against.
#[cfg(test)]
fn dot_f32_tiny_blas(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    for (xs, ys) in x.chunks_exact(16).zip(y.chunks_exact(16)) {
        for l in 0..16 {
            acc[l] = xs[l].mul_add(ys[l], acc[l]);
        }
    }
    portable::reduce_add16(&acc)
}

// ---------------------------------------------------------------------------
// exp, SiLU and SwiGLU
// ---------------------------------------------------------------------------

/// `gate * up` through SiLU per row of `cols`, as `ggml_vec_swiglu_f32`:
/// 16-wide chunks use `v_expf`, a remainder uses libm `expf`.
pub(crate) fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let cols = gate.dim(candle_core::D::Minus1)?;
    let up_values = up.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let out = with_f32(gate, |g| {
        let mut out = vec![0f32; g.len()];
        // Rows are independent: they share the compute pool.
        out.par_chunks_mut(cols)
            .zip(g.par_chunks(cols).zip(up_values.par_chunks(cols)))
            .for_each(|(out, (x, u))| swiglu_row(x, u, out));
        out
    })?;
    Ok(Tensor::from_vec(out, gate.shape(), &Device::Cpu)?)
}

/// One row of [`swiglu`]: 16-wide chunks with `v_expf`, the rest with
/// libm's `expf`, as `ggml_vec_swiglu_f32`.
fn swiglu_row(x: &[f32], u: &[f32], out: &mut [f32]) {
    let chunked = x.len() & !15;
    simd::swiglu_chunks(&x[..chunked], &u[..chunked], &mut out[..chunked]);
    for i in chunked..x.len() {
        out[i] = (x[i] / (1.0 + (-x[i]).exp())) * u[i];
    }
}

/// `GELU(gate) * up` per value, as `ggml_vec_geglu_f32` in ggml's build
/// (`GGML_GELU_FP16`): GELU is looked up in a table of all f16 inputs, so
/// the input is rounded to f16 and the GELU to f16 before the multiply;
/// inputs at or below -10 give 0, at or above 10 give `x * up`.
pub(crate) fn geglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let cols = gate.dim(candle_core::D::Minus1)?;
    let up_values = up.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let table = gelu_table();
    let out = with_f32(gate, |g| {
        let mut out = vec![0f32; g.len()];
        out.par_chunks_mut(cols)
            .zip(g.par_chunks(cols).zip(up_values.par_chunks(cols)))
            .for_each(|(out, (x, u))| {
                for ((y, &x), &u) in out.iter_mut().zip(x).zip(u) {
                    *y = if x <= -10.0 {
                        0.0
                    } else if x >= 10.0 {
                        x * u
                    } else {
                        table[usize::from(half::f16::from_f32(x).to_bits())] * u
                    };
                }
            });
        out
    })?;
    Ok(Tensor::from_vec(out, gate.shape(), &Device::Cpu)?)
}

/// ggml's `ggml_table_gelu_f16`, widened to f32: for every f16 input,
/// `f16(0.5x(1 + tanh(√(2/π)·x·(1 + 0.044715x²))))`, with the one FMA GCC
/// contracts (`1 + (0.044715x)·x`) and libm's `tanhf`.
fn gelu_table() -> &'static [f32] {
    static TABLE: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        const GELU_COEF_A: f32 = 0.044715;
        const SQRT_2_OVER_PI: f32 = 0.797_884_6;
        (0..=u16::MAX)
            .map(|bits| {
                let x = half::f16::from_bits(bits).to_f32();
                let inner = (GELU_COEF_A * x).mul_add(x, 1.0);
                let gelu = 0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * inner).tanh());
                half::f16::from_f32(gelu).to_f32()
            })
            .collect()
    })
}

// ---------------------------------------------------------------------------
// RoPE
// ---------------------------------------------------------------------------

/// Rotates adjacent pairs of each head in place (llama's "normal" RoPE).
/// `x` is `[n, heads, d]`, `cos`/`sin` are `[n, d/2]`. GCC contracts ggml's
/// `x0*c - x1*s` and `x0*s + x1*c` to `fma(x0, c, -(x1*s))` and
/// `fma(x0, s, x1*c)`; so do we.
pub(crate) fn rope_pairs(x: &mut [f32], heads: usize, d: usize, cos: &[f32], sin: &[f32]) {
    rotate(x, heads, d, cos, sin, |p, _| (2 * p, 2 * p + 1));
}

/// Rotates the halves of each head in place (GPT-NeoX's RoPE, which
/// Qwen, Gemma and Phi-3 use): dimension `p` with `p + d/2`. Shapes and
/// contractions as [`rope_pairs`].
pub(crate) fn rope_halves(x: &mut [f32], heads: usize, d: usize, cos: &[f32], sin: &[f32]) {
    rotate(x, heads, d, cos, sin, |p, half| (p, p + half));
}

/// RoPE in place, rotating the dimensions `pair(p, d/2)` of each head by
/// angle `p` of the token's table.
fn rotate(
    x: &mut [f32],
    heads: usize,
    d: usize,
    cos: &[f32],
    sin: &[f32],
    pair: impl Fn(usize, usize) -> (usize, usize),
) {
    let half = d / 2;
    for (t, token) in x.chunks_exact_mut(heads * d).enumerate() {
        let (cos, sin) = (
            &cos[t * half..(t + 1) * half],
            &sin[t * half..(t + 1) * half],
        );
        for head in token.chunks_exact_mut(d) {
            for p in 0..half {
                let (i0, i1) = pair(p, half);
                let (x0, x1) = (head[i0], head[i1]);
                head[i0] = x0.mul_add(cos[p], -(x1 * sin[p]));
                head[i1] = x0.mul_add(sin[p], x1 * cos[p]);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Attention
// ---------------------------------------------------------------------------

/// The shapes of one attention call.
pub(crate) struct AttentionShape {
    pub n: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub d: usize,
    /// Absolute position of the first of the `n` queries.
    pub position: usize,
    /// Keys and values cached, the `n` new ones included.
    pub len: usize,
    /// What each score `k · q` is multiplied by (`1/√d`, or 1 where the
    /// queries were scaled already).
    pub scale: f32,
    /// A query at position `p` sees only keys `p - window + 1 ..= p`.
    pub window: Option<usize>,
}

/// Causal grouped-query attention with ggml's arithmetic.
///
/// `q` is `[n, heads, d]` (after RoPE); `keys` and `values` are the
/// cache's pages, `len` rows of each KV head filled. llama.cpp attends
/// over a KV window padded to a multiple of 256 with masked, zero-valued
/// slots; every reduction below sees the same values in the same lanes
/// when the window is padded to a multiple of 64, because the padding
/// adds exact zeros.
/// Scores use `ggml_vec_dot_f32`; the value sum uses tinyBLAS for a batch
/// of queries and `ggml_vec_dot_f32` for one, as llama.cpp does.
pub(crate) fn attention(
    q: &[f32],
    keys: Pages<'_>,
    values: Pages<'_>,
    s: &AttentionShape,
) -> Vec<f32> {
    let AttentionShape {
        n,
        heads,
        kv_heads,
        d,
        position,
        len,
        scale,
        window,
    } = *s;
    let group = heads / kv_heads;
    let padded = len.div_ceil(64) * 64;
    let tiny_blas = n >= 2 && d % 4 == 0;
    let mut out = vec![0f32; n * heads * d];
    // Every (token, head) row is independent: they share the compute pool,
    // each thread reusing its own buffers for every row of every call
    // (allocating and zeroing them per row, or per split of the rows as
    // `for_each_init` does, cost more than a short context's sums).
    out.par_chunks_mut(d)
        .enumerate()
        .for_each(|(row, out_row)| {
            ATTENTION_SCRATCH.with_borrow_mut(|(scores, scratch)| {
                scores.resize(padded, 0.0);
                if scratch.d != d {
                    *scratch = SumScratch::new(d);
                }
                let (i, h) = (row / heads, row % heads);
                let kv = h / group;
                let (k_head, v_head) = (keys.head(kv), values.head(kv));
                let q_row = &q[row * d..(row + 1) * d];
                let visible = position + i + 1;
                let first_visible = window.map_or(0, |w| visible.saturating_sub(w));
                scores.fill(f32::NEG_INFINITY);
                for (first, rows) in k_head.runs(first_visible..visible) {
                    let run = &mut scores[first..first + rows.len() / d];
                    dot_f32_rows(rows, q_row, run);
                }
                let seen = &mut scores[first_visible..visible];
                seen.iter_mut().for_each(|score| *score *= scale);
                softmax_in_place(scores);
                // The masked keys' weights are exactly zero: they add nothing.
                let seen = first_visible..visible;
                if tiny_blas {
                    scratch.tiny_blas(v_head, &scores[..len], seen, out_row);
                } else {
                    scratch.vec_dot(v_head, &scores[..len], seen, out_row);
                }
            });
        });
    out
}

thread_local! {
    /// One attention row's scores and weighted-sum lanes, per thread.
    static ATTENTION_SCRATCH: std::cell::RefCell<(Vec<f32>, SumScratch)> =
        std::cell::RefCell::new((Vec::new(), SumScratch::new(0)));
}

/// The weighted sums of attention over `d`-value rows, with the buffers
/// each thread keeps for the rows it runs.
struct SumScratch {
    d: usize,
    /// `[16, d]`: the 16 lanes of each column's sum.
    lanes: Vec<f32>,
    /// `[8, d]`: the first halving of the lanes.
    eights: Vec<f32>,
}

impl SumScratch {
    fn new(d: usize) -> Self {
        Self {
            d,
            lanes: vec![0f32; 16 * d],
            eights: vec![0f32; 8 * d],
        }
    }

    /// `out[c] = Σ_j p[j] · v[j][c]` for every `c`, each sum with exactly
    /// the lanes and order of `dot_f32` over a window padded with zeros
    /// (which add nothing), but walking `v` by rows so the loads are
    /// contiguous. Only the rows `keys` are read: every other weight in `p`
    /// must be zero, and so adds nothing either (an FMA with a zero product
    /// returns the accumulator, which starts at +0 and so is never -0). The
    /// 16 lanes come from `simd::dot_lanes`, then each column is reduced.
    fn vec_dot(&mut self, v: HeadRows<'_>, p: &[f32], keys: Range<usize>, out: &mut [f32]) {
        let keys = keys.start..keys.end.min(p.len());
        // Every lane value is written, so the buffer is not cleared first.
        simd::dot_lanes(v, p, keys, &mut self.lanes);
        self.reduce_lanes(out);
    }

    /// As [`vec_dot`](Self::vec_dot), with tinyBLAS's single 16-lane
    /// accumulator.
    fn tiny_blas(&mut self, v: HeadRows<'_>, p: &[f32], keys: Range<usize>, out: &mut [f32]) {
        let d = self.d;
        self.lanes.fill(0.0);
        for (j, &pj) in p.iter().enumerate().take(keys.end).skip(keys.start) {
            let slot = &mut self.lanes[(j % 16) * d..][..d];
            for (a, &vc) in slot.iter_mut().zip(v.row(j)) {
                *a = vc.mul_add(pj, *a);
            }
        }
        self.reduce_lanes(out);
    }

    /// [`portable::reduce_add16`] of every column of the lanes into `out`:
    /// per column the same additions in the same order, written as loops
    /// over columns so that they run as vector instructions.
    fn reduce_lanes(&mut self, out: &mut [f32]) {
        let d = self.d;
        let lanes = &self.lanes;
        let lane = |l: usize| &lanes[l * d..][..d];
        for (i, t) in self.eights.chunks_exact_mut(d).enumerate() {
            let (hi, lo) = (lane(8 + i), lane(i));
            for c in 0..d {
                t[c] = hi[c] + lo[c];
            }
        }
        let t = |i: usize| &self.eights[i * d..][..d];
        let (t0, t1, t2, t3, t4, t5, t6, t7) = (t(0), t(1), t(2), t(3), t(4), t(5), t(6), t(7));
        for c in 0..d {
            let q = [t4[c] + t0[c], t5[c] + t1[c], t6[c] + t2[c], t7[c] + t3[c]];
            out[c] = (q[0] + q[2]) + (q[1] + q[3]);
        }
    }
}

/// `ggml_compute_forward_soft_max_f32` after scale and mask, over a row
/// whose length is a multiple of 16: `v_expf(x - max)` per 16-chunk, each
/// chunk's float sum added in f64, then a multiply by `(float)(1 / sum)`.
fn softmax_in_place(row: &mut [f32]) {
    // The largest score, 16 lanes at a time (one dependent comparison per
    // score was most of the softmax). Which of +0 and -0 a zero maximum
    // is does not matter: `x - max` is the same for both.
    let larger = |m: f32, v: f32| if v > m { v } else { m };
    let mut lanes = [f32::NEG_INFINITY; 16];
    let chunks = row.chunks_exact(16);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = larger(*lane, v);
        }
    }
    let max = lanes
        .iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, |m, &v| larger(m, v));
    let mut sum = 0f64;
    for chunk in row.chunks_exact_mut(16) {
        sum += f64::from(simd::exp_chunk(chunk, max));
    }
    let inv = (1.0 / sum) as f32;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// The ops used at run time: ggml's AVX-512 code where the CPU has it,
/// else the portable definition.
mod simd {
    use super::portable;
    #[cfg(target_arch = "x86_64")]
    use super::x86;
    use crate::kv_cache::HeadRows;
    use crate::simd::fast_path;

    /// The 64-element steps of `dot_f32`, reduced.
    #[cfg(test)]
    pub(super) fn dot_f32_steps(x: &[f32], y: &[f32]) -> f32 {
        fast_path!(
            avx512f => x86::dot_f32_steps(x, y),
            avx2_fma => x86::dot_f32_steps_avx2(x, y);
            portable::dot_f32_steps(x, y)
        )
    }

    /// [`dot_f32_steps`] of each `d`-long row of `rows` (over its first
    /// `y.len()` values) with `y`, into `out`.
    pub(super) fn dot_f32_steps_rows(rows: &[f32], d: usize, y: &[f32], out: &mut [f32]) {
        fast_path!(
            avx512f => x86::dot_f32_steps_rows(rows, d, y, out),
            avx2_fma => x86::dot_f32_steps_rows_avx2(rows, d, y, out);
            portable::dot_f32_steps_rows(rows, d, y, out)
        )
    }

    /// The 16 lanes of `SumScratch::vec_dot`'s sums, `[16, d]`.
    pub(super) fn dot_lanes(
        v: HeadRows<'_>,
        p: &[f32],
        keys: std::ops::Range<usize>,
        lanes: &mut [f32],
    ) {
        if v.d().is_multiple_of(64) {
            fast_path!(avx512f => x86::dot_lanes(v, p, keys, lanes); portable::dot_lanes(v, p, keys, lanes))
        } else {
            portable::dot_lanes(v, p, keys, lanes)
        }
    }

    /// SiLU(x) * u over whole 16-value chunks.
    pub(super) fn swiglu_chunks(x: &[f32], u: &[f32], out: &mut [f32]) {
        fast_path!(
            avx512f => x86::swiglu_chunks(x, u, out),
            avx2_fma => x86::swiglu_chunks_avx2(x, u, out);
            portable::swiglu_chunks(x, u, out)
        )
    }

    /// `v_expf(v - max)` of a 16-value softmax chunk, and its sum.
    pub(super) fn exp_chunk(chunk: &mut [f32], max: f32) -> f32 {
        fast_path!(
            avx512f => x86::exp_chunk(chunk, max),
            avx2_fma => x86::exp_chunk_avx2(chunk, max);
            portable::exp_chunk(chunk, max)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::portable::{
        dot_f32_steps as dot_f32_steps_portable, exp_chunk as exp_chunk_portable,
        swiglu_chunks as swiglu_chunks_portable, v_expf,
    };
    use super::simd::{dot_f32_steps, exp_chunk, swiglu_chunks};
    use super::*;
    use crate::kv_cache::{PAGE_TOKENS, Page};

    #[test]
    fn rms_norm_of_rows_side_by_side_equals_ggml_s_loop_row_by_row() {
        let mut state = crate::test_random::lcg(11);
        let mut value = || (state() >> 40) as f32 / (1u64 << 22) as f32 - 2.0;
        let cols = 576;
        let weight: Vec<f32> = (0..cols).map(|_| value()).collect();
        let w = Tensor::from_vec(weight.clone(), cols, &Device::Cpu).expect("weight");
        // One row, a part of a group, a whole group, two groups and a part.
        for rows in [1, 3, 8, 19] {
            let x: Vec<f32> = (0..rows * cols).map(|_| value() * 40.0).collect();
            let t = Tensor::from_vec(x.clone(), (rows, cols), &Device::Cpu).expect("x");
            let got = rms_norm_mul(&t, &w, 1e-5)
                .and_then(|t| Ok(t.flatten_all()?.to_vec1::<f32>()?))
                .expect("norm");
            let mut want = Vec::new();
            for row in x.chunks_exact(cols) {
                let mut sum = 0f64;
                for &v in row {
                    sum += f64::from(v * v);
                }
                let scale = 1.0f32 / ((sum / cols as f64) as f32 + 1e-5).sqrt();
                want.extend(row.iter().zip(&weight).map(|(&v, &w)| (v * scale) * w));
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{rows} rows");
        }
    }

    #[test]
    fn v_expf_is_close_to_exp_and_saturates() {
        for x in [-80.0f32, -10.0, -1.5, -0.1, 0.0, 0.3, 1.0, 5.0, 20.0, 80.0] {
            let (got, want) = (v_expf(x), x.exp());
            // ggml documents about 1.5 ulp of error; allow 3.
            assert!(((got - want) / want).abs() < 4e-7, "{x}: {got} vs {want}");
        }
        assert_eq!(v_expf(f32::NEG_INFINITY), 0.0);
        assert_eq!(v_expf(-200.0), 0.0);
        assert_eq!(v_expf(200.0), f32::INFINITY);
    }

    /// `v_expf` as first written, with an early return: the definition
    /// the branch-free version is held to.
    fn v_expf_with_branch(x: f32) -> f32 {
        let r = f32::from_bits(0x4B40_0000);
        let z = x.mul_add(f32::from_bits(0x3FB8_AA3B), r);
        let n = z - r;
        let b = (-n).mul_add(
            f32::from_bits(0x35BF_BE8E),
            (-n).mul_add(f32::from_bits(0x3F31_7200), x),
        );
        let u = b * b;
        let j = f32::from_bits(0x3C07_2010)
            .mul_add(b, f32::from_bits(0x3D2B_9F17))
            .mul_add(
                u,
                f32::from_bits(0x3E2A_AF33).mul_add(b, f32::from_bits(0x3EFF_FEDB)),
            )
            .mul_add(u, f32::from_bits(0x3F7F_FFF6).mul_add(b, 1.0));
        if n.abs() > 192.0 {
            return if n <= 0.0 { 0.0 } else { f32::INFINITY };
        }
        let two_to_n = f64::from_bits(((n as i64 + 1023) as u64) << 52);
        (f64::from(j) * two_to_n) as f32
    }

    #[test]
    fn branch_free_v_expf_equals_the_definition_bit_for_bit() {
        let mut state = crate::test_random::lcg(7);
        let mut inputs: Vec<f32> = (-300_000..300_000).map(|i| i as f32 / 1000.0).collect();
        inputs.extend((0..200_000).map(|_| f32::from_bits((state() >> 32) as u32)));
        inputs.extend([
            f32::NEG_INFINITY,
            f32::INFINITY,
            0.0,
            -0.0,
            f32::MIN_POSITIVE,
        ]);
        for x in inputs {
            let (got, want) = (v_expf(x), v_expf_with_branch(x));
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{x}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn fast_f32_dots_equal_the_portable_definition_bit_for_bit() {
        let mut state = crate::test_random::lcg(3);
        let mut next = move || ((state() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 20.0;
        for steps in [1usize, 2, 3, 8] {
            for _ in 0..200 {
                let x: Vec<f32> = (0..64 * steps).map(|_| next()).collect();
                let y: Vec<f32> = (0..64 * steps).map(|_| next()).collect();
                assert_eq!(
                    dot_f32_steps(&x, &y).to_bits(),
                    dot_f32_steps_portable(&x, &y).to_bits()
                );
            }
        }
    }

    #[test]
    fn row_dots_equal_one_dot_per_row() {
        // 9 rows: fewer than a group of 16 reduced together; 40: two
        // groups and 8 left over.
        for (n, d) in [9usize, 40]
            .into_iter()
            .flat_map(|n| [40usize, 64, 72, 128, 256].map(|d| (n, d)))
        {
            let rows: Vec<f32> = (0..n * d)
                .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 37.0)
                .collect();
            let y: Vec<f32> = (0..d)
                .map(|i| ((i * 31 % 97) as f32 - 48.0) / 301.0)
                .collect();
            let mut out = vec![0f32; n];
            dot_f32_rows(&rows, &y, &mut out);
            for (row, got) in rows.chunks_exact(d).zip(&out) {
                assert_eq!(got.to_bits(), dot_f32(row, &y).to_bits(), "d = {d}");
            }
        }
    }

    #[test]
    fn fast_exp_chunks_equal_the_portable_definition_bit_for_bit() {
        let mut state = crate::test_random::lcg(11);
        let mut next = move || (state() >> 40) as f32 / (1u64 << 24) as f32;
        for round in 0..20_000 {
            // Scores from -250 to 250 around the max, with masked slots.
            let mut values: Vec<f32> = (0..16)
                .map(|i| match (round + i) % 11 {
                    0 => f32::NEG_INFINITY,
                    1 => 0.0,
                    _ => (next() - 0.5) * 500.0,
                })
                .collect();
            let max = values.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let mut reference = values.clone();
            let sum = exp_chunk(&mut values, max);
            let want = exp_chunk_portable(&mut reference, max);
            assert_eq!(sum.to_bits(), want.to_bits(), "sum, round {round}");
            assert_eq!(
                values.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                reference.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "round {round}"
            );
        }
    }

    #[test]
    fn fast_swiglu_equals_the_portable_definition_bit_for_bit() {
        let mut state = crate::test_random::lcg(5);
        let mut next = move || ((state() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 60.0;
        let mut x: Vec<f32> = (0..16 * 4096).map(|_| next()).collect();
        // Gates whose exponent only one-rounding `scalef` handles (about
        // 87 to 133 in size), saturating ones, and non-finite ones.
        for (i, far) in [
            -90.0f32,
            95.0,
            -120.0,
            130.0,
            -140.0,
            300.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
        ]
        .into_iter()
        .enumerate()
        {
            x[i * 37] = far;
            x[1000 + i * 8] = far * 0.99;
        }
        let u: Vec<f32> = (0..16 * 4096).map(|_| next()).collect();
        let (mut fast, mut reference) = (vec![0f32; x.len()], vec![0f32; x.len()]);
        swiglu_chunks(&x, &u, &mut fast);
        swiglu_chunks_portable(&x, &u, &mut reference);
        for (i, (f, r)) in fast.iter().zip(&reference).enumerate() {
            assert!(
                f.to_bits() == r.to_bits() || (f.is_nan() && r.is_nan()),
                "{}: {f} vs {r}",
                x[i]
            );
        }
    }

    #[test]
    fn reductions_sum_correctly() {
        let x: Vec<f32> = (0..200).map(|i| (i % 7) as f32 - 3.0).collect();
        let y: Vec<f32> = (0..200).map(|i| (i % 5) as f32 * 0.5).collect();
        let exact: f32 = x.iter().zip(&y).map(|(a, b)| a * b).sum();
        assert_eq!(
            dot_f32(&x, &y),
            exact,
            "small integers sum exactly in any order"
        );
        assert_eq!(
            dot_f32_tiny_blas(&x[..192], &y[..192]),
            x[..192]
                .iter()
                .zip(&y[..192])
                .map(|(a, b)| a * b)
                .sum::<f32>()
        );
    }

    #[test]
    fn row_walking_weighted_sums_equal_the_column_dots() {
        for (len, d) in [(150usize, 8usize), (200, 64), (17, 128), (70, 256)] {
            weighted_sums_match(len, d, 0..len);
        }
        // A causal row (keys after the query masked) and a sliding window.
        weighted_sums_match(150, 64, 0..77);
        weighted_sums_match(150, 64, 40..113);
    }

    /// The sums reading only `keys`, against the dots over every key with
    /// zero weights outside `keys`; and where this CPU has AVX-512 and `d`
    /// is a multiple of 64, its lanes (the accumulators in registers)
    /// against the portable ones.
    fn weighted_sums_match(len: usize, d: usize, keys: Range<usize>) {
        let v: Vec<f32> = (0..len * d)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 37.0)
            .collect();
        let p: Vec<f32> = (0..len)
            .map(|j| {
                if keys.contains(&j) {
                    ((j * 31 % 97) as f32) / 3001.0
                } else {
                    0.0
                }
            })
            .collect();
        let padded = len.div_ceil(64) * 64;
        let mut p_pad = p.clone();
        p_pad.resize(padded, 0.0);
        // The rows as the second of two KV heads in cache pages (the last
        // page padded with zeros); the first head's rows are NaN, so a sum
        // that read them would show it.
        let pages: Vec<Page> = v
            .chunks(PAGE_TOKENS * d)
            .map(|rows| {
                let mut page = vec![f32::NAN; PAGE_TOKENS * d];
                page.extend_from_slice(rows);
                page.resize(2 * PAGE_TOKENS * d, 0.0);
                Page::from_values(&page)
            })
            .collect();
        let rows = Pages::new(&pages, d).head(1);
        #[cfg(target_arch = "x86_64")]
        if crate::simd::CpuFeatures::get().avx512f && d.is_multiple_of(64) {
            let (mut fast, mut definition) = (vec![0f32; 16 * d], vec![0f32; 16 * d]);
            // SAFETY: this CPU has AVX-512F (checked above).
            unsafe { super::x86::dot_lanes(rows, &p, keys.clone(), &mut fast) };
            super::portable::dot_lanes(rows, &p, keys.clone(), &mut definition);
            let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&fast), bits(&definition), "{len} keys of {d} values");
        }
        let (mut a, mut b) = (vec![0f32; d], vec![0f32; d]);
        // One scratch for both, dirty from the first when the second runs.
        let mut scratch = SumScratch::new(d);
        scratch.lanes.fill(f32::NAN);
        scratch.vec_dot(rows, &p, keys.clone(), &mut a);
        scratch.tiny_blas(rows, &p, keys, &mut b);
        for c in 0..d {
            let mut col: Vec<f32> = (0..len).map(|j| v[j * d + c]).collect();
            col.resize(padded, 0.0);
            assert_eq!(a[c].to_bits(), dot_f32(&col, &p_pad).to_bits());
            assert_eq!(b[c].to_bits(), dot_f32_tiny_blas(&col, &p_pad).to_bits());
        }
    }

    /// Attention over paged keys and values, causal and with a sliding
    /// window that starts inside a page, against sums in f64 over the
    /// rows each query sees. Every row no query sees (before the window,
    /// past the cached length) is NaN: reading one would show.
    #[test]
    fn paged_attention_reads_the_rows_each_query_sees() {
        let mut state = crate::test_random::lcg(5);
        let mut value = || (state() >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
        for (d, window) in [(64, None), (64, Some(50)), (8, Some(50)), (8, None)] {
            let shape = AttentionShape {
                n: 3,
                heads: 4,
                kv_heads: 2,
                d,
                position: 147,
                len: 150,
                scale: 1.0 / (d as f32).sqrt(),
                window,
            };
            let AttentionShape {
                n,
                heads,
                kv_heads,
                len,
                position,
                ..
            } = shape;
            // The first row any query sees.
            let first_seen = window.map_or(0, |w| position + 1 - w);
            let pages_for = |value: &mut dyn FnMut() -> f32| -> Vec<Page> {
                (0..len.div_ceil(PAGE_TOKENS))
                    .map(|page| {
                        let mut rows = Vec::with_capacity(kv_heads * PAGE_TOKENS * d);
                        for _ in 0..kv_heads {
                            for slot in 0..PAGE_TOKENS {
                                let j = page * PAGE_TOKENS + slot;
                                let seen = (first_seen..len).contains(&j);
                                rows.extend((0..d).map(|_| if seen { value() } else { f32::NAN }));
                            }
                        }
                        Page::from_values(&rows)
                    })
                    .collect()
            };
            let (keys, values) = (pages_for(&mut value), pages_for(&mut value));
            let q: Vec<f32> = (0..n * heads * d).map(|_| value()).collect();
            let (k, v) = (Pages::new(&keys, d), Pages::new(&values, d));
            let out = attention(&q, k, v, &shape);
            for i in 0..n {
                let visible = position + i + 1;
                let first = window.map_or(0, |w| visible - w);
                for h in 0..heads {
                    let (k, v) = (k.head(h / 2), v.head(h / 2));
                    let q = &q[(i * heads + h) * d..][..d];
                    let scores: Vec<f64> = (first..visible)
                        .map(|j| {
                            let dot: f64 = (0..d).map(|c| f64::from(k.row(j)[c] * q[c])).sum();
                            dot * f64::from(shape.scale)
                        })
                        .collect();
                    let max = scores.iter().copied().fold(f64::MIN, f64::max);
                    let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let total: f64 = weights.iter().sum();
                    for c in 0..d {
                        let want: f64 = (first..visible)
                            .zip(&weights)
                            .map(|(j, w)| w / total * f64::from(v.row(j)[c]))
                            .sum();
                        let got = f64::from(out[(i * heads + h) * d + c]);
                        assert!(
                            (got - want).abs() < 1e-5,
                            "d {d}, window {window:?}, query {i}, head {h}, column {c}: {got} against {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn softmax_rows_sum_to_one_and_mask() {
        let mut row = vec![f32::NEG_INFINITY; 32];
        row[..3].copy_from_slice(&[1.0, 2.0, 3.0]);
        softmax_in_place(&mut row);
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(row[3..].iter().all(|&p| p == 0.0));
        assert!(row[2] > row[1] && row[1] > row[0]);
    }
}
