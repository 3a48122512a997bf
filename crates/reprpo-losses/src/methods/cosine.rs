//! The per-position cosine of two activation tensors, for the metrics the reference logs around
//! every method loss (`retain_cosine`, `rr_cosine`; detached, so forward only):
//! `cos[..] = Σ_h (x_h / max(‖x‖, 1e-8)) (y_h / max(‖y‖, 1e-8))` over the last dimension (PyTorch
//! ≥ 2's `cosine_similarity`), in f32.
//!
//! On the CPU (outside `reprpo_kernels::written_out`) one pass over each pair of rows (`x·y`,
//! `‖x‖²`, `‖y‖²` in f32 lanes, the quotient in f64) instead of the chain's casts to f32, the two
//! unit tensors, their product and its sum (five full-size temporaries per key); elsewhere the
//! chain ([`super::cos_t`] on f32 copies).

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor, WithDType};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::error::Result;
use crate::fused::rows::{Elem, stats4};

/// Below this many input elements the op runs on the calling thread.
const PAR_MIN_ELEMS: usize = 1 << 15;

struct RowCosines {
    h: usize,
}

impl RowCosines {
    fn fwd<E: Elem>(&self, x: &[E], y: &[E]) -> Vec<f32> {
        let h = self.h.max(1);
        let cos = |(rx, ry): (&[E], &[E])| -> f32 {
            let [_, dot, nx2, ny2] = stats4(rx, ry);
            (dot / (nx2.sqrt().max(1e-8) * ny2.sqrt().max(1e-8))) as f32
        };
        if x.len() < PAR_MIN_ELEMS {
            x.chunks(h).zip(y.chunks(h)).map(cos).collect()
        } else {
            x.par_chunks(h).zip(y.par_chunks(h)).map(cos).collect()
        }
    }
}

fn data<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [T]> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("row-cosines: input is not contiguous");
    };
    Ok(&T::cpu_storage_as_slice(s)?[start..end])
}

impl CustomOp2 for RowCosines {
    fn name(&self) -> &'static str {
        "row-cosines"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        reprpo_kernels::ran_cpu_kernel(self.name());
        if l1.dims() != l2.dims() {
            candle_core::bail!("row-cosines: shapes {:?} and {:?}", l1.dims(), l2.dims());
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => {
                self.fwd::<f32>(data(s1, l1)?, data(s2, l2)?)
            }
            (CpuStorage::F64(_), CpuStorage::F64(_)) => {
                self.fwd::<f64>(data(s1, l1)?, data(s2, l2)?)
            }
            (CpuStorage::BF16(_), CpuStorage::BF16(_)) => {
                self.fwd::<bf16>(data(s1, l1)?, data(s2, l2)?)
            }
            (CpuStorage::F16(_), CpuStorage::F16(_)) => {
                self.fwd::<f16>(data(s1, l1)?, data(s2, l2)?)
            }
            _ => candle_core::bail!(
                "row-cosines: needs two f32, f64, bf16 or f16 inputs of one dtype"
            ),
        };
        let dims = l1.dims();
        Ok((CpuStorage::F32(out), Shape::from(&dims[..dims.len() - 1])))
    }
}

/// `cos(x, y)` over the last dimension (module docs), `x.dims()` without it, f32, detached.
pub(crate) fn row_cosines(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    let fused = reprpo_kernels::fused_cpu(x.device())
        && x.dtype() == y.dtype()
        && x.dims() == y.dims()
        && x.rank() >= 1
        && matches!(
            x.dtype(),
            DType::F32 | DType::F64 | DType::BF16 | DType::F16
        );
    if !fused {
        return super::cos_t(
            &x.detach().to_dtype(DType::F32)?,
            &y.detach().to_dtype(DType::F32)?,
        );
    }
    let h = x.dims()[x.rank() - 1];
    let (x, y) = (x.detach().contiguous()?, y.detach().contiguous()?);
    Ok(x.apply_op2_no_bwd(&y, &RowCosines { h })?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use candle_core::{DType, Device, Tensor};

    use super::row_cosines;

    /// Seeded `[3, 300, 40]` pairs (the threaded path) with a zero row, a NaN row and a row pair
    /// that is parallel.
    fn pair() -> (Vec<f32>, Vec<f32>) {
        let n = 3 * 300 * 40;
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        let x: Vec<f32> = (0..n).map(|_| next()).collect();
        let mut y: Vec<f32> = (0..n).map(|_| next()).collect();
        let mut x = x;
        x[..40].fill(0.0);
        y[40..80].fill(f32::NAN);
        for i in 80..120 {
            y[i] = 3.0 * x[i];
        }
        (x, y)
    }

    #[test]
    fn fused_cosines_equal_the_chain() {
        let (x, y) = pair();
        for dt in [DType::F32, DType::F64, DType::BF16, DType::F16] {
            let t = |v: &[f32]| {
                Tensor::from_vec(v.to_vec(), (3, 300, 40), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dt)
                    .unwrap()
            };
            let (xt, yt) = (t(&x), t(&y));
            let (got, ops) = reprpo_kernels::trace_cpu_kernels(|| row_cosines(&xt, &yt).unwrap());
            assert_eq!(ops, ["row-cosines"], "{dt:?}");
            let want = reprpo_kernels::written_out(|| row_cosines(&xt, &yt).unwrap());
            assert_eq!(got.dims(), [3, 300]);
            assert_eq!(got.dtype(), DType::F32);
            let g: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
            let w: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(g[0], 0.0, "{dt:?}: zero row");
            assert!(g[1].is_nan() && w[1].is_nan(), "{dt:?}: NaN row");
            // Exactly parallel in f32 / f64; `3 x` rounded to 16 bits is off by ~1e-6 in cosine.
            assert!((g[2] - 1.0).abs() < 1e-5, "{dt:?}: parallel rows {}", g[2]);
            for (i, (a, b)) in g.iter().zip(&w).enumerate().skip(2) {
                assert!((a - b).abs() <= 1e-6, "{dt:?} row {i}: {a} vs {b}");
            }
        }
    }
}
