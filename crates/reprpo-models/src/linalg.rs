//! Small dense linear algebra that candle lacks: the inverse of a batch of small square
//! matrices, differentiable, for the Cayley transforms of BOFT and OFT.
//!
//! [`inverse`] takes one of two paths, chosen by [`reprpo_kernels::fused_cpu`]:
//!
//! - Fused CPU (the CPU, outside [`reprpo_kernels::written_out`]): a custom op. Forward:
//!   Gauss-Jordan elimination with partial pivoting, per matrix, accumulated in f64 (inputs f32
//!   or f64; the result has the input's dtype); a singular (or non-finite) matrix is an error.
//!   Backward: for `X = A^-1`, `dX = -X dA X`, so `dL/dA = -X^T (dL/dX) X^T`, built from candle
//!   ops (so it is itself differentiable).
//! - Device (every other device, and the CPU inside `written_out`): batched Newton-Schulz built
//!   only from candle tensor ops (abs, sums, maxima, matmul, elementwise), computed in the
//!   input's dtype, with no read back to the host. See [`inverse`] for what it converges for
//!   and what it returns when it does not.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

use crate::error::{ModelError, Result};

/// Newton-Schulz iterations of the device path run without a graph, before its one
/// differentiable step (so `NS_ITERS + 1` steps in all; see [`inverse`]).
pub const NS_ITERS: usize = 17;

/// The device path's acceptance bound on `max |I - A X|` for the detached Newton-Schulz iterate
/// `X` (per dtype); a matrix beyond it comes back as NaN. See [`inverse`].
pub fn device_tolerance(dtype: DType) -> f64 {
    if dtype == DType::F64 { 1e-10 } else { 1e-4 }
}

/// The custom op: inverts every `[n, n]` matrix of a `[..., n, n]` tensor.
#[derive(Debug, Clone, Copy)]
struct BatchedInverse;

/// The inverse of each `n x n` matrix of the row-major batch `src`.
fn invert_all(src: &[f64], n: usize) -> std::result::Result<Vec<f64>, String> {
    let mut out = vec![0.0f64; src.len()];
    if n == 0 {
        return Ok(out);
    }
    let mut a = vec![0.0f64; n * n];
    for (m, (s, o)) in src.chunks(n * n).zip(out.chunks_mut(n * n)).enumerate() {
        a.copy_from_slice(s);
        o.fill(0.0);
        for i in 0..n {
            o[i * n + i] = 1.0;
        }
        for col in 0..n {
            // Partial pivoting: the largest entry of this column at or below the diagonal.
            let mut p = col;
            let mut best = a[col * n + col].abs();
            for r in col + 1..n {
                let v = a[r * n + col].abs();
                if v > best {
                    best = v;
                    p = r;
                }
            }
            if best == 0.0 || !best.is_finite() {
                return Err(format!(
                    "matrix {m} of the batch is singular or not finite (column {col})"
                ));
            }
            if p != col {
                for j in 0..n {
                    a.swap(p * n + j, col * n + j);
                    o.swap(p * n + j, col * n + j);
                }
            }
            let inv_pivot = 1.0 / a[col * n + col];
            for j in 0..n {
                a[col * n + j] *= inv_pivot;
                o[col * n + j] *= inv_pivot;
            }
            for r in 0..n {
                if r == col {
                    continue;
                }
                let f = a[r * n + col];
                if f == 0.0 {
                    continue;
                }
                for j in 0..n {
                    a[r * n + j] -= f * a[col * n + j];
                    o[r * n + j] -= f * o[col * n + j];
                }
            }
        }
    }
    Ok(out)
}

impl CustomOp1 for BatchedInverse {
    fn name(&self) -> &'static str {
        "batched-inverse"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        reprpo_kernels::ran_cpu_kernel(self.name());
        let dims = layout.shape().dims();
        let n = match dims {
            [.., a, b] if a == b => *b,
            _ => candle_core::bail!("batched-inverse: expected [..., n, n], got {dims:?}"),
        };
        let Some((o1, o2)) = layout.contiguous_offsets() else {
            candle_core::bail!("batched-inverse: the input must be contiguous");
        };
        let out = match storage {
            CpuStorage::F32(s) => {
                let x: Vec<f64> = s[o1..o2].iter().map(|&v| f64::from(v)).collect();
                let inv = invert_all(&x, n).map_err(candle_core::Error::Msg)?;
                CpuStorage::F32(inv.into_iter().map(|v| v as f32).collect())
            }
            CpuStorage::F64(s) => {
                CpuStorage::F64(invert_all(&s[o1..o2], n).map_err(candle_core::Error::Msg)?)
            }
            other => candle_core::bail!(
                "batched-inverse: dtype {:?} not supported (f32 or f64)",
                other.dtype()
            ),
        };
        Ok((out, layout.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        // dL/dA = -X^T G X^T with X = A^-1.
        let xt = res.t()?.contiguous()?;
        let g = grad_res.contiguous()?;
        Ok(Some(xt.matmul(&g)?.matmul(&xt)?.neg()?))
    }
}

/// The inverse of every `[n, n]` matrix of `a` (`[..., n, n]`, f32 or f64), with a backward.
///
/// On the CPU (outside [`reprpo_kernels::written_out`]) this is the exact custom op (see the
/// module docs); a singular matrix is an error. Everywhere else it is the device path, which
/// never reads back to the host:
///
/// 1. `X_0 = A^T / (||A||_1 ||A||_inf)` per matrix (both norms from device ops);
/// 2. [`NS_ITERS`] Newton-Schulz steps `X_{k+1} = X_k (2I - A X_k)` on the detached `A`;
/// 3. one differentiable step `out = X (2I - A X)` with `X` detached, whose gradient with
///    respect to `A` is `-X^T G X^T`: the exact inverse gradient at `X = A^-1`;
/// 4. each matrix whose `X` has `r = max |I - A X| > `[`device_tolerance`] (1e-4 in f32,
///    1e-10 in f64; `A X` is the product step 3 computes anyway) is replaced by NaN.
///
/// Accuracy: the value's residual is `I - A out = (I - A X)^2`, so at most about `n r^2` plus
/// rounding; the gradient is the exact formula at `X`, so its relative error is about `r` (times
/// the condition number). Both are at rounding level (`n eps cond(A)` in the input's dtype)
/// inside the bound below.
///
/// Convergence: with `X_0` as above, `R_k = I - A X_k = R_0^(2^k)` and `R_0` is symmetric with
/// eigenvalues in `[0, 1 - 1/kappa]`, `kappa = ||A||_1 ||A||_inf / sigma_min(A)^2` (at least the
/// squared 2-norm condition number, at most `n` times it). So
/// `r <= ||R_K||_2 <= exp(-2^NS_ITERS / kappa)`, below the tolerance when
/// `kappa <= 2^17 / ln(1 / tol)`: about 14,200 in f32 and 5,700 in f64. For the Cayley
/// matrices `I + S` that BOFT and OFT invert (`S` skew-symmetric, so every singular value is
/// at least 1), `kappa <= (1 + ||S||_1)^2`: the bound holds whenever the largest column sum of
/// `|S|` is at most 74 (f64) or 118 (f32). Adapters start at `S = 0` (`X_0 = A^-1` exactly);
/// a 2x2 block reaches `||S||_1 = 74` only at a rotation of 178.5 degrees.
///
/// When the bound fails (a singular, nearly singular or non-finite matrix, or a Cayley block
/// beyond it) the result is NaN for that matrix, not an error: deciding it on the host would
/// read the residual back on every call. A NaN reaches the loss, and the trainer's non-finite
/// check stops the run; the run never continues on a silently inaccurate inverse.
pub fn inverse(a: &Tensor) -> Result<Tensor> {
    if !matches!(a.dtype(), DType::F32 | DType::F64) {
        return Err(ModelError::Invalid(format!(
            "inverse: dtype {:?} not supported (f32 or f64)",
            a.dtype()
        )));
    }
    if reprpo_kernels::fused_cpu(a.device()) {
        Ok(a.contiguous()?.apply_op1(BatchedInverse)?)
    } else {
        inverse_device(a)
    }
}

/// The device path of [`inverse`] (batched Newton-Schulz); see there.
fn inverse_device(a: &Tensor) -> Result<Tensor> {
    let dims = a.dims().to_vec();
    let n = match dims.as_slice() {
        [.., r, c] if r == c => *c,
        _ => {
            return Err(ModelError::Invalid(format!(
                "inverse: expected [..., n, n], got {dims:?}"
            )));
        }
    };
    let m: usize = dims[..dims.len() - 2].iter().product();
    if n == 0 || m == 0 {
        return Ok(a.zeros_like()?);
    }
    let (dt, dev) = (a.dtype(), a.device());
    let a3 = a.reshape((m, n, n))?;
    let ad = a3.detach();
    let eye = Tensor::eye(n, dt, dev)?;
    let two_eye = (&eye * 2.0)?;
    let abs = ad.abs()?;
    // ||A||_1 (largest column sum) times ||A||_inf (largest row sum), per matrix: [m, 1, 1].
    let norm_1 = abs.sum_keepdim(1)?.max_keepdim(2)?;
    let norm_inf = abs.sum_keepdim(2)?.max_keepdim(1)?;
    let mut x = ad.transpose(1, 2)?.broadcast_div(&(norm_1 * norm_inf)?)?;
    for _ in 0..NS_ITERS {
        x = x.matmul(&two_eye.broadcast_sub(&ad.matmul(&x)?)?)?;
    }
    let ax = a3.matmul(&x)?;
    let out = x.matmul(&two_eye.broadcast_sub(&ax)?)?;
    // The residual of the detached X (what the gradient uses): `max |I - A X|` per matrix.
    let residual = eye
        .broadcast_sub(&ax.detach())?
        .abs()?
        .flatten_from(1)?
        .max_keepdim(1)?;
    // `le` is false for NaN, so a non-finite residual also poisons the matrix.
    let ok = residual
        .le(device_tolerance(dt))?
        .reshape((m, 1, 1))?
        .broadcast_as((m, n, n))?;
    let nan = Tensor::zeros((m, 1, 1), dt, dev)?
        .affine(0.0, f64::NAN)?
        .broadcast_as((m, n, n))?;
    Ok(ok.where_cond(&out, &nan)?.reshape(dims)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_abs(t: &Tensor) -> f64 {
        t.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// A batch of well-conditioned, non-symmetric matrices (with a row swap needed).
    fn batch() -> Tensor {
        use rand::{Rng, SeedableRng};
        let dev = Device::Cpu;
        // Seeded, so the conditioning (and so the f32 tolerance below) is the same every run.
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let vals: Vec<f64> = (0..75).map(|_| rng.random_range(-0.6..0.6)).collect();
        let r = Tensor::from_vec(vals, (3, 5, 5), &dev).unwrap();
        let eye = Tensor::eye(5, DType::F64, &dev).unwrap();
        let a = r.broadcast_add(&eye).unwrap();
        // Make matrix 0 need pivoting: a zero in its top-left corner.
        let mut v = a.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        v[0] = 0.0;
        Tensor::from_vec(v, (3, 5, 5), &dev).unwrap()
    }

    #[test]
    fn inverse_times_matrix_is_identity() {
        let a = batch();
        let x = inverse(&a).unwrap();
        let eye = Tensor::eye(5, DType::F64, &Device::Cpu).unwrap();
        let e1 = max_abs(&a.matmul(&x).unwrap().broadcast_sub(&eye).unwrap());
        let e2 = max_abs(&x.matmul(&a).unwrap().broadcast_sub(&eye).unwrap());
        assert!(e1 < 1e-12 && e2 < 1e-12, "A X - I: {e1}, X A - I: {e2}");
        // f32 goes through f64 internally.
        let x32 = inverse(&a.to_dtype(DType::F32).unwrap()).unwrap();
        assert_eq!(x32.dtype(), DType::F32);
        // Relative to the inverse's scale: rounding A to f32 (2^-24) times the condition number.
        let d = max_abs(&(x32.to_dtype(DType::F64).unwrap() - &x).unwrap()) / max_abs(&x);
        assert!(d < 1e-5, "f32 vs f64 inverse: relative {d}");
    }

    #[test]
    fn singular_is_an_error() {
        let a = Tensor::zeros((1, 3, 3), DType::F32, &Device::Cpu).unwrap();
        let err = inverse(&a).unwrap_err().to_string();
        assert!(err.contains("singular"), "{err}");
        let b = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        assert!(inverse(&b).is_err());
    }

    /// The backward against central finite differences in f64, for L = sum(X * C) with a fixed
    /// random C (so every entry of dL/dX differs).
    #[test]
    fn gradient_matches_finite_differences() {
        let dev = Device::Cpu;
        let a0 = batch();
        let c = Tensor::randn(0f64, 1.0, (3, 5, 5), &dev).unwrap();
        let loss = |a: &Tensor| -> f64 {
            (inverse(a).unwrap() * &c)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let var = Var::from_tensor(&a0).unwrap();
        let l = (inverse(var.as_tensor()).unwrap() * &c)
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = l.backward().unwrap();
        let g = grads.get(var.as_tensor()).unwrap();
        let g = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let base = a0.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let h = 1e-6;
        let mut worst = 0.0f64;
        let scale = g.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        for i in 0..base.len() {
            let mut p = base.clone();
            p[i] += h;
            let mut m = base.clone();
            m[i] -= h;
            let lp = loss(&Tensor::from_vec(p, (3, 5, 5), &dev).unwrap());
            let lm = loss(&Tensor::from_vec(m, (3, 5, 5), &dev).unwrap());
            let fd = (lp - lm) / (2.0 * h);
            worst = worst.max((fd - g[i]).abs());
        }
        assert!(scale > 0.1, "gradient scale {scale}");
        assert!(
            worst / scale < 1e-7,
            "max |fd - analytic| = {worst} (scale {scale})"
        );
    }

    /// `inverse(a)` and the gradient of `sum(inverse(a) * c)` with respect to `a`, on the fused
    /// CPU path or (`device`) the device path, in `a`'s dtype.
    fn value_and_grad(a: &Tensor, c: &Tensor, device: bool) -> (Tensor, Tensor) {
        let run = || {
            let var = Var::from_tensor(a).unwrap();
            let x = inverse(var.as_tensor()).unwrap();
            let l = (&x * c.to_dtype(a.dtype()).unwrap())
                .unwrap()
                .sum_all()
                .unwrap();
            let g = l.backward().unwrap().get(var.as_tensor()).unwrap().clone();
            (x, g)
        };
        if device {
            reprpo_kernels::written_out(run)
        } else {
            run()
        }
    }

    /// Max |a - b| / max |b|, in f64.
    fn rel(a: &Tensor, b: &Tensor) -> f64 {
        let a = a.to_dtype(DType::F64).unwrap();
        let b = b.to_dtype(DType::F64).unwrap();
        max_abs(&(&a - &b).unwrap()) / max_abs(&b)
    }

    /// The device path (Newton-Schulz, under `written_out`) against the CPU op on the test batch
    /// (which needs pivoting on the CPU): values and gradients, max abs difference relative to
    /// the CPU op's max abs entry. f64: 1e-12 (Newton-Schulz converges to the CPU op's result up
    /// to rounding; seen 6e-16). f32: 2e-6 (f32 arithmetic throughout against the CPU op's f64
    /// accumulation, about `n eps cond`; seen 2.5e-7).
    #[test]
    fn device_path_matches_cpu_op_on_test_batch() {
        let a = batch();
        let c = Tensor::randn(0f64, 1.0, (3, 5, 5), &Device::Cpu).unwrap();
        for (dt, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-6)] {
            let a = a.to_dtype(dt).unwrap();
            let (x_cpu, g_cpu) = value_and_grad(&a, &c, false);
            let (x_dev, g_dev) = value_and_grad(&a, &c, true);
            assert_eq!((x_dev.dtype(), g_dev.dtype()), (dt, dt));
            let (ex, eg) = (rel(&x_dev, &x_cpu), rel(&g_dev, &g_cpu));
            eprintln!("{dt:?}: value {ex:.2e}, gradient {eg:.2e}");
            assert!(ex < tol && eg < tol, "{dt:?}: value {ex}, gradient {eg}");
        }
    }

    /// On the device path a singular or non-finite matrix gives NaN for that matrix only (no
    /// host read to raise an error); bf16 and non-square inputs stay errors.
    #[test]
    fn device_path_poisons_singular_matrices_with_nan() {
        let dev = Device::Cpu;
        let good = batch().get(1).unwrap();
        let zero = Tensor::zeros((5, 5), DType::F64, &dev).unwrap();
        // Rank 4: the last row repeats the first.
        let rank4 = {
            let g = good.to_vec2::<f64>().unwrap();
            let mut r = g.clone();
            r[4] = g[0].clone();
            Tensor::new(r, &dev).unwrap()
        };
        let inf = good.affine(1.0, f64::INFINITY).unwrap();
        let a = Tensor::stack(&[&good, &zero, &rank4, &inf], 0).unwrap();
        for dt in [DType::F64, DType::F32] {
            let x = reprpo_kernels::written_out(|| inverse(&a.to_dtype(dt).unwrap())).unwrap();
            let x = x.to_dtype(DType::F64).unwrap();
            let nan = |i: usize| -> Vec<bool> {
                x.get(i)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()
                    .iter()
                    .map(|v| v.is_nan())
                    .collect()
            };
            assert!(nan(0).iter().all(|b| !b), "{dt:?}: the good matrix");
            for i in 1..4 {
                assert!(
                    nan(i).iter().all(|b| *b),
                    "{dt:?}: matrix {i} must be all NaN"
                );
            }
        }
        reprpo_kernels::written_out(|| {
            let bf = Tensor::eye(3, DType::BF16, &dev).unwrap();
            assert!(inverse(&bf).unwrap_err().to_string().contains("BF16"));
            let b = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
            assert!(inverse(&b).is_err());
        });
    }
}
