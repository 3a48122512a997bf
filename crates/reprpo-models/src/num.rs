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
        reprpo_kernels::simd::exp_f32(self)
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
    /// The slice itself when the element type is f32 (for the explicit-SIMD row loops of
    /// `reprpo_kernels::simd`), else `None`.
    fn as_f32(_x: &[Self]) -> Option<&[f32]> {
        None
    }
    /// [`Elem::as_f32`] for a mutable slice.
    fn as_f32_mut(_x: &mut [Self]) -> Option<&mut [f32]> {
        None
    }
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
impl Elem for f32 {
    type A = f32;
    #[inline(always)]
    fn up(self) -> f32 {
        self
    }
    #[inline(always)]
    fn down(a: f32) -> Self {
        a
    }
    fn as_f32(x: &[f32]) -> Option<&[f32]> {
        Some(x)
    }
    fn as_f32_mut(x: &mut [f32]) -> Option<&mut [f32]> {
        Some(x)
    }
}
elem!(f64, f64, |x| x, |a| a);
elem!(bf16, f32, bf16::to_f32, bf16::from_f32);
elem!(f16, f32, f16::to_f32, f16::from_f32);
