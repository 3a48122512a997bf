//! Small dense linear algebra that candle lacks: the inverse of a batch of small square
//! matrices, differentiable, for the Cayley transforms of BOFT and OFT.
//!
//! - Forward: Gauss-Jordan elimination with partial pivoting, per matrix, accumulated in f64
//!   (inputs f32 or f64; the result has the input's dtype). A singular (or non-finite) matrix is
//!   an error.
//! - Backward: for `X = A^-1`, `dX = -X dA X`, so `dL/dA = -X^T (dL/dX) X^T`, built from candle
//!   ops (so it runs on any device and is itself differentiable).
//! - Devices: the custom op computes on the CPU only. [`inverse`] moves a batch on another device
//!   to the CPU and back (`to_device` has a backward); the matrices here are tiny (a few blocks
//!   of 2..64 rows), so the round trip is cheap next to the layer they feed.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

use crate::error::{ModelError, Result};

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
/// On a device other than the CPU the batch is copied to the CPU, inverted there and copied
/// back; gradients flow through both copies.
pub fn inverse(a: &Tensor) -> Result<Tensor> {
    if !matches!(a.dtype(), DType::F32 | DType::F64) {
        return Err(ModelError::Invalid(format!(
            "inverse: dtype {:?} not supported (f32 or f64)",
            a.dtype()
        )));
    }
    let dev = a.device().clone();
    if dev.is_cpu() {
        Ok(a.contiguous()?.apply_op1(BatchedInverse)?)
    } else {
        let cpu = a.to_device(&Device::Cpu)?.contiguous()?;
        Ok(cpu.apply_op1(BatchedInverse)?.to_device(&dev)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

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
}
