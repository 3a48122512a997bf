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
//! # Shapes
//! `logits`: `[B, T, V]`; `ids`: `[B, T]` u32; `mask`: `[B, T]` (any numeric dtype, 1 = count).
//! Outputs: `per_token` `[B, T-1]` (f32, zero where not counted), `sum` and `count` `[B]` f32.

use candle_core::{D, DType, IndexOp, Tensor};

use crate::error::Result;

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

/// Log-probabilities of `ids` under `logits`, counted where `mask` is 1 (see the module docs).
/// Differentiable with respect to `logits`.
pub fn token_logps(logits: &Tensor, ids: &Tensor, mask: &Tensor) -> Result<SeqLogps> {
    let (b, t, v) = logits.dims3()?;
    if t < 2 {
        let zeros = Tensor::zeros(b, DType::F32, logits.device())?;
        return Ok(SeqLogps {
            per_token: Tensor::zeros((b, 0), DType::F32, logits.device())?,
            sum: zeros.clone(),
            count: zeros,
        });
    }
    let pred = logits.i((.., ..t - 1, ..))?.to_dtype(DType::F32)?;
    let target = ids.i((.., 1..))?.contiguous()?;
    let m = mask.i((.., 1..))?.to_dtype(DType::F32)?;
    let flat = pred.reshape((b * (t - 1), v))?;
    let lse = flat.max_keepdim(D::Minus1)?.detach();
    let shifted = flat.broadcast_sub(&lse)?;
    let lse = (shifted.exp()?.sum_keepdim(D::Minus1)?.log()? + lse)?;
    let picked = flat.gather(&target.reshape((b * (t - 1), 1))?, D::Minus1)?;
    let logp = (picked - lse)?.reshape((b, t - 1))?;
    let per_token = (logp * &m)?;
    let sum = per_token.sum(D::Minus1)?;
    let count = m.sum(D::Minus1)?;
    Ok(SeqLogps {
        per_token,
        sum,
        count,
    })
}
