//! One AdamW update of one f32 tensor with f32 moments, as `torch.optim.AdamW` (`train.optim =
//! "adamw"`).
//!
//! With gradient `g`, step `t` (1-based), learning rate `lr`, decoupled weight decay `wd`:
//!
//! `p <- p (1 - lr wd)`, `m <- b1 m + (1 - b1) g`, `v <- b2 v + (1 - b2) g^2`,
//! `p <- p - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)`.

use candle_core::Tensor;

use super::AdamWConfig;
use crate::error::Result;

/// The new `(p, m, v)` of one step `t` (the caller decides whether to keep them).
pub(crate) fn step(
    cfg: &AdamWConfig,
    p: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    lr: f64,
    t: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b1, b2) = (cfg.beta1, cfg.beta2);
    let t = t as i32;
    let bc1 = 1.0 - b1.powi(t);
    let bc2 = 1.0 - b2.powi(t);
    let m = ((m * b1)? + (g * (1.0 - b1))?)?;
    let v = ((v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
    let denom = ((&v / bc2)?.sqrt()? + cfg.eps)?;
    let upd = ((&m / bc1)? / denom)?;
    let decayed = if cfg.weight_decay > 0.0 {
        (p * (1.0 - lr * cfg.weight_decay))?
    } else {
        p.clone()
    };
    Ok(((decayed - (upd * lr)?)?, m, v))
}
