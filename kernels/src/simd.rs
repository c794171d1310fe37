//! The one convention by which ringlet's SIMD fast paths are chosen.
//!
//! Every op that has a fast path comes in three parts, side by side in its
//! module (`quant`, `cpu_ops`):
//!
//! - `portable::f` — the definition, in plain Rust. It says which lanes
//!   and which order every sum uses, and the fast versions are tested to
//!   give its bits exactly;
//! - `x86::…::f` — the same function compiled for an instruction set with
//!   `#[target_feature(enable = "…")]`, where the string is the one that
//!   [`CpuFeatures`]'s field of that name documents;
//! - `simd::f` — what the rest of the crate calls: one [`fast_path!`] that
//!   takes the first version this CPU runs, else the definition.
//!
//! Why detect at run time rather than select by `cfg(target_feature)`: the
//! same build then runs every CPU at its best (a binary built without
//! `-C target-cpu=native`, or on an older CPU, still takes the fastest path
//! the CPU it runs on has), every fast version is compiled, and so checked,
//! on every x86-64 build, and the choice is written once, here, instead of
//! as `cfg` pairs around each function. The check is cheap: where the build
//! already assumes a feature, `std`'s detection macro is the constant
//! `true` and the check folds away; otherwise it is a load of `std`'s
//! cached CPUID bits and a branch that always goes the same way.

/// The instruction sets the fast paths use. `std` runs CPUID once per
/// process and caches the answer; reading it again is a relaxed load.
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CpuFeatures {
    /// `"avx2,fma,f16c"`: ggml's AVX2 quantized dot products (with F16C's
    /// inline f16 conversions, which every AVX2 CPU has).
    pub(crate) avx2_fma: bool,
    /// `"avx2,fma,f16c,avx512vnni,avx512vl"`: the same with VNNI's one-step
    /// byte dot product.
    pub(crate) avx512_vnni: bool,
    /// `"avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni"`: the
    /// VNNI kernels in 512-bit registers, two rows' lanes to a register.
    pub(crate) avx512_wide: bool,
    /// `"avx512f"`: ggml's AVX-512 f32 dot product, `expf` and SiLU.
    pub(crate) avx512f: bool,
}

#[cfg(target_arch = "x86_64")]
impl CpuFeatures {
    /// The features of the CPU this runs on.
    #[inline]
    pub(crate) fn get() -> Self {
        let avx2_fma = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        let avx512_vnni = avx2_fma
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("avx512vl");
        let avx512f = is_x86_feature_detected!("avx512f");
        Self {
            avx2_fma,
            avx512_vnni,
            avx512_wide: avx512_vnni && avx512f && is_x86_feature_detected!("avx512bw"),
            avx512f,
        }
    }
}

/// `fast_path!(feature => fast_call, …; portable_call)`: the first
/// `fast_call` whose [`CpuFeatures`] `feature` this CPU has, else
/// `portable_call`. Returns from the enclosing function; use it as a
/// function's whole body. Each `fast_call` must call a function compiled
/// with exactly that feature's `target_feature` string (or a subset).
macro_rules! fast_path {
    ($($feature:ident => $fast:expr),+ ; $portable:expr) => {{
        #[cfg(target_arch = "x86_64")]
        {
            let cpu = $crate::simd::CpuFeatures::get();
            $(
                if cpu.$feature {
                    // SAFETY: the CPU has every feature the fast version
                    // is compiled for (checked just above).
                    return unsafe { $fast };
                }
            )+
        }
        $portable
    }};
}
pub(crate) use fast_path;
