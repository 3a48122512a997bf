//! `x W^T` for a frozen weight W whose backward returns only the input gradient `grad W`.
//!
//! candle's `matmul` backward always computes the gradient of both operands, also of a constant
//! weight: one extra weight-sized GEMM per linear layer per step and about one model's worth of
//! gradient memory (`../shared/docs/candle-notes.md`). This custom op computes the same forward
//! with candle's own CPU GEMM and gives W no gradient. On other devices the plain `matmul` is used
//! (same values, the extra gradient is still computed there).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Storage, Tensor};

use crate::error::Result;

struct FrozenMatmul {
    /// `[out, in]`, contiguous.
    w: Tensor,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, x: &CpuStorage, x_l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k) = x_l.shape().dims2()?;
        let (n, k2) = self.w.dims2()?;
        if k != k2 {
            candle_core::bail!("frozen-matmul: input has {k} features, weight expects {k2}");
        }
        let (guard, w_l) = self.w.storage_and_layout();
        let Storage::Cpu(w) = &*guard else {
            candle_core::bail!("frozen-matmul: weight is not on the CPU");
        };
        let wt_l = w_l.transpose(0, 1)?;
        let y = x.matmul(w, (1, m, n, k), x_l, &wt_l)?;
        Ok((y, Shape::from((m, n))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        // d(x W^T)/dx applied to grad_y: grad_y W. W gets nothing.
        Ok(Some(grad_y.matmul(&self.w.detach())?))
    }
}

/// `x W^T` for `x` `[m, in]` and a frozen `w` `[out, in]`; no gradient flows to `w`.
pub fn frozen_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && w.device().is_cpu() && x.dtype() == w.dtype() {
        let x = x.contiguous()?;
        let w = w.contiguous()?;
        Ok(x.apply_op1(FrozenMatmul { w })?)
    } else {
        Ok(x.matmul(&w.t()?)?)
    }
}
