//! The fused reroute/retain kernel of the per-position ReprPO losses: one pass over the hidden
//! states on the CPU, with its own backward, for every variant that compares one position at a
//! time (`original`, `rr-only`, `direction`, `normalized-mse`, `topk`, `symlog`, `adaptive`, `ldr`;
//! the per-row arithmetic of each is in `rows`).
//!
//! For every position `(l, b, t)` whose chosen token is real the kernel reads the rows
//! `pi_cho[l,b,t,:]`, `ref_cho[l,b,t,:]` (and `pi_rej[l,b,t,:]` where the rejected token is real
//! too) and accumulates in the same pass
//! - the retain distance `d(pi_cho, ref_cho)` (counted where `m_c = 1`; for `ldr` where
//!   `m_c = m_r = 1`),
//! - the reroute distance `d(pi_rej, ref_cho)` (counted where `m_c = m_r = 1`),
//! - the diagnostics `cos(pi_cho, ref_cho)` (over `m_c`) and `cos(pi_rej, ref_cho)` (over
//!   `m_c m_r`),
//!
//! into the weighted masked means of [`crate::reprpo`] split by example. `ldr`'s detached
//! reference term `ln(‖ref_cho - ref_rej‖ + eps)` is computed per counted row before the op (the
//! only use of `ref_rej`). Rows at padded positions are never read, so whatever sits there (even
//! NaN) reaches neither the values nor the gradients, and their gradient is exactly 0. The forward
//! keeps a few scalars per row (its sums, see `rows::PairCache`); the backward reads each counted
//! row once more and writes `a_b ∂d/∂x`.
//!
//! Accumulation is in f32 per row (eight independent lanes) for f32, bf16 and f16 inputs and in
//! f64 for f64 inputs; scalar formulas and sums over rows are in f64. The kernel's output (the
//! per-example parts and the two cosine means) is f32 (f64 for f64 inputs);
//! [`crate::reprpo::reprpo_loss`] casts its results back to the input dtype. The unfused chain of
//! candle ops ([`crate::reprpo::reprpo_loss_unfused`]) is the reference it is tested against.

pub(crate) mod rows;

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Storage, Tensor, WithDType};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::error::{LossError, Result};
use rows::{Elem, PairCache, RowDist, Scratch, cos_of, sq_dist, stats3, stats4};

/// Below this many hidden-state elements per tensor the kernel runs on the calling thread.
const PAR_MIN_ELEMS: usize = 1 << 15;

/// The forward's per-row caches: retain pair, reroute pair.
#[derive(Debug, Clone, Copy, Default)]
struct RowCache {
    ret: PairCache,
    rr: PairCache,
}

/// The fused op. Inputs (in order): `pi_cho`, `pi_rej`, `ref_cho`, each contiguous `[L, B, T, H]`.
/// Output: `[2B + 2]` = the reroute parts `[B]`, the retain parts `[B]`, the mean of
/// `cos(pi_cho, ref_cho)` over `m_c` and the mean of `cos(pi_rej, ref_cho)` over `m_c m_r`.
struct PairLoss {
    dist: RowDist,
    b: usize,
    t: usize,
    h: usize,
    /// `m_c[b, t]`, row-major `[B, T]`.
    m_c: Vec<bool>,
    /// `m_r[b, t]`.
    m_r: Vec<bool>,
    /// Whether the retain term counts only where both masks are 1 (`ldr`).
    retain_both: bool,
    /// The detached per-row constant of the distance (`ldr`), empty otherwise.
    row_const: Vec<f64>,
    /// Reroute weights per example, divided by the reroute denominator.
    w_rr: Vec<f64>,
    /// Retain weights per example, divided by the retain denominator.
    w_ret: Vec<f64>,
    /// `1 / (number of (l, b, t) with m_c = 1)` (0 when none).
    inv_n_c: f64,
    /// `1 / (number of (l, b, t) with m_c = m_r = 1)` (0 when none).
    inv_n_both: f64,
    /// Written by the forward, read by the backward.
    cache: Mutex<Vec<RowCache>>,
}

/// Per chunk of rows: the reroute and retain numerators per example and the two cosine sums.
struct Partial {
    rr: Vec<f64>,
    ret: Vec<f64>,
    cos_c: f64,
    cos_r: f64,
}

/// How a row participates: `(example, chosen real, reroute counted, retain counted)`.
struct RowInfo {
    b: usize,
    chosen: bool,
    rr: bool,
    ret: bool,
}

impl PairLoss {
    fn rows_of(&self, len: usize) -> usize {
        len / self.h.max(1)
    }

    #[inline(always)]
    fn row_info(&self, r: usize) -> RowInfo {
        let bt = r % (self.b * self.t);
        let (mc, mr) = (self.m_c[bt], self.m_r[bt]);
        RowInfo {
            b: bt / self.t,
            chosen: mc,
            rr: mc && mr,
            ret: mc && (mr || !self.retain_both),
        }
    }

    #[inline(always)]
    fn row_const(&self, r: usize) -> f64 {
        self.row_const.get(r).copied().unwrap_or(0.0)
    }

    /// Rows `[r0, r0 + cache.len())` of the forward.
    fn fwd_rows<E: Elem>(
        &self,
        pc: &[E],
        pr: &[E],
        rc: &[E],
        r0: usize,
        cache: &mut [RowCache],
    ) -> Partial {
        let h = self.h;
        let dist = self.dist;
        let mut scratch = Scratch::<E::A>::new(dist, h);
        let mut p = Partial {
            rr: vec![0.0; self.b],
            ret: vec![0.0; self.b],
            cos_c: 0.0,
            cos_r: 0.0,
        };
        for (k, rcache) in cache.iter_mut().enumerate() {
            let r = r0 + k;
            let info = self.row_info(r);
            if !info.chosen {
                continue;
            }
            let s = r * h..(r + 1) * h;
            let (x, y) = (&pc[s.clone()], &rc[s.clone()]);
            // Two sweeps of the row (the second reads `ref_cho` from L1): fewer live accumulators
            // than one sweep over the three rows, which spilled.
            let st = stats4(x, y);
            p.cos_c += cos_of(st[1], st[2], st[3]);
            scratch.load_reference(dist, y);
            let c = self.row_const(r);
            if info.ret {
                let (d, pcache) = dist.value(x, y, st, c, &mut scratch);
                p.ret[info.b] += d;
                rcache.ret = pcache;
            }
            if info.rr {
                let xr = &pr[s];
                let [dd, dot, nx2] = stats3(xr, y);
                p.cos_r += cos_of(dot, nx2, st[3]);
                let (d, pcache) = dist.value(xr, y, [dd, dot, nx2, st[3]], c, &mut scratch);
                p.rr[info.b] += d;
                rcache.rr = pcache;
            }
        }
        p
    }

    fn fwd<E: Elem>(&self, pc: &[E], pr: &[E], rc: &[E]) -> candle_core::Result<CpuStorage> {
        let rows = self.rows_of(pc.len());
        if pr.len() != pc.len() || rc.len() != pc.len() {
            candle_core::bail!("fused-reprpo: inputs of different sizes");
        }
        let mut cache = vec![RowCache::default(); rows];
        let threads = rayon::current_num_threads().max(1);
        let parts: Vec<Partial> = if pc.len() < PAR_MIN_ELEMS || threads == 1 {
            vec![self.fwd_rows(pc, pr, rc, 0, &mut cache)]
        } else {
            let per = rows.div_ceil(threads * 4).max(1);
            cache
                .par_chunks_mut(per)
                .enumerate()
                .map(|(i, c)| self.fwd_rows(pc, pr, rc, i * per, c))
                .collect()
        };
        match self.cache.lock() {
            Ok(mut g) => *g = cache,
            Err(_) => candle_core::bail!("fused-reprpo: cache lock poisoned"),
        }
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
            out.into_iter().map(rows::Acc::from_f64).collect(),
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
        cache: &[RowCache],
        r0: usize,
        gc: &mut [E],
        gr: &mut [E],
    ) {
        let h = self.h;
        let dist = self.dist;
        let zero = E::zero();
        let mut scratch = Scratch::<E::A>::new(dist, h);
        for (k, (oc, or)) in gc
            .chunks_exact_mut(h)
            .zip(gr.chunks_exact_mut(h))
            .enumerate()
        {
            let r = r0 + k;
            let info = self.row_info(r);
            let s = r * h..(r + 1) * h;
            let ret_on = info.ret && a_ret[info.b] != 0.0;
            let rr_on = info.rr && a_rr[info.b] != 0.0;
            let y = &rc[s.clone()];
            if ret_on || rr_on {
                scratch.load_reference(dist, y);
            }
            if ret_on {
                dist.grad(
                    &pc[s.clone()],
                    y,
                    a_ret[info.b],
                    &cache[r].ret,
                    &scratch,
                    oc,
                );
            } else {
                oc.fill(zero);
            }
            if rr_on {
                dist.grad(&pr[s], y, a_rr[info.b], &cache[r].rr, &scratch, or);
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
        let rows = self.rows_of(len);
        let Ok(cache) = self.cache.lock() else {
            candle_core::bail!("fused-reprpo: cache lock poisoned");
        };
        if cache.len() != rows {
            candle_core::bail!("fused-reprpo: backward without its forward");
        }
        let mut gc = E::zeros(len);
        let mut gr = E::zeros(len);
        with_data::<E, _>(pc, |pcs| {
            with_data::<E, _>(pr, |prs| {
                with_data::<E, _>(rc, |rcs| {
                    let threads = rayon::current_num_threads().max(1);
                    if len < PAR_MIN_ELEMS || threads == 1 {
                        self.bwd_rows(pcs, prs, rcs, &a_rr, &a_ret, &cache, 0, &mut gc, &mut gr);
                    } else {
                        let per = rows.div_ceil(threads * 4).max(1);
                        gc.par_chunks_mut(per * h)
                            .zip(gr.par_chunks_mut(per * h))
                            .enumerate()
                            .for_each(|(i, (oc, or))| {
                                self.bwd_rows(
                                    pcs,
                                    prs,
                                    rcs,
                                    &a_rr,
                                    &a_ret,
                                    &cache,
                                    i * per,
                                    oc,
                                    or,
                                );
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

impl CustomOp3 for PairLoss {
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
        reprpo_kernels::ran_cpu_kernel(self.name());
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
    reprpo_kernels::fused_cpu(t.device())
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

/// `ln(‖ref_cho - ref_rej‖ + eps)` per row `(l, b, t)` where both masks are 1 (0 elsewhere).
fn ldr_constants(
    ref_cho: &Tensor,
    ref_rej: &Tensor,
    both: &[bool],
    h: usize,
    eps: f64,
) -> Result<Vec<f64>> {
    fn typed<E: Elem>(
        rc: &Tensor,
        rj: &Tensor,
        both: &[bool],
        h: usize,
        eps: f64,
    ) -> candle_core::Result<Vec<f64>> {
        with_data::<E, _>(rc, |x| {
            with_data::<E, _>(rj, |y| {
                let rows = x.len() / h.max(1);
                if y.len() != x.len() {
                    candle_core::bail!("fused-reprpo: reference tensors of different sizes");
                }
                let one = |r: usize| -> f64 {
                    if both[r % both.len()] {
                        let s = r * h..(r + 1) * h;
                        (sq_dist(&x[s.clone()], &y[s]).sqrt() + eps).ln()
                    } else {
                        0.0
                    }
                };
                Ok(if x.len() < PAR_MIN_ELEMS {
                    (0..rows).map(one).collect()
                } else {
                    (0..rows).into_par_iter().map(one).collect()
                })
            })
        })
    }
    let rc = ref_cho.detach().contiguous()?;
    let rj = ref_rej.detach().contiguous()?;
    if rc.dtype() != rj.dtype() {
        return Err(LossError::InvalidInput(format!(
            "ReprPO: reference_chosen is {:?} but reference_rejected is {:?}",
            rc.dtype(),
            rj.dtype()
        )));
    }
    Ok(match rc.dtype() {
        DType::F32 => typed::<f32>(&rc, &rj, both, h, eps)?,
        DType::F64 => typed::<f64>(&rc, &rj, both, h, eps)?,
        DType::BF16 => typed::<bf16>(&rc, &rj, both, h, eps)?,
        DType::F16 => typed::<f16>(&rc, &rj, both, h, eps)?,
        dt => {
            return Err(LossError::InvalidInput(format!(
                "ReprPO: the fused kernel does not take {dt:?}"
            )));
        }
    })
}

/// A mask on the host: `m > 0`, row-major.
pub(crate) fn host_mask(m: &Tensor) -> Result<Vec<bool>> {
    Ok(m.detach()
        .gt(0.0)?
        .flatten_all()?
        .to_vec1::<u8>()?
        .into_iter()
        .map(|v| v != 0)
        .collect())
}

/// The hidden states and masks the kernel reads.
pub(crate) struct KernelInputs<'a> {
    pub pi_cho: Tensor,
    pub pi_rej: Tensor,
    pub ref_cho: &'a Tensor,
    /// Read only by `ldr`.
    pub ref_rej: &'a Tensor,
    pub m_c: &'a Tensor,
    pub m_r: &'a Tensor,
}

/// The weighted masked reroute and retain means of a per-position distance and the cosine
/// diagnostics, in one fused pass (see the [module documentation](self)).
///
/// `weights`: per-example weights `(v_rr, v_ret)` (`[B]` each, host values) or `None` for 1.
/// Gradients flow to `pi_cho` and `pi_rej` only.
///
/// # Shapes
/// `pi_cho`, `pi_rej`, `ref_cho`, `ref_rej` `[L, B, T, H]`; `m_c`, `m_r` `[B, T]` (`> 0` is a real
/// token); outputs `[B]`, `[B]`, `[]`, `[]`.
///
/// # Errors
/// [`LossError::InvalidInput`] for weights of the wrong length; candle errors.
pub(crate) fn reroute_retain(
    dist: RowDist,
    inp: &KernelInputs<'_>,
    weights: Option<(&[f64], &[f64])>,
) -> Result<Fused> {
    let (l, b, t, h) = inp.pi_cho.dims4()?;
    let mc = host_mask(inp.m_c)?;
    let mr = host_mask(inp.m_r)?;
    let ones = vec![1.0; b];
    let (v_rr, v_ret) = weights.unwrap_or((&ones, &ones));
    if v_rr.len() != b || v_ret.len() != b {
        return Err(LossError::InvalidInput(format!(
            "ReprPO: {} / {} example weights for a batch of {b}",
            v_rr.len(),
            v_ret.len()
        )));
    }
    let both: Vec<bool> = mc.iter().zip(&mr).map(|(&c, &r)| c && r).collect();
    let retain_both = matches!(dist, RowDist::Ldr { .. });
    let ret_mask = if retain_both { &both } else { &mc };
    let count = |m: &[bool]| -> Vec<usize> {
        (0..b)
            .map(|bi| m[bi * t..(bi + 1) * t].iter().filter(|&&v| v).count())
            .collect()
    };
    let (cnt_c, cnt_both, cnt_ret) = (count(&mc), count(&both), count(ret_mask));
    let den = |v: &[f64], cnt: &[usize]| -> f64 {
        let d: f64 = v.iter().zip(cnt).map(|(v, &c)| v * c as f64).sum::<f64>() * l as f64;
        if d > 0.0 { d } else { 1.0 }
    };
    let (d_rr, d_ret) = (den(v_rr, &cnt_both), den(v_ret, &cnt_ret));
    let inv = |n: usize| if n > 0 { 1.0 / n as f64 } else { 0.0 };
    let row_const = match dist {
        RowDist::Ldr { eps } => ldr_constants(inp.ref_cho, inp.ref_rej, &both, h, eps)?,
        _ => Vec::new(),
    };
    let op = PairLoss {
        dist,
        b,
        t,
        h,
        m_c: mc,
        m_r: mr,
        retain_both,
        row_const,
        w_rr: v_rr.iter().map(|v| v / d_rr).collect(),
        w_ret: v_ret.iter().map(|v| v / d_ret).collect(),
        inv_n_c: inv(l * cnt_c.iter().sum::<usize>()),
        inv_n_both: inv(l * cnt_both.iter().sum::<usize>()),
        cache: Mutex::new(Vec::new()),
    };
    let out = inp.pi_cho.contiguous()?.apply_op3(
        &inp.pi_rej.contiguous()?,
        &inp.ref_cho.detach().contiguous()?,
        op,
    )?;
    Ok(Fused {
        rr: out.narrow(0, 0, b)?,
        ret: out.narrow(0, b, b)?,
        cos_chosen: out.get(2 * b)?.detach(),
        cos_rejected: out.get(2 * b + 1)?.detach(),
    })
}
