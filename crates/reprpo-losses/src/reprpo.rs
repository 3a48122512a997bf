//! The ReprPO family of losses: hidden-state distances between the policy and the (frozen) reference
//! model, as pure functions of tensors.
//!
//! On the CPU (hidden states in f32, f64, bf16 or f16) [`reprpo_loss`] runs fused kernels with
//! their own backward: every per-position variant but [`ReprPoVariant::Cka`] through the row kernel
//! of [`crate::fused`] (one pass over the hidden states), `cka` through its own (`cka.rs`: real
//! rows only, three Gram products per example), and [`TokenReduction::Mean`] pools the sequences
//! with a one-pass pooling op (`pool.rs`) before the distances on the small pooled tensors. Other
//! devices, and [`reprpo_loss_unfused`] always, take the plain chain of differentiable candle ops,
//! which is the reference the kernels are tested against.
//!
//! # Notation
//! Inputs ([`HiddenPairs`]) at the selected layers: `pi_cho`, `pi_rej` (policy, chosen / rejected),
//! `ref_cho`, `ref_rej` (reference, always detached here), each `[L, B, T, H]`; attention masks
//! `m_c`, `m_r` `[B, T]` (any value `> 0` counts as a real token); training progress `p` in `[0, 1]`.
//! For vectors `x`, `y` over the hidden dimension (`H` entries):
//! - `‖x‖ = sqrt(sum_h x_h^2)`, with gradient 0 where `‖x‖ = 0` (PyTorch's `linalg.vector_norm`
//!   convention; a plain `sqrt` would give `0 * inf = NaN`, and `pi_cho = ref_cho` exactly at the first
//!   step of adapter training);
//! - `cos(x, y) = x·y / max(‖x‖ ‖y‖, 1e-8)`;
//! - `mse(x, y) = mean_h (x_h - y_h)^2`;
//! - `|u|` has gradient 0 at `u = 0` (PyTorch's convention; candle's `abs` passes 1 there).
//!
//! # The original ReprPO ([`ReprPoVariant::Original`])
//! Per layer `l`, example `b`, position `t`:
//! - reroute distance `d_rr[l,b,t] = ‖pi_rej[l,b,t] - ref_cho[l,b,t]‖`, counted where
//!   `m_c[b,t] = m_r[b,t] = 1`;
//! - retain distance `d_ret[l,b,t] = ‖pi_cho[l,b,t] - ref_cho[l,b,t]‖`, counted where `m_c[b,t] = 1`;
//! - `L_rr`, `L_retain`: the (weighted) masked means of those distances (see below);
//! - [`Schedule::Reprpo`] (default): `c_rr = 1 - p/2`, `c_retain = p/2`,
//!   `loss = c_rr L_rr + alpha c_retain L_retain`;
//!   [`Schedule::CircuitBreakers`]: `c_rr = alpha (1 - p)`, `c_retain = alpha p`,
//!   `loss = c_rr L_rr + c_retain L_retain` (alpha is inside the coefficients and is not applied a
//!   second time, as in the circuit-breakers paper).
//!
//! Both terms are minimised: the loss pulls the policy's rejected hidden states towards the
//! reference's chosen ones (reroute) and keeps the policy's chosen hidden states at the reference's
//! chosen ones (retain), exactly the sign conventions of the issue. Every variant keeps them: each
//! replaces the distance `‖x - y‖` by its own `d(x, y)`, with `x = pi_rej, y = ref_cho` for reroute
//! and `x = pi_cho, y = ref_cho` for retain, and the loss stays `c_rr L_rr + (alpha) c_retain L_retain`.
//!
//! # Masked and weighted means
//! Each term is a mean over "entries" `e` (positions `(l, b, t)`, or `(l, b)` with
//! [`TokenReduction::Mean`] and for [`ReprPoVariant::Cka`]) with 0/1 entry masks `M[e]` and
//! per-example weights `v_b` (1 without [`ReprPoConfig::example_weights`]):
//!
//! `L = sum_e v_b(e) M[e] d[e] / sum_e v_b(e) M[e]`, and `L = 0` when the denominator is 0.
//!
//! With `v = 1` this is the plain masked mean over all counted entries. Masked entries are removed
//! with a select (not only a multiply), and hidden states at padded positions are replaced by 0 before
//! anything reads them, so an all-masked row, or all-masked input, contributes nothing and never
//! produces NaN, in the loss or in the gradients, whatever values (even NaN) sit at padding. With
//! [`ReprPoConfig::example_weights`], `w = softmax_b(-s z)` over the batch (`s` =
//! [`ReprPoConfig::weight_scale`], default 30; `z = (pi_c - pi_r) - (ref_c - ref_r)` the DPO margin of
//! [`HiddenPairs::dpo_z`]), detached; `v = w` for `L_retain` and `v = 1 - w` for `L_rr`. (With a batch
//! of one, `1 - w = 0` and `L_rr = 0`.)
//!
//! `per_example[b] = B (c_rr N_rr[b] / D_rr + k_ret N_ret[b] / D_ret)`, where `N[b]` is example `b`'s
//! part of the numerator, `D` the denominator and `k_ret` the retain multiplier of the schedule, so that
//! `loss = mean_b(per_example)`.
//!
//! # Diagnostics
//! Detached scalars in [`LossOut::metrics`]: `loss_rr` (`L_rr`), `loss_retain` (`L_retain`, computed
//! also for `rr-only`), `coef_rr` (`c_rr`), `coef_retain` (`c_retain`; 0 for `rr-only`),
//! `cosine/chosen` = `cos(pi_cho, ref_cho)` averaged over positions with `m_c = 1` and
//! `cosine/rejected` = `cos(pi_rej, ref_cho)` averaged over positions with `m_c = m_r = 1` (per
//! position and unweighted, whatever the variant and token reduction; 0 when nothing is counted).

use std::collections::BTreeMap;

use candle_core::{D, DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::cka;
use crate::dpo::LossOut;
use crate::error::{LossError, Result};
use crate::fused::{self, rows::RowDist};
use crate::pool;

/// Which distance the loss uses (serde and [`ReprPoVariant::name`]: kebab-case).
///
/// Each variant's `d(x, y)` replaces `‖x - y‖` in both terms (see the [module](self)); all are
/// computed over the hidden dimension per entry unless stated otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum ReprPoVariant {
    /// `d(x, y) = ‖x - y‖` (L2 over the hidden dimension). Also accepted as `reprpo`.
    #[default]
    #[serde(alias = "reprpo")]
    Original,
    /// `d(x, y) = a (1 - cos(x, y)) + (1 - a) |‖x‖ - ‖y‖|`, `a` = [`ReprPoConfig::direction_weight`].
    Direction,
    /// `d(x, y) = mse(n(x), n(y))` with `n(x) = x / max(‖x‖, 1e-12)`.
    NormalizedMse,
    /// `d(x, y)` = mean of the `k` largest of `(x_h - y_h)^2` over `h`,
    /// `k = ceil(f H)` clamped to `[1, H]`, `f` = [`ReprPoConfig::topk_fraction`].
    Topk,
    /// `d(x, y) = mse(s(x), s(y))` with `s(x) = sign(x) log(|x| + 1e-6)` elementwise (`sign(0) = 0`).
    Symlog,
    /// `d = 1 - CKA(X, Y)`, linear CKA per layer and example over the token x hidden matrices.
    ///
    /// For layer `l` and example `b`, with `R` the counted positions (both masks for reroute, `m_c`
    /// for retain): `X` = the rows `x[l,b,t,:]`, `t` in `R` (`|R| x H`), centred by subtracting their
    /// mean over `R` (likewise `Y`); `K = X Xᵀ`, `G = Y Yᵀ` and
    /// `CKA = <K, G>_F / max(‖K‖_F ‖G‖_F, 1e-12)` (equal to `‖Yᵀ X‖_F^2 / (‖Xᵀ X‖_F ‖Yᵀ Y‖_F)`).
    /// An entry `(l, b)` counts only when `|R| >= 2`. Not defined with [`TokenReduction::Mean`].
    Cka,
    /// `d(x, y) = mse(x, y)` where the (detached) `cos(x, y) > threshold`, else `1 - cos(x, y)`;
    /// `threshold` = [`ReprPoConfig::adaptive_threshold`].
    Adaptive,
    /// The original L2 distances with the retain term dropped from the loss (for use with weight
    /// decay): `loss = c_rr L_rr`. `loss_retain` is still reported; `coef_retain` is 0.
    RrOnly,
    /// Log-distance ratio, `ldr(a, b, a', b') = log(‖a - b‖ + eps) - log(‖a' - b'‖ + eps)` with the
    /// second term detached (`eps` = [`ReprPoConfig::ldr_eps`]):
    /// reroute `= ldr(ref_cho, pi_rej, ref_cho, ref_rej)`, retain `= ldr(ref_cho, pi_cho, ref_cho,
    /// ref_rej)`. Both are minimised, as the distances they replace (reroute pulls `pi_rej` towards
    /// `ref_cho` relative to the reference's own chosen-rejected gap; retain keeps `pi_cho` at
    /// `ref_cho`). Since both read `ref_rej`, the retain term here counts where **both** masks are 1
    /// (not only `m_c`). Values can be negative.
    Ldr,
}

impl ReprPoVariant {
    /// Every variant.
    pub const ALL: [ReprPoVariant; 9] = [
        ReprPoVariant::Original,
        ReprPoVariant::Direction,
        ReprPoVariant::NormalizedMse,
        ReprPoVariant::Topk,
        ReprPoVariant::Symlog,
        ReprPoVariant::Cka,
        ReprPoVariant::Adaptive,
        ReprPoVariant::RrOnly,
        ReprPoVariant::Ldr,
    ];

    /// The kebab-case name (as in serde).
    pub fn name(self) -> &'static str {
        match self {
            ReprPoVariant::Original => "original",
            ReprPoVariant::Direction => "direction",
            ReprPoVariant::NormalizedMse => "normalized-mse",
            ReprPoVariant::Topk => "topk",
            ReprPoVariant::Symlog => "symlog",
            ReprPoVariant::Cka => "cka",
            ReprPoVariant::Adaptive => "adaptive",
            ReprPoVariant::RrOnly => "rr-only",
            ReprPoVariant::Ldr => "ldr",
        }
    }
}

/// How the coefficients of the two terms follow the training progress `p`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Schedule {
    /// ReprPO: `c_rr = 1 - p/2`, `c_retain = p/2`, `loss = c_rr L_rr + alpha c_retain L_retain`.
    #[default]
    Reprpo,
    /// Circuit breakers: `c_rr = alpha (1 - p)`, `c_retain = alpha p`,
    /// `loss = c_rr L_rr + c_retain L_retain`.
    CircuitBreakers,
}

/// Whether hidden states are compared per position or first averaged over tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TokenReduction {
    /// Compare per position `(l, b, t)` (the original ReprPO).
    #[default]
    PerPosition,
    /// Replace every sequence by the masked mean of its hidden states over its own real tokens,
    /// `x̄[l,b,:] = sum_t m[b,t] x[l,b,t,:] / sum_t m[b,t]` (`pi_cho`, `ref_cho` with `m_c`; `pi_rej`,
    /// `ref_rej` with `m_r`), then compare per `(l, b)`. An entry counts when every sequence it reads
    /// has at least one real token (reroute and `ldr`: both; retain: chosen).
    Mean,
}

/// Configuration of [`reprpo_loss`] (snake_case fields in serde; unknown fields are an error).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReprPoConfig {
    /// The distance. Default [`ReprPoVariant::Original`].
    pub variant: ReprPoVariant,
    /// `alpha`, the retain weight (see [`Schedule`]). Default 10; finite and `>= 0`.
    pub alpha: f64,
    /// The coefficient schedule. Default [`Schedule::Reprpo`].
    pub schedule: Schedule,
    /// Per-example weights `w = softmax(-weight_scale * z)` (needs [`HiddenPairs::dpo_z`]).
    /// Default off.
    pub example_weights: bool,
    /// The scale `s` of the per-example weights. Default 30.
    pub weight_scale: f64,
    /// Per position, or masked mean over tokens first. Default per position.
    pub token_reduction: TokenReduction,
    /// `a` of [`ReprPoVariant::Direction`], in `[0, 1]`. Default 0.5 (the issue gives none).
    pub direction_weight: f64,
    /// `f` of [`ReprPoVariant::Topk`], in `(0, 1]`. Default 0.005.
    pub topk_fraction: f64,
    /// The cosine threshold of [`ReprPoVariant::Adaptive`]. Default 0.9 (the issue gives none).
    pub adaptive_threshold: f64,
    /// `eps` of [`ReprPoVariant::Ldr`], `> 0`. Default 1e-6 (the issue gives none).
    pub ldr_eps: f64,
    /// Hidden-state indices of the layers to compare (negative counts from the end; index 0 is the
    /// embedding output, `i` the output of block `i`). `None`: [`default_layers`]. Read by the caller
    /// through [`ReprPoConfig::hidden_state_indices`]; the loss itself takes the selected layers.
    pub layers: Option<Vec<i64>>,
}

impl Default for ReprPoConfig {
    fn default() -> Self {
        ReprPoConfig {
            variant: ReprPoVariant::Original,
            alpha: 10.0,
            schedule: Schedule::Reprpo,
            example_weights: false,
            weight_scale: 30.0,
            token_reduction: TokenReduction::PerPosition,
            direction_weight: 0.5,
            topk_fraction: 0.005,
            adaptive_threshold: 0.9,
            ldr_eps: 1e-6,
            layers: None,
        }
    }
}

impl ReprPoConfig {
    /// Checks the ranges of the parameters and that the variant supports the token reduction.
    ///
    /// # Errors
    /// [`LossError::InvalidConfig`] naming the offending field.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(LossError::InvalidConfig(format!("ReprPO: {m}")));
        if !(self.alpha.is_finite() && self.alpha >= 0.0) {
            return bad(format!("alpha must be finite and >= 0, got {}", self.alpha));
        }
        if !self.weight_scale.is_finite() {
            return bad(format!(
                "weight_scale must be finite, got {}",
                self.weight_scale
            ));
        }
        if !(0.0..=1.0).contains(&self.direction_weight) {
            return bad(format!(
                "direction_weight must lie in [0, 1], got {}",
                self.direction_weight
            ));
        }
        if !(self.topk_fraction > 0.0 && self.topk_fraction <= 1.0) {
            return bad(format!(
                "topk_fraction must lie in (0, 1], got {}",
                self.topk_fraction
            ));
        }
        if !self.adaptive_threshold.is_finite() {
            return bad(format!(
                "adaptive_threshold must be finite, got {}",
                self.adaptive_threshold
            ));
        }
        if !(self.ldr_eps.is_finite() && self.ldr_eps > 0.0) {
            return bad(format!("ldr_eps must be positive, got {}", self.ldr_eps));
        }
        if self.layers.as_ref().is_some_and(Vec::is_empty) {
            return bad(
                "layers is empty: name at least one hidden-state index (0 = embeddings, -1 = last \
                 block) or leave it unset for the default layers"
                    .into(),
            );
        }
        if self.variant == ReprPoVariant::Cka && self.token_reduction == TokenReduction::Mean {
            return bad(
                "the cka variant compares token x hidden matrices; it needs token_reduction = per-position"
                    .into(),
            );
        }
        Ok(())
    }

    /// The hidden-state indices to use for a model with `num_layers` blocks (hence
    /// `num_layers + 1` hidden states): [`ReprPoConfig::layers`] resolved by [`resolve_layers`], or
    /// [`default_layers`].
    ///
    /// # Errors
    /// [`LossError::InvalidConfig`] for an index out of range.
    pub fn hidden_state_indices(&self, num_layers: usize) -> Result<Vec<usize>> {
        match &self.layers {
            None => Ok(default_layers(num_layers)),
            Some(ix) => resolve_layers(ix, num_layers + 1),
        }
    }
}

/// The default layers for a model with `num_layers` blocks: the hidden-state indices
/// `round(f * num_layers)` for `f` = 1/3, 2/3 and 0.8, clamped to `[1, num_layers]`, sorted and
/// deduplicated (e.g. 24 blocks: `[8, 16, 19]`; 2 blocks: `[1, 2]`). Empty for 0 blocks.
pub fn default_layers(num_layers: usize) -> Vec<usize> {
    if num_layers == 0 {
        return Vec::new();
    }
    let mut v: Vec<usize> = [1.0 / 3.0, 2.0 / 3.0, 0.8]
        .iter()
        .map(|f| ((f * num_layers as f64).round() as usize).clamp(1, num_layers))
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// Resolves hidden-state indices, negative ones counting from the end (`-1` is the last of
/// `num_hidden_states`), keeping their order.
///
/// # Errors
/// [`LossError::InvalidConfig`] for an index outside `[-n, n)` or no index.
pub fn resolve_layers(indices: &[i64], num_hidden_states: usize) -> Result<Vec<usize>> {
    if indices.is_empty() {
        return Err(LossError::InvalidConfig(
            "ReprPO: layers is empty: name at least one hidden-state index".into(),
        ));
    }
    let n = num_hidden_states as i64;
    indices
        .iter()
        .map(|&i| {
            let j = if i < 0 { n + i } else { i };
            if (0..n).contains(&j) {
                Ok(j as usize)
            } else {
                Err(LossError::InvalidConfig(format!(
                    "ReprPO: layer index {i} out of range for {num_hidden_states} hidden states"
                )))
            }
        })
        .collect()
}

/// Stacks the selected hidden states (each `[B, T, H]`) into `[layers, B, T, H]`.
///
/// # Errors
/// [`LossError::InvalidInput`] for an index past the end or no index; candle errors for
/// mismatched shapes.
pub fn stack_layers(hidden_states: &[Tensor], indices: &[usize]) -> Result<Tensor> {
    if indices.is_empty() {
        return Err(LossError::InvalidInput("ReprPO: no layers selected".into()));
    }
    let sel = indices
        .iter()
        .map(|&i| {
            hidden_states.get(i).ok_or_else(|| {
                LossError::InvalidInput(format!(
                    "ReprPO: hidden state {i} requested, {} available",
                    hidden_states.len()
                ))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::stack(&sel, 0)?)
}

/// What [`reprpo_loss`] reads.
///
/// # Shapes
/// The four hidden-state tensors `[L, B, T, H]` (same float dtype and device); the masks `[B, T]`
/// (any dtype; `> 0` is a real token); `dpo_z` `[B]`.
#[derive(Debug, Clone)]
pub struct HiddenPairs {
    /// Policy hidden states on the chosen sequences.
    pub policy_chosen: Tensor,
    /// Policy hidden states on the rejected sequences.
    pub policy_rejected: Tensor,
    /// Reference hidden states on the chosen sequences (detached here in any case).
    pub reference_chosen: Tensor,
    /// Reference hidden states on the rejected sequences (detached here in any case).
    pub reference_rejected: Tensor,
    /// Attention mask of the chosen sequences.
    pub chosen_mask: Tensor,
    /// Attention mask of the rejected sequences.
    pub rejected_mask: Tensor,
    /// The DPO margin `z = (pi_c - pi_r) - (ref_c - ref_r)` per example (detached here); required by
    /// [`ReprPoConfig::example_weights`].
    pub dpo_z: Option<Tensor>,
}

impl HiddenPairs {
    /// The four hidden-state tensors and the two masks, without `dpo_z`.
    pub fn new(
        policy_chosen: Tensor,
        policy_rejected: Tensor,
        reference_chosen: Tensor,
        reference_rejected: Tensor,
        chosen_mask: Tensor,
        rejected_mask: Tensor,
    ) -> Self {
        HiddenPairs {
            policy_chosen,
            policy_rejected,
            reference_chosen,
            reference_rejected,
            chosen_mask,
            rejected_mask,
            dpo_z: None,
        }
    }
}

/// `max(u, 0)` with gradient 0 at 0.
fn relu0(u: &Tensor) -> Result<Tensor> {
    Ok(u.gt(0.0)?.where_cond(u, &u.zeros_like()?)?)
}

/// `|u|` with gradient 0 at 0.
pub(crate) fn abs0(u: &Tensor) -> Result<Tensor> {
    Ok(relu0(u)?.add(&relu0(&u.neg()?)?)?)
}

/// `sqrt(s)` for `s >= 0` with gradient 0 (not NaN) at `s = 0`.
fn safe_sqrt(s: &Tensor) -> Result<Tensor> {
    let pos = s.gt(0.0)?;
    let safe = pos.where_cond(s, &s.ones_like()?)?;
    Ok(pos.where_cond(&safe.sqrt()?, &s.zeros_like()?)?)
}

/// `‖x‖` over the last dimension (dropped), gradient 0 at 0.
pub(crate) fn norm(x: &Tensor) -> Result<Tensor> {
    safe_sqrt(&x.sqr()?.sum(D::Minus1)?)
}

/// `cos(x, y) = x·y / max(‖x‖ ‖y‖, 1e-8)` over the last dimension (dropped).
fn cosine(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    let dot = x.mul(y)?.sum(D::Minus1)?;
    let den = norm(x)?.mul(&norm(y)?)?.maximum(1e-8)?;
    Ok(dot.div(&den)?)
}

fn mse(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    Ok(x.sub(y)?.sqr()?.mean(D::Minus1)?)
}

/// `sign(x) log(|x| + 1e-6)` elementwise, `sign(0) = 0`.
fn symlog(x: &Tensor) -> Result<Tensor> {
    let l = x.abs()?.affine(1.0, 1e-6)?.log()?;
    let zero = x.zeros_like()?;
    let neg = x.lt(0.0)?.where_cond(&l.neg()?, &zero)?;
    Ok(x.gt(0.0)?.where_cond(&l, &neg)?)
}

/// `d(x, y)` over the last dimension (dropped), for every variant but `cka` and `ldr`.
fn distance(cfg: &ReprPoConfig, x: &Tensor, y: &Tensor) -> Result<Tensor> {
    Ok(match cfg.variant {
        ReprPoVariant::Original | ReprPoVariant::RrOnly => norm(&x.sub(y)?)?,
        ReprPoVariant::Direction => {
            let a = cfg.direction_weight;
            let dir = cosine(x, y)?.affine(-a, a)?;
            let mag = abs0(&norm(x)?.sub(&norm(y)?)?)?.affine(1.0 - a, 0.0)?;
            dir.add(&mag)?
        }
        ReprPoVariant::NormalizedMse => {
            let n = |t: &Tensor| -> Result<Tensor> {
                Ok(t.broadcast_div(&norm(t)?.maximum(1e-12)?.unsqueeze(D::Minus1)?)?)
            };
            mse(&n(x)?, &n(y)?)?
        }
        ReprPoVariant::Topk => {
            let k = topk_k(cfg.topk_fraction, x.dim(D::Minus1)?);
            let sq = x.sub(y)?.sqr()?.contiguous()?;
            let (sorted, _) = sq.sort_last_dim(false)?;
            sorted.narrow(D::Minus1, 0, k)?.mean(D::Minus1)?
        }
        ReprPoVariant::Symlog => mse(&symlog(x)?, &symlog(y)?)?,
        ReprPoVariant::Adaptive => {
            let c = cosine(x, y)?;
            let close = c.detach().gt(cfg.adaptive_threshold)?;
            close.where_cond(&mse(x, y)?, &c.affine(-1.0, 1.0)?)?
        }
        ReprPoVariant::Cka | ReprPoVariant::Ldr => {
            return Err(LossError::InvalidConfig(format!(
                "ReprPO: {} is not a pointwise distance",
                cfg.variant.name()
            )));
        }
    })
}

/// `log(‖a - b‖ + eps) - log(‖a2 - b2‖ + eps)`, the second term detached.
fn ldr(a: &Tensor, b: &Tensor, a2: &Tensor, b2: &Tensor, eps: f64) -> Result<Tensor> {
    let num = norm(&a.sub(b)?)?.affine(1.0, eps)?.log()?;
    let den = norm(&a2.sub(b2)?)?.affine(1.0, eps)?.log()?.detach();
    Ok(num.sub(&den)?)
}

/// `1 - CKA` per `(l, b)` of `x`, `y` `[L, B, T, H]` over the rows with `m[b, t] = 1` (`m` float
/// `[B, T]`); `[L, B]`.
fn cka_distance(x: &Tensor, y: &Tensor, m: &Tensor) -> Result<Tensor> {
    let mm = m.unsqueeze(0)?.unsqueeze(D::Minus1)?; // [1, B, T, 1]
    let cnt = m.sum(D::Minus1)?.maximum(1.0)?; // [B]
    let cnt = cnt.reshape((1, cnt.dim(0)?, 1, 1))?;
    let centre = |t: &Tensor| -> Result<Tensor> {
        let tm = t.broadcast_mul(&mm)?;
        let mean = tm.sum_keepdim(2)?.broadcast_div(&cnt)?;
        Ok(t.broadcast_sub(&mean)?.broadcast_mul(&mm)?.contiguous()?)
    };
    let xc = centre(x)?;
    let yc = centre(y)?;
    let gram = |t: &Tensor| -> Result<Tensor> { Ok(t.matmul(&t.t()?.contiguous()?)?) };
    let k = gram(&xc)?;
    let g = gram(&yc)?;
    let num = k.mul(&g)?.sum(D::Minus1)?.sum(D::Minus1)?;
    let nk = safe_sqrt(&k.sqr()?.sum(D::Minus1)?.sum(D::Minus1)?)?;
    let ng = safe_sqrt(&g.sqr()?.sum(D::Minus1)?.sum(D::Minus1)?)?;
    let cka = num.div(&nk.mul(&ng)?.maximum(1e-12)?)?;
    Ok(cka.affine(-1.0, 1.0)?)
}

/// Masked mean over `[B, T]` of a sequence's hidden states `[L, B, T, H]` -> `[L, B, H]`.
fn pool(x: &Tensor, m: &Tensor) -> Result<Tensor> {
    let mm = m.unsqueeze(0)?.unsqueeze(D::Minus1)?;
    let cnt = m.sum_keepdim(D::Minus1)?.maximum(1.0)?.unsqueeze(0)?; // [1, B, 1]
    Ok(x.broadcast_mul(&mm)?.sum(2)?.broadcast_div(&cnt)?)
}

/// The weighted masked mean of `d` (`[L, B]` or `[L, B, T]`) with entry mask `em` (0/1, broadcastable
/// to `d`: `[1, B]` or `[1, B, T]`) and per-example weights `v` (`[B]`, detached) or none, split by
/// example: returns `part[b] = sum_{e in b} v_b M d / sum_e v M` (`[B]`; all 0 when the denominator is
/// 0), whose sum is the mean.
fn weighted_parts(d: &Tensor, em: &Tensor, v: Option<&Tensor>) -> Result<Tensor> {
    let em = em.broadcast_as(d.shape())?.contiguous()?;
    let vm = match v {
        None => em.clone(),
        Some(v) => {
            let nb = v.dim(0)?;
            let v = if d.rank() == 3 {
                v.reshape((1, nb, 1))?
            } else {
                v.reshape((1, nb))?
            };
            em.broadcast_mul(&v)?
        }
    };
    // Select (not only multiply) so that non-finite values at masked entries cannot leak.
    let dm = em.gt(0.0)?.where_cond(d, &d.zeros_like()?)?;
    let mut num_b = dm.mul(&vm)?.sum(0)?;
    while num_b.rank() > 1 {
        num_b = num_b.sum(D::Minus1)?;
    }
    let den = vm.sum_all()?;
    let den = den.gt(0.0)?.where_cond(&den, &den.ones_like()?)?;
    Ok(num_b.broadcast_div(&den)?)
}

/// Unweighted masked mean of `c` (`[L, B, T]`) over positions with `m[b, t] = 1`, detached.
fn masked_mean(c: &Tensor, m: &Tensor) -> Result<Tensor> {
    Ok(weighted_parts(&c.detach(), &m.unsqueeze(0)?, None)?.sum_all()?)
}

fn check_dims(name: &str, t: &Tensor, want: &[usize]) -> Result<()> {
    if t.dims() != want {
        return Err(LossError::InvalidInput(format!(
            "ReprPO: {name} has shape {:?}, expected {want:?}",
            t.dims()
        )));
    }
    Ok(())
}

/// The ReprPO family: hidden-state reroute and retain losses with their schedules, optional
/// per-example weights, token reduction and every variant of [`ReprPoVariant`]. Formulas, masks and
/// means are in the [module documentation](self).
///
/// `progress` is the training progress `p` in `[0, 1]`. Gradients flow to `policy_chosen` and
/// `policy_rejected` only (the reference hidden states, masks and `dpo_z` are detached).
///
/// # Shapes
/// Hidden states `[L, B, T, H]`, masks `[B, T]`, `dpo_z` `[B]` (see [`HiddenPairs`]); `loss` is a
/// scalar `[]`, `per_example` `[B]` (with `loss = mean(per_example)`), every metric a scalar.
///
/// # Errors
/// [`LossError::InvalidConfig`] (see [`ReprPoConfig::validate`], and `progress` outside `[0, 1]`),
/// [`LossError::InvalidInput`] for mismatched shapes, an empty dimension, or `example_weights`
/// without `dpo_z`; candle errors.
///
/// Every variant but `cka`, per position, runs through the fused CPU kernel of [`crate::fused`] on
/// CPU tensors of f32, f64, bf16 or f16 ([`uses_fused_kernel`]): the same values and gradients as
/// [`reprpo_loss_unfused`] to float rounding (accumulation is in f32, or f64 for f64 inputs, scalar
/// formulas in f64, so f32, bf16 and f16 results are closer to exact than the unfused chain's).
/// Half-precision inputs on the other paths are computed in f32 and cast back.
pub fn reprpo_loss(inputs: &HiddenPairs, cfg: &ReprPoConfig, progress: f64) -> Result<LossOut> {
    loss_impl(inputs, cfg, progress, true)
}

/// [`reprpo_loss`] always through the unfused chain of candle ops (any device and dtype): the
/// reference for the fused kernel, and the path for other devices.
///
/// # Shapes
/// As [`reprpo_loss`].
///
/// # Errors
/// As [`reprpo_loss`].
pub fn reprpo_loss_unfused(
    inputs: &HiddenPairs,
    cfg: &ReprPoConfig,
    progress: f64,
) -> Result<LossOut> {
    loss_impl(inputs, cfg, progress, false)
}

/// Whether [`reprpo_loss`] takes a fused kernel for this configuration and these hidden states:
/// on CPU tensors of f32, f64, bf16 or f16, always (per position: the row kernel of
/// [`crate::fused`], `cka`'s own kernel; token reduction `mean`: the pooling op of `pool.rs`).
pub fn uses_fused_kernel(cfg: &ReprPoConfig, hidden: &Tensor) -> bool {
    row_dist(cfg, hidden).is_some() || uses_cka_kernel(cfg, hidden) || uses_pool_kernel(cfg, hidden)
}

fn uses_pool_kernel(cfg: &ReprPoConfig, hidden: &Tensor) -> bool {
    cfg.token_reduction == TokenReduction::Mean && fused::applies(hidden)
}

fn uses_cka_kernel(cfg: &ReprPoConfig, hidden: &Tensor) -> bool {
    cfg.variant == ReprPoVariant::Cka
        && cfg.token_reduction == TokenReduction::PerPosition
        && fused::applies(hidden)
}

/// The fused kernel's distance for this configuration, where it applies.
fn row_dist(cfg: &ReprPoConfig, hidden: &Tensor) -> Option<RowDist> {
    if cfg.token_reduction != TokenReduction::PerPosition || !fused::applies(hidden) {
        return None;
    }
    let h = hidden.dims().last().copied().unwrap_or(1).max(1);
    Some(match cfg.variant {
        ReprPoVariant::Original | ReprPoVariant::RrOnly => RowDist::L2,
        ReprPoVariant::Direction => RowDist::Direction {
            w: cfg.direction_weight,
        },
        ReprPoVariant::NormalizedMse => RowDist::NormalizedMse,
        ReprPoVariant::Topk => RowDist::Topk {
            k: topk_k(cfg.topk_fraction, h),
        },
        ReprPoVariant::Symlog => RowDist::Symlog,
        ReprPoVariant::Adaptive => RowDist::Adaptive {
            threshold: cfg.adaptive_threshold,
        },
        ReprPoVariant::Ldr => RowDist::Ldr { eps: cfg.ldr_eps },
        ReprPoVariant::Cka => return None,
    })
}

/// `k = ceil(f H)` clamped to `[1, H]`.
fn topk_k(fraction: f64, h: usize) -> usize {
    ((fraction * h as f64).ceil() as usize).clamp(1, h.max(1))
}

fn loss_impl(
    inputs: &HiddenPairs,
    cfg: &ReprPoConfig,
    progress: f64,
    allow_fused: bool,
) -> Result<LossOut> {
    cfg.validate()?;
    if !(0.0..=1.0).contains(&progress) {
        return Err(LossError::InvalidConfig(format!(
            "ReprPO: progress must lie in [0, 1], got {progress}"
        )));
    }
    let pi_c = &inputs.policy_chosen;
    let dims = pi_c.dims().to_vec();
    if dims.len() != 4 || dims.contains(&0) {
        return Err(LossError::InvalidInput(format!(
            "ReprPO: hidden states must be [layers, batch, tokens, hidden] with no empty dimension, got {dims:?}"
        )));
    }
    let (b, t) = (dims[1], dims[2]);
    check_dims("policy_rejected", &inputs.policy_rejected, &dims)?;
    check_dims("reference_chosen", &inputs.reference_chosen, &dims)?;
    check_dims("reference_rejected", &inputs.reference_rejected, &dims)?;
    check_dims("chosen_mask", &inputs.chosen_mask, &[b, t])?;
    check_dims("rejected_mask", &inputs.rejected_mask, &[b, t])?;
    let dtype = pi_c.dtype();
    let z_host = if cfg.example_weights {
        let z = inputs.dpo_z.as_ref().ok_or_else(|| {
            LossError::InvalidInput("ReprPO: example_weights is set but dpo_z is missing".into())
        })?;
        check_dims("dpo_z", z, &[b])?;
        Some(z)
    } else {
        None
    };
    let row = row_dist(cfg, pi_c).filter(|_| allow_fused);
    let cka = allow_fused && uses_cka_kernel(cfg, pi_c);
    if row.is_some() || cka {
        // The weights on the host, w = softmax(-s z) in f64 from z in its own dtype (the unfused
        // path first rounds z to the hidden states' dtype); v_rr = 1 - w, v_ret = w.
        let weights = match z_host {
            Some(z) => {
                let zs = z.detach().to_dtype(DType::F64)?.to_vec1::<f64>()?;
                let s: Vec<f64> = zs.iter().map(|z| -cfg.weight_scale * z).collect();
                let mx = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|v| (v - mx).exp()).collect();
                let tot: f64 = e.iter().sum();
                let w: Vec<f64> = e.iter().map(|v| v / tot).collect();
                Some((w.iter().map(|w| 1.0 - w).collect::<Vec<_>>(), w))
            }
            None => None,
        };
        let weights = weights.as_ref().map(|(r, c)| (r.as_slice(), c.as_slice()));
        let (rr, ret, cos_c, cos_r) = if let Some(dist) = row {
            let f = fused::reroute_retain(dist, &kernel_inputs(inputs, false), weights)?;
            (f.rr, f.ret, f.cos_chosen, f.cos_rejected)
        } else {
            let ones = vec![1.0; b];
            let (v_rr, v_ret) = weights.unwrap_or((&ones, &ones));
            let (rr, ret) = cka::cka_parts(
                &inputs.policy_chosen,
                &inputs.policy_rejected,
                &inputs.reference_chosen,
                &fused::host_mask(&inputs.chosen_mask)?,
                &fused::host_mask(&inputs.rejected_mask)?,
                v_rr,
                v_ret,
            )?;
            let (cos_c, cos_r) = kernel_cosines(inputs)?;
            (rr, ret, cos_c, cos_r)
        };
        return finish(cfg, progress, b, dtype, &rr, &ret, cos_c, cos_r);
    }
    if allow_fused && uses_pool_kernel(cfg, pi_c) {
        // Token reduction `mean`: the sequences pooled by the fused pooling op (f32, or f64 for
        // f64 inputs; padded rows never read), the distances on the small pooled tensors by the
        // chain of candle ops, the per-position cosines by the row kernel on detached inputs.
        let (mc, mr) = (
            fused::host_mask(&inputs.chosen_mask)?,
            fused::host_mask(&inputs.rejected_mask)?,
        );
        let pc = pool::masked_mean(&inputs.policy_chosen, &mc)?;
        let pr = pool::masked_mean(&inputs.policy_rejected, &mr)?;
        let rc = pool::masked_mean(&inputs.reference_chosen.detach(), &mc)?;
        let rj = pool::masked_mean(&inputs.reference_rejected.detach(), &mr)?;
        let pd = pc.dtype();
        let fmask = |m: &Tensor| -> Result<Tensor> { Ok(m.detach().gt(0.0)?.to_dtype(pd)?) };
        let (v_rr, v_ret) = match z_host {
            Some(z) => {
                let (r, c) = example_weight_tensors(z, cfg.weight_scale, pd)?;
                (Some(r), Some(c))
            }
            None => (None, None),
        };
        let (rr, ret) = mean_parts(
            cfg,
            [&pc, &pr, &rc, &rj],
            &fmask(&inputs.chosen_mask)?,
            &fmask(&inputs.rejected_mask)?,
            v_rr.as_ref(),
            v_ret.as_ref(),
        )?;
        let (cos_c, cos_r) = kernel_cosines(inputs)?;
        return finish(cfg, progress, b, dtype, &rr, &ret, cos_c, cos_r);
    }
    if allow_fused && matches!(dtype, DType::BF16 | DType::F16) {
        // Half-precision hidden states through the chain of candle ops: computed in f32 (one
        // conversion per input, differentiable) and cast back, as mixed-precision training keeps
        // losses in f32. candle's bf16/f16 elementwise ops convert element by element and were
        // 5-20x slower than the f32 chain at the benchmark shapes (docs/perf.md, "Loss
        // kernels"), and f32 accumulation is closer to exact. `reprpo_loss_unfused` keeps the
        // native-dtype chain as a reference.
        let up = |t: &Tensor| t.to_dtype(DType::F32);
        let inputs32 = HiddenPairs {
            policy_chosen: up(&inputs.policy_chosen)?,
            policy_rejected: up(&inputs.policy_rejected)?,
            reference_chosen: up(&inputs.reference_chosen)?,
            reference_rejected: up(&inputs.reference_rejected)?,
            chosen_mask: inputs.chosen_mask.clone(),
            rejected_mask: inputs.rejected_mask.clone(),
            dpo_z: inputs.dpo_z.as_ref().map(up).transpose()?,
        };
        let out = loss_impl(&inputs32, cfg, progress, false)?;
        return Ok(LossOut {
            loss: out.loss.to_dtype(dtype)?,
            per_example: out.per_example.to_dtype(dtype)?,
            metrics: out
                .metrics
                .into_iter()
                .map(|(k, v)| Ok((k, v.to_dtype(dtype)?)))
                .collect::<Result<_>>()?,
        });
    }
    let m_c = inputs.chosen_mask.detach().gt(0.0)?.to_dtype(dtype)?;
    let m_r = inputs.rejected_mask.detach().gt(0.0)?.to_dtype(dtype)?;
    let m_both = m_c.mul(&m_r)?;
    // Hidden states at padded positions are replaced by 0 (a select, whose backward sends exactly 0
    // there), so that whatever a model leaves at padding (even NaN from a fully masked attention row)
    // reaches neither the loss nor the gradients.
    let keep = |x: &Tensor, m: &Tensor| -> Result<Tensor> {
        let sel = m.unsqueeze(0)?.unsqueeze(D::Minus1)?.gt(0.0)?;
        let sel = sel.broadcast_as(x.shape())?;
        Ok(sel.where_cond(x, &x.zeros_like()?)?)
    };
    let pi_c = &keep(&inputs.policy_chosen, &m_c)?;
    let pi_r = &keep(&inputs.policy_rejected, &m_r)?;
    let ref_c = keep(&inputs.reference_chosen.detach(), &m_c)?;
    let ref_r = keep(&inputs.reference_rejected.detach(), &m_r)?;

    // Per-example weights: w for retain, 1 - w for reroute.
    let (v_rr, v_ret) = match z_host {
        Some(z) => {
            let (r, c) = example_weight_tensors(z, cfg.weight_scale, dtype)?;
            (Some(r), Some(c))
        }
        None => (None, None),
    };

    let variant = cfg.variant;
    let ret_mask = if variant == ReprPoVariant::Ldr {
        &m_both
    } else {
        &m_c
    };
    let (rr, ret) = match (variant, cfg.token_reduction) {
        (ReprPoVariant::Cka, _) => {
            let valid = |m: &Tensor| -> Result<Tensor> {
                Ok(m.sum(D::Minus1)?.ge(2.0)?.to_dtype(dtype)?.unsqueeze(0)?)
            };
            let d_rr = cka_distance(pi_r, &ref_c, &m_both)?;
            let d_ret = cka_distance(pi_c, &ref_c, &m_c)?;
            (
                weighted_parts(&d_rr, &valid(&m_both)?, v_rr.as_ref())?,
                weighted_parts(&d_ret, &valid(&m_c)?, v_ret.as_ref())?,
            )
        }
        (_, TokenReduction::PerPosition) => {
            let (d_rr, d_ret) = if variant == ReprPoVariant::Ldr {
                (
                    ldr(&ref_c, pi_r, &ref_c, &ref_r, cfg.ldr_eps)?,
                    ldr(&ref_c, pi_c, &ref_c, &ref_r, cfg.ldr_eps)?,
                )
            } else {
                (distance(cfg, pi_r, &ref_c)?, distance(cfg, pi_c, &ref_c)?)
            };
            (
                weighted_parts(&d_rr, &m_both.unsqueeze(0)?, v_rr.as_ref())?,
                weighted_parts(&d_ret, &ret_mask.unsqueeze(0)?, v_ret.as_ref())?,
            )
        }
        (_, TokenReduction::Mean) => {
            let (pc, pr) = (pool(pi_c, &m_c)?, pool(pi_r, &m_r)?);
            let (rc, rj) = (pool(&ref_c, &m_c)?, pool(&ref_r, &m_r)?);
            let pooled = [&pc, &pr, &rc, &rj];
            mean_parts(cfg, pooled, &m_c, &m_r, v_rr.as_ref(), v_ret.as_ref())?
        }
    };

    let (pcd, prd) = (pi_c.detach(), pi_r.detach());
    let cos_c = masked_mean(&cosine(&pcd, &ref_c)?, &m_c)?;
    let cos_r = masked_mean(&cosine(&prd, &ref_c)?, &m_both)?;
    finish(cfg, progress, b, dtype, &rr, &ret, cos_c, cos_r)
}

/// The row kernel's view of `inputs`, the policy tensors detached or not.
fn kernel_inputs(inputs: &HiddenPairs, detach: bool) -> fused::KernelInputs<'_> {
    let pol = |t: &Tensor| if detach { t.detach() } else { t.clone() };
    fused::KernelInputs {
        pi_cho: pol(&inputs.policy_chosen),
        pi_rej: pol(&inputs.policy_rejected),
        ref_cho: &inputs.reference_chosen,
        ref_rej: &inputs.reference_rejected,
        m_c: &inputs.chosen_mask,
        m_r: &inputs.rejected_mask,
    }
}

/// The per-position cosine diagnostics (`cosine/chosen`, `cosine/rejected`) by the row kernel on
/// detached inputs, for the kernels that do not compute them (cka, token reduction `mean`).
fn kernel_cosines(inputs: &HiddenPairs) -> Result<(Tensor, Tensor)> {
    let f = fused::reroute_retain(RowDist::L2, &kernel_inputs(inputs, true), None)?;
    Ok((f.cos_chosen, f.cos_rejected))
}

/// The reroute and retain parts (`[B]` each) of token reduction `mean` from the pooled hidden
/// states `[pi_cho, pi_rej, ref_cho, ref_rej]` (each `[L, B, H]`), float masks `m_c`, `m_r` `[B, T]`
/// in the pooled dtype, and the per-example weights.
fn mean_parts(
    cfg: &ReprPoConfig,
    [pc, pr, rc, rj]: [&Tensor; 4],
    m_c: &Tensor,
    m_r: &Tensor,
    v_rr: Option<&Tensor>,
    v_ret: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let dtype = pc.dtype();
    let ldr_variant = cfg.variant == ReprPoVariant::Ldr;
    let (d_rr, d_ret) = if ldr_variant {
        (
            ldr(rc, pr, rc, rj, cfg.ldr_eps)?,
            ldr(rc, pc, rc, rj, cfg.ldr_eps)?,
        )
    } else {
        (distance(cfg, pr, rc)?, distance(cfg, pc, rc)?)
    };
    let has = |m: &Tensor| -> Result<Tensor> { Ok(m.sum(D::Minus1)?.gt(0.0)?.to_dtype(dtype)?) };
    let has_c = has(m_c)?;
    let has_both = has_c.mul(&has(m_r)?)?.unsqueeze(0)?;
    let has_ret = if ldr_variant {
        has_both.clone()
    } else {
        has_c.unsqueeze(0)?
    };
    Ok((
        weighted_parts(&d_rr, &has_both, v_rr)?,
        weighted_parts(&d_ret, &has_ret, v_ret)?,
    ))
}

/// Per-example weights `(v_rr, v_ret) = (1 - w, w)`, `w = softmax(-s z)`, detached, in `dtype`.
fn example_weight_tensors(z: &Tensor, scale: f64, dtype: DType) -> Result<(Tensor, Tensor)> {
    let s = z.detach().to_dtype(dtype)?.affine(-scale, 0.0)?;
    let e = s.broadcast_sub(&s.max_keepdim(0)?)?.exp()?;
    let w = e.broadcast_div(&e.sum_all()?)?;
    Ok((w.affine(-1.0, 1.0)?, w))
}

/// The loss, per-example loss and metrics from the reroute and retain parts per example (`[B]`,
/// summing to `L_rr`, `L_retain`) and the two cosine means; results in `dtype`.
#[allow(clippy::too_many_arguments)]
fn finish(
    cfg: &ReprPoConfig,
    progress: f64,
    b: usize,
    dtype: DType,
    rr: &Tensor,
    ret: &Tensor,
    cos_c: Tensor,
    cos_r: Tensor,
) -> Result<LossOut> {
    let variant = cfg.variant;
    let p = progress;
    // (c_rr, c_retain, multiplier of L_retain in the loss)
    let (c_rr, mut c_ret, mut k_ret) = match cfg.schedule {
        Schedule::Reprpo => (1.0 - p / 2.0, p / 2.0, cfg.alpha * p / 2.0),
        Schedule::CircuitBreakers => (cfg.alpha * (1.0 - p), cfg.alpha * p, cfg.alpha * p),
    };
    if variant == ReprPoVariant::RrOnly {
        (c_ret, k_ret) = (0.0, 0.0);
    }
    let l_rr = rr.sum_all()?;
    let l_ret = ret.sum_all()?;
    let per_example = rr
        .affine(c_rr * b as f64, 0.0)?
        .add(&ret.affine(k_ret * b as f64, 0.0)?)?;
    let loss = l_rr.affine(c_rr, 0.0)?.add(&l_ret.affine(k_ret, 0.0)?)?;

    let mut metrics = BTreeMap::new();
    let scalar = |v: f64| -> Result<Tensor> { Ok(Tensor::new(v, rr.device())?.to_dtype(dtype)?) };
    metrics.insert("loss_rr".to_string(), l_rr.detach().to_dtype(dtype)?);
    metrics.insert("loss_retain".to_string(), l_ret.detach().to_dtype(dtype)?);
    metrics.insert("coef_rr".to_string(), scalar(c_rr)?);
    metrics.insert("coef_retain".to_string(), scalar(c_ret)?);
    metrics.insert("cosine/chosen".to_string(), cos_c.to_dtype(dtype)?);
    metrics.insert("cosine/rejected".to_string(), cos_r.to_dtype(dtype)?);
    Ok(LossOut {
        loss: loss.to_dtype(dtype)?,
        per_example: per_example.to_dtype(dtype)?,
        metrics,
    })
}
