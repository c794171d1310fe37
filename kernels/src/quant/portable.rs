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

/// `ggml_vec_dot_q6_K_q8_K` (AVX2): per super-block, lane `k` of eight
/// holds the exact integer `Σ_c sc(c, k) · Σ_{t<4} q[32c+4k+t] ·
/// y[32c+4k+t]` over the eight 32-value chunks `c`, where `sc(c, k)` is
/// the scale of the chunk's first 16 values for `k < 4` and of its last
/// 16 otherwise, minus `32 · (bsum[2k]·sc[2k] + bsum[2k+1]·sc[2k+1])`
/// (the `- 32` of every value, folded in as ggml does); then
/// `acc_k = fma(d_y · d_x, lane_k, acc_k)`, and the lanes are summed.
pub(super) fn dot_q6_k_q8_k(w: &[u8], a: &[u8]) -> f32 {
    let mut acc = [0f32; 8];
    for (wb, ab) in w.chunks_exact(210).zip(a.chunks_exact(292)) {
        let d = f32_at(ab, 0) * f16_at(wb, 208);
        for (k, acc) in acc.iter_mut().enumerate() {
            let mut lane = 0i32;
            for c in 0..8 {
                let scale = q6_k_scale(wb, 2 * c + k / 4);
                let products: i32 = (32 * c + 4 * k..32 * c + 4 * k + 4)
                    .map(|e| q6_k_value(wb, e) * q8_k_value(ab, e))
                    .sum();
                lane += scale * products;
            }
            lane -= 32
                * (q8_k_bsum(ab, 2 * k) * q6_k_scale(wb, 2 * k)
                    + q8_k_bsum(ab, 2 * k + 1) * q6_k_scale(wb, 2 * k + 1));
            *acc = d.mul_add(lane as f32, *acc);
        }
    }
    hsum8(acc)
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

/// `ggml_vec_dot_q4_K_q8_K` (AVX2): per super-block, lane `k` of eight
/// holds the exact integer sum over the four 64-value groups `j` of
/// `sc[2j]` times the products of the low nibbles `32j+4k..32j+4k+4` with
/// their activations, plus `sc[2j+1]` times the same for the high nibbles;
/// then `acc_k = fma(d_y * d, lane_k, acc_k)`. The minimums go to four
/// lanes of their own: lane `l` takes `fma(-d_y * dmin, m[2l] * (b[4l] +
/// b[4l+1]) + m[2l+1] * (b[4l+2] + b[4l+3]), acc)` with `b` the 16-value
/// sums, and is added at the end as `(m0 + m2) + (m1 + m3)`.
pub(super) fn dot_q4_k_q8_k(w: &[u8], a: &[u8]) -> f32 {
    let mut acc = [0f32; 8];
    let mut acc_m = [0f32; 4];
    for (wb, ab) in w.chunks_exact(144).zip(a.chunks_exact(292)) {
        let dy = f32_at(ab, 0);
        let d = dy * f16_at(wb, 0);
        let dmin = -dy * f16_at(wb, 2);
        let (sc, m) = k4_scales_mins(&wb[4..16]);
        for (l, acc_m) in acc_m.iter_mut().enumerate() {
            let pair = |k: usize| m[k] * (q8_k_bsum(ab, 2 * k) + q8_k_bsum(ab, 2 * k + 1));
            *acc_m = dmin.mul_add((pair(2 * l) + pair(2 * l + 1)) as f32, *acc_m);
        }
        for (k, acc) in acc.iter_mut().enumerate() {
            let mut lane = 0i32;
            for j in 0..4 {
                let low: i32 = (0..4)
                    .map(|t| {
                        q4_k_value(wb, 64 * j + 4 * k + t) * q8_k_value(ab, 64 * j + 4 * k + t)
                    })
                    .sum();
                let high: i32 = (0..4)
                    .map(|t| {
                        q4_k_value(wb, 64 * j + 32 + 4 * k + t)
                            * q8_k_value(ab, 64 * j + 32 + 4 * k + t)
                    })
                    .sum();
                lane += sc[2 * j] * low + sc[2 * j + 1] * high;
            }
            *acc = d.mul_add(lane as f32, *acc);
        }
    }
    hsum8(acc) + ((acc_m[0] + acc_m[2]) + (acc_m[1] + acc_m[3]))
}

/// `dequantize_row_q4_K`: `(d·sc)·q - (dmin·m)` per value, unfused.
pub(super) fn dequantize_q4_k(block: &[u8], out: &mut Vec<f32>) {
    let (d, dmin) = (f16_at(block, 0), f16_at(block, 2));
    let (sc, m) = k4_scales_mins(&block[4..16]);
    out.extend((0..256).map(|e| {
        let g = e / 32;
        (d * sc[g] as f32) * q4_k_value(block, e) as f32 - dmin * m[g] as f32
    }));
}
