//! The reference's `prefvec` method loss: movement of the policy's chosen–rejected separation
//! along the reference's preference direction.
//!
//! # Formula
//! Per key, with the reduced activations `p̄c, p̄r, r̄c, r̄r` `[B, H]` (see the parent module):
//! - `d = p̄c - p̄r`, `v = r̄c - r̄r` (the reference preference direction),
//!   `u = v / max(‖v‖, eps)`, `P = (d·u) u`, `O = d - P`;
//! - `proj_k = -mean_h P` (the mean of the projected vector's components, as the reference
//!   writes it, not the scalar projection), `orth_k = |mean_h O|`, `angle_k = -|cos(d, v)|`;
//!   for the metrics also `angle_orth_k = 1 - |cos(d, v)|`, `sep_dist_k = -‖d‖` and
//!   `_cosine_similarity_k = cos(d, v)`.
//!
//! With each term's mean over keys (`proj[b] = mean_k proj_k[b]`, ...):
//! - `inner = 1e5 proj` if `use_proj_loss`, else 0; then `inner = |inner|` if
//!   `use_proj_abs_loss`; `inner += β 1e6 orth` if `use_orth_loss`; `inner += β 1e5 angle` if
//!   `use_angle_loss`;
//! - `dpo = log σ(-z)` if `use_dpo_loss`, else 0 (the reference's sign: minimising it raises `z`,
//!   unbounded below; not the usual `-log σ(z)`);
//! - `loss = mean_b inner + mean_b dpo` (the reference's α is fixed at 1; `use_sep_loss` only
//!   exists in its config and changes nothing).
//!
//! Metrics (batch means, detached): `loss_reroute` (= inner), `loss_dpo`, `loss_nll =
//! mean_b mean_t relu(nll_pi - nll_ref)`, `nll_loss_ratio = mean_{b,t}(nll_pi - nll_ref)`,
//! `ptheta = mean z`, and `loss_orth`, `loss_angle`, `loss_proj`, `loss_sep_dist`,
//! `loss_angle_orth`, `_cosine_similarity`. With the defaults the loss is
//! `1e5 |mean_k (d_k·u_k) mean_h u_k|` plus the DPO term: the reference README's "abs_proj_loss".

use candle_core::{D, Tensor};
use serde::{Deserialize, Serialize};

use super::{
    MethodInputs, cos_t, log_sigmoid, metrics_of, nlls, norm, ptheta, reduced_keys, term_means,
};
use crate::dpo::LossOut;
use crate::error::Result;

/// The reference's `PrefVecLossConfig` (its defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, documented::DocumentedFields)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct PrefVecConfig {
    /// Clamp of the preference direction's norm.
    pub eps: f64,
    /// Weight of the orthogonal and angle terms (the reference's `β`).
    #[serde(alias = "β")]
    pub beta: f64,
    /// Add `log σ(-z)` on the sequence log-probabilities.
    pub use_dpo_loss: bool,
    /// Add `β 1e6 |mean_h O|`.
    pub use_orth_loss: bool,
    /// Present in the reference's config; has no effect there or here.
    pub use_sep_loss: bool,
    /// Use `1e5 (-mean_h P)`.
    pub use_proj_loss: bool,
    /// Take the absolute value of the projection term.
    pub use_proj_abs_loss: bool,
    /// Add `β 1e5 (-|cos(d, v)|)`.
    pub use_angle_loss: bool,
}

impl Default for PrefVecConfig {
    fn default() -> Self {
        PrefVecConfig {
            eps: 1e-12,
            beta: 1.0,
            use_dpo_loss: true,
            use_orth_loss: false,
            use_sep_loss: false,
            use_proj_loss: true,
            use_proj_abs_loss: true,
            use_angle_loss: false,
        }
    }
}

/// Per-key terms `[B]`, in the order of [`TERMS`].
fn key_terms(pc: &Tensor, pr: &Tensor, rc: &Tensor, rr: &Tensor, eps: f64) -> Result<[Tensor; 6]> {
    let d = (pc - pr)?;
    let v = (rc - rr)?;
    let u = v.broadcast_div(&norm(&v)?.maximum(eps)?.unsqueeze(D::Minus1)?)?;
    let coef = (&u * &d)?.sum_keepdim(D::Minus1)?;
    let p = u.broadcast_mul(&coef)?;
    let o = (&d - &p)?;
    let cos = cos_t(&d, &v)?;
    let abs_cos = crate::reprpo::abs0(&cos)?;
    Ok([
        crate::reprpo::abs0(&o.mean(D::Minus1)?)?,
        abs_cos.neg()?,
        p.mean(D::Minus1)?.neg()?,
        norm(&d)?.neg()?,
        abs_cos.affine(-1.0, 1.0)?,
        cos,
    ])
}

/// The names of [`key_terms`]' outputs, as the reference's metrics.
const TERMS: [&str; 6] = [
    "loss_orth",
    "loss_angle",
    "loss_proj",
    "loss_sep_dist",
    "loss_angle_orth",
    "_cosine_similarity",
];

/// The `prefvec` loss of the module docs.
pub fn prefvec_loss(inputs: &MethodInputs, cfg: &PrefVecConfig) -> Result<LossOut> {
    let keys = reduced_keys(inputs, super::reduce_tokens)?;
    let terms = term_means(&keys, |r| key_terms(&r.pc, &r.pr, &r.rc, &r.rr, cfg.eps))?;
    let [orth, angle, proj] = [&terms[0], &terms[1], &terms[2]];
    let mut inner = if cfg.use_proj_loss {
        (proj * 1e5)?
    } else {
        proj.zeros_like()?
    };
    if cfg.use_proj_abs_loss {
        inner = crate::reprpo::abs0(&inner)?;
    }
    if cfg.use_orth_loss {
        inner = (inner + (orth * (cfg.beta * 1e6))?)?;
    }
    if cfg.use_angle_loss {
        inner = (inner + (angle * (cfg.beta * 1e5))?)?;
    }
    let z = ptheta(inputs)?;
    let dpo = if cfg.use_dpo_loss {
        log_sigmoid(&z.neg()?)?
    } else {
        z.zeros_like()?
    };
    let per_example = (&inner + dpo.to_dtype(inner.dtype())?)?;
    let loss = (inner.mean_all()? + dpo.mean_all()?.to_dtype(inner.dtype())?)?;
    let (nll_pi, nll_ref) = nlls(inputs, "prefvec")?;
    let ratio = (nll_pi - nll_ref)?.detach();
    let loss_nll = crate::dpo::relu(&ratio)?.mean(D::Minus1)?;
    let own = [
        ("loss_reroute", &inner),
        ("loss_dpo", &dpo),
        ("loss_nll", &loss_nll),
        ("nll_loss_ratio", &ratio),
        ("ptheta", &z),
    ];
    let metrics = metrics_of(own.into_iter().chain(TERMS.into_iter().zip(&terms)))?;
    Ok(LossOut {
        loss,
        per_example,
        metrics,
    })
}
