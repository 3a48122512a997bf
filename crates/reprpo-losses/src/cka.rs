//! The `cka` variant's kernel on the CPU: linear CKA per layer and example over the real rows only,
//! three Gram matrices per example instead of four, and its own backward (one product per policy
//! tensor).
//!
//! For example `b`, let `R_c` be its positions with a real chosen token and `R_b ⊂ R_c` those where
//! the rejected token is real too. At every selected layer (batched over layers):
//! - retain: `X` = the rows `pi_cho[l,b,R_c,:]`, `Y` = `ref_cho[l,b,R_c,:]`, each centred by its mean
//!   over the rows; `K = X Xᵀ`, `G = Y Yᵀ` (`|R_c| x |R_c|`);
//! - reroute: `X' = pi_rej[l,b,R_b,:]` centred, `K' = X' X'ᵀ`, and `G'`, the Gram of
//!   `ref_cho[l,b,R_b,:]` centred over `R_b`, taken from `G` without another product: re-centring a
//!   subset of centred rows is double-centring their Gram block, `G' = C G[R_b, R_b] C` with
//!   `C = I - 11ᵀ / |R_b|`;
//! - `CKA = <K, G>_F / max(‖K‖_F ‖G‖_F, 1e-12)` and `d = 1 - CKA`, counted where the row set has
//!   at least two rows (as [`crate::reprpo::ReprPoVariant::Cka`] defines it).
//!
//! Backward, with `a` the upstream multiplier of `d` (per example: gradient times weight over the
//! mean's denominator): `∂d/∂K = -(G / den - CKA K / ‖K‖_F²)` (the `K` term 0 where the clamp is
//! active or `‖K‖_F = 0`, following the safe-norm convention), `∂d/∂X_centred = 2 (∂d/∂K) X_centred`,
//! and the centring's backward subtracts the column means; rows outside the row set get exactly 0,
//! and padded rows are never read.
//!
//! The forward runs on detached copies (f32, or f64 for f64 inputs; bf16 and f16 are computed in
//! f32) with candle's matmul, and the op of this module only attaches the precomputed parts to the
//! graph with the backward above. The unfused chain (four full-length Grams, the padded rows
//! zeroed, candle's autograd) is the reference it is tested against.

use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp2, D, DType, Layout, Shape, Tensor};

use crate::error::Result;

/// What the backward needs of one (example, term): the rows, the centred policy rows and Grams
/// (`[L, n, n]`), and per layer `CKA`, the clamped denominator and `‖K‖_F`.
struct Saved {
    rows: Tensor,
    xc: Tensor,
    k: Tensor,
    g: Tensor,
    cka: Vec<f64>,
    den: Vec<f64>,
    nk: Vec<f64>,
}

/// The op: inputs `pi_cho`, `pi_rej`; output the `[2B]` parts (reroute, then retain), precomputed.
struct CkaOp {
    /// The parts, in the output dtype.
    out: Tensor,
    b: usize,
    /// `(l, t, h)` of the inputs.
    dims: (usize, usize, usize),
    /// Retain and reroute terms per example, `None` where not counted.
    ret: Vec<Option<Saved>>,
    rr: Vec<Option<Saved>>,
    /// Weights over the denominator, per example.
    w_rr: Vec<f64>,
    w_ret: Vec<f64>,
}

/// The mean of `x` `[L, n, H]` over its rows, `[L, 1, H]`, as a product with a row of `1/n`
/// (candle's reduction over a middle dimension is a strided scalar loop, several times slower).
fn row_mean(x: &Tensor) -> Result<Tensor> {
    let (l, n, _) = x.dims3()?;
    let w = Tensor::full(1.0 / n as f64, (l, 1, n), x.device())?.to_dtype(x.dtype())?;
    Ok(w.matmul(x)?)
}

/// Centres `x` `[L, n, H]` over its rows.
fn centre(x: &Tensor) -> Result<Tensor> {
    Ok(x.broadcast_sub(&row_mean(x)?)?)
}

/// `X Xᵀ` per layer.
fn gram(x: &Tensor) -> Result<Tensor> {
    Ok(x.matmul(&x.t()?)?)
}

/// `sum` over the last two dimensions, per layer, on the host.
fn per_layer(x: &Tensor) -> Result<Vec<f64>> {
    Ok(x.sum(D::Minus1)?
        .sum(D::Minus1)?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?)
}

/// `1 - CKA` per layer and what the backward keeps.
fn term(rows: Tensor, xc: Tensor, k: Tensor, g: Tensor) -> Result<(Vec<f64>, Saved)> {
    let num = per_layer(&k.mul(&g)?)?;
    let nk: Vec<f64> = per_layer(&k.sqr()?)?.iter().map(|v| v.sqrt()).collect();
    let ng: Vec<f64> = per_layer(&g.sqr()?)?.iter().map(|v| v.sqrt()).collect();
    let den: Vec<f64> = nk
        .iter()
        .zip(&ng)
        .map(|(a, b)| (a * b).max(1e-12))
        .collect();
    let cka: Vec<f64> = num.iter().zip(&den).map(|(n, d)| n / d).collect();
    let d = cka.iter().map(|c| 1.0 - c).collect();
    Ok((
        d,
        Saved {
            rows,
            xc,
            k,
            g,
            cka,
            den,
            nk,
        },
    ))
}

/// Row indices as a `u32` tensor.
fn index(ix: &[usize], dev: &candle_core::Device) -> Result<Tensor> {
    let v: Vec<u32> = ix.iter().map(|&i| i as u32).collect();
    Ok(Tensor::from_vec(v, ix.len(), dev)?)
}

/// The reroute and retain parts of the `cka` variant (`[B]` each, f32 or f64, attached to the
/// graph of `pi_cho` and `pi_rej`), see the [module documentation](self).
///
/// `m_c`, `m_r`: host masks `[B, T]`; `v_rr`, `v_ret`: per-example weights.
///
/// # Shapes
/// Hidden states `[L, B, T, H]`; outputs `[B]`, `[B]`.
///
/// # Errors
/// Candle errors.
pub(crate) fn cka_parts(
    pi_cho: &Tensor,
    pi_rej: &Tensor,
    ref_cho: &Tensor,
    m_c: &[bool],
    m_r: &[bool],
    v_rr: &[f64],
    v_ret: &[f64],
) -> Result<(Tensor, Tensor)> {
    serial_if_small(pi_cho.elem_count(), || {
        cka_parts_impl(pi_cho, pi_rej, ref_cho, m_c, m_r, v_rr, v_ret)
    })
}

/// Below this many elements per hidden-state tensor the kernel's candle ops run on one thread.
/// At 3 x 2 x 64 x 256 (98k elements) the step took 1.2 ms on one thread and 2.1 ms on two: the
/// dozens of small products and elementwise ops per example each paid rayon's hand-over and the
/// idle thread's `sched_yield`.
const SERIAL_MAX_ELEMS: usize = 1 << 20;

/// Runs `f` in a one-thread rayon pool (candle's parallel loops and gemm's then run inline) when
/// `elems` is small; on the calling pool otherwise, or if the pool cannot be built.
fn serial_if_small<R: Send>(elems: usize, f: impl FnOnce() -> R + Send) -> R {
    static SERIAL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();
    let pool = SERIAL.get_or_init(|| rayon::ThreadPoolBuilder::new().num_threads(1).build().ok());
    match pool {
        Some(p) if elems < SERIAL_MAX_ELEMS && rayon::current_num_threads() > 1 => p.install(f),
        _ => f(),
    }
}

fn cka_parts_impl(
    pi_cho: &Tensor,
    pi_rej: &Tensor,
    ref_cho: &Tensor,
    m_c: &[bool],
    m_r: &[bool],
    v_rr: &[f64],
    v_ret: &[f64],
) -> Result<(Tensor, Tensor)> {
    let (l, b, t, h) = pi_cho.dims4()?;
    let dev = pi_cho.device();
    let wd = if pi_cho.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let work = |x: &Tensor| -> Result<Tensor> {
        Ok(x.detach()
            .to_dtype(wd)?
            .contiguous()?
            .reshape((l, b * t, h))?)
    };
    let (pc, pr, rc) = (work(pi_cho)?, work(pi_rej)?, work(ref_cho)?);
    let mut ret = Vec::with_capacity(b);
    let mut rr = Vec::with_capacity(b);
    let (mut sum_rr, mut sum_ret) = (vec![0.0; b], vec![0.0; b]);
    let (mut cnt_rr, mut cnt_ret) = (vec![false; b], vec![false; b]);
    for bi in 0..b {
        let rows_c: Vec<usize> = (0..t).filter(|&ti| m_c[bi * t + ti]).collect();
        // Positions of R_b within R_c, and within the sequence.
        let (pos_b, rows_b): (Vec<usize>, Vec<usize>) = rows_c
            .iter()
            .enumerate()
            .filter(|&(_, &ti)| m_r[bi * t + ti])
            .map(|(i, &ti)| (i, ti))
            .unzip();
        if rows_c.len() < 2 {
            ret.push(None);
            rr.push(None);
            continue;
        }
        let ic = index(&rows_c, dev)?;
        // Rows of example b: indices b T + t into the [L, B T, H] view.
        let pick = |x: &Tensor, rows: &[usize]| -> Result<Tensor> {
            let flat: Vec<usize> = rows.iter().map(|&ti| bi * t + ti).collect();
            Ok(x.index_select(&index(&flat, dev)?, 1)?)
        };
        let xc = centre(&pick(&pc, &rows_c)?)?;
        let yc = centre(&pick(&rc, &rows_c)?)?;
        let g = gram(&yc)?;
        let (d, saved) = term(ic, xc.clone(), gram(&xc)?, g.clone())?;
        sum_ret[bi] = d.iter().sum();
        cnt_ret[bi] = true;
        ret.push(Some(saved));
        if rows_b.len() < 2 {
            rr.push(None);
            continue;
        }
        let ib = index(&rows_b, dev)?;
        let xr = centre(&pick(&pr, &rows_b)?)?;
        let pb = index(&pos_b, dev)?;
        let gs = g.index_select(&pb, 1)?.index_select(&pb, 2)?;
        let g2 = gs
            .broadcast_sub(&gs.mean_keepdim(2)?)?
            .broadcast_sub(&gs.mean_keepdim(1)?)?
            .broadcast_add(&gs.mean_keepdim(2)?.mean_keepdim(1)?)?;
        let (d, saved) = term(ib, xr.clone(), gram(&xr)?, g2)?;
        sum_rr[bi] = d.iter().sum();
        cnt_rr[bi] = true;
        rr.push(Some(saved));
    }
    // Weighted masked means over the counted (l, b): denominators L sum_b v_b [counted].
    let den = |v: &[f64], cnt: &[bool]| -> f64 {
        let d: f64 = v
            .iter()
            .zip(cnt)
            .filter(|(_, c)| **c)
            .map(|(v, _)| v)
            .sum::<f64>()
            * l as f64;
        if d > 0.0 { d } else { 1.0 }
    };
    let (d_rr, d_ret) = (den(v_rr, &cnt_rr), den(v_ret, &cnt_ret));
    let w_rr: Vec<f64> = v_rr.iter().map(|v| v / d_rr).collect();
    let w_ret: Vec<f64> = v_ret.iter().map(|v| v / d_ret).collect();
    let mut parts = vec![0.0; 2 * b];
    for bi in 0..b {
        parts[bi] = w_rr[bi] * sum_rr[bi];
        parts[b + bi] = w_ret[bi] * sum_ret[bi];
    }
    let out = Tensor::from_vec(parts, 2 * b, dev)?.to_dtype(wd)?;
    let op = CkaOp {
        out,
        b,
        dims: (l, t, h),
        ret,
        rr,
        w_rr,
        w_ret,
    };
    let all = pi_cho.apply_op2(pi_rej, op)?;
    Ok((all.narrow(0, 0, b)?, all.narrow(0, b, b)?))
}

impl CkaOp {
    /// `∂/∂x` of one policy tensor (`[L, B, T, H]` in the working dtype): per example, the
    /// gradient of its term scattered into its rows.
    fn grad(&self, terms: &[Option<Saved>], a: &[f64], like: &Tensor) -> Result<Tensor> {
        let (l, t, h) = self.dims;
        let dev = like.device();
        let mut per_b = Vec::with_capacity(self.b);
        for (bi, s) in terms.iter().enumerate() {
            let zeros = Tensor::zeros((l, t, h), like.dtype(), dev)?;
            let Some(s) = s.as_ref().filter(|_| a[bi] != 0.0) else {
                per_b.push(zeros);
                continue;
            };
            // A = alpha G + beta K per layer.
            let alpha: Vec<f64> = s.den.iter().map(|d| -a[bi] / d).collect();
            let beta: Vec<f64> = (0..l)
                .map(|li| {
                    let nk = s.nk[li];
                    if s.den[li] > 1e-12 && nk > 0.0 {
                        a[bi] * s.cka[li] / (nk * nk)
                    } else {
                        0.0
                    }
                })
                .collect();
            let col = |v: Vec<f64>| -> Result<Tensor> {
                Ok(Tensor::from_vec(v, (l, 1, 1), dev)?.to_dtype(like.dtype())?)
            };
            let am =
                s.g.broadcast_mul(&col(alpha)?)?
                    .add(&s.k.broadcast_mul(&col(beta)?)?)?;
            let dxc = am.matmul(&s.xc)?.affine(2.0, 0.0)?;
            let dx = centre(&dxc)?;
            per_b.push(zeros.index_add(&s.rows, &dx, 1)?);
        }
        Ok(Tensor::stack(&per_b, 1)?)
    }
}

impl CustomOp2 for CkaOp {
    fn name(&self) -> &'static str {
        "reprpo-cka"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        reprpo_kernels::ran_cpu_kernel(self.name());
        let (s, _) = self.out.storage_and_layout();
        let candle_core::Storage::Cpu(s) = &*s else {
            candle_core::bail!("reprpo-cka: parts are not on the CPU");
        };
        Ok((s.clone(), self.out.shape().clone()))
    }

    fn bwd(
        &self,
        pc: &Tensor,
        pr: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let b = self.b;
        let g = grad.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        if g.len() != 2 * b {
            candle_core::bail!("reprpo-cka: gradient of length {}", g.len());
        }
        let a_rr: Vec<f64> = (0..b).map(|i| g[i] * self.w_rr[i]).collect();
        let a_ret: Vec<f64> = (0..b).map(|i| g[b + i] * self.w_ret[i]).collect();
        let wrap = |e: crate::error::LossError| candle_core::Error::Msg(e.to_string());
        serial_if_small(pc.elem_count(), || {
            self.bwd_impl(pc, pr, &a_rr, &a_ret, wrap)
        })
    }
}

impl CkaOp {
    fn bwd_impl(
        &self,
        pc: &Tensor,
        pr: &Tensor,
        a_rr: &[f64],
        a_ret: &[f64],
        wrap: impl Fn(crate::error::LossError) -> candle_core::Error,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let gc = if pc.track_op() {
            Some(
                self.grad(&self.ret, a_ret, &self.out)
                    .map_err(&wrap)?
                    .to_dtype(pc.dtype())?,
            )
        } else {
            None
        };
        let gr = if pr.track_op() {
            Some(
                self.grad(&self.rr, a_rr, &self.out)
                    .map_err(&wrap)?
                    .to_dtype(pr.dtype())?,
            )
        } else {
            None
        };
        Ok((gc, gr))
    }
}
