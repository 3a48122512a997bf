//! The log-softmax row loops of the fused token reduction in explicit SIMD: `pulp` picks AVX-512,
//! AVX2 + FMA or scalar code at run time (safe dispatch; the crate itself is compiled for the
//! x86-64 baseline, where LLVM does not vectorise the exponential's polynomial across lanes: a
//! scalar `e^x` per element was 70% of the kernel's time).
//!
//! Only arguments `≤ 0` reach the exponential here (`x - max` in the forward, `x - c` with
//! `c ≥ max` in the backward): `reprpo_kernels::simd::exp_nonpos`, tested there.

use pulp::{Arch, Simd, WithSimd};
use reprpo_kernels::simd::{self, exp_f32, exp_nonpos};

/// `‖x - c‖²` of one row.
struct SqDist<'a> {
    x: &'a [f32],
    c: f32,
}

impl WithSimd for SqDist<'_> {
    type Output = f64;

    #[inline(always)]
    fn with_simd<S: Simd>(self, s: S) -> f64 {
        let (head, tail) = S::as_simd_f32s(self.x);
        let (pairs, rest) = head.as_chunks::<2>();
        let cv = s.splat_f32s(self.c);
        let zero = s.splat_f32s(0.0);
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
            n2 += f64::from((v - self.c) * (v - self.c));
        }
        n2
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

/// `(c, ‖x - c‖²)` of one f32 row, `c = max + ln Σ exp(x - max)`.
pub(crate) fn lse_norm(arch: Arch, x: &[f32]) -> (f32, f64) {
    let m = simd::max_f32(arch, x);
    let c = m + simd::sum_exp(arch, x, m).ln();
    (c, sq_dist(arch, x, c))
}

/// `‖x - c‖²` of one f32 row (`c = 0`: the squared norm, exactly), sums in f32 lanes, the lanes
/// and the tail added in f64.
pub(crate) fn sq_dist(arch: Arch, x: &[f32], c: f32) -> f64 {
    arch.dispatch(SqDist { x, c })
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

#[cfg(test)]
mod tests {
    use super::*;

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
