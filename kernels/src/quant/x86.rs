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

use super::portable::{BlockInts, KAccumulator, KKernel, Mins};
use super::q4_k_x8::{D, DMIN, GROUP_BLOCK, MINS_LOW, QS, SCALES};
use super::{ActivationScales, BlockFormat};

/// Each of the four rows of a four-row product is prefetched one row
/// ahead, at the block it is computing: the caller reads each of the four
/// as a stream through contiguous rows (`QuantMatrix::columns`), so this
/// is the block that stream needs next time. Measured on Q8_0 with 576 and
/// 4096 columns, one row ahead beat two and four (and a fixed 640 bytes).
fn prefetch_next_row(wb: *const u8, row_bytes: usize) {
    // SAFETY: a prefetch is a hint that never faults, wherever it points.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(wb.wrapping_add(row_bytes) as *const i8) }
}

/// Eight i32 lanes, lane j = Σ_{t<4} u[4j+t]·s[4j+t], for u in 0..=255
/// and products that fit i16 pairs (true for every caller here), as f32.
trait Lanes {
    /// # Safety
    /// The caller is compiled with the features of the module that uses
    /// this implementation.
    unsafe fn dot_u8_i8(u: __m256i, s: __m256i) -> __m256 {
        // SAFETY: as this function's.
        unsafe { _mm256_cvtepi32_ps(Self::dot_u8_i8_i32(u, s)) }
    }

    /// The same lanes as i32.
    ///
    /// # Safety
    /// As [`Lanes::dot_u8_i8`].
    unsafe fn dot_u8_i8_i32(u: __m256i, s: __m256i) -> __m256i;
}

/// AVX2: two multiply-adds (pairs to i16, then to i32).
struct Avx2;

impl Lanes for Avx2 {
    #[inline(always)]
    unsafe fn dot_u8_i8_i32(u: __m256i, s: __m256i) -> __m256i {
        // SAFETY: the caller has AVX2 (trait contract); register-only.
        unsafe { _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)) }
    }
}

/// AVX-512 VNNI: one fused byte dot product.
struct Vnni;

impl Lanes for Vnni {
    #[inline(always)]
    unsafe fn dot_u8_i8_i32(u: __m256i, s: __m256i) -> __m256i {
        // SAFETY: the caller has AVX-512 VNNI and VL (trait contract);
        // register-only.
        unsafe { _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s) }
    }
}

/// `$body` with the layout of `$format`'s blocks (Q4_0, Q4_1, Q5_0, else
/// Q8_0) bound to `$w_block` (bytes), `$weights` (a [`Weights`]) and
/// `$load` (its 32 weights as bytes, from a pointer to a whole block): a
/// prefill kernel is stamped out for each format, with the loader inlined.
/// The 512-bit kernel names a fourth, `$load_pair`: two blocks' weights
/// in one register, the first in the low half (it needs AVX-512 F and BW).
/// Used in unsafe code of the instruction sets' modules.
macro_rules! legacy_blocks {
    ($format:expr, |$w_block:ident, $weights:ident, $load:ident $(, $load_pair:ident)?| $body:expr) => {
        match $format {
            BlockFormat::Q4_0 => {
                let ($w_block, $weights) = (18, Weights::SmallSigned);
                let $load =
                    |wb: *const u8| _mm256_sub_epi8(super::nibbles(wb.add(2)), _mm256_set1_epi8(8));
                $(let $load_pair = |low: *const u8, high: *const u8| {
                    _mm512_sub_epi8(super::nibbles_pair(low.add(2), high.add(2)), _mm512_set1_epi8(8))
                };)?
                $body
            }
            BlockFormat::Q4_1 => {
                let ($w_block, $weights) = (20, Weights::WithMinimum);
                let $load = |wb: *const u8| super::nibbles(wb.add(4));
                $(let $load_pair =
                    |low: *const u8, high: *const u8| super::nibbles_pair(low.add(4), high.add(4));)?
                $body
            }
            BlockFormat::Q5_0 => {
                let ($w_block, $weights) = (22, Weights::SmallSigned);
                let $load = |wb: *const u8| super::q5_0_bytes(wb);
                $(let $load_pair = |low: *const u8, high: *const u8| super::pair_i($load(low), $load(high));)?
                $body
            }
            _ => {
                let ($w_block, $weights) = (34, Weights::Signed);
                let $load = |wb: *const u8| _mm256_loadu_si256(wb.add(2) as *const __m256i);
                $(let $load_pair = |low: *const u8, high: *const u8| super::pair_i($load(low), $load(high));)?
                $body
            }
        }
    };
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
            pub(in crate::quant) fn dot4_q4_k_q8_k(
                kernel: KKernel,
                w: [&[u8]; 4],
                a: &[u8],
            ) -> [f32; 4] {
                // SAFETY: this function has the kernel's features.
                unsafe { super::dot4_k(kernel, w, a, 144, |acc, wb, ab| {
                    acc.add_q4_k(&super::q4_k_ints(kernel, wb, ab), f16_ptr(wb), f16_ptr(wb.add(2)), f32_ptr(ab))
                }, Mins::Lanes) }
            }

            #[target_feature(enable = $features)]
            pub(in crate::quant) fn dot4_q5_k_q8_k(
                kernel: KKernel,
                w: [&[u8]; 4],
                a: &[u8],
            ) -> [f32; 4] {
                // SAFETY: this function has the kernel's features.
                unsafe { super::dot4_k(kernel, w, a, 176, |acc, wb, ab| {
                    acc.add_q5_k(&super::q5_k_ints(kernel, wb, ab), f16_ptr(wb), f16_ptr(wb.add(2)), f32_ptr(ab))
                }, Mins::Scalar) }
            }

            /// One Q4_K or Q6_K weight row against `out.len()` activation
            /// rows (prefill): each weight block is unpacked once for all
            /// of them. Output `r` takes `kernel(r)`'s rounding.
            #[target_feature(enable = $features)]
            pub(in crate::quant) fn k_row_against_rows(
                q4_k: bool,
                kernel: &dyn Fn(usize) -> KKernel,
                w: &[u8],
                xq: &[u8],
                a_row_bytes: usize,
                out: &mut [f32],
            ) {
                // SAFETY: this function has the kernel's features.
                unsafe { super::k_row_against_rows(q4_k, kernel, w, xq, a_row_bytes, out) }
            }

            /// Four Q4_0, Q4_1, Q5_0 or Q8_0 weight rows against the
            /// `out.len()` activation rows of `xq` (prefill).
            #[target_feature(enable = $features)]
            pub(in crate::quant) fn prefill4(
                format: BlockFormat,
                w: [&[u8]; 4],
                xq: &[u8],
                a_row_bytes: usize,
                scales: &ActivationScales,
                out: &mut [[f32; 4]],
            ) {
                // SAFETY: this function has the kernel's features; each
                // `load` gets a pointer to a whole block of its format.
                unsafe {
                    legacy_blocks!(format, |w_block, weights, load| {
                        super::rows4_prefill::<$lanes>(w, xq, a_row_bytes, scales, w_block, weights, out, load)
                    })
                }
            }

            /// Eight interleaved Q4_K rows against one Q8_K row, with
            /// `gemv`'s rounding; lane `r` is output row `r`.
            #[target_feature(enable = $features)]
            pub(in crate::quant) fn gemv_q4_k_x8(group: &[u8], a: &[u8]) -> [f32; 8] {
                // SAFETY: this function has the kernel's features.
                let [out] = unsafe { super::q4_k_x8::<1>(group, [a]) };
                out
            }

            /// Eight interleaved Q4_K rows against four Q8_K rows, with
            /// `gemm`'s rounding; `[activation row][output row]`.
            #[target_feature(enable = $features)]
            pub(in crate::quant) fn gemm_q4_k_x8(group: &[u8], a: [&[u8]; 4]) -> [[f32; 8]; 4] {
                // SAFETY: this function has the kernel's features.
                unsafe { super::q4_k_x8::<4>(group, a) }
            }

            #[target_feature(enable = $features)]
            pub(in crate::quant) fn dot4_q6_k_q8_k(
                kernel: KKernel,
                w: [&[u8]; 4],
                a: &[u8],
            ) -> [f32; 4] {
                // SAFETY: this function has the kernel's features.
                unsafe {
                    if kernel == KKernel::VecDot {
                        return super::dot4_q6_k_vec_dot(w, a);
                    }
                    super::dot4_k(kernel, w, a, 210, |acc, wb, ab| {
                        acc.add_q6_k(&super::q6_k_ints(wb, ab), f16_ptr(wb.add(208)), f32_ptr(ab))
                    }, Mins::None)
                }
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
    "avx2,fma,f16c",
    Avx2
);
entry_points!(
    /// The kernels for AVX-512 VNNI (`CpuFeatures::avx512_vnni`).
    vnni,
    "avx2,fma,f16c,avx512vnni,avx512vl",
    Vnni
);

/// The kernels that use 512-bit registers (`CpuFeatures::avx512_wide`).
pub(super) mod wide {
    use super::*;

    /// As the other instruction sets' `prefill4`.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(in crate::quant) fn prefill4(
        format: BlockFormat,
        w: [&[u8]; 4],
        xq: &[u8],
        a_row_bytes: usize,
        scales: &ActivationScales,
        out: &mut [[f32; 4]],
    ) {
        // SAFETY: this function has the kernel's features; each `load`
        // gets a pointer to a whole block of its format.
        unsafe {
            legacy_blocks!(format, |w_block, weights, _load, load_pair| {
                super::rows4_prefill_wide(
                    w,
                    xq,
                    a_row_bytes,
                    scales,
                    w_block,
                    weights,
                    out,
                    load_pair,
                )
            })
        }
    }
}

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
    // SAFETY: the caller has F16C and passes a pointer to two readable
    // bytes. (`half` would check for F16C at run time and call out of
    // line on every conversion, in the innermost loops.)
    unsafe {
        let bits = (p as *const u16).read_unaligned();
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
    }
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

/// [`nibbles`] of two blocks' quants (at `low` and `high`), in the low and
/// the high half of one register: one load of both, a 128-bit lane
/// shuffle to `[low, low, high, high]`, and a shift of the second and
/// fourth lanes by four bits, where the 256-bit form shifts and inserts
/// for each block.
#[inline(always)]
unsafe fn nibbles_pair(low: *const u8, high: *const u8) -> __m512i {
    // SAFETY: the caller has AVX-512 F and passes pointers to 16 readable
    // bytes each.
    unsafe {
        let both = _mm256_inserti128_si256::<1>(
            _mm256_castsi128_si256(_mm_loadu_si128(low as *const __m128i)),
            _mm_loadu_si128(high as *const __m128i),
        );
        let both = _mm512_castsi256_si512(both);
        // Lanes 0, 0 of the first operand, then 1, 1 of the second.
        let twice = _mm512_shuffle_i64x2::<0b01_01_00_00>(both, both);
        let shifted = _mm512_srlv_epi64(twice, _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0));
        _mm512_and_si512(shifted, _mm512_set1_epi8(0x0F))
    }
}

/// `low` and `high` in one register, `low` in the low half.
#[inline(always)]
unsafe fn pair_i(low: __m256i, high: __m256i) -> __m512i {
    // SAFETY: the caller has AVX-512 F; register-only.
    unsafe { _mm512_inserti64x4::<1>(_mm512_castsi256_si512(low), high) }
}

/// The 32 weights of a Q5_0 block (at `wb`) as signed bytes, as ggml
/// builds them: nibbles, with `0xF0` or-ed in where the fifth bit is clear
/// (`bytes_from_bits_32` then `andnot`), which is the value minus 16.
#[inline(always)]
unsafe fn q5_0_bytes(wb: *const u8) -> __m256i {
    // SAFETY: the caller has AVX2 and passes a pointer to a 22-byte block.
    unsafe {
        let high = _mm256_andnot_si256(q5_0_fifth_bits(wb), _mm256_set1_epi8(0xF0u8 as i8));
        _mm256_or_si256(nibbles(wb.add(6)), high)
    }
}

/// `0xFF` in byte `i` where weight `i` of the Q5_0 block at `wb` has its
/// fifth bit set (ggml's `bytes_from_bits_32`).
#[inline(always)]
unsafe fn q5_0_fifth_bits(wb: *const u8) -> __m256i {
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
        _mm256_cmpeq_epi8(
            _mm256_or_si256(spread, _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe)),
            _mm256_set1_epi64x(-1),
        )
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
            let d = _mm256_set1_ps(f16_ptr(wb.as_ptr()) * f16_ptr(ab.as_ptr()));
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
            summs += f16_ptr(wb.as_ptr().add(2)) * f16_ptr(ab.as_ptr().add(2));
            let d = _mm256_set1_ps(f16_ptr(wb.as_ptr()) * f16_ptr(ab.as_ptr()));
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
            let d = _mm256_set1_ps(f16_ptr(wb.as_ptr()) * f16_ptr(ab.as_ptr()));
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
                prefetch_next_row(wb, blocks * w_block);
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

/// How a prefill kernel's weights come and multiply (see
/// [`rows4_prefill`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Weights {
    /// Signed bytes against Q8_0 (Q8_0): the sign trick per product.
    Signed,
    /// Signed bytes of at most 16 in magnitude, against Q8_0 (Q4_0,
    /// Q5_0): the activations shifted to unsigned (`y + 128`, once per
    /// activation block), so that a lane's exact sum is
    /// `Σ (y + 128)·w - 128·Σ w`, with `128·Σ w` formed once per weight
    /// block for every activation row (no product of at most 255 · 16
    /// saturates an i16 pair).
    SmallSigned,
    /// Unsigned nibbles with a block minimum, against Q8_1 (Q4_1): the
    /// minimum times the activation block's sum accumulated apart.
    WithMinimum,
}

impl Weights {
    /// The activation block's bytes and where its quants start: Q8_1
    /// (`d, s, qs`) for `WithMinimum`, else Q8_0 (`d, qs`).
    fn activation_layout(self) -> (usize, usize) {
        match self {
            Weights::WithMinimum => (36, 4),
            _ => (34, 2),
        }
    }
}

/// [`dot4_signed`] (Q4_1: [`dot4_q4_1_q8_1`]) for each of the `out.len()`
/// activation rows of `xq` (`a_row_bytes` apart), with the same steps in
/// the same order per output: the integer lanes are exact whichever way
/// `weights` forms them. The four rows' blocks are unpacked once into a
/// scratch copy; then activation rows go through in pairs, the eight
/// accumulators in registers, each weight vector read once per pair.
#[inline(always)]
#[allow(clippy::too_many_arguments)] // both operands' layouts and the output; a struct would only rename them
unsafe fn rows4_prefill<L: Lanes>(
    w: [&[u8]; 4],
    xq: &[u8],
    a_row_bytes: usize,
    scales: &ActivationScales,
    w_block: usize,
    weights: Weights,
    out: &mut [[f32; 4]],
    load: impl Fn(*const u8) -> __m256i,
) {
    // SAFETY: the caller has the features of `L`; `unpack4` checks the
    // operands' lengths, and `rows_tile` reads `unpacked.len()` blocks of
    // each activation row it is given.
    UNPACKED.with_borrow_mut(|unpacked| unsafe {
        unpack4::<L>(
            w,
            xq,
            a_row_bytes,
            scales,
            w_block,
            weights,
            out.len(),
            load,
            unpacked,
        );
        let m = out.len();
        let row = |r: usize| activation_row(xq, a_row_bytes, scales, unpacked.len(), r);
        for p in 0..m / 2 {
            let [first, second] =
                rows_tile::<L, 2>(unpacked, [row(2 * p), row(2 * p + 1)], weights);
            out[2 * p] = first;
            out[2 * p + 1] = second;
        }
        if m % 2 == 1 {
            let [last] = rows_tile::<L, 1>(unpacked, [row(m - 1)], weights);
            out[m - 1] = last;
        }
        if weights == Weights::WithMinimum {
            add_minimums(unpacked.len(), |b| unpacked[b].minimum, scales, out);
        }
    })
}

/// Activation row `r` of `xq` for a tile: its bytes, and its blocks'
/// scales as f32.
///
/// # Safety
/// `r` is a row of `xq` and `scales` (`blocks` scales a row).
#[inline(always)]
unsafe fn activation_row(
    xq: &[u8],
    a_row_bytes: usize,
    scales: &ActivationScales,
    blocks: usize,
    r: usize,
) -> (*const u8, *const f32) {
    // SAFETY: as this function's.
    unsafe {
        (
            xq.as_ptr().add(r * a_row_bytes),
            scales.d.as_ptr().add(r * blocks),
        )
    }
}

/// The four rows' blocks of a prefill product unpacked, after checking
/// that the rows, the `m` activation rows and their scales agree in
/// length.
///
/// # Safety
/// The caller has the features of `L`; `load` reads one block of
/// `w_block` bytes.
#[inline(always)]
#[allow(clippy::too_many_arguments)] // as rows4_prefill
unsafe fn unpack4<L: Lanes>(
    w: [&[u8]; 4],
    xq: &[u8],
    a_row_bytes: usize,
    scales: &ActivationScales,
    w_block: usize,
    weights: Weights,
    m: usize,
    load: impl Fn(*const u8) -> __m256i,
    unpacked: &mut Vec<Unpacked>,
) {
    let blocks = prefill_blocks(w, xq, a_row_bytes, scales, w_block, weights, m);
    let with_minimum = weights == Weights::WithMinimum;
    // SAFETY: each row has `blocks` blocks of `w_block` bytes (checked
    // above) and every pointer below stays inside one.
    unsafe {
        unpacked.clear();
        unpacked.extend((0..blocks).map(|b| {
            let wb = block_of_rows(w, b, w_block, blocks);
            let q = wb.map(&load);
            Unpacked {
                q,
                shift: if weights == Weights::SmallSigned {
                    q.map(|q| L::dot_u8_i8_i32(_mm256_set1_epi8(-128), q))
                } else {
                    [_mm256_setzero_si256(); 4]
                },
                d: wb.map(|p| f16_ptr(p)),
                minimum: wb.map(|p| if with_minimum { f16_ptr(p.add(2)) } else { 0.0 }),
            }
        }));
    }
}

/// The blocks in each row of a prefill product, after checking that the
/// four weight rows (`w_block` bytes a block), the `m` activation rows
/// (`a_row_bytes` apart) and their scales agree in length.
fn prefill_blocks(
    w: [&[u8]; 4],
    xq: &[u8],
    a_row_bytes: usize,
    scales: &ActivationScales,
    w_block: usize,
    weights: Weights,
    m: usize,
) -> usize {
    let (a_block, _) = weights.activation_layout();
    let blocks = a_row_bytes / a_block;
    let with_minimum = weights == Weights::WithMinimum;
    assert!(
        w.iter().all(|w| w.len() == blocks * w_block)
            && xq.len() >= m * a_row_bytes
            && scales.d.len() >= m * blocks
            && (!with_minimum || scales.s.len() >= m * blocks),
        "rows and activations differ in length"
    );
    blocks
}

/// Block `b` of each of the four rows, each prefetched one row ahead.
///
/// # Safety
/// Each row has more than `b` blocks of `w_block` bytes.
#[inline(always)]
unsafe fn block_of_rows(w: [&[u8]; 4], b: usize, w_block: usize, blocks: usize) -> [*const u8; 4] {
    // SAFETY: as this function's.
    let wb: [*const u8; 4] = std::array::from_fn(|i| unsafe { w[i].as_ptr().add(b * w_block) });
    for wb in wb {
        prefetch_next_row(wb, blocks * w_block);
    }
    wb
}

thread_local! {
    /// Each compute thread's scratch for the unpacked blocks of
    /// [`rows4_prefill`] (and [`WideScratch`] for [`rows4_prefill_wide`]):
    /// allocating it afresh for every four weight rows cost more than the
    /// products of a two-row batch.
    static UNPACKED: std::cell::RefCell<Vec<Unpacked>> = const { std::cell::RefCell::new(Vec::new()) };
    static WIDE: std::cell::RefCell<WideScratch> = std::cell::RefCell::new(WideScratch::default());
}

/// Q4_1's minimums (`minimum(b)`: the four rows' of block `b`) times the
/// activation blocks' sums, apart from the products: per lane the scalar
/// steps (`m · s` rounded, then added), block by block, then added to the
/// product's sum.
///
/// # Safety
/// The caller has SSE; `scales.s` holds `blocks` sums for each of the
/// `out.len()` rows (checked by `unpack4`).
#[inline(always)]
unsafe fn add_minimums(
    blocks: usize,
    minimum: impl Fn(usize) -> [f32; 4],
    scales: &ActivationScales,
    out: &mut [[f32; 4]],
) {
    // Each row's sum is a chain of dependent adds: rows go through
    // several at a time, so that their chains overlap instead of each
    // waiting on its own adds' latency.
    for (r, n) in tiles(out.len()) {
        let out = &mut out[r..r + n];
        // SAFETY: as this function's.
        unsafe {
            match n {
                8 => minimums_tile::<8>(blocks, &minimum, scales, r, out),
                4 => minimums_tile::<4>(blocks, &minimum, scales, r, out),
                2 => minimums_tile::<2>(blocks, &minimum, scales, r, out),
                _ => minimums_tile::<1>(blocks, &minimum, scales, r, out),
            }
        }
    }
}

/// Rows `0..m` as tiles `(first, rows)`: tiles of 8, then one each of 4, 2
/// and 1 for what is left.
fn tiles(m: usize) -> impl Iterator<Item = (usize, usize)> {
    let mut first = 0;
    std::iter::from_fn(move || {
        let left = m - first;
        let rows = [8, 4, 2, 1].into_iter().find(|&n| n <= left)?;
        first += rows;
        Some((first - rows, rows))
    })
}

/// [`add_minimums`] for the `N` rows from `first` (`out`).
///
/// # Safety
/// As [`add_minimums`]'s, and `out` holds `N` rows.
#[inline(always)]
unsafe fn minimums_tile<const N: usize>(
    blocks: usize,
    minimum: &impl Fn(usize) -> [f32; 4],
    scales: &ActivationScales,
    first: usize,
    out: &mut [[f32; 4]],
) {
    // SAFETY: as this function's; register and checked-slice operations.
    unsafe {
        let sums: [&[f32]; N] =
            std::array::from_fn(|k| &scales.s[(first + k) * blocks..(first + k + 1) * blocks]);
        let mut acc = [_mm_setzero_ps(); N];
        // `b` picks the block of every row's sums; `k` the row in two arrays.
        #[allow(clippy::needless_range_loop)]
        for b in 0..blocks {
            let m = _mm_loadu_ps(minimum(b).as_ptr());
            for k in 0..N {
                acc[k] = _mm_add_ps(acc[k], _mm_mul_ps(m, _mm_set1_ps(sums[k][b])));
            }
        }
        for (out, acc) in out.iter_mut().zip(acc) {
            let mut minimum = [0f32; 4];
            _mm_storeu_ps(minimum.as_mut_ptr(), acc);
            for (dot, minimum) in out.iter_mut().zip(minimum) {
                *dot += minimum;
            }
        }
    }
}

/// [`rows4_prefill`] in 512-bit registers, for AVX-512 VNNI: two weight
/// rows share a register (row `2j` in the low eight lanes, `2j + 1` in the
/// high eight), so each instruction does the work of two of the 256-bit
/// kernel's, with the same steps per lane; activation rows go through up
/// to eight at a time, their sixteen accumulators in registers.
///
/// Up to eight activation rows (a batch of decode steps) make one tile:
/// each weight block is unpacked in registers and used at once. More rows
/// (a prompt) go through several tiles, so the blocks are unpacked once
/// into a scratch copy that every tile reads.
///
/// Every signed format takes the unsigned shift here (Q8_0 included):
/// VNNI sums byte products straight into i32 lanes, so `Σ (y + 128)·w -
/// 128·Σ w` is exact for any byte `w`, and the correction starts the sum
/// instead of costing a subtraction.
#[inline(always)]
#[allow(clippy::too_many_arguments)] // as rows4_prefill
unsafe fn rows4_prefill_wide(
    w: [&[u8]; 4],
    xq: &[u8],
    a_row_bytes: usize,
    scales: &ActivationScales,
    w_block: usize,
    weights: Weights,
    out: &mut [[f32; 4]],
    load_pair: impl Fn(*const u8, *const u8) -> __m512i,
) {
    let m = out.len();
    let blocks = prefill_blocks(w, xq, a_row_bytes, scales, w_block, weights, m);
    assert!(
        scales.doubled.len() >= m * blocks * 64 && scales.d_by_block.len() >= m * blocks,
        "the activations block by block"
    );
    let with_minimum = weights == Weights::WithMinimum;
    // SAFETY: the caller has AVX-512 F, BW, VL and VNNI; each row has
    // `blocks` blocks of `w_block` bytes and each activation row `blocks`
    // blocks and scales (checked above); every pointer below stays inside
    // one, and the tiles read `blocks` blocks of each row they are given.
    WIDE.with_borrow_mut(|scratch| unsafe {
        let unpack = |b: usize| {
            let wb = block_of_rows(w, b, w_block, blocks);
            WideBlock::new(
                [load_pair(wb[0], wb[1]), load_pair(wb[2], wb[3])],
                wb,
                weights,
            )
        };
        // The tile from activation row `first` (see `WideRows`).
        let tile = |first: usize| WideRows {
            quants: scales.doubled.as_ptr().add(first * 64),
            scales: scales.d_by_block.as_ptr().add(first),
            rows: m,
        };
        let minimums = &mut scratch.minimums;
        minimums.clear();
        if m <= 8 {
            // A batch of decode steps: one tile, each block used as it is
            // unpacked.
            macro_rules! one_tile {
                ($($n:literal)*) => {
                    match m {
                        $($n => out.copy_from_slice(&rows_stream_wide::<$n>(
                            blocks,
                            unpack,
                            tile(0),
                            weights,
                            minimums,
                        )),)*
                        _ => {} // no rows
                    }
                };
            }
            one_tile!(1 2 3 4 5 6 7 8);
        } else {
            let wide = &mut scratch.blocks;
            wide.clear();
            wide.extend((0..blocks).map(unpack));
            minimums.extend(wide.iter().map(|block| block.minimum));
            for (r, n) in tiles(m) {
                let out = &mut out[r..r + n];
                match n {
                    8 => out.copy_from_slice(&rows_tile_wide::<8>(wide, tile(r), weights)),
                    4 => out.copy_from_slice(&rows_tile_wide::<4>(wide, tile(r), weights)),
                    2 => out.copy_from_slice(&rows_tile_wide::<2>(wide, tile(r), weights)),
                    _ => out.copy_from_slice(&rows_tile_wide::<1>(wide, tile(r), weights)),
                }
            }
        }
        if with_minimum {
            add_minimums(blocks, |b| minimums[b], scales, out);
        }
    })
}

/// Each compute thread's scratch for [`rows4_prefill_wide`].
#[derive(Default)]
struct WideScratch {
    /// The four rows' blocks, unpacked once for several tiles.
    blocks: Vec<WideBlock>,
    /// Q4_1's minimums of the four rows, block by block.
    minimums: Vec<[f32; 4]>,
}

/// One block of four weight rows for [`rows_tile_wide`], the rows paired
/// in 512-bit registers and interleaved four bytes at a time: `q[j]`
/// holds rows `2j` and `2j + 1`, row `2j`'s bytes `4k..4k + 4` in 32-bit
/// lane `2k` and row `2j + 1`'s in lane `2k + 1`, and so do
/// `neg_shift[j]` and `d[j]` (their lanes' sums and scales). Against
/// activations with every four bytes twice (`ActivationScales::doubled`)
/// a lane's sum is the same four products as in the paired layout.
struct WideBlock {
    q: [__m512i; 2],
    d: [__m512; 2],
    /// Signed weights: `-128 · Σ w` of each lane (else zero), where the
    /// lane's sum starts.
    neg_shift: [__m512i; 2],
    /// Q4_1's minimums of the four rows (else unused).
    minimum: [f32; 4],
}

impl WideBlock {
    /// From the four rows' weights as bytes, paired (`q[j]`: row `2j` in
    /// the low half, `2j + 1` in the high), and their blocks (`wb`, whose
    /// first f16 is the scale, and for Q4_1 the second the minimum).
    ///
    /// # Safety
    /// The caller has AVX-512 F and VNNI and F16C; each `wb` points at a
    /// whole block.
    #[inline(always)]
    unsafe fn new(q: [__m512i; 2], wb: [*const u8; 4], weights: Weights) -> Self {
        // SAFETY: as this function's; every block is at least four bytes.
        unsafe {
            let with_minimum = weights == Weights::WithMinimum;
            let interleave =
                _mm512_setr_epi32(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
            let q = q.map(|q| _mm512_permutexvar_epi32(interleave, q));
            let neg_shift = q.map(|q| {
                if with_minimum {
                    _mm512_setzero_si512()
                } else {
                    _mm512_sub_epi32(
                        _mm512_setzero_si512(),
                        _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(-128), q),
                    )
                }
            });
            // The first two f16 of each block (scale, then Q4_1's minimum;
            // other formats' second is quants, converted but unused), all
            // four rows' in one conversion: d0 m0 d1 m1 d2 m2 d3 m3.
            let heads = wb.map(|p| (p as *const i32).read_unaligned());
            let heads = _mm256_cvtph_ps(_mm_set_epi32(heads[3], heads[2], heads[1], heads[0]));
            let alternate = |first: i32, second: i32| {
                _mm512_permutexvar_ps(
                    _mm512_setr_epi32(
                        first, second, first, second, first, second, first, second, first, second,
                        first, second, first, second, first, second,
                    ),
                    _mm512_castps256_ps512(heads),
                )
            };
            let mut minimum = [0f32; 4];
            if with_minimum {
                let m = _mm_shuffle_ps::<0b11_01_11_01>(
                    _mm256_castps256_ps128(heads),
                    _mm256_extractf128_ps::<1>(heads),
                );
                _mm_storeu_ps(minimum.as_mut_ptr(), m);
            }
            Self {
                q,
                d: [alternate(0, 2), alternate(4, 6)],
                neg_shift,
                minimum,
            }
        }
    }
}

/// A tile's activation rows in [`ActivationScales`]' block-major copies
/// (`doubled`, `d_by_block`): pointers at the tile's first row in block
/// 0, and the rows of every block (`rows`), the stride from one block to
/// the next. A tile's rows of one block are side by side, so one pointer
/// reaches all of them, where a pointer for each row kept the loop short
/// of registers.
#[derive(Clone, Copy)]
struct WideRows {
    quants: *const u8,
    scales: *const f32,
    rows: usize,
}

/// One block's products with a tile's `N` activation rows, added to the
/// tile's accumulators (`[activation row][row pair]`), each lane with the
/// steps of [`rows_tile`].
///
/// # Safety
/// The caller has AVX-512 F, BW, VL and VNNI; `tile` has `N` rows in
/// more than `b` blocks, of the format `weights` implies.
#[inline(always)]
unsafe fn wide_block_step<const N: usize>(
    block: &WideBlock,
    b: usize,
    tile: WideRows,
    weights: Weights,
    acc: &mut [[__m512; 2]; N],
) {
    // SAFETY: as this function's.
    unsafe {
        let shifted = weights != Weights::WithMinimum;
        let quants = tile.quants.add(b * tile.rows * 64);
        let scales = tile.scales.add(b * tile.rows);
        // `r` picks the row in the tile and in the accumulators.
        #[allow(clippy::needless_range_loop)]
        for r in 0..N {
            // Signed weights: y + 128 as unsigned bytes, made so ahead.
            let qy = _mm512_loadu_si512(quants.add(r * 64) as *const _);
            let dy = scales.add(r);
            // `j` picks the row pair in three arrays and the accumulator.
            #[allow(clippy::needless_range_loop)]
            for j in 0..2 {
                let lanes = if shifted {
                    _mm512_dpbusd_epi32(block.neg_shift[j], qy, block.q[j])
                } else {
                    _mm512_dpbusd_epi32(_mm512_setzero_si512(), block.q[j], qy)
                };
                // The scales' products, the activation row's scale
                // broadcast from memory inside the multiply. Written
                // out: the compiler otherwise broadcasts it into a
                // register once for both pairs, an instruction of its
                // own that cost this loop a few percent (AMD EPYC).
                let d: __m512;
                std::arch::asm!(
                    "vmulps {d}, {w}, dword ptr [{p}]{{1to16}}",
                    d = lateout(zmm_reg) d,
                    w = in(zmm_reg) block.d[j],
                    p = in(reg) dy,
                    options(pure, readonly, nostack, preserves_flags),
                );
                acc[r][j] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(lanes), acc[r][j]);
            }
        }
    }
}

/// A tile's accumulators summed as [`rows_tile`] sums its own:
/// `[activation row][weight row]`.
#[inline(always)]
unsafe fn wide_sums<const N: usize>(acc: [[__m512; 2]; N]) -> [[f32; 4]; N] {
    // SAFETY: the caller has AVX-512 F; register-only.
    unsafe {
        let apart = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
        let halves = |v: __m512| {
            // The pair's rows back apart: the first's lanes, then the second's.
            let v = _mm512_permutexvar_ps(apart, v);
            (
                hsum8(_mm512_castps512_ps256(v)),
                hsum8(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(
                    _mm512_castps_pd(v),
                ))),
            )
        };
        std::array::from_fn(|r| {
            let (w0, w1) = halves(acc[r][0]);
            let (w2, w3) = halves(acc[r][1]);
            [w0, w1, w2, w3]
        })
    }
}

/// The products of unpacked [`WideBlock`]s with the `N` activation rows
/// of `tile`; `[activation row][weight row]`. Q4_1's minimums are the caller's.
#[inline(always)]
unsafe fn rows_tile_wide<const N: usize>(
    wide: &[WideBlock],
    tile: WideRows,
    weights: Weights,
) -> [[f32; 4]; N] {
    // SAFETY: the caller has AVX-512 F, BW, VL and VNNI and passes a tile
    // of `N` rows in `wide.len()` blocks of the format `weights` implies.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 2]; N];
        for (b, block) in wide.iter().enumerate() {
            wide_block_step(block, b, tile, weights, &mut acc);
        }
        wide_sums(acc)
    }
}

/// As [`rows_tile_wide`], each of the `blocks` weight blocks unpacked
/// (`unpack(b)`) as it is needed, and Q4_1's minimums pushed onto
/// `minimums` for the caller.
#[inline(always)]
unsafe fn rows_stream_wide<const N: usize>(
    blocks: usize,
    unpack: impl Fn(usize) -> WideBlock,
    tile: WideRows,
    weights: Weights,
    minimums: &mut Vec<[f32; 4]>,
) -> [[f32; 4]; N] {
    // SAFETY: as rows_tile_wide's, with `blocks` blocks to each row.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 2]; N];
        for b in 0..blocks {
            let block = unpack(b);
            if weights == Weights::WithMinimum {
                minimums.push(block.minimum);
            }
            wide_block_step(&block, b, tile, weights, &mut acc);
        }
        wide_sums(acc)
    }
}

/// Four rows' weight block, unpacked for [`rows_tile`].
struct Unpacked {
    q: [__m256i; 4],
    /// `SmallSigned`: 128 times each lane's sum of weights.
    shift: [__m256i; 4],
    d: [f32; 4],
    /// Q4_1's minimums (else unused).
    minimum: [f32; 4],
}

/// The products of unpacked weights with the `N` activation rows starting
/// at `a` (their bytes, and their blocks' scales as f32);
/// `[activation row][weight row]`. Q4_1's minimums are the caller's.
#[inline(always)]
unsafe fn rows_tile<L: Lanes, const N: usize>(
    unpacked: &[Unpacked],
    a: [(*const u8, *const f32); N],
    weights: Weights,
) -> [[f32; 4]; N] {
    // SAFETY: the caller has the features of `L` and passes activation
    // rows of `unpacked.len()` blocks of the format `weights` implies.
    unsafe {
        let (a_block, qs) = weights.activation_layout();
        let flip = _mm256_set1_epi8(-128);
        let mut acc = [[_mm256_setzero_ps(); 4]; N];
        for (b, block) in unpacked.iter().enumerate() {
            let ab = a.map(|(a, _)| a.add(b * a_block));
            let dy = a.map(|(_, d)| _mm256_broadcast_ss(&*d.add(b)));
            let qy = ab.map(|ab| _mm256_loadu_si256(ab.add(qs) as *const __m256i));
            // `SmallSigned`: y + 128 as unsigned bytes.
            let shifted = qy.map(|qy| _mm256_xor_si256(qy, flip));
            // `i` picks the weight row in four arrays and the accumulator.
            #[allow(clippy::needless_range_loop)]
            for i in 0..4 {
                let qx = block.q[i];
                let dx = _mm256_broadcast_ss(&block.d[i]);
                for r in 0..N {
                    let lanes = match weights {
                        Weights::SmallSigned => {
                            _mm256_sub_epi32(L::dot_u8_i8_i32(shifted[r], qx), block.shift[i])
                        }
                        Weights::WithMinimum => L::dot_u8_i8_i32(qx, qy[r]),
                        // |qx| times qy with qx's sign: unsigned × signed.
                        Weights::Signed => {
                            L::dot_u8_i8_i32(_mm256_sign_epi8(qx, qx), _mm256_sign_epi8(qy[r], qx))
                        }
                    };
                    let d = _mm256_mul_ps(dx, dy[r]);
                    acc[r][i] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(lanes), acc[r][i]);
                }
            }
        }
        std::array::from_fn(|r| std::array::from_fn(|i| hsum8(acc[r][i])))
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
                prefetch_next_row(wb, blocks * 20);
                summs[r] += f16_ptr(wb.add(2)) * sy;
                let d = _mm256_set1_ps(f16_ptr(wb) * dy);
                acc[r] = _mm256_fmadd_ps(d, L::dot_u8_i8(nibbles(wb.add(4)), qy), acc[r]);
            }
        }
        [0, 1, 2, 3].map(|r| hsum8(acc[r]) + summs[r])
    }
}

/// A Q6_K super-block unpacked for its products: the 256 unsigned
/// values as eight 32-byte chunks, each chunk's two scales widened to
/// i16 lanes, and all sixteen scales as i16 (for the `- 32` correction).
struct Q6kBlock {
    values: [__m256i; 8],
    scales: [__m256i; 8],
    scales_16: __m256i,
}

/// Unpacks the Q6_K block at `wb` (210 bytes) as ggml's AVX2 code does.
#[inline(always)]
unsafe fn q6_k_unpack(wb: *const u8) -> Q6kBlock {
    // SAFETY: the caller has AVX2 and passes a pointer to a whole block.
    unsafe {
        let m15 = _mm256_set1_epi8(15);
        let m3 = _mm256_set1_epi8(3);
        let scales = wb.add(192) as *const i8;
        let mut values = [_mm256_setzero_si256(); 8];
        for j in 0..2 {
            let bits1 = _mm256_loadu_si256(wb.add(64 * j) as *const __m256i);
            let bits2 = _mm256_loadu_si256(wb.add(64 * j + 32) as *const __m256i);
            let high = _mm256_loadu_si256(wb.add(128 + 32 * j) as *const __m256i);
            let h0 = _mm256_slli_epi16(_mm256_and_si256(high, m3), 4);
            let h1 = _mm256_slli_epi16(_mm256_and_si256(high, _mm256_set1_epi8(12)), 2);
            let h2 = _mm256_and_si256(high, _mm256_set1_epi8(48));
            let h3 = _mm256_srli_epi16(_mm256_and_si256(high, _mm256_set1_epi8(-64)), 2);
            values[4 * j] = _mm256_or_si256(_mm256_and_si256(bits1, m15), h0);
            values[4 * j + 1] = _mm256_or_si256(_mm256_and_si256(bits2, m15), h1);
            values[4 * j + 2] =
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(bits1, 4), m15), h2);
            values[4 * j + 3] =
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(bits2, 4), m15), h3);
        }
        let scales_16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(scales as *const __m128i));
        // Scale pair c (i16 lanes 2c and 2c + 1 of `scales_16`) spread
        // over the low and the high half: one shuffle of the half that
        // holds it (ggml's `get_scale_shuffle`), not eight scalar loads.
        let halves = [
            _mm256_broadcastsi128_si256(_mm256_castsi256_si128(scales_16)),
            _mm256_broadcastsi128_si256(_mm256_extracti128_si256(scales_16, 1)),
        ];
        Q6kBlock {
            values,
            scales: std::array::from_fn(|c| {
                let low = (4 * (c % 4)) as i8;
                let pick = _mm256_setr_epi8(
                    low,
                    low + 1,
                    low,
                    low + 1,
                    low,
                    low + 1,
                    low,
                    low + 1, //
                    low,
                    low + 1,
                    low,
                    low + 1,
                    low,
                    low + 1,
                    low,
                    low + 1, //
                    low + 2,
                    low + 3,
                    low + 2,
                    low + 3,
                    low + 2,
                    low + 3,
                    low + 2,
                    low + 3, //
                    low + 2,
                    low + 3,
                    low + 2,
                    low + 3,
                    low + 2,
                    low + 3,
                    low + 2,
                    low + 3,
                );
                _mm256_shuffle_epi8(halves[c / 4], pick)
            }),
            scales_16,
        }
    }
}

/// The eight integer lanes of an unpacked Q6_K block against one Q8_K
/// block (at `ab`, 292 bytes), as `ggml_vec_dot_q6_K_q8_K`'s AVX2 code
/// forms them (see `portable::q6_k_ints` for what each lane holds).
#[inline(always)]
unsafe fn q6_k_block_lanes(block: &Q6kBlock, ab: *const u8) -> __m256i {
    // SAFETY: the caller has AVX2 and passes a pointer to a whole block.
    unsafe {
        let bsums = _mm256_loadu_si256(ab.add(260) as *const __m256i);
        let offset = _mm256_slli_epi32(_mm256_madd_epi16(bsums, block.scales_16), 5);
        let mut sumi = _mm256_setzero_si256();
        for c in 0..8 {
            let y = _mm256_loadu_si256(ab.add(4 + 32 * c) as *const __m256i);
            let p16 = _mm256_maddubs_epi16(block.values[c], y);
            sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(block.scales[c], p16));
        }
        _mm256_sub_epi32(sumi, offset)
    }
}

/// The lanes of the Q6_K block at `wb` against the Q8_K block at `ab`.
#[inline(always)]
unsafe fn q6_k_lanes(wb: *const u8, ab: *const u8) -> __m256i {
    // SAFETY: the caller has AVX2 and passes pointers to whole blocks.
    unsafe { q6_k_block_lanes(&q6_k_unpack(wb), ab) }
}

/// Four Q6_K rows against one Q8_K row with `vec_dot`'s rounding (decode):
/// `KAccumulator::add_q6_k`'s eight lane FMAs as one vector FMA per block,
/// as ggml's own loop does, and `hsum8` at the end.
#[inline(always)]
unsafe fn dot4_q6_k_vec_dot(w: [&[u8]; 4], a: &[u8]) -> [f32; 4] {
    let blocks = a.len() / 292;
    assert!(
        w.iter().all(|w| w.len() == blocks * 210),
        "rows and activations differ in length"
    );
    // SAFETY: the caller has AVX2, FMA and F16C; each row has `blocks`
    // blocks of 210 bytes (asserted above) and `a` has `blocks` of 292.
    unsafe {
        let mut acc = [_mm256_setzero_ps(); 4];
        for b in 0..blocks {
            let ab = a.as_ptr().add(b * 292);
            let yd = f32_ptr(ab);
            for (row, acc) in w.iter().zip(acc.iter_mut()) {
                let wb = row.as_ptr().add(b * 210);
                prefetch_next_row(wb, blocks * 210);
                let d = _mm256_set1_ps(yd * f16_ptr(wb.add(208)));
                *acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(q6_k_lanes(wb, ab)), *acc);
            }
        }
        acc.map(|acc| hsum8(acc))
    }
}

/// The scales (low 128 bits, eight i16) and minimums (high 128 bits) of a
/// Q4_K block's 12 packed bytes at `packed`, as ggml's AVX2 code unpacks
/// them (the `utmp` shuffle, the same values as `get_scale_min_k4`).
#[inline(always)]
unsafe fn k4_scales_mins(packed: *const u8) -> __m256i {
    // SAFETY: the caller has AVX2 and passes a pointer to 12 readable bytes.
    unsafe {
        const KMASK1: u32 = 0x3f3f_3f3f;
        const KMASK2: u32 = 0x0f0f_0f0f;
        const KMASK3: u32 = 0x0303_0303;
        let word = |i: usize| (packed.add(4 * i) as *const u32).read_unaligned();
        let (u0, u1, u2) = (word(0), word(1), word(2));
        let u3 = ((u2 >> 4) & KMASK2) | (((u1 >> 6) & KMASK3) << 4);
        let mins_low = u1 & KMASK1;
        let scales_high = (u2 & KMASK2) | (((u0 >> 6) & KMASK3) << 4);
        let scales_low = u0 & KMASK1;
        _mm256_cvtepu8_epi16(_mm_set_epi32(
            u3 as i32,
            mins_low as i32,
            scales_high as i32,
            scales_low as i32,
        ))
    }
}

/// The f32 at `p` (unaligned), without a bounds check.
#[inline(always)]
unsafe fn f32_ptr(p: *const u8) -> f32 {
    // SAFETY: the caller passes a pointer to four readable bytes.
    unsafe { (p as *const f32).read_unaligned() }
}

/// The eight i32 lanes of `v`, and their exact sum.
#[inline(always)]
unsafe fn lanes_of(v: __m256i) -> [i32; 8] {
    let mut lanes = [0i32; 8];
    // SAFETY: the caller has AVX; `lanes` has room for 32 bytes.
    unsafe { _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, v) };
    lanes
}

/// The exact sum of the eight i32 lanes of `v`.
#[inline(always)]
unsafe fn hsum_i32(v: __m256i) -> i32 {
    // SAFETY: the caller has AVX2; register-only operations.
    unsafe {
        let x = _mm_add_epi32(_mm256_extracti128_si256(v, 1), _mm256_castsi256_si128(v));
        let x = _mm_add_epi32(x, _mm_unpackhi_epi64(x, x));
        let x = _mm_add_epi32(x, _mm_shuffle_epi32::<0b01>(x));
        _mm_cvtsi128_si32(x)
    }
}

/// A Q4_K or Q5_K block unpacked for its products: the values of its
/// eight 32-value sub-blocks as bytes, each sub-block's scale in all
/// sixteen i16 lanes (ggml's `get_scale_shuffle_k4`), and the eight
/// minimums as i16.
struct K4Block {
    values: [__m256i; 8],
    scales: [__m256i; 8],
    mins: __m128i,
}

/// Unpacks the Q4_K (`five_bits` false, 144 bytes) or Q5_K (176 bytes)
/// block at `wb` as ggml's AVX2 code does: value `i` of a 64-value group
/// is the low nibble for the first 32 and the high one for the rest, plus
/// (Q5_K) 16 where its bit of `qh` is set.
#[inline(always)]
unsafe fn k4_unpack(wb: *const u8, five_bits: bool) -> K4Block {
    // SAFETY: the caller has AVX2 and passes a pointer to a whole block.
    unsafe {
        let m4 = _mm256_set1_epi8(0x0F);
        let scales_mins = k4_scales_mins(wb.add(4));
        let scales128 = _mm256_extracti128_si256(scales_mins, 0);
        let scales = _mm256_set_m128i(scales128, scales128);
        let qs = wb.add(if five_bits { 48 } else { 16 });
        let high_bits = _mm256_loadu_si256(wb.add(16) as *const __m256i);
        let values = std::array::from_fn(|i| {
            let bits = _mm256_loadu_si256(qs.add(32 * (i / 2)) as *const __m256i);
            let nibbles = if i % 2 == 0 {
                _mm256_and_si256(bits, m4)
            } else {
                _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4)
            };
            if !five_bits {
                return nibbles;
            }
            let mask = _mm256_set1_epi8((1u8 << i) as i8);
            let set = _mm256_cmpeq_epi8(_mm256_and_si256(high_bits, mask), mask);
            _mm256_add_epi8(nibbles, _mm256_and_si256(set, _mm256_set1_epi8(16)))
        });
        K4Block {
            values,
            scales: std::array::from_fn(|k| {
                let pick = (((2 * k + 1) << 8) | (2 * k)) as i16;
                _mm256_shuffle_epi8(scales, _mm256_set1_epi16(pick))
            }),
            mins: _mm256_extracti128_si256(scales_mins, 1),
        }
    }
}

/// `portable::k4_ints` with AVX2 for an unpacked block against the Q8_K
/// block at `ab`, as `ggml_vec_dot_q4_K_q8_K` forms the integers (the
/// per-pair sums are those of its 32-byte steps), reduced to what `kernel`
/// reads: the lanes for `vec_dot`, the pairs for `gemm`, and for `gemv`
/// and `tiled`, which read only the pairs' total, that total in the first
/// pair.
#[inline(always)]
unsafe fn k4_block_ints(kernel: KKernel, block: &K4Block, ab: *const u8) -> BlockInts {
    // SAFETY: the caller has AVX2 and passes a pointer to a 292-byte block.
    unsafe {
        let bsums = _mm256_loadu_si256(ab.add(260) as *const __m256i);
        let pair_sums = _mm_hadd_epi16(
            _mm256_extracti128_si256(bsums, 0),
            _mm256_extracti128_si256(bsums, 1),
        );
        let mut mins = [0i32; 4];
        _mm_storeu_si128(
            mins.as_mut_ptr() as *mut __m128i,
            _mm_madd_epi16(block.mins, pair_sums),
        );
        let steps: [__m256i; 4] = std::array::from_fn(|j| {
            let y_low = _mm256_loadu_si256(ab.add(4 + 64 * j) as *const __m256i);
            let y_high = _mm256_loadu_si256(ab.add(36 + 64 * j) as *const __m256i);
            _mm256_add_epi32(
                _mm256_madd_epi16(
                    block.scales[2 * j],
                    _mm256_maddubs_epi16(block.values[2 * j], y_low),
                ),
                _mm256_madd_epi16(
                    block.scales[2 * j + 1],
                    _mm256_maddubs_epi16(block.values[2 * j + 1], y_high),
                ),
            )
        });
        if kernel == KKernel::Gemm {
            return BlockInts {
                pairs: hsum4_i32(steps),
                mins,
                ..BlockInts::default()
            };
        }
        let sumi = _mm256_add_epi32(
            _mm256_add_epi32(steps[0], steps[1]),
            _mm256_add_epi32(steps[2], steps[3]),
        );
        if kernel == KKernel::VecDot {
            BlockInts {
                lanes: lanes_of(sumi),
                mins,
                ..BlockInts::default()
            }
        } else {
            BlockInts {
                pairs: [hsum_i32(sumi), 0, 0, 0],
                mins,
                ..BlockInts::default()
            }
        }
    }
}

/// The integers of the Q4_K block at `wb` against the Q8_K block at `ab`.
#[inline(always)]
unsafe fn q4_k_ints(kernel: KKernel, wb: *const u8, ab: *const u8) -> BlockInts {
    // SAFETY: the caller has AVX2 and passes pointers to whole blocks.
    unsafe { k4_block_ints(kernel, &k4_unpack(wb, false), ab) }
}

/// The integers of the Q5_K block at `wb` against the Q8_K block at `ab`.
#[inline(always)]
unsafe fn q5_k_ints(kernel: KKernel, wb: *const u8, ab: *const u8) -> BlockInts {
    // SAFETY: the caller has AVX2 and passes pointers to whole blocks.
    unsafe { k4_block_ints(kernel, &k4_unpack(wb, true), ab) }
}

/// The exact sums of the eight i32 lanes of each of four vectors.
#[inline(always)]
unsafe fn hsum4_i32(v: [__m256i; 4]) -> [i32; 4] {
    // SAFETY: the caller has AVX2; `sums` has room for 16 bytes.
    unsafe {
        let t = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
        let x = _mm_add_epi32(_mm256_extracti128_si256(t, 1), _mm256_castsi256_si128(t));
        let mut sums = [0i32; 4];
        _mm_storeu_si128(sums.as_mut_ptr() as *mut __m128i, x);
        sums
    }
}

/// `portable::q6_k_ints` with AVX2.
#[inline(always)]
unsafe fn q6_k_ints(wb: *const u8, ab: *const u8) -> BlockInts {
    // SAFETY: the caller has AVX2 and passes pointers to whole blocks.
    unsafe {
        BlockInts {
            lanes: lanes_of(q6_k_lanes(wb, ab)),
            ..BlockInts::default()
        }
    }
}

/// Four K-quant rows (blocks of `block` bytes) against one Q8_K row, each
/// with `kernel`'s rounding: `add` folds one block's integers into a row's
/// accumulator (the same float steps as the portable definition, so the
/// results are its bits).
#[inline(always)]
unsafe fn dot4_k(
    kernel: KKernel,
    w: [&[u8]; 4],
    a: &[u8],
    block: usize,
    add: impl Fn(&mut KAccumulator, *const u8, *const u8),
    mins: Mins,
) -> [f32; 4] {
    let blocks = a.len() / 292;
    assert!(
        w.iter().all(|w| w.len() == blocks * block),
        "rows and activations differ in length"
    );
    // SAFETY: each row has `blocks` blocks of `block` bytes (asserted
    // above) and `a` has `blocks` of 292; `add` reads inside them.
    unsafe {
        w.map(|row| {
            let mut acc = KAccumulator::new(kernel);
            for b in 0..blocks {
                let wb = row.as_ptr().add(b * block);
                prefetch_next_row(wb, blocks * block);
                add(&mut acc, wb, a.as_ptr().add(b * 292));
            }
            acc.finish(mins)
        })
    }
}

/// See the entry point of the same name.
#[inline(always)]
unsafe fn k_row_against_rows(
    q4_k: bool,
    kernel: &dyn Fn(usize) -> KKernel,
    w: &[u8],
    xq: &[u8],
    a_row_bytes: usize,
    out: &mut [f32],
) {
    let m = out.len();
    let block = if q4_k { 144 } else { 210 };
    let blocks = a_row_bytes / 292;
    assert!(
        w.len() == blocks * block && xq.len() >= m * a_row_bytes,
        "rows and activations differ in length"
    );
    let mut accs: Vec<KAccumulator> = (0..m).map(|r| KAccumulator::new(kernel(r))).collect();
    // SAFETY: the caller has AVX2 and FMA; the weight row has `blocks`
    // blocks (asserted above), each activation row `blocks` Q8_K blocks.
    unsafe {
        for b in 0..blocks {
            let wb = w.as_ptr().add(b * block);
            if q4_k {
                let (xd, xdmin) = (f16_ptr(wb), f16_ptr(wb.add(2)));
                let unpacked = k4_unpack(wb, false);
                for (r, acc) in accs.iter_mut().enumerate() {
                    let ab = xq.as_ptr().add(r * a_row_bytes + b * 292);
                    let ints = k4_block_ints(acc.kernel(), &unpacked, ab);
                    acc.add_q4_k(&ints, xd, xdmin, f32_ptr(ab));
                }
            } else {
                let xd = f16_ptr(wb.add(208));
                let unpacked = q6_k_unpack(wb);
                for (r, acc) in accs.iter_mut().enumerate() {
                    let ab = xq.as_ptr().add(r * a_row_bytes + b * 292);
                    let ints = BlockInts {
                        lanes: lanes_of(q6_k_block_lanes(&unpacked, ab)),
                        ..BlockInts::default()
                    };
                    acc.add_q6_k(&ints, xd, f32_ptr(ab));
                }
            }
        }
    }
    for (out, acc) in out.iter_mut().zip(&accs) {
        *out = acc.finish(if q4_k { Mins::Lanes } else { Mins::None });
    }
}

/// The scales of sub-block `s` of the eight rows of an interleaved Q4_K
/// block (8 bytes at `p`), each in both i16 lanes of its row's i32 lane,
/// ready for `madd` against the row's two i16 product sums.
#[inline(always)]
unsafe fn q4_k_x8_scales(p: *const u8) -> __m256i {
    // SAFETY: the caller has AVX2 and passes a pointer to 8 bytes.
    unsafe {
        let bytes = _mm256_set1_epi64x(std::ptr::read_unaligned(p as *const i64));
        // i16 lane `k` of each half takes byte `4·half + k / 2`, high byte 0.
        let z = -128i8;
        let pick = _mm256_setr_epi8(
            0, z, 0, z, 1, z, 1, z, 2, z, 2, z, 3, z, 3, z, //
            4, z, 4, z, 5, z, 5, z, 6, z, 6, z, 7, z, 7, z,
        );
        _mm256_and_si256(_mm256_shuffle_epi8(bytes, pick), _mm256_set1_epi16(63))
    }
}

/// The minimums of the eight rows of the interleaved Q4_K block at `wb`,
/// per pair `p` of sub-blocks: i16 lanes `2r` and `2r + 1` hold row `r`'s
/// minimums of sub-blocks `2p` and `2p + 1`, ready for `madd` against the
/// pair's activation sums.
#[inline(always)]
unsafe fn q4_k_x8_mins(wb: *const u8) -> [__m256i; 4] {
    // SAFETY: the caller has AVX2 and passes a pointer to a group block.
    unsafe {
        let three = _mm256_set1_epi8(3);
        let m4 = _mm256_set1_epi8(0x0F);
        // The top two bits of the minimums: per 128-bit half, the scale
        // bytes of sub-blocks 2p and 2p + 1 (rows 0..8 each), woven into
        // row order; half h of `high[k]` is pair 2k + h.
        let high = [0, 32].map(|at| {
            let bytes = _mm256_loadu_si256(wb.add(SCALES + at) as *const __m256i);
            let bits = _mm256_and_si256(_mm256_srli_epi16(bytes, 6), three);
            let woven = _mm256_unpacklo_epi8(bits, _mm256_srli_si256(bits, 8));
            _mm256_slli_epi16(woven, 4)
        });
        // Half h of the low nibbles: pair h; of the high nibbles: pair 2 + h.
        let low = _mm256_loadu_si256(wb.add(MINS_LOW) as *const __m256i);
        let first = _mm256_or_si256(_mm256_and_si256(low, m4), high[0]);
        let second = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(low, 4), m4), high[1]);
        [
            _mm256_cvtepu8_epi16(_mm256_castsi256_si128(first)),
            _mm256_cvtepu8_epi16(_mm256_extracti128_si256(first, 1)),
            _mm256_cvtepu8_epi16(_mm256_castsi256_si128(second)),
            _mm256_cvtepu8_epi16(_mm256_extracti128_si256(second, 1)),
        ]
    }
}

/// Eight interleaved Q4_K rows (`group`: its group blocks, see
/// [`super::q4_k_x8`]) against `N` Q8_K rows: `N == 1` with `gemv`'s
/// rounding, `N == 4` with `gemm`'s (the float steps of
/// `KAccumulator::add_q4_k`, the eight outputs in the lanes of one
/// vector). Returns `[activation row][output row]`.
///
/// The integers: for each 64-value group, each 4-byte chunk of quants is
/// one load for all eight rows, its low and high nibbles multiplied by the
/// chunk's activations broadcast to every lane; the i16 sums of a 32-value
/// sub-block stay below 2^15 (16 products of at most 15 · 128 each), and
/// `madd` with the sub-block's scales makes them the exact i32 pair sums.
#[inline(always)]
unsafe fn q4_k_x8<const N: usize>(group: &[u8], a: [&[u8]; N]) -> [[f32; 8]; N] {
    let blocks = group.len() / GROUP_BLOCK;
    assert!(
        group.len() == blocks * GROUP_BLOCK && a.iter().all(|a| a.len() == blocks * 292),
        "rows and activations differ in length"
    );
    // SAFETY: the caller has AVX2 and FMA; every pointer below stays
    // inside block `b` of `group` (1152 bytes) or of an activation row
    // (292 bytes), whose lengths are asserted above.
    unsafe {
        let m4 = _mm256_set1_epi8(0x0F);
        let mut sum = [_mm256_setzero_ps(); N];
        let mut min_sum = [_mm256_setzero_ps(); N];
        for b in 0..blocks {
            let wb = group.as_ptr().add(b * GROUP_BLOCK);
            let ab: [*const u8; N] = std::array::from_fn(|r| a[r].as_ptr().add(b * 292));
            let xd = _mm256_cvtph_ps(_mm_loadu_si128(wb.add(D) as *const __m128i));
            let xdmin = _mm256_cvtph_ps(_mm_loadu_si128(wb.add(DMIN) as *const __m128i));
            let yd: [__m256; N] = std::array::from_fn(|r| _mm256_set1_ps(f32_ptr(ab[r])));
            // Per activation row, the sums of sub-blocks 2p and 2p + 1 as
            // the i16 halves of i32 `p`.
            let sub_sums: [[i32; 4]; N] = std::array::from_fn(|r| {
                let bsums = _mm256_loadu_si256(ab[r].add(260) as *const __m256i);
                let pairs = _mm_hadd_epi16(
                    _mm256_extracti128_si256(bsums, 0),
                    _mm256_extracti128_si256(bsums, 1),
                );
                let mut sums = [0i32; 4];
                _mm_storeu_si128(sums.as_mut_ptr() as *mut __m128i, pairs);
                sums
            });
            let mins = q4_k_x8_mins(wb);
            let mut whole = _mm256_setzero_si256();
            let mut mins_whole = _mm256_setzero_si256();
            for j in 0..4 {
                let mut low = [_mm256_setzero_si256(); N];
                let mut high = [_mm256_setzero_si256(); N];
                for c in 0..8 {
                    let q = _mm256_loadu_si256(wb.add(QS + 32 * (8 * j + c)) as *const __m256i);
                    let q_low = _mm256_and_si256(q, m4);
                    let q_high = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
                    for r in 0..N {
                        let y = ab[r].add(4 + 64 * j + 4 * c);
                        let y_low = _mm256_set1_epi32(std::ptr::read_unaligned(y as *const i32));
                        let y_high =
                            _mm256_set1_epi32(std::ptr::read_unaligned(y.add(32) as *const i32));
                        low[r] = _mm256_add_epi16(low[r], _mm256_maddubs_epi16(q_low, y_low));
                        high[r] = _mm256_add_epi16(high[r], _mm256_maddubs_epi16(q_high, y_high));
                    }
                }
                let scales_low = q4_k_x8_scales(wb.add(SCALES + 16 * j));
                let scales_high = q4_k_x8_scales(wb.add(SCALES + 16 * j + 8));
                for r in 0..N {
                    let pair = _mm256_add_epi32(
                        _mm256_madd_epi16(low[r], scales_low),
                        _mm256_madd_epi16(high[r], scales_high),
                    );
                    let pair_mins = _mm256_madd_epi16(mins[j], _mm256_set1_epi32(sub_sums[r][j]));
                    if N == 1 {
                        whole = _mm256_add_epi32(whole, pair);
                        mins_whole = _mm256_add_epi32(mins_whole, pair_mins);
                    } else {
                        let d = _mm256_mul_ps(xd, yd[r]);
                        let dmin = _mm256_mul_ps(xdmin, yd[r]);
                        sum[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pair), d, sum[r]);
                        min_sum[r] =
                            _mm256_fmadd_ps(_mm256_cvtepi32_ps(pair_mins), dmin, min_sum[r]);
                    }
                }
            }
            if N == 1 {
                let d = _mm256_mul_ps(xd, yd[0]);
                let dmin = _mm256_mul_ps(xdmin, yd[0]);
                sum[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(whole), d, sum[0]);
                min_sum[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(mins_whole), dmin, min_sum[0]);
            }
        }
        std::array::from_fn(|r| {
            let mut out = [0f32; 8];
            _mm256_storeu_ps(out.as_mut_ptr(), _mm256_sub_ps(sum[r], min_sum[r]));
            out
        })
    }
}

/// [`portable::quantize_q8_32`](super::portable::quantize_q8_32) in AVX2,
/// byte for byte: the same largest magnitude, the same products `v · id`
/// rounded half to even (`_mm256_round_ps` to nearest is
/// `round_ties_even`), the same exact integer sum. ggml's
/// `quantize_row_q8_0`/`q8_1` do the same in AVX2.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn quantize_q8_32(with_sum: bool, x: &[f32], out: &mut [u8]) {
    let block_bytes = if with_sum { 36 } else { 34 };
    let qs_at = block_bytes - 32;
    for (values, block) in x.chunks_exact(32).zip(out.chunks_exact_mut(block_bytes)) {
        // SAFETY: `values` holds 32 floats and `block[qs_at..]` 32 bytes;
        // the loads and the store are unaligned ones.
        let (max, ints) = unsafe {
            let p = values.as_ptr();
            let v = [
                _mm256_loadu_ps(p),
                _mm256_loadu_ps(p.add(8)),
                _mm256_loadu_ps(p.add(16)),
                _mm256_loadu_ps(p.add(24)),
            ];
            let magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
            let mut m = _mm256_setzero_ps();
            for v in v {
                m = _mm256_max_ps(m, _mm256_and_ps(v, magnitude));
            }
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let max = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
            let id = _mm256_set1_ps(if max != 0.0 { 127.0 / max } else { 0.0 });
            let (low, high) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
            let mut ints = [_mm256_setzero_si256(); 4];
            for (int, v) in ints.iter_mut().zip(v) {
                let rounded = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                    _mm256_mul_ps(v, id),
                );
                *int = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(rounded, low), high));
            }
            // Packing interleaves the 128-bit halves: the permutation puts
            // the 32 bytes back in order.
            let bytes = _mm256_packs_epi16(
                _mm256_packs_epi32(ints[0], ints[1]),
                _mm256_packs_epi32(ints[2], ints[3]),
            );
            let bytes =
                _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256(block.as_mut_ptr().add(qs_at).cast(), bytes);
            (max, ints)
        };
        let d = max / 127.0;
        block[0..2].copy_from_slice(&half::f16::from_f32(d).to_le_bytes());
        if with_sum {
            // SAFETY: register-only.
            let sum: i32 = unsafe {
                let s = _mm256_add_epi32(
                    _mm256_add_epi32(ints[0], ints[1]),
                    _mm256_add_epi32(ints[2], ints[3]),
                );
                let mut lanes = [0i32; 8];
                _mm256_storeu_si256(lanes.as_mut_ptr().cast(), s);
                lanes.iter().sum()
            };
            block[2..4].copy_from_slice(&half::f16::from_f32(d * sum as f32).to_le_bytes());
        }
    }
}
