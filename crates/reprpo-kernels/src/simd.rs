//! The exponential of the fused CPU kernels, scalar and in explicit SIMD, and the softmax row
//! loops built on it (log-probabilities of `reprpo-models`' `logps.rs`, the log-softmax token
//! reduction of `reprpo-losses`).
//!
//! `pulp` picks AVX-512, AVX2 + FMA or scalar code at run time (safe dispatch). The crates are
//! compiled for the x86-64 baseline, where LLVM does not vectorise an exponential's polynomial
//! across lanes: a scalar `e^x` per element was most of those kernels' time (docs/perf.md).
//!
//! - [`exp_f32`]: Cephes' `expf` in scalar f32 (no libm call), within 2 ulp, with gradual
//!   underflow; the SIMD loops' tails use it.
//! - [`exp_nonpos`]: the same polynomial per SIMD lane for arguments `≤ 0` (the only ones a
//!   softmax row loop forms: `x - max`, or `x - c` with `c ≥ max`), within 2 ulp on
//!   `[-87.33, 0]`, 0 below (where `e^x < 1.2e-38`, against a row sum of at least 1), NaN for NaN.
//! - Row loops over f32 slices: [`max_f32`], [`sum_exp`] (`Σ e^(x - m)`), [`scaled_exp`]
//!   (`dst = a e^(x - c)`).

use pulp::{Arch, Simd, WithSimd};

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// `ln 2` in two parts (Cody–Waite): `C1 + C2` with `n C1` exact for the `n` that occur.
const C1: f32 = 0.693_359_4;
const C2: f32 = -2.121_944_4e-4;
/// 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits.
const MAGIC: f32 = 12_582_912.0;
/// Below this `e^x` would be subnormal; the SIMD lanes give 0 there.
const LO: f32 = -87.33;
/// The polynomial's coefficients, highest degree first (Cephes' `expf`).
const POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

/// `e^x` in f32 without a libm call: `x = n ln 2 + r`, a degree-6 polynomial in `r`, `2^n`
/// applied in two halves so that subnormal results underflow gradually; within 2 ulp; `+inf`
/// above 88.72, 0 below -104, NaN for NaN.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const HI: f32 = 88.722_83;
    const LO4: f32 = -104.0;
    // Round to nearest through the magic number (no `floor`, a libm call on the baseline).
    let xc = x.clamp(LO4, HI);
    let t = xc * LOG2E + MAGIC;
    let n = t - MAGIC;
    let ni = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let r = xc - n * C1 - n * C2;
    let mut p = POLY[0];
    for k in &POLY[1..] {
        p = p * r + k;
    }
    let y = p * r * r + r + 1.0;
    let n1 = ni >> 1;
    let n2 = ni - n1;
    let s1 = f32::from_bits(((n1 + 127) as u32) << 23);
    let s2 = f32::from_bits(((n2 + 127) as u32) << 23);
    let v = y * s1 * s2;
    if x.is_nan() {
        x
    } else if x > HI {
        f32::INFINITY
    } else if x < LO4 {
        0.0
    } else {
        v
    }
}

/// `e^x` per lane for `x ≤ 0` ([`exp_f32`]'s polynomial, with FMA where the CPU has it): within 2
/// ulp on `[-87.33, 0]`, 0 below, NaN for NaN.
#[inline(always)]
pub fn exp_nonpos<S: Simd>(s: S, x: S::f32s) -> S::f32s {
    let lo = s.splat_f32s(LO);
    let xc = s.max_f32s(x, lo);
    let t = s.mul_add_f32s(xc, s.splat_f32s(LOG2E), s.splat_f32s(MAGIC));
    let n = s.sub_f32s(t, s.splat_f32s(MAGIC));
    let ni = s.sub_i32s(s.transmute_i32s_f32s(t), s.splat_i32s(0x4B40_0000));
    let r = s.mul_add_f32s(n, s.splat_f32s(-C1), xc);
    let r = s.mul_add_f32s(n, s.splat_f32s(-C2), r);
    let mut p = s.splat_f32s(POLY[0]);
    for k in &POLY[1..] {
        p = s.mul_add_f32s(p, r, s.splat_f32s(*k));
    }
    let y = s.mul_add_f32s(s.mul_f32s(p, r), r, s.add_f32s(r, s.splat_f32s(1.0)));
    let bits = s.add_i32s(ni, s.splat_i32s(127));
    let scale = s.wrapping_dyn_shl_u32s(s.transmute_u32s_i32s(bits), s.splat_u32s(23));
    let v = s.mul_f32s(y, s.transmute_f32s_u32s(scale));
    let v = s.select_f32s(s.less_than_f32s(x, lo), s.splat_f32s(0.0), v);
    s.select_f32s(s.equal_f32s(x, x), v, x)
}

struct Max<'a>(&'a [f32]);

impl WithSimd for Max<'_> {
    type Output = f32;

    #[inline(always)]
    fn with_simd<S: Simd>(self, s: S) -> f32 {
        let (head, tail) = S::as_simd_f32s(self.0);
        let mut m = s.splat_f32s(f32::NEG_INFINITY);
        for &v in head {
            m = s.max_f32s(m, v);
        }
        let mut mx = s.reduce_max_f32s(m);
        for &v in tail {
            mx = mx.max(v);
        }
        mx
    }
}

/// The maximum of a row (`-inf` for an empty one; NaNs are skipped, as `f32::max` does).
pub fn max_f32(arch: Arch, x: &[f32]) -> f32 {
    arch.dispatch(Max(x))
}

struct SumExp<'a> {
    x: &'a [f32],
    m: f32,
}

impl WithSimd for SumExp<'_> {
    type Output = f32;

    #[inline(always)]
    fn with_simd<S: Simd>(self, s: S) -> f32 {
        let (head, tail) = S::as_simd_f32s(self.x);
        let mv = s.splat_f32s(self.m);
        let zero = s.splat_f32s(0.0);
        let (mut a0, mut a1) = (zero, zero);
        let (pairs, rest) = head.as_chunks::<2>();
        for [v0, v1] in pairs {
            a0 = s.add_f32s(a0, exp_nonpos(s, s.sub_f32s(*v0, mv)));
            a1 = s.add_f32s(a1, exp_nonpos(s, s.sub_f32s(*v1, mv)));
        }
        for &v in rest {
            a0 = s.add_f32s(a0, exp_nonpos(s, s.sub_f32s(v, mv)));
        }
        let mut sum = s.reduce_sum_f32s(s.add_f32s(a0, a1));
        for &v in tail {
            sum += exp_f32(v - self.m);
        }
        sum
    }
}

/// `Σ e^(x - m)` over a row, for `m ≥ max(x)` (a softmax's denominator).
pub fn sum_exp(arch: Arch, x: &[f32], m: f32) -> f32 {
    arch.dispatch(SumExp { x, m })
}

struct ScaledExp<'a> {
    x: &'a [f32],
    dst: &'a mut [f32],
    c: f32,
    a: f32,
}

impl WithSimd for ScaledExp<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, s: S) {
        let ScaledExp { x, dst, c, a } = self;
        let (xh, xt) = S::as_simd_f32s(x);
        let (dh, dt) = S::as_mut_simd_f32s(dst);
        let (cv, av) = (s.splat_f32s(c), s.splat_f32s(a));
        for (d, &v) in dh.iter_mut().zip(xh) {
            *d = s.mul_f32s(av, exp_nonpos(s, s.sub_f32s(v, cv)));
        }
        for (d, &v) in dt.iter_mut().zip(xt) {
            *d = a * exp_f32(v - c);
        }
    }
}

/// `dst = a e^(x - c)` over a row, for `c ≥ max(x)` (`a` times the softmax when `c` is the row's
/// logsumexp). `x` and `dst` have the same length.
pub fn scaled_exp(arch: Arch, x: &[f32], c: f32, a: f32, dst: &mut [f32]) {
    arch.dispatch(ScaledExp { x, dst, c, a });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in units in the last place of the f32 nearest to the exact value.
    fn ulps(got: f32, exact: f64) -> f64 {
        let e = exact as f32;
        let ulp = (f32::from_bits(e.abs().to_bits() + 1) - e.abs()) as f64;
        (got as f64 - exact).abs() / ulp
    }

    #[test]
    fn exp_f32_within_two_ulp_of_the_exact_exponential() {
        let mut worst: f64 = 0.0;
        // Every 97th f32 in [-87.3, 88.7] by bit pattern (normal results), both signs.
        let pos = (0..0x42B1_7000u32).step_by(97).map(f32::from_bits);
        let neg = (0..0x42AE_9000u32).step_by(97).map(|b| -f32::from_bits(b));
        for x in pos.chain(neg) {
            let exact = (x as f64).exp();
            let e = ulps(exp_f32(x), exact);
            assert!(
                e <= 2.0,
                "exp_f32({x:e}) = {:e}, exact {exact:e}: {e} ulp",
                exp_f32(x)
            );
            worst = worst.max(e);
        }
        eprintln!("exp_f32: worst {worst:.2} ulp");
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp_f32(89.0), f32::INFINITY);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-105.0), 0.0);
        assert!(exp_f32(f32::NAN).is_nan());
        // Subnormal results underflow gradually (within one step of the subnormal grid).
        let sub = exp_f32(-100.0);
        assert!(sub > 0.0 && sub < f32::MIN_POSITIVE, "{sub:e}");
        let step = f64::from(f32::from_bits(1));
        assert!((f64::from(sub) - (-100f64).exp()).abs() <= step, "{sub:e}");
    }

    #[test]
    fn simd_exp_within_two_ulp_on_the_non_positive_range() {
        // Every 37th f32 in [-87.33, 0] by bit pattern, through the dispatched SIMD lanes
        // (`scaled_exp` with c = 0, a = 1 is `exp_nonpos` over a slice, `exp_f32` on the tail).
        let x: Vec<f32> = (0..=0x42AE_A8F5u32)
            .step_by(37)
            .map(|b| -f32::from_bits(b))
            .collect();
        let mut got = vec![0f32; x.len()];
        scaled_exp(Arch::new(), &x, 0.0, 1.0, &mut got);
        let mut worst: f64 = 0.0;
        for (&v, &g) in x.iter().zip(&got) {
            let e = ulps(g, (v as f64).exp());
            assert!(e <= 2.0, "exp({v:e}) = {g:e}: {e} ulp");
            worst = worst.max(e);
        }
        eprintln!("simd exp: worst {worst:.2} ulp over {} values", x.len());
        // Special values, 8 times over (64 values: whole vectors on every instruction set).
        let specials = [
            f32::NEG_INFINITY,
            -1e30,
            -90.0,
            f32::NAN,
            -0.0,
            0.0,
            -88.0,
            -1.0,
        ];
        let x: Vec<f32> = specials.iter().cycle().take(64).copied().collect();
        let mut got = vec![0f32; 64];
        scaled_exp(Arch::new(), &x, 0.0, 1.0, &mut got);
        for s in got.chunks(8) {
            assert_eq!(&s[..3], &[0.0, 0.0, 0.0]);
            assert!(s[3].is_nan());
            assert_eq!(&s[4..6], &[1.0, 1.0]);
            assert_eq!(s[6], 0.0);
            assert!(
                (f64::from(s[7]) / (-1f64).exp() - 1.0).abs() < 3e-7,
                "{}",
                s[7]
            );
        }
    }

    #[test]
    fn row_loops_match_f64() {
        // 333 elements: whole vectors, a pair remainder and a scalar tail on every ISA.
        let x: Vec<f32> = (0..333)
            .map(|i| ((i * 7919) % 1000) as f32 / 150.0 - 3.0)
            .collect();
        let xd: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
        let arch = Arch::new();
        let m = max_f32(arch, &x);
        assert_eq!(
            f64::from(m),
            xd.iter().cloned().fold(f64::NEG_INFINITY, f64::max)
        );
        let want: f64 = xd.iter().map(|v| (v - f64::from(m)).exp()).sum();
        let got = sum_exp(arch, &x, m);
        assert!((f64::from(got) / want - 1.0).abs() < 1e-6, "{got} {want}");
        let c = m + got.ln();
        let mut dst = vec![0f32; 333];
        scaled_exp(arch, &x, c, -0.75, &mut dst);
        for i in 0..333 {
            let w = -0.75 * (xd[i] - f64::from(c)).exp();
            assert!((f64::from(dst[i]) - w).abs() < 1e-7, "{i}: {} {w}", dst[i]);
        }
        assert_eq!(max_f32(arch, &[]), f32::NEG_INFINITY);
        assert_eq!(sum_exp(arch, &[], 0.0), 0.0);
    }
}
