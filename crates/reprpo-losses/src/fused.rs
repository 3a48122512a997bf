//! The fused reroute/retain kernel of the original ReprPO loss (and of `rr-only`, which reads the
//! same distances): one pass over the hidden states on the CPU, with its own backward.
//!
//! For every position `(l, b, t)` whose chosen token is real the kernel reads the rows
//! `pi_cho[l,b,t,:]`, `ref_cho[l,b,t,:]` (and `pi_rej[l,b,t,:]` where the rejected token is real
//! too) once, and accumulates in the same pass
//! - the retain distance `‖pi_cho - ref_cho‖` (counted where `m_c = 1`),
//! - the reroute distance `‖pi_rej - ref_cho‖` (counted where `m_c = m_r = 1`),
//! - the diagnostics `cos(pi_cho, ref_cho)` and `cos(pi_rej, ref_cho)` (same masks),
//!
//! into the weighted masked means of [`crate::reprpo`] split by example. Rows at padded positions
//! are never read, so whatever sits there (even NaN) reaches neither the values nor the gradients,
//! and their gradient is exactly 0. The backward reads the same rows once more and writes
//! `a_b (x - ref_cho) / ‖x - ref_cho‖` (0 where the distance is 0, the safe-norm convention).
//!
//! Accumulation is in f32 per row (eight independent lanes) for f32, bf16 and f16 inputs and in
//! f64 for f64 inputs; sums over rows are in f64. The kernel's output (the per-example parts and
//! the two cosine means) is f32 (f64 for f64 inputs); [`crate::reprpo::reprpo_loss`] casts its
//! results back to the input dtype. The unfused chain of candle ops
//! ([`crate::reprpo::reprpo_loss_unfused`]) is the reference it is tested against.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Storage, Tensor, WithDType};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::error::{LossError, Result};

/// Below this many hidden-state elements per tensor the kernel runs on the calling thread.
const PAR_MIN_ELEMS: usize = 1 << 15;

/// The accumulator type of the kernels (`f32` or `f64`).
trait Acc:
    Copy
    + Send
    + Sync
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::AddAssign
    + 'static
{
    const ZERO: Self;
    fn sqrt(self) -> Self;
    fn to_f64(self) -> f64;
    fn from_f64(v: f64) -> Self;
}

impl Acc for f32 {
    const ZERO: Self = 0.0;
    #[inline(always)]
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}

impl Acc for f64 {
    const ZERO: Self = 0.0;
    #[inline(always)]
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v
    }
}

/// An element type of the hidden states and its accumulator.
trait Elem: WithDType {
    type A: Acc;
    fn up(self) -> Self::A;
    fn down(a: Self::A) -> Self;
    /// The kernel's output storage from accumulator values.
    fn out_storage(v: Vec<Self::A>) -> CpuStorage;
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
    fn out_storage(v: Vec<f32>) -> CpuStorage {
        CpuStorage::F32(v)
    }
}

impl Elem for f64 {
    type A = f64;
    #[inline(always)]
    fn up(self) -> f64 {
        self
    }
    #[inline(always)]
    fn down(a: f64) -> Self {
        a
    }
    fn out_storage(v: Vec<f64>) -> CpuStorage {
        CpuStorage::F64(v)
    }
}

impl Elem for bf16 {
    type A = f32;
    #[inline(always)]
    fn up(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn down(a: f32) -> Self {
        bf16::from_f32(a)
    }
    fn out_storage(v: Vec<f32>) -> CpuStorage {
        CpuStorage::F32(v)
    }
}

impl Elem for f16 {
    type A = f32;
    #[inline(always)]
    fn up(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn down(a: f32) -> Self {
        f16::from_f32(a)
    }
    fn out_storage(v: Vec<f32>) -> CpuStorage {
        CpuStorage::F32(v)
    }
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

/// `[‖pc - rc‖^2, pc·rc, ‖pc‖^2, ‖rc‖^2]` of one row.
#[inline(always)]
fn stats_chosen<E: Elem>(pc: &[E], rc: &[E]) -> [E::A; 4] {
    let z = [E::A::ZERO; LANES];
    let (mut dd, mut dot, mut nx, mut ny) = (z, z, z, z);
    let (cx, rx) = pc.as_chunks::<LANES>();
    let (cy, ry) = rc.as_chunks::<LANES>();
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
    out
}

/// `[‖pr - rc‖^2, pr·rc, ‖pr‖^2]` of one row.
#[inline(always)]
fn stats_rejected<E: Elem>(pr: &[E], rc: &[E]) -> [E::A; 3] {
    let z = [E::A::ZERO; LANES];
    let (mut dd, mut dot, mut nx) = (z, z, z);
    let (cx, rx) = pr.as_chunks::<LANES>();
    let (cy, ry) = rc.as_chunks::<LANES>();
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
    out
}

/// `‖x - y‖^2` of one row.
#[inline(always)]
fn sq_dist<E: Elem>(x: &[E], y: &[E]) -> E::A {
    let mut acc = [E::A::ZERO; LANES];
    let (cx, rx) = x.as_chunks::<LANES>();
    let (cy, ry) = y.as_chunks::<LANES>();
    for (x8, y8) in cx.iter().zip(cy) {
        for i in 0..LANES {
            let d = x8[i].up() - y8[i].up();
            acc[i] += d * d;
        }
    }
    let mut s = hsum(acc);
    for (&a, &b) in rx.iter().zip(ry) {
        let d = a.up() - b.up();
        s += d * d;
    }
    s
}

/// `out = f (x - y)` elementwise.
#[inline(always)]
fn scaled_diff<E: Elem>(x: &[E], y: &[E], f: E::A, out: &mut [E]) {
    for ((o, &a), &b) in out.iter_mut().zip(x).zip(y) {
        *o = E::down(f * (a.up() - b.up()));
    }
}

/// `sqrt(s)` (`s >= 0`).
#[inline(always)]
fn root<A: Acc>(s: A) -> A {
    s.sqrt()
}

/// `cos = dot / max(‖x‖ ‖y‖, 1e-8)` from the squared norms.
#[inline(always)]
fn cos_of<A: Acc>(dot: A, nx2: A, ny2: A) -> f64 {
    let den = (root(nx2) * root(ny2)).to_f64().max(1e-8);
    dot.to_f64() / den
}

/// The fused op. Inputs (in order): `pi_cho`, `pi_rej`, `ref_cho`, each contiguous `[L, B, T, H]`.
/// Output: `[2B + 2]` = the reroute parts `[B]`, the retain parts `[B]`, the mean of
/// `cos(pi_cho, ref_cho)` over `m_c` and the mean of `cos(pi_rej, ref_cho)` over `m_c m_r`.
struct RerouteRetain {
    b: usize,
    t: usize,
    h: usize,
    /// `m_c[b, t]`, row-major `[B, T]`.
    m_c: Vec<bool>,
    /// `m_r[b, t]`.
    m_r: Vec<bool>,
    /// Reroute weights per example, divided by the reroute denominator.
    w_rr: Vec<f64>,
    /// Retain weights per example, divided by the retain denominator.
    w_ret: Vec<f64>,
    /// `1 / (number of (l, b, t) with m_c = 1)` (0 when none).
    inv_n_c: f64,
    /// `1 / (number of (l, b, t) with m_c = m_r = 1)` (0 when none).
    inv_n_both: f64,
}

/// Per chunk of rows: the reroute and retain numerators per example and the two cosine sums.
struct Partial {
    rr: Vec<f64>,
    ret: Vec<f64>,
    cos_c: f64,
    cos_r: f64,
}

impl RerouteRetain {
    fn rows_of(&self, len: usize) -> usize {
        len / self.h.max(1)
    }

    /// `(example, m_c, m_r)` of row `r` (row = `(l, b, t)` flattened).
    #[inline(always)]
    fn row_info(&self, r: usize) -> (usize, bool, bool) {
        let bt = r % (self.b * self.t);
        (bt / self.t, self.m_c[bt], self.m_r[bt])
    }

    /// Rows `[r0, r0 + n)` of the forward.
    fn fwd_rows<E: Elem>(&self, pc: &[E], pr: &[E], rc: &[E], r0: usize, n: usize) -> Partial {
        let h = self.h;
        let mut p = Partial {
            rr: vec![0.0; self.b],
            ret: vec![0.0; self.b],
            cos_c: 0.0,
            cos_r: 0.0,
        };
        for r in r0..r0 + n {
            let (bi, mc, mr) = self.row_info(r);
            if !mc {
                continue;
            }
            let s = r * h..(r + 1) * h;
            // Two sweeps of the row (the second reads `ref_cho` from L1): fewer live accumulators
            // than one sweep over the three rows, which spilled.
            let st = stats_chosen(&pc[s.clone()], &rc[s.clone()]);
            p.ret[bi] += root(st[0]).to_f64();
            p.cos_c += cos_of(st[1], st[2], st[3]);
            if mr {
                let sr = stats_rejected(&pr[s.clone()], &rc[s]);
                p.rr[bi] += root(sr[0]).to_f64();
                p.cos_r += cos_of(sr[1], sr[2], st[3]);
            }
        }
        p
    }

    fn fwd<E: Elem>(&self, pc: &[E], pr: &[E], rc: &[E]) -> candle_core::Result<CpuStorage> {
        let rows = self.rows_of(pc.len());
        if pr.len() != pc.len() || rc.len() != pc.len() {
            candle_core::bail!("fused-reprpo: inputs of different sizes");
        }
        let threads = rayon::current_num_threads().max(1);
        let parts: Vec<Partial> = if pc.len() < PAR_MIN_ELEMS || threads == 1 {
            vec![self.fwd_rows(pc, pr, rc, 0, rows)]
        } else {
            let per = rows.div_ceil(threads * 4).max(1);
            (0..rows.div_ceil(per))
                .into_par_iter()
                .map(|i| {
                    let r0 = i * per;
                    self.fwd_rows(pc, pr, rc, r0, per.min(rows - r0))
                })
                .collect()
        };
        let b = self.b;
        let mut out = vec![0.0f64; 2 * b + 2];
        for p in &parts {
            for i in 0..b {
                out[i] += p.rr[i];
                out[b + i] += p.ret[i];
            }
            out[2 * b] += p.cos_c;
            out[2 * b + 1] += p.cos_r;
        }
        for i in 0..b {
            out[i] *= self.w_rr[i];
            out[b + i] *= self.w_ret[i];
        }
        out[2 * b] *= self.inv_n_c;
        out[2 * b + 1] *= self.inv_n_both;
        Ok(E::out_storage(
            out.into_iter().map(<E::A as Acc>::from_f64).collect(),
        ))
    }

    /// The gradients of rows `[r0, r0 + n)` into `gc`, `gr` (the rows' slices), given the per-example
    /// multipliers `a_rr[b]`, `a_ret[b]` (upstream gradient times normalised weight).
    #[allow(clippy::too_many_arguments)]
    fn bwd_rows<E: Elem>(
        &self,
        pc: &[E],
        pr: &[E],
        rc: &[E],
        a_rr: &[f64],
        a_ret: &[f64],
        r0: usize,
        gc: &mut [E],
        gr: &mut [E],
    ) {
        let h = self.h;
        let zero = E::zero();
        for (k, (oc, or)) in gc
            .chunks_exact_mut(h)
            .zip(gr.chunks_exact_mut(h))
            .enumerate()
        {
            let r = r0 + k;
            let (bi, mc, mr) = self.row_info(r);
            let s = r * h..(r + 1) * h;
            let ret_on = mc && a_ret[bi] != 0.0;
            let rr_on = mc && mr && a_rr[bi] != 0.0;
            if ret_on {
                let (x, y) = (&pc[s.clone()], &rc[s.clone()]);
                let d = root(sq_dist(x, y)).to_f64();
                if d > 0.0 {
                    scaled_diff(x, y, E::A::from_f64(a_ret[bi] / d), oc);
                } else {
                    oc.fill(zero);
                }
            } else {
                oc.fill(zero);
            }
            if rr_on {
                let (x, y) = (&pr[s.clone()], &rc[s]);
                let d = root(sq_dist(x, y)).to_f64();
                if d > 0.0 {
                    scaled_diff(x, y, E::A::from_f64(a_rr[bi] / d), or);
                } else {
                    or.fill(zero);
                }
            } else {
                or.fill(zero);
            }
        }
    }

    fn bwd_typed<E: Elem>(
        &self,
        pc: &Tensor,
        pr: &Tensor,
        rc: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let b = self.b;
        let g = g.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        if g.len() != 2 * b + 2 {
            candle_core::bail!("fused-reprpo: gradient of length {}", g.len());
        }
        let a_rr: Vec<f64> = (0..b).map(|i| g[i] * self.w_rr[i]).collect();
        let a_ret: Vec<f64> = (0..b).map(|i| g[b + i] * self.w_ret[i]).collect();
        let len = pc.elem_count();
        let h = self.h;
        let mut gc = vec![E::zero(); len];
        let mut gr = vec![E::zero(); len];
        with_data::<E, _>(pc, |pcs| {
            with_data::<E, _>(pr, |prs| {
                with_data::<E, _>(rc, |rcs| {
                    let rows = self.rows_of(len);
                    let threads = rayon::current_num_threads().max(1);
                    if len < PAR_MIN_ELEMS || threads == 1 {
                        self.bwd_rows(pcs, prs, rcs, &a_rr, &a_ret, 0, &mut gc, &mut gr);
                    } else {
                        let per = rows.div_ceil(threads * 4).max(1);
                        gc.par_chunks_mut(per * h)
                            .zip(gr.par_chunks_mut(per * h))
                            .enumerate()
                            .for_each(|(i, (oc, or))| {
                                self.bwd_rows(pcs, prs, rcs, &a_rr, &a_ret, i * per, oc, or);
                            });
                    }
                    Ok(())
                })
            })
        })?;
        Ok((
            Tensor::from_vec(gc, pc.shape(), pc.device())?,
            Tensor::from_vec(gr, pr.shape(), pr.device())?,
        ))
    }
}

/// The contiguous data of a CPU storage as a slice of `T`.
fn data<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [T]> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("fused-reprpo: input is not contiguous");
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
        candle_core::bail!("fused-reprpo: tensor is not on the CPU");
    };
    f(data::<T>(s, layout)?)
}

impl CustomOp3 for RerouteRetain {
    fn name(&self) -> &'static str {
        "fused-reprpo-reroute-retain"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => {
                self.fwd::<f32>(data(s1, l1)?, data(s2, l2)?, data(s3, l3)?)?
            }
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => {
                self.fwd::<f64>(data(s1, l1)?, data(s2, l2)?, data(s3, l3)?)?
            }
            (CpuStorage::BF16(_), CpuStorage::BF16(_), CpuStorage::BF16(_)) => {
                self.fwd::<bf16>(data(s1, l1)?, data(s2, l2)?, data(s3, l3)?)?
            }
            (CpuStorage::F16(_), CpuStorage::F16(_), CpuStorage::F16(_)) => {
                self.fwd::<f16>(data(s1, l1)?, data(s2, l2)?, data(s3, l3)?)?
            }
            _ => candle_core::bail!(
                "{}: needs f32, f64, bf16 or f16 inputs of one dtype",
                self.name()
            ),
        };
        Ok((out, Shape::from(2 * self.b + 2)))
    }

    fn bwd(
        &self,
        pc: &Tensor,
        pr: &Tensor,
        rc: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (gc, gr) = match pc.dtype() {
            DType::F32 => self.bwd_typed::<f32>(pc, pr, rc, grad)?,
            DType::F64 => self.bwd_typed::<f64>(pc, pr, rc, grad)?,
            DType::BF16 => self.bwd_typed::<bf16>(pc, pr, rc, grad)?,
            DType::F16 => self.bwd_typed::<f16>(pc, pr, rc, grad)?,
            dt => candle_core::bail!("{}: unsupported dtype {dt:?}", self.name()),
        };
        let gc = pc.track_op().then_some(gc);
        let gr = pr.track_op().then_some(gr);
        Ok((gc, gr, None))
    }
}

/// Whether [`reroute_retain`] runs for hidden states like `t`: on the CPU, in f32, f64, bf16 or
/// f16.
pub(crate) fn applies(t: &Tensor) -> bool {
    t.device().is_cpu()
        && matches!(
            t.dtype(),
            DType::F32 | DType::F64 | DType::BF16 | DType::F16
        )
}

/// The outputs of [`reroute_retain`].
pub(crate) struct Fused {
    /// Reroute parts `[B]`: `v_rr[b] sum_{l,t} M_both d_rr / D_rr` (f32, or f64 for f64 inputs).
    pub rr: Tensor,
    /// Retain parts `[B]`.
    pub ret: Tensor,
    /// Mean of `cos(pi_cho, ref_cho)` over `m_c` (scalar, detached).
    pub cos_chosen: Tensor,
    /// Mean of `cos(pi_rej, ref_cho)` over `m_c m_r` (scalar, detached).
    pub cos_rejected: Tensor,
}

/// The weighted masked reroute and retain means of the original ReprPO and the cosine
/// diagnostics, in one fused pass (see the [module documentation](self)).
///
/// `v_rr`, `v_ret`: per-example weights (`[B]` each, host values) or `None` for 1. Gradients flow to
/// `pi_cho` and `pi_rej` only.
///
/// # Shapes
/// `pi_cho`, `pi_rej`, `ref_cho` `[L, B, T, H]`; `m_c`, `m_r` `[B, T]` (`> 0` is a real token);
/// outputs `[B]`, `[B]`, `[]`, `[]`.
///
/// # Errors
/// [`LossError::InvalidInput`] for weights of the wrong length; candle errors.
pub(crate) fn reroute_retain(
    pi_cho: &Tensor,
    pi_rej: &Tensor,
    ref_cho: &Tensor,
    m_c: &Tensor,
    m_r: &Tensor,
    weights: Option<(&[f64], &[f64])>,
) -> Result<Fused> {
    let (l, b, t, h) = pi_cho.dims4()?;
    let host_mask = |m: &Tensor| -> Result<Vec<bool>> {
        Ok(m.detach()
            .gt(0.0)?
            .flatten_all()?
            .to_vec1::<u8>()?
            .into_iter()
            .map(|v| v != 0)
            .collect())
    };
    let mc = host_mask(m_c)?;
    let mr = host_mask(m_r)?;
    let ones = vec![1.0; b];
    let (v_rr, v_ret) = weights.unwrap_or((&ones, &ones));
    if v_rr.len() != b || v_ret.len() != b {
        return Err(LossError::InvalidInput(format!(
            "ReprPO: {} / {} example weights for a batch of {b}",
            v_rr.len(),
            v_ret.len()
        )));
    }
    let mut cnt_c = vec![0usize; b];
    let mut cnt_both = vec![0usize; b];
    for bi in 0..b {
        for ti in 0..t {
            let k = bi * t + ti;
            cnt_c[bi] += usize::from(mc[k]);
            cnt_both[bi] += usize::from(mc[k] && mr[k]);
        }
    }
    let den = |v: &[f64], cnt: &[usize]| -> f64 {
        let d: f64 = v.iter().zip(cnt).map(|(v, &c)| v * c as f64).sum::<f64>() * l as f64;
        if d > 0.0 { d } else { 1.0 }
    };
    let (d_rr, d_ret) = (den(v_rr, &cnt_both), den(v_ret, &cnt_c));
    let inv = |n: usize| if n > 0 { 1.0 / n as f64 } else { 0.0 };
    let op = RerouteRetain {
        b,
        t,
        h,
        m_c: mc,
        m_r: mr,
        w_rr: v_rr.iter().map(|v| v / d_rr).collect(),
        w_ret: v_ret.iter().map(|v| v / d_ret).collect(),
        inv_n_c: inv(l * cnt_c.iter().sum::<usize>()),
        inv_n_both: inv(l * cnt_both.iter().sum::<usize>()),
    };
    let out = pi_cho.contiguous()?.apply_op3(
        &pi_rej.contiguous()?,
        &ref_cho.detach().contiguous()?,
        op,
    )?;
    Ok(Fused {
        rr: out.narrow(0, 0, b)?,
        ret: out.narrow(0, b, b)?,
        cos_chosen: out.get(2 * b)?.detach(),
        cos_rejected: out.get(2 * b + 1)?.detach(),
    })
}
