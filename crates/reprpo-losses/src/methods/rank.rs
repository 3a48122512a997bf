//! The reference's `rank` method loss: activations read as log-probabilities over the feature
//! dimension, compared with a DPO-style logistic per feature.
//!
//! # Formula
//! Per key, with `ℓ(o) = reduce(log_softmax_h(o))` (log-softmax over the **feature** dimension per
//! token, then the sink-filtered token mean of the parent module, the sinks found on the
//! log-softmax vectors):
//! - `θ_r = ℓ(pi_r) - ℓ(ref_r)`, `θ_c = ℓ(pi_c) - ℓ(ref_c)`, `θ = θ_c - θ_r` (`[B, H]`);
//! - `reroute_k = mean_h softplus(β θ)`: the reference's `-log σ(-β θ)`, computed stably (the
//!   reference's `log(sigmoid(·))` is +inf where `β θ ≳ 88` in f32; elsewhere both agree). Its
//!   sign is the reference's: minimising it lowers `θ`;
//! - `rank_retain_k = mean_h (β θ_c)^2`; metrics `_ptheta_k = mean_h θ`, `_ptheta_cho_k`,
//!   `_ptheta_rej_k`.
//!
//! With key means, `nll_ratio[b] = mean_t (nll_pi - nll_ref)[b, t]` (chosen, over all `T`), and `z`
//! the sequence log-probability margin:
//! `retain = [use_dpo_loss] relu(-z) + [use_nll_loss] 100 relu(nll_ratio) + [use_rank_retain]
//! rank_retain`, and `loss = mean_b reroute + α mean_b retain`.
//!
//! Metrics (means): `loss_reroute`, `loss_retain`, `loss_rank_retain`, `_ptheta`, `_ptheta_cho`,
//! `_ptheta_rej`, `_nll_loss` (mean of `nll_pi` over `B × T`), `_ref_nll_loss`,
//! `_nll_loss_ratio`, `loss_nll_retain`, `loss_dpo_retain`, `_dpo_ptheta`. (The reference's
//! README calls this a KL; there is no KL term in its code.)

use candle_core::{D, Tensor};
use serde::{Deserialize, Serialize};

use super::{MethodInputs, log_sigmoid, metrics_of, nlls, ptheta, reduced_keys, term_means};
use crate::dpo::{LossOut, relu};
use crate::error::Result;

/// The reference's `RankLossConfig` (its defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, documented::DocumentedFields)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct RankConfig {
    /// Weight of the retain sum (the reference's `α`).
    #[serde(alias = "α")]
    pub alpha: f64,
    /// Scale inside the per-feature logistic (the reference's `β`).
    #[serde(alias = "β")]
    pub beta: f64,
    /// Retain term `relu(-z)`.
    pub use_dpo_loss: bool,
    /// Retain term `100 relu(mean_t(nll_pi - nll_ref))`.
    pub use_nll_loss: bool,
    /// Retain term `mean_k mean_h (β θ_c)^2`.
    pub use_rank_retain: bool,
}

impl Default for RankConfig {
    fn default() -> Self {
        RankConfig {
            alpha: 0.25,
            beta: 1.0,
            use_dpo_loss: true,
            use_nll_loss: false,
            use_rank_retain: false,
        }
    }
}

/// The names of the per-key terms, as the reference's metrics.
const TERMS: [&str; 5] = [
    "loss_reroute",
    "loss_rank_retain",
    "_ptheta",
    "_ptheta_cho",
    "_ptheta_rej",
];

/// Per-key `[B]` terms in the order of [`TERMS`].
fn key_terms(r: &super::Reduced, beta: f64) -> Result<[Tensor; 5]> {
    let th_r = (&r.pr - &r.rr)?;
    let th_c = (&r.pc - &r.rc)?;
    let th = (&th_c - &th_r)?;
    let reroute = log_sigmoid(&(&th * -beta)?)?.neg()?;
    Ok([
        reroute.mean(D::Minus1)?,
        (&th_c * beta)?.sqr()?.mean(D::Minus1)?,
        th.mean(D::Minus1)?,
        th_c.mean(D::Minus1)?,
        th_r.mean(D::Minus1)?,
    ])
}

/// The `rank` loss of the module docs.
pub fn rank_loss(inputs: &MethodInputs, cfg: &RankConfig) -> Result<LossOut> {
    let keys = reduced_keys(inputs, super::reduce::reduce_log_softmax_tokens)?;
    let terms = term_means(&keys, |r| key_terms(r, cfg.beta))?;
    let (reroute, rank_retain) = (&terms[0], &terms[1]);
    let (nll_pi, nll_ref) = nlls(inputs, "rank")?;
    let nll_ratio = (nll_pi - nll_ref)?.mean(D::Minus1)?;
    let z = ptheta(inputs)?;
    let retain_dpo = relu(&z.neg()?)?.to_dtype(reroute.dtype())?;
    let retain_nll = relu(&nll_ratio)?.to_dtype(reroute.dtype())?;
    let mut retain = reroute.zeros_like()?;
    if cfg.use_dpo_loss {
        retain = (retain + &retain_dpo)?;
    }
    if cfg.use_nll_loss {
        retain = (retain + (&retain_nll * 100.0)?)?;
    }
    if cfg.use_rank_retain {
        retain = (retain + rank_retain)?;
    }
    let per_example = (reroute + (&retain * cfg.alpha)?)?;
    let loss = (reroute.mean_all()? + (retain.mean_all()? * cfg.alpha)?)?;
    let own = [
        ("loss_retain", &retain),
        ("_nll_loss", nll_pi),
        ("_ref_nll_loss", nll_ref),
        ("_nll_loss_ratio", &nll_ratio),
        ("loss_nll_retain", &retain_nll),
        ("loss_dpo_retain", &retain_dpo),
        ("_dpo_ptheta", &z),
    ];
    let metrics = metrics_of(own.into_iter().chain(TERMS.into_iter().zip(&terms)))?;
    Ok(LossOut {
        loss,
        per_example,
        metrics,
    })
}
