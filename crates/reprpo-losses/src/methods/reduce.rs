//! Token reduction of the reference ReprPO project's methods: a masked mean over the sequence
//! that first drops "attention sink" tokens (positions whose activation norm is far above the
//! row's typical norm).
//!
//! # Formula
//! For `x` `[B, T, H]` and a 0/1 mask `m` `[B, T]`, with `g[b,t] = ‖x[b,t,:]‖` over **all** `T`
//! positions (padding included, as the reference computes it), `μ_b = mean_t g[b,t]` and
//! `s_b = sqrt(sum_t (g[b,t] - μ_b)^2 / (T - 1))` (unbiased):
//!
//! - `m'[b,t] = m[b,t]` unless `g[b,t] > μ_b + θ s_b` (strict; θ = `sink_threshold`, 1), then 0;
//! - `reduce(x)[b,:] = sum_t m'[b,t] x[b,t,:] / sum_t m'[b,t]`.
//!
//! `m'` is a constant (computed from detached values): the gradient flows through `x` only, as a
//! masked mean. There is no epsilon: a row with no counted token is `0 / 0 = NaN`, as in the
//! reference (its losses skip such rows with `nanmean` where they do). With `T = 1` the standard
//! deviation is NaN and nothing is dropped. The threshold is computed on the device (no read back).
//!
//! On the CPU (outside `reprpo_kernels::written_out`) [`reduce_tokens`] and
//! [`reduce_log_softmax_tokens`] run one fused kernel with its own backward (`reduce/fused.rs`);
//! elsewhere, and in [`reduce_tokens_unfused`], the chain of candle ops the kernel is tested
//! against.

use candle_core::{D, DType, Tensor};

use crate::error::{LossError, Result};

mod fused;
pub(crate) mod simd;

/// The reference's sink threshold, in standard deviations above the row's mean norm.
pub const SINK_THRESHOLD: f64 = 1.0;

/// The mask `m'` of the module docs: `mask` (`[B, T]`, any float dtype) with the sink positions
/// of `x` (`[B, T, H]`) set to 0; detached, in `x`'s dtype.
pub fn sink_filtered_mask(x: &Tensor, mask: &Tensor, threshold: f64) -> Result<Tensor> {
    let (b, t, _) = x.dims3()?;
    if mask.dims() != [b, t] {
        return Err(LossError::InvalidInput(format!(
            "token reduction: mask {:?} does not match activations {:?}",
            mask.dims(),
            x.dims()
        )));
    }
    let xf = x.detach().to_dtype(DType::F32)?;
    let g = xf.sqr()?.sum(D::Minus1)?.sqrt()?; // [B, T]
    let mu = g.mean_keepdim(D::Minus1)?;
    let dev = g.broadcast_sub(&mu)?;
    let var = (dev.sqr()?.sum_keepdim(D::Minus1)? / (t as f64 - 1.0))?;
    let thr = (mu + (var.sqrt()? * threshold)?)?;
    let sink = g.broadcast_gt(&thr)?.to_dtype(DType::F32)?;
    let keep = sink.affine(-1.0, 1.0)?;
    let m = (mask.detach().to_dtype(DType::F32)? * keep)?;
    Ok(m.to_dtype(x.dtype())?)
}

/// `reduce(x)` `[B, H]` of the module docs (the reference's `reduce_tokens_w_attention` with
/// its defaults: sink filter on, threshold 1, no token weights), in `x`'s dtype.
pub fn reduce_tokens(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    check_mask(x, mask)?;
    if fused::applies(x) {
        return fused::sink_mean(x, mask, fused::Pre::Identity, SINK_THRESHOLD);
    }
    reduce_tokens_unfused(x, mask)
}

/// [`reduce_tokens`] through the chain of candle ops (the path of other devices, and the
/// reference the fused CPU kernel is tested against).
pub fn reduce_tokens_unfused(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let m = sink_filtered_mask(x, mask, SINK_THRESHOLD)?;
    masked_mean_tokens(x, &m)
}

/// `reduce(log_softmax_h(x))` `[B, H]`: the per-token log-softmax over the features, then the
/// sink-filtered mean (the sinks found on the log-softmax vectors), as the reference's `rank` loss
/// reduces; differentiable through the log-softmax. In `x`'s dtype.
pub fn reduce_log_softmax_tokens(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    check_mask(x, mask)?;
    if fused::applies(x) {
        return fused::sink_mean(x, mask, fused::Pre::LogSoftmax, SINK_THRESHOLD);
    }
    reduce_log_softmax_tokens_unfused(x, mask)
}

/// [`reduce_log_softmax_tokens`] through the chain of candle ops.
pub fn reduce_log_softmax_tokens_unfused(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    reduce_tokens_unfused(&log_softmax(x)?, mask)
}

/// `log_softmax` over the last dimension, differentiable (the max is a detached shift).
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.detach().max_keepdim(D::Minus1)?;
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

fn check_mask(x: &Tensor, mask: &Tensor) -> Result<()> {
    let (b, t, _) = x.dims3()?;
    if mask.dims() != [b, t] {
        return Err(LossError::InvalidInput(format!(
            "token reduction: mask {:?} does not match activations {:?}",
            mask.dims(),
            x.dims()
        )));
    }
    Ok(())
}

/// `sum_t m[b,t] x[b,t,:] / sum_t m[b,t]` (`m` constant, in `x`'s dtype).
fn masked_mean_tokens(x: &Tensor, m: &Tensor) -> Result<Tensor> {
    let num = x.broadcast_mul(&m.unsqueeze(D::Minus1)?)?.sum(1)?;
    let den = m.sum_keepdim(1)?;
    Ok(num.broadcast_div(&den)?)
}
