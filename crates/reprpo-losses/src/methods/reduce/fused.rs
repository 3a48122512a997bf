//! The fused CPU kernel of the sink-filtered token mean ([`super`]), optionally of the per-token
//! log-softmax first (the `rank` loss's `reduce(log_softmax_h(o))`), with its own backward.
//!
//! The written-out chain (the path other devices take, and the reference of the tests) makes one
//! full-size temporary per candle op: the squares for the norms, `x · m`, and in backward the
//! broadcast gradient and its product with the mask, plus for `rank` five more for the
//! log-softmax and their backward. This kernel reads each `[H]` row of `x` twice in the forward
//! (its norm, then the masked sum; both while the row is in cache for the log-softmax's max,
//! `ln Σ exp` and norm) and once in the backward, where it writes the gradient:
//!
//! - forward: per row `(b, t)`, `y = x` or `y = x - c` with `c = max_h x + ln Σ_h exp(x_h - max)`,
//!   and `g[b,t] = ‖y‖`; per example the threshold `μ_b + θ s_b` over all `T` (unbiased), the
//!   weights `w[b,t] = m'[b,t] / Σ_t m'[b,t]`; then `out[b,:] = Σ_t m' y / Σ_t m'` over the rows
//!   with `m' ≠ 0` (the others are not read);
//! - backward of `G = ∂L/∂out` `[B, H]`: `∂L/∂x[b,t,:] = w[b,t] G[b,:]`, or for the log-softmax
//!   `w[b,t] (G[b,:] - softmax(x[b,t,:]) Σ_h G[b,h])`; rows with `w = 0` get 0.
//!
//! Accumulation in f32 for f32, bf16 and f16 inputs (f64 for f64), the per-example statistics in
//! f64; the output in the input's dtype, as the chain's. The log-softmax's row loops run in
//! explicit SIMD chosen at run time (`simd.rs`); the exponential there and in the scalar tails is
//! Cephes' f32 polynomial ([`exp_f32`], within 2 ulp). Differences from the chain: non-finite
//! values in rows the filtered mask drops do not reach the output (the chain multiplies them by
//! 0; the reference asserts finite activations before its loss), and in half precision the
//! denominators are exact (the chain sums the mask in bf16).

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Storage, Tensor, WithDType};
use half::{bf16, f16};
use pulp::Arch;
use rayon::prelude::*;
use reprpo_kernels::simd::exp_f32;

use crate::error::Result;
use crate::fused::rows::{Acc, Elem};

/// Below this many input elements the kernel runs on the calling thread.
const PAR_MIN_ELEMS: usize = 1 << 15;
/// Features per task of the forward's masked sum.
const H_CHUNK: usize = 512;
/// Lanes of the row reductions (independent sums, so the loops vectorise).
const LANES: usize = 8;

/// What is reduced: the activations, or their log-softmax over the features.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pre {
    /// `y = x`.
    Identity,
    /// `y = log_softmax_h(x)`.
    LogSoftmax,
}

/// The accumulator arithmetic the kernel needs beyond [`Acc`].
trait RowAcc: Acc {
    fn exp(self) -> Self;
    fn max(self, o: Self) -> Self;
}

impl RowAcc for f32 {
    #[inline(always)]
    fn exp(self) -> Self {
        exp_f32(self)
    }
    #[inline(always)]
    fn max(self, o: Self) -> Self {
        if o > self { o } else { self }
    }
}

impl RowAcc for f64 {
    #[inline(always)]
    fn exp(self) -> Self {
        f64::exp(self)
    }
    #[inline(always)]
    fn max(self, o: Self) -> Self {
        if o > self { o } else { self }
    }
}

/// An element type of the kernel: its accumulator has [`RowAcc`], and its log-softmax row loops
/// (scalar by default; f32, bf16 and f16 in explicit SIMD through [`super::simd`]).
trait RowElem: Elem<A: RowAcc> {
    /// `(c, ‖x - c‖²)` of one row, `c = max + ln Σ exp(x - max)`.
    fn lse_norm(_arch: Arch, x: &[Self]) -> (Self::A, f64) {
        let mx = lane_max(x);
        let s = lane_sum(x, |v| (v - mx).exp());
        let c = mx + s.ln();
        let n2 = lane_sum(x, |v| {
            let y = v - c;
            y * y
        });
        (c, n2.to_f64())
    }

    /// `dst = w (g - exp(x - c) sg)` over one row.
    fn softmax_grad(
        _arch: Arch,
        x: &[Self],
        g: &[Self::A],
        (c, w, sg): (Self::A, Self::A, Self::A),
        dst: &mut [Self],
    ) {
        for ((d, &gv), &xv) in dst.iter_mut().zip(g).zip(x) {
            *d = Self::down(w * (gv - (xv.up() - c).exp() * sg));
        }
    }
}

impl RowElem for f64 {}

impl RowElem for f32 {
    fn lse_norm(arch: Arch, x: &[f32]) -> (f32, f64) {
        super::simd::lse_norm(arch, x)
    }

    fn softmax_grad(arch: Arch, x: &[f32], g: &[f32], cws: (f32, f32, f32), dst: &mut [f32]) {
        super::simd::softmax_grad(arch, x, g, cws, dst);
    }
}

/// The SIMD loops for a 16-bit element type, through an f32 copy of the row.
macro_rules! half_row_elem {
    ($t:ty) => {
        impl RowElem for $t {
            fn lse_norm(arch: Arch, x: &[$t]) -> (f32, f64) {
                let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
                super::simd::lse_norm(arch, &xf)
            }

            fn softmax_grad(arch: Arch, x: &[$t], g: &[f32], cws: (f32, f32, f32), dst: &mut [$t]) {
                let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
                let mut out = vec![0f32; x.len()];
                super::simd::softmax_grad(arch, &xf, g, cws, &mut out);
                for (d, o) in dst.iter_mut().zip(out) {
                    *d = <$t>::from_f32(o);
                }
            }
        }
    };
}
half_row_elem!(bf16);
half_row_elem!(f16);

#[inline(always)]
fn hsum<A: Acc>(v: [A; LANES]) -> A {
    let mut s = A::ZERO;
    for x in v {
        s += x;
    }
    s
}

/// `sum_h f(x_h)` over one row, in eight lanes.
#[inline(always)]
fn lane_sum<E: RowElem>(x: &[E], f: impl Fn(E::A) -> E::A) -> E::A {
    let mut acc = [E::A::ZERO; LANES];
    let (cx, rx) = x.as_chunks::<LANES>();
    for x8 in cx {
        for i in 0..LANES {
            acc[i] += f(x8[i].up());
        }
    }
    let mut s = hsum(acc);
    for &a in rx {
        s += f(a.up());
    }
    s
}

/// `max_h x_h` of one row, in eight lanes (NaN entries are skipped; the row's sums then carry
/// them).
#[inline(always)]
fn lane_max<E: RowElem>(x: &[E]) -> E::A {
    let first = x.first().map_or(E::A::ZERO, |v| v.up());
    let mut acc = [first; LANES];
    let (cx, rx) = x.as_chunks::<LANES>();
    for x8 in cx {
        for i in 0..LANES {
            acc[i] = acc[i].max(x8[i].up());
        }
    }
    let mut m = first;
    for a in acc {
        m = m.max(a);
    }
    for &a in rx {
        m = m.max(a.up());
    }
    m
}

/// `c` of one row (0 for [`Pre::Identity`]) and `‖y‖²` with `y = x - c`.
#[inline(always)]
fn row_stats<E: RowElem>(arch: Arch, pre: Pre, x: &[E]) -> (E::A, f64) {
    match pre {
        Pre::Identity => (E::A::ZERO, crate::fused::rows::sum_sq(x)),
        Pre::LogSoftmax => E::lse_norm(arch, x),
    }
}

/// What the forward leaves for the backward.
struct Cache {
    /// `w[b,t] = m'[b,t] / Σ_t m'[b,t]` (0 where `m' = 0`, NaN for an example with no counted
    /// row).
    w: Vec<f64>,
    /// The log-softmax offset `c` per row (empty for [`Pre::Identity`]).
    c: Vec<f64>,
}

/// The op: `x` `[B, T, H]` and the mask `[B, T]` -> `[B, H]`.
struct SinkMean {
    pre: Pre,
    threshold: f64,
    cache: Mutex<Option<Cache>>,
}

impl SinkMean {
    fn fwd<E: RowElem>(
        &self,
        x: &[E],
        m: &[f64],
        (b, t, h): (usize, usize, usize),
    ) -> candle_core::Result<Vec<E>> {
        let rows = b * t;
        let par = x.len() >= PAR_MIN_ELEMS;
        // Pass 1: per-row offset and norm.
        let arch = Arch::new();
        let stats = |r: usize| row_stats(arch, self.pre, &x[r * h..(r + 1) * h]);
        let st: Vec<(E::A, f64)> = if par {
            (0..rows).into_par_iter().map(stats).collect()
        } else {
            (0..rows).map(stats).collect()
        };
        // Per example: the sink threshold, the filtered mask and its sum.
        let mut w = vec![0f64; rows];
        let mut den = vec![0f64; b];
        for bi in 0..b {
            let g: Vec<f64> = (0..t).map(|ti| st[bi * t + ti].1.sqrt()).collect();
            let mu = g.iter().sum::<f64>() / t as f64;
            let var = g.iter().map(|v| (v - mu) * (v - mu)).sum::<f64>() / (t as f64 - 1.0);
            let thr = mu + var.sqrt() * self.threshold;
            for ti in 0..t {
                let sink = g[ti] > thr;
                let mp = if sink { 0.0 } else { m[bi * t + ti] };
                w[bi * t + ti] = mp;
                den[bi] += mp;
            }
        }
        // Pass 2: out[b, h0..h1] = Σ_t m' y / Σ_t m', over the rows with m' ≠ 0.
        let chunks = h.div_ceil(H_CHUNK).max(1);
        let mut out = vec![E::zero(); b * h];
        let task = |(k, dst): (usize, &mut [E])| {
            let (bi, ci) = (k / chunks, k % chunks);
            let h0 = ci * H_CHUNK;
            let mut acc = vec![E::A::ZERO; dst.len()];
            for ti in 0..t {
                let r = bi * t + ti;
                let mp = w[r];
                if mp == 0.0 {
                    continue;
                }
                let (mp, c) = (E::A::from_f64(mp), st[r].0);
                let row = &x[r * h + h0..r * h + h0 + dst.len()];
                for (a, &v) in acc.iter_mut().zip(row) {
                    *a += mp * (v.up() - c);
                }
            }
            let d = E::A::from_f64(den[bi]);
            for (o, a) in dst.iter_mut().zip(acc) {
                *o = E::down(a / d);
            }
        };
        // Destination pieces: row b's features [h0, h1), in (b, chunk) order.
        let pieces: Vec<&mut [E]> = out
            .chunks_mut(h.max(1))
            .flat_map(|row| row.chunks_mut(H_CHUNK))
            .collect();
        if par {
            pieces.into_par_iter().enumerate().for_each(task);
        } else {
            pieces.into_iter().enumerate().for_each(task);
        }
        for bi in 0..b {
            for v in &mut w[bi * t..(bi + 1) * t] {
                *v /= den[bi];
            }
        }
        let c = match self.pre {
            Pre::Identity => Vec::new(),
            Pre::LogSoftmax => st.iter().map(|s| s.0.to_f64()).collect(),
        };
        let Ok(mut cache) = self.cache.lock() else {
            candle_core::bail!("sink-token-mean: cache lock poisoned");
        };
        *cache = Some(Cache { w, c });
        Ok(out)
    }

    /// `∂L/∂x` from `G` (`[B, H]`, contiguous).
    fn bwd_typed<E: RowElem>(
        &self,
        x: &Tensor,
        g: &Tensor,
        (b, t, h): (usize, usize, usize),
    ) -> candle_core::Result<Tensor> {
        let Ok(cache) = self.cache.lock() else {
            candle_core::bail!("sink-token-mean: cache lock poisoned");
        };
        let Some(cache) = cache.as_ref() else {
            candle_core::bail!("sink-token-mean: backward without its forward");
        };
        let mut gx = E::zeros(b * t * h);
        let par = gx.len() >= PAR_MIN_ELEMS;
        let arch = Arch::new();
        with_data::<E, _>(g, |gs| {
            with_data::<E, _>(x, |xs| {
                let grow: Vec<Vec<E::A>> = (0..b)
                    .map(|bi| gs[bi * h..(bi + 1) * h].iter().map(|v| v.up()).collect())
                    .collect();
                let gsum: Vec<E::A> = grow.iter().map(|r| hsum_vec(r)).collect();
                let shared = shared_rows::<E>(self.pre, &cache.w, &grow, t);
                let row = |(r, dst): (usize, &mut [E])| {
                    let w = cache.w[r];
                    if w == 0.0 {
                        return;
                    }
                    let bi = r / t;
                    let (wa, gr) = (E::A::from_f64(w), &grow[bi]);
                    match self.pre {
                        Pre::Identity => match shared[bi].iter().find(|(ws, _)| *ws == w) {
                            Some((_, same)) => dst.copy_from_slice(same),
                            None => {
                                for (d, &gv) in dst.iter_mut().zip(gr) {
                                    *d = E::down(wa * gv);
                                }
                            }
                        },
                        Pre::LogSoftmax => {
                            let c = E::A::from_f64(cache.c[r]);
                            let xr = &xs[r * h..(r + 1) * h];
                            E::softmax_grad(arch, xr, gr, (c, wa, gsum[bi]), dst);
                        }
                    }
                };
                if par {
                    gx.par_chunks_mut(h.max(1)).enumerate().for_each(row);
                } else {
                    gx.chunks_mut(h.max(1)).enumerate().for_each(row);
                }
                Ok(())
            })
        })?;
        Tensor::from_vec(gx, x.shape(), x.device())
    }
}

/// Distinct non-zero row weights per example that [`shared_rows`] precomputes, at most.
const SHARED_WEIGHTS: usize = 4;

/// For [`Pre::Identity`]: per example, its distinct non-zero row weights `w` with the gradient
/// row `w G[b]` in the input's dtype, computed once (every counted row of an example with a 0/1
/// mask has the same weight, so the backward copies one row instead of rounding each element of
/// each row again). Empty for an example with more than [`SHARED_WEIGHTS`] distinct weights
/// (fractional masks; computed row by row) and for the log-softmax.
fn shared_rows<E: RowElem>(
    pre: Pre,
    w: &[f64],
    grow: &[Vec<E::A>],
    t: usize,
) -> Vec<Vec<(f64, Vec<E>)>> {
    grow.iter()
        .enumerate()
        .map(|(bi, g)| {
            let mut ws: Vec<f64> = Vec::new();
            for &wr in &w[bi * t..(bi + 1) * t] {
                if wr != 0.0 && !ws.contains(&wr) {
                    ws.push(wr);
                }
            }
            if pre != Pre::Identity || ws.len() > SHARED_WEIGHTS {
                return Vec::new();
            }
            ws.into_iter()
                .map(|wr| {
                    let wa = E::A::from_f64(wr);
                    (wr, g.iter().map(|&gv| E::down(wa * gv)).collect())
                })
                .collect()
        })
        .collect()
}

fn hsum_vec<A: Acc>(v: &[A]) -> A {
    let mut acc = [A::ZERO; LANES];
    let (c, r) = v.as_chunks::<LANES>();
    for x8 in c {
        for i in 0..LANES {
            acc[i] += x8[i];
        }
    }
    let mut s = hsum(acc);
    for &a in r {
        s += a;
    }
    s
}

/// The contiguous data of a CPU storage as a slice of `T`.
fn data<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [T]> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("sink-token-mean: input is not contiguous");
    };
    Ok(&T::cpu_storage_as_slice(s)?[start..end])
}

/// Run `f` on the contiguous CPU data of `t`.
fn with_data<T: WithDType, R>(
    t: &Tensor,
    f: impl FnOnce(&[T]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (guard, layout) = t.storage_and_layout();
    let Storage::Cpu(s) = &*guard else {
        candle_core::bail!("sink-token-mean: tensor is not on the CPU");
    };
    f(data::<T>(s, layout)?)
}

/// The mask's values as f64 (any float or integer dtype).
fn mask_values(s: &CpuStorage, l: &Layout) -> candle_core::Result<Vec<f64>> {
    Ok(match s {
        CpuStorage::F32(_) => data::<f32>(s, l)?.iter().map(|&v| f64::from(v)).collect(),
        CpuStorage::F64(_) => data::<f64>(s, l)?.to_vec(),
        CpuStorage::BF16(_) => data::<bf16>(s, l)?.iter().map(|v| v.to_f64()).collect(),
        CpuStorage::F16(_) => data::<f16>(s, l)?.iter().map(|v| v.to_f64()).collect(),
        CpuStorage::U8(_) => data::<u8>(s, l)?.iter().map(|&v| f64::from(v)).collect(),
        CpuStorage::U32(_) => data::<u32>(s, l)?.iter().map(|&v| f64::from(v)).collect(),
        CpuStorage::I64(_) => data::<i64>(s, l)?.iter().map(|&v| v as f64).collect(),
        _ => candle_core::bail!("sink-token-mean: unsupported mask dtype"),
    })
}

impl CustomOp2 for SinkMean {
    fn name(&self) -> &'static str {
        "sink-token-mean"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        reprpo_kernels::ran_cpu_kernel(self.name());
        let (b, t, h) = l1.shape().dims3()?;
        if l2.dims() != [b, t] {
            candle_core::bail!(
                "sink-token-mean: mask {:?} does not match activations {:?}",
                l2.dims(),
                l1.dims()
            );
        }
        let m = mask_values(s2, l2)?;
        let dims = (b, t, h);
        let out = match s1 {
            CpuStorage::F32(_) => CpuStorage::F32(self.fwd::<f32>(data(s1, l1)?, &m, dims)?),
            CpuStorage::F64(_) => CpuStorage::F64(self.fwd::<f64>(data(s1, l1)?, &m, dims)?),
            CpuStorage::BF16(_) => CpuStorage::BF16(self.fwd::<bf16>(data(s1, l1)?, &m, dims)?),
            CpuStorage::F16(_) => CpuStorage::F16(self.fwd::<f16>(data(s1, l1)?, &m, dims)?),
            _ => candle_core::bail!("sink-token-mean: needs f32, f64, bf16 or f16 activations"),
        };
        Ok((out, Shape::from((b, h))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _mask: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dims = x.dims3()?;
        let g = g.to_dtype(x.dtype())?.contiguous()?;
        let gx = match x.dtype() {
            DType::F32 => self.bwd_typed::<f32>(x, &g, dims)?,
            DType::F64 => self.bwd_typed::<f64>(x, &g, dims)?,
            DType::BF16 => self.bwd_typed::<bf16>(x, &g, dims)?,
            DType::F16 => self.bwd_typed::<f16>(x, &g, dims)?,
            dt => candle_core::bail!("sink-token-mean: unsupported dtype {dt:?}"),
        };
        Ok((Some(gx), None))
    }
}

/// Whether [`sink_mean`] runs for activations `x`: on the CPU (outside
/// `reprpo_kernels::written_out`), in f32, f64, bf16 or f16, of rank 3.
pub(crate) fn applies(x: &Tensor) -> bool {
    reprpo_kernels::fused_cpu(x.device())
        && matches!(
            x.dtype(),
            DType::F32 | DType::F64 | DType::BF16 | DType::F16
        )
        && x.rank() == 3
}

/// The fused `reduce(pre(x))` `[B, H]` (see the module docs), differentiable in `x`; `mask`
/// `[B, T]` is constant.
pub(crate) fn sink_mean(x: &Tensor, mask: &Tensor, pre: Pre, threshold: f64) -> Result<Tensor> {
    let op = SinkMean {
        pre,
        threshold,
        cache: Mutex::new(None),
    };
    Ok(x.contiguous()?
        .apply_op2(&mask.detach().contiguous()?, op)?)
}
