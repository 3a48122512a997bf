//! The scores, as pure functions of per-sequence log-probabilities (no tensors here; see
//! [`crate::scorer`] for how the log-probabilities are computed).
//!
//! Notation: for an item with prompt `x` and choices `y_1..y_n` (or a pair, chosen `y_w` and
//! rejected `y_l`), `l_i = log p(y_i | x) = sum_t log p(y_i,t | x, y_i,<t)` is the summed
//! log-probability of the choice's tokens given the prompt and `n_i` its number of tokens.
//!
//! # Multiple choice ([`mc_score`])
//! - normalised probability of choice `i`: `p_i = exp(l_i) / sum_j exp(l_j)` (a softmax over
//!   the choices' summed log-probabilities);
//! - probability of the correct answer: `P = sum_{i in C} p_i` over the set `C` of correct
//!   choices. With one correct answer this is TruthfulQA's MC1 probability; with several it is
//!   **MC2**, the normalised probability mass on all true answers;
//! - accuracy: `argmax_i l_i in C` (first maximum on ties); for TruthfulQA MC1 this is the MC1
//!   score;
//! - length-normalised variants: `lbar_i = l_i / n_i` (mean log-probability per token), with
//!   `pbar_i = softmax(lbar)_i`, `Pbar = sum_{i in C} pbar_i` and accuracy `argmax_i lbar_i in C`.
//!
//! # Preference pairs ([`pref_score`])
//! As the preference-evaluation tools score it (mean log-probability per token):
//! `delta = l_w / n_w - l_l / n_l`, `prob = sigmoid(delta) = 1 / (1 + exp(-delta))`,
//! `correct = prob > 0.5` (equivalently `delta > 0`).
//!
//! # DPO rewards against the base ([`dpo_reward`])
//! With the base model's summed log-probabilities `l_w^ref`, `l_l^ref` (same weights, adapter
//! off) and `beta`: `r_w = beta (l_w - l_w^ref)`, `r_l = beta (l_l - l_l^ref)`,
//! `margin = r_w - r_l`, `reward_correct = r_w > r_l` (TRL's `rewards/accuracies`).

use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};

/// Index of the first maximum of `xs` (0 for an empty slice).
pub fn argmax(xs: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best
}

/// `softmax(xs)` in f64, stable (max subtracted).
pub fn softmax(xs: &[f64]) -> Vec<f64> {
    let m = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = xs.iter().map(|x| (x - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|x| x / s).collect()
}

/// `1 / (1 + exp(-x))`, stable for large |x|.
pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// The multiple-choice scores of one item (see the module docs for the formulas).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct McScore {
    /// `l_i`: summed log-probability of each choice.
    pub logps: Vec<f64>,
    /// `n_i`: tokens of each choice.
    pub tokens: Vec<usize>,
    /// Indices of the correct choices.
    pub correct: Vec<usize>,
    /// `p_i`: each choice's probability normalised over the choices.
    pub probs: Vec<f64>,
    /// `P`: normalised probability of the correct answer(s) (MC1 / MC2).
    pub prob_correct: f64,
    /// `Pbar`: the same from length-normalised log-probabilities.
    pub prob_correct_norm: f64,
    /// The choice with the highest `l_i`.
    pub pred: usize,
    /// `pred` is correct.
    pub acc: bool,
    /// The choice with the highest `lbar_i` is correct.
    pub acc_norm: bool,
}

/// Score one multiple-choice item from its choices' summed log-probabilities `logps`, token
/// counts `tokens` and correct indices `correct`.
///
/// Errors when the lengths differ, there are no choices, `correct` is empty or out of range,
/// a token count is 0 or a log-probability is not finite.
pub fn mc_score(logps: &[f64], tokens: &[usize], correct: &[usize]) -> Result<McScore> {
    let n = logps.len();
    if n == 0 || tokens.len() != n {
        return Err(EvalError::Invalid(format!(
            "mc_score: {n} log-probabilities for {} token counts",
            tokens.len()
        )));
    }
    if correct.is_empty() || correct.iter().any(|&c| c >= n) {
        return Err(EvalError::Invalid(format!(
            "mc_score: correct indices {correct:?} for {n} choices"
        )));
    }
    if let Some(i) = tokens.iter().position(|&t| t == 0) {
        return Err(EvalError::Invalid(format!(
            "mc_score: choice {i} has no tokens"
        )));
    }
    if let Some(i) = logps.iter().position(|l| !l.is_finite()) {
        return Err(EvalError::Invalid(format!(
            "mc_score: choice {i} has log-probability {}",
            logps[i]
        )));
    }
    let probs = softmax(logps);
    let mean: Vec<f64> = logps
        .iter()
        .zip(tokens)
        .map(|(l, &t)| l / t as f64)
        .collect();
    let probs_norm = softmax(&mean);
    let pred = argmax(logps);
    Ok(McScore {
        logps: logps.to_vec(),
        tokens: tokens.to_vec(),
        correct: correct.to_vec(),
        prob_correct: correct.iter().map(|&c| probs[c]).sum(),
        prob_correct_norm: correct.iter().map(|&c| probs_norm[c]).sum(),
        acc: correct.contains(&pred),
        acc_norm: correct.contains(&argmax(&mean)),
        pred,
        probs,
    })
}

/// The preference scores of one pair (see the module docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrefScore {
    /// `l_w`: summed log-probability of the chosen completion.
    pub logp_chosen: f64,
    /// `l_l`: summed log-probability of the rejected completion.
    pub logp_rejected: f64,
    /// `n_w`.
    pub tokens_chosen: usize,
    /// `n_l`.
    pub tokens_rejected: usize,
    /// `l_w / n_w - l_l / n_l`.
    pub delta: f64,
    /// `sigmoid(delta)`.
    pub prob: f64,
    /// `prob > 0.5`.
    pub correct: bool,
}

/// Score one pair from the summed log-probabilities and token counts of its completions.
///
/// Errors on a zero token count or a non-finite log-probability.
pub fn pref_score(lw: f64, nw: usize, ll: f64, nl: usize) -> Result<PrefScore> {
    if nw == 0 || nl == 0 {
        return Err(EvalError::Invalid(format!(
            "pref_score: a completion has no tokens (chosen {nw}, rejected {nl})"
        )));
    }
    if !lw.is_finite() || !ll.is_finite() {
        return Err(EvalError::Invalid(format!(
            "pref_score: non-finite log-probability (chosen {lw}, rejected {ll})"
        )));
    }
    let delta = lw / nw as f64 - ll / nl as f64;
    let prob = sigmoid(delta);
    Ok(PrefScore {
        logp_chosen: lw,
        logp_rejected: ll,
        tokens_chosen: nw,
        tokens_rejected: nl,
        delta,
        prob,
        correct: prob > 0.5,
    })
}

/// DPO's implicit rewards of a pair against the base model (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DpoReward {
    /// `beta (l_w - l_w^ref)`.
    pub chosen: f64,
    /// `beta (l_l - l_l^ref)`.
    pub rejected: f64,
    /// `chosen - rejected`.
    pub margin: f64,
    /// `chosen > rejected`.
    pub correct: bool,
}

/// DPO rewards of `policy` against `base` (the same pair scored with the adapter off).
pub fn dpo_reward(policy: &PrefScore, base: &PrefScore, beta: f64) -> DpoReward {
    let chosen = beta * (policy.logp_chosen - base.logp_chosen);
    let rejected = beta * (policy.logp_rejected - base.logp_rejected);
    DpoReward {
        chosen,
        rejected,
        margin: chosen - rejected,
        correct: chosen > rejected,
    }
}
