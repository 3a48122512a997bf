//! Fused CPU ops with their own backward, shared by the Llama and Phi-3 forwards: RMSNorm,
//! RoPE (rotate-half layout, optionally on the first `rotary_dim` features only), the scaled and
//! masked softmax of attention, SwiGLU (`silu(gate) * up`) and grouped-query attention built on
//! them.
//!
//! candle's own fused ops (`candle_nn::ops::rms_norm`, `softmax_last_dim`, `rotary_emb::rope`)
//! have no backward and silently drop gradients (`../shared/docs/candle-notes.md`); the
//! written-out differentiable versions (kept here as `*_slow`, the reference in
//! `tests/all/ops.rs`) cost many small ops and temporaries, each kept alive for the backward. Each
//! op below computes the same values in one pass over its rows (f32 and f64 on the CPU) and has
//! its `bwd` written out. Other devices and dtypes use the `*_slow` version (same values, same
//! gradients), so every path keeps working.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, D, DType, Layout, Shape, Tensor};
use candle_core::{Storage, WithDType};
use rayon::prelude::*;

use crate::num::Real;

use crate::error::Result;

/// Below this many elements an op runs on the calling thread (spawning costs more than it buys).
const PAR_MIN_ELEMS: usize = 1 << 15;

/// Sum with eight independent accumulators (vectorises; the order differs from a plain loop
/// only by float rounding).
#[inline(always)]
fn sum8<T: Real>(x: &[T]) -> T {
    let mut acc = [T::zero(); 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    let mut s = rest.iter().fold(T::zero(), |s, &v| s + v);
    for a in acc {
        s += a;
    }
    s
}

/// Maximum with eight independent accumulators (`-inf` for an empty slice).
#[inline(always)]
fn max8<T: Real>(x: &[T]) -> T {
    let ninf = T::from_f64(f64::NEG_INFINITY);
    let mut acc = [ninf; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    let mut m = rest.iter().fold(ninf, |m, &v| if v > m { v } else { m });
    for a in acc {
        m = if a > m { a } else { m };
    }
    m
}

/// Dot product with eight independent accumulators.
#[inline(always)]
fn dot8<T: Real>(x: &[T], y: &[T]) -> T {
    let mut acc = [T::zero(); 8];
    let xc = x.chunks_exact(8);
    let yc = y.chunks_exact(8);
    let (xr, yr) = (xc.remainder(), yc.remainder());
    for (a8, b8) in xc.zip(yc) {
        for ((a, &u), &v) in acc.iter_mut().zip(a8).zip(b8) {
            *a += u * v;
        }
    }
    let mut s = xr.iter().zip(yr).fold(T::zero(), |s, (&u, &v)| s + u * v);
    for a in acc {
        s += a;
    }
    s
}

/// Whether the fused CPU path applies to tensors of this device and dtype.
fn fused_ok(t: &Tensor) -> bool {
    reprpo_kernels::fused_cpu(t.device()) && matches!(t.dtype(), DType::F32 | DType::F64)
}

/// The contiguous data of a CPU storage as a slice of `T`.
fn data<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, op: &str) -> candle_core::Result<&'a [T]> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: input is not contiguous");
    };
    Ok(&T::cpu_storage_as_slice(s)?[start..end])
}

/// Run `f` on the contiguous CPU data of `t` (which must be contiguous, on the CPU, of type `T`).
fn with_data<T: WithDType, R>(
    t: &Tensor,
    op: &str,
    f: impl FnOnce(&[T]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (guard, layout) = t.storage_and_layout();
    let Storage::Cpu(s) = &*guard else {
        candle_core::bail!("{op}: tensor is not on the CPU");
    };
    f(data::<T>(s, layout, op)?)
}

/// Apply `f(row_index_of_first_row, in_chunk, out_chunk)` to chunks of whole rows, in parallel
/// when the tensor is large enough. `inp` has `in_row` elements per row, `out` `out_row`.
fn rows_par<I: Sync, O: Send>(
    inp: &[I],
    in_row: usize,
    out: &mut [O],
    out_row: usize,
    f: impl Fn(usize, &[I], &mut [O]) + Sync,
) {
    let rows = out.len() / out_row.max(1);
    if rows == 0 || in_row == 0 {
        return;
    }
    let threads = rayon::current_num_threads().max(1);
    if out.len() < PAR_MIN_ELEMS || threads == 1 {
        f(0, inp, out);
        return;
    }
    let per = rows.div_ceil(threads * 4).max(1);
    out.par_chunks_mut(per * out_row)
        .zip(inp.par_chunks(per * in_row))
        .enumerate()
        .for_each(|(i, (o, x))| f(i * per, x, o));
}

// ---------------------------------------------------------------------------------------------
// RMSNorm

/// RMSNorm as `transformers` computes it: in f32, then cast back and scaled. The written-out
/// differentiable version (any device and dtype).
pub fn rms_norm_slow(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dt = x.dtype();
    let x32 = x.to_dtype(DType::F32)?;
    let var = x32.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x32.broadcast_div(&(var + eps)?.sqrt()?)?;
    Ok(normed.to_dtype(dt)?.broadcast_mul(weight)?)
}

/// RMSNorm over the last dimension, `x / sqrt(mean(x^2) + eps) * weight`: fused on the CPU for
/// f32 and f64 (the weight gets a gradient only when it is tracked), else [`rms_norm_slow`].
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let h = x.dim(D::Minus1)?;
    if fused_ok(x)
        && weight.dtype() == x.dtype()
        && weight.dims() == [h]
        && reprpo_kernels::fused_cpu(weight.device())
    {
        let x = x.contiguous()?;
        let w = weight.contiguous()?;
        Ok(x.apply_op2(&w, RmsNorm { eps })?)
    } else {
        rms_norm_slow(x, weight, eps)
    }
}

struct RmsNorm {
    eps: f64,
}

/// `sqrt(mean(x^2) + eps)` of one row, accumulated in f64.
#[inline(always)]
fn rms<T: Real>(x: &[T], eps: f64) -> T {
    let ss: f64 = x.iter().map(|v| v.to_f64() * v.to_f64()).sum();
    T::from_f64((ss / x.len() as f64 + eps).sqrt())
}

fn rms_norm_fwd<T: Real>(x: &[T], w: &[T], eps: f64) -> Vec<T> {
    let h = w.len();
    let mut y = vec![T::zero(); x.len()];
    rows_par(x, h, &mut y, h, |_, x, y| {
        for (xr, yr) in x.chunks_exact(h).zip(y.chunks_exact_mut(h)) {
            let s = rms(xr, eps);
            for ((o, &v), &wv) in yr.iter_mut().zip(xr).zip(w) {
                *o = (v / s) * wv;
            }
        }
    });
    y
}

/// `dx = (g w - n mean(g w n)) / s` with `n = x / s`.
fn rms_norm_bwd_x<T: Real>(x: &[T], w: &[T], g: &[T], eps: f64) -> Vec<T> {
    let h = w.len();
    let mut dx = vec![T::zero(); x.len()];
    rows_par(x, h, &mut dx, h, |r0, x, dx| {
        let g = &g[r0 * h..r0 * h + x.len()];
        for ((xr, gr), dr) in x
            .chunks_exact(h)
            .zip(g.chunks_exact(h))
            .zip(dx.chunks_exact_mut(h))
        {
            let s = rms(xr, eps);
            let dot: f64 = xr
                .iter()
                .zip(gr)
                .zip(w)
                .map(|((&xv, &gv), &wv)| ((gv * wv) * (xv / s)).to_f64())
                .sum();
            let m = T::from_f64(dot / h as f64);
            for (((o, &xv), &gv), &wv) in dr.iter_mut().zip(xr).zip(gr).zip(w) {
                *o = (gv * wv - (xv / s) * m) / s;
            }
        }
    });
    dx
}

/// `dw = sum over rows of g n`.
fn rms_norm_bwd_w<T: Real>(x: &[T], g: &[T], h: usize, eps: f64) -> Vec<T> {
    let mut acc = vec![0f64; h];
    for (xr, gr) in x.chunks_exact(h).zip(g.chunks_exact(h)) {
        let s = rms(xr, eps);
        for ((a, &xv), &gv) in acc.iter_mut().zip(xr).zip(gr) {
            *a += (gv * (xv / s)).to_f64();
        }
    }
    acc.into_iter().map(T::from_f64).collect()
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        w: &CpuStorage,
        w_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        reprpo_kernels::ran_cpu_kernel(self.name());
        let n = self.name();
        let out = match (x, w) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(rms_norm_fwd(
                data::<f32>(x, x_l, n)?,
                data::<f32>(w, w_l, n)?,
                self.eps,
            )),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(rms_norm_fwd(
                data::<f64>(x, x_l, n)?,
                data::<f64>(w, w_l, n)?,
                self.eps,
            )),
            _ => candle_core::bail!("{n}: needs f32 or f64 inputs of one dtype"),
        };
        Ok((out, x_l.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let h = w.elem_count();
        let eps = self.eps;
        let n = self.name();
        let want_w = w.track_op();
        let (dx, dw) = match x.dtype() {
            DType::F32 => rms_norm_grads::<f32>(x, w, &g, h, eps, want_w, n)?,
            DType::F64 => rms_norm_grads::<f64>(x, w, &g, h, eps, want_w, n)?,
            dt => candle_core::bail!("{n}: unsupported dtype {dt:?}"),
        };
        Ok((Some(dx), dw))
    }
}

fn rms_norm_grads<T: Real>(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    h: usize,
    eps: f64,
    want_w: bool,
    op: &str,
) -> candle_core::Result<(Tensor, Option<Tensor>)> {
    with_data::<T, _>(x, op, |xs| {
        with_data::<T, _>(w, op, |ws| {
            with_data::<T, _>(g, op, |gs| {
                let dx = Tensor::from_vec(rms_norm_bwd_x(xs, ws, gs, eps), x.shape(), x.device())?;
                let dw = if want_w {
                    Some(Tensor::from_vec(
                        rms_norm_bwd_w(xs, gs, h, eps),
                        w.shape(),
                        w.device(),
                    )?)
                } else {
                    None
                };
                Ok((dx, dw))
            })
        })
    })
}

// ---------------------------------------------------------------------------------------------
// RoPE

/// `rotate_half`: `[x1, x2] -> [-x2, x1]` on the last dimension.
pub fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    Ok(Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?)
}

/// RoPE on the first `rd` features of `x` (`[B, H, T, head_dim]`), with `cos`, `sin` of shape
/// `[B or 1, 1, T, rd]`; the remaining features pass through. The written-out version.
pub fn rope_slow(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let hd = x.dim(D::Minus1)?;
    let rd = cos.dim(D::Minus1)?;
    if rd == hd {
        return Ok((x.broadcast_mul(cos)? + rotate_half(x)?.broadcast_mul(sin)?)?);
    }
    let rot = x.narrow(D::Minus1, 0, rd)?;
    let pass = x.narrow(D::Minus1, rd, hd - rd)?;
    let rot = (rot.broadcast_mul(cos)? + rotate_half(&rot)?.broadcast_mul(sin)?)?;
    Ok(Tensor::cat(&[&rot, &pass], D::Minus1)?)
}

/// RoPE as [`rope_slow`]; fused on the CPU for f32 and f64 (output contiguous). `x` may be a
/// strided view (e.g. `[B, T, H, D]` transposed to `[B, H, T, D]`).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, _, t, hd) = x.dims4()?;
    let (cb, c1, ct, rd) = cos.dims4()?;
    let shapes_ok = (cb == b || cb == 1)
        && c1 == 1
        && ct == t
        && rd % 2 == 0
        && rd <= hd
        && sin.dims() == cos.dims();
    if fused_ok(x) && shapes_ok && cos.dtype() == x.dtype() && sin.dtype() == x.dtype() {
        let x = x.contiguous()?;
        Ok(x.apply_op3(
            &cos.contiguous()?,
            &sin.contiguous()?,
            Rope { inverse: false },
        )?)
    } else {
        rope_slow(x, cos, sin)
    }
}

/// Forward (`inverse: false`) or its transpose, the backward (`inverse: true`).
struct Rope {
    inverse: bool,
}

fn rope_kernel<T: Real>(
    x: &[T],
    dims: (usize, usize, usize, usize),
    cos: &[T],
    sin: &[T],
    cb: usize,
    rd: usize,
    inverse: bool,
) -> Vec<T> {
    let (_, h, t, d) = dims;
    let half = rd / 2;
    let mut y = vec![T::zero(); x.len()];
    rows_par(x, d, &mut y, d, |r0, x, y| {
        for (i, (xr, yr)) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)).enumerate() {
            let r = r0 + i;
            let bi = if cb == 1 { 0 } else { r / (h * t) };
            let crow = (bi * t + r % t) * rd;
            let c = &cos[crow..crow + rd];
            let s = &sin[crow..crow + rd];
            if inverse {
                // dx_j = g_j c_j + g_{j+half} s_{j+half};  dx_{j+half} = g_{j+half} c_{j+half} - g_j s_j
                for j in 0..half {
                    yr[j] = xr[j] * c[j] + xr[j + half] * s[j + half];
                    yr[j + half] = xr[j + half] * c[j + half] - xr[j] * s[j];
                }
            } else {
                // y_j = x_j c_j - x_{j+half} s_j;  y_{j+half} = x_{j+half} c_{j+half} + x_j s_{j+half}
                for j in 0..half {
                    yr[j] = xr[j] * c[j] + (-xr[j + half]) * s[j];
                    yr[j + half] = xr[j + half] * c[j + half] + xr[j] * s[j + half];
                }
            }
            yr[rd..].copy_from_slice(&xr[rd..]);
        }
    });
    y
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        c: &CpuStorage,
        c_l: &Layout,
        s: &CpuStorage,
        s_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        reprpo_kernels::ran_cpu_kernel(self.name());
        let n = self.name();
        let dims = x_l.shape().dims4()?;
        let (cb, _, _, rd) = c_l.shape().dims4()?;
        let out = match x {
            CpuStorage::F32(_) => CpuStorage::F32(rope_kernel(
                data::<f32>(x, x_l, n)?,
                dims,
                data::<f32>(c, c_l, n)?,
                data::<f32>(s, s_l, n)?,
                cb,
                rd,
                self.inverse,
            )),
            CpuStorage::F64(_) => CpuStorage::F64(rope_kernel(
                data::<f64>(x, x_l, n)?,
                dims,
                data::<f64>(c, c_l, n)?,
                data::<f64>(s, s_l, n)?,
                cb,
                rd,
                self.inverse,
            )),
            _ => candle_core::bail!("{n}: needs f32 or f64"),
        };
        Ok((out, x_l.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // The tables are constants (computed from positions): no gradient for them.
        let dx = g.contiguous()?.apply_op3_no_bwd(
            &cos.detach(),
            &sin.detach(),
            &Rope {
                inverse: !self.inverse,
            },
        )?;
        Ok((Some(dx), None, None))
    }
}

// ---------------------------------------------------------------------------------------------
// Scaled, masked softmax

/// `softmax(scores * scale + mask)` over the last dimension, written out. `scores`:
/// `[B, G, R * T, S]` (R query rows per group, e.g. the heads sharing a key/value head);
/// `mask`: `[B or 1, 1, T, S]`, added to every group and repeat.
pub fn masked_softmax_slow(scores: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, g, rt, s) = scores.dims4()?;
    let t = mask.dim(2)?;
    let x = (scores * scale)?
        .reshape((b, g * rt / t.max(1), t, s))?
        .broadcast_add(&mask.to_dtype(scores.dtype())?)?
        .reshape((b, g, rt, s))?;
    Ok(candle_nn::ops::softmax(&x, D::Minus1)?)
}

/// [`masked_softmax_slow`], fused on the CPU for f32 and f64. The mask gets no gradient.
pub fn masked_softmax(scores: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, _, rt, s) = scores.dims4()?;
    let (mb, m1, t, ms) = mask.dims4()?;
    let shapes_ok = (mb == b || mb == 1) && m1 == 1 && ms == s && t > 0 && rt % t == 0;
    if fused_ok(scores) && reprpo_kernels::fused_cpu(mask.device()) && shapes_ok {
        let scores = scores.contiguous()?;
        let mask = mask.to_dtype(scores.dtype())?.contiguous()?;
        Ok(scores.apply_op2(&mask, MaskedSoftmax { scale })?)
    } else {
        masked_softmax_slow(scores, mask, scale)
    }
}

struct MaskedSoftmax {
    scale: f64,
}

fn masked_softmax_fwd<T: Real>(
    x: &[T],
    dims: (usize, usize, usize, usize),
    mask: &[T],
    mb: usize,
    t: usize,
    scale: f64,
) -> Vec<T> {
    let (_, g, rt, s) = dims;
    let per_batch = g * rt;
    let scale = T::from_f64(scale);
    let mut y = vec![T::zero(); x.len()];
    rows_par(x, s, &mut y, s, |r0, x, y| {
        for (i, (xr, yr)) in x.chunks_exact(s).zip(y.chunks_exact_mut(s)).enumerate() {
            let r = r0 + i;
            let bi = if mb == 1 { 0 } else { r / per_batch };
            let mrow = (bi * t + r % t) * s;
            let m = &mask[mrow..mrow + s];
            for ((o, &v), &mv) in yr.iter_mut().zip(xr).zip(m) {
                *o = v * scale + mv;
            }
            let max = max8(yr);
            for o in yr.iter_mut() {
                *o = (*o - max).exp();
            }
            let sum = sum8(yr);
            for o in yr.iter_mut() {
                *o /= sum;
            }
        }
    });
    y
}

/// `dx = scale * y * (g - sum(g y))`, row by row.
fn softmax_bwd<T: Real>(y: &[T], g: &[T], s: usize, scale: f64) -> Vec<T> {
    let scale = T::from_f64(scale);
    let mut dx = vec![T::zero(); y.len()];
    rows_par(y, s, &mut dx, s, |r0, y, dx| {
        let g = &g[r0 * s..r0 * s + y.len()];
        for ((yr, gr), dr) in y
            .chunks_exact(s)
            .zip(g.chunks_exact(s))
            .zip(dx.chunks_exact_mut(s))
        {
            let dot = dot8(yr, gr);
            for ((o, &yv), &gv) in dr.iter_mut().zip(yr).zip(gr) {
                *o = scale * (yv * (gv - dot));
            }
        }
    });
    dx
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "fused-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        m: &CpuStorage,
        m_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        reprpo_kernels::ran_cpu_kernel(self.name());
        let n = self.name();
        let dims = x_l.shape().dims4()?;
        let (mb, _, t, _) = m_l.shape().dims4()?;
        let out = match (x, m) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(masked_softmax_fwd(
                data::<f32>(x, x_l, n)?,
                dims,
                data::<f32>(m, m_l, n)?,
                mb,
                t,
                self.scale,
            )),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(masked_softmax_fwd(
                data::<f64>(x, x_l, n)?,
                dims,
                data::<f64>(m, m_l, n)?,
                mb,
                t,
                self.scale,
            )),
            _ => candle_core::bail!("{n}: needs f32 or f64 inputs of one dtype"),
        };
        Ok((out, x_l.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _mask: &Tensor,
        y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let y = y.detach();
        let g = g.contiguous()?;
        let s = y.dim(D::Minus1)?;
        let n = self.name();
        let dx = match y.dtype() {
            DType::F32 => with_data::<f32, _>(&y, n, |ys| {
                with_data::<f32, _>(&g, n, |gs| {
                    Tensor::from_vec(softmax_bwd(ys, gs, s, self.scale), y.shape(), y.device())
                })
            })?,
            DType::F64 => with_data::<f64, _>(&y, n, |ys| {
                with_data::<f64, _>(&g, n, |gs| {
                    Tensor::from_vec(softmax_bwd(ys, gs, s, self.scale), y.shape(), y.device())
                })
            })?,
            dt => candle_core::bail!("{n}: unsupported dtype {dt:?}"),
        };
        Ok((Some(dx), None))
    }
}

// ---------------------------------------------------------------------------------------------
// SwiGLU

/// `silu(gate) * up`, written out.
pub fn silu_mul_slow(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    Ok(((gate * candle_nn::ops::sigmoid(gate)?)? * up)?)
}

/// `silu(gate) * up` for `gate`, `up` of one shape; fused on the CPU for f32 and f64.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if fused_ok(gate) && up.dtype() == gate.dtype() && up.dims() == gate.dims() {
        let gate = gate.contiguous()?;
        let up = up.contiguous()?;
        Ok(gate.apply_op2(&up, SiluMul)?)
    } else {
        silu_mul_slow(gate, up)
    }
}

/// `silu(gate) * up` where `gate_up` is `[..., 2 I]` with `gate` the first `I` features and `up`
/// the last (Phi-3's fused projection); fused on the CPU for f32 and f64.
pub fn silu_mul_packed(gate_up: &Tensor) -> Result<Tensor> {
    let i2 = gate_up.dim(D::Minus1)?;
    if fused_ok(gate_up) && i2 % 2 == 0 {
        Ok(gate_up.contiguous()?.apply_op1(SiluMulPacked)?)
    } else {
        let i = i2 / 2;
        silu_mul_slow(
            &gate_up.narrow(D::Minus1, 0, i)?,
            &gate_up.narrow(D::Minus1, i, i)?,
        )
    }
}

#[inline(always)]
fn sigmoid<T: Real>(v: T) -> T {
    T::one() / (T::one() + (-v).exp())
}

/// One row: `y = silu(g) * u`.
#[inline(always)]
fn silu_mul_row<T: Real>(g: &[T], u: &[T], y: &mut [T]) {
    for ((o, &gv), &uv) in y.iter_mut().zip(g).zip(u) {
        *o = (gv * sigmoid(gv)) * uv;
    }
}

/// One row of the backward: `dg = d u s (1 + g (1 - s))`, `du = d g s`.
#[inline(always)]
fn silu_mul_row_bwd<T: Real>(g: &[T], u: &[T], d: &[T], dg: &mut [T], du: &mut [T]) {
    for ((((og, ou), &gv), &uv), &dv) in dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(d) {
        let s = sigmoid(gv);
        *og = dv * uv * (s * (T::one() + gv * (T::one() - s)));
        *ou = dv * (gv * s);
    }
}

struct SiluMul;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "fused-silu-mul"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        g_l: &Layout,
        u: &CpuStorage,
        u_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        reprpo_kernels::ran_cpu_kernel(self.name());
        fn run<T: Real>(g: &[T], u: &[T], row: usize) -> Vec<T> {
            let mut y = vec![T::zero(); g.len()];
            rows_par(g, row, &mut y, row, |r0, g, y| {
                silu_mul_row(g, &u[r0 * row..r0 * row + g.len()], y);
            });
            y
        }
        let n = self.name();
        let row = g_l.shape().dims().last().copied().unwrap_or(1).max(1);
        let out = match (g, u) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => {
                CpuStorage::F32(run(data::<f32>(g, g_l, n)?, data::<f32>(u, u_l, n)?, row))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_)) => {
                CpuStorage::F64(run(data::<f64>(g, g_l, n)?, data::<f64>(u, u_l, n)?, row))
            }
            _ => candle_core::bail!("{n}: needs f32 or f64 inputs of one dtype"),
        };
        Ok((out, g_l.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        d: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        fn run<T: Real>(
            gate: &Tensor,
            up: &Tensor,
            d: &Tensor,
            n: &str,
        ) -> candle_core::Result<(Tensor, Tensor)> {
            let len = gate.elem_count();
            let mut dg = vec![T::zero(); len];
            let mut du = vec![T::zero(); len];
            with_data::<T, _>(gate, n, |g| {
                with_data::<T, _>(up, n, |u| {
                    with_data::<T, _>(d, n, |d| {
                        par_pairs(len, &mut dg, &mut du, |off, dg, du| {
                            let r = off..off + dg.len();
                            silu_mul_row_bwd(&g[r.clone()], &u[r.clone()], &d[r], dg, du);
                        });
                        Ok(())
                    })
                })
            })?;
            Ok((
                Tensor::from_vec(dg, gate.shape(), gate.device())?,
                Tensor::from_vec(du, up.shape(), up.device())?,
            ))
        }
        let d = d.contiguous()?;
        let n = self.name();
        let (dg, du) = match gate.dtype() {
            DType::F32 => run::<f32>(gate, up, &d, n)?,
            DType::F64 => run::<f64>(gate, up, &d, n)?,
            dt => candle_core::bail!("{n}: unsupported dtype {dt:?}"),
        };
        Ok((Some(dg), Some(du)))
    }
}

/// Split two equally long output buffers into matching chunks and run `f(offset, a, b)` on them,
/// in parallel when large.
fn par_pairs<T: Send>(
    len: usize,
    a: &mut [T],
    b: &mut [T],
    f: impl Fn(usize, &mut [T], &mut [T]) + Sync,
) {
    let threads = rayon::current_num_threads().max(1);
    if len < PAR_MIN_ELEMS || threads == 1 {
        f(0, a, b);
        return;
    }
    let per = len.div_ceil(threads * 4).max(1);
    a.par_chunks_mut(per)
        .zip(b.par_chunks_mut(per))
        .enumerate()
        .for_each(|(i, (a, b))| f(i * per, a, b));
}

struct SiluMulPacked;

impl CustomOp1 for SiluMulPacked {
    fn name(&self) -> &'static str {
        "fused-silu-mul-packed"
    }

    fn cpu_fwd(&self, x: &CpuStorage, x_l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        reprpo_kernels::ran_cpu_kernel(self.name());
        fn run<T: Real>(x: &[T], i: usize) -> Vec<T> {
            let mut y = vec![T::zero(); x.len() / 2];
            rows_par(x, 2 * i, &mut y, i, |_, x, y| {
                for (xr, yr) in x.chunks_exact(2 * i).zip(y.chunks_exact_mut(i)) {
                    silu_mul_row(&xr[..i], &xr[i..], yr);
                }
            });
            y
        }
        let n = self.name();
        let mut dims = x_l.shape().dims().to_vec();
        let Some(last) = dims.last_mut() else {
            candle_core::bail!("{n}: needs at least one dimension");
        };
        let i = *last / 2;
        *last = i;
        let out = match x {
            CpuStorage::F32(_) => CpuStorage::F32(run(data::<f32>(x, x_l, n)?, i)),
            CpuStorage::F64(_) => CpuStorage::F64(run(data::<f64>(x, x_l, n)?, i)),
            _ => candle_core::bail!("{n}: needs f32 or f64"),
        };
        Ok((out, Shape::from(dims)))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, d: &Tensor) -> candle_core::Result<Option<Tensor>> {
        fn run<T: Real>(x: &Tensor, d: &Tensor, n: &str) -> candle_core::Result<Tensor> {
            let i = d.dim(D::Minus1)?;
            let mut dx = vec![T::zero(); x.elem_count()];
            with_data::<T, _>(x, n, |xs| {
                with_data::<T, _>(d, n, |ds| {
                    rows_par(ds, i, &mut dx, 2 * i, |r0, ds, dx| {
                        let xs = &xs[r0 * 2 * i..r0 * 2 * i + dx.len()];
                        for ((xr, dr), or) in xs
                            .chunks_exact(2 * i)
                            .zip(ds.chunks_exact(i))
                            .zip(dx.chunks_exact_mut(2 * i))
                        {
                            let (og, ou) = or.split_at_mut(i);
                            silu_mul_row_bwd(&xr[..i], &xr[i..], dr, og, ou);
                        }
                    });
                    Ok(())
                })
            })?;
            Tensor::from_vec(dx, x.shape(), x.device())
        }
        let d = d.contiguous()?;
        let n = self.name();
        Ok(Some(match x.dtype() {
            DType::F32 => run::<f32>(x, &d, n)?,
            DType::F64 => run::<f64>(x, &d, n)?,
            dt => candle_core::bail!("{n}: unsupported dtype {dt:?}"),
        }))
    }
}

// ---------------------------------------------------------------------------------------------
// Attention

/// Causal (grouped-query) attention for `q` `[B, H, T, D]`, `k`, `v` `[B, KV, S, D]` (H a
/// multiple of KV; query head h uses key/value head h / (H / KV), as `repeat_kv`) and an
/// additive `mask` `[B or 1, 1, T, S]`: `softmax(q k^T / sqrt(D) + mask) v` with scores and
/// softmax in f32, as `[B, T, H * D]` in `v`'s dtype.
///
/// The queries of the heads sharing a key/value head are stacked as rows of one matrix
/// (`[B, KV, rep * T, D]`), so keys and values are never repeated in memory.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (b, nh, t, hd) = q.dims4()?;
    let nkv = k.dim(1)?;
    let rep = nh / nkv.max(1);
    let scale = 1.0 / (hd as f64).sqrt();
    let q = q.contiguous()?.reshape((b, nkv, rep * t, hd))?;
    // `k` may arrive with any strides (Phi-3's partial rotary concatenates along the last
    // dimension, which candle lays out transposed); the batched matmul of the CPU and CUDA
    // backends needs its operands contiguous in the last two dimensions (`contiguous` is free
    // when it already is).
    let scores = q
        .to_dtype(DType::F32)?
        .matmul(&k.to_dtype(DType::F32)?.contiguous()?.t()?)?;
    let probs = masked_softmax(&scores, mask, scale)?.to_dtype(v.dtype())?;
    Ok(probs
        .matmul(v)?
        .reshape((b, nh, t, hd))?
        .transpose(1, 2)?
        .reshape((b, t, nh * hd))?)
}
