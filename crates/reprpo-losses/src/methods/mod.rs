//! The method space of the reference ReprPO project (`wassname/repr-preference-optimization`,
//! `reprpo/interventions/`): losses on collected activations ("interventions") `mse`, `prefvec`
//! and `rank`, as pure functions of tensors. The activations are already transformed (the
//! transforms live in `reprpo-models`, beside the adapters, because they carry trainable
//! parameters); the losses never see tokens.
//!
//! # Inputs ([`MethodInputs`])
//! Four [`Collected`] activation maps: policy chosen / rejected (`pi_c`, `pi_r`, differentiable)
//! and reference chosen / rejected (`ref_c`, `ref_r`; constant for the adapter, but they still
//! carry the gradient of a transform's parameters), each a map `key -> [B, T, H_key]` with the
//! same keys, the attention mask `[B, T]` of its sequences, and its summed log-probability
//! `lp` `[B]` (shifted next-token log-probabilities masked by the **attention** mask, prompt
//! included, as the reference's `compute_logprobs`). `prefvec` and `rank` also read the
//! reference's *unshifted* token cross-entropy of the chosen sequences for the policy and the
//! reference (`nll[b,t] = -log softmax(logits[b,t])[ids[b,t]] m[b,t]`, the token scored at its
//! own position; see `reprpo_models::logps::unshifted_nll`).
//!
//! # Shared pieces
//! - `reduce(·)`: the sink-filtered token mean of [`reduce`], per key, each with its own mask.
//! - Per-key terms are `[B]` vectors combined by an equal-weight mean over keys:
//!   `term[b] = mean_k term_k[b]`; batch means come after.
//! - `z[b] = (lp(pi_c) - lp(pi_r)) - (lp(ref_c) - lp(ref_r))` (no β).
//! - `cos(x, y) = sum_h (x_h / max(‖x‖, 1e-8)) (y_h / max(‖y‖, 1e-8))` (PyTorch ≥ 2's
//!   `cosine_similarity`); `‖·‖` has gradient 0 at 0.
//!
//! The formulas of each loss are on [`mse_loss`], [`prefvec_loss`] and [`rank_loss`]; every loss
//! adds the reference's training metrics of [`add_reference_metrics`].

use std::collections::BTreeMap;

use candle_core::{D, DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::dpo::{LossOut, logsigmoid};
use crate::error::{LossError, Result};

mod cosine;
mod mse;
mod prefvec;
mod rank;
pub mod reduce;

pub use mse::{MseConfig, mse_loss};
pub use prefvec::{PrefVecConfig, prefvec_loss};
pub use rank::{RankConfig, rank_loss};
pub use reduce::reduce_tokens;

/// One forward's collected (and transformed) activations.
#[derive(Debug, Clone)]
pub struct Collected {
    /// `key -> [B, T, H_key]`.
    pub acts: BTreeMap<String, Tensor>,
    /// The attention mask `[B, T]` (0/1, any float dtype).
    pub mask: Tensor,
    /// `[B]` summed next-token log-probabilities under the attention mask.
    pub logps: Tensor,
}

/// What a method loss reads (see the module docs).
#[derive(Debug, Clone)]
pub struct MethodInputs {
    /// Policy, chosen sequences.
    pub pi_cho: Collected,
    /// Policy, rejected sequences.
    pub pi_rej: Collected,
    /// Reference, chosen sequences.
    pub ref_cho: Collected,
    /// Reference, rejected sequences.
    pub ref_rej: Collected,
    /// `[B, T]` unshifted token NLL of the chosen sequences under the policy (prefvec, rank).
    pub nll_pi: Option<Tensor>,
    /// The same under the reference.
    pub nll_ref: Option<Tensor>,
}

/// The loss of a method, with its reference configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
#[non_exhaustive]
pub enum MethodLoss {
    /// The reference's `mse` (a log-distance-ratio loss, see [`mse_loss`]).
    Mse(MseConfig),
    /// Movement along the reference preference direction ([`prefvec_loss`]).
    Prefvec(PrefVecConfig),
    /// Per-feature log-softmax "ranks" ([`rank_loss`]).
    Rank(RankConfig),
}

impl MethodLoss {
    /// The loss's name in the reference's experiment names (`mse`, `prefvec`, `rank`).
    pub fn name(&self) -> &'static str {
        match self {
            MethodLoss::Mse(_) => "mse",
            MethodLoss::Prefvec(_) => "prefvec",
            MethodLoss::Rank(_) => "rank",
        }
    }
}

/// The loss of `cfg` on `inputs`, with the reference's training metrics added
/// ([`add_reference_metrics`]).
pub fn method_loss(inputs: &MethodInputs, cfg: &MethodLoss) -> Result<LossOut> {
    check(inputs)?;
    let mut out = match cfg {
        MethodLoss::Mse(c) => mse_loss(inputs, c)?,
        MethodLoss::Prefvec(c) => prefvec_loss(inputs, c)?,
        MethodLoss::Rank(c) => rank_loss(inputs, c)?,
    };
    add_reference_metrics(inputs, &mut out.metrics)?;
    Ok(out)
}

fn check(inputs: &MethodInputs) -> Result<()> {
    let keys: Vec<&String> = inputs.pi_cho.acts.keys().collect();
    if keys.is_empty() {
        return Err(LossError::InvalidInput(
            "method loss: no collected activations".into(),
        ));
    }
    for (name, c) in [
        ("pi_rej", &inputs.pi_rej),
        ("ref_cho", &inputs.ref_cho),
        ("ref_rej", &inputs.ref_rej),
    ] {
        if c.acts.keys().collect::<Vec<_>>() != keys {
            return Err(LossError::InvalidInput(format!(
                "method loss: {name} has other activation keys than pi_cho"
            )));
        }
    }
    Ok(())
}

/// The four reduced activations `[B, H]` of one key: `(pi_c, pi_r, ref_c, ref_r)`.
pub(crate) struct Reduced {
    pub pc: Tensor,
    pub pr: Tensor,
    pub rc: Tensor,
    pub rr: Tensor,
}

/// `reduce(x, mask)` of every key (`reduce_tokens`, or `reduce_log_softmax_tokens` for rank), in
/// key order.
pub(crate) fn reduced_keys(
    inputs: &MethodInputs,
    reduce: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
) -> Result<Vec<Reduced>> {
    let red = |c: &Collected, k: &String| -> Result<Tensor> {
        let x = c.acts.get(k).ok_or_else(|| {
            LossError::InvalidInput(format!("method loss: activation {k:?} missing"))
        })?;
        reduce(x, &c.mask)
    };
    inputs
        .pi_cho
        .acts
        .keys()
        .map(|k| {
            Ok(Reduced {
                pc: red(&inputs.pi_cho, k)?,
                pr: red(&inputs.pi_rej, k)?,
                rc: red(&inputs.ref_cho, k)?,
                rr: red(&inputs.ref_rej, k)?,
            })
        })
        .collect()
}

/// `mean_k term_k` of per-key `[B]` terms.
pub(crate) fn key_mean(terms: &[Tensor]) -> Result<Tensor> {
    Ok(Tensor::stack(terms, 0)?.mean(0)?)
}

/// The key means of `N` per-key terms: `f` gives the `N` `[B]` terms of one key.
pub(crate) fn term_means<const N: usize>(
    keys: &[Reduced],
    f: impl Fn(&Reduced) -> Result<[Tensor; N]>,
) -> Result<Vec<Tensor>> {
    let mut per_term: Vec<Vec<Tensor>> = vec![Vec::with_capacity(keys.len()); N];
    for r in keys {
        for (i, t) in f(r)?.into_iter().enumerate() {
            per_term[i].push(t);
        }
    }
    per_term.iter().map(|t| key_mean(t)).collect()
}

/// A loss's metrics: each named tensor's detached mean.
pub(crate) fn metrics_of<'a>(
    named: impl IntoIterator<Item = (&'a str, &'a Tensor)>,
) -> Result<BTreeMap<String, Tensor>> {
    named
        .into_iter()
        .map(|(n, t)| Ok((n.to_string(), metric(t)?)))
        .collect()
}

/// `z = (lp(pi_c) - lp(pi_r)) - (lp(ref_c) - lp(ref_r))`.
pub(crate) fn ptheta(inputs: &MethodInputs) -> Result<Tensor> {
    let f = |c: &Collected| c.logps.to_dtype(DType::F32);
    let pol = (f(&inputs.pi_cho)? - f(&inputs.pi_rej)?)?;
    let refr = (f(&inputs.ref_cho)? - f(&inputs.ref_rej)?)?;
    Ok((pol - refr)?)
}

/// The chosen NLLs `(policy, reference)` that prefvec and rank read.
pub(crate) fn nlls<'a>(inputs: &'a MethodInputs, what: &str) -> Result<(&'a Tensor, &'a Tensor)> {
    match (&inputs.nll_pi, &inputs.nll_ref) {
        (Some(p), Some(r)) => Ok((p, r)),
        _ => Err(LossError::InvalidInput(format!(
            "{what}: the unshifted chosen NLLs of the policy and the reference are required"
        ))),
    }
}

/// `‖x‖` over the last dimension (dropped), gradient 0 at 0.
pub(crate) fn norm(x: &Tensor) -> Result<Tensor> {
    crate::reprpo::norm(x)
}

/// PyTorch's `cosine_similarity(x, y, dim=-1, eps=1e-8)` (module docs).
pub(crate) fn cos_t(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    let unit = |t: &Tensor| -> Result<Tensor> {
        let n = norm(t)?.maximum(1e-8)?.unsqueeze(D::Minus1)?;
        Ok(t.broadcast_div(&n)?)
    };
    Ok((unit(x)? * unit(y)?)?.sum(D::Minus1)?)
}

/// Mean of the non-NaN entries (all NaN: NaN).
pub(crate) fn nanmean(x: &Tensor) -> Result<Tensor> {
    let ok = x.eq(x)?; // false at NaN
    let vals = ok.where_cond(x, &x.zeros_like()?)?;
    let n = ok.to_dtype(x.dtype())?.sum_all()?;
    Ok(vals.sum_all()?.div(&n)?)
}

/// Detached scalar of a `[..]` tensor's mean (f32).
pub(crate) fn metric(x: &Tensor) -> Result<Tensor> {
    Ok(x.detach().to_dtype(DType::F32)?.mean_all()?)
}

/// `log σ(x)`, stable.
pub(crate) fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    logsigmoid(x)
}

/// The reference's `compute_dpo_loss` on the summed log-probabilities `[pi_c, pi_r, ref_c,
/// ref_r]` (each `[B]`): `loss = mean_b −log σ(β z[b])` with
/// `z = (lp(pi_c) − lp(pi_r)) − (lp(ref_c) − lp(ref_r))`, differentiable through the policy's
/// log-probabilities (the reference's are detached here), and its metrics (detached):
/// `chosen_rewards = mean(lp(pi_c) − lp(ref_c))`, `rejected_rewards`, `dpo_loss` (= the loss),
/// `model_logratios = mean(lp(pi_c) − lp(pi_r))`, `reference_logratios`, `logits = mean z` and
/// `dpo_acc = mean[lp(pi_c) > lp(pi_r)]` (the policy's own preference; no β in the rewards).
pub fn reference_dpo_loss(lp: [&Tensor; 4], beta: f64) -> Result<LossOut> {
    let f = |t: &Tensor| t.to_dtype(DType::F32);
    let (pc, pr) = (f(lp[0])?, f(lp[1])?);
    let (rc, rr) = (f(lp[2])?.detach(), f(lp[3])?.detach());
    let model = (&pc - &pr)?;
    let refr = (&rc - &rr)?;
    let z = (&model - &refr)?;
    let per_example = logsigmoid(&(&z * beta)?)?.neg()?;
    let loss = per_example.mean_all()?;
    let (model, z) = (model.detach(), z.detach());
    let mut m = BTreeMap::new();
    m.insert("chosen_rewards".into(), (pc.detach() - &rc)?.mean_all()?);
    m.insert("rejected_rewards".into(), (pr.detach() - &rr)?.mean_all()?);
    m.insert("dpo_loss".into(), loss.detach());
    m.insert("model_logratios".into(), model.mean_all()?);
    m.insert("reference_logratios".into(), refr.mean_all()?);
    m.insert("logits".into(), z.mean_all()?);
    let acc = model.gt(0.0)?.to_dtype(DType::F32)?.mean_all()?;
    m.insert("dpo_acc".into(), acc);
    Ok(LossOut {
        loss,
        per_example,
        metrics: m,
    })
}

/// The metrics the reference adds around every method loss (all detached):
/// - DPO's with β = 0.1 on the log-probabilities: `chosen_rewards = mean(lp(pi_c) - lp(ref_c))`,
///   `rejected_rewards`, `dpo_loss = mean(-log σ(0.1 z))`, `model_logratios = mean(lp(pi_c) -
///   lp(pi_r))`, `reference_logratios`, `logits = mean z`, and `dpo_acc = mean[lp(pi_c) >
///   lp(pi_r)]` (the policy's own preference);
/// - `retain_cosine = nanmean_k nanmean_{b,t} cos(pi_c[k][b,t], ref_c[k][b,t])` over every
///   position (no mask) of the transformed activations, and `rr_cosine` the same with `pi_r`
///   against `ref_c`.
pub fn add_reference_metrics(
    inputs: &MethodInputs,
    metrics: &mut BTreeMap<String, Tensor>,
) -> Result<()> {
    let d = |c: &Collected| c.logps.detach();
    let lp = [
        d(&inputs.pi_cho),
        d(&inputs.pi_rej),
        d(&inputs.ref_cho),
        d(&inputs.ref_rej),
    ];
    let dpo = reference_dpo_loss([&lp[0], &lp[1], &lp[2], &lp[3]], 0.1)?;
    metrics.extend(dpo.metrics);
    let m = &mut *metrics;
    let cos_keys = |a: &Collected, b: &Collected| -> Result<Tensor> {
        let per_key = a
            .acts
            .iter()
            .map(|(k, x)| {
                let y = b.acts.get(k).ok_or_else(|| {
                    LossError::InvalidInput(format!("method loss: activation {k:?} missing"))
                })?;
                nanmean(&cosine::row_cosines(x, y)?)
            })
            .collect::<Result<Vec<_>>>()?;
        nanmean(&Tensor::stack(&per_key, 0)?)
    };
    m.insert(
        "retain_cosine".into(),
        cos_keys(&inputs.pi_cho, &inputs.ref_cho)?,
    );
    m.insert(
        "rr_cosine".into(),
        cos_keys(&inputs.pi_rej, &inputs.ref_cho)?,
    );
    Ok(())
}
