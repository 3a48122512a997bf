//! The reference's `mse` method loss: a log-distance ratio on token-reduced activations (the name
//! is historical).
//!
//! # Formula
//! Per key, with the reduced activations `p̄c, p̄r, r̄c, r̄r` `[B, H]` (see the parent module) and
//! `ldr(a, b) = log(‖a - b‖ + eps) - sg(log(‖r̄c - r̄r‖ + eps))` (`sg`: stop-gradient):
//! - `reroute_k = ldr(r̄c, p̄r)`: the policy's rejected activations against the reference's
//!   chosen ones, relative to the reference's chosen–rejected distance;
//! - `retain_k = ldr(r̄c, p̄c)`.
//!
//! `loss = 100 · nanmean_b(mean_k reroute_k[b] + α mean_k retain_k[b])` (the ×100 is the
//! reference's; `nanmean` skips examples whose activations reduce to NaN). `r̄c` is not detached:
//! with a transform, its parameters get this gradient. Metrics: `loss_reroute`, `loss_retain`
//! (batch means).

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::{MethodInputs, key_mean, metrics_of, nanmean, norm, reduced_keys};
use crate::dpo::LossOut;
use crate::error::Result;

/// The reference's `MSELossConfig` (its defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, documented::DocumentedFields)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct MseConfig {
    /// Weight of the retain term (the reference's `α`).
    #[serde(alias = "α")]
    pub alpha: f64,
    /// Added to the distances before the log.
    pub eps: f64,
}

impl Default for MseConfig {
    fn default() -> Self {
        MseConfig {
            alpha: 0.6,
            eps: 1e-12,
        }
    }
}

/// `log(‖a - b‖ + eps) - sg(log(‖a2 - b2‖ + eps))`, `[B]`.
fn log_dist_ratio(a: &Tensor, b: &Tensor, a2: &Tensor, b2: &Tensor, eps: f64) -> Result<Tensor> {
    let num = norm(&(a - b)?)?.affine(1.0, eps)?.log()?;
    let den = norm(&(a2 - b2)?)?.affine(1.0, eps)?.log()?.detach();
    Ok((num - den)?)
}

/// The `mse` loss of the module docs.
pub fn mse_loss(inputs: &MethodInputs, cfg: &MseConfig) -> Result<LossOut> {
    let keys = reduced_keys(inputs, super::reduce_tokens)?;
    let mut reroute = Vec::with_capacity(keys.len());
    let mut retain = Vec::with_capacity(keys.len());
    for r in &keys {
        reroute.push(log_dist_ratio(&r.rc, &r.pr, &r.rc, &r.rr, cfg.eps)?);
        retain.push(log_dist_ratio(&r.rc, &r.pc, &r.rc, &r.rr, cfg.eps)?);
    }
    let reroute = key_mean(&reroute)?;
    let retain = key_mean(&retain)?;
    let per_example = ((&reroute + (&retain * cfg.alpha)?)? * 100.0)?;
    let loss = nanmean(&per_example)?;
    let metrics = metrics_of([("loss_reroute", &reroute), ("loss_retain", &retain)])?;
    Ok(LossOut {
        loss,
        per_example,
        metrics,
    })
}
