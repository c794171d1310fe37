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
