//! Quantized weight matrices in GGML block formats, multiplied with the
//! same arithmetic as llama.cpp's CPU back-end (ggml-cpu, x86 AVX2 path).
//!
//! Why our own kernels: greedy decoding flips on logit gaps of a few
//! hundredths, so "close to llama.cpp" is not "the same answer as
//! llama.cpp". Candle rounds the Q8_1 block sum in half precision
//! (`f16(sum) * f16(d)`), where ggml computes `f16(d * sum)` in f32, and
//! differs in rounding mode and accumulation order; that was enough to
//! change the first generated token of the golden chats. Here every step
//! follows ggml:
//!
//! - activations are quantized per 32-value block with `d = max|x| / 127`,
//!   `q = round_half_even(x * (127 / max|x|))`, and for Q8_1 `s = f16(d * Σq)`;
//! - a dot product keeps eight f32 lanes, lane `j` accumulating
//!   `fma(dx * dy, Σ_{t<4} qx[4j+t] * qy[4j+t], acc_j)` block after block,
//!   then sums the lanes as `((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7))`;
//! - Q4_1 adds `Σ_blocks m * s` accumulated separately, in block order.
//!
//! `portable` holds the definitions; `x86` the AVX2 and AVX-512 VNNI
//! versions of ggml, tested to give bit-identical results; `simd` picks
//! one at run time (see `crate::simd` for the convention).
//!
//! The K-quants (Q4_K, Q5_K, Q6_K) multiply with Q8_K activations (`d: f32`,
//! 256 values, sums of each 16) and keep every integer exact; llama.cpp's
//! x86 build turns those integers into floats in four different ways
//! depending on the matrix and the batch (see `portable::KKernel`), and so
//! does ringlet, output by output.
//!
//! Block layouts (little endian, 32 values per block):
//! - Q4_0: `d: f16, qs: [u8; 16]` — value `i` is nibble `i` (low nibbles
//!   first, then high), minus 8, times `d`;
//! - Q4_1: `d: f16, m: f16, qs: [u8; 16]` — nibble times `d` plus `m`;
//! - Q8_0: `d: f16, qs: [i8; 32]`;
//! - Q8_1 (activations only): `d: f16, s: f16, qs: [i8; 32]`.

use candle_core::quantized::GgmlDType;
use rayon::prelude::*;

use crate::error::{KernelError, Result};

mod portable;
mod q4_k_x8;
mod task_output;
#[cfg(target_arch = "x86_64")]
mod x86;

use portable::{KKernel, f16_at, nibble};
use task_output::TaskOutput;

/// Values per block in the 32-value formats (Q4_0, Q4_1, Q5_0, Q8_0).
pub const BLOCK_VALUES: usize = 32;
/// Values per super-block in the K-quant formats (ggml's `QK_K`).
pub const K_BLOCK_VALUES: usize = 256;

/// The weight formats ringlet's own kernels handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockFormat {
    Q4_0,
    Q4_1,
    Q5_0,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

impl BlockFormat {
    pub fn from_ggml(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q4_0 => Some(Self::Q4_0),
            GgmlDType::Q4_1 => Some(Self::Q4_1),
            GgmlDType::Q5_0 => Some(Self::Q5_0),
            GgmlDType::Q8_0 => Some(Self::Q8_0),
            GgmlDType::Q4K => Some(Self::Q4K),
            GgmlDType::Q5K => Some(Self::Q5K),
            GgmlDType::Q6K => Some(Self::Q6K),
            _ => None,
        }
    }

    /// Values per block.
    pub const fn block_values(self) -> usize {
        match self {
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q8_0 => BLOCK_VALUES,
            Self::Q4K | Self::Q5K | Self::Q6K => K_BLOCK_VALUES,
        }
    }

    /// Bytes of one block.
    pub const fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q8_0 => 34,
            Self::Q4K => 144,
            Self::Q5K => 176,
            Self::Q6K => 210,
        }
    }

    /// Bytes per block of the activations this format multiplies with
    /// (formats with equal values share one quantization of them).
    pub const fn activation_bytes(self) -> usize {
        self.activation().block_bytes()
    }

    /// The format activations are quantized to before the dot product.
    const fn activation(self) -> Activation {
        match self {
            Self::Q4_0 | Self::Q5_0 | Self::Q8_0 => Activation::Q8_0,
            Self::Q4_1 => Activation::Q8_1,
            Self::Q4K | Self::Q5K | Self::Q6K => Activation::Q8K,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Activation {
    Q8_0,
    Q8_1,
    /// `d: f32, qs: [i8; 256], bsums: [i16; 16]` (sums of each 16 qs).
    Q8K,
}

impl Activation {
    const fn block_bytes(self) -> usize {
        match self {
            Self::Q8_0 => 34,
            Self::Q8_1 => 36,
            Self::Q8K => 292,
        }
    }

    const fn block_values(self) -> usize {
        match self {
            Self::Q8_0 | Self::Q8_1 => BLOCK_VALUES,
            Self::Q8K => K_BLOCK_VALUES,
        }
    }
}

/// A `[rows, cols]` matrix of quantized weights (rows are output features).
pub struct QuantMatrix {
    format: BlockFormat,
    rows: usize,
    cols: usize,
    /// The GGUF bytes, row after row, except where
    /// [`interleaved`](Self::interleaved).
    data: Vec<u8>,
}

impl std::fmt::Debug for QuantMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuantMatrix")
            .field("format", &self.format)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish()
    }
}

impl QuantMatrix {
    /// Wraps raw GGUF tensor bytes. `cols` must be a multiple of the
    /// format's block and `data` exactly `rows * cols / block` blocks.
    pub fn new(
        name: &str,
        format: BlockFormat,
        rows: usize,
        cols: usize,
        data: Vec<u8>,
    ) -> Result<Self> {
        let expected = rows
            .checked_mul(cols / format.block_values())
            .and_then(|b| b.checked_mul(format.block_bytes()));
        if !cols.is_multiple_of(format.block_values()) || expected != Some(data.len()) {
            return Err(KernelError::TensorShape {
                name: name.to_string(),
                expected: vec![rows, cols, expected.unwrap_or(usize::MAX)],
                got: vec![rows, cols, data.len()],
            });
        }
        let data = if Self::repacks(format, rows) {
            q4_k_x8::repack(&data, rows, cols / K_BLOCK_VALUES)
        } else {
            data
        };
        Ok(Self {
            format,
            rows,
            cols,
            data,
        })
    }

    /// Whether a matrix of `format` with `rows` rows is stored repacked:
    /// Q4_K with a multiple of 8 rows, eight rows at a time as llama.cpp's
    /// x86 build repacks it (see [`q4_k_x8`]), and multiplied only with
    /// its `gemv` and `gemm` kernels.
    fn repacks(format: BlockFormat, rows: usize) -> bool {
        format == BlockFormat::Q4K && rows.is_multiple_of(8)
    }

    fn interleaved(&self) -> bool {
        Self::repacks(self.format, self.rows)
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn format(&self) -> BlockFormat {
        self.format
    }

    pub fn byte_len(&self) -> usize {
        self.data.len()
    }

    fn row_bytes(&self) -> usize {
        self.cols / self.format.block_values() * self.format.block_bytes()
    }

    /// Row `r` as GGUF blocks; not for `interleaved` matrices.
    fn row(&self, r: usize) -> &[u8] {
        debug_assert!(!self.interleaved());
        let n = self.row_bytes();
        &self.data[r * n..(r + 1) * n]
    }

    /// The eight rows `8g..8g + 8` of an `interleaved` matrix.
    fn group(&self, g: usize) -> &[u8] {
        let n = self.cols / K_BLOCK_VALUES * q4_k_x8::GROUP_BLOCK;
        &self.data[g * n..(g + 1) * n]
    }

    /// Row `r` as GGUF blocks, whatever the layout.
    fn original_row(&self, r: usize) -> std::borrow::Cow<'_, [u8]> {
        if self.interleaved() {
            std::borrow::Cow::Owned(q4_k_x8::original_row(self.group(r / 8), r % 8))
        } else {
            std::borrow::Cow::Borrowed(self.row(r))
        }
    }

    /// `x` is `[m, cols]` row-major, the rows of one sequence; returns
    /// `x · selfᵀ`, `[m, rows]`.
    pub fn matmul(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        let mut out = Self::matmul_each(&[self], x, &[m])?;
        Ok(out.pop().unwrap_or_default())
    }

    /// `x · wᵀ` for every `w` in `matrices` (same `cols`, same activation
    /// format), in one parallel pass: the activations are quantized once,
    /// and the threads share out the rows of all matrices together, so
    /// that Q, K and V (or gate and up) cost one dispatch instead of
    /// several.
    ///
    /// The rows of `x` belong to sequences, `sequence_rows[i]` rows each,
    /// in order (one sequence's prompt chunk, or the decode rows of a
    /// batch). Each output takes the bits it would take in a product of
    /// its sequence's rows alone: where llama.cpp's kernel depends on the
    /// row count (the K-quants), it is chosen by the sequence's rows, not
    /// the batch's, so that batching never changes an answer.
    pub fn matmul_each(
        matrices: &[&QuantMatrix],
        x: &[f32],
        sequence_rows: &[usize],
    ) -> Result<Vec<Vec<f32>>> {
        let Some(first) = matrices.first() else {
            return Ok(Vec::new());
        };
        let m: usize = sequence_rows.iter().sum();
        let (cols, activation) = (first.cols, first.format.activation());
        if x.len() != m * cols
            || matrices
                .iter()
                .any(|w| w.cols != cols || w.format.activation() != activation)
        {
            return Err(KernelError::HiddenShape {
                got: vec![x.len()],
                hidden_size: cols,
            });
        }
        let a_row_bytes = cols / activation.block_values() * activation.block_bytes();
        let mut xq = vec![0u8; m * a_row_bytes];
        // Rows are independent: a prompt's rows share the compute pool
        // (one thread alone took a few percent of a prefill).
        xq.par_chunks_exact_mut(a_row_bytes)
            .zip(x.par_chunks_exact(cols))
            .with_min_len(8)
            .for_each(|(out, row)| quantize_activations(activation, row, out));
        // Several rows of 32-value blocks go through the prefill kernels.
        let prefill = m > 1 && activation != Activation::Q8K;
        // Columns (weight rows) are split into tasks; each task computes its
        // columns for all m activation rows, so a weight row is read once
        // per call, into a `[m, columns]` buffer of its own that it then
        // copies into place, row by row, while it is still in cache.
        let total_rows: usize = matrices.iter().map(|w| w.rows).sum();
        // A multiple of eight, for the groups of interleaved Q4_K (and the
        // four-row kernels).
        let per_task =
            (total_rows / (4 * rayon::current_num_threads().max(1))).clamp(16, 1024) / 8 * 8;
        // Not zeroed first: the tasks write every value (see below).
        let mut outs: Vec<Vec<f32>> = matrices
            .iter()
            .map(|w| Vec::with_capacity(w.rows * m))
            .collect();
        let kernels: Vec<Vec<KKernel>> = matrices
            .iter()
            .map(|w| w.row_kernels(sequence_rows))
            .collect();
        // The activations' scales as the prefill kernels read them, once
        // for every task.
        let scales = if prefill {
            ActivationScales::new(activation, &xq, m)
        } else {
            ActivationScales::default()
        };
        let mut tasks: Vec<(&QuantMatrix, &[KKernel], TaskOutput)> = Vec::new();
        for ((w, out), kernels) in matrices.iter().zip(outs.iter_mut()).zip(&kernels) {
            for task in TaskOutput::split(out.spare_capacity_mut(), w.rows, m, per_task) {
                tasks.push((w, kernels, task));
            }
        }
        tasks
            .into_par_iter()
            .for_each_init(Vec::new, |local, (w, kernels, mut out)| {
                // `columns` assigns every value of its block, so the
                // buffer is only zeroed when it grows, not for every task.
                let values = out.columns() * m;
                if local.len() < values {
                    local.resize(values, 0f32);
                }
                let local = &mut local[..values];
                w.columns(out.first(), local, &xq, a_row_bytes, kernels, &scales);
                out.write_rows(local);
            });
        for (out, w) in outs.iter_mut().zip(matrices) {
            // SAFETY: the tasks' columns cover every column of every
            // result once (`TaskOutput::split`), and each task wrote all
            // `m` rows of its columns (`write_rows` takes a whole block);
            // a task that panicked ended this function before here.
            unsafe { out.set_len(w.rows * m) };
        }
        Ok(outs)
    }

    /// Columns `first..first + out.len() / m` of the product with the
    /// quantized activations `xq` (`m` rows, row `r` rounded as
    /// `kernels[r]`), into `out` as `[m, columns]`.
    fn columns(
        &self,
        first: usize,
        out: &mut [f32],
        xq: &[u8],
        a_row_bytes: usize,
        kernels: &[KKernel],
        scales: &ActivationScales,
    ) {
        let m = kernels.len();
        let columns = out.len() / m;
        if self.interleaved() {
            return self.interleaved_columns(first, out, xq, a_row_bytes, kernels);
        }
        // K-quant prefill: each weight block unpacked once for all rows.
        if m > 1 && matches!(self.format, BlockFormat::Q4K | BlockFormat::Q6K) {
            let kernel = |r: usize| kernels[r];
            let mut dots = vec![0f32; m];
            for i in 0..columns {
                simd::k_row_against_rows(
                    self.format == BlockFormat::Q4K,
                    &kernel,
                    self.row(first + i),
                    xq,
                    a_row_bytes,
                    &mut dots,
                );
                for (r, &dot) in dots.iter().enumerate() {
                    out[r * columns + i] = dot;
                }
            }
            return;
        }
        // Four weight rows at a time share each activation block. The four
        // are a quarter of the task apart, so that each is read from a
        // stream that runs through contiguous rows: four adjacent short
        // rows (576 columns of Q8_0 are 612 bytes) read side by side make
        // four streams too short for the prefetchers, and measured half
        // the bandwidth.
        let quads = columns / 4;
        let col = |q: usize, i: usize| q + i * quads;
        let mut dots = vec![[0f32; 4]; m];
        let prefill = m > 1 && self.format.block_values() == BLOCK_VALUES;
        for q in 0..quads {
            // Written out, not `[0, 1, 2, 3].map(..)`: that is a call whose
            // result is stored in pieces and read back whole, a stall that
            // cost a few percent of a batched decode step (perf, AMD EPYC).
            let w = [
                self.row(first + col(q, 0)),
                self.row(first + col(q, 1)),
                self.row(first + col(q, 2)),
                self.row(first + col(q, 3)),
            ];
            // Prefill of the 32-value formats: each weight block unpacked
            // once for all activation rows.
            if prefill {
                simd::prefill4(self.format, w, xq, a_row_bytes, scales, &mut dots);
                for (row, dots) in out.chunks_exact_mut(columns).zip(&dots) {
                    let [d0, d1, d2, d3] = *dots;
                    // `col(q, 3) < columns`: one check for the four.
                    let row = &mut row[..=col(q, 3)];
                    row[col(q, 0)] = d0;
                    row[col(q, 1)] = d1;
                    row[col(q, 2)] = d2;
                    row[col(q, 3)] = d3;
                }
                continue;
            }
            for (r, &kernel) in kernels.iter().enumerate() {
                let dots = self.dot4(kernel, w, &xq[r * a_row_bytes..(r + 1) * a_row_bytes]);
                for (i, dot) in dots.into_iter().enumerate() {
                    out[r * columns + col(q, i)] = dot;
                }
            }
        }
        for i in 4 * quads..columns {
            let w = self.row(first + i);
            for (r, &kernel) in kernels.iter().enumerate() {
                out[r * columns + i] =
                    self.dot(kernel, w, &xq[r * a_row_bytes..(r + 1) * a_row_bytes]);
            }
        }
    }

    /// [`columns`](Self::columns) of an `interleaved` matrix (`first` and
    /// the column count are multiples of 8): activation rows four at a
    /// time with `gemm` where `kernels` says so (they come in fours, see
    /// [`k_kernel`](Self::k_kernel)), the others one by one with `gemv`.
    fn interleaved_columns(
        &self,
        first: usize,
        out: &mut [f32],
        xq: &[u8],
        a_row_bytes: usize,
        kernels: &[KKernel],
    ) {
        let m = kernels.len();
        let columns = out.len() / m.max(1);
        let activations = |r: usize| &xq[r * a_row_bytes..(r + 1) * a_row_bytes];
        for i in 0..columns / 8 {
            let group = self.group(first / 8 + i);
            let mut r = 0;
            while r < m {
                if kernels[r] == KKernel::Gemm && r + 4 <= m {
                    let dots =
                        simd::gemm_q4_k_x8(group, std::array::from_fn(|k| activations(r + k)));
                    for (k, dots) in dots.iter().enumerate() {
                        for (c, &dot) in dots.iter().enumerate() {
                            out[(r + k) * columns + 8 * i + c] = dot;
                        }
                    }
                    r += 4;
                } else {
                    for (c, dot) in simd::gemv_q4_k_x8(group, activations(r))
                        .into_iter()
                        .enumerate()
                    {
                        out[r * columns + 8 * i + c] = dot;
                    }
                    r += 1;
                }
            }
        }
    }

    /// The kernel of each row of a product whose rows belong to sequences
    /// of `sequence_rows` rows each: each sequence's as if it were alone.
    fn row_kernels(&self, sequence_rows: &[usize]) -> Vec<KKernel> {
        sequence_rows
            .iter()
            .flat_map(|&n| (0..n).map(move |r| self.k_kernel(n, r)))
            .collect()
    }

    /// The llama.cpp kernel whose rounding output row `r` of an `m`-row
    /// product takes, for the K-quants (see [`KKernel`]).
    fn k_kernel(&self, m: usize, r: usize) -> KKernel {
        match self.format {
            // Repacked (`q4_K_8x8_q8_K`) when the row count allows.
            BlockFormat::Q4K if self.interleaved() => {
                if m >= 4 && r < m - m % 4 {
                    KKernel::Gemm
                } else {
                    KKernel::Gemv
                }
            }
            BlockFormat::Q4K | BlockFormat::Q5K | BlockFormat::Q6K if m >= 8 => KKernel::Tiled,
            _ => KKernel::VecDot,
        }
    }

    fn dot4(&self, kernel: KKernel, w: [&[u8]; 4], a: &[u8]) -> [f32; 4] {
        match self.format {
            BlockFormat::Q4_0 => simd::dot4_q4_0_q8_0(w, a),
            BlockFormat::Q4_1 => simd::dot4_q4_1_q8_1(w, a),
            BlockFormat::Q5_0 => simd::dot4_q5_0_q8_0(w, a),
            BlockFormat::Q8_0 => simd::dot4_q8_0_q8_0(w, a),
            BlockFormat::Q4K => simd::dot4_q4_k_q8_k(kernel, w, a),
            BlockFormat::Q5K => simd::dot4_q5_k_q8_k(kernel, w, a),
            BlockFormat::Q6K => simd::dot4_q6_k_q8_k(kernel, w, a),
        }
    }

    fn dot(&self, kernel: KKernel, w: &[u8], a: &[u8]) -> f32 {
        match self.format {
            BlockFormat::Q4_0 => simd::dot_q4_0_q8_0(w, a),
            BlockFormat::Q4_1 => simd::dot_q4_1_q8_1(w, a),
            BlockFormat::Q5_0 => simd::dot_q5_0_q8_0(w, a),
            BlockFormat::Q8_0 => simd::dot_q8_0_q8_0(w, a),
            BlockFormat::Q4K => simd::dot4_q4_k_q8_k(kernel, [w; 4], a)[0],
            BlockFormat::Q5K => simd::dot4_q5_k_q8_k(kernel, [w; 4], a)[0],
            BlockFormat::Q6K => simd::dot4_q6_k_q8_k(kernel, [w; 4], a)[0],
        }
    }

    /// The rows `ids` as f32, `[ids.len(), cols]` (embedding lookup).
    pub fn dequantize_rows(&self, ids: &[u32]) -> Vec<f32> {
        let mut out = Vec::with_capacity(ids.len() * self.cols);
        for &id in ids {
            let row = self.original_row(id as usize);
            for block in row.chunks_exact(self.format.block_bytes()) {
                dequantize_block(self.format, block, &mut out);
            }
        }
        out
    }
}

/// The f16 scales of quantized activation blocks (and Q8_1's sums) as
/// f32, `[rows, blocks]`: converted once per product for the prefill
/// kernels, not once for every four weight rows.
#[derive(Default)]
struct ActivationScales {
    d: Vec<f32>,
    /// Q8_1 only: `d · Σ q` of each block.
    s: Vec<f32>,
    /// For the 512-bit kernel only (else empty): the activations block by
    /// block, `[blocks, rows, 64]`, each block's 32 quants with every four
    /// bytes twice, so that one plain load sets them beside both rows of
    /// a pair of weight rows (see `x86::WideBlock`), where a broadcast
    /// cost an instruction for every activation row and block. Q8_0's are
    /// already `y + 128` as unsigned bytes, as that kernel multiplies
    /// them. Block-major, so that a tile's rows of one block lie side by
    /// side, one pointer apart.
    doubled: Vec<u8>,
    /// `d` block by block for the 512-bit kernel, `[blocks, rows]`.
    d_by_block: Vec<f32>,
}

impl ActivationScales {
    /// The scales of every block of `xq`, `rows` rows of Q8_0 or Q8_1
    /// blocks, and for the 512-bit kernel the blocks doubled.
    fn new(activation: Activation, xq: &[u8], rows: usize) -> Self {
        debug_assert!(activation != Activation::Q8K, "32-value activation blocks");
        let blocks = xq.chunks_exact(activation.block_bytes());
        let d: Vec<f32> = blocks.clone().map(|block| f16_at(block, 0)).collect();
        let s = if activation == Activation::Q8_1 {
            blocks.map(|block| f16_at(block, 2)).collect()
        } else {
            Vec::new()
        };
        let (doubled, d_by_block) = if crate::simd::CpuFeatures::get().avx512_wide {
            doubled_by_block(activation, xq, rows, &d)
        } else {
            (Vec::new(), Vec::new())
        };
        Self {
            d,
            s,
            doubled,
            d_by_block,
        }
    }
}

/// [`ActivationScales::doubled`] and `d_by_block` of `rows` rows of Q8_0
/// or Q8_1 blocks `xq` with scales `d` (`[rows, blocks]`), a block's rows
/// on one thread of the pool.
fn doubled_by_block(
    activation: Activation,
    xq: &[u8],
    rows: usize,
    d: &[f32],
) -> (Vec<u8>, Vec<f32>) {
    let (quants, flip) = match activation {
        Activation::Q8_1 => (4, 0u32),
        _ => (2, 0x8080_8080),
    };
    if rows == 0 {
        return (Vec::new(), Vec::new());
    }
    let block_bytes = activation.block_bytes();
    let blocks = d.len() / rows;
    let row_bytes = blocks * block_bytes;
    let mut doubled = vec![0u8; blocks * rows * 2 * BLOCK_VALUES];
    doubled
        .par_chunks_exact_mut(rows * 2 * BLOCK_VALUES)
        .enumerate()
        .with_min_len(4)
        .for_each(|(b, out)| {
            for (r, out) in out.chunks_exact_mut(2 * BLOCK_VALUES).enumerate() {
                let at = r * row_bytes + b * block_bytes + quants;
                let fours = xq[at..at + BLOCK_VALUES].chunks_exact(4);
                for (out, four) in out.chunks_exact_mut(8).zip(fours) {
                    let four = u32::from_le_bytes([four[0], four[1], four[2], four[3]]) ^ flip;
                    out[..4].copy_from_slice(&four.to_le_bytes());
                    out[4..].copy_from_slice(&four.to_le_bytes());
                }
            }
        });
    let d_by_block = (0..blocks * rows)
        .map(|i| d[(i % rows) * blocks + i / rows])
        .collect();
    (doubled, d_by_block)
}

/// One block as f32, as ggml's `dequantize_row_*` (compiled without FMA
/// contraction in ggml-base) computes it for `get_rows`.
fn dequantize_block(format: BlockFormat, block: &[u8], out: &mut Vec<f32>) {
    match format {
        BlockFormat::Q4K => return portable::dequantize_k4(block, out, portable::q4_k_value),
        BlockFormat::Q5K => return portable::dequantize_k4(block, out, portable::q5_k_value),
        BlockFormat::Q6K => return portable::dequantize_q6_k(block, out),
        _ => {}
    }
    let d = f16_at(block, 0);
    match format {
        BlockFormat::Q4_0 => {
            out.extend((0..BLOCK_VALUES).map(|i| (nibble(&block[2..], i) as i32 - 8) as f32 * d))
        }
        BlockFormat::Q4_1 => {
            let m = f16_at(block, 2);
            out.extend((0..BLOCK_VALUES).map(|i| nibble(&block[4..], i) as f32 * d + m));
        }
        BlockFormat::Q5_0 => {
            out.extend((0..BLOCK_VALUES).map(|i| portable::q5_0_value(block, i) as f32 * d))
        }
        BlockFormat::Q8_0 => out.extend(block[2..34].iter().map(|&q| q as i8 as f32 * d)),
        BlockFormat::Q4K | BlockFormat::Q5K | BlockFormat::Q6K => {}
    }
}

/// Quantizes one row of activations into Q8_0, Q8_1 or Q8K blocks.
fn quantize_activations(format: Activation, x: &[f32], out: &mut [u8]) {
    match format {
        Activation::Q8K => quantize_q8_k(x, out),
        Activation::Q8_0 => simd::quantize_q8_32(false, x, out),
        Activation::Q8_1 => simd::quantize_q8_32(true, x, out),
    }
}

/// `quantize_row_q8_K_ref`, which x86 builds use: per 256 values, the
/// value of largest magnitude `max` (the first of equals) sets
/// `iscale = -127 / max`; `q = min(127, nearest(iscale * x))` with ggml's
/// round-half-even trick; `d = 1 / iscale`; and the sums of each 16 `q`.
fn quantize_q8_k(x: &[f32], out: &mut [u8]) {
    for (values, block) in x
        .chunks_exact(K_BLOCK_VALUES)
        .zip(out.chunks_exact_mut(Activation::Q8K.block_bytes()))
    {
        let (mut max, mut amax) = (0f32, 0f32);
        for &v in values {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            block.fill(0);
            continue;
        }
        let iscale = -127.0 / max;
        for (q, &v) in block[4..4 + K_BLOCK_VALUES].iter_mut().zip(values) {
            // `nearest_int`: adding 1.5 * 2^23 rounds to an integer, half to even.
            let rounded =
                ((iscale * v + 12_582_912.0).to_bits() & 0x007f_ffff) as i32 - 0x0040_0000;
            *q = rounded.min(127) as i8 as u8;
        }
        for g in 0..K_BLOCK_VALUES / 16 {
            let sum: i16 = block[4 + 16 * g..4 + 16 * (g + 1)]
                .iter()
                .map(|&q| i16::from(q as i8))
                .sum();
            block[4 + K_BLOCK_VALUES + 2 * g..][..2].copy_from_slice(&sum.to_le_bytes());
        }
        block[0..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
    }
}

/// The dot products used at run time: the fastest version this CPU runs
/// (AVX-512 VNNI, then AVX2), else the portable definition.
mod simd {
    use super::portable::{self, KKernel};
    #[cfg(target_arch = "x86_64")]
    use super::x86::{avx2, vnni, wide};
    use super::{ActivationScales, BlockFormat, q4_k_x8};
    use crate::simd::fast_path;

    /// Q8_0 blocks of `x`, or Q8_1 ones `with_sum`.
    pub(super) fn quantize_q8_32(with_sum: bool, x: &[f32], out: &mut [u8]) {
        fast_path!(
            avx2_fma => super::x86::quantize_q8_32(with_sum, x, out);
            portable::quantize_q8_32(with_sum, x, out)
        )
    }

    pub(super) fn dot_q4_0_q8_0(w: &[u8], a: &[u8]) -> f32 {
        fast_path!(
            avx512_vnni => vnni::dot_q4_0_q8_0(w, a),
            avx2_fma => avx2::dot_q4_0_q8_0(w, a);
            portable::dot_q4_0_q8_0(w, a)
        )
    }

    pub(super) fn dot_q4_1_q8_1(w: &[u8], a: &[u8]) -> f32 {
        fast_path!(
            avx512_vnni => vnni::dot_q4_1_q8_1(w, a),
            avx2_fma => avx2::dot_q4_1_q8_1(w, a);
            portable::dot_q4_1_q8_1(w, a)
        )
    }

    pub(super) fn dot_q8_0_q8_0(w: &[u8], a: &[u8]) -> f32 {
        fast_path!(
            avx512_vnni => vnni::dot_q8_0_q8_0(w, a),
            avx2_fma => avx2::dot_q8_0_q8_0(w, a);
            portable::dot_q8_0_q8_0(w, a)
        )
    }

    /// Four rows against one activation row; each result is bit for bit
    /// [`dot_q4_0_q8_0`]'s.
    pub(super) fn dot4_q4_0_q8_0(w: [&[u8]; 4], a: &[u8]) -> [f32; 4] {
        fast_path!(
            avx512_vnni => vnni::dot4_q4_0_q8_0(w, a),
            avx2_fma => avx2::dot4_q4_0_q8_0(w, a);
            w.map(|w| portable::dot_q4_0_q8_0(w, a))
        )
    }

    /// As [`dot4_q4_0_q8_0`], for [`dot_q4_1_q8_1`].
    pub(super) fn dot4_q4_1_q8_1(w: [&[u8]; 4], a: &[u8]) -> [f32; 4] {
        fast_path!(
            avx512_vnni => vnni::dot4_q4_1_q8_1(w, a),
            avx2_fma => avx2::dot4_q4_1_q8_1(w, a);
            w.map(|w| portable::dot_q4_1_q8_1(w, a))
        )
    }

    pub(super) fn dot_q5_0_q8_0(w: &[u8], a: &[u8]) -> f32 {
        fast_path!(
            avx512_vnni => vnni::dot_q5_0_q8_0(w, a),
            avx2_fma => avx2::dot_q5_0_q8_0(w, a);
            portable::dot_q5_0_q8_0(w, a)
        )
    }

    /// As [`dot4_q4_0_q8_0`], for [`dot_q5_0_q8_0`].
    pub(super) fn dot4_q5_0_q8_0(w: [&[u8]; 4], a: &[u8]) -> [f32; 4] {
        fast_path!(
            avx512_vnni => vnni::dot4_q5_0_q8_0(w, a),
            avx2_fma => avx2::dot4_q5_0_q8_0(w, a);
            w.map(|w| portable::dot_q5_0_q8_0(w, a))
        )
    }

    /// Four Q4_K rows against one Q8_K row, each rounded as `kernel`.
    pub(super) fn dot4_q4_k_q8_k(kernel: KKernel, w: [&[u8]; 4], a: &[u8]) -> [f32; 4] {
        fast_path!(
            avx512_vnni => vnni::dot4_q4_k_q8_k(kernel, w, a),
            avx2_fma => avx2::dot4_q4_k_q8_k(kernel, w, a);
            w.map(|w| portable::dot_q4_k_q8_k(kernel, w, a))
        )
    }

    /// One Q4_K (`q4_k`) or Q6_K weight row against `out.len()` activation
    /// rows; output `r` rounded as `kernel(r)`.
    pub(super) fn k_row_against_rows(
        q4_k: bool,
        kernel: &dyn Fn(usize) -> KKernel,
        w: &[u8],
        xq: &[u8],
        a_row_bytes: usize,
        out: &mut [f32],
    ) {
        fast_path!(
            avx512_vnni => vnni::k_row_against_rows(q4_k, kernel, w, xq, a_row_bytes, out),
            avx2_fma => avx2::k_row_against_rows(q4_k, kernel, w, xq, a_row_bytes, out);
            for (r, out) in out.iter_mut().enumerate() {
                let a = &xq[r * a_row_bytes..(r + 1) * a_row_bytes];
                *out = if q4_k {
                    portable::dot_q4_k_q8_k(kernel(r), w, a)
                } else {
                    portable::dot_q6_k_q8_k(kernel(r), w, a)
                };
            }
        )
    }

    /// Eight interleaved Q4_K rows (one group, see [`super::q4_k_x8`])
    /// against one Q8_K row with `gemv`'s rounding.
    pub(super) fn gemv_q4_k_x8(group: &[u8], a: &[u8]) -> [f32; 8] {
        fast_path!(
            avx512_vnni => vnni::gemv_q4_k_x8(group, a),
            avx2_fma => avx2::gemv_q4_k_x8(group, a);
            std::array::from_fn(|r| {
                portable::dot_q4_k_q8_k(KKernel::Gemv, &q4_k_x8::original_row(group, r), a)
            })
        )
    }

    /// Eight interleaved Q4_K rows against four Q8_K rows with `gemm`'s
    /// rounding, `[activation row][output row]`.
    pub(super) fn gemm_q4_k_x8(group: &[u8], a: [&[u8]; 4]) -> [[f32; 8]; 4] {
        fast_path!(
            avx512_vnni => vnni::gemm_q4_k_x8(group, a),
            avx2_fma => avx2::gemm_q4_k_x8(group, a);
            a.map(|a| {
                std::array::from_fn(|r| {
                    portable::dot_q4_k_q8_k(KKernel::Gemm, &q4_k_x8::original_row(group, r), a)
                })
            })
        )
    }

    /// Four Q4_0, Q4_1, Q5_0 or Q8_0 rows against the `out.len()`
    /// activation rows of `xq`; `out[r]` is bit for bit the four-row
    /// kernel's result for activation row `r`.
    pub(super) fn prefill4(
        format: BlockFormat,
        w: [&[u8]; 4],
        xq: &[u8],
        a_row_bytes: usize,
        scales: &ActivationScales,
        out: &mut [[f32; 4]],
    ) {
        fast_path!(
            avx512_wide => wide::prefill4(format, w, xq, a_row_bytes, scales, out),
            avx512_vnni => vnni::prefill4(format, w, xq, a_row_bytes, scales, out),
            avx2_fma => avx2::prefill4(format, w, xq, a_row_bytes, scales, out);
            {
                let _ = scales; // the portable dots read the blocks' own scales
                for (r, out) in out.iter_mut().enumerate() {
                    let a = &xq[r * a_row_bytes..(r + 1) * a_row_bytes];
                    *out = w.map(|w| match format {
                        BlockFormat::Q4_0 => portable::dot_q4_0_q8_0(w, a),
                        BlockFormat::Q4_1 => portable::dot_q4_1_q8_1(w, a),
                        BlockFormat::Q5_0 => portable::dot_q5_0_q8_0(w, a),
                        _ => portable::dot_q8_0_q8_0(w, a),
                    });
                }
            }
        )
    }

    /// Four Q5_K rows against one Q8_K row, each rounded as `kernel`.
    pub(super) fn dot4_q5_k_q8_k(kernel: KKernel, w: [&[u8]; 4], a: &[u8]) -> [f32; 4] {
        fast_path!(
            avx512_vnni => vnni::dot4_q5_k_q8_k(kernel, w, a),
            avx2_fma => avx2::dot4_q5_k_q8_k(kernel, w, a);
            w.map(|w| portable::dot_q5_k_q8_k(kernel, w, a))
        )
    }

    /// Four Q6_K rows against one Q8_K row, each rounded as `kernel`.
    pub(super) fn dot4_q6_k_q8_k(kernel: KKernel, w: [&[u8]; 4], a: &[u8]) -> [f32; 4] {
        fast_path!(
            avx512_vnni => vnni::dot4_q6_k_q8_k(kernel, w, a),
            avx2_fma => avx2::dot4_q6_k_q8_k(kernel, w, a);
            w.map(|w| portable::dot_q6_k_q8_k(kernel, w, a))
        )
    }

    /// As [`dot4_q4_0_q8_0`], for [`dot_q8_0_q8_0`].
    pub(super) fn dot4_q8_0_q8_0(w: [&[u8]; 4], a: &[u8]) -> [f32; 4] {
        fast_path!(
            avx512_vnni => vnni::dot4_q8_0_q8_0(w, a),
            avx2_fma => avx2::dot4_q8_0_q8_0(w, a);
            w.map(|w| portable::dot_q8_0_q8_0(w, a))
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    #[test]
    fn activation_quantization_matches_ggml_rules() {
        // max 127 → d = 1 and id = 1; halves round to even: 62.5 → 62, 0.5 → 0, -3.5 → -4.
        let mut x = vec![0f32; 32];
        x[..5].copy_from_slice(&[127.0, -127.0, 62.5, 0.5, -3.5]);
        let mut out = vec![0u8; 36];
        quantize_activations(Activation::Q8_1, &x, &mut out);
        assert_eq!(f16_at(&out, 0), 1.0);
        let qs: Vec<i8> = out[4..9].iter().map(|&b| b as i8).collect();
        assert_eq!(qs, vec![127, -127, 62, 0, -4]);
        assert_eq!(f16_at(&out, 2), 58.0, "s = d * (127 - 127 + 62 + 0 - 4)");
    }

    /// Every format with a fast kernel.
    const FORMATS: [BlockFormat; 7] = [
        BlockFormat::Q5K,
        BlockFormat::Q4_0,
        BlockFormat::Q4_1,
        BlockFormat::Q5_0,
        BlockFormat::Q8_0,
        BlockFormat::Q4K,
        BlockFormat::Q6K,
    ];

    /// The kernels a format's outputs can take.
    fn kernels(format: BlockFormat) -> &'static [KKernel] {
        match format {
            BlockFormat::Q4K => &[
                KKernel::VecDot,
                KKernel::Gemv,
                KKernel::Gemm,
                KKernel::Tiled,
            ],
            BlockFormat::Q5K | BlockFormat::Q6K => &[KKernel::VecDot, KKernel::Tiled],
            _ => &[KKernel::VecDot],
        }
    }

    /// The portable definition of `format`'s dot product with `kernel`.
    fn portable_dot(format: BlockFormat, kernel: KKernel, w: &[u8], a: &[u8]) -> f32 {
        match format {
            BlockFormat::Q4_0 => portable::dot_q4_0_q8_0(w, a),
            BlockFormat::Q4_1 => portable::dot_q4_1_q8_1(w, a),
            BlockFormat::Q5_0 => portable::dot_q5_0_q8_0(w, a),
            BlockFormat::Q8_0 => portable::dot_q8_0_q8_0(w, a),
            BlockFormat::Q4K => portable::dot_q4_k_q8_k(kernel, w, a),
            BlockFormat::Q5K => portable::dot_q5_k_q8_k(kernel, w, a),
            BlockFormat::Q6K => portable::dot_q6_k_q8_k(kernel, w, a),
        }
    }

    /// A one-row matrix of `format`, to reach the kernels run time picks.
    fn matrix(format: BlockFormat, w: &[u8]) -> QuantMatrix {
        let cols = w.len() / format.block_bytes() * format.block_values();
        QuantMatrix::new("w", format, 1, cols, w.to_vec()).expect("matrix")
    }

    /// Random weight and activation blocks, including the extremes (-128,
    /// 127, 15, 0) where saturating integer instructions would go wrong.
    fn random_blocks(format: BlockFormat, blocks: usize, seed: u64) -> (Vec<u8>, Vec<u8>) {
        let mut state = crate::test_random::lcg(seed);
        let mut next = move || (state() >> 33) as u32;
        let mut w = Vec::new();
        for _ in 0..blocks {
            let start = w.len();
            for i in 0..format.block_bytes() {
                w.push(match (next() + i as u32) % 8 {
                    0 => 0x80,
                    1 => 0x7F,
                    2 => 0xFF,
                    3 => 0x00,
                    _ => next() as u8,
                });
            }
            // The block's f16 scale (and Q4_1's minimum): finite values.
            let d = f16::from_f32((next() % 1000) as f32 / 5000.0 + 1e-3).to_le_bytes();
            let d_at = if format == BlockFormat::Q6K { 208 } else { 0 };
            w[start + d_at..start + d_at + 2].copy_from_slice(&d);
            if matches!(
                format,
                BlockFormat::Q4_1 | BlockFormat::Q4K | BlockFormat::Q5K
            ) {
                let m = f16::from_f32(-((next() % 100) as f32) / 50.0).to_le_bytes();
                w[start + 2..start + 4].copy_from_slice(&m);
            }
        }
        let x: Vec<f32> = (0..blocks * format.block_values())
            .map(|_| (next() % 20001) as f32 / 1000.0 - 10.0)
            .collect();
        let mut a = vec![0u8; blocks * format.activation().block_bytes()];
        quantize_activations(format.activation(), &x, &mut a);
        (w, a)
    }

    #[test]
    fn fast_dot_products_equal_the_portable_definition_bit_for_bit() {
        for format in FORMATS {
            for &kernel in kernels(format) {
                for seed in 0..200 {
                    let (w, a) = random_blocks(format, 1 + (seed as usize % 12), seed);
                    let fast = matrix(format, &w).dot(kernel, &w, &a);
                    let reference = portable_dot(format, kernel, &w, &a);
                    assert_eq!(
                        fast.to_bits(),
                        reference.to_bits(),
                        "{format:?} {kernel:?} seed {seed}: {fast} vs {reference}"
                    );
                }
            }
        }
    }

    #[test]
    fn four_row_dot_products_equal_the_portable_definition_bit_for_bit() {
        for format in FORMATS {
            for &kernel in kernels(format) {
                for seed in 0..100 {
                    let blocks = 1 + (seed as usize % 12);
                    let (w, a) = random_blocks(format, 4 * blocks, seed);
                    let rows: Vec<&[u8]> = w.chunks_exact(blocks * format.block_bytes()).collect();
                    let a = &a[..blocks * format.activation().block_bytes()];
                    let w4 = [rows[0], rows[1], rows[2], rows[3]];
                    let fast = matrix(format, rows[0]).dot4(kernel, w4, a);
                    let reference = w4.map(|w| portable_dot(format, kernel, w, a));
                    assert_eq!(
                        fast.map(f32::to_bits),
                        reference.map(f32::to_bits),
                        "{format:?} {kernel:?} seed {seed}: {fast:?} vs {reference:?}"
                    );
                }
            }
        }
    }

    /// K-quant products of several activation rows (each weight block
    /// unpacked once for all of them) give each output the bits of its
    /// kernel's portable definition.
    #[test]
    fn k_quant_batches_equal_row_by_row_dots() {
        for (format, rows) in [
            (BlockFormat::Q4K, 8usize),
            (BlockFormat::Q4K, 12),
            (BlockFormat::Q4K, 48),
            (BlockFormat::Q5K, 8),
            (BlockFormat::Q6K, 8),
        ] {
            let (w, _) = random_blocks(format, rows * 2, 17); // rows of 2 blocks
            let matrix = QuantMatrix::new("w", format, rows, 512, w.clone()).expect("matrix");
            let row =
                |c: usize| &w[c * 2 * format.block_bytes()..(c + 1) * 2 * format.block_bytes()];
            let x: Vec<f32> = (0..9 * 512)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                .collect();
            for m in [1usize, 2, 4, 5, 8, 9] {
                let out = matrix.matmul(&x[..m * 512], m).expect("matmul");
                for c in 0..rows {
                    let mut weights = Vec::new();
                    for block in row(c).chunks_exact(format.block_bytes()) {
                        dequantize_block(format, block, &mut weights);
                    }
                    assert_eq!(matrix.dequantize_rows(&[c as u32]), weights, "row {c}");
                }
                for r in 0..m {
                    let mut a = vec![0u8; 2 * 292];
                    quantize_activations(Activation::Q8K, &x[r * 512..(r + 1) * 512], &mut a);
                    let kernel = matrix.k_kernel(m, r);
                    for c in 0..rows {
                        assert_eq!(
                            out[r * rows + c].to_bits(),
                            portable_dot(format, kernel, row(c), &a).to_bits(),
                            "{format:?} rows {rows}, batch {m}, row {r} ({kernel:?}), column {c}"
                        );
                    }
                }
            }
        }
    }

    /// Which kernel each output takes, as llama.cpp chooses.
    #[test]
    fn k_quant_outputs_take_llama_cpp_kernels() {
        let q4k = |rows: usize| {
            QuantMatrix::new("w", BlockFormat::Q4K, rows, 256, vec![0; rows * 144]).expect("matrix")
        };
        let q6k =
            QuantMatrix::new("w", BlockFormat::Q6K, 8, 256, vec![0; 8 * 210]).expect("matrix");
        let repacked = q4k(8);
        assert_eq!(repacked.k_kernel(1, 0), KKernel::Gemv);
        assert_eq!(repacked.k_kernel(3, 2), KKernel::Gemv);
        assert_eq!(
            repacked.k_kernel(6, 3),
            KKernel::Gemm,
            "rows below 6 - 6 % 4"
        );
        assert_eq!(repacked.k_kernel(6, 4), KKernel::Gemv);
        assert_eq!(repacked.k_kernel(100, 99), KKernel::Gemm);
        let not_repacked = q4k(12);
        assert_eq!(not_repacked.k_kernel(7, 0), KKernel::VecDot);
        assert_eq!(not_repacked.k_kernel(8, 0), KKernel::Tiled);
        assert_eq!(q6k.k_kernel(7, 6), KKernel::VecDot);
        assert_eq!(q6k.k_kernel(8, 6), KKernel::Tiled);
    }

    /// The K-quants against their meaning: the dot product of the
    /// dequantized weights and activations, to float rounding.
    #[test]
    fn k_quant_dot_products_mean_the_dequantized_dot_products() {
        for format in [BlockFormat::Q4K, BlockFormat::Q5K, BlockFormat::Q6K] {
            let (w, a) = random_blocks(format, 3, 42);
            let weights = matrix(format, &w).dequantize_rows(&[0]);
            let activations: Vec<f32> = a
                .chunks_exact(292)
                .flat_map(|ab| {
                    let d = portable::f32_at(ab, 0);
                    ab[4..260].iter().map(move |&q| d * f32::from(q as i8))
                })
                .collect();
            let exact: f64 = weights
                .iter()
                .zip(&activations)
                .map(|(&w, &x)| f64::from(w) * f64::from(x))
                .sum();
            let dot = f64::from(portable_dot(format, KKernel::VecDot, &w, &a));
            assert!(
                (dot - exact).abs() <= 1e-4 * exact.abs().max(1.0),
                "{format:?}: {dot} vs {exact}"
            );
        }
    }

    #[test]
    fn q8_k_activations_round_as_ggml() {
        // max magnitude -2 → iscale 63.5, d = 1/63.5; halves round to even.
        let mut x = vec![0f32; 256];
        x[..4].copy_from_slice(&[-2.0, 1.0, 1.0 / 127.0, 0.5]);
        let mut out = vec![0u8; 292];
        quantize_activations(Activation::Q8K, &x, &mut out);
        let qs: Vec<i8> = out[4..8].iter().map(|&b| b as i8).collect();
        assert_eq!(qs, vec![-127, 64, 0, 32], "63.5 → 64, 0.5 → 0, 31.75 → 32");
        assert_eq!(portable::f32_at(&out, 0), 1.0 / 63.5);
        assert_eq!(i16::from_le_bytes([out[260], out[261]]), -127 + 64 + 32);
    }

    #[test]
    fn fast_q8_activations_equal_the_portable_definition_byte_for_byte() {
        let mut state = crate::test_random::lcg(7);
        let mut next = move || (state() >> 33) as u32;
        // Blocks of random values, an all-zero block, one of negative
        // zeros, and one whose largest magnitude is 127 so that v · id = v:
        // halves that must round to even (2.5 → 2, -3.5 → -4, 0.5 → 0).
        let mut x: Vec<f32> = (0..32 * 40)
            .map(|_| (next() % 20001) as f32 / 997.0 - 10.0)
            .collect();
        x.extend([0.0f32; 32]);
        x.extend([-0.0f32; 32]);
        let mut halves = vec![127.0f32, 2.5, -3.5, 0.5, -0.5, 1.5, -126.5];
        halves.resize(32, 4.5);
        x.extend(halves);
        for with_sum in [false, true] {
            let bytes = x.len() / 32 * if with_sum { 36 } else { 34 };
            let (mut fast, mut reference) = (vec![0u8; bytes], vec![1u8; bytes]);
            simd::quantize_q8_32(with_sum, &x, &mut fast);
            portable::quantize_q8_32(with_sum, &x, &mut reference);
            assert_eq!(fast, reference, "with_sum {with_sum}");
            let last = &reference[bytes - 32..bytes - 25];
            assert_eq!(
                last.iter().map(|&q| q as i8).collect::<Vec<_>>(),
                vec![127, 2, -4, 0, 0, 2, -126]
            );
        }
    }

    #[test]
    fn one_pass_over_several_matrices_equals_one_at_a_time() {
        // Q, K, V shapes in miniature: 45, 15 and 15 rows of 4 blocks.
        let matrices: Vec<QuantMatrix> = [(45usize, 1u64), (15, 2), (15, 3)]
            .iter()
            .map(|&(rows, seed)| {
                let (w, _) = random_blocks(BlockFormat::Q4_1, rows * 4, seed);
                QuantMatrix::new("w", BlockFormat::Q4_1, rows, 128, w).expect("matrix")
            })
            .collect();
        let refs: Vec<&QuantMatrix> = matrices.iter().collect();
        let x: Vec<f32> = (0..5 * 128)
            .map(|i| ((i * 53 % 211) as f32 - 105.0) / 9.0)
            .collect();
        for m in [1usize, 5] {
            let together = QuantMatrix::matmul_each(&refs, &x[..m * 128], &[m]).expect("together");
            for (w, out) in matrices.iter().zip(&together) {
                let alone = w.matmul(&x[..m * 128], m).expect("alone");
                assert_eq!(
                    out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    alone.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                );
            }
        }
        let (w, _) = random_blocks(BlockFormat::Q8_0, 4 * 4, 4);
        let other = QuantMatrix::new("w", BlockFormat::Q8_0, 4, 128, w).expect("matrix");
        assert!(
            QuantMatrix::matmul_each(&[&matrices[0], &other], &x[..128], &[1]).is_err(),
            "matrices with different activation formats are refused"
        );
    }

    /// A batch of several sequences' rows gives each sequence the bits of
    /// its rows multiplied alone, whichever kernels the format takes.
    #[test]
    fn a_batch_of_sequences_gives_each_the_bits_it_gets_alone() {
        let sequences = [1usize, 1, 5, 1, 4, 9, 2];
        let m: usize = sequences.iter().sum();
        for (format, rows) in [
            (BlockFormat::Q4_1, 45usize),
            (BlockFormat::Q8_0, 7),
            (BlockFormat::Q4K, 16), // repacked: gemm and gemv
            (BlockFormat::Q4K, 12), // not repacked: vec_dot and tiled
            (BlockFormat::Q5K, 8),
            (BlockFormat::Q6K, 8),
        ] {
            let cols = 2 * K_BLOCK_VALUES;
            let blocks_per_row = cols / format.block_values();
            let (w, _) = random_blocks(format, rows * blocks_per_row, 23);
            let matrix = QuantMatrix::new("w", format, rows, cols, w).expect("matrix");
            let x: Vec<f32> = (0..m * cols)
                .map(|i| ((i * 41 % 113) as f32 - 56.0) / 5.0)
                .collect();
            let batched = QuantMatrix::matmul_each(&[&matrix], &x, &sequences)
                .expect("batched")
                .remove(0);
            let mut start = 0;
            for (s, &n) in sequences.iter().enumerate() {
                let alone = matrix
                    .matmul(&x[start * cols..(start + n) * cols], n)
                    .expect("alone");
                let together = &batched[start * rows..(start + n) * rows];
                assert_eq!(
                    together.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    alone.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{format:?} rows {rows}: sequence {s} of {n} rows"
                );
                start += n;
            }
        }
    }

    /// Every instruction set's prefill kernel this CPU runs, not only the
    /// one run time picks, against the portable dots: batches of 1 to 15
    /// rows cover the 512-bit kernel's single tiles (up to 8 rows, each
    /// block unpacked as it is used) and its tiles over blocks unpacked
    /// once (8, then 4, 2 and 1 for what is left), and each other tile
    /// size and what it leaves over.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn each_instruction_set_s_prefill_kernel_equals_the_portable_dots() {
        let cpu = crate::simd::CpuFeatures::get();
        type Prefill =
            unsafe fn(BlockFormat, [&[u8]; 4], &[u8], usize, &ActivationScales, &mut [[f32; 4]]);
        let sets: [(&str, bool, Prefill); 3] = [
            ("avx2", cpu.avx2_fma, x86::avx2::prefill4),
            ("vnni", cpu.avx512_vnni, x86::vnni::prefill4),
            ("wide", cpu.avx512_wide, x86::wide::prefill4),
        ];
        for format in [
            BlockFormat::Q4_0,
            BlockFormat::Q4_1,
            BlockFormat::Q5_0,
            BlockFormat::Q8_0,
        ] {
            for seed in 0..20u64 {
                let blocks = 1 + seed as usize % 5;
                let (w, _) = random_blocks(format, 4 * blocks, seed);
                let rows: Vec<&[u8]> = w.chunks_exact(blocks * format.block_bytes()).collect();
                let w4 = [rows[0], rows[1], rows[2], rows[3]];
                let m = 1 + seed as usize % 15;
                let x: Vec<f32> = (0..m * blocks * BLOCK_VALUES)
                    .map(|i| ((i as u64 * 37 + seed) % 101) as f32 / 7.0 - 7.0)
                    .collect();
                let a_row_bytes = blocks * format.activation_bytes();
                let mut xq = vec![0u8; m * a_row_bytes];
                for (out, row) in xq
                    .chunks_exact_mut(a_row_bytes)
                    .zip(x.chunks_exact(blocks * BLOCK_VALUES))
                {
                    quantize_activations(format.activation(), row, out);
                }
                let scales = ActivationScales::new(format.activation(), &xq, m);
                let want: Vec<[u32; 4]> = xq
                    .chunks_exact(a_row_bytes)
                    .map(|a| w4.map(|w| portable_dot(format, KKernel::VecDot, w, a).to_bits()))
                    .collect();
                for &(name, runs, prefill) in &sets {
                    if !runs {
                        continue;
                    }
                    let mut out = vec![[0f32; 4]; m];
                    // SAFETY: this CPU has the kernel's features (checked above).
                    unsafe { prefill(format, w4, &xq, a_row_bytes, &scales, &mut out) };
                    let got: Vec<[u32; 4]> = out.iter().map(|o| o.map(f32::to_bits)).collect();
                    assert_eq!(got, want, "{name} {format:?} seed {seed}, {m} rows");
                }
            }
        }
    }

    #[test]
    fn matmul_equals_row_by_row_dots() {
        // 7 rows: one group of four and three left over; 45 rows: several
        // tasks, each with groups and leftovers. Batches of several rows
        // take the prefill kernels (each weight block unpacked once for
        // all rows), whose tiles of activation rows (four at a time in
        // 512-bit registers, pairs in 256-bit ones) leave 0 to 3 over.
        for format in [
            BlockFormat::Q4_0,
            BlockFormat::Q4_1,
            BlockFormat::Q5_0,
            BlockFormat::Q8_0,
        ] {
            for rows in [7usize, 45] {
                let (w, _) = random_blocks(format, rows * 4, 9); // rows of 4 blocks
                let m = QuantMatrix::new("w", format, rows, 128, w).expect("matrix");
                let x: Vec<f32> = (0..11 * 128)
                    .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                    .collect();
                for batch in [1usize, 2, 3, 4, 5, 8, 11] {
                    let out = m.matmul(&x[..batch * 128], batch).expect("matmul");
                    for r in 0..batch {
                        let mut a = vec![0u8; 4 * format.activation_bytes()];
                        quantize_activations(
                            format.activation(),
                            &x[r * 128..(r + 1) * 128],
                            &mut a,
                        );
                        for c in 0..rows {
                            assert_eq!(
                                out[r * rows + c].to_bits(),
                                portable_dot(format, KKernel::VecDot, m.row(c), &a).to_bits(),
                                "{format:?} rows {rows}, batch {batch}, row {r}, column {c}"
                            );
                        }
                    }
                }
            }
        }
    }
}
