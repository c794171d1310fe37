//! The definitions of the ops that have AVX-512 versions (`x86`): ggml's
//! lanes and order, written lane by lane. The fast versions are tested to
//! give these functions' bits exactly.

use std::ops::Range;

use crate::kv_cache::HeadRows;

/// `_mm512_reduce_add_ps` as GCC implements it: halves, quarters, pairs.
pub(super) fn reduce_add16(a: &[f32; 16]) -> f32 {
    let mut t8 = [0f32; 8];
    for i in 0..8 {
        t8[i] = a[8 + i] + a[i];
    }
    let t4 = [t8[4] + t8[0], t8[5] + t8[1], t8[6] + t8[2], t8[7] + t8[3]];
    (t4[0] + t4[2]) + (t4[1] + t4[3])
}

/// ggml's vectorised `expf` (`ggml_v_expf`, AVX-512 branch), one lane.
pub(super) fn v_expf(x: f32) -> f32 {
    let r = f32::from_bits(0x4B40_0000); // 0x1.8p23
    let z = x.mul_add(f32::from_bits(0x3FB8_AA3B), r); // 0x1.715476p+0
    let n = z - r;
    let b = (-n).mul_add(
        f32::from_bits(0x35BF_BE8E),
        (-n).mul_add(f32::from_bits(0x3F31_7200), x),
    ); // 0x1.7f7d1cp-20, 0x1.62e4p-1
    let u = b * b;
    let j = f32::from_bits(0x3C07_2010) // 0x1.0e4020p-7
        .mul_add(b, f32::from_bits(0x3D2B_9F17)) // 0x1.573e2ep-5
        .mul_add(
            u,
            f32::from_bits(0x3E2A_AF33).mul_add(b, f32::from_bits(0x3EFF_FEDB)),
        ) // 0x1.555e66p-3, 0x1.fffdb6p-2
        .mul_add(u, f32::from_bits(0x3F7F_FFF6).mul_add(b, 1.0)); // 0x1.ffffecp-1
    // Without branches, so that loops over many values vectorise: both
    // outcomes are computed and one is chosen.
    let saturated = if n <= 0.0 { 0.0 } else { f32::INFINITY };
    // _mm512_scalef_ps: j * 2^n with one rounding (exact in f64, then
    // rounded). The clamp changes nothing where the result is used
    // (|n| <= 192) and keeps 2^n a normal f64 built from its bits.
    let clamped = n.clamp(-192.0, 192.0);
    let two_to_n = f64::from_bits(((clamped as i64 + 1023) as u64) << 52);
    let scaled = (f64::from(j) * two_to_n) as f32;
    if n.abs() > 192.0 { saturated } else { scaled }
}

/// The 64-element steps of `dot_f32` (`x.len() == y.len()`, a multiple of
/// 64), reduced: four 16-lane FMA accumulators, folded 0+2, 1+3, then
/// 0+1, then reduced.
pub(super) fn dot_f32_steps(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [[0f32; 16]; 4];
    for (xs, ys) in x.chunks_exact(64).zip(y.chunks_exact(64)) {
        for (j, acc) in acc.iter_mut().enumerate() {
            for (l, a) in acc.iter_mut().enumerate() {
                *a = xs[16 * j + l].mul_add(ys[16 * j + l], *a);
            }
        }
    }
    let mut sum = [0f32; 16];
    for l in 0..16 {
        let a0 = acc[0][l] + acc[2][l];
        let a1 = acc[1][l] + acc[3][l];
        sum[l] = a0 + a1;
    }
    reduce_add16(&sum)
}

/// [`dot_f32_steps`] of each `d`-long row of `rows`, over its first
/// `y.len()` values, with `y`.
pub(super) fn dot_f32_steps_rows(rows: &[f32], d: usize, y: &[f32], out: &mut [f32]) {
    for (row, s) in rows.chunks_exact(d).zip(out.iter_mut()) {
        *s = dot_f32_steps(&row[..y.len()], y);
    }
}

/// Lane `l` (of 16) of `dot_f32` of every column `c` of a KV head's rows
/// `v` with the weights `p`, over a window padded with zeros, into
/// `lanes[l * d + c]`: `(a0 + a2) + (a1 + a3)`, where accumulator `g`
/// takes the keys `j ≡ 16g + l (mod 64)` in order, one FMA each, from +0.
/// Only the rows `keys` are read: every other weight must be zero, and so
/// adds nothing (an FMA with a zero product returns the accumulator,
/// which starts at +0 and so is never -0).
pub(super) fn dot_lanes(v: HeadRows<'_>, p: &[f32], keys: Range<usize>, lanes: &mut [f32]) {
    let d = v.d();
    // One lane's four accumulators at a time, so the scratch is 4·d
    // values instead of 64·d zeroed and summed for every head.
    let mut acc = vec![0f32; 4 * d];
    for (l, lane) in lanes.chunks_exact_mut(d).enumerate() {
        acc.fill(0.0);
        for (g, slot) in acc.chunks_exact_mut(d).enumerate() {
            let first = 16 * g + l;
            // The first key at or after `keys.start` in this slot.
            let skip = keys.start.saturating_sub(first).div_ceil(64);
            for j in (first + 64 * skip..keys.end).step_by(64) {
                let pj = p[j];
                for (a, &vc) in slot.iter_mut().zip(v.row(j)) {
                    *a = vc.mul_add(pj, *a);
                }
            }
        }
        let a = |g: usize| &acc[g * d..][..d];
        let (a0, a1, a2, a3) = (a(0), a(1), a(2), a(3));
        for c in 0..d {
            lane[c] = (a0[c] + a2[c]) + (a1[c] + a3[c]);
        }
    }
}

/// `(x / (1 + v_expf(0 - x))) * u` over whole 16-value chunks:
/// `ggml_v_silu` and the multiply.
pub(super) fn swiglu_chunks(x: &[f32], u: &[f32], out: &mut [f32]) {
    for ((o, &x), &u) in out.iter_mut().zip(x).zip(u) {
        *o = (x / (1.0 + v_expf(0.0 - x))) * u;
    }
}

/// Replaces the 16 values of `chunk` by `v_expf(v - max)` and returns
/// their `reduce_add16`.
pub(super) fn exp_chunk(chunk: &mut [f32], max: f32) -> f32 {
    let mut lanes = [0f32; 16];
    for (lane, v) in lanes.iter_mut().zip(chunk.iter()) {
        *lane = v_expf(*v - max);
    }
    chunk.copy_from_slice(&lanes);
    reduce_add16(&lanes)
}
