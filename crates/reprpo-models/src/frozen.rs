//! `x W^T` for a frozen weight W whose backward returns only the input gradient `grad W`.
//!
//! candle's `matmul` backward always computes the gradient of both operands, also of a constant
//! weight: one extra weight-sized GEMM per linear layer per step and about one model's worth of
//! gradient memory (`../shared/docs/candle-notes.md`). This custom op computes the same forward
//! with candle's own CPU GEMM and gives W no gradient. On other devices the plain `matmul` is used
//! (same values, the extra gradient is still computed there).
//!
//! [`lora_matmul`] does the same for a LoRA-adapted layer (`x W^T + s x A^T B^T` as one op with
//! its own backward); `adapter::Linear::forward` uses it for plain LoRA without dropout.
//!
//! [`quant_matmul`] is `x dequant(W)^T` for a quantised W ([`crate::quant`]): the forward
//! dequantises W into a temporary, multiplies and drops it; the backward dequantises it again
//! for `grad_x = grad_y dequant(W)` (as bitsandbytes' `MatMul4Bit` does), so the graph holds only
//! the packed weight; [`lora_quant_matmul`] is [`lora_matmul`] on such a weight, one node as well
//! (composing the two would keep the adapter branch's `[m, out]` output and sum for the
//! backward of every layer: +53% peak memory on the `small` bench). On other devices (or with the written-out switch) the dequantised weight is
//! a detached constant in a plain `matmul` (same values; the graph then keeps the dense copy).

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp3, DType, Device, Layout, Shape, Storage, Tensor,
};

use crate::error::Result;
use crate::quant::QuantTensor;

/// `x W^T` with a frozen W, dense or quantised (`frozen-matmul` / `quant-matmul` in traces).
struct FrozenMatmul {
    w: Frozen,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        match self.w {
            Frozen::Dense(_) => "frozen-matmul",
            Frozen::Quant(_) => "quant-matmul",
        }
    }

    fn cpu_fwd(&self, x: &CpuStorage, x_l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        reprpo_kernels::ran_cpu_kernel(self.name());
        let (m, k) = x_l.shape().dims2()?;
        let (n, k2) = self.w.dims2()?;
        if k != k2 {
            candle_core::bail!(
                "{}: input has {k} features, weight expects {k2}",
                self.name()
            );
        }
        let w = self.w.get(x.dtype(), &Device::Cpu)?;
        let (guard, w_l) = w.storage_and_layout();
        let Storage::Cpu(w) = &*guard else {
            candle_core::bail!("{}: weight is not on the CPU", self.name());
        };
        let y = if blocked(x.dtype(), n * k) {
            half_matmul_t(x, x_l, w, w_l)?
        } else {
            x.matmul(w, (1, m, n, k), x_l, &w_l.transpose(0, 1)?)?
        };
        Ok((y, Shape::from((m, n))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        // d(x W^T)/dx applied to grad_y: grad_y W. W gets nothing.
        let w = self.w.get(grad_y.dtype(), grad_y.device())?.detach();
        if grad_y.device().is_cpu() && blocked(w.dtype(), w.elem_count()) {
            return Ok(Some(half_matmul(grad_y, &w)?));
        }
        Ok(Some(grad_y.matmul(&w)?))
    }
}

/// Elements of f32 per block of a bf16 product with a large weight (64 MiB).
const HALF_BLOCK_ELEMS: usize = 1 << 24;

/// Whether a product with a weight of `elems` elements in `dtype` runs in blocks: candle's CPU
/// matmul has no bf16 kernel and widens both whole operands to f32, for an 8B model's output
/// head a 2 GiB temporary per product (f16 has gemm's own kernel).
fn blocked(dtype: DType, elems: usize) -> bool {
    dtype == DType::BF16 && elems > HALF_BLOCK_ELEMS
}

/// `x W^T` for bf16 `x` `[m, k]` and `W` `[n, k]` (contiguous): `x` widened once,
/// `W` in f32 blocks of rows, the f32 result narrowed once (the same values as candle's
/// whole-operand widening: one f32 GEMM per output element, one rounding).
fn half_matmul_t(
    x: &CpuStorage,
    x_l: &Layout,
    w: &CpuStorage,
    w_l: &Layout,
) -> candle_core::Result<CpuStorage> {
    let (m, k) = x_l.shape().dims2()?;
    let (n, _) = w_l.shape().dims2()?;
    let Some((w0, _)) = w_l.contiguous_offsets() else {
        candle_core::bail!("frozen-matmul: weight is not contiguous");
    };
    let xf = x.to_dtype(x_l, DType::F32)?;
    let xf_l = Layout::contiguous((m, k));
    let rows = (HALF_BLOCK_ELEMS / k.max(1)).clamp(1, n.max(1));
    let mut out = vec![0f32; m * n];
    for r0 in (0..n).step_by(rows) {
        let nb = rows.min(n - r0);
        let wf = w.to_dtype(
            &Layout::contiguous_with_offset((nb, k), w0 + r0 * k),
            DType::F32,
        )?;
        let wt_l = Layout::contiguous((nb, k)).transpose(0, 1)?;
        let CpuStorage::F32(y) = xf.matmul(&wf, (1, m, nb, k), &xf_l, &wt_l)? else {
            candle_core::bail!("frozen-matmul: f32 product of another dtype");
        };
        for (i, row) in y.chunks(nb.max(1)).enumerate() {
            out[i * n + r0..i * n + r0 + nb].copy_from_slice(row);
        }
    }
    CpuStorage::F32(out).to_dtype(&Layout::contiguous((m, n)), x.dtype())
}

/// `g W` for bf16 `g` `[m, n]` and `W` `[n, k]`, summed in f32 over blocks of `W`'s
/// rows and narrowed once (as [`half_matmul_t`]).
fn half_matmul(g: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let (m, n) = g.dims2()?;
    let k = w.dim(1)?;
    let rows = (HALF_BLOCK_ELEMS / k.max(1)).clamp(1, n.max(1));
    let mut acc = Tensor::zeros((m, k), DType::F32, g.device())?;
    for r0 in (0..n).step_by(rows) {
        let nb = rows.min(n - r0);
        let gb = g.narrow(1, r0, nb)?.to_dtype(DType::F32)?;
        let wb = w.narrow(0, r0, nb)?.to_dtype(DType::F32)?;
        acc = (acc + gb.matmul(&wb)?)?;
    }
    acc.to_dtype(g.dtype())
}

/// `x W^T` for `x` `[m, in]` and a frozen `w` `[out, in]`; no gradient flows to `w`.
pub fn frozen_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if reprpo_kernels::fused_cpu(x.device()) && w.device().is_cpu() && x.dtype() == w.dtype() {
        let x = x.contiguous()?;
        let w = Frozen::Dense(w.contiguous()?);
        Ok(x.apply_op1(FrozenMatmul { w })?)
    } else {
        Ok(x.matmul(&w.t()?)?)
    }
}

/// `x W^T + s (x A^T) B^T` for a frozen `W` `[out, in]` and LoRA factors `A` `[r, in]`,
/// `B` `[out, r]`: one node in the graph instead of about ten, and a backward that writes each
/// gradient once (`dx = g W + s (g B) A`, `dA = s (g B)^T x`, `dB = s g^T (x A^T)`).
struct LoraMatmul {
    w: Frozen,
    scale: f64,
}

/// The frozen weight of a fused op: dense (`[out, in]`, contiguous), or quantised and
/// dequantised where the op needs it (forward and backward), never kept.
enum Frozen {
    Dense(Tensor),
    Quant(Arc<QuantTensor>),
}

impl Frozen {
    /// `[out, in]` in `dtype` on `device`.
    fn get(&self, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        match self {
            Frozen::Dense(w) => Ok(w.clone()),
            Frozen::Quant(q) => q
                .dequantize(dtype, device)
                .map_err(candle_core::Error::wrap),
        }
    }

    /// `(out, in)`.
    fn dims2(&self) -> candle_core::Result<(usize, usize)> {
        match self {
            Frozen::Dense(w) => w.dims2(),
            Frozen::Quant(q) => Ok(q.shape()),
        }
    }
}

/// `lhs rhs^T` (both 2-D) with candle's CPU GEMM.
fn cpu_matmul_t(
    lhs: &CpuStorage,
    lhs_l: &Layout,
    rhs: &CpuStorage,
    rhs_l: &Layout,
) -> candle_core::Result<CpuStorage> {
    let (m, k) = lhs_l.shape().dims2()?;
    let (n, k2) = rhs_l.shape().dims2()?;
    if k != k2 {
        candle_core::bail!("lora-matmul: inner dimensions {k} and {k2} differ");
    }
    lhs.matmul(rhs, (1, m, n, k), lhs_l, &rhs_l.transpose(0, 1)?)
}

impl CustomOp3 for LoraMatmul {
    fn name(&self) -> &'static str {
        "lora-matmul"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        a: &CpuStorage,
        a_l: &Layout,
        b: &CpuStorage,
        b_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        reprpo_kernels::ran_cpu_kernel(self.name());
        let (m, _) = x_l.shape().dims2()?;
        let n = self.w.dims2()?.0;
        let w = self.w.get(x.dtype(), &Device::Cpu)?;
        let (guard, w_l) = w.storage_and_layout();
        let Storage::Cpu(w) = &*guard else {
            candle_core::bail!("lora-matmul: weight is not on the CPU");
        };
        let base = cpu_matmul_t(x, x_l, w, w_l)?;
        let u = cpu_matmul_t(x, x_l, a, a_l)?;
        let u_l = Layout::contiguous(Shape::from((m, a_l.shape().dims2()?.0)));
        let lora = cpu_matmul_t(&u, &u_l, b, b_l)?;
        // base + (lora * s), in place: the same rounding as the written-out version.
        let y = match (base, lora) {
            (CpuStorage::F32(mut y), CpuStorage::F32(l)) => {
                let s = self.scale as f32;
                y.iter_mut().zip(&l).for_each(|(y, &l)| *y += l * s);
                CpuStorage::F32(y)
            }
            (CpuStorage::F64(mut y), CpuStorage::F64(l)) => {
                let s = self.scale;
                y.iter_mut().zip(&l).for_each(|(y, &l)| *y += l * s);
                CpuStorage::F64(y)
            }
            _ => candle_core::bail!("lora-matmul: needs f32 or f64"),
        };
        Ok((y, Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x, a, b) = (x.detach(), a.detach(), b.detach());
        let g = g.contiguous()?;
        // The adapter branch's output gradient is s g; push s through the rank-r side.
        let du = (g.matmul(&b)? * self.scale)?;
        let w = self.w.get(g.dtype(), g.device())?;
        let dx = (g.matmul(&w)? + du.matmul(&a)?)?;
        let da = du.t()?.matmul(&x)?;
        let u = x.matmul(&a.t()?)?;
        let db = (g.t()?.matmul(&u)? * self.scale)?;
        Ok((Some(dx), Some(da), Some(db)))
    }
}

/// `x W^T + s (x A^T) B^T` for `x` `[m, in]`, a frozen `w` `[out, in]` and LoRA factors `a`
/// `[r, in]`, `b` `[out, r]` (trainable; both get gradients, `w` none). Fused on the CPU for f32
/// and f64 when all four share the dtype; elsewhere written out (same values and gradients).
pub fn lora_matmul(x: &Tensor, w: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    let dt = x.dtype();
    let same = [w, a, b]
        .iter()
        .all(|t| t.dtype() == dt && t.device().is_cpu());
    if reprpo_kernels::fused_cpu(x.device()) && same && matches!(dt, DType::F32 | DType::F64) {
        let x = x.contiguous()?;
        Ok(x.apply_op3(
            &a.contiguous()?,
            &b.contiguous()?,
            LoraMatmul {
                w: Frozen::Dense(w.contiguous()?),
                scale,
            },
        )?)
    } else {
        let base = frozen_matmul(x, w)?;
        let lora = (x.matmul(&a.t()?)?.matmul(&b.t()?)? * scale)?;
        Ok((base + lora)?)
    }
}

/// [`lora_matmul`] on a quantised frozen weight: `x dequant(W)^T + s (x A^T) B^T`, one node
/// whose forward and backward dequantise W into a temporary (module docs); written out with
/// [`quant_matmul`] where the fused op does not apply.
pub fn lora_quant_matmul(
    x: &Tensor,
    q: &Arc<QuantTensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let dt = x.dtype();
    let same = [a, b]
        .iter()
        .all(|t| t.dtype() == dt && t.device().is_cpu());
    if reprpo_kernels::fused_cpu(x.device()) && same && matches!(dt, DType::F32 | DType::F64) {
        let x = x.contiguous()?;
        Ok(x.apply_op3(
            &a.contiguous()?,
            &b.contiguous()?,
            LoraMatmul {
                w: Frozen::Quant(q.clone()),
                scale,
            },
        )?)
    } else {
        let base = quant_matmul(x, q)?;
        let lora = (x.matmul(&a.t()?)?.matmul(&b.t()?)? * scale)?;
        Ok((base + lora)?)
    }
}

/// `x dequant(W)^T` for `x` `[m, in]` and a quantised frozen `W` `[out, in]`, in `x`'s dtype; no
/// gradient flows to `W` (module docs).
pub fn quant_matmul(x: &Tensor, q: &Arc<QuantTensor>) -> Result<Tensor> {
    if reprpo_kernels::fused_cpu(x.device())
        && matches!(
            x.dtype(),
            DType::F32 | DType::F64 | DType::BF16 | DType::F16
        )
    {
        let x = x.contiguous()?;
        let w = Frozen::Quant(q.clone());
        Ok(x.apply_op1(FrozenMatmul { w })?)
    } else {
        let w = q.dequantize(x.dtype(), x.device())?;
        Ok(x.matmul(&w.t()?)?)
    }
}
