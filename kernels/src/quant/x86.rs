//! The dot products of [`portable`](super::portable) with ggml's AVX2
//! code, bit for bit: the integer lane sums are exact whichever
//! instructions compute them, and the float steps are the same FMAs in the
//! same order.
//!
//! Each kernel is written once, generic over how the eight i32 lanes of
//! byte products are summed ([`Lanes`]), and compiled twice: for AVX2
//! (module [`avx2`]) and for AVX-512 VNNI (module [`vnni`]). The generic
//! bodies are `#[inline(always)]` and have no target features of their
//! own; they are only ever inlined into those two modules' functions,
//! which have.

use std::arch::x86_64::*;

use super::portable::f16_at;

/// How far ahead (in bytes) each weight row is prefetched: a few blocks,
/// so that the next blocks arrive from L2/L3 while these are computed.
const PREFETCH_BYTES: usize = 640;

/// Eight i32 lanes, lane j = Σ_{t<4} u[4j+t]·s[4j+t], for u in 0..=255
/// and products that fit i16 pairs (true for every caller here), as f32.
trait Lanes {
    /// # Safety
    /// The caller is compiled with the features of the module that uses
    /// this implementation.
    unsafe fn dot_u8_i8(u: __m256i, s: __m256i) -> __m256;
}

/// AVX2: two multiply-adds (pairs to i16, then to i32).
struct Avx2;

impl Lanes for Avx2 {
    #[inline(always)]
    unsafe fn dot_u8_i8(u: __m256i, s: __m256i) -> __m256 {
        // SAFETY: the caller has AVX2 (trait contract); register-only.
        unsafe {
            let lanes = _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
            _mm256_cvtepi32_ps(lanes)
        }
    }
}

/// AVX-512 VNNI: one fused byte dot product.
struct Vnni;

impl Lanes for Vnni {
    #[inline(always)]
    unsafe fn dot_u8_i8(u: __m256i, s: __m256i) -> __m256 {
        // SAFETY: the caller has AVX-512 VNNI and VL (trait contract);
        // register-only.
        unsafe { _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s)) }
    }
}

/// Stamps out the entry points of one instruction set: each a
/// `#[target_feature]` function that inlines the generic kernel.
macro_rules! entry_points {
    ($(#[$doc:meta])* $module:ident, $features:literal, $lanes:ty) => {
        $(#[$doc])*
        pub(super) mod $module {
            use super::*;

            #[target_feature(enable = $features)]
            pub(in crate::quant) fn dot_q4_0_q8_0(w: &[u8], a: &[u8]) -> f32 {
                // SAFETY: this function has the kernel's features.
                unsafe { super::dot_q4_0_q8_0::<$lanes>(w, a) }
            }

            #[target_feature(enable = $features)]
            pub(in crate::quant) fn dot_q4_1_q8_1(w: &[u8], a: &[u8]) -> f32 {
                // SAFETY: this function has the kernel's features.
                unsafe { super::dot_q4_1_q8_1::<$lanes>(w, a) }
            }

            #[target_feature(enable = $features)]
            pub(in crate::quant) fn dot_q5_0_q8_0(w: &[u8], a: &[u8]) -> f32 {
                let [dot, ..] = dot4_q5_0_q8_0([w; 4], a);
                dot
            }

            #[target_feature(enable = $features)]
            pub(in crate::quant) fn dot4_q5_0_q8_0(w: [&[u8]; 4], a: &[u8]) -> [f32; 4] {
                // SAFETY: this function has the kernel's features;
                // `dot4_signed` passes a pointer to a 22-byte block.
                unsafe { super::dot4_signed::<$lanes>(w, a, 22, |wb| super::q5_0_bytes(wb)) }
            }

            #[target_feature(enable = $features)]
            pub(in crate::quant) fn dot_q6_k_q8_k(w: &[u8], a: &[u8]) -> f32 {
                let [dot, ..] = dot4_q6_k_q8_k([w; 4], a);
                dot
            }

            #[target_feature(enable = $features)]
            pub(in crate::quant) fn dot4_q6_k_q8_k(w: [&[u8]; 4], a: &[u8]) -> [f32; 4] {
                // SAFETY: this function has the kernel's features.
                unsafe { super::dot4_q6_k_q8_k(w, a) }
            }

            #[target_feature(enable = $features)]
            pub(in crate::quant) fn dot_q8_0_q8_0(w: &[u8], a: &[u8]) -> f32 {
                // SAFETY: this function has the kernel's features.
                unsafe { super::dot_q8_0_q8_0::<$lanes>(w, a) }
            }

            #[target_feature(enable = $features)]
            pub(in crate::quant) fn dot4_q4_0_q8_0(w: [&[u8]; 4], a: &[u8]) -> [f32; 4] {
                // SAFETY: this function has the kernel's features;
                // `dot4_signed` passes a pointer to an 18-byte block.
                unsafe {
                    super::dot4_signed::<$lanes>(w, a, 18, |wb| {
                        _mm256_sub_epi8(super::nibbles(wb.add(2)), _mm256_set1_epi8(8))
                    })
                }
            }

            #[target_feature(enable = $features)]
            pub(in crate::quant) fn dot4_q8_0_q8_0(w: [&[u8]; 4], a: &[u8]) -> [f32; 4] {
                // SAFETY: this function has the kernel's features;
                // `dot4_signed` passes a pointer to a 34-byte block.
                unsafe {
                    super::dot4_signed::<$lanes>(w, a, 34, |wb| {
                        _mm256_loadu_si256(wb.add(2) as *const __m256i)
                    })
                }
            }

            #[target_feature(enable = $features)]
            pub(in crate::quant) fn dot4_q4_1_q8_1(w: [&[u8]; 4], a: &[u8]) -> [f32; 4] {
                // SAFETY: this function has the kernel's features.
                unsafe { super::dot4_q4_1_q8_1::<$lanes>(w, a) }
            }
        }
    };
}

entry_points!(
    /// The kernels for AVX2 and FMA (`CpuFeatures::avx2_fma`).
    avx2,
    "avx2,fma",
    Avx2
);
entry_points!(
    /// The kernels for AVX-512 VNNI (`CpuFeatures::avx512_vnni`).
    vnni,
    "avx2,fma,avx512vnni,avx512vl",
    Vnni
);

/// `((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7))`, ggml's `hsum_float_8`.
#[inline(always)]
unsafe fn hsum8(x: __m256) -> f32 {
    // SAFETY: callers have AVX (they have AVX2); register-only operations.
    unsafe {
        let mut r = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
        r = _mm_add_ps(r, _mm_movehl_ps(r, r));
        r = _mm_add_ss(r, _mm_movehdup_ps(r));
        _mm_cvtss_f32(r)
    }
}

/// The f16 at `p` (unaligned) as f32, without a bounds check.
#[inline(always)]
unsafe fn f16_ptr(p: *const u8) -> f32 {
    // SAFETY: the caller passes a pointer to two readable bytes.
    unsafe { half::f16::from_bits((p as *const u16).read_unaligned()).to_f32() }
}

/// 32 weights of a 4-bit block as bytes 0..=15: low nibbles, then high.
#[inline(always)]
unsafe fn nibbles(qs: *const u8) -> __m256i {
    // SAFETY: the caller has AVX2 and passes a pointer to 16 readable bytes.
    unsafe {
        let tmp = _mm_loadu_si128(qs as *const __m128i);
        let both = _mm256_set_m128i(_mm_srli_epi16(tmp, 4), tmp);
        _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
    }
}

/// The 32 weights of a Q5_0 block (at `wb`) as signed bytes, as ggml
/// builds them: nibbles, with `0xF0` or-ed in where the fifth bit is clear
/// (`bytes_from_bits_32` then `andnot`), which is the value minus 16.
#[inline(always)]
unsafe fn q5_0_bytes(wb: *const u8) -> __m256i {
    // SAFETY: the caller has AVX2 and passes a pointer to a 22-byte block.
    unsafe {
        let qh = (wb.add(2) as *const u32).read_unaligned();
        let spread = _mm256_shuffle_epi8(
            _mm256_set1_epi32(qh as i32),
            _mm256_set_epi64x(
                0x0303_0303_0303_0303,
                0x0202_0202_0202_0202,
                0x0101_0101_0101_0101,
                0,
            ),
        );
        let bit_set = _mm256_cmpeq_epi8(
            _mm256_or_si256(spread, _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe)),
            _mm256_set1_epi64x(-1),
        );
        let high = _mm256_andnot_si256(bit_set, _mm256_set1_epi8(0xF0u8 as i8));
        _mm256_or_si256(nibbles(wb.add(6)), high)
    }
}

#[inline(always)]
unsafe fn dot_q4_0_q8_0<L: Lanes>(w: &[u8], a: &[u8]) -> f32 {
    debug_assert_eq!(w.len() / 18, a.len() / 34);
    // SAFETY: the caller has the features of `L`; every pointer below
    // stays inside its 18- or 34-byte block.
    unsafe {
        let mut acc = _mm256_setzero_ps();
        for (wb, ab) in w.chunks_exact(18).zip(a.chunks_exact(34)) {
            let d = _mm256_set1_ps(f16_at(wb, 0) * f16_at(ab, 0));
            let qx = _mm256_sub_epi8(nibbles(wb.as_ptr().add(2)), _mm256_set1_epi8(8));
            let qy = _mm256_loadu_si256(ab.as_ptr().add(2) as *const __m256i);
            // |qx| times qy with qx's sign: unsigned × signed, no overflow.
            let q = L::dot_u8_i8(_mm256_sign_epi8(qx, qx), _mm256_sign_epi8(qy, qx));
            acc = _mm256_fmadd_ps(d, q, acc);
        }
        hsum8(acc)
    }
}

#[inline(always)]
unsafe fn dot_q4_1_q8_1<L: Lanes>(w: &[u8], a: &[u8]) -> f32 {
    debug_assert_eq!(w.len() / 20, a.len() / 36);
    // SAFETY: the caller has the features of `L`; every pointer below
    // stays inside its 20- or 36-byte block.
    unsafe {
        let mut acc = _mm256_setzero_ps();
        let mut summs = 0f32;
        for (wb, ab) in w.chunks_exact(20).zip(a.chunks_exact(36)) {
            summs += f16_at(wb, 2) * f16_at(ab, 2);
            let d = _mm256_set1_ps(f16_at(wb, 0) * f16_at(ab, 0));
            let qx = nibbles(wb.as_ptr().add(4));
            let qy = _mm256_loadu_si256(ab.as_ptr().add(4) as *const __m256i);
            acc = _mm256_fmadd_ps(d, L::dot_u8_i8(qx, qy), acc);
        }
        hsum8(acc) + summs
    }
}

#[inline(always)]
unsafe fn dot_q8_0_q8_0<L: Lanes>(w: &[u8], a: &[u8]) -> f32 {
    debug_assert_eq!(w.len() / 34, a.len() / 34);
    // SAFETY: the caller has the features of `L`; every pointer below
    // stays inside its 34-byte block.
    unsafe {
        let mut acc = _mm256_setzero_ps();
        for (wb, ab) in w.chunks_exact(34).zip(a.chunks_exact(34)) {
            let d = _mm256_set1_ps(f16_at(wb, 0) * f16_at(ab, 0));
            let qx = _mm256_loadu_si256(wb.as_ptr().add(2) as *const __m256i);
            let qy = _mm256_loadu_si256(ab.as_ptr().add(2) as *const __m256i);
            let q = L::dot_u8_i8(_mm256_sign_epi8(qx, qx), _mm256_sign_epi8(qy, qx));
            acc = _mm256_fmadd_ps(d, q, acc);
        }
        hsum8(acc)
    }
}

/// Four weight rows against one activation row: each row's result is bit
/// for bit the one-row kernel's (the same steps in the same order per
/// row); the activation block is loaded once for all four, and the four
/// independent accumulator chains keep the FMA units busy.
///
/// For a format whose 32 weights `load` turns into signed bytes (from a
/// pointer to the block, whose scale is its first f16), against Q8_0
/// activations.
#[inline(always)]
unsafe fn dot4_signed<L: Lanes>(
    w: [&[u8]; 4],
    a: &[u8],
    w_block: usize,
    load: impl Fn(*const u8) -> __m256i,
) -> [f32; 4] {
    let blocks = a.len() / 34;
    assert!(
        w.iter().all(|w| w.len() == blocks * w_block),
        "rows and activations differ in length"
    );
    // SAFETY: the caller has the features of `L`; every pointer below stays
    // inside its block: each row has `blocks` blocks of `w_block` bytes
    // (asserted above).
    unsafe {
        let mut acc = [_mm256_setzero_ps(); 4];
        for b in 0..blocks {
            let ab = a.as_ptr().add(b * 34);
            let dy = f16_ptr(ab);
            let qy = _mm256_loadu_si256(ab.add(2) as *const __m256i);
            for r in 0..4 {
                let wb = w[r].as_ptr().add(b * w_block);
                // A hint only: prefetching past the row's end is harmless.
                _mm_prefetch::<_MM_HINT_T0>(wb.wrapping_add(PREFETCH_BYTES) as *const i8);
                let d = _mm256_set1_ps(f16_ptr(wb) * dy);
                let qx = load(wb);
                // |qx| times qy with qx's sign: unsigned × signed.
                let q = L::dot_u8_i8(_mm256_sign_epi8(qx, qx), _mm256_sign_epi8(qy, qx));
                acc[r] = _mm256_fmadd_ps(d, q, acc[r]);
            }
        }
        acc.map(|acc| hsum8(acc))
    }
}

/// As [`dot4_signed`], for Q4_1 weights against Q8_1 activations.
#[inline(always)]
unsafe fn dot4_q4_1_q8_1<L: Lanes>(w: [&[u8]; 4], a: &[u8]) -> [f32; 4] {
    let blocks = a.len() / 36;
    assert!(
        w.iter().all(|w| w.len() == blocks * 20),
        "rows and activations differ in length"
    );
    // SAFETY: the caller has the features of `L`; every pointer below stays
    // inside its 20- or 36-byte block (each row has `blocks` blocks,
    // asserted above).
    unsafe {
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut summs = [0f32; 4];
        for b in 0..blocks {
            let ab = a.as_ptr().add(b * 36);
            let dy = f16_ptr(ab);
            let sy = f16_ptr(ab.add(2));
            let qy = _mm256_loadu_si256(ab.add(4) as *const __m256i);
            for r in 0..4 {
                let wb = w[r].as_ptr().add(b * 20);
                // A hint only: prefetching past the row's end is harmless.
                _mm_prefetch::<_MM_HINT_T0>(wb.wrapping_add(PREFETCH_BYTES) as *const i8);
                summs[r] += f16_ptr(wb.add(2)) * sy;
                let d = _mm256_set1_ps(f16_ptr(wb) * dy);
                acc[r] = _mm256_fmadd_ps(d, L::dot_u8_i8(nibbles(wb.add(4)), qy), acc[r]);
            }
        }
        [0, 1, 2, 3].map(|r| hsum8(acc[r]) + summs[r])
    }
}

/// The eight integer lanes of one Q6_K super-block (at `wb`, 210 bytes)
/// against one Q8_K block (at `ab`, 292 bytes), as
/// `ggml_vec_dot_q6_K_q8_K`'s AVX2 code forms them (see
/// `portable::dot_q6_k_q8_k` for what each lane holds).
#[inline(always)]
unsafe fn q6_k_lanes(wb: *const u8, ab: *const u8) -> __m256i {
    // SAFETY: the caller has AVX2 and passes pointers to whole blocks;
    // every load below stays inside them.
    unsafe {
        let m15 = _mm256_set1_epi8(15);
        let m3 = _mm256_set1_epi8(3);
        let scales = wb.add(192) as *const i8;
        let scale_pair = |i: usize| {
            _mm256_set_m128i(
                _mm_set1_epi16(i16::from(*scales.add(2 * i + 1))),
                _mm_set1_epi16(i16::from(*scales.add(2 * i))),
            )
        };
        let bsums = _mm256_loadu_si256(ab.add(260) as *const __m256i);
        let scales_16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(scales as *const __m128i));
        let offset = _mm256_slli_epi32(_mm256_madd_epi16(bsums, scales_16), 5);
        let mut sumi = _mm256_setzero_si256();
        for j in 0..2 {
            let bits1 = _mm256_loadu_si256(wb.add(64 * j) as *const __m256i);
            let bits2 = _mm256_loadu_si256(wb.add(64 * j + 32) as *const __m256i);
            let high = _mm256_loadu_si256(wb.add(128 + 32 * j) as *const __m256i);
            let h0 = _mm256_slli_epi16(_mm256_and_si256(high, m3), 4);
            let h1 = _mm256_slli_epi16(_mm256_and_si256(high, _mm256_set1_epi8(12)), 2);
            let h2 = _mm256_and_si256(high, _mm256_set1_epi8(48));
            let h3 = _mm256_srli_epi16(_mm256_and_si256(high, _mm256_set1_epi8(-64)), 2);
            let q = [
                _mm256_or_si256(_mm256_and_si256(bits1, m15), h0),
                _mm256_or_si256(_mm256_and_si256(bits2, m15), h1),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(bits1, 4), m15), h2),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(bits2, 4), m15), h3),
            ];
            for (r, q) in q.into_iter().enumerate() {
                let y = _mm256_loadu_si256(ab.add(4 + 128 * j + 32 * r) as *const __m256i);
                let p16 = _mm256_maddubs_epi16(q, y);
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(scale_pair(4 * j + r), p16));
            }
        }
        _mm256_sub_epi32(sumi, offset)
    }
}

/// Four Q6_K rows against one Q8_K row; each result is bit for bit
/// `portable::dot_q6_k_q8_k`'s.
#[inline(always)]
unsafe fn dot4_q6_k_q8_k(w: [&[u8]; 4], a: &[u8]) -> [f32; 4] {
    let blocks = a.len() / 292;
    assert!(
        w.iter().all(|w| w.len() == blocks * 210),
        "rows and activations differ in length"
    );
    // SAFETY: the caller has AVX2 and FMA; each row has `blocks` blocks of
    // 210 bytes (asserted above) and `a` has `blocks` of 292.
    unsafe {
        let mut acc = [_mm256_setzero_ps(); 4];
        for b in 0..blocks {
            let ab = a.as_ptr().add(b * 292);
            let dy = (ab as *const f32).read_unaligned();
            for r in 0..4 {
                let wb = w[r].as_ptr().add(b * 210);
                _mm_prefetch::<_MM_HINT_T0>(wb.wrapping_add(PREFETCH_BYTES) as *const i8);
                let d = _mm256_set1_ps(dy * f16_ptr(wb.add(208)));
                let lanes = _mm256_cvtepi32_ps(q6_k_lanes(wb, ab));
                acc[r] = _mm256_fmadd_ps(d, lanes, acc[r]);
            }
        }
        acc.map(|acc| hsum8(acc))
    }
}
