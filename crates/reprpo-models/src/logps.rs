//! Per-token and per-sequence log-probabilities of given tokens under full-sequence logits: the
//! quantity every DPO-family loss, SFT's NLL and every likelihood-based eval score is built on.
//!
//! # Formula
//! For a batch row `b` and position `t >= 1`, the token `ids[b, t]` is predicted by the logits at
//! `t - 1`:
//!
//! `logp[b, t] = logits[b, t-1, ids[b, t]] - logsumexp_v logits[b, t-1, v]`
//!
//! and a sequence's score is `sum_t mask[b, t] * logp[b, t]` over the counted positions
//! (`mask`, e.g. the completion's loss mask; position 0 is never counted, it has no
//! predecessor). The computation is done in f32 whatever the logits' dtype.
//!
//! The gradient with respect to the logits row `z = logits[b, t-1, :]` of `g * logp[b, t]` is
//!
//! `∂/∂z_v = g * (1[v = ids[b, t]] - softmax(z)_v)`.
//!
//! # Shapes
//! `logits`: `[B, T, V]`; `ids`: `[B, T]` u32; `mask`: `[B, T]` (any numeric dtype, 1 = count).
//! Outputs: `per_token` `[B, T-1]` (f32, zero where not counted), `sum` and `count` `[B]` f32.
//!
//! # Implementations
//! [`token_logps`] runs a fused CPU kernel for f32, bf16, f16 (and f64) logits: the forward
//! reads each logits row once (its maximum and its sum of exponentials are taken while the row is
//! in cache, with the picked logit) and keeps only the row's logsumexp; the backward writes
//! `g (onehot - softmax)` straight into the gradient, the only vocabulary-sized buffer it
//! allocates, and skips the rows whose gradient is zero (masked positions, the last position).
//! The logits are neither sliced, copied nor cast to f32. Rows are spread over rayon's threads.
//! [`token_logps_slow`] is the same quantity composed of candle ops (the reference in the tests,
//! and the path on other devices).

use std::sync::Mutex;

use candle_core::{
    CpuStorage, CustomOp1, D, DType, IndexOp, Layout, Shape, Storage, Tensor, WithDType,
};
use half::{bf16, f16};
use pulp::Arch;
use rayon::prelude::*;
use reprpo_kernels::simd;

use crate::error::{ModelError, Result};
use crate::num::{Elem, Real as _};

/// Log-probabilities of the tokens of a batch (see the module docs).
#[derive(Debug, Clone)]
pub struct SeqLogps {
    /// `[B, T-1]`: `mask * logp` at positions 1..T (f32).
    pub per_token: Tensor,
    /// `[B]`: sum over counted positions (differentiable).
    pub sum: Tensor,
    /// `[B]`: number of counted positions (constant).
    pub count: Tensor,
}

impl SeqLogps {
    /// `[B]`: the mean over counted positions (0 for a row with none).
    pub fn mean(&self) -> Result<Tensor> {
        Ok(self.sum.div(&self.count.clamp(1f32, f32::MAX)?)?)
    }
}

fn empty(logits: &Tensor) -> Result<SeqLogps> {
    let b = logits.dim(0)?;
    let zeros = Tensor::zeros(b, DType::F32, logits.device())?;
    Ok(SeqLogps {
        per_token: Tensor::zeros((b, 0), DType::F32, logits.device())?,
        sum: zeros.clone(),
        count: zeros,
    })
}

/// `per_token`, `sum` and `count` from the unmasked `[B, T-1]` log-probabilities.
fn finish(logp: Tensor, mask: &Tensor) -> Result<SeqLogps> {
    let m = mask.i((.., 1..))?.to_dtype(DType::F32)?;
    let per_token = (logp * &m)?;
    let sum = per_token.sum(D::Minus1)?;
    let count = m.sum(D::Minus1)?;
    Ok(SeqLogps {
        per_token,
        sum,
        count,
    })
}

/// Log-probabilities of `ids` under `logits`, counted where `mask` is 1 (see the module docs).
/// Differentiable with respect to `logits`. Fused on the CPU, [`token_logps_slow`] elsewhere.
pub fn token_logps(logits: &Tensor, ids: &Tensor, mask: &Tensor) -> Result<SeqLogps> {
    let (_, t, _) = logits.dims3()?;
    if t < 2 {
        return empty(logits);
    }
    if !fused_ok(logits) {
        return token_logps_slow(logits, ids, mask);
    }
    finish(shifted_logps(logits, ids)?.to_dtype(DType::F32)?, mask)
}

/// [`token_logps`] composed of candle ops (same values and gradients up to rounding).
pub fn token_logps_slow(logits: &Tensor, ids: &Tensor, mask: &Tensor) -> Result<SeqLogps> {
    let (_, t, _) = logits.dims3()?;
    if t < 2 {
        return empty(logits);
    }
    finish(shifted_logps_slow(logits, ids, DType::F32)?, mask)
}

/// `[B, T-1]` in `acc`: `logits[b, t-1, ids[b, t]] - logsumexp logits[b, t-1, :]`, composed.
fn shifted_logps_slow(logits: &Tensor, ids: &Tensor, acc: DType) -> Result<Tensor> {
    let t = logits.dim(1)?;
    picked_logps(
        &logits.i((.., ..t - 1, ..))?,
        &ids.i((.., 1..))?.contiguous()?,
        acc,
    )
}

/// `[B, n]` in `acc`: `pred[b, i, target[b, i]] - logsumexp pred[b, i, :]`, composed.
fn picked_logps(pred: &Tensor, target: &Tensor, acc: DType) -> Result<Tensor> {
    let (b, n, v) = pred.dims3()?;
    let flat = pred.to_dtype(acc)?.reshape((b * n, v))?;
    let lse = flat.max_keepdim(D::Minus1)?.detach();
    let shifted = flat.broadcast_sub(&lse)?;
    let lse = (shifted.exp()?.sum_keepdim(D::Minus1)?.log()? + lse)?;
    let picked = flat.gather(&target.contiguous()?.reshape((b * n, 1))?, D::Minus1)?;
    Ok((picked - lse)?.reshape((b, n))?)
}

/// The reference ReprPO project's *unshifted* token cross-entropy, `[B, T]` f32:
/// `nll[b, t] = -log softmax(logits[b, t])[ids[b, t]] * mask[b, t]` (the token scored at its own
/// position, not the next one; what its `prefvec` and `rank` losses read). Differentiable with
/// respect to `logits`; [`row_token_logps`] over the `B T` rows on the CPU, composed candle ops
/// elsewhere.
pub fn unshifted_nll(logits: &Tensor, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    if ids.dims() != [b, t] {
        return Err(ModelError::Invalid(format!(
            "ids have shape {:?}, logits {:?}",
            ids.dims(),
            logits.dims()
        )));
    }
    let lp = if fused_ok(logits) {
        // The fused row kernel takes its targets on the host (CPU only, as `shifted_logps`).
        let targets: Vec<u32> = ids.to_dtype(DType::U32)?.flatten_all()?.to_vec1()?;
        row_token_logps(&logits.reshape((b * t, v))?, &targets)?
            .reshape((b, t))?
            .to_dtype(DType::F32)?
    } else {
        picked_logps(logits, ids, DType::F32)?
    };
    Ok((lp.neg()? * mask.to_dtype(DType::F32)?)?)
}

fn fused_ok(logits: &Tensor) -> bool {
    reprpo_kernels::fused_cpu(logits.device())
        && matches!(
            logits.dtype(),
            DType::F32 | DType::BF16 | DType::F16 | DType::F64
        )
}

/// The unmasked log-probabilities `[B, T-1]` of `ids[:, 1..]` under `logits[:, ..T-1]` (`T >= 2`),
/// in f32, or f64 for f64 logits: the fused kernel on the CPU, composed ops elsewhere.
/// Differentiable with respect to `logits`.
pub fn shifted_logps(logits: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    if t < 2 {
        return Err(ModelError::Invalid(format!(
            "log-probabilities need at least 2 positions, got {t}"
        )));
    }
    if ids.dims() != [b, t] {
        return Err(ModelError::Invalid(format!(
            "ids have shape {:?}, logits {:?}",
            ids.dims(),
            logits.dims()
        )));
    }
    let acc = if logits.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    if !fused_ok(logits) {
        return shifted_logps_slow(logits, ids, acc);
    }
    let targets: Vec<u32> = ids
        .i((.., 1..))?
        .to_dtype(DType::U32)?
        .flatten_all()?
        .to_vec1()?;
    if let Some(bad) = targets.iter().find(|&&id| id as usize >= v) {
        return Err(ModelError::Invalid(format!(
            "token id {bad} out of range for {v} logits"
        )));
    }
    let logits = logits.contiguous()?;
    Ok(logits.apply_op1(TokenLogps {
        targets,
        lse: Mutex::new(Vec::new()),
    })?)
}

/// The positions of a padded batch `[rows, T]` whose logits its counted tokens need: for every
/// row `r` and position `t >= 1` with `counted(r T + t)`, the flat index `r T + t - 1` of the
/// predicting position, the token `ids[r T + t]`, and `r`. For callers that project only those
/// rows of the final hidden states ([`row_token_logps`], [`row_logps`]).
#[derive(Debug, Clone, Default)]
pub struct CountedRows {
    /// Flat indices `r T + t - 1` into `[rows T]`.
    pub pick: Vec<u32>,
    /// The counted tokens, in the same order.
    pub targets: Vec<u32>,
    /// The row of each.
    pub owner: Vec<usize>,
}

impl CountedRows {
    /// From the flat `ids` (`[rows, t]`, row-major) and which flat positions are counted.
    pub fn new(ids: &[u32], rows: usize, t: usize, counted: impl Fn(usize) -> bool) -> Self {
        let mut c = CountedRows::default();
        for r in 0..rows {
            for ti in 1..t {
                if counted(r * t + ti) {
                    c.pick.push((r * t + ti - 1) as u32);
                    c.targets.push(ids[r * t + ti]);
                    c.owner.push(r);
                }
            }
        }
        c
    }
}

/// `logits[r, targets[r]] - logsumexp logits[r, :]` per row of `[N, V]` logits (f32, bf16, f16 or
/// f64), in f64 on the host: for evaluation, where only the positions of counted tokens are
/// projected onto the vocabulary. Not differentiable: [`row_token_logps`] on detached logits, read
/// back to the host.
///
/// # Errors
/// [`ModelError::Invalid`] for a target out of range or a length mismatch; candle errors.
pub fn row_logps(logits: &Tensor, targets: &[u32]) -> Result<Vec<f64>> {
    if logits.dims2()?.0 == 0 && targets.is_empty() {
        return Ok(Vec::new());
    }
    Ok(row_token_logps(&logits.detach(), targets)?
        .to_dtype(DType::F64)?
        .to_vec1()?)
}

/// `logits[r, targets[r]] - logsumexp logits[r, :]` per row of `[N, V]` logits as a
/// differentiable `[N]` tensor (f32, or f64 for f64 logits): [`token_logps`] for callers that
/// project only the positions of counted tokens (the gradient is `g (onehot - softmax)` per row,
/// as in the module docs). Fused on the CPU, composed candle ops elsewhere.
///
/// # Errors
/// [`ModelError::Invalid`] for a target out of range or a length mismatch; candle errors.
pub fn row_token_logps(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let (n, v) = logits.dims2()?;
    if targets.len() != n {
        return Err(ModelError::Invalid(format!(
            "{} targets for {n} logits rows",
            targets.len()
        )));
    }
    if let Some(bad) = targets.iter().find(|&&id| id as usize >= v) {
        return Err(ModelError::Invalid(format!(
            "token id {bad} out of range for {v} logits"
        )));
    }
    if !fused_ok(logits) || n == 0 {
        let acc = if logits.dtype() == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let ids = Tensor::from_slice(targets, (1, n), logits.device())?;
        return Ok(picked_logps(&logits.unsqueeze(0)?, &ids, acc)?.squeeze(0)?);
    }
    Ok(logits.contiguous()?.apply_op1(RowLogps {
        targets: targets.to_vec(),
        lse: Mutex::new(Vec::new()),
    })?)
}

/// The fused op of [`row_token_logps`]: argument `[N, V]` logits, output `[N]`.
struct RowLogps {
    targets: Vec<u32>,
    /// Per row `(max, ln sum exp(x - max))`, for the backward.
    lse: Mutex<Vec<(f64, f64)>>,
}

impl RowLogps {
    fn run_fwd<E: Elem>(&self, x: &[E], v: usize) -> (CpuStorage, Vec<(f64, f64)>) {
        let n = self.targets.len();
        let mut logp = vec![E::A::ZERO; n];
        let mut lse = vec![(0f64, 0f64); n];
        let per = (TASK_ELEMS / v.max(1)).max(1);
        logp.par_iter_mut()
            .zip(lse.par_iter_mut())
            .enumerate()
            .with_min_len(per)
            .for_each(|(r, (lp, ls))| {
                let row = &x[r * v..(r + 1) * v];
                let (m, ln_s) = row_lse(row);
                *lp = (row[self.targets[r] as usize].up() - m) - ln_s;
                *ls = (m.to_f64(), ln_s.to_f64());
            });
        (E::A::to_cpu_storage_owned(logp), lse)
    }

    /// The gradient `[N, V]` of logits `x` (contiguous, storage `cs` with layout `l`).
    fn run_bwd<E: Elem>(
        &self,
        cs: &CpuStorage,
        l: &Layout,
        x: &Tensor,
        lse: &[(f64, f64)],
        g: &[f64],
    ) -> candle_core::Result<Tensor> {
        let v = x.dim(1)?;
        let dx = self.grad(TokenLogps::slice::<E>(cs, l)?, v, lse, g);
        Tensor::from_vec(dx, x.shape(), x.device())
    }

    fn grad<E: Elem>(&self, x: &[E], v: usize, lse: &[(f64, f64)], g: &[f64]) -> Vec<E> {
        let mut dx = vec![E::zero(); x.len()];
        let per = (TASK_ELEMS / v.max(1)).max(1);
        dx.par_chunks_mut(v)
            .zip(x.par_chunks(v))
            .enumerate()
            .with_min_len(per)
            .for_each(|(r, (d, row))| {
                let gr = E::A::from_f64(g[r]);
                if gr == E::A::ZERO {
                    return;
                }
                row_grad(row, d, self.targets[r] as usize, gr, lse[r]);
            });
        dx
    }
}

impl CustomOp1 for RowLogps {
    fn name(&self) -> &'static str {
        "row-token-logps"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        reprpo_kernels::ran_cpu_kernel(self.name());
        let v = l.dims().get(1).copied().unwrap_or(1);
        let (out, lse) = match s {
            CpuStorage::F32(_) => self.run_fwd(TokenLogps::slice::<f32>(s, l)?, v),
            CpuStorage::F64(_) => self.run_fwd(TokenLogps::slice::<f64>(s, l)?, v),
            CpuStorage::BF16(_) => self.run_fwd(TokenLogps::slice::<bf16>(s, l)?, v),
            CpuStorage::F16(_) => self.run_fwd(TokenLogps::slice::<f16>(s, l)?, v),
            _ => candle_core::bail!("row-token-logps: unsupported dtype"),
        };
        match self.lse.lock() {
            Ok(mut g) => *g = lse,
            Err(_) => candle_core::bail!("row-token-logps: lock poisoned"),
        }
        Ok((out, Shape::from(self.targets.len())))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = g.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let Ok(lse) = self.lse.lock() else {
            candle_core::bail!("row-token-logps: lock poisoned");
        };
        if lse.len() != self.targets.len() || g.len() != self.targets.len() {
            candle_core::bail!("row-token-logps: backward without its forward");
        }
        let x = x.contiguous()?;
        let (st, l) = x.storage_and_layout();
        let Storage::Cpu(cs) = &*st else {
            candle_core::bail!("row-token-logps: logits are not on the CPU");
        };
        let dx = match cs {
            CpuStorage::F32(_) => self.run_bwd::<f32>(cs, l, &x, &lse, &g)?,
            CpuStorage::F64(_) => self.run_bwd::<f64>(cs, l, &x, &lse, &g)?,
            CpuStorage::BF16(_) => self.run_bwd::<bf16>(cs, l, &x, &lse, &g)?,
            CpuStorage::F16(_) => self.run_bwd::<f16>(cs, l, &x, &lse, &g)?,
            _ => candle_core::bail!("row-token-logps: unsupported dtype"),
        };
        Ok(Some(dx))
    }
}

/// The fused op: argument the whole `[B, T, V]` logits, output `[B, T-1]` log-probabilities.
struct TokenLogps {
    /// `ids[:, 1..]` flattened, `B * (T-1)`.
    targets: Vec<u32>,
    /// Per output row, `(max, ln sum exp(x - max))` of its logits row (the logsumexp in two
    /// parts; set by the forward, for the backward).
    lse: Mutex<Vec<(f64, f64)>>,
}

/// Rows of about this many elements per rayon task at least.
const TASK_ELEMS: usize = 1 << 15;

/// `(max, ln sum exp(x - max))` of one row, eight lanes at a time (the logsumexp is their sum;
/// kept apart so that `x - max` is formed first, as the composed version does).
#[inline(always)]
fn row_lse<E: Elem>(x: &[E]) -> (E::A, E::A) {
    if let Some(xf) = E::as_f32(x) {
        let arch = Arch::new();
        let m = simd::max_f32(arch, xf);
        let s = simd::sum_exp(arch, xf, m);
        return (
            E::A::from_f64(f64::from(m)),
            E::A::from_f64(f64::from(s.ln())),
        );
    }
    let mut m8 = [E::A::NEG_INF; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (m, &v) in m8.iter_mut().zip(c) {
            let v = v.up();
            *m = if v > *m { v } else { *m };
        }
    }
    let mut m = E::A::NEG_INF;
    for v in m8.into_iter().chain(rest.iter().map(|&v| v.up())) {
        m = if v > m { v } else { m };
    }
    let mut s8 = [E::A::ZERO; 8];
    let chunks = x.chunks_exact(8);
    for c in chunks {
        for (s, &v) in s8.iter_mut().zip(c) {
            *s += (v.up() - m).exp();
        }
    }
    let mut s = E::A::ZERO;
    for &v in rest {
        s += (v.up() - m).exp();
    }
    for v in s8 {
        s += v;
    }
    (m, s.ln())
}

/// One row's gradient `d = g (onehot(k) - softmax(row))`, from the row's `(max, ln Σ exp(x -
/// max))`; f32 rows in explicit SIMD.
#[inline(always)]
fn row_grad<E: Elem>(row: &[E], d: &mut [E], k: usize, gr: E::A, (m, ln_s): (f64, f64)) {
    let (m, ln_s) = (E::A::from_f64(m), E::A::from_f64(ln_s));
    let ng = E::A::ZERO - gr;
    let simd_done = match (E::as_f32(row), E::as_f32_mut(d)) {
        (Some(xf), Some(df)) => {
            let c = (m + ln_s).to_f64() as f32;
            simd::scaled_exp(Arch::new(), xf, c, ng.to_f64() as f32, df);
            true
        }
        _ => false,
    };
    if !simd_done {
        for (o, &xv) in d.iter_mut().zip(row) {
            *o = E::down(ng * ((xv.up() - m) - ln_s).exp());
        }
    }
    d[k] = E::down(gr + ng * ((row[k].up() - m) - ln_s).exp());
}

/// Forward: per output row `(logp, lse)`.
fn fwd<E: Elem>(x: &[E], t: usize, v: usize, targets: &[u32]) -> (Vec<E::A>, Vec<(f64, f64)>) {
    let n = targets.len();
    let mut logp = vec![E::A::ZERO; n];
    let mut lse = vec![(0f64, 0f64); n];
    let per = (TASK_ELEMS / v.max(1)).max(1);
    logp.par_iter_mut()
        .zip(lse.par_iter_mut())
        .enumerate()
        .with_min_len(per)
        .for_each(|(r, (lp, ls))| {
            let (bi, ti) = (r / (t - 1), r % (t - 1));
            let row = &x[(bi * t + ti) * v..(bi * t + ti + 1) * v];
            let (m, ln_s) = row_lse(row);
            *lp = (row[targets[r] as usize].up() - m) - ln_s;
            *ls = (m.to_f64(), ln_s.to_f64());
        });
    (logp, lse)
}

/// Backward: `dx[b, t, :] = g[b, t] (onehot(ids[b, t+1]) - softmax(x[b, t, :]))` for `t < T-1`,
/// zero for the last position and for rows with `g = 0`.
fn bwd<E: Elem>(
    x: &[E],
    t: usize,
    v: usize,
    targets: &[u32],
    lse: &[(f64, f64)],
    g: &[E::A],
) -> Vec<E> {
    let mut dx = vec![E::zero(); x.len()];
    let per = (TASK_ELEMS / v.max(1)).max(1);
    dx.par_chunks_mut(v)
        .zip(x.par_chunks(v))
        .enumerate()
        .with_min_len(per)
        .for_each(|(i, (d, row))| {
            let (bi, ti) = (i / t, i % t);
            if ti == t - 1 {
                return;
            }
            let r = bi * (t - 1) + ti;
            let gr = g[r];
            if gr == E::A::ZERO {
                return;
            }
            row_grad(row, d, targets[r] as usize, gr, lse[r]);
        });
    dx
}

impl TokenLogps {
    fn slice<'a, E: WithDType>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [E]> {
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("token-logps: logits are not contiguous");
        };
        Ok(&E::cpu_storage_as_slice(s)?[a..b])
    }

    fn run_fwd<E: Elem>(
        &self,
        s: &CpuStorage,
        l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, t, v) = l.shape().dims3()?;
        let (logp, lse) = fwd(Self::slice::<E>(s, l)?, t, v, &self.targets);
        *self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::Msg("token-logps: lock poisoned".into()))? = lse;
        Ok((E::A::to_cpu_storage_owned(logp), Shape::from((b, t - 1))))
    }

    fn run_bwd<E: Elem>(&self, x: &Tensor, g: &Tensor) -> candle_core::Result<Tensor> {
        let (_, t, v) = x.dims3()?;
        let lse = self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::Msg("token-logps: lock poisoned".into()))?;
        let g = g.contiguous()?;
        let (xg, xl) = x.storage_and_layout();
        let (gg, gl) = g.storage_and_layout();
        let (Storage::Cpu(xs), Storage::Cpu(gs)) = (&*xg, &*gg) else {
            candle_core::bail!("token-logps: tensors are not on the CPU");
        };
        let dx = bwd(
            Self::slice::<E>(xs, xl)?,
            t,
            v,
            &self.targets,
            &lse,
            Self::slice::<E::A>(gs, gl)?,
        );
        Tensor::from_vec(dx, x.shape(), x.device())
    }
}

impl CustomOp1 for TokenLogps {
    fn name(&self) -> &'static str {
        "token-logps"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        reprpo_kernels::ran_cpu_kernel(self.name());
        let (b, t, _) = l.shape().dims3()?;
        if t < 2 || self.targets.len() != b * (t - 1) {
            candle_core::bail!(
                "token-logps: {} targets for logits {:?}",
                self.targets.len(),
                l
            );
        }
        match s {
            CpuStorage::F32(_) => self.run_fwd::<f32>(s, l),
            CpuStorage::F64(_) => self.run_fwd::<f64>(s, l),
            CpuStorage::BF16(_) => self.run_fwd::<bf16>(s, l),
            CpuStorage::F16(_) => self.run_fwd::<f16>(s, l),
            _ => candle_core::bail!("token-logps: needs f32, f64, bf16 or f16 logits"),
        }
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dx = match x.dtype() {
            DType::F32 => self.run_bwd::<f32>(x, g)?,
            DType::F64 => self.run_bwd::<f64>(x, g)?,
            DType::BF16 => self.run_bwd::<bf16>(x, g)?,
            DType::F16 => self.run_bwd::<f16>(x, g)?,
            dt => candle_core::bail!("token-logps: unsupported dtype {dt:?}"),
        };
        Ok(Some(dx))
    }
}
