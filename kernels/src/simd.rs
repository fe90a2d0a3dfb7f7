//! Runtime dispatch of the CPU kernels' inner loops to AVX2 + FMA.
//!
//! The release binary targets baseline x86-64, so the compiler vectorises our loops with SSE2
//! (4 lanes, no fused multiply-add) unless told otherwise; a binary built for the build
//! machine's CPU would not run on older cluster nodes. [`multiversion!`] compiles a function
//! twice, once for the baseline and once with AVX2 and FMA enabled, and picks one per call from
//! the CPU's features (detected once; `is_x86_feature_detected!` caches them). The gemm crate
//! already does the same for its own kernels.
//!
//! The two versions compute the same function; with FMA the rounding of `a * b + c` can differ
//! in the last bit, within the kernels' fp32 tolerance.

/// Whether this CPU runs the AVX2 + FMA versions.
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// Whether this CPU runs AVX-512F code (the direct convolution's widest kernel).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

/// `multiversion! { fn name(arg: Type, ...) -> Ret { body } }` defines `name` with that
/// signature (no generics, no `self`), dispatching to a copy of `body` compiled with AVX2 and
/// FMA where the CPU has them. Write the body's loops over slices with simple indexing, so that
/// both copies vectorise; everything the body calls must be `#[inline(always)]` to be compiled
/// with the features too.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn portable($($arg: $ty),*) $(-> $ret)? $body

            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    portable($($arg),*)
                }
                if $crate::simd::has_avx2_fma() {
                    // SAFETY: the CPU has the features `avx2` was compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            portable($($arg),*)
        }
    };
}

pub(crate) use multiversion;

/// `e^x` in arithmetic and bit operations only, so that loops over it vectorise (a call to the
/// C library's `expf` per element does not): `2^n * e^r` with `n = round(x / ln 2)` and a
/// degree-6 Taylor polynomial on `|r| <= ln 2 / 2`, whose truncation error (`r^7 / 7!`, about
/// 1.2e-7 relative) is one or two ulps. Inputs are clamped to the range where `e^x` is a normal
/// f32, so the results stay finite and nonzero; NaN stays NaN.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n * LN2_HIGH is exact for |n| < 2^9.
    const LN2_HIGH: f32 = 0.693_359_4;
    const LN2_LOW: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.3);
    let shifted = x * LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HIGH - n * LN2_LOW;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let exponent = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    p * f32::from_bits(((exponent + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Within a few ulps of the C library's `expf` over the whole range the networks see, and
    /// finite and positive beyond it.
    #[test]
    fn exp_matches_the_library() {
        let mut worst = 0f64;
        for i in -87_000..88_000 {
            let x = i as f32 * 1e-3;
            let (ours, reference) = (f64::from(exp(x)), f64::from(x.exp()));
            worst = worst.max((ours - reference).abs() / reference);
        }
        assert!(worst < 5e-7, "largest relative error {worst}");
        for x in [-1e4f32, -100.0, 100.0, 1e4] {
            assert!(exp(x).is_finite() && exp(x) > 0.0, "{x}");
        }
        assert!(exp(f32::NAN).is_nan());
    }

    multiversion! {
        fn sum_of_products(a: &[f32], b: &[f32]) -> f32 {
            a.iter().zip(b).map(|(x, y)| x * y).sum()
        }
    }

    /// The dispatched function computes what its body says, whichever copy runs.
    #[test]
    fn dispatch_runs_the_body() {
        let a: Vec<f32> = (0..100).map(|i| i as f32).collect();
        let b = vec![2f32; 100];
        assert_eq!(sum_of_products(&a, &b), 9900.0);
    }
}
