//! The DPO family of losses, formula for formula as TRL computes them.
//!
//! The reference is TRL 1.16.0's `DPOTrainer._compute_loss` (`trl/trainer/dpo_trainer.py`); the three
//! behaviours that TRL 1.x dropped and this crate keeps as opt-ins (cDPO label smoothing in `sigmoid`,
//! the running reward mean of `bco_pair`, and `rpo_alpha`) follow TRL 0.23.1's `DPOTrainer.dpo_loss`
//! and `get_batch_loss_metrics`.
//!
//! # Notation
//! Per example `b` of a batch of `B` preference pairs:
//! - `pi_c`, `pi_r`: the policy's summed completion log-probabilities of chosen and rejected;
//!   `ref_c`, `ref_r`: the same for the reference model. With LD-DPO (`ld_alpha = a`) each of the four
//!   is replaced by `S - (1 - a) * T`, with `S` the full sum and `T` the sum over the completion tokens
//!   beyond the shared length `min(len_c, len_r)` of the pair ("tail"): this is TRL's
//!   `shared + a * tail`.
//! - `lr_c = pi_c - ref_c`, `lr_r = pi_r - ref_r` (log-ratios); rewards `beta * lr_c`, `beta * lr_r`.
//! - Scores `s_c = f(lr_c)`, `s_r = f(lr_r)` with `f` set by [`FDivergenceType`] (identity for the
//!   default `reverse_kl`), and `d = s_c - s_r`, `x = beta * d`.
//! - `n_c`, `n_r`: completion token counts; `ls(x) = log(sigmoid(x)) = min(x, 0) - log(1 + exp(-|x|))`;
//!   `eps`: `label_smoothing`.
//!
//! The reduced loss is `sum_k w_k * mean_b(l_k[b])` over the configured loss types `k`, which equals
//! `mean_b(per_example[b])` with `per_example = sum_k w_k * l_k` (plus `rpo_alpha * nll`).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{LossError, Result};

/// One `loss_type` of TRL's DPO trainer.
///
/// Each variant's formula uses the notation of the [module documentation](self).
///
/// # Shapes
/// Every per-example loss `l[b]` has shape `[B]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LossType {
    /// DPO: `l = -ls(x)`. With [`DpoConfig::cdpo`] (TRL <= 0.2x) conservative DPO:
    /// `l = -(1 - eps) ls(x) - eps ls(-x)`.
    Sigmoid,
    /// SLiC hinge: `l = relu(1 - x)`.
    Hinge,
    /// IPO on length-averaged scores: `l = (s_c / max(n_c, 1) - s_r / max(n_r, 1) - 1 / (2 beta))^2`.
    Ipo,
    /// EXO (pairwise): `l = sigmoid(x) (ls(x) - log(1 - eps)) + sigmoid(-x) (ls(-x) - log(eps))`,
    /// `0 < eps < 1` required.
    ExoPair,
    /// NCA (pairwise): `l = -ls(beta lr_c) - 0.5 ls(-beta lr_c) - 0.5 ls(-beta lr_r)`.
    NcaPair,
    /// Robust DPO: `l = (-(1 - eps) ls(x) + eps ls(-x)) / (1 - 2 eps)`, `0 <= eps < 0.5` required.
    Robust,
    /// BCO (pairwise): `l = -ls(beta lr_c - delta) - ls(-(beta lr_r - delta))`, with `delta = 0` (TRL
    /// 1.16) or, with [`DpoConfig::bco_running_mean`] (TRL <= 0.2x), the running mean of the batch-mean
    /// reward `mean(beta lr_c, beta lr_r)` after updating it with this batch ([`DpoState`]).
    BcoPair,
    /// SPPO with hard labels: `l = (lr_c - 0.5 / beta)^2 + (lr_r + 0.5 / beta)^2`.
    SppoHard,
    /// AOT (paired): with `u = sort_b(pi_c - pi_r) - sort_b(ref_c - ref_r)` (each sorted ascending over
    /// the batch), `l = -(1 - eps) ls(beta u) - eps ls(-beta u)`.
    Aot,
    /// AOT (unpaired; TRL's older name `aot_pair`): with `u = sort_b(lr_c) - sort_b(lr_r)`,
    /// `l = -(1 - eps) ls(beta u) - eps ls(-beta u)`.
    AotUnpaired,
    /// APO-zero: `l = 1 - sigmoid(beta lr_c) + sigmoid(beta lr_r)`.
    ApoZero,
    /// APO-down: `l = sigmoid(beta lr_c) + 1 - sigmoid(beta (lr_c - lr_r))`.
    ApoDown,
    /// DiscoPOP (log-ratio modulated): with `m = sigmoid(x / tau)` (`tau` = `discopop_tau`),
    /// `l = -ls(x) (1 - m) + exp(-x) m`.
    Discopop,
    /// SFT: the policy's mean NLL over all chosen completion tokens of the batch,
    /// `nll = -sum_b S(pi_c)[b] / sum_b n_c[b]` (full sums, never LD-weighted), the same for every `b`.
    Sft,
    /// DPO on length-averaged scores: `l = -ls(beta (s_c / max(n_c, 1) - s_r / max(n_r, 1)))`.
    SigmoidNorm,
}

impl LossType {
    /// Every loss type, in TRL's order.
    pub const ALL: [LossType; 15] = [
        LossType::Sigmoid,
        LossType::Hinge,
        LossType::Ipo,
        LossType::ExoPair,
        LossType::NcaPair,
        LossType::Robust,
        LossType::BcoPair,
        LossType::SppoHard,
        LossType::Aot,
        LossType::AotUnpaired,
        LossType::ApoZero,
        LossType::ApoDown,
        LossType::Discopop,
        LossType::Sft,
        LossType::SigmoidNorm,
    ];

    /// TRL 1.16's name of this loss type.
    pub fn name(self) -> &'static str {
        match self {
            LossType::Sigmoid => "sigmoid",
            LossType::Hinge => "hinge",
            LossType::Ipo => "ipo",
            LossType::ExoPair => "exo_pair",
            LossType::NcaPair => "nca_pair",
            LossType::Robust => "robust",
            LossType::BcoPair => "bco_pair",
            LossType::SppoHard => "sppo_hard",
            LossType::Aot => "aot",
            LossType::AotUnpaired => "aot_unpaired",
            LossType::ApoZero => "apo_zero",
            LossType::ApoDown => "apo_down",
            LossType::Discopop => "discopop",
            LossType::Sft => "sft",
            LossType::SigmoidNorm => "sigmoid_norm",
        }
    }

    /// Whether TRL 1.16 allows a non-default `f_divergence_type` with this loss (the losses built on
    /// the chosen-rejected score difference).
    pub fn supports_f_divergence(self) -> bool {
        matches!(
            self,
            LossType::Sigmoid
                | LossType::SigmoidNorm
                | LossType::Hinge
                | LossType::Ipo
                | LossType::ExoPair
                | LossType::Robust
                | LossType::Discopop
                | LossType::Sft
        )
    }
}

impl fmt::Display for LossType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for LossType {
    type Err = LossError;

    /// Parses TRL's name; `aot_pair` (TRL < 1.0) is accepted for `aot_unpaired`.
    fn from_str(s: &str) -> Result<Self> {
        if s == "aot_pair" {
            return Ok(LossType::AotUnpaired);
        }
        LossType::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| LossError::UnknownLossType(s.to_string()))
    }
}

impl Serialize for LossType {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for LossType {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The f-divergence regulariser of f-DPO (TRL 1.16's `f_divergence_type`): the map `f` from a
/// log-ratio `r` to a score.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum FDivergenceType {
    /// `f(r) = r` (standard DPO).
    #[default]
    ReverseKl,
    /// `f(r) = 1 - exp(-r)`.
    ForwardKl,
    /// `f(r) = log 2 + ls(r)`.
    JsDivergence,
    /// With `al` = `f_alpha_divergence_coef`: `f(r) = (exp(min((al - 1) r, c)) - 1) / (al - 1)`,
    /// `c = 80` (11 for f16), and `f(r) = r` when `|al - 1| < 1e-6`.
    AlphaDivergence,
}

impl FDivergenceType {
    /// TRL's name.
    pub fn name(self) -> &'static str {
        match self {
            FDivergenceType::ReverseKl => "reverse_kl",
            FDivergenceType::ForwardKl => "forward_kl",
            FDivergenceType::JsDivergence => "js_divergence",
            FDivergenceType::AlphaDivergence => "alpha_divergence",
        }
    }
}

impl fmt::Display for FDivergenceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for FDivergenceType {
    type Err = LossError;

    fn from_str(s: &str) -> Result<Self> {
        [
            FDivergenceType::ReverseKl,
            FDivergenceType::ForwardKl,
            FDivergenceType::JsDivergence,
            FDivergenceType::AlphaDivergence,
        ]
        .into_iter()
        .find(|t| t.name() == s)
        .ok_or_else(|| LossError::UnknownFDivergence(s.to_string()))
    }
}

impl Serialize for FDivergenceType {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for FDivergenceType {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Vec<LossType>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    let names = match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    };
    names
        .iter()
        .map(|s| s.parse().map_err(serde::de::Error::custom))
        .collect()
}

/// Configuration of [`dpo_loss`], with the names of TRL's `DPOConfig` (snake_case in serde; unknown
/// fields are an error). `loss_type` accepts one name or a list, as TRL does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DpoConfig {
    /// The loss types to combine (TRL's `loss_type`). Default `[sigmoid]`.
    #[serde(deserialize_with = "one_or_many")]
    pub loss_type: Vec<LossType>,
    /// One weight per loss type (TRL's `loss_weights`); `None` means 1.0 each.
    pub loss_weights: Option<Vec<f64>>,
    /// Temperature `beta` (for IPO its `tau`). Must be positive. Default 0.1.
    pub beta: f64,
    /// `eps` of `robust`, `exo_pair`, `aot`, `aot_unpaired` (and of `sigmoid` with [`Self::cdpo`]).
    /// Default 0.
    pub label_smoothing: f64,
    /// LD-DPO's `a` in `[0, 1]`: tokens beyond the shared length count with weight `a`
    /// (needs [`DpoInputs::ld_tails`]). `None`: plain sums.
    pub ld_alpha: Option<f64>,
    /// The f-divergence (only with the loss types of [`LossType::supports_f_divergence`]).
    pub f_divergence_type: FDivergenceType,
    /// `al` of the alpha-divergence. Default 0.5.
    pub f_alpha_divergence_coef: f64,
    /// WPO weighting: every per-example loss is multiplied by the detached
    /// `exp(w_c + w_r)` of [`DpoInputs::wpo_log_weights`]. Not with `aot`/`aot_unpaired`.
    /// (TRL 1.16 itself fails in backward with `use_weighting` plus `sft` or `hinge`, from an in-place
    /// multiply; here they are computed by the same formula.)
    pub use_weighting: bool,
    /// DiscoPOP's `tau`. Default 0.05.
    pub discopop_tau: f64,
    /// RPO (TRL <= 0.2x `rpo_alpha`): adds `rpo_alpha * nll` to every per-example loss, `nll` as in
    /// [`LossType::Sft`]. Not part of TRL 1.16.
    pub rpo_alpha: Option<f64>,
    /// Conservative DPO (TRL <= 0.2x): `label_smoothing` also applies to `sigmoid`. TRL 1.16 ignores
    /// `label_smoothing` for `sigmoid`, which is the default here.
    pub cdpo: bool,
    /// `bco_pair` subtracts the running reward mean kept in [`DpoState`] (TRL <= 0.2x). TRL 1.16 has
    /// no running mean, which is the default here.
    pub bco_running_mean: bool,
}

impl Default for DpoConfig {
    fn default() -> Self {
        DpoConfig {
            loss_type: vec![LossType::Sigmoid],
            loss_weights: None,
            beta: 0.1,
            label_smoothing: 0.0,
            ld_alpha: None,
            f_divergence_type: FDivergenceType::ReverseKl,
            f_alpha_divergence_coef: 0.5,
            use_weighting: false,
            discopop_tau: 0.05,
            rpo_alpha: None,
            cdpo: false,
            bco_running_mean: false,
        }
    }
}

impl DpoConfig {
    /// Checks what TRL checks (and a few values that would give infinities); returns the weights.
    pub fn validate(&self) -> Result<Vec<f64>> {
        let bad = |m: String| Err(LossError::InvalidConfig(m));
        if self.loss_type.is_empty() {
            return bad("loss_type is empty".into());
        }
        let weights = match &self.loss_weights {
            None => vec![1.0; self.loss_type.len()],
            Some(w) if w.len() == self.loss_type.len() => w.clone(),
            Some(w) => {
                return bad(format!(
                    "{} loss_weights for {} loss types",
                    w.len(),
                    self.loss_type.len()
                ));
            }
        };
        if !(self.beta.is_finite() && self.beta > 0.0) {
            return bad(format!("beta must be positive, got {}", self.beta));
        }
        if let Some(a) = self.ld_alpha
            && !(0.0..=1.0).contains(&a)
        {
            return bad(format!("ld_alpha must lie in [0, 1], got {a}"));
        }
        if self.f_divergence_type != FDivergenceType::ReverseKl
            && let Some(t) = self.loss_type.iter().find(|t| !t.supports_f_divergence())
        {
            return bad(format!(
                "f_divergence_type={} is not supported with loss type {t}",
                self.f_divergence_type
            ));
        }
        let has = |t: LossType| self.loss_type.contains(&t);
        if self.use_weighting && (has(LossType::Aot) || has(LossType::AotUnpaired)) {
            return bad("use_weighting is not implemented for aot or aot_unpaired".into());
        }
        let eps = self.label_smoothing;
        if has(LossType::ExoPair) && !(eps > 0.0 && eps < 1.0) {
            return bad(format!(
                "exo_pair needs 0 < label_smoothing < 1 (the EXO paper suggests 1e-3), got {eps}"
            ));
        }
        if has(LossType::Robust) && !(0.0..0.5).contains(&eps) {
            return bad(format!(
                "robust needs 0 <= label_smoothing < 0.5, got {eps}"
            ));
        }
        if has(LossType::Discopop) && (self.discopop_tau.is_nan() || self.discopop_tau <= 0.0) {
            return bad(format!(
                "discopop_tau must be positive, got {}",
                self.discopop_tau
            ));
        }
        Ok(weights)
    }
}

/// Running mean and variance of a stream of batch statistics: TRL's `RunningMoments`
/// (single process), kept for `bco_pair` with [`DpoConfig::bco_running_mean`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunningMoments {
    /// Running mean.
    pub mean: f64,
    /// Running (unbiased) standard deviation.
    pub std: f64,
    /// Running (biased) variance.
    pub var: f64,
    /// Number of values seen (starts at 1e-24 as in TRL).
    pub count: f64,
}

impl Default for RunningMoments {
    fn default() -> Self {
        RunningMoments {
            mean: 0.0,
            std: 1.0,
            var: 1.0,
            count: 1e-24,
        }
    }
}

impl RunningMoments {
    /// Merges a batch of `xs_count` values with mean `xs_mean` and biased variance `xs_var`,
    /// as TRL's `RunningMoments.update`.
    pub fn update(&mut self, xs_mean: f64, xs_var: f64, xs_count: f64) {
        let delta = xs_mean - self.mean;
        let tot_count = self.count + xs_count;
        let new_sum = xs_var * xs_count;
        let old_sum = self.var * self.count + delta * delta * self.count * xs_count / tot_count;
        let tot_sum = old_sum + new_sum;
        self.mean += delta * xs_count / tot_count;
        let new_var = tot_sum / tot_count;
        self.std = (new_var * tot_count / (tot_count - 1.0)).sqrt();
        self.var = new_var;
        self.count = tot_count;
    }
}

/// State carried across batches by [`dpo_loss`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DpoState {
    /// `bco_pair`'s running reward mean (updated only with [`DpoConfig::bco_running_mean`]).
    pub running: RunningMoments,
}

/// The summed log-probabilities of the completion tokens beyond the shared length
/// `min(n_c[b], n_r[b])` of each pair (LD-DPO's "verbose" tail), for the four sequences.
/// The shorter completion of a pair has an empty tail (0).
///
/// # Shapes
/// Each `[B]`.
#[derive(Debug, Clone)]
pub struct LdTails {
    /// Policy, chosen.
    pub policy_chosen: Tensor,
    /// Policy, rejected.
    pub policy_rejected: Tensor,
    /// Reference, chosen.
    pub reference_chosen: Tensor,
    /// Reference, rejected.
    pub reference_rejected: Tensor,
}

/// WPO's per-sequence log-weights: the mean over completion tokens of
/// `log p(token) - log sum_v p(v)^2` under the policy (TRL's `aligned_logps`), detached here.
///
/// # Shapes
/// Each `[B]`.
#[derive(Debug, Clone)]
pub struct WpoLogWeights {
    /// Chosen sequences.
    pub chosen: Tensor,
    /// Rejected sequences.
    pub rejected: Tensor,
}

/// What [`dpo_loss`] reads. The model-side code computes these from its logits.
///
/// # Shapes
/// Every tensor is `[B]` (one value per preference pair); all share the float dtype and device of
/// `policy_chosen_logps` (token counts and logits sums are converted to it).
#[derive(Debug, Clone)]
pub struct DpoInputs {
    /// Policy: sum of the log-probabilities of the chosen completion's tokens.
    pub policy_chosen_logps: Tensor,
    /// Policy: the same for the rejected completion.
    pub policy_rejected_logps: Tensor,
    /// Reference model: chosen (normally detached).
    pub reference_chosen_logps: Tensor,
    /// Reference model: rejected (normally detached).
    pub reference_rejected_logps: Tensor,
    /// Number of chosen completion tokens `n_c` (TRL's `completion_mask` row sums).
    pub chosen_tokens: Tensor,
    /// Number of rejected completion tokens `n_r`.
    pub rejected_tokens: Tensor,
    /// LD-DPO tails; required when [`DpoConfig::ld_alpha`] is set.
    pub ld_tails: Option<LdTails>,
    /// Per example, the sum over chosen completion tokens of the mean logit over the vocabulary;
    /// gives the `logits/chosen` metric (omitted when `None`).
    pub chosen_logits_sum: Option<Tensor>,
    /// The same for the rejected completions (`logits/rejected`).
    pub rejected_logits_sum: Option<Tensor>,
    /// WPO log-weights; required when [`DpoConfig::use_weighting`] is set.
    pub wpo_log_weights: Option<WpoLogWeights>,
}

impl DpoInputs {
    /// The four summed log-probabilities and the two token counts; everything optional left `None`.
    pub fn new(
        policy_chosen_logps: Tensor,
        policy_rejected_logps: Tensor,
        reference_chosen_logps: Tensor,
        reference_rejected_logps: Tensor,
        chosen_tokens: Tensor,
        rejected_tokens: Tensor,
    ) -> Self {
        DpoInputs {
            policy_chosen_logps,
            policy_rejected_logps,
            reference_chosen_logps,
            reference_rejected_logps,
            chosen_tokens,
            rejected_tokens,
            ld_tails: None,
            chosen_logits_sum: None,
            rejected_logits_sum: None,
            wpo_log_weights: None,
        }
    }
}

/// The result of a loss.
#[derive(Debug, Clone)]
pub struct LossOut {
    /// The reduced loss (a scalar, differentiable).
    pub loss: Tensor,
    /// The per-example loss `[B]`, with `loss = mean(per_example)`.
    pub per_example: Tensor,
    /// Detached scalar diagnostics under TRL's names: `rewards/chosen`, `rewards/rejected`,
    /// `rewards/accuracies`, `rewards/margins`, `logps/chosen`, `logps/rejected`, `logits/chosen`
    /// and `logits/rejected` (when the logits sums are given), `nll_loss` (with `sft` or `rpo_alpha`).
    pub metrics: BTreeMap<String, Tensor>,
}

impl LossOut {
    /// The metrics as `f64` (copies each scalar to the host).
    pub fn metrics_f64(&self) -> Result<BTreeMap<String, f64>> {
        self.metrics
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.to_dtype(DType::F64)?.to_scalar::<f64>()?)))
            .collect()
    }
}

/// `log(sigmoid(x)) = (x - |x|) / 2 - log(1 + exp(-|x|))`: stable, and written so that the gradient
/// at `x = 0` is the true 1/2 whatever sign `abs` takes there (`min(x, 0) - log(1 + exp(-|x|))`
/// would give 1 in candle, whose `min` splits ties and whose `abs'(0) = 1`; `x = 0` is every example
/// at the first step of DPO, when the policy equals the reference).
pub(crate) fn logsigmoid(x: &Tensor) -> Result<Tensor> {
    let a = x.abs()?;
    let soft = a.neg()?.exp()?.affine(1.0, 1.0)?.log()?;
    Ok(x.sub(&a)?.affine(0.5, 0.0)?.sub(&soft)?)
}

/// `max(u, 0)` with PyTorch's gradient at 0 (zero; candle's `relu` passes 1 there).
pub(crate) fn relu(u: &Tensor) -> Result<Tensor> {
    Ok(u.gt(0.0)?.where_cond(u, &u.zeros_like()?)?)
}

/// `min(t, cap)` with PyTorch's `clamp` gradient (1 up to and including `cap`).
fn clamp_max(t: &Tensor, cap: f64) -> Result<Tensor> {
    Ok(t.le(cap)?
        .where_cond(t, &t.ones_like()?.affine(0.0, cap)?)?)
}

fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok(logsigmoid(x)?.exp()?)
}

/// `-(1 - eps) ls(x) - eps ls(-x)`.
fn smoothed_sigmoid(x: &Tensor, eps: f64) -> Result<Tensor> {
    let a = logsigmoid(x)?.affine(-(1.0 - eps), 0.0)?;
    if eps == 0.0 {
        return Ok(a);
    }
    Ok(a.sub(&logsigmoid(&x.neg()?)?.affine(eps, 0.0)?)?)
}

fn f_score(cfg: &DpoConfig, r: &Tensor) -> Result<Tensor> {
    Ok(match cfg.f_divergence_type {
        FDivergenceType::ReverseKl => r.clone(),
        FDivergenceType::ForwardKl => r.neg()?.exp()?.affine(-1.0, 1.0)?,
        FDivergenceType::JsDivergence => logsigmoid(r)?.affine(1.0, std::f64::consts::LN_2)?,
        FDivergenceType::AlphaDivergence => {
            let al = cfg.f_alpha_divergence_coef;
            if (al - 1.0).abs() < 1e-6 {
                r.clone()
            } else {
                let cap = if r.dtype() == DType::F16 { 11.0 } else { 80.0 };
                clamp_max(&r.affine(al - 1.0, 0.0)?, cap)?
                    .exp()?
                    .affine(1.0 / (al - 1.0), -1.0 / (al - 1.0))?
            }
        }
    })
}

fn check_shape(name: &str, t: &Tensor, b: usize) -> Result<()> {
    if t.dims() != [b] {
        return Err(LossError::InvalidInput(format!(
            "{name} has shape {:?}, expected [{b}]",
            t.dims()
        )));
    }
    Ok(())
}

/// Sorts a `[B]` tensor ascending, differentiably (gather keeps the backward).
fn sort_batch(x: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.sort_last_dim(true)?.0)
}

/// The DPO family: every `loss_type` of TRL 1.16's `DPOTrainer`, their weighted mixtures,
/// LD-DPO, the f-divergences, WPO weighting and the pre-1.x opt-ins (`rpo_alpha`, cDPO,
/// `bco_pair`'s running mean). See [`LossType`] for each formula and the [module](self) for the
/// notation.
///
/// `per_example = sum_k w_k * l_k [* exp(w_c + w_r) with use_weighting] [+ rpo_alpha * nll]`,
/// `loss = mean(per_example)`. Gradients flow to every input except the WPO weights; `bco_pair`'s
/// running mean is a constant of each call.
///
/// # Shapes
/// All inputs `[B]` (see [`DpoInputs`]); `loss` is a scalar `[]`, `per_example` is `[B]`, every
/// metric a scalar.
///
/// # Errors
/// [`LossError::InvalidConfig`] for configurations TRL rejects (see [`DpoConfig::validate`]),
/// [`LossError::InvalidInput`] for a missing required input or a shape other than `[B]`, and
/// candle errors.
pub fn dpo_loss(inputs: &DpoInputs, cfg: &DpoConfig, state: &mut DpoState) -> Result<LossOut> {
    let weights = cfg.validate()?;
    let beta = cfg.beta;
    let eps = cfg.label_smoothing;
    let b = inputs.policy_chosen_logps.dims1()?;
    if b == 0 {
        return Err(LossError::InvalidInput("empty batch".into()));
    }
    let dtype = inputs.policy_chosen_logps.dtype();
    let named = [
        ("policy_chosen_logps", &inputs.policy_chosen_logps),
        ("policy_rejected_logps", &inputs.policy_rejected_logps),
        ("reference_chosen_logps", &inputs.reference_chosen_logps),
        ("reference_rejected_logps", &inputs.reference_rejected_logps),
        ("chosen_tokens", &inputs.chosen_tokens),
        ("rejected_tokens", &inputs.rejected_tokens),
    ];
    for (n, t) in named {
        check_shape(n, t, b)?;
    }
    let n_c = inputs.chosen_tokens.to_dtype(dtype)?;
    let n_r = inputs.rejected_tokens.to_dtype(dtype)?;

    // LD-DPO weighting: S - (1 - a) T.
    let (pi_c, pi_r, ref_c, ref_r) = match cfg.ld_alpha {
        None => (
            inputs.policy_chosen_logps.clone(),
            inputs.policy_rejected_logps.clone(),
            inputs.reference_chosen_logps.clone(),
            inputs.reference_rejected_logps.clone(),
        ),
        Some(a) => {
            let t = inputs.ld_tails.as_ref().ok_or_else(|| {
                LossError::InvalidInput("ld_alpha is set but ld_tails is missing".into())
            })?;
            let w = |s: &Tensor, tail: &Tensor, n: &str| -> Result<Tensor> {
                check_shape(n, tail, b)?;
                Ok(s.sub(&tail.affine(1.0 - a, 0.0)?)?)
            };
            (
                w(
                    &inputs.policy_chosen_logps,
                    &t.policy_chosen,
                    "ld_tails.policy_chosen",
                )?,
                w(
                    &inputs.policy_rejected_logps,
                    &t.policy_rejected,
                    "ld_tails.policy_rejected",
                )?,
                w(
                    &inputs.reference_chosen_logps,
                    &t.reference_chosen,
                    "ld_tails.reference_chosen",
                )?,
                w(
                    &inputs.reference_rejected_logps,
                    &t.reference_rejected,
                    "ld_tails.reference_rejected",
                )?,
            )
        }
    };
    let lr_c = pi_c.sub(&ref_c)?;
    let lr_r = pi_r.sub(&ref_r)?;
    let s_c = f_score(cfg, &lr_c)?;
    let s_r = f_score(cfg, &lr_r)?;
    let d = s_c.sub(&s_r)?;
    let x = d.affine(beta, 0.0)?;
    let chosen_rewards = lr_c.affine(beta, 0.0)?;
    let rejected_rewards = lr_r.affine(beta, 0.0)?;

    // Mean NLL of the chosen completion tokens (full sums, as TRL's per-token log-probs).
    let needs_nll = cfg.rpo_alpha.is_some() || cfg.loss_type.contains(&LossType::Sft);
    let nll = if needs_nll {
        Some(
            inputs
                .policy_chosen_logps
                .sum_all()?
                .neg()?
                .div(&n_c.sum_all()?)?,
        )
    } else {
        None
    };
    let wpo = if cfg.use_weighting {
        let w = inputs.wpo_log_weights.as_ref().ok_or_else(|| {
            LossError::InvalidInput("use_weighting is set but wpo_log_weights is missing".into())
        })?;
        check_shape("wpo_log_weights.chosen", &w.chosen, b)?;
        check_shape("wpo_log_weights.rejected", &w.rejected, b)?;
        Some(
            w.chosen
                .to_dtype(dtype)?
                .add(&w.rejected.to_dtype(dtype)?)?
                .exp()?
                .detach(),
        )
    } else {
        None
    };
    let avg = |s: &Tensor, n: &Tensor| -> Result<Tensor> { Ok(s.div(&n.maximum(1.0)?)?) };

    let mut per_example: Option<Tensor> = None;
    for (&lt, &w) in cfg.loss_type.iter().zip(weights.iter()) {
        let l = match lt {
            LossType::Sigmoid => smoothed_sigmoid(&x, if cfg.cdpo { eps } else { 0.0 })?,
            LossType::Hinge => relu(&x.affine(-1.0, 1.0)?)?,
            LossType::Ipo => avg(&s_c, &n_c)?
                .sub(&avg(&s_r, &n_r)?)?
                .affine(1.0, -1.0 / (2.0 * beta))?
                .sqr()?,
            LossType::ExoPair => {
                let nx = x.neg()?;
                let (ls_w, ls_l) = (logsigmoid(&x)?, logsigmoid(&nx)?);
                let a = ls_w.exp()?.mul(&ls_w.affine(1.0, -(-eps).ln_1p())?)?;
                let c = ls_l.exp()?.mul(&ls_l.affine(1.0, -eps.ln())?)?;
                a.add(&c)?
            }
            LossType::NcaPair => logsigmoid(&chosen_rewards)?
                .neg()?
                .sub(&logsigmoid(&chosen_rewards.neg()?)?.affine(0.5, 0.0)?)?
                .sub(&logsigmoid(&rejected_rewards.neg()?)?.affine(0.5, 0.0)?)?,
            LossType::Robust => logsigmoid(&x)?
                .affine(-(1.0 - eps), 0.0)?
                .add(&logsigmoid(&x.neg()?)?.affine(eps, 0.0)?)?
                .affine(1.0 / (1.0 - 2.0 * eps), 0.0)?,
            LossType::BcoPair => {
                let delta = if cfg.bco_running_mean {
                    let batch_mean = chosen_rewards
                        .add(&rejected_rewards)?
                        .mean_all()?
                        .affine(0.5, 0.0)?
                        .to_dtype(DType::F64)?
                        .to_scalar::<f64>()?;
                    state.running.update(batch_mean, 0.0, 1.0);
                    state.running.mean
                } else {
                    0.0
                };
                logsigmoid(&chosen_rewards.affine(1.0, -delta)?)?
                    .neg()?
                    .sub(&logsigmoid(&rejected_rewards.affine(-1.0, delta)?)?)?
            }
            LossType::SppoHard => lr_c
                .affine(1.0, -0.5 / beta)?
                .sqr()?
                .add(&lr_r.affine(1.0, 0.5 / beta)?.sqr()?)?,
            LossType::Aot => {
                let u = sort_batch(&pi_c.sub(&pi_r)?)?.sub(&sort_batch(&ref_c.sub(&ref_r)?)?)?;
                smoothed_sigmoid(&u.affine(beta, 0.0)?, eps)?
            }
            LossType::AotUnpaired => {
                let u = sort_batch(&lr_c)?.sub(&sort_batch(&lr_r)?)?;
                smoothed_sigmoid(&u.affine(beta, 0.0)?, eps)?
            }
            LossType::ApoZero => sigmoid(&chosen_rewards)?
                .affine(-1.0, 1.0)?
                .add(&sigmoid(&rejected_rewards)?)?,
            LossType::ApoDown => sigmoid(&chosen_rewards)?
                .add(&sigmoid(&chosen_rewards.sub(&rejected_rewards)?)?.affine(-1.0, 1.0)?)?,
            LossType::Discopop => {
                let m = sigmoid(&x.affine(1.0 / cfg.discopop_tau, 0.0)?)?;
                let logistic = logsigmoid(&x)?.neg()?;
                let expo = x.neg()?.exp()?;
                logistic.mul(&m.affine(-1.0, 1.0)?)?.add(&expo.mul(&m)?)?
            }
            LossType::Sft => match &nll {
                Some(n) => n.broadcast_as(b)?.contiguous()?,
                None => return Err(LossError::InvalidConfig("sft without nll".into())),
            },
            LossType::SigmoidNorm => {
                logsigmoid(&avg(&s_c, &n_c)?.sub(&avg(&s_r, &n_r)?)?.affine(beta, 0.0)?)?.neg()?
            }
        };
        let l = match &wpo {
            Some(wt) => l.mul(wt)?,
            None => l,
        };
        let l = l.affine(w, 0.0)?;
        per_example = Some(match per_example {
            None => l,
            Some(p) => p.add(&l)?,
        });
    }
    let mut per_example =
        per_example.ok_or_else(|| LossError::InvalidConfig("loss_type is empty".into()))?;
    if let (Some(alpha), Some(n)) = (cfg.rpo_alpha, &nll) {
        per_example = per_example.broadcast_add(&n.affine(alpha, 0.0)?)?;
    }
    let loss = per_example.mean_all()?;

    let mut metrics = BTreeMap::new();
    let cr = chosen_rewards.detach();
    let rr = rejected_rewards.detach();
    metrics.insert("rewards/chosen".to_string(), cr.mean_all()?);
    metrics.insert("rewards/rejected".to_string(), rr.mean_all()?);
    metrics.insert(
        "rewards/accuracies".to_string(),
        cr.gt(&rr)?.to_dtype(dtype)?.mean_all()?,
    );
    metrics.insert("rewards/margins".to_string(), cr.sub(&rr)?.mean_all()?);
    metrics.insert("logps/chosen".to_string(), pi_c.detach().mean_all()?);
    metrics.insert("logps/rejected".to_string(), pi_r.detach().mean_all()?);
    for (name, sum, n) in [
        ("logits/chosen", &inputs.chosen_logits_sum, &n_c),
        ("logits/rejected", &inputs.rejected_logits_sum, &n_r),
    ] {
        if let Some(s) = sum {
            check_shape(name, s, b)?;
            let total = s.to_dtype(dtype)?.detach().sum_all()?;
            metrics.insert(name.to_string(), total.div(&n.sum_all()?.maximum(1.0)?)?);
        }
    }
    if let Some(n) = &nll {
        metrics.insert("nll_loss".to_string(), n.detach());
    }
    Ok(LossOut {
        loss,
        per_example,
        metrics,
    })
}
