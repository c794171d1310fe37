//! The definitions of the quantized dot products: which lanes, which
//! order, which roundings. Lane `j` of a block holds the exact integer sum
//! of products `4j..4j+4`; the fast versions (`x86`) are tested to give
//! these functions' bits exactly.

use half::f16;

/// The little-endian f16 at byte `at`, as f32.
pub(super) fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// Weight `i` (0..32) of a 4-bit block's 16 bytes of nibbles.
pub(super) fn nibble(qs: &[u8], i: usize) -> u8 {
    if i < 16 {
        qs[i] & 0x0F
    } else {
        qs[i - 16] >> 4
    }
}

/// Eight-lane horizontal sum in ggml's order (`hsum_float_8`).
#[inline]
fn hsum8(a: [f32; 8]) -> f32 {
    ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))
}

/// One row of activations as Q8_0 blocks (34 bytes: f16 `d`, 32 `q`),
/// or, `with_sum`, Q8_1 ones (36 bytes: f16 `d`, f16 `d · Σq`, 32 `q`):
/// per 32 values, `max` the largest magnitude, `d = max / 127` and
/// `q = round_half_even(v · 127 / max)`, as ggml's
/// `quantize_row_q8_0`/`q8_1`.
pub(super) fn quantize_q8_32(with_sum: bool, x: &[f32], out: &mut [u8]) {
    let block_bytes = if with_sum { 36 } else { 34 };
    let qs_at = block_bytes - 32;
    for (values, block) in x.chunks_exact(32).zip(out.chunks_exact_mut(block_bytes)) {
        let max = values.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = max / 127.0;
        let id = if max != 0.0 { 127.0 / max } else { 0.0 };
        block[0..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        let mut sum = 0i32;
        for (q, v) in block[qs_at..].iter_mut().zip(values) {
            // |v * id| <= 127 by construction; the clamp only makes it explicit.
            // It matters: the AVX2 dot products take |w| · (y signed by w),
            // which is exact for activations y in -127..=127 but not -128.
            let int = (v * id).round_ties_even().clamp(-127.0, 127.0) as i8;
            *q = int as u8;
            sum += i32::from(int);
        }
        if with_sum {
            block[2..4].copy_from_slice(&f16::from_f32(d * sum as f32).to_le_bytes());
        }
    }
}

pub(super) fn dot_q4_0_q8_0(w: &[u8], a: &[u8]) -> f32 {
    let mut acc = [0f32; 8];
    for (wb, ab) in w.chunks_exact(18).zip(a.chunks_exact(34)) {
        let d = f16_at(wb, 0) * f16_at(ab, 0);
        for (lane, acc) in acc.iter_mut().enumerate() {
            let sum: i32 = (4 * lane..4 * lane + 4)
                .map(|i| (nibble(&wb[2..], i) as i32 - 8) * (ab[2 + i] as i8 as i32))
                .sum();
            *acc = d.mul_add(sum as f32, *acc);
        }
    }
    hsum8(acc)
}

pub(super) fn dot_q4_1_q8_1(w: &[u8], a: &[u8]) -> f32 {
    let mut acc = [0f32; 8];
    let mut summs = 0f32;
    for (wb, ab) in w.chunks_exact(20).zip(a.chunks_exact(36)) {
        let d = f16_at(wb, 0) * f16_at(ab, 0);
        summs += f16_at(wb, 2) * f16_at(ab, 2);
        for (lane, acc) in acc.iter_mut().enumerate() {
            let sum: i32 = (4 * lane..4 * lane + 4)
                .map(|i| nibble(&wb[4..], i) as i32 * (ab[4 + i] as i8 as i32))
                .sum();
            *acc = d.mul_add(sum as f32, *acc);
        }
    }
    hsum8(acc) + summs
}

/// Weight `i` (0..32) of a Q5_0 block (`d: f16, qh: u32, qs: [u8; 16]`):
/// the nibble plus bit `i` of `qh` as its fifth bit, minus 16.
pub(super) fn q5_0_value(block: &[u8], i: usize) -> i32 {
    let qh = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
    let high = ((qh >> i) & 1) as i32;
    (nibble(&block[6..], i) as i32 | (high << 4)) - 16
}

pub(super) fn dot_q5_0_q8_0(w: &[u8], a: &[u8]) -> f32 {
    let mut acc = [0f32; 8];
    for (wb, ab) in w.chunks_exact(22).zip(a.chunks_exact(34)) {
        let d = f16_at(wb, 0) * f16_at(ab, 0);
        for (lane, acc) in acc.iter_mut().enumerate() {
            let sum: i32 = (4 * lane..4 * lane + 4)
                .map(|i| q5_0_value(wb, i) * (ab[2 + i] as i8 as i32))
                .sum();
            *acc = d.mul_add(sum as f32, *acc);
        }
    }
    hsum8(acc)
}

pub(super) fn dot_q8_0_q8_0(w: &[u8], a: &[u8]) -> f32 {
    let mut acc = [0f32; 8];
    for (wb, ab) in w.chunks_exact(34).zip(a.chunks_exact(34)) {
        let d = f16_at(wb, 0) * f16_at(ab, 0);
        for (lane, acc) in acc.iter_mut().enumerate() {
            let sum: i32 = (4 * lane..4 * lane + 4)
                .map(|i| (wb[2 + i] as i8 as i32) * (ab[2 + i] as i8 as i32))
                .sum();
            *acc = d.mul_add(sum as f32, *acc);
        }
    }
    hsum8(acc)
}

/// The scale of a Q8_K activation block (`d: f32` first).
pub(super) fn f32_at(bytes: &[u8], at: usize) -> f32 {
    f32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// Q8_K activation `i` (0..256) of block `ab`, and the sum of its 16-value
/// group `g` (0..16).
fn q8_k_value(ab: &[u8], i: usize) -> i32 {
    ab[4 + i] as i8 as i32
}

fn q8_k_bsum(ab: &[u8], g: usize) -> i32 {
    i16::from_le_bytes([ab[260 + 2 * g], ab[261 + 2 * g]]) as i32
}

/// Value `e` (0..256) of a Q6_K block (`ql: [u8; 128], qh: [u8; 64],
/// scales: [i8; 16], d: f16`), unsigned (0..64, 32 is zero): four bits
/// from `ql` and two from `qh`, in ggml's order of 32-value quarters.
pub(super) fn q6_k_value(block: &[u8], e: usize) -> i32 {
    let (half, quarter, l) = (e / 128, (e % 128) / 32, e % 32);
    let ql = block[64 * half + 32 * (quarter % 2) + l];
    let low = if quarter < 2 { ql & 0x0F } else { ql >> 4 };
    let high = (block[128 + 32 * half + l] >> (2 * quarter)) & 3;
    i32::from(low | (high << 4))
}

/// The scale of Q6_K group `g` (16 values).
fn q6_k_scale(block: &[u8], g: usize) -> i32 {
    block[192 + g] as i8 as i32
}

/// `dequantize_row_q6_K`: `(d · scale) · (q - 32)`.
pub(super) fn dequantize_q6_k(block: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(block, 208);
    out.extend(
        (0..256).map(|e| d * q6_k_scale(block, e / 16) as f32 * (q6_k_value(block, e) - 32) as f32),
    );
}

/// The eight 6-bit scales and eight 6-bit minimums of a Q4_K/Q5_K block's
/// 12 packed bytes (`get_scale_min_k4`).
pub(super) fn k4_scales_mins(packed: &[u8]) -> ([i32; 8], [i32; 8]) {
    let (mut sc, mut m) = ([0i32; 8], [0i32; 8]);
    for j in 0..8 {
        let (s, n) = if j < 4 {
            (packed[j] & 63, packed[j + 4] & 63)
        } else {
            (
                (packed[j + 4] & 0x0F) | ((packed[j - 4] >> 6) << 4),
                (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4),
            )
        };
        sc[j] = i32::from(s);
        m[j] = i32::from(n);
    }
    (sc, m)
}

/// Value `e` (0..256) of a Q4_K block (`d, dmin: f16, scales: [u8; 12],
/// qs: [u8; 128]`), 0..16: each 64 values are 32 bytes, low nibbles first.
pub(super) fn q4_k_value(block: &[u8], e: usize) -> i32 {
    let byte = block[16 + 32 * (e / 64) + e % 32];
    i32::from(if e % 64 < 32 { byte & 0x0F } else { byte >> 4 })
}

/// Value `e` (0..256) of a Q5_K block (`d, dmin: f16, scales: [u8; 12],
/// qh: [u8; 32], qs: [u8; 128]`), 0..32: the Q4_K nibble plus bit `e / 32`
/// of `qh[e % 32]` as its fifth bit.
pub(super) fn q5_k_value(block: &[u8], e: usize) -> i32 {
    let byte = block[48 + 32 * (e / 64) + e % 32];
    let low = if e % 64 < 32 { byte & 0x0F } else { byte >> 4 };
    let high = (block[16 + e % 32] >> (e / 32)) & 1;
    i32::from(low) + 16 * i32::from(high)
}

/// `dequantize_row_q4_K` and `dequantize_row_q5_K`: `(d·sc)·q - (dmin·m)`
/// per value, unfused, where value `e` is `value(block, e)`.
pub(super) fn dequantize_k4(block: &[u8], out: &mut Vec<f32>, value: fn(&[u8], usize) -> i32) {
    let (d, dmin) = (f16_at(block, 0), f16_at(block, 2));
    let (sc, m) = k4_scales_mins(&block[4..16]);
    out.extend((0..256).map(|e| {
        let g = e / 32;
        (d * sc[g] as f32) * value(block, e) as f32 - dmin * m[g] as f32
    }));
}

/// Which of llama.cpp's kernels computes an output of a K-quant product:
/// x86 builds repack Q4_K matrices whose row count is a multiple of 8
/// and multiply them with `gemv` (one activation row) or `gemm` (the
/// first `N - N % 4` of `N >= 4` rows); other K-quant matrices use
/// `vec_dot` below 8 activation rows and the `tiled` kernels from 8 on.
/// Each rounds differently, so ringlet picks as llama.cpp does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KKernel {
    VecDot,
    Gemv,
    Gemm,
    Tiled,
}

/// The exact integers of one K-quant super-block times one Q8_K block;
/// the kernels differ only in how they turn these into floats.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct BlockInts {
    /// The eight lanes of ggml's AVX2 `vec_dot`: lane `k` sums, over every
    /// 32-value chunk, the scaled products of values `4k..4k+4` of the
    /// chunk (Q6_K: with the `- 32` of every value folded in per lane as
    /// ggml does, `32·(b[2k]·sc[2k] + b[2k+1]·sc[2k+1])`).
    pub(super) lanes: [i32; 8],
    /// Q4_K: per pair `p` of 32-value sub-blocks, `sc[2p]·D[2p] +
    /// sc[2p+1]·D[2p+1]`, `D` a sub-block's dot product (`gemm`'s steps).
    pub(super) pairs: [i32; 4],
    /// Q4_K: per pair `p`, `m[2p]·S[2p] + m[2p+1]·S[2p+1]`, `S[s]` the sum
    /// of the sub-block's activations (`vec_dot`'s four minimum lanes).
    pub(super) mins: [i32; 4],
}

/// The float side of a K-quant dot product, kernel by kernel.
pub(super) struct KAccumulator {
    kernel: KKernel,
    lanes: [f32; 8],
    mins: [f32; 4],
    sum: f32,
    min_sum: f32,
}

impl KAccumulator {
    pub(super) fn kernel(&self) -> KKernel {
        self.kernel
    }

    pub(super) fn new(kernel: KKernel) -> Self {
        Self {
            kernel,
            lanes: [0.0; 8],
            mins: [0.0; 4],
            sum: 0.0,
            min_sum: 0.0,
        }
    }

    /// A Q4_K block with scales `xd`, `xdmin`, against activations of
    /// scale `yd`:
    /// - `vec_dot`: `lane_k = fma(yd·xd, L_k, lane_k)`, minimum lanes
    ///   `fma(-yd·xdmin, m_l, ·)`;
    /// - `gemv`: `A = fma(ΣL, xd·yd, A)`, `M = fma(Σm, xdmin·yd, M)`;
    /// - `gemm`: the same with the four pairs and four minimums in turn;
    /// - `tiled`: `r = fma(-xdmin, Σm, xd·ΣL)`, `A = fma(r, yd, A)`.
    #[inline(always)]
    pub(super) fn add_q4_k(&mut self, ints: &BlockInts, xd: f32, xdmin: f32, yd: f32) {
        match self.kernel {
            KKernel::VecDot => {
                let (d, dmin) = (yd * xd, -yd * xdmin);
                for (acc, &lane) in self.lanes.iter_mut().zip(&ints.lanes) {
                    *acc = d.mul_add(lane as f32, *acc);
                }
                for (acc, &m) in self.mins.iter_mut().zip(&ints.mins) {
                    *acc = dmin.mul_add(m as f32, *acc);
                }
            }
            KKernel::Gemv => {
                let whole: i32 = ints.pairs.iter().sum();
                let mins: i32 = ints.mins.iter().sum();
                self.sum = (whole as f32).mul_add(xd * yd, self.sum);
                self.min_sum = (mins as f32).mul_add(xdmin * yd, self.min_sum);
            }
            KKernel::Gemm => {
                let (d, dmin) = (xd * yd, xdmin * yd);
                for (&pair, &m) in ints.pairs.iter().zip(&ints.mins) {
                    self.sum = (pair as f32).mul_add(d, self.sum);
                    self.min_sum = (m as f32).mul_add(dmin, self.min_sum);
                }
            }
            KKernel::Tiled => {
                let whole: i32 = ints.pairs.iter().sum();
                let mins: i32 = ints.mins.iter().sum();
                let r = (-xdmin).mul_add(mins as f32, xd * whole as f32);
                self.sum = r.mul_add(yd, self.sum);
            }
        }
    }

    /// A Q5_K block: `vec_dot` as Q4_K's lanes, but its minimums summed
    /// to one integer and folded into one scalar, `s = fma(-yd·xdmin, Σm,
    /// s)` (GCC contracts ggml's `summs += dmin * sum`); `tiled` as Q4_K.
    #[inline(always)]
    pub(super) fn add_q5_k(&mut self, ints: &BlockInts, xd: f32, xdmin: f32, yd: f32) {
        if self.kernel == KKernel::VecDot {
            let (d, dmin) = (yd * xd, -yd * xdmin);
            for (acc, &lane) in self.lanes.iter_mut().zip(&ints.lanes) {
                *acc = d.mul_add(lane as f32, *acc);
            }
            let mins: i32 = ints.mins.iter().sum();
            self.min_sum = dmin.mul_add(mins as f32, self.min_sum);
        } else {
            self.add_q4_k(ints, xd, xdmin, yd);
        }
    }

    /// A Q6_K block of scale `xd` against activations of scale `yd`:
    /// `vec_dot` as for Q4_K without minimums; `tiled`: `A = fma(xd·ΣL,
    /// yd, A)` (ΣL is the block's exact integer dot product).
    #[inline(always)]
    pub(super) fn add_q6_k(&mut self, ints: &BlockInts, xd: f32, yd: f32) {
        match self.kernel {
            KKernel::Tiled => {
                let whole: i32 = ints.lanes.iter().sum();
                self.sum = (xd * whole as f32).mul_add(yd, self.sum);
            }
            _ => {
                let d = yd * xd;
                for (acc, &lane) in self.lanes.iter_mut().zip(&ints.lanes) {
                    *acc = d.mul_add(lane as f32, *acc);
                }
            }
        }
    }

    /// The result: `vec_dot` sums its lanes (`hsum8`) and adds the
    /// minimums as the format keeps them (Q4_K's four lanes as `(m0 + m2)
    /// + (m1 + m3)`, Q5_K's one scalar); `gemv` and `gemm` return `A - M`;
    /// `tiled` its sum.
    pub(super) fn finish(&self, mins: Mins) -> f32 {
        match (self.kernel, mins) {
            (KKernel::VecDot, Mins::Lanes) => {
                hsum8(self.lanes) + ((self.mins[0] + self.mins[2]) + (self.mins[1] + self.mins[3]))
            }
            (KKernel::VecDot, Mins::Scalar) => hsum8(self.lanes) + self.min_sum,
            (KKernel::VecDot, Mins::None) => hsum8(self.lanes),
            (KKernel::Gemv | KKernel::Gemm, _) => self.sum - self.min_sum,
            (KKernel::Tiled, _) => self.sum,
        }
    }
}

/// How a K-quant format's `vec_dot` keeps its minimums.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mins {
    /// Q6_K has none.
    None,
    /// Q4_K: four lanes.
    Lanes,
    /// Q5_K: one scalar.
    Scalar,
}

/// The integers of a Q4_K block `wb` against a Q8_K block `ab`.
pub(super) fn q4_k_ints(wb: &[u8], ab: &[u8]) -> BlockInts {
    k4_ints(wb, ab, q4_k_value)
}

/// The integers of a Q5_K block `wb` against a Q8_K block `ab` (Q4_K's,
/// with five-bit values).
pub(super) fn q5_k_ints(wb: &[u8], ab: &[u8]) -> BlockInts {
    k4_ints(wb, ab, q5_k_value)
}

/// The integers of a block with Q4_K's scales and minimums (Q4_K, Q5_K),
/// whose value `e` is `value(wb, e)`, against a Q8_K block `ab`.
fn k4_ints(wb: &[u8], ab: &[u8], value: fn(&[u8], usize) -> i32) -> BlockInts {
    let (sc, m) = k4_scales_mins(&wb[4..16]);
    let mut ints = BlockInts::default();
    for j in 0..4 {
        for k in 0..8 {
            let products = |first: usize| -> i32 {
                (first + 4 * k..first + 4 * k + 4)
                    .map(|e| value(wb, e) * q8_k_value(ab, e))
                    .sum()
            };
            let v = sc[2 * j] * products(64 * j) + sc[2 * j + 1] * products(64 * j + 32);
            ints.lanes[k] += v;
            ints.pairs[j] += v;
        }
    }
    for (l, mins) in ints.mins.iter_mut().enumerate() {
        let pair = |s: usize| m[s] * (q8_k_bsum(ab, 2 * s) + q8_k_bsum(ab, 2 * s + 1));
        *mins = pair(2 * l) + pair(2 * l + 1);
    }
    ints
}

/// A Q5_K row times a Q8_K row with `kernel`'s rounding.
pub(super) fn dot_q5_k_q8_k(kernel: KKernel, w: &[u8], a: &[u8]) -> f32 {
    let mut acc = KAccumulator::new(kernel);
    for (wb, ab) in w.chunks_exact(176).zip(a.chunks_exact(292)) {
        acc.add_q5_k(
            &q5_k_ints(wb, ab),
            f16_at(wb, 0),
            f16_at(wb, 2),
            f32_at(ab, 0),
        );
    }
    acc.finish(Mins::Scalar)
}

/// The integers of a Q6_K block `wb` against a Q8_K block `ab`.
pub(super) fn q6_k_ints(wb: &[u8], ab: &[u8]) -> BlockInts {
    let mut ints = BlockInts::default();
    for (k, lane) in ints.lanes.iter_mut().enumerate() {
        for c in 0..8 {
            let scale = q6_k_scale(wb, 2 * c + k / 4);
            let products: i32 = (32 * c + 4 * k..32 * c + 4 * k + 4)
                .map(|e| q6_k_value(wb, e) * q8_k_value(ab, e))
                .sum();
            *lane += scale * products;
        }
        *lane -= 32
            * (q8_k_bsum(ab, 2 * k) * q6_k_scale(wb, 2 * k)
                + q8_k_bsum(ab, 2 * k + 1) * q6_k_scale(wb, 2 * k + 1));
    }
    ints
}

/// A Q4_K row times a Q8_K row with `kernel`'s rounding.
pub(super) fn dot_q4_k_q8_k(kernel: KKernel, w: &[u8], a: &[u8]) -> f32 {
    let mut acc = KAccumulator::new(kernel);
    for (wb, ab) in w.chunks_exact(144).zip(a.chunks_exact(292)) {
        acc.add_q4_k(
            &q4_k_ints(wb, ab),
            f16_at(wb, 0),
            f16_at(wb, 2),
            f32_at(ab, 0),
        );
    }
    acc.finish(Mins::Lanes)
}

/// A Q6_K row times a Q8_K row with `kernel`'s rounding.
pub(super) fn dot_q6_k_q8_k(kernel: KKernel, w: &[u8], a: &[u8]) -> f32 {
    let mut acc = KAccumulator::new(kernel);
    for (wb, ab) in w.chunks_exact(210).zip(a.chunks_exact(292)) {
        acc.add_q6_k(&q6_k_ints(wb, ab), f16_at(wb, 208), f32_at(ab, 0));
    }
    acc.finish(Mins::None)
}
