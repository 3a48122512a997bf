//! Masked mean pooling over tokens on the CPU, one pass with its own backward: the first step of
//! token reduction `mean` ([`crate::reprpo::TokenReduction::Mean`]).
//!
//! `pooled[l,b,:] = sum_t m[b,t] x[l,b,t,:] / max(sum_t m[b,t], 1)`; rows with `m[b,t] = 0` are never
//! read (whatever sits there, even NaN, reaches neither the output nor the gradient) and get
//! gradient exactly 0; the others get `g[l,b,:] / max(sum_t m[b,t], 1)`. Accumulation is in f32 for
//! f32, bf16 and f16 inputs (output f32) and in f64 for f64 inputs. The unfused chain (zero the
//! padded rows, multiply by the mask, sum over tokens, divide) is the reference it is tested
//! against through [`crate::reprpo::reprpo_loss_unfused`].

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::error::Result;
use crate::fused::rows::{Acc, Elem};

/// Below this many input elements the op runs on the calling thread.
const PAR_MIN_ELEMS: usize = 1 << 15;

struct MaskedMeanPool {
    b: usize,
    t: usize,
    h: usize,
    /// `m[b, t]`, row-major.
    mask: Vec<bool>,
    /// `1 / max(sum_t m[b, t], 1)` per example.
    inv: Vec<f64>,
}

impl MaskedMeanPool {
    /// The pooled row of block `(l, b)` = `k` into `out` (`[H]`).
    fn pool_block<E: Elem>(&self, x: &[E], k: usize, out: &mut [E::A]) {
        let (t, h) = (self.t, self.h);
        let bi = k % self.b;
        out.fill(E::A::ZERO);
        for ti in 0..t {
            if self.mask[bi * t + ti] {
                let o = (k * t + ti) * h;
                for (a, &v) in out.iter_mut().zip(&x[o..o + h]) {
                    *a += v.up();
                }
            }
        }
        let s = E::A::from_f64(self.inv[bi]);
        for a in out.iter_mut() {
            *a = *a * s;
        }
    }

    fn fwd<E: Elem>(&self, x: &[E]) -> Vec<E::A> {
        let h = self.h.max(1);
        let blocks = x.len() / (self.t * h).max(1);
        let mut out = vec![E::A::ZERO; blocks * h];
        if x.len() < PAR_MIN_ELEMS {
            for (k, o) in out.chunks_mut(h).enumerate() {
                self.pool_block(x, k, o);
            }
        } else {
            out.par_chunks_mut(h)
                .enumerate()
                .for_each(|(k, o)| self.pool_block(x, k, o));
        }
        out
    }

    /// `[L, B, T, H]` gradient from the pooled gradient `g` (`[L, B, H]`, f64 on the host).
    fn bwd_typed<E: Elem>(&self, g: &[f64], blocks: usize) -> Vec<E> {
        let (t, h) = (self.t, self.h);
        let mut gx = E::zeros(blocks * t * h);
        let fill = |k: usize, dst: &mut [E]| {
            let bi = k % self.b;
            let row: Vec<E> = g[k * h..(k + 1) * h]
                .iter()
                .map(|&v| E::down(E::A::from_f64(v * self.inv[bi])))
                .collect();
            for (ti, d) in dst.chunks_mut(h).enumerate() {
                if self.mask[bi * t + ti] {
                    d.copy_from_slice(&row);
                }
            }
        };
        if gx.len() < PAR_MIN_ELEMS {
            for (k, d) in gx.chunks_mut((t * h).max(1)).enumerate() {
                fill(k, d);
            }
        } else {
            gx.par_chunks_mut((t * h).max(1))
                .enumerate()
                .for_each(|(k, d)| fill(k, d));
        }
        gx
    }
}

fn data<'a, T: candle_core::WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
) -> candle_core::Result<&'a [T]> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("masked-mean-pool: input is not contiguous");
    };
    Ok(&T::cpu_storage_as_slice(s)?[start..end])
}

impl CustomOp1 for MaskedMeanPool {
    fn name(&self) -> &'static str {
        "masked-mean-pool"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        reprpo_kernels::ran_cpu_kernel(self.name());
        let dims = l.dims();
        if dims.len() != 4 {
            candle_core::bail!("masked-mean-pool: expects [L, B, T, H], got {dims:?}");
        }
        let out = match s {
            CpuStorage::F32(_) => f32::out_storage(self.fwd::<f32>(data(s, l)?)),
            CpuStorage::F64(_) => f64::out_storage(self.fwd::<f64>(data(s, l)?)),
            CpuStorage::BF16(_) => bf16::out_storage(self.fwd::<bf16>(data(s, l)?)),
            CpuStorage::F16(_) => f16::out_storage(self.fwd::<f16>(data(s, l)?)),
            _ => candle_core::bail!("masked-mean-pool: needs f32, f64, bf16 or f16"),
        };
        Ok((out, Shape::from((dims[0], dims[1], dims[3]))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = g.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        let blocks = g.len() / self.h.max(1);
        let shape = x.shape();
        let dev = x.device();
        let gx = match x.dtype() {
            DType::F32 => Tensor::from_vec(self.bwd_typed::<f32>(&g, blocks), shape, dev)?,
            DType::F64 => Tensor::from_vec(self.bwd_typed::<f64>(&g, blocks), shape, dev)?,
            DType::BF16 => Tensor::from_vec(self.bwd_typed::<bf16>(&g, blocks), shape, dev)?,
            DType::F16 => Tensor::from_vec(self.bwd_typed::<f16>(&g, blocks), shape, dev)?,
            dt => candle_core::bail!("masked-mean-pool: unsupported dtype {dt:?}"),
        };
        Ok(Some(gx))
    }
}

/// The masked mean of `x` (`[L, B, T, H]`) over tokens, `[L, B, H]` in f32 (f64 for f64 inputs),
/// differentiable; `mask` is `m[b, t] > 0` on the host, row-major `[B, T]`.
///
/// # Errors
/// Candle errors (wrong rank, dtype, device).
pub(crate) fn masked_mean(x: &Tensor, mask: &[bool]) -> Result<Tensor> {
    let (_, b, t, h) = x.dims4()?;
    let inv = (0..b)
        .map(|bi| {
            let n = mask[bi * t..(bi + 1) * t].iter().filter(|&&m| m).count();
            1.0 / n.max(1) as f64
        })
        .collect();
    let op = MaskedMeanPool {
        b,
        t,
        h,
        mask: mask.to_vec(),
        inv,
    };
    Ok(x.contiguous()?.apply_op1(op)?)
}
