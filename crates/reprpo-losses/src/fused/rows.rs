//! The per-row arithmetic of the fused kernels: element and accumulator types, lane-split row
//! reductions, and for every per-position distance `d(x, y)` of [`crate::reprpo`] its value and its
//! gradient with respect to `x` on one hidden-state row pair (`x` a policy row, `y` the reference's
//! chosen row at the same position).
//!
//! Every distance starts from one statistics pass over the pair, `[‖x - y‖², x·y, ‖x‖², ‖y‖²]`
//! (which also gives the cosine diagnostics; in explicit SIMD for f32 rows and for bf16 / f16 rows
//! widened in L1-sized chunks, f32 lanes, partial sums in f64); the scalar formulas on those sums
//! run in f64. The
//! forward leaves a [`PairCache`] per pair (the sums and whatever the variant needs) so that the
//! backward reads each row once more only to write `∂d/∂x` (times the upstream multiplier `a`).
//! Gradients, with `nx = ‖x‖`, `ny = ‖y‖`, `den = nx ny`, `cos = x·y / max(den, 1e-8)`:
//!
//! - `l2`, `d = ‖x - y‖`: `(x - y) / d` (0 at `d = 0`).
//! - `direction`, `d = w (1 - cos) + (1 - w) |nx - ny|`: with `∂cos/∂x = y / den - cos x / nx²` where
//!   `den > 1e-8` (else `y / 1e-8`, the clamp's constant taking the gradient), the gradient is
//!   `-w ∂cos/∂x + (1 - w) sign(nx - ny) x / nx` (`sign(0) = 0`, the term 0 at `nx = 0`).
//! - `normalized-mse`, `d = ‖u - v‖² / H` with `u = x / max(nx, 1e-12)`, `v` likewise: with
//!   `r = 2 (u - v) / H`, the gradient is `(r - u (u·r)) / nx` (`u·r = (2/H) s`,
//!   `s = (u·u - v·v + ‖u - v‖²) / 2`, exact and free of cancellation when `x ≈ y`), and
//!   `r / 1e-12` where the clamp is active.
//! - `topk`, `d` = mean of the `k` largest `(x_h - y_h)²`: `2 (x_h - y_h) / k` on those `k` entries
//!   (ties at the `k`-th value broken by the lowest index), 0 elsewhere.
//! - `symlog`, `d = ‖s(x) - s(y)‖² / H` with `s(x) = sign(x) ln(|x| + 1e-6)`:
//!   `2 (s(x_h) - s(y_h)) s'(x_h) / H` with `s'(x) = 1 / (|x| + 1e-6)` (0 at `x = 0`).
//! - `adaptive`: `2 (x - y) / H` where the (detached) `cos > threshold`, else `-∂cos/∂x`.
//! - `ldr`, `d = ln(‖x - y‖ + eps) - c` (`c` the detached reference term of the row):
//!   `(x - y) / (‖x - y‖ (‖x - y‖ + eps))` (0 at `x = y`).

use std::cmp::Ordering;

use candle_core::{CpuStorage, WithDType};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use pulp::{Arch, Simd, WithSimd};

use crate::methods::reduce::simd::sq_dist as sq_dist_f32;

/// The accumulator type of the kernels (`f32` or `f64`).
pub(crate) trait Acc:
    Copy
    + Send
    + Sync
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
    + std::ops::AddAssign
    + 'static
{
    const ZERO: Self;
    fn to_f64(self) -> f64;
    fn from_f64(v: f64) -> Self;
    /// `ln`: [`ln_f32`] for f32 (vectorisable), `f64::ln` for f64.
    fn ln(self) -> Self;
    fn abs(self) -> Self;
    fn copysign(self, sign: Self) -> Self;
    fn total_cmp(&self, other: &Self) -> Ordering;
}

/// `ln(x)` in f32 without a libm call, so that row loops vectorise: Cephes' `logf` (range reduction
/// to `m` in `[sqrt(1/2), sqrt(2))`, a degree-9 polynomial; within 2 ulp, 0.79 seen in the test
/// below), with the
/// special values of `f32::ln` by selects: `ln(±0) = -inf`, `ln(+inf) = +inf`, NaN for NaN and
/// negative inputs. Subnormal inputs are scaled by `2^24` first.
#[inline(always)]
pub(crate) fn ln_f32(x: f32) -> f32 {
    const SQRTHF: f32 = std::f32::consts::FRAC_1_SQRT_2;
    let sub = x.to_bits() < 0x0080_0000;
    let xs = if sub { x * 16_777_216.0 } else { x };
    let bits = xs.to_bits();
    let e0 = ((bits >> 23) & 0xff) as i32 - 126 - if sub { 24 } else { 0 };
    let m0 = f32::from_bits((bits & 0x007f_ffff) | 0x3f00_0000);
    let small = m0 < SQRTHF;
    let e = (e0 - i32::from(small)) as f32;
    let m = if small { m0 + m0 - 1.0 } else { m0 - 1.0 };
    let z = m * m;
    let mut p = 7.037_683_6e-2_f32;
    p = p * m - 1.151_461e-1;
    p = p * m + 1.167_699_9e-1;
    p = p * m - 1.242_014_1e-1;
    p = p * m + 1.424_932_3e-1;
    p = p * m - 1.666_805_8e-1;
    p = p * m + 2.000_071_5e-1;
    p = p * m - 2.499_999_4e-1;
    p = p * m + 3.333_333e-1;
    let mut y = p * m * z;
    y += -2.121_944_4e-4 * e;
    y += -0.5 * z;
    let r = m + y + 0.693_359_4 * e;
    let xb = x.to_bits();
    if xb & 0x7fff_ffff == 0 {
        f32::NEG_INFINITY
    } else if xb >= 0x7f80_0000 {
        // +inf, NaN, and every negative input (sign bit set).
        if x == f32::INFINITY { x } else { f32::NAN }
    } else {
        r
    }
}

macro_rules! impl_acc {
    ($t:ty, $ln:expr) => {
        impl Acc for $t {
            const ZERO: Self = 0.0;
            #[inline(always)]
            fn to_f64(self) -> f64 {
                f64::from(self)
            }
            #[inline(always)]
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            #[inline(always)]
            fn ln(self) -> Self {
                $ln(self)
            }
            #[inline(always)]
            fn abs(self) -> Self {
                <$t>::abs(self)
            }
            #[inline(always)]
            fn copysign(self, sign: Self) -> Self {
                <$t>::copysign(self, sign)
            }
            #[inline(always)]
            fn total_cmp(&self, other: &Self) -> Ordering {
                <$t>::total_cmp(self, other)
            }
        }
    };
}
impl_acc!(f32, ln_f32);
impl_acc!(f64, f64::ln);

/// An element type of the hidden states and its accumulator.
pub(crate) trait Elem: WithDType {
    type A: Acc;
    fn up(self) -> Self::A;
    fn down(a: Self::A) -> Self;
    /// The kernel's output storage from accumulator values.
    fn out_storage(v: Vec<Self::A>) -> CpuStorage;
    /// Half precision (bf16, f16): rows are widened chunk by chunk ([`Elem::widen`]) for the
    /// explicit-SIMD row loops.
    const HALF: bool = false;
    /// The row itself when the type is f32 (for the explicit-SIMD row loops).
    fn as_f32(_x: &[Self]) -> Option<&[f32]> {
        None
    }
    /// `dst = x` widened to f32 (same length), for [`Elem::HALF`] types; others leave `dst`.
    fn widen(_x: &[Self], _dst: &mut [f32]) {}
    /// `n` zeros. For f32 / f64 `vec![0; n]` is a zeroed allocation already (the OS's zero
    /// pages, no fill pass); half-precision types get the same from a zeroed `u16` allocation.
    fn zeros(n: usize) -> Vec<Self> {
        vec![Self::zero(); n]
    }
}

macro_rules! impl_elem {
    ($t:ty, $a:ty, $up:expr, $down:expr, $store:ident, {$($extra:item)*}) => {
        impl Elem for $t {
            $($extra)*
            type A = $a;
            #[inline(always)]
            fn up(self) -> $a {
                $up(self)
            }
            #[inline(always)]
            fn down(a: $a) -> Self {
                $down(a)
            }
            fn out_storage(v: Vec<$a>) -> CpuStorage {
                CpuStorage::$store(v)
            }
        }
    };
}
impl_elem!(f32, f32, |x| x, |a| a, F32, {
    fn as_f32(x: &[f32]) -> Option<&[f32]> {
        Some(x)
    }
});
impl_elem!(f64, f64, |x| x, |a| a, F64, {});
/// bf16 -> f32: a bf16's bits are the top half of the f32's, so this is exact for every value
/// and loops of it vectorise to one unpack per vector (`bf16::to_f32` also quiets a signalling
/// NaN, a compare-and-blend per element that kept the widening loops scalar-like; a NaN stays a
/// NaN here, and any arithmetic on it quiets it).
#[inline(always)]
pub(crate) fn bf16_up(x: bf16) -> f32 {
    f32::from_bits(u32::from(x.to_bits()) << 16)
}

impl_elem!(bf16, f32, bf16_up, bf16::from_f32, F32, {
    const HALF: bool = true;
    fn widen(x: &[bf16], dst: &mut [f32]) {
        for (d, &v) in dst.iter_mut().zip(x) {
            *d = bf16_up(v);
        }
    }
    fn zeros(n: usize) -> Vec<bf16> {
        bytemuck::allocation::cast_vec(vec![0u16; n])
    }
});
impl_elem!(f16, f32, f16::to_f32, f16::from_f32, F32, {
    const HALF: bool = true;
    fn widen(x: &[f16], dst: &mut [f32]) {
        x.convert_to_f32_slice(dst);
    }
    fn zeros(n: usize) -> Vec<f16> {
        bytemuck::allocation::cast_vec(vec![0u16; n])
    }
});

/// `[‖x - y‖², x·y, ‖x‖², ‖y‖²]` of two f32 rows of one length, in explicit SIMD (f32 lanes,
/// FMA where the CPU has it; `pulp` dispatch).
struct Stats4Simd<'a>(&'a [f32], &'a [f32]);

impl WithSimd for Stats4Simd<'_> {
    type Output = [f32; 4];

    #[inline(always)]
    fn with_simd<S: Simd>(self, s: S) -> [f32; 4] {
        let (xh, xt) = S::as_simd_f32s(self.0);
        let (yh, yt) = S::as_simd_f32s(self.1);
        let z = s.splat_f32s(0.0);
        let (mut dd, mut dot, mut nx, mut ny) = (z, z, z, z);
        for (&a, &b) in xh.iter().zip(yh) {
            let d = s.sub_f32s(a, b);
            dd = s.mul_add_f32s(d, d, dd);
            dot = s.mul_add_f32s(a, b, dot);
            nx = s.mul_add_f32s(a, a, nx);
            ny = s.mul_add_f32s(b, b, ny);
        }
        let mut out = [dd, dot, nx, ny].map(|v| s.reduce_sum_f32s(v));
        for (&a, &b) in xt.iter().zip(yt) {
            let d = a - b;
            out[0] += d * d;
            out[1] += a * b;
            out[2] += a * a;
            out[3] += b * b;
        }
        out
    }
}

/// Widened chunks of half-precision rows, short enough to stay in L1.
const CHUNK: usize = 512;

/// `f` of two f32 rows of one length (4 sums), or of half-precision rows widened chunk by chunk
/// (partial sums added in f64); `None` for f64 rows.
#[inline(always)]
fn simd_pair<E: Elem>(
    x: &[E],
    y: &[E],
    f: impl Fn(&[f32], &[f32]) -> [f32; 4],
) -> Option<[f64; 4]> {
    if let (Some(a), Some(b)) = (E::as_f32(x), E::as_f32(y)) {
        return Some(f(a, b).map(f64::from));
    }
    if !E::HALF || x.len() != y.len() {
        return None;
    }
    let (mut bx, mut by) = ([0f32; CHUNK], [0f32; CHUNK]);
    let mut out = [0f64; 4];
    for (cx, cy) in x.chunks(CHUNK).zip(y.chunks(CHUNK)) {
        let n = cx.len();
        E::widen(cx, &mut bx[..n]);
        E::widen(cy, &mut by[..n]);
        for (o, p) in out.iter_mut().zip(f(&bx[..n], &by[..n])) {
            *o += f64::from(p);
        }
    }
    Some(out)
}

/// [`Stats4Simd`] of f32 or half-precision rows (`None` for f64).
#[inline(always)]
fn stats4_simd<E: Elem>(x: &[E], y: &[E]) -> Option<[f64; 4]> {
    let arch = Arch::new();
    simd_pair(x, y, |a, b| arch.dispatch(Stats4Simd(a, b)))
}

/// `‖x‖²` of one row: explicit SIMD for f32 and half-precision rows (widened chunk by chunk,
/// partial sums in f64), eight lanes for f64.
#[inline(always)]
pub(crate) fn sum_sq<E: Elem>(x: &[E]) -> f64 {
    let arch = Arch::new();
    if let Some(a) = E::as_f32(x) {
        return sq_dist_f32(arch, a, 0.0);
    }
    if !E::HALF {
        return lane_sum(x, x, |a, _| a * a).to_f64();
    }
    let mut buf = [0f32; CHUNK];
    x.chunks(CHUNK)
        .map(|c| {
            E::widen(c, &mut buf[..c.len()]);
            sq_dist_f32(arch, &buf[..c.len()], 0.0)
        })
        .sum()
}

/// Lanes of the per-row accumulators (independent sums, so the loops vectorise).
const LANES: usize = 8;

#[inline(always)]
fn hsum<A: Acc>(v: [A; LANES]) -> A {
    let mut s = A::ZERO;
    for x in v {
        s += x;
    }
    s
}

/// `sum_h f(x_h, y_h)` over one row pair, in eight lanes.
#[inline(always)]
fn lane_sum<E: Elem>(x: &[E], y: &[E], f: impl Fn(E::A, E::A) -> E::A) -> E::A {
    let mut acc = [E::A::ZERO; LANES];
    let (cx, rx) = x.as_chunks::<LANES>();
    let (cy, ry) = y.as_chunks::<LANES>();
    for (x8, y8) in cx.iter().zip(cy) {
        for i in 0..LANES {
            acc[i] += f(x8[i].up(), y8[i].up());
        }
    }
    let mut s = hsum(acc);
    for (&a, &b) in rx.iter().zip(ry) {
        s += f(a.up(), b.up());
    }
    s
}

/// `sum_h f(x_h, y_h)` over two accumulator rows, in eight lanes.
#[inline(always)]
fn lane_sum_acc<A: Acc>(x: &[A], y: &[A], f: impl Fn(A, A) -> A) -> A {
    let mut acc = [A::ZERO; LANES];
    let (cx, rx) = x.as_chunks::<LANES>();
    let (cy, ry) = y.as_chunks::<LANES>();
    for (x8, y8) in cx.iter().zip(cy) {
        for i in 0..LANES {
            acc[i] += f(x8[i], y8[i]);
        }
    }
    let mut s = hsum(acc);
    for (&a, &b) in rx.iter().zip(ry) {
        s += f(a, b);
    }
    s
}

/// `[‖x - y‖², x·y, ‖x‖², ‖y‖²]` of one row pair.
#[inline(always)]
pub(crate) fn stats4<E: Elem>(x: &[E], y: &[E]) -> [f64; 4] {
    if let Some(st) = stats4_simd(x, y) {
        return st;
    }
    let z = [E::A::ZERO; LANES];
    let (mut dd, mut dot, mut nx, mut ny) = (z, z, z, z);
    let (cx, rx) = x.as_chunks::<LANES>();
    let (cy, ry) = y.as_chunks::<LANES>();
    for (x8, y8) in cx.iter().zip(cy) {
        let x = x8.map(E::up);
        let y = y8.map(E::up);
        for i in 0..LANES {
            let d = x[i] - y[i];
            dd[i] += d * d;
        }
        for i in 0..LANES {
            dot[i] += x[i] * y[i];
        }
        for i in 0..LANES {
            nx[i] += x[i] * x[i];
        }
        for i in 0..LANES {
            ny[i] += y[i] * y[i];
        }
    }
    let mut out = [hsum(dd), hsum(dot), hsum(nx), hsum(ny)];
    for (&x, &y) in rx.iter().zip(ry) {
        let (x, y) = (x.up(), y.up());
        let d = x - y;
        out[0] += d * d;
        out[1] += x * y;
        out[2] += x * x;
        out[3] += y * y;
    }
    out.map(Acc::to_f64)
}

/// `[‖x - y‖², x·y, ‖x‖²]` of one row pair (`‖y‖²` is known from the chosen pair).
#[inline(always)]
pub(crate) fn stats3<E: Elem>(x: &[E], y: &[E]) -> [f64; 3] {
    if let Some([dd, dot, nx, _]) = stats4_simd(x, y) {
        return [dd, dot, nx];
    }
    let z = [E::A::ZERO; LANES];
    let (mut dd, mut dot, mut nx) = (z, z, z);
    let (cx, rx) = x.as_chunks::<LANES>();
    let (cy, ry) = y.as_chunks::<LANES>();
    for (x8, y8) in cx.iter().zip(cy) {
        let x = x8.map(E::up);
        let y = y8.map(E::up);
        for i in 0..LANES {
            let d = x[i] - y[i];
            dd[i] += d * d;
        }
        for i in 0..LANES {
            dot[i] += x[i] * y[i];
        }
        for i in 0..LANES {
            nx[i] += x[i] * x[i];
        }
    }
    let mut out = [hsum(dd), hsum(dot), hsum(nx)];
    for (&x, &y) in rx.iter().zip(ry) {
        let (x, y) = (x.up(), y.up());
        let d = x - y;
        out[0] += d * d;
        out[1] += x * y;
        out[2] += x * x;
    }
    out.map(Acc::to_f64)
}

/// `‖x - y‖²` of one row pair.
#[inline(always)]
pub(crate) fn sq_dist<E: Elem>(x: &[E], y: &[E]) -> f64 {
    lane_sum(x, y, |a, b| {
        let d = a - b;
        d * d
    })
    .to_f64()
}

/// `cos = dot / max(‖x‖ ‖y‖, 1e-8)` from the squared norms.
#[inline(always)]
pub(crate) fn cos_of(dot: f64, nx2: f64, ny2: f64) -> f64 {
    dot / (nx2.sqrt() * ny2.sqrt()).max(1e-8)
}

/// `sign(x) ln(|x| + 1e-6)`, 0 at 0 (written as a product with `copysign(1, x)` and one select so
/// that loops over it vectorise; a chain of two selects did not).
#[inline(always)]
fn symlog<A: Acc>(x: A) -> A {
    let l = (x.abs() + A::from_f64(1e-6)).ln() * A::from_f64(1.0).copysign(x);
    if x == A::ZERO { A::ZERO } else { l }
}

/// A per-position distance `d(x, y)` over the hidden dimension (see the [module](self)).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum RowDist {
    /// `‖x - y‖` (original, rr-only).
    L2,
    /// `w (1 - cos) + (1 - w) |‖x‖ - ‖y‖|`.
    Direction { w: f64 },
    /// `mse(x / ‖x‖, y / ‖y‖)`.
    NormalizedMse,
    /// Mean of the `k` largest squared differences.
    Topk { k: usize },
    /// `mse(symlog(x), symlog(y))`.
    Symlog,
    /// `mse(x, y)` where the detached `cos > threshold`, else `1 - cos`.
    Adaptive { threshold: f64 },
    /// `ln(‖x - y‖ + eps) - c`, `c` a detached per-row constant.
    Ldr { eps: f64 },
}

/// What the forward of one row pair leaves for its backward.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PairCache {
    /// `‖x - y‖²`.
    dd: f64,
    /// `x·y`.
    dot: f64,
    /// `‖x‖²`.
    nx2: f64,
    /// `‖y‖²`.
    ny2: f64,
    /// Variant-specific: `‖u - v‖²` (normalized-mse), the `k`-th largest squared difference
    /// (topk), 1 on the mse branch (adaptive).
    q: f64,
    /// topk: how many entries equal to `q` are in the top `k`.
    ties: usize,
}

/// Scratch rows of one worker.
pub(crate) struct Scratch<A> {
    /// `symlog(y)` of the current row.
    sy: Vec<A>,
    /// `symlog(x)` of the current pair.
    sx: Vec<A>,
    /// Squared differences (topk).
    sq: Vec<A>,
    /// A copy of `sq` that selection reorders (topk).
    sel: Vec<A>,
}

impl<A: Acc> Scratch<A> {
    pub(crate) fn new(dist: RowDist, h: usize) -> Self {
        let n = |on: bool| if on { vec![A::ZERO; h] } else { Vec::new() };
        let topk = matches!(dist, RowDist::Topk { .. });
        Scratch {
            sy: n(dist == RowDist::Symlog),
            sx: n(dist == RowDist::Symlog),
            sq: n(topk),
            sel: n(topk),
        }
    }

    /// Prepares the per-row data of the reference row `y` that both pairs of the row share.
    #[inline(always)]
    pub(crate) fn load_reference<E: Elem<A = A>>(&mut self, dist: RowDist, y: &[E]) {
        if dist == RowDist::Symlog {
            for (o, &v) in self.sy.iter_mut().zip(y) {
                *o = symlog(v.up());
            }
        }
    }
}

/// The squared difference of one element, the same expression in forward and backward.
#[inline(always)]
fn sq<A: Acc>(a: A, b: A) -> A {
    let d = a - b;
    d * d
}

impl RowDist {
    /// `d(x, y)` of one row pair, given its statistics `[‖x - y‖², x·y, ‖x‖², ‖y‖²]`; `c` is the
    /// row's detached constant (ldr). Returns the value and the cache for the backward.
    /// `scratch` must hold [`Scratch::load_reference`] of `y` for symlog.
    #[inline(always)]
    pub(crate) fn value<E: Elem>(
        self,
        x: &[E],
        y: &[E],
        st: [f64; 4],
        c: f64,
        scratch: &mut Scratch<E::A>,
    ) -> (f64, PairCache) {
        let [dd, dot, nx2, ny2] = st;
        let mut pc = PairCache {
            dd,
            dot,
            nx2,
            ny2,
            q: 0.0,
            ties: 0,
        };
        let h = x.len() as f64;
        let cos = cos_of(dot, nx2, ny2);
        let d = match self {
            RowDist::L2 => dd.sqrt(),
            RowDist::Direction { w } => {
                w * (1.0 - cos) + (1.0 - w) * (nx2.sqrt() - ny2.sqrt()).abs()
            }
            RowDist::Adaptive { threshold } => {
                if cos > threshold {
                    pc.q = 1.0;
                    dd / h
                } else {
                    1.0 - cos
                }
            }
            RowDist::Ldr { eps } => (dd.sqrt() + eps).ln() - c,
            RowDist::NormalizedMse => {
                let ix = E::A::from_f64(1.0 / nx2.sqrt().max(1e-12));
                let iy = E::A::from_f64(1.0 / ny2.sqrt().max(1e-12));
                let s = lane_sum(x, y, |a, b| sq(a * ix, b * iy)).to_f64();
                pc.q = s;
                s / h
            }
            RowDist::Symlog => {
                // symlog(x) into scratch by a plain map (which vectorises), then a lane sum.
                for (o, &v) in scratch.sx.iter_mut().zip(x) {
                    *o = symlog(v.up());
                }
                lane_sum_acc(&scratch.sx, &scratch.sy, sq).to_f64() / h
            }
            RowDist::Topk { k } => {
                let k = k.clamp(1, x.len().max(1));
                for ((o, &a), &b) in scratch.sq.iter_mut().zip(x).zip(y) {
                    *o = sq(a.up(), b.up());
                }
                scratch.sel.copy_from_slice(&scratch.sq);
                let (top, kth, _) = scratch
                    .sel
                    .select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
                let kth = *kth;
                let mut sum = kth;
                for &v in top.iter() {
                    sum += v;
                }
                let above = scratch.sq.iter().filter(|&&v| v > kth).count();
                pc.q = kth.to_f64();
                pc.ties = k - above.min(k);
                sum.to_f64() / k as f64
            }
        };
        (d, pc)
    }

    /// Writes `a ∂d/∂x` of one row pair into `out`, from the forward's cache. `scratch` must hold
    /// [`Scratch::load_reference`] of `y` for symlog.
    #[inline(always)]
    pub(crate) fn grad<E: Elem>(
        self,
        x: &[E],
        y: &[E],
        a: f64,
        pc: &PairCache,
        scratch: &Scratch<E::A>,
        out: &mut [E],
    ) {
        let h = x.len() as f64;
        let (nx, ny) = (pc.nx2.sqrt(), pc.ny2.sqrt());
        // ∂cos/∂x = cy y - cx x.
        let cos_parts = || {
            let den = nx * ny;
            if den > 1e-8 {
                (pc.dot / den / (nx * nx), 1.0 / den)
            } else {
                (0.0, 1e8)
            }
        };
        match self {
            RowDist::L2 => {
                let d = pc.dd.sqrt();
                let f = if d > 0.0 { a / d } else { 0.0 };
                scaled_diff(x, y, f, out);
            }
            RowDist::Ldr { eps } => {
                let d = pc.dd.sqrt();
                let f = if d > 0.0 { a / (d * (d + eps)) } else { 0.0 };
                scaled_diff(x, y, f, out);
            }
            RowDist::Direction { w } => {
                let (cx, cy) = cos_parts();
                let sg = if nx > 0.0 { sign0(nx - ny) / nx } else { 0.0 };
                combine(x, y, a * (w * cx + (1.0 - w) * sg), -a * w * cy, out);
            }
            RowDist::Adaptive { .. } => {
                if pc.q == 1.0 {
                    scaled_diff(x, y, 2.0 * a / h, out);
                } else {
                    let (cx, cy) = cos_parts();
                    combine(x, y, a * cx, -a * cy, out);
                }
            }
            RowDist::NormalizedMse => {
                let (nxc, nyc) = (nx.max(1e-12), ny.max(1e-12));
                let s = if nx > 1e-12 {
                    let (uu, vv) = ((nx / nxc).powi(2), (ny / nyc).powi(2));
                    (uu - vv + pc.q) / 2.0
                } else {
                    0.0
                };
                // u - v - s u = (x - y) / nxc + y (1/nxc - 1/nyc) - s x / nxc: no cancellation
                // between two rounded products where x ≈ y.
                let f = E::A::from_f64(a * 2.0 / h / nxc);
                let ix = E::A::from_f64(1.0 / nxc);
                let dxy = E::A::from_f64((nyc - nxc) / (nxc * nyc));
                let six = E::A::from_f64(s / nxc);
                for ((o, &p), &q) in out.iter_mut().zip(x).zip(y) {
                    let (p, q) = (p.up(), q.up());
                    *o = E::down(f * ((p - q) * ix + q * dxy - six * p));
                }
            }
            RowDist::Symlog => {
                let f = E::A::from_f64(2.0 * a / h);
                let eps = E::A::from_f64(1e-6);
                for ((o, &p), &sb) in out.iter_mut().zip(x).zip(&scratch.sy) {
                    let v = p.up();
                    let g = f * (symlog(v) - sb) / (v.abs() + eps);
                    *o = E::down(if v == E::A::ZERO { E::A::ZERO } else { g });
                }
            }
            RowDist::Topk { k } => {
                let k = k.clamp(1, x.len().max(1));
                let f = E::A::from_f64(2.0 * a / k as f64);
                let kth = E::A::from_f64(pc.q);
                let mut ties = pc.ties;
                for ((o, &p), &q) in out.iter_mut().zip(x).zip(y) {
                    let (p, q) = (p.up(), q.up());
                    let v = sq(p, q);
                    let take = if v > kth {
                        true
                    } else if v == kth && ties > 0 {
                        ties -= 1;
                        true
                    } else {
                        false
                    };
                    *o = if take {
                        E::down(f * (p - q))
                    } else {
                        E::zero()
                    };
                }
            }
        }
    }
}

/// `sign(v)` with `sign(0) = 0`.
#[inline(always)]
fn sign0(v: f64) -> f64 {
    if v > 0.0 {
        1.0
    } else if v < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// `out = f (x - y)` elementwise.
#[inline(always)]
fn scaled_diff<E: Elem>(x: &[E], y: &[E], f: f64, out: &mut [E]) {
    if f == 0.0 {
        out.fill(E::zero());
        return;
    }
    let f = E::A::from_f64(f);
    for ((o, &a), &b) in out.iter_mut().zip(x).zip(y) {
        *o = E::down(f * (a.up() - b.up()));
    }
}

/// `out = cx x + cy y` elementwise.
#[inline(always)]
fn combine<E: Elem>(x: &[E], y: &[E], cx: f64, cy: f64, out: &mut [E]) {
    let (cx, cy) = (E::A::from_f64(cx), E::A::from_f64(cy));
    for ((o, &a), &b) in out.iter_mut().zip(x).zip(y) {
        *o = E::down(cx * a.up() + cy * b.up());
    }
}

#[cfg(test)]
mod tests {
    use super::{Elem, bf16_up, ln_f32};
    use half::{bf16, f16};

    /// Distance in units in the last place of the f32 nearest to the exact value.
    fn ulps(got: f32, exact: f64) -> f64 {
        let e = exact as f32;
        let ulp = (f32::from_bits(e.abs().to_bits() + 1) - e.abs()) as f64;
        (got as f64 - exact).abs() / ulp
    }

    #[test]
    fn ln_f32_within_two_ulp_of_the_exact_logarithm() {
        let mut worst: f64 = 0.0;
        // Every 97th f32 bit pattern from the smallest subnormal to the largest finite value,
        // plus the neighbourhood of 1 (where ln is near 0).
        let around_one = (0..20_000u32).map(|i| f32::from_bits(0x3f7f_0000 + i * 13));
        let all = (1..0x7f80_0000u32).step_by(97).map(f32::from_bits);
        for x in all.chain(around_one) {
            let exact = (x as f64).ln();
            let got = ln_f32(x);
            let e = if exact == 0.0 {
                got.abs() as f64
            } else {
                ulps(got, exact)
            };
            assert!(
                e <= 2.0,
                "ln_f32({x:e}) = {got:e}, exact {exact:e}: {e} ulp"
            );
            worst = worst.max(e);
        }
        eprintln!("ln_f32: worst {worst:.2} ulp");
        assert_eq!(ln_f32(0.0), f32::NEG_INFINITY);
        assert_eq!(ln_f32(-0.0), f32::NEG_INFINITY);
        assert_eq!(ln_f32(f32::INFINITY), f32::INFINITY);
        assert!(ln_f32(f32::NAN).is_nan());
        assert!(ln_f32(-1.0).is_nan());
        assert!(ln_f32(f32::NEG_INFINITY).is_nan());
        assert_eq!(ln_f32(1.0), 0.0);
    }

    /// `bf16_up` is `bf16::to_f32` bit for bit on every one of the 65536 bf16 values but the
    /// NaNs, which stay NaN; `widen` is it element by element; `zeros` are zeros.
    #[test]
    fn bf16_widening_is_exact_and_zeros_are_zero() {
        let all: Vec<bf16> = (0..=u16::MAX).map(bf16::from_bits).collect();
        let mut wide = vec![0f32; all.len()];
        <bf16 as Elem>::widen(&all, &mut wide);
        for (v, w) in all.iter().zip(&wide) {
            if v.is_nan() {
                assert!(w.is_nan() && bf16_up(*v).is_nan(), "{:#06x}", v.to_bits());
            } else {
                assert_eq!(w.to_bits(), v.to_f32().to_bits(), "{:#06x}", v.to_bits());
                assert_eq!(bf16_up(*v).to_bits(), v.to_f32().to_bits());
            }
        }
        assert!(<bf16 as Elem>::zeros(1000).iter().all(|z| z.to_bits() == 0));
        assert!(<f16 as Elem>::zeros(1000).iter().all(|z| z.to_bits() == 0));
    }
}
