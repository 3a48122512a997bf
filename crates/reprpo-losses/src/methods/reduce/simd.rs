//! The log-softmax row loops of the fused token reduction in explicit SIMD: `pulp` picks AVX-512,
//! AVX2 + FMA or scalar code at run time (safe dispatch; the crate itself is compiled for the
//! x86-64 baseline, where LLVM does not vectorise the exponential's polynomial across lanes: a
//! scalar `e^x` per element was 70% of the kernel's time).
//!
//! Only arguments `≤ 0` reach the exponential here (`x - max` in the forward, `x - c` with
//! `c ≥ max` in the backward), so [`exp_nonpos`] covers `[-87.33, 0]` with normal results and
//! gives 0 below (where `e^x < 1.2e-38`, against a row sum of at least 1).

use pulp::{Arch, Simd, WithSimd};

use super::fused::exp_f32;

const LOG2E: f32 = std::f32::consts::LOG2_E;
const C1: f32 = 0.693_359_4;
const C2: f32 = -2.121_944_4e-4;
/// 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits.
const MAGIC: f32 = 12_582_912.0;
/// Below this `e^x` would be subnormal; the lanes give 0 there.
const LO: f32 = -87.33;

/// `e^x` per lane for `x ≤ 0` (Cephes' `expf` as [`exp_f32`], with FMA where the CPU has it):
/// within 2 ulp on `[-87.33, 0]`, 0 below, NaN for NaN.
#[inline(always)]
pub(crate) fn exp_nonpos<S: Simd>(s: S, x: S::f32s) -> S::f32s {
    let lo = s.splat_f32s(LO);
    let xc = s.max_f32s(x, lo);
    let t = s.mul_add_f32s(xc, s.splat_f32s(LOG2E), s.splat_f32s(MAGIC));
    let n = s.sub_f32s(t, s.splat_f32s(MAGIC));
    let ni = s.sub_i32s(s.transmute_i32s_f32s(t), s.splat_i32s(0x4B40_0000));
    let r = s.mul_add_f32s(n, s.splat_f32s(-C1), xc);
    let r = s.mul_add_f32s(n, s.splat_f32s(-C2), r);
    let mut p = s.splat_f32s(1.987_569_1e-4);
    for k in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        p = s.mul_add_f32s(p, r, s.splat_f32s(k));
    }
    let y = s.mul_add_f32s(s.mul_f32s(p, r), r, s.add_f32s(r, s.splat_f32s(1.0)));
    let bits = s.add_i32s(ni, s.splat_i32s(127));
    let scale = s.wrapping_dyn_shl_u32s(s.transmute_u32s_i32s(bits), s.splat_u32s(23));
    let v = s.mul_f32s(y, s.transmute_f32s_u32s(scale));
    let v = s.select_f32s(s.less_than_f32s(x, lo), s.splat_f32s(0.0), v);
    s.select_f32s(s.equal_f32s(x, x), v, x)
}

/// `(c, ‖x - c‖²)` of one row, `c = max + ln Σ exp(x - max)`.
struct LseNorm<'a> {
    x: &'a [f32],
}

impl WithSimd for LseNorm<'_> {
    type Output = (f32, f64);

    #[inline(always)]
    fn with_simd<S: Simd>(self, s: S) -> (f32, f64) {
        let (head, tail) = S::as_simd_f32s(self.x);
        let mut m = s.splat_f32s(f32::NEG_INFINITY);
        for &v in head {
            m = s.max_f32s(m, v);
        }
        let mut mx = s.reduce_max_f32s(m);
        for &v in tail {
            mx = mx.max(v);
        }
        let mv = s.splat_f32s(mx);
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
            sum += exp_f32(v - mx);
        }
        let c = mx + sum.ln();
        let cv = s.splat_f32s(c);
        let (mut b0, mut b1) = (zero, zero);
        for [v0, v1] in pairs {
            let y0 = s.sub_f32s(*v0, cv);
            let y1 = s.sub_f32s(*v1, cv);
            b0 = s.mul_add_f32s(y0, y0, b0);
            b1 = s.mul_add_f32s(y1, y1, b1);
        }
        for &v in rest {
            let y = s.sub_f32s(v, cv);
            b0 = s.mul_add_f32s(y, y, b0);
        }
        let mut n2 = f64::from(s.reduce_sum_f32s(s.add_f32s(b0, b1)));
        for &v in tail {
            n2 += f64::from((v - c) * (v - c));
        }
        (c, n2)
    }
}

/// `dst = w (g - exp(x - c) sg)` over one row.
struct SoftmaxGrad<'a> {
    x: &'a [f32],
    g: &'a [f32],
    dst: &'a mut [f32],
    c: f32,
    w: f32,
    sg: f32,
}

impl WithSimd for SoftmaxGrad<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, s: S) {
        let SoftmaxGrad {
            x,
            g,
            dst,
            c,
            w,
            sg,
        } = self;
        let (xh, xt) = S::as_simd_f32s(x);
        let (gh, gt) = S::as_simd_f32s(g);
        let (dh, dt) = S::as_mut_simd_f32s(dst);
        let (cv, wv, sv) = (s.splat_f32s(c), s.splat_f32s(w), s.splat_f32s(sg));
        for ((d, &xv), &gv) in dh.iter_mut().zip(xh).zip(gh) {
            let p = exp_nonpos(s, s.sub_f32s(xv, cv));
            *d = s.mul_f32s(wv, s.sub_f32s(gv, s.mul_f32s(p, sv)));
        }
        for ((d, &xv), &gv) in dt.iter_mut().zip(xt).zip(gt) {
            *d = w * (gv - exp_f32(xv - c) * sg);
        }
    }
}

/// `(c, ‖x - c‖²)` of one f32 row (see [`LseNorm`]).
pub(crate) fn lse_norm(arch: Arch, x: &[f32]) -> (f32, f64) {
    arch.dispatch(LseNorm { x })
}

/// `dst = w (g - exp(x - c) sg)` over one f32 row.
pub(crate) fn softmax_grad(
    arch: Arch,
    x: &[f32],
    g: &[f32],
    (c, w, sg): (f32, f32, f32),
    dst: &mut [f32],
) {
    arch.dispatch(SoftmaxGrad {
        x,
        g,
        dst,
        c,
        w,
        sg,
    });
}

/// [`exp_nonpos`] over a slice (for the tests).
#[cfg(test)]
fn exp_slice(arch: Arch, x: &[f32]) -> Vec<f32> {
    struct Op<'a>(&'a [f32], &'a mut [f32]);
    impl WithSimd for Op<'_> {
        type Output = ();
        #[inline(always)]
        fn with_simd<S: Simd>(self, s: S) {
            let (xh, xt) = S::as_simd_f32s(self.0);
            let (dh, dt) = S::as_mut_simd_f32s(self.1);
            for (d, &v) in dh.iter_mut().zip(xh) {
                *d = exp_nonpos(s, v);
            }
            for (d, &v) in dt.iter_mut().zip(xt) {
                *d = exp_f32(v);
            }
        }
    }
    let mut out = vec![0f32; x.len()];
    arch.dispatch(Op(x, &mut out));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(got: f32, exact: f64) -> f64 {
        let e = exact as f32;
        let ulp = (f32::from_bits(e.abs().to_bits() + 1) - e.abs()) as f64;
        (got as f64 - exact).abs() / ulp
    }

    #[test]
    fn simd_exp_within_two_ulp_on_the_non_positive_range() {
        // Every 37th f32 in [-87.33, 0] by bit pattern, in the dispatched SIMD lanes.
        let x: Vec<f32> = (0..=0x42AE_A8F5u32)
            .step_by(37)
            .map(|b| -f32::from_bits(b))
            .collect();
        let got = exp_slice(Arch::new(), &x);
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
        for s in exp_slice(Arch::new(), &x).chunks(8) {
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
    fn row_loops_match_the_scalar_formulas() {
        let x: Vec<f32> = (0..333)
            .map(|i| ((i * 7919) % 1000) as f32 / 150.0 - 3.0)
            .collect();
        let (c, n2) = lse_norm(Arch::new(), &x);
        let xd: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
        let mx = xd.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let cd = mx + xd.iter().map(|v| (v - mx).exp()).sum::<f64>().ln();
        let nd: f64 = xd.iter().map(|v| (v - cd) * (v - cd)).sum();
        assert!((f64::from(c) - cd).abs() < 1e-5 * cd.abs(), "{c} {cd}");
        assert!((n2 - nd).abs() < 1e-5 * nd, "{n2} {nd}");
        let g: Vec<f32> = (0..333).map(|i| (i % 13) as f32 / 13.0 - 0.5).collect();
        let mut dst = vec![0f32; 333];
        softmax_grad(Arch::new(), &x, &g, (c, 0.25, 1.5), &mut dst);
        for i in 0..333 {
            let want = 0.25 * (f64::from(g[i]) - (xd[i] - cd).exp() * 1.5);
            assert!(
                (f64::from(dst[i]) - want).abs() < 1e-6,
                "{i}: {} {want}",
                dst[i]
            );
        }
    }
}
