//! ggml's own AVX-512 code for the ops of [`portable`](super::portable),
//! instruction for instruction, so that they give its bits exactly. The
//! entry points have `#[target_feature(enable = "avx512f")]`
//! (`CpuFeatures::avx512f`); the helpers are `#[inline(always)]` without
//! features of their own and are only ever inlined into those. The f32
//! dot product, SwiGLU and the softmax exponentials also have AVX2 builds
//! of the same arithmetic.

use std::arch::x86_64::*;

use crate::kv_cache::{HeadRows, PAGE_TOKENS};

/// The 64-element steps of `dot_f32`, reduced: four 16-lane FMA
/// accumulators, folded 0+2, 1+3, then 0+1, then reduced. (The product
/// calls [`dot_f32_steps_rows`]; the tests check this one too.)
#[cfg(test)]
#[target_feature(enable = "avx512f")]
pub(super) fn dot_f32_steps(x: &[f32], y: &[f32]) -> f32 {
    let steps = x.len().min(y.len()) / 64;
    // SAFETY: this function has AVX-512F; every load reads 16 floats inside
    // the first `steps * 64` elements of `x` and `y`.
    unsafe {
        let mut acc = [_mm512_setzero_ps(); 4];
        for i in 0..steps {
            for (j, acc) in acc.iter_mut().enumerate() {
                let at = i * 64 + 16 * j;
                *acc = _mm512_fmadd_ps(
                    _mm512_loadu_ps(x.as_ptr().add(at)),
                    _mm512_loadu_ps(y.as_ptr().add(at)),
                    *acc,
                );
            }
        }
        let sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[2]), _mm512_add_ps(acc[1], acc[3]));
        reduce_add16(sum)
    }
}

/// [`dot_f32_steps`] on AVX2 (`CpuFeatures::avx2_fma`): each 16-lane
/// accumulator as two 8-lane halves, the same FMAs per lane, and the
/// reduction in `_mm512_reduce_add_ps`'s order (halves, then quarters,
/// then `(t0 + t2) + (t1 + t3)`), so the bits are the AVX-512 ones.
#[target_feature(enable = "avx2,fma")]
pub(super) fn dot_f32_steps_avx2(x: &[f32], y: &[f32]) -> f32 {
    let steps = x.len().min(y.len()) / 64;
    // SAFETY: this function has AVX2 and FMA; every load reads 8 floats
    // inside the first `steps * 64` elements of `x` and `y`.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); 2]; 4];
        for i in 0..steps {
            for (j, acc) in acc.iter_mut().enumerate() {
                for (h, acc) in acc.iter_mut().enumerate() {
                    let at = i * 64 + 16 * j + 8 * h;
                    *acc = _mm256_fmadd_ps(
                        _mm256_loadu_ps(x.as_ptr().add(at)),
                        _mm256_loadu_ps(y.as_ptr().add(at)),
                        *acc,
                    );
                }
            }
        }
        let [low, high] = [0, 1].map(|h| {
            _mm256_add_ps(
                _mm256_add_ps(acc[0][h], acc[2][h]),
                _mm256_add_ps(acc[1][h], acc[3][h]),
            )
        });
        reduce_add16_halves(low, high)
    }
}

/// [`dot_f32_steps`] of each `d`-long row of `rows`, over its first
/// `y.len()` values, with `y`: one call for all of a query's keys. Rows go
/// sixteen at a time: their folded accumulators are reduced together
/// (`reduce_add16_transposed`), the same additions per row in a quarter
/// of the instructions and without one long dependent chain per row.
#[target_feature(enable = "avx512f")]
pub(super) fn dot_f32_steps_rows(rows: &[f32], d: usize, y: &[f32], out: &mut [f32]) {
    let n = (rows.len() / d.max(1)).min(out.len());
    let steps = y.len() / 64;
    assert!(steps * 64 <= d, "the steps lie inside each row");
    // SAFETY: this function has AVX-512F; row `r < n` starts at `r * d`
    // and every load reads 16 floats inside its first `steps * 64` (and
    // inside `y`'s); the stores write `out[group * 16..][..16]`, inside
    // the first `n` values.
    unsafe {
        let folded = |r: usize| {
            let row = rows.as_ptr().add(r * d);
            let mut acc = [_mm512_setzero_ps(); 4];
            for i in 0..steps {
                for (j, acc) in acc.iter_mut().enumerate() {
                    let at = i * 64 + 16 * j;
                    *acc = _mm512_fmadd_ps(
                        _mm512_loadu_ps(row.add(at)),
                        _mm512_loadu_ps(y.as_ptr().add(at)),
                        *acc,
                    );
                }
            }
            _mm512_add_ps(_mm512_add_ps(acc[0], acc[2]), _mm512_add_ps(acc[1], acc[3]))
        };
        let groups = n / 16;
        for group in 0..groups {
            let sums = reduce_add16_transposed(std::array::from_fn(|k| folded(group * 16 + k)));
            _mm512_storeu_ps(out.as_mut_ptr().add(group * 16), sums);
        }
        for (r, out) in out.iter_mut().enumerate().take(n).skip(groups * 16) {
            *out = reduce_add16(folded(r));
        }
    }
}

/// [`reduce_add16`] of sixteen vectors at once: lane `k` of the result is
/// `reduce_add16(v[k])`, bit for bit. `reduce_add16` halves a vector
/// three times (lane `i` plus lane `i + 8`, then `i + 4`, then `i + 2`)
/// and adds the last two lanes; here each level adds those same lanes of
/// several vectors packed side by side, so 15 additions (and 30 shuffles)
/// do the work of 64.
///
/// # Safety
/// The caller has AVX-512F.
#[inline(always)]
unsafe fn reduce_add16_transposed(v: [__m512; 16]) -> __m512 {
    // SAFETY: the caller has AVX-512F; register-only operations.
    unsafe {
        // 128-bit lanes: `l` picks two of the first operand's, `h` two of
        // the second's.
        let halves = |a: __m512, b: __m512| {
            // [a 0-7, b 0-7] + [a 8-15, b 8-15]: each one's eight sums.
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b01_00_01_00>(a, b),
                _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b),
            )
        };
        // Eight vectors, each two rows' 8 partial sums: row 2m, then 2m+1.
        let eights: [__m512; 8] = std::array::from_fn(|m| halves(v[2 * m], v[2 * m + 1]));
        // Four vectors, each four rows' 4 partial sums (one 128-bit lane
        // each): from eights 2t and 2t + 1, rows 4t, 4t+1, 4t+2, 4t+3.
        let fours: [__m512; 4] = std::array::from_fn(|t| {
            let (a, b) = (eights[2 * t], eights[2 * t + 1]);
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b),
                _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b),
            )
        });
        // Within each 128-bit lane j: [x 0+2, x 1+3, y 0+2, y 1+3] for row
        // x = 4·(first of the pair) + j and row y = 4·(second) + j.
        let pairs = |a: __m512, b: __m512| {
            _mm512_add_ps(
                _mm512_shuffle_ps::<0b01_00_01_00>(a, b),
                _mm512_shuffle_ps::<0b11_10_11_10>(a, b),
            )
        };
        let (twos_low, twos_high) = (pairs(fours[0], fours[1]), pairs(fours[2], fours[3]));
        // Lane 4j + s holds row 4s + j: from twos_low, rows j and 4 + j;
        // from twos_high, rows 8 + j and 12 + j.
        let ones = _mm512_add_ps(
            _mm512_shuffle_ps::<0b10_00_10_00>(twos_low, twos_high),
            _mm512_shuffle_ps::<0b11_01_11_01>(twos_low, twos_high),
        );
        // Row k is in lane 4·(k % 4) + k / 4.
        _mm512_permutexvar_ps(
            _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15),
            ones,
        )
    }
}

/// [`dot_f32_steps_rows`] with [`dot_f32_steps_avx2`].
#[target_feature(enable = "avx2,fma")]
pub(super) fn dot_f32_steps_rows_avx2(rows: &[f32], d: usize, y: &[f32], out: &mut [f32]) {
    for (row, s) in rows.chunks_exact(d).zip(out.iter_mut()) {
        *s = dot_f32_steps_avx2(&row[..y.len()], y);
    }
}

/// [`portable::dot_lanes`](super::portable::dot_lanes) for `d` a multiple
/// of 64: per 64 columns and lane, the four accumulators (16 registers)
/// stay in registers while the lane's keys go by, instead of being
/// loaded, added to and stored back for every key.
#[target_feature(enable = "avx512f")]
pub(super) fn dot_lanes(
    v: HeadRows<'_>,
    p: &[f32],
    keys: std::ops::Range<usize>,
    lanes: &mut [f32],
) {
    let d = v.d();
    assert!(d.is_multiple_of(64), "64 columns at a time");
    assert!(
        keys.end <= p.len() && keys.end <= v.rows() && lanes.len() >= 16 * d,
        "weights for every key, a row for each, and 16 lanes"
    );
    // A round of 64 keys lies in one page of rows.
    const { assert!(PAGE_TOKENS.is_multiple_of(64)) };
    // Keys go by in rounds of 64, from the round that holds the first.
    let first_round = keys.start / 64 * 64;
    // SAFETY: this function has AVX-512F; every key `j` read is inside
    // `keys`, so below `keys.end` and its weight is there (asserted
    // above); its row is row `in_page + 16g + l < PAGE_TOKENS` (a round
    // starts at a multiple of 64, and PAGE_TOKENS is one) of the round's
    // page, which `page` returns whole (`PAGE_TOKENS * d` values); each
    // load reads 16 of its columns `c0 + .. < d`, and each store writes 16
    // of lane `l`'s `d` values.
    unsafe {
        for c0 in (0..d).step_by(64) {
            for l in 0..16 {
                let mut acc = [[_mm512_setzero_ps(); 4]; 4];
                for round in (first_round..keys.end).step_by(64) {
                    let page = v.page(round / PAGE_TOKENS).as_ptr();
                    let in_page = round % PAGE_TOKENS;
                    // `g` picks the accumulator in one array, `t` the columns.
                    #[allow(clippy::needless_range_loop)]
                    for g in 0..4 {
                        let j = round + 16 * g + l;
                        if j < keys.start || j >= keys.end {
                            continue;
                        }
                        let pj = _mm512_set1_ps(*p.get_unchecked(j));
                        let row = page.add((in_page + 16 * g + l) * d + c0);
                        for t in 0..4 {
                            acc[g][t] =
                                _mm512_fmadd_ps(_mm512_loadu_ps(row.add(16 * t)), pj, acc[g][t]);
                        }
                    }
                }
                let lane = lanes.as_mut_ptr().add(l * d + c0);
                // `t` picks the columns in each accumulator.
                #[allow(clippy::needless_range_loop)]
                for t in 0..4 {
                    let value = _mm512_add_ps(
                        _mm512_add_ps(acc[0][t], acc[2][t]),
                        _mm512_add_ps(acc[1][t], acc[3][t]),
                    );
                    _mm512_storeu_ps(lane.add(16 * t), value);
                }
            }
        }
    }
}

/// `(x / (1 + v_expf(0 - x))) * u` over whole 16-value chunks:
/// `ggml_v_silu` and the multiply.
#[target_feature(enable = "avx512f")]
pub(super) fn swiglu_chunks(x: &[f32], u: &[f32], out: &mut [f32]) {
    let chunks = x.len().min(u.len()).min(out.len()) / 16;
    // SAFETY: this function has AVX-512F; every access covers 16 floats
    // inside the first `chunks * 16` of each slice.
    unsafe {
        for i in 0..chunks {
            let xv = _mm512_loadu_ps(x.as_ptr().add(16 * i));
            let e = v_expf16(_mm512_sub_ps(_mm512_setzero_ps(), xv));
            let silu = _mm512_div_ps(xv, _mm512_add_ps(_mm512_set1_ps(1.0), e));
            let y = _mm512_mul_ps(silu, _mm512_loadu_ps(u.as_ptr().add(16 * i)));
            _mm512_storeu_ps(out.as_mut_ptr().add(16 * i), y);
        }
    }
}

/// Replaces the 16 values of `chunk` by `v_expf(v - max)` and returns
/// their `reduce_add16`.
#[target_feature(enable = "avx512f")]
pub(super) fn exp_chunk(chunk: &mut [f32], max: f32) -> f32 {
    assert_eq!(chunk.len(), 16, "softmax chunks are 16 values");
    // SAFETY: this function has AVX-512F; the loads and the store touch the
    // 16 floats of `chunk` (asserted above).
    unsafe {
        let x = _mm512_sub_ps(_mm512_loadu_ps(chunk.as_ptr()), _mm512_set1_ps(max));
        let e = v_expf16(x);
        _mm512_storeu_ps(chunk.as_mut_ptr(), e);
        reduce_add16(e)
    }
}

/// `v_expf` of 16 lanes: `ggml_v_expf` (AVX-512), instruction for
/// instruction.
///
/// # Safety
/// The caller has AVX-512F.
#[inline(always)]
unsafe fn v_expf16(x: __m512) -> __m512 {
    let c = |bits: u32| f32::from_bits(bits);
    // SAFETY: the caller has AVX-512F; register-only operations.
    unsafe {
        let r = _mm512_set1_ps(c(0x4B40_0000));
        let z = _mm512_fmadd_ps(x, _mm512_set1_ps(c(0x3FB8_AA3B)), r);
        let n = _mm512_sub_ps(z, r);
        let b = _mm512_fnmadd_ps(
            n,
            _mm512_set1_ps(c(0x35BF_BE8E)),
            _mm512_fnmadd_ps(n, _mm512_set1_ps(c(0x3F31_7200)), x),
        );
        let saturated = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(_mm512_abs_ps(n), _mm512_set1_ps(192.0));
        let u = _mm512_mul_ps(b, b);
        let j = _mm512_fmadd_ps(
            _mm512_fmadd_ps(
                _mm512_fmadd_ps(
                    _mm512_set1_ps(c(0x3C07_2010)),
                    b,
                    _mm512_set1_ps(c(0x3D2B_9F17)),
                ),
                u,
                _mm512_fmadd_ps(
                    _mm512_set1_ps(c(0x3E2A_AF33)),
                    b,
                    _mm512_set1_ps(c(0x3EFF_FEDB)),
                ),
            ),
            u,
            _mm512_fmadd_ps(_mm512_set1_ps(c(0x3F7F_FFF6)), b, _mm512_set1_ps(1.0)),
        );
        let scaled = _mm512_scalef_ps(j, n);
        let non_positive = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(n, _mm512_setzero_ps());
        let limit = _mm512_mask_blend_ps(
            non_positive,
            _mm512_set1_ps(f32::INFINITY),
            _mm512_setzero_ps(),
        );
        _mm512_mask_blend_ps(saturated, scaled, limit)
    }
}

/// [`swiglu_chunks`] on AVX2 (`CpuFeatures::avx2_fma`): the same lanes
/// in two 8-lane halves ([`v_expf8`]), the division and the multiply
/// rounded as AVX-512 rounds them. Groups of 8 with an exponent only
/// `_mm512_scalef_ps` handles in one rounding take the portable definition.
#[target_feature(enable = "avx2,fma")]
pub(super) fn swiglu_chunks_avx2(x: &[f32], u: &[f32], out: &mut [f32]) {
    let groups = x.len().min(u.len()).min(out.len()) / 16 * 2;
    // SAFETY: this function has AVX2 and FMA; every access covers 8 floats
    // inside the first `groups * 8` of each slice.
    unsafe {
        for i in 0..groups {
            let at = 8 * i;
            let xv = _mm256_loadu_ps(x.as_ptr().add(at));
            let Some(e) = v_expf8(_mm256_sub_ps(_mm256_setzero_ps(), xv)) else {
                let (x, u) = (&x[at..at + 8], &u[at..at + 8]);
                super::portable::swiglu_chunks(x, u, &mut out[at..at + 8]);
                continue;
            };
            let silu = _mm256_div_ps(xv, _mm256_add_ps(_mm256_set1_ps(1.0), e));
            let y = _mm256_mul_ps(silu, _mm256_loadu_ps(u.as_ptr().add(at)));
            _mm256_storeu_ps(out.as_mut_ptr().add(at), y);
        }
    }
}

/// [`exp_chunk`] on AVX2: two halves of [`v_expf8`] and the AVX-512
/// reduction's order; a chunk with an exponent only `_mm512_scalef_ps`
/// handles in one rounding takes the portable definition.
#[target_feature(enable = "avx2,fma")]
pub(super) fn exp_chunk_avx2(chunk: &mut [f32], max: f32) -> f32 {
    assert_eq!(chunk.len(), 16, "softmax chunks are 16 values");
    // SAFETY: this function has AVX2 and FMA; the loads and stores touch
    // the 16 floats of `chunk` (asserted above).
    unsafe {
        let m = _mm256_set1_ps(max);
        let low = v_expf8(_mm256_sub_ps(_mm256_loadu_ps(chunk.as_ptr()), m));
        let high = v_expf8(_mm256_sub_ps(_mm256_loadu_ps(chunk.as_ptr().add(8)), m));
        let (Some(low), Some(high)) = (low, high) else {
            return super::portable::exp_chunk(chunk, max);
        };
        _mm256_storeu_ps(chunk.as_mut_ptr(), low);
        _mm256_storeu_ps(chunk.as_mut_ptr().add(8), high);
        reduce_add16_halves(low, high)
    }
}

/// [`v_expf16`]'s arithmetic on 8 lanes with AVX2 and FMA. `scalef(j, n)`
/// is `j * 2^n` rounded once: for `|n| <= 126`, 2^n is a normal float and
/// one multiply by it rounds once too; `|n| > 192` saturates as in
/// `v_expf16`. `None` when a lane lies between (or is NaN), for the caller
/// to take the portable definition.
///
/// # Safety
/// The caller has AVX2 and FMA.
#[inline(always)]
unsafe fn v_expf8(x: __m256) -> Option<__m256> {
    let c = |bits: u32| f32::from_bits(bits);
    // SAFETY: the caller has AVX2 and FMA; register-only operations.
    unsafe {
        let r = _mm256_set1_ps(c(0x4B40_0000));
        let z = _mm256_fmadd_ps(x, _mm256_set1_ps(c(0x3FB8_AA3B)), r);
        let n = _mm256_sub_ps(z, r);
        let abs_n = _mm256_andnot_ps(_mm256_set1_ps(-0.0), n);
        let saturated = _mm256_cmp_ps::<_CMP_GT_OQ>(abs_n, _mm256_set1_ps(192.0));
        let exact = _mm256_cmp_ps::<_CMP_LE_OQ>(abs_n, _mm256_set1_ps(126.0));
        if _mm256_movemask_ps(_mm256_or_ps(saturated, exact)) != 0xFF {
            return None;
        }
        let b = _mm256_fnmadd_ps(
            n,
            _mm256_set1_ps(c(0x35BF_BE8E)),
            _mm256_fnmadd_ps(n, _mm256_set1_ps(c(0x3F31_7200)), x),
        );
        let u = _mm256_mul_ps(b, b);
        let j = _mm256_fmadd_ps(
            _mm256_fmadd_ps(
                _mm256_fmadd_ps(
                    _mm256_set1_ps(c(0x3C07_2010)),
                    b,
                    _mm256_set1_ps(c(0x3D2B_9F17)),
                ),
                u,
                _mm256_fmadd_ps(
                    _mm256_set1_ps(c(0x3E2A_AF33)),
                    b,
                    _mm256_set1_ps(c(0x3EFF_FEDB)),
                ),
            ),
            u,
            _mm256_fmadd_ps(_mm256_set1_ps(c(0x3F7F_FFF6)), b, _mm256_set1_ps(1.0)),
        );
        // 2^n from n's bits; saturated lanes are replaced below.
        let biased = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
        let two_to_n = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(biased));
        let scaled = _mm256_mul_ps(j, two_to_n);
        let non_positive = _mm256_cmp_ps::<_CMP_LE_OQ>(n, _mm256_setzero_ps());
        let limit = _mm256_blendv_ps(
            _mm256_set1_ps(f32::INFINITY),
            _mm256_setzero_ps(),
            non_positive,
        );
        Some(_mm256_blendv_ps(scaled, limit, saturated))
    }
}

/// `reduce_add16` of the 16 lanes `low` then `high`, on AVX2: halves,
/// quarters, then (0 + 2) + (1 + 3), as `_mm512_reduce_add_ps`.
///
/// # Safety
/// The caller has AVX2.
#[inline(always)]
unsafe fn reduce_add16_halves(low: __m256, high: __m256) -> f32 {
    // SAFETY: the caller has AVX2; register-only operations.
    unsafe {
        let t8 = _mm256_add_ps(high, low);
        let t4 = _mm_add_ps(_mm256_extractf128_ps(t8, 1), _mm256_castps256_ps128(t8));
        let t2 = _mm_add_ps(t4, _mm_movehl_ps(t4, t4));
        _mm_cvtss_f32(_mm_add_ss(t2, _mm_movehdup_ps(t2)))
    }
}

/// `reduce_add16` of a vector: halves, quarters, then (0 + 2) + (1 + 3).
///
/// # Safety
/// The caller has AVX-512F.
#[inline(always)]
unsafe fn reduce_add16(v: __m512) -> f32 {
    // SAFETY: the caller has AVX-512F; register-only operations.
    unsafe {
        let high = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
        let t8 = _mm256_add_ps(high, _mm512_castps512_ps256(v));
        let t4 = _mm_add_ps(_mm256_extractf128_ps::<1>(t8), _mm256_castps256_ps128(t8));
        let t2 = _mm_add_ps(t4, _mm_movehl_ps(t4, t4));
        _mm_cvtss_f32(_mm_add_ss(t2, _mm_movehdup_ps(t2)))
    }
}
