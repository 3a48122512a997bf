//! The reference ReprPO project's gradient interventions as a loss family (issue 17):
//! `loss = "projgrad"` and `loss = "projbp"` (its `dpo_projgrad.py` / `dpo_projbp.py` at
//! bd9ae63), with their `[projgrad]` / `[projbp]` tables. Both train DPO and steer its gradient
//! with a preference direction read from the outputs of the adapted linear layers (the formulas
//! are in [`reprpo_models::gradproj`]).
//!
//! # One batch ([`gradproj_batch_loss`])
//! The reference runs four forwards: the reference model (no gradient; the base, or the frozen
//! initial adapter with `adapter.reference = "initial"`) on the chosen rows, then on the rejected
//! rows, then the policy on each. Rows are independent, so here the reference model runs once on
//! all rows and each half takes its rows of the result; so does the policy under projgrad
//! (under projbp its forwards stay one per half: the rewrite reads each forward's whole output
//! gradient). When training, the reference forward records the outputs of the hooked modules
//! (the linear layers carrying a trainable adapter), and so does the policy's when projgrad
//! reads its direction from the policy (`use_pref_ref = false`).
//! projbp's policy forwards carry the hooks that rewrite the gradient at each hooked module's
//! output during the backward pass (`ForwardSpec::grad_hooks`).
//!
//! Loss: DPO with β = 0.1 (fixed, as the reference's) on the summed next-token log-probabilities
//! under the attention mask, prompt included:
//! `loss = mean_b −log σ(0.1 ((lp(π_c) − lp(π_r)) − (lp(ref_c) − lp(ref_r))))`.
//! Metrics: the DPO ones of [`reprpo_losses::methods::reference_dpo_loss`], `nll_loss` and
//! `ref_nll_loss` (the mean over every chosen position of the reference's unshifted token
//! cross-entropy, padding counted as 0, [`reprpo_models::logps::unshifted_nll`]),
//! `nll_loss_ratio = nll_loss / ref_nll_loss`, and for projgrad, after the backward pass,
//! `proj_frac` / `nproj_frac` (means over the rewritten gradients).
//!
//! # When projgrad rewrites
//! The trainer hands each micro-batch's adapter gradients (of the loss divided by
//! `train.grad_accum`, as Lightning scales it) to [`accumulate`] before they are added to the
//! step's sum; clipping and the update come after the last micro-batch. By default each
//! micro-batch's gradient is rewritten once, with its own batch's direction, then added. The
//! reference (Lightning's `on_after_backward`) rewrites the *accumulated* gradient after each
//! micro-batch, so an earlier micro-batch's part is rewritten again with a later batch's
//! direction; `projgrad.accumulated = true` does that. With `train.grad_accum = 1` (the
//! reference's batch of 16 in one micro-batch) the two are the same.

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{IndexOp, Tensor, Var};
use reprpo_losses::methods::reference_dpo_loss;
use reprpo_models::collect::Tap;
use reprpo_models::gradproj::{self, GradHooks, Pooling, Rewrite, WeightDim};
use reprpo_models::logps::{token_logps, unshifted_nll};
use reprpo_models::{CausalLm, ForwardSpec, peft};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::config::TrainConfig;
use crate::data::DeviceBatch;
use crate::error::{Result, TrainError};
use crate::objective::BatchLoss;

/// The reference's DPO temperature in both interventions (`compute_gradproj_loss_batch`).
pub(crate) const DPO_BETA: f64 = 0.1;

/// The `[projgrad]` table: the reference's `ProjGradConfig` (its defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, documented::DocumentedFields)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ProjGradConfig {
    /// Multiplier of the gradient's part orthogonal to the preference direction (the
    /// reference's `β`).
    #[serde(alias = "β")]
    pub beta: f64,
    /// Negate the preference direction. Only `mag_clip` reads its sign: the projection does
    /// not depend on it.
    pub reverse_pref: bool,
    /// The gradient axis matched (by size) against the module's output width: 1 the last axis
    /// (LoRA A's input axis, which matches only when a module's input and output widths are
    /// equal), 0 the first (LoRA B's output axis), 2 the first if it matches, else the last.
    pub weight_dim: u8,
    /// Rescale the orthogonal part to `beta` times the projected part's norm (per row).
    pub scale_orth: bool,
    /// Slope of the leaky ReLU on the projected gradient's components (0: components against
    /// the direction are dropped).
    pub neg_slope: f64,
    /// Clip the gradient's mean over the other axis to this fraction of the (signed)
    /// preference direction, per component; `false`: off (the reference's `None`).
    #[serde(with = "off_or_number")]
    pub mag_clip: Option<f64>,
    /// Take the direction from the reference model's outputs (true) or the policy's (false).
    pub use_pref_ref: bool,
    /// Pool each example's own outputs over its tokens (true); false, as the reference: example
    /// 0's outputs under every example's mask.
    pub per_example: bool,
    /// Rewrite the running sum of the micro-batches' gradients after each micro-batch, as the
    /// reference does under accumulation (true); false: rewrite each micro-batch's gradient
    /// once, before it is added (the same with `train.grad_accum = 1`).
    pub accumulated: bool,
}

impl Default for ProjGradConfig {
    fn default() -> Self {
        ProjGradConfig {
            beta: 0.8,
            reverse_pref: true,
            weight_dim: 1,
            scale_orth: false,
            neg_slope: 0.0,
            mag_clip: None,
            use_pref_ref: true,
            per_example: false,
            accumulated: false,
        }
    }
}

/// The `[projbp]` table: the reference's `ProjBPConfig` (its defaults). The direction always
/// comes from the reference model's outputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, documented::DocumentedFields)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ProjBpConfig {
    /// Multiplier of the gradient's part orthogonal to the preference direction (the
    /// reference's `β`).
    #[serde(alias = "β")]
    pub beta: f64,
    /// Negate the preference direction (no effect on the rewrite, which does not depend on its
    /// sign; kept for the reference's configurations).
    pub reverse_pref: bool,
    /// Multiply the orthogonal part by `‖O‖ / ‖P‖` per token (the reference's projbp
    /// multiplies where its projgrad divides).
    pub scale_orth: bool,
    /// Slope of the leaky ReLU on the projected gradient's components.
    pub neg_slope: f64,
    /// Scale each example's output gradient down so that the norm of its token mean is at most
    /// this fraction of the preference direction's norm; `false`: off.
    #[serde(with = "off_or_number")]
    pub mag_clip: Option<f64>,
    /// Pool each example's own outputs over its tokens (true); false, as the reference: example
    /// 0's outputs under every example's mask.
    pub per_example: bool,
}

impl Default for ProjBpConfig {
    fn default() -> Self {
        ProjBpConfig {
            beta: 0.2,
            reverse_pref: false,
            scale_orth: false,
            neg_slope: 0.01,
            mag_clip: Some(0.6),
            per_example: false,
        }
    }
}

/// `mag_clip`: a number, or `false` for off (TOML has no null; a resolved configuration must
/// read back as it was written).
mod off_or_number {
    use serde::de::{self, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(x) => s.serialize_f64(*x),
            None => s.serialize_bool(false),
        }
    }

    struct OffOrNumber;

    impl Visitor<'_> for OffOrNumber {
        type Value = Option<f64>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a number, or false for off")
        }
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
            if v {
                Err(E::invalid_value(de::Unexpected::Bool(true), &self))
            } else {
                Ok(None)
            }
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
            Ok(Some(v))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            Ok(Some(v as f64))
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v as f64))
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
        d.deserialize_any(OffOrNumber)
    }
}

/// Which intervention a loss name selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intervention {
    /// `projgrad`: rewrite the adapter gradients after the backward pass.
    ProjGrad,
    /// `projbp`: rewrite the gradient at each hooked module's output during the backward pass.
    ProjBp,
}

impl Intervention {
    /// The intervention of loss name `loss`, if it is one.
    pub fn of(loss: &str) -> Option<Self> {
        match loss {
            "projgrad" => Some(Intervention::ProjGrad),
            "projbp" => Some(Intervention::ProjBp),
            _ => None,
        }
    }
}

/// The preset of `projgrad` / `projbp`: the reference's learning rates (its tables' defaults
/// are the built-in defaults already).
pub fn preset(name: &str) -> Option<Value> {
    match Intervention::of(name)? {
        Intervention::ProjGrad => Some(json!({ "train": { "lr": 6e-5 } })),
        Intervention::ProjBp => Some(json!({ "train": { "lr": 1e-5 } })),
    }
}

/// The doc line of a `projgrad.*` / `projbp.*` key.
pub(crate) fn key_doc(table: &str, field: &str) -> Option<&'static str> {
    use documented::DocumentedFields as _;
    match table {
        "projgrad" => ProjGradConfig::get_field_docs(field).ok(),
        "projbp" => ProjBpConfig::get_field_docs(field).ok(),
        _ => None,
    }
}

fn config_error(key: &str, problem: impl std::fmt::Display) -> TrainError {
    TrainError::Config {
        key: key.into(),
        problem: problem.to_string(),
    }
}

/// Check `[projgrad]` and `[projbp]` (errors name the key).
pub fn validate(cfg: &TrainConfig) -> Result<()> {
    let (g, b) = (&cfg.projgrad, &cfg.projbp);
    let finite = [
        ("projgrad.beta", g.beta),
        ("projgrad.neg_slope", g.neg_slope),
        ("projbp.beta", b.beta),
        ("projbp.neg_slope", b.neg_slope),
    ];
    for (k, v) in finite {
        if !v.is_finite() {
            return Err(config_error(k, format!("must be finite, got {v}")));
        }
    }
    for (k, v) in [
        ("projgrad.mag_clip", g.mag_clip),
        ("projbp.mag_clip", b.mag_clip),
    ] {
        if let Some(c) = v
            && !(c.is_finite() && c > 0.0)
        {
            return Err(config_error(
                k,
                format!("must be a number > 0, or false for off; got {c}"),
            ));
        }
    }
    g.weight_dim()?;
    Ok(())
}

impl ProjGradConfig {
    /// The shared switches.
    pub fn rewrite(&self) -> Rewrite {
        Rewrite {
            beta: self.beta,
            scale_orth: self.scale_orth,
            neg_slope: self.neg_slope,
            mag_clip: self.mag_clip,
        }
    }

    /// `weight_dim` as the axis rule.
    pub fn weight_dim(&self) -> Result<WeightDim> {
        WeightDim::from_index(self.weight_dim).ok_or_else(|| {
            config_error(
                "projgrad.weight_dim",
                format!(
                    "must be 0 (first axis), 1 (last axis) or 2 (both), got {}",
                    self.weight_dim
                ),
            )
        })
    }
}

impl ProjBpConfig {
    /// The shared switches.
    pub fn rewrite(&self) -> Rewrite {
        Rewrite {
            beta: self.beta,
            scale_orth: self.scale_orth,
            neg_slope: self.neg_slope,
            mag_clip: self.mag_clip,
        }
    }
}

fn pooling(per_example: bool) -> Pooling {
    if per_example {
        Pooling::PerExample
    } else {
        Pooling::FirstExample
    }
}

/// What an intervention leaves for after the backward pass of its batch.
#[derive(Debug, Clone)]
pub enum GradProj {
    /// projgrad: the rewrite of the adapter gradients, for the trainer to apply.
    Rewrite(GradRewrite),
    /// projbp: the hooks of the policy forwards (applied during the backward pass; kept for
    /// [`GradHooks::calls`]).
    Hooks(Arc<GradHooks>),
}

/// projgrad's rewrite of one micro-batch: the direction `v̄` `[H]` of each hooked module.
#[derive(Debug, Clone)]
pub struct GradRewrite {
    /// `(module path, v̄)` in model order.
    pub directions: Vec<(String, Tensor)>,
    weight_dim: WeightDim,
    rewrite: Rewrite,
    accumulated: bool,
}

impl GradRewrite {
    /// Rewrite `grads` (the gradients of `params`, the optimizer's parameters, in their order)
    /// in place: every gradient of a hooked module's parameters whose shape matches
    /// (`reprpo_models::gradproj::projgrad`). Returns `proj_frac` and `nproj_frac`, the means
    /// over the rewritten gradients (none when nothing matched). Nothing is read back.
    pub fn apply(
        &self,
        params: &[(String, Var)],
        grads: &mut [Option<Tensor>],
    ) -> Result<BTreeMap<String, Tensor>> {
        let (mut proj, mut nproj) = (Vec::new(), Vec::new());
        for (module, v) in &self.directions {
            let prefix = format!("{}{module}.", peft::KEY_PREFIX);
            for ((name, _), slot) in params.iter().zip(grads.iter_mut()) {
                let Some(g) = slot.as_ref().filter(|_| name.starts_with(&prefix)) else {
                    continue;
                };
                if let Some(p) = gradproj::projgrad(g, v, self.weight_dim, &self.rewrite)? {
                    *slot = Some(p.grad);
                    proj.push(p.proj_frac);
                    nproj.push(p.nproj_frac);
                }
            }
        }
        let mut metrics = BTreeMap::new();
        if !proj.is_empty() {
            metrics.insert("proj_frac".into(), Tensor::stack(&proj, 0)?.mean_all()?);
            metrics.insert("nproj_frac".into(), Tensor::stack(&nproj, 0)?.mean_all()?);
        }
        Ok(metrics)
    }
}

/// Add one micro-batch's gradients `new` into the step's `acc` (both in the order of `params`),
/// with projgrad's rewrite when the batch's `intervention` has one: of `new` before it is added,
/// or of the sum after (`projgrad.accumulated`); its metrics go into `metrics`.
pub fn accumulate(
    intervention: Option<&GradProj>,
    acc: &mut [Option<Tensor>],
    mut new: Vec<Option<Tensor>>,
    params: &[(String, Var)],
    metrics: &mut BTreeMap<String, Tensor>,
) -> Result<()> {
    let Some(GradProj::Rewrite(r)) = intervention else {
        return crate::trainer::accumulate(acc, new);
    };
    if r.accumulated {
        crate::trainer::accumulate(acc, new)?;
        metrics.extend(r.apply(params, acc)?);
    } else {
        metrics.extend(r.apply(params, &mut new)?);
        crate::trainer::accumulate(acc, new)?;
    }
    Ok(())
}

fn missing(what: &str) -> TrainError {
    TrainError::Model(reprpo_models::ModelError::Invalid(format!(
        "the forward returned no {what}"
    )))
}

/// The chosen (`[0]`) or rejected (`[1]`) half of a batch after a forward.
struct Side {
    /// `[B]` summed next-token log-probabilities under the attention mask (differentiable
    /// through a policy forward).
    lp: Tensor,
    /// `[B, T, V]` logits, detached (for the NLL metrics).
    logits: Tensor,
    /// The recorded module outputs `[B, T, H]`, detached.
    taps: BTreeMap<String, Tensor>,
}

/// The chosen and the rejected rows of `batch` through `model` with `spec`: in one forward of
/// all `2B` rows when `together` (rows are independent, so each half gets what a forward of its
/// own gives), else one forward per half, the rejected one with `spec_r`.
fn forward_pair(
    model: &dyn CausalLm,
    batch: &DeviceBatch,
    (spec, spec_r): (&ForwardSpec, &ForwardSpec),
    together: bool,
) -> Result<[Side; 2]> {
    let b = batch.pairs;
    let run = |ids: &Tensor, mask: &Tensor, spec: &ForwardSpec| -> Result<Side> {
        let out = model.forward(ids, Some(mask), None, spec)?;
        let logits = out.logits.ok_or_else(|| missing("logits"))?;
        Ok(Side {
            lp: token_logps(&logits, ids, mask)?.sum,
            logits: logits.detach(),
            taps: out.taps.into_iter().map(|(k, t)| (k, t.detach())).collect(),
        })
    };
    if !together {
        let half = |k: usize, spec| -> Result<Side> {
            let r = k * b..(k + 1) * b;
            run(&batch.ids.i(r.clone())?, &batch.attention.i(r)?, spec)
        };
        return Ok([half(0, spec)?, half(1, spec_r)?]);
    }
    let all = run(&batch.ids, &batch.attention, spec)?;
    let half = |k: usize| -> Result<Side> {
        let r = k * b..(k + 1) * b;
        let taps = all
            .taps
            .iter()
            .map(|(m, t)| Ok((m.clone(), t.i(r.clone())?)))
            .collect::<Result<_>>()?;
        Ok(Side {
            lp: all.lp.i(r.clone())?,
            logits: all.logits.i(r)?,
            taps,
        })
    };
    Ok([half(0)?, half(1)?])
}

/// `[B, H]` directions of every module of `modules` from the taps of the chosen and the
/// rejected half (module docs of `reprpo_models::gradproj`).
fn directions(
    modules: &[String],
    (cho, rej): (&Side, &Side),
    (m_c, m_r): (&Tensor, &Tensor),
    pooling: Pooling,
    reverse: bool,
) -> Result<Vec<(String, Tensor)>> {
    modules
        .iter()
        .map(|m| {
            let tap = |p: &'_ Side| -> Result<Tensor> {
                p.taps
                    .get(m)
                    .cloned()
                    .ok_or_else(|| missing(&format!("output of {m}")))
            };
            let v =
                gradproj::preference_dirs((&tap(cho)?, m_c), (&tap(rej)?, m_r), pooling, reverse)?;
            Ok((m.clone(), v))
        })
        .collect()
}

/// The loss of one batch under `projgrad` / `projbp` (see the module docs). `train`: the
/// policy's dropout on, the hooked modules' outputs recorded, projbp's hooks in the graph and
/// projgrad's rewrite returned; off (evaluation), only the loss and its metrics.
pub fn gradproj_batch_loss(
    model: &dyn CausalLm,
    cfg: &TrainConfig,
    batch: &DeviceBatch,
    train: bool,
    ckpt: bool,
    dropout_seed: Option<u64>,
) -> Result<BatchLoss> {
    let kind = Intervention::of(&cfg.loss)
        .ok_or_else(|| config_error("loss", format!("{:?} is no intervention", cfg.loss)))?;
    let b = batch.pairs;
    let masks = [batch.attention.i(..b)?, batch.attention.i(b..2 * b)?];
    let modules = if train {
        model.trained_modules()
    } else {
        Vec::new()
    };
    let taps: Vec<Tap> = modules.iter().map(Tap::output).collect();
    let ref_spec = ForwardSpec {
        logits: true,
        reference: true,
        taps: taps.clone(),
        ..Default::default()
    };
    // The reference forwards (no gradient) run on all rows at once, as do projgrad's policy
    // forwards; projbp's rewrite reads each forward's whole output gradient, so its policy
    // forwards stay one per half, as the reference runs them.
    let [ref_c, ref_r] = forward_pair(model, batch, (&ref_spec, &ref_spec), true)?;
    let pair = (&masks[0], &masks[1]);
    let policy_taps = kind == Intervention::ProjGrad && !cfg.projgrad.use_pref_ref;
    let hooks = match kind {
        Intervention::ProjBp if train => {
            let p = &cfg.projbp;
            let dirs = directions(
                &modules,
                (&ref_c, &ref_r),
                pair,
                pooling(p.per_example),
                p.reverse_pref,
            )?;
            Some(Arc::new(GradHooks::projbp(p.rewrite(), dirs)))
        }
        _ => None,
    };
    let policy_spec = |seed: Option<u64>| ForwardSpec {
        logits: true,
        train,
        checkpoint: ckpt,
        dropout_seed: seed,
        taps: if policy_taps {
            taps.clone()
        } else {
            Vec::new()
        },
        grad_hooks: hooks.clone(),
        ..Default::default()
    };
    let seed = dropout_seed.filter(|_| train);
    // Apart, the rejected forward draws other dropout masks than the chosen one.
    let seed_r = seed.map(|s| s ^ 0x9e37_79b9_7f4a_7c15);
    let [pi_c, pi_r] = forward_pair(
        model,
        batch,
        (&policy_spec(seed), &policy_spec(seed_r)),
        hooks.is_none(),
    )?;
    let (lpc, lpr, lrc, lrr) = (&pi_c.lp, &pi_r.lp, &ref_c.lp, &ref_r.lp);
    let out = reference_dpo_loss([lpc, lpr, lrc, lrr], DPO_BETA)?;
    let mut metrics = out.metrics;
    let ids_c = batch.ids.i(..b)?;
    let nll = |p: &Side| -> Result<Tensor> {
        Ok(unshifted_nll(&p.logits, &ids_c, &masks[0])?.mean_all()?)
    };
    let (nll_pi, nll_ref) = (nll(&pi_c)?, nll(&ref_c)?);
    metrics.insert("nll_loss_ratio".into(), nll_pi.div(&nll_ref)?);
    metrics.insert("nll_loss".into(), nll_pi);
    metrics.insert("ref_nll_loss".into(), nll_ref);
    metrics.insert("loss".into(), out.loss.detach());
    let gradproj = match (kind, hooks) {
        (_, Some(h)) => Some(GradProj::Hooks(h)),
        (Intervention::ProjGrad, None) if train => {
            let g = &cfg.projgrad;
            let (c, r) = if g.use_pref_ref {
                (&ref_c, &ref_r)
            } else {
                (&pi_c, &pi_r)
            };
            let dirs = directions(
                &modules,
                (c, r),
                pair,
                pooling(g.per_example),
                g.reverse_pref,
            )?;
            let directions = dirs
                .into_iter()
                .map(|(m, v)| Ok((m, v.mean(0)?)))
                .collect::<Result<Vec<_>>>()?;
            Some(GradProj::Rewrite(GradRewrite {
                directions,
                weight_dim: g.weight_dim()?,
                rewrite: g.rewrite(),
                accumulated: g.accumulated,
            }))
        }
        _ => None,
    };
    Ok(BatchLoss {
        loss: out.loss,
        metrics,
        gradproj,
    })
}
