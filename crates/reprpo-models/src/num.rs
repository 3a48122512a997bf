//! The float types of the models crate's fused CPU kernels ([`crate::ops`], [`crate::logps`]):
//! [`Real`], the arithmetic type (f32 or f64), and [`Elem`], a stored element type with the
//! [`Real`] its arithmetic runs in (f32 and f64 as themselves, bf16 and f16 in f32).

use candle_core::WithDType;
use half::{bf16, f16};

/// The arithmetic type of a kernel (f32 or f64). Conversions to and from f64 and the storage of
/// results come from [`WithDType`].
pub(crate) trait Real: WithDType + std::ops::Neg<Output = Self> {
    const ZERO: Self;
    const NEG_INF: Self;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    const NEG_INF: Self = f32::NEG_INFINITY;
    #[inline(always)]
    fn exp(self) -> Self {
        exp_f32(self)
    }
    #[inline(always)]
    fn ln(self) -> Self {
        f32::ln(self)
    }
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    const NEG_INF: Self = f64::NEG_INFINITY;
    #[inline(always)]
    fn exp(self) -> Self {
        f64::exp(self)
    }
    #[inline(always)]
    fn ln(self) -> Self {
        f64::ln(self)
    }
}

/// A stored element type and the type its arithmetic runs in.
pub(crate) trait Elem: WithDType {
    type A: Real;
    fn up(self) -> Self::A;
    fn down(a: Self::A) -> Self;
}

macro_rules! elem {
    ($t:ty, $a:ty, $up:expr, $down:expr) => {
        impl Elem for $t {
            type A = $a;
            #[inline(always)]
            fn up(self) -> $a {
                $up(self)
            }
            #[inline(always)]
            fn down(a: $a) -> Self {
                $down(a)
            }
        }
    };
}
elem!(f32, f32, |x| x, |a| a);
elem!(f64, f64, |x| x, |a| a);
elem!(bf16, f32, bf16::to_f32, bf16::from_f32);
elem!(f16, f32, f16::to_f32, f16::from_f32);

/// `e^x` in f32 without a libm call, so loops over it vectorise: Cody-Waite range reduction and
/// Cephes' degree-6 polynomial (about 1 ulp, as `expf`). Results below the smallest normal
/// (x < -87.34, i.e. < 1.2e-38) are flushed to 0; x > 88.72 gives infinity.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let xc = x.clamp(-87.336_54, 88.722_83);
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^n for n in [-126, 128] as two normal factors 2^(n >> 1) * 2^(n - (n >> 1)).
    let n = n as i32;
    let h = n >> 1;
    let s1 = f32::from_bits(((h + 127) as u32) << 23);
    let s2 = f32::from_bits(((n - h + 127) as u32) << 23);
    let out = y * s1 * s2;
    if x < -87.336_54 {
        0.0
    } else if x > 88.722_83 {
        f32::INFINITY
    } else {
        out
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn fast_exp_is_within_two_ulp_of_std() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (super::exp_f32(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
            x += 0.001_3;
        }
        assert!(worst < 2.5e-7, "relative error {worst}");
        assert_eq!(super::exp_f32(-1e30), 0.0);
        assert_eq!(super::exp_f32(-100.0), 0.0);
        assert_eq!(super::exp_f32(1e30), f32::INFINITY);
        assert_eq!(super::exp_f32(0.0), 1.0);
    }
}
