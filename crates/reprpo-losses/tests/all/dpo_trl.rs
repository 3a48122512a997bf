//! The DPO family against TRL's own loss code.
//!
//! Fixtures: `tests/fixtures/losses/dpo.{json,safetensors}` (TRL 1.16.0's `DPOTrainer._compute_loss`)
//! and `dpo_classic.{json,safetensors}` (TRL 0.23.1's `get_batch_loss_metrics` / `dpo_loss`: cDPO,
//! `bco_pair`'s running mean, `rpo_alpha`), written by `tests/reference/gen_dpo_fixtures.py`.
//! Every case is compared in f32: loss, per-example loss (where TRL returns one) and metrics within
//! 1e-5 relative, gradients w.r.t. every log-prob input within 1e-4 relative; where TRL's value is
//! NaN ours must be NaN too (`f_forward_kl_discopop_sft`: TRL's `exp(-x) * sigmoid(x / tau)`
//! overflows to `inf * 0` in f32 on its first example). The one exception is named: LD-DPO tail
//! gradients of sequences without a tail, which TRL has no input for. A few types are also
//! checked against central finite differences in f64.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor, Var};
use reprpo_losses::{
    DpoConfig, DpoInputs, DpoState, LdTails, LossError, LossType, WpoLogWeights, dpo_loss,
};

const LOSS_RTOL: f64 = 1e-5;
const GRAD_RTOL: f64 = 1e-4;
/// Absolute floor for values that are (nearly) zero, far below any tolerance that matters here.
const ATOL: f64 = 1e-7;

/// Every case the fixtures must hold: (file, case name).
const CASES: &[(&str, &str)] = &[
    ("dpo", "sigmoid"),
    ("dpo", "sigmoid_beta05_ls_ignored"),
    ("dpo", "hinge"),
    ("dpo", "ipo"),
    ("dpo", "exo_pair"),
    ("dpo", "nca_pair"),
    ("dpo", "robust"),
    ("dpo", "bco_pair"),
    ("dpo", "sppo_hard"),
    ("dpo", "aot"),
    ("dpo", "aot_unpaired"),
    ("dpo", "apo_zero"),
    ("dpo", "apo_down"),
    ("dpo", "discopop"),
    ("dpo", "discopop_tau1"),
    ("dpo", "sft"),
    ("dpo", "sigmoid_norm"),
    ("dpo", "mix_mpo"),
    ("dpo", "mix_ipo_hinge"),
    ("dpo", "mix_default_weights"),
    ("dpo", "ld_alpha_sigmoid"),
    ("dpo", "ld_alpha_zero_ipo"),
    ("dpo", "ld_alpha_mix"),
    ("dpo", "f_forward_kl"),
    ("dpo", "f_js"),
    ("dpo", "f_alpha"),
    ("dpo", "f_alpha_coef_1_5_hinge"),
    ("dpo", "f_alpha_coef_1_limit"),
    ("dpo", "f_js_ipo"),
    ("dpo", "f_forward_kl_sigmoid_norm"),
    ("dpo", "f_js_exo_robust"),
    ("dpo", "f_forward_kl_discopop_sft"),
    ("dpo", "wpo_sigmoid"),
    ("dpo", "wpo_mix"),
    ("dpo", "sigmoid_at_reference"),
    ("dpo", "mix_at_reference"),
    ("dpo_classic", "cdpo_sigmoid"),
    ("dpo_classic", "bco_pair_running_mean"),
    ("dpo_classic", "rpo_alpha"),
    ("dpo_classic", "rpo_alpha_bco"),
];

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/losses")
}

struct Fixture {
    meta: serde_json::Value,
    tensors: HashMap<String, Tensor>,
}

fn load(name: &str) -> Result<Fixture> {
    let dir = fixture_dir();
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join(format!("{name}.json")))
            .with_context(|| format!("reading {name}.json"))?,
    )?;
    let tensors =
        candle_core::safetensors::load(dir.join(format!("{name}.safetensors")), &Device::Cpu)?;
    Ok(Fixture { meta, tensors })
}

fn to_vec(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
}

/// Below this magnitude an expected value counts as "tiny": reported by absolute error.
const TINY: f64 = 1e-6;

/// Largest `|a - b| / |b|` over expected values of magnitude at least [`TINY`] (NaN skipped).
fn max_rel_err(got: &[f64], want: &[f64]) -> f64 {
    got.iter()
        .zip(want)
        .filter(|(_, w)| w.abs() >= TINY)
        .map(|(g, w)| (g - w).abs() / w.abs())
        .fold(0.0, f64::max)
}

/// Largest `|a - b|` over the tiny expected values.
fn max_tiny_abs_err(got: &[f64], want: &[f64]) -> f64 {
    got.iter()
        .zip(want)
        .filter(|(_, w)| w.abs() < TINY)
        .map(|(g, w)| (g - w).abs())
        .fold(0.0, f64::max)
}

/// Same non-empty length, NaN exactly where the expected value is NaN, infinities equal, and every
/// finite value within `rtol` relative (plus [`ATOL`]). A NaN in TRL's output is a value to
/// reproduce, not a wildcard: the only entries not compared are the LD-DPO tail gradients TRL has
/// no input for, and those are removed by [`split_ld_tail_nans`] before this is called.
fn within(got: &[f64], want: &[f64], rtol: f64) -> bool {
    !want.is_empty()
        && got.len() == want.len()
        && got.iter().zip(want).all(|(g, w)| {
            if w.is_nan() {
                g.is_nan()
            } else if w.is_infinite() {
                g == w
            } else {
                g.is_finite() && (g - w).abs() <= rtol * w.abs() + ATOL
            }
        })
}

/// LD-DPO's tail gradients: TRL's graph has an input for the tail of a sequence only where the
/// sequence has one (the longer of its pair), so the fixture writes NaN for the others (see
/// `gen_dpo_fixtures.py`). Checks that the NaNs sit exactly where the tail input is 0 (and nowhere
/// else), and returns (ours, TRL's) on the positions that do have a tail, to compare in full.
fn split_ld_tail_nans(
    got: &[f64],
    want: &[f64],
    tail: &[f64],
) -> std::result::Result<(Vec<f64>, Vec<f64>), String> {
    if got.len() != want.len() || tail.len() != want.len() || want.is_empty() {
        return Err(format!(
            "lengths: ours {}, TRL {}, tail input {}",
            got.len(),
            want.len(),
            tail.len()
        ));
    }
    let nan_at: Vec<bool> = want.iter().map(|w| w.is_nan()).collect();
    let no_tail_at: Vec<bool> = tail.iter().map(|t| *t == 0.0).collect();
    if nan_at != no_tail_at {
        return Err(format!(
            "TRL's NaN entries {nan_at:?} are not the sequences without a tail {no_tail_at:?}"
        ));
    }
    Ok(got
        .iter()
        .zip(want)
        .filter(|(_, w)| !w.is_nan())
        .map(|(g, w)| (*g, *w))
        .unzip())
}

#[derive(Default)]
struct Errors {
    loss: f64,
    metric: f64,
    grad: f64,
    grad_tiny_abs: f64,
    /// LD-DPO tail gradients: (entries compared with TRL, NaN entries where TRL has no tail input).
    ld_tail_entries: (usize, usize),
    failures: Vec<String>,
}

fn check_file(file: &str) -> Result<Errors> {
    let fx = load(file)?;
    let mut errs = Errors::default();
    let cases = fx.meta["cases"].as_array().context("cases")?;
    for case in cases {
        let name = case["name"].as_str().context("name")?;
        let cfg: DpoConfig = serde_json::from_value(case["config"].clone())
            .with_context(|| format!("{name}: config"))?;
        let mut state = DpoState::default();
        let batches = case["batches"].as_array().context("batches")?;
        for (bi, batch) in batches.iter().enumerate() {
            let prefix = format!("{name}.{}", batch.as_str().context("batch")?);
            let get = |k: &str| -> Result<Tensor> {
                fx.tensors
                    .get(&format!("{prefix}{k}"))
                    .cloned()
                    .with_context(|| format!("missing {prefix}{k}"))
            };
            let opt = |k: &str| fx.tensors.get(&format!("{prefix}{k}")).cloned();
            let logp_names = [
                "policy_chosen_logps",
                "policy_rejected_logps",
                "reference_chosen_logps",
                "reference_rejected_logps",
            ];
            let tail_names = [
                "policy_chosen_tail",
                "policy_rejected_tail",
                "reference_chosen_tail",
                "reference_rejected_tail",
            ];
            let vars: Vec<Var> = logp_names
                .iter()
                .map(|n| Ok(Var::from_tensor(&get(n)?)?))
                .collect::<Result<_>>()?;
            let tails: Option<Vec<Var>> = if opt("policy_chosen_tail").is_some() {
                Some(
                    tail_names
                        .iter()
                        .map(|n| Ok(Var::from_tensor(&get(n)?)?))
                        .collect::<Result<_>>()?,
                )
            } else {
                None
            };
            let mut inputs = DpoInputs::new(
                vars[0].as_tensor().clone(),
                vars[1].as_tensor().clone(),
                vars[2].as_tensor().clone(),
                vars[3].as_tensor().clone(),
                get("chosen_tokens")?,
                get("rejected_tokens")?,
            );
            inputs.chosen_logits_sum = opt("chosen_logits_sum");
            inputs.rejected_logits_sum = opt("rejected_logits_sum");
            if let Some(t) = &tails {
                inputs.ld_tails = Some(LdTails {
                    policy_chosen: t[0].as_tensor().clone(),
                    policy_rejected: t[1].as_tensor().clone(),
                    reference_chosen: t[2].as_tensor().clone(),
                    reference_rejected: t[3].as_tensor().clone(),
                });
            }
            if let (Some(c), Some(r)) =
                (opt("chosen_wpo_log_weight"), opt("rejected_wpo_log_weight"))
            {
                inputs.wpo_log_weights = Some(WpoLogWeights {
                    chosen: c,
                    rejected: r,
                });
            }
            let out = dpo_loss(&inputs, &cfg, &mut state).with_context(|| prefix.clone())?;
            let mut fail = |what: String| errs.failures.push(format!("{prefix}: {what}"));

            // loss
            let got = to_vec(&out.loss)?;
            let want = to_vec(&get("loss")?)?;
            errs.loss = errs.loss.max(max_rel_err(&got, &want));
            if !within(&got, &want, LOSS_RTOL) {
                fail(format!("loss {got:?} vs TRL {want:?}"));
            }
            // loss = mean(per_example), and TRL's per-example loss where it returns one
            let mean = to_vec(&out.per_example.mean_all()?)?;
            if !within(&mean, &got, 1e-6) {
                fail(format!("mean(per_example) {mean:?} != loss {got:?}"));
            }
            if let Some(pe) = opt("per_example") {
                let (g, w) = (to_vec(&out.per_example)?, to_vec(&pe)?);
                errs.loss = errs.loss.max(max_rel_err(&g, &w));
                if !within(&g, &w, LOSS_RTOL) {
                    fail(format!("per_example {g:?} vs TRL {w:?}"));
                }
            }
            // metrics
            let ours = out.metrics_f64()?;
            let theirs = case["metrics"][bi].as_object().context("metrics")?;
            for (k, v) in theirs {
                let w = v.as_f64().context("metric value")?;
                let g = if k == "running_mean" {
                    state.running.mean
                } else {
                    match ours.get(k) {
                        Some(g) => *g,
                        None => {
                            fail(format!("metric {k} missing"));
                            continue;
                        }
                    }
                };
                errs.metric = errs.metric.max(max_rel_err(&[g], &[w]));
                if !within(&[g], &[w], LOSS_RTOL) {
                    fail(format!("metric {k}: {g} vs TRL {w}"));
                }
            }
            // gradients
            let grads = out.loss.backward()?;
            let mut pairs: Vec<(&str, &Var)> =
                logp_names.iter().copied().zip(vars.iter()).collect();
            if let Some(t) = &tails {
                pairs.extend(tail_names.iter().copied().zip(t.iter()));
            }
            for (n, v) in pairs {
                let want = to_vec(&get(&format!("grad_{n}"))?)?;
                let got = match grads.get(v.as_tensor()) {
                    Some(g) => to_vec(g)?,
                    None => vec![0.0; want.len()],
                };
                let (got, want) = if n.ends_with("_tail") {
                    match split_ld_tail_nans(&got, &want, &to_vec(v.as_tensor())?) {
                        Ok(kept) => {
                            errs.ld_tail_entries.0 += kept.1.len();
                            errs.ld_tail_entries.1 += want.len() - kept.1.len();
                            kept
                        }
                        Err(e) => {
                            fail(format!("grad {n}: {e}"));
                            continue;
                        }
                    }
                } else {
                    (got, want)
                };
                errs.grad = errs.grad.max(max_rel_err(&got, &want));
                errs.grad_tiny_abs = errs.grad_tiny_abs.max(max_tiny_abs_err(&got, &want));
                if !within(&got, &want, GRAD_RTOL) {
                    fail(format!("grad {n}: {got:?} vs TRL {want:?}"));
                }
            }
        }
    }
    Ok(errs)
}

fn report(file: &str, e: &Errors) -> Result<()> {
    eprintln!(
        "{file}: max relative error: loss {:.2e}, metrics {:.2e}, gradients {:.2e} \
         (gradients under {TINY:e} in magnitude: max absolute error {:.2e})",
        e.loss, e.metric, e.grad, e.grad_tiny_abs
    );
    if !e.failures.is_empty() {
        bail!(
            "{} mismatches:\n{}",
            e.failures.len(),
            e.failures.join("\n")
        );
    }
    Ok(())
}

#[test]
fn fixtures_hold_the_case_table_and_every_loss_type() -> Result<()> {
    let mut seen_types = BTreeSet::new();
    for file in ["dpo", "dpo_classic"] {
        let fx = load(file)?;
        let names: BTreeSet<String> = fx.meta["cases"]
            .as_array()
            .context("cases")?
            .iter()
            .map(|c| c["name"].as_str().unwrap_or_default().to_string())
            .collect();
        let want: BTreeSet<String> = CASES
            .iter()
            .filter(|(f, _)| *f == file)
            .map(|(_, n)| n.to_string())
            .collect();
        assert_eq!(names, want, "{file}: case table");
        for c in fx.meta["cases"].as_array().context("cases")? {
            let cfg: DpoConfig = serde_json::from_value(c["config"].clone())?;
            seen_types.extend(cfg.loss_type.iter().map(|t| t.name()));
        }
    }
    let all: BTreeSet<&str> = LossType::ALL.iter().map(|t| t.name()).collect();
    assert_eq!(seen_types, all, "every loss type has a TRL case");
    Ok(())
}

#[test]
fn matches_trl_1_16() -> Result<()> {
    let errs = check_file("dpo")?;
    report("dpo (TRL 1.16.0)", &errs)?;
    let (compared, nan) = errs.ld_tail_entries;
    eprintln!("LD-DPO tail gradients: {compared} compared, {nan} NaN (no tail input in TRL)");
    assert!(
        compared > 0 && nan > 0,
        "LD-DPO tail gradients: {compared} compared, {nan} NaN; both must be > 0"
    );
    Ok(())
}

/// The only NaNs in TRL's outputs the comparison does not reproduce: LD-DPO tail gradients of the
/// sequences that have no tail (the shorter of each pair, or both when the lengths are equal). Each
/// `ld_alpha` case must hold some, exactly where its tail input is 0; every other NaN (e.g. the
/// loss of `f_forward_kl_discopop_sft`) must be matched by a NaN of ours (see [`within`]).
#[test]
fn ld_alpha_tail_gradients_are_nan_exactly_where_a_sequence_has_no_tail() -> Result<()> {
    let fx = load("dpo")?;
    let mut cases = 0;
    for case in fx.meta["cases"].as_array().context("cases")? {
        let name = case["name"].as_str().context("name")?;
        if case["config"].get("ld_alpha").is_none() {
            continue;
        }
        cases += 1;
        let mut nan = 0;
        for who in ["policy", "reference"] {
            for side in ["chosen", "rejected"] {
                let t = |k: &str| -> Result<Vec<f64>> {
                    to_vec(
                        fx.tensors
                            .get(&format!("{name}.{k}"))
                            .context(k.to_string())?,
                    )
                };
                let want = t(&format!("grad_{who}_{side}_tail"))?;
                let tail = t(&format!("{who}_{side}_tail"))?;
                let (_, kept) = split_ld_tail_nans(&want, &want, &tail)
                    .map_err(|e| anyhow::anyhow!("{name} {who} {side}: {e}"))?;
                nan += want.len() - kept.len();
                assert!(kept.iter().all(|w| w.is_finite()), "{name}: {kept:?}");
            }
        }
        assert!(nan > 0, "{name}: no sequence without a tail");
    }
    assert_eq!(cases, 3, "ld_alpha cases in the fixture");
    Ok(())
}

#[test]
fn matches_trl_0_23_classic_options() -> Result<()> {
    report("dpo_classic (TRL 0.23.1)", &check_file("dpo_classic")?)
}

// ---------------------------------------------------------------------------------------------
// Finite differences in f64
// ---------------------------------------------------------------------------------------------

fn fd_check(cfg: &DpoConfig) -> Result<f64> {
    let dev = Device::Cpu;
    let b = 5usize;
    // no ties within any sorted quantity (aot); example 0 has x = 0 exactly (policy = reference)
    let pc = [-12.5, -8.25, -20.0, -5.375, -14.625];
    let pr = [-11.0, -9.5, -18.25, -7.125, -13.0625];
    let rc = [-12.0, -8.0, -21.5, -5.0, -15.0];
    let rr = [-10.5, -10.25, -18.0, -7.75, -12.5];
    let tails = [
        [-1.5, 0.0, -3.25, 0.0, -0.5],
        [0.0, -2.0, 0.0, -1.25, 0.0],
        [-1.0, 0.0, -3.5, 0.0, -0.75],
        [0.0, -2.25, 0.0, -1.5, 0.0],
    ];
    let nc = [7.0, 5.0, 11.0, 4.0, 9.0];
    let nr = [6.0, 8.0, 10.0, 6.0, 8.0];
    let mut base: Vec<Vec<f64>> = vec![pc.to_vec(), pr.to_vec(), rc.to_vec(), rr.to_vec()];
    if cfg.ld_alpha.is_some() {
        base.extend(tails.iter().map(|t| t.to_vec()));
    }
    let eval = |vals: &[Vec<f64>], state: &mut DpoState| -> Result<(f64, Vec<Tensor>, Tensor)> {
        let ts: Vec<Var> = vals
            .iter()
            .map(|v| Ok(Var::from_tensor(&Tensor::new(v.as_slice(), &dev)?)?))
            .collect::<Result<_>>()?;
        let mut inputs = DpoInputs::new(
            ts[0].as_tensor().clone(),
            ts[1].as_tensor().clone(),
            ts[2].as_tensor().clone(),
            ts[3].as_tensor().clone(),
            Tensor::new(&nc, &dev)?,
            Tensor::new(&nr, &dev)?,
        );
        if ts.len() == 8 {
            inputs.ld_tails = Some(LdTails {
                policy_chosen: ts[4].as_tensor().clone(),
                policy_rejected: ts[5].as_tensor().clone(),
                reference_chosen: ts[6].as_tensor().clone(),
                reference_rejected: ts[7].as_tensor().clone(),
            });
        }
        let out = dpo_loss(&inputs, cfg, state)?;
        let loss = out.loss.to_scalar::<f64>()?;
        let tensors = ts.iter().map(|v| v.as_tensor().clone()).collect();
        Ok((loss, tensors, out.loss))
    };
    // bco's running mean is a constant of each call: take it from a fixed prior state
    let prior = DpoState::default();
    let mut after = prior.clone();
    let (_, ts, loss) = eval(&base, &mut after)?;
    let frozen_shift = cfg.bco_running_mean.then_some(after.running.mean);
    let grads = loss.backward()?;
    let h = 1e-6;
    let mut worst: f64 = 0.0;
    for (i, t) in ts.iter().enumerate() {
        let g = match grads.get(t) {
            Some(g) => to_vec(g)?,
            None => vec![0.0; b],
        };
        for j in 0..b {
            let mut plus = base.clone();
            plus[i][j] += h;
            let mut minus = base.clone();
            minus[i][j] -= h;
            let fd = match frozen_shift {
                // bco_pair with its running mean: the mean is a constant of each call (no gradient
                // flows through it), so hold it at its value for `base`. With delta frozen, bco_pair
                // equals the plain one on rewards shifted by -delta: pi_c, pi_r shifted by -delta/beta.
                Some(shift) => {
                    let frozen = DpoConfig {
                        bco_running_mean: false,
                        ..cfg.clone()
                    };
                    for v in [&mut plus, &mut minus] {
                        for x in v.iter_mut().take(2).flatten() {
                            *x -= shift / cfg.beta;
                        }
                    }
                    let lp = eval_plain(&frozen, &plus, &nc, &nr)?;
                    let lm = eval_plain(&frozen, &minus, &nc, &nr)?;
                    (lp - lm) / (2.0 * h)
                }
                None => {
                    let (lp, _, _) = eval(&plus, &mut prior.clone())?;
                    let (lm, _, _) = eval(&minus, &mut prior.clone())?;
                    (lp - lm) / (2.0 * h)
                }
            };
            let err = (g[j] - fd).abs() / fd.abs().max(1e-3);
            worst = worst.max(err);
        }
    }
    Ok(worst)
}

fn eval_plain(cfg: &DpoConfig, v: &[Vec<f64>], nc: &[f64], nr: &[f64]) -> Result<f64> {
    let dev = Device::Cpu;
    let t = |x: &[f64]| Tensor::new(x, &dev);
    let inputs = DpoInputs::new(t(&v[0])?, t(&v[1])?, t(&v[2])?, t(&v[3])?, t(nc)?, t(nr)?);
    Ok(dpo_loss(&inputs, cfg, &mut DpoState::default())?
        .loss
        .to_scalar::<f64>()?)
}

#[test]
fn finite_differences_f64() -> Result<()> {
    let cases: Vec<(&str, serde_json::Value)> = vec![
        (
            "sigmoid",
            serde_json::json!({"loss_type": "sigmoid", "beta": 0.2}),
        ),
        ("ipo", serde_json::json!({"loss_type": "ipo", "beta": 0.1})),
        (
            "exo_pair",
            serde_json::json!({"loss_type": "exo_pair", "beta": 0.2, "label_smoothing": 0.01}),
        ),
        (
            "discopop",
            serde_json::json!({"loss_type": "discopop", "beta": 0.2}),
        ),
        (
            "aot",
            serde_json::json!({"loss_type": "aot", "beta": 0.3, "label_smoothing": 0.1}),
        ),
        (
            "aot_unpaired",
            serde_json::json!({"loss_type": "aot_unpaired", "beta": 0.3}),
        ),
        (
            "apo_down+nca",
            serde_json::json!({"loss_type": ["apo_down", "nca_pair"], "loss_weights": [0.3, 0.7], "beta": 0.2}),
        ),
        (
            "f_alpha",
            serde_json::json!({"loss_type": "sigmoid", "beta": 0.2, "f_divergence_type": "alpha_divergence"}),
        ),
        (
            "f_js_sigmoid_norm",
            serde_json::json!({"loss_type": "sigmoid_norm", "beta": 1.0, "f_divergence_type": "js_divergence"}),
        ),
        (
            "ld_alpha_mix",
            serde_json::json!({"loss_type": ["sigmoid", "sft"], "beta": 0.2, "ld_alpha": 0.3}),
        ),
        (
            "rpo_cdpo",
            serde_json::json!({"loss_type": "sigmoid", "beta": 0.2, "rpo_alpha": 0.5, "cdpo": true, "label_smoothing": 0.1}),
        ),
        (
            "bco_running_mean",
            serde_json::json!({"loss_type": "bco_pair", "beta": 0.2, "bco_running_mean": true}),
        ),
        (
            "sppo_hard",
            serde_json::json!({"loss_type": "sppo_hard", "beta": 0.5}),
        ),
    ];
    let mut worst = BTreeMap::new();
    for (name, cfg) in cases {
        let cfg: DpoConfig = serde_json::from_value(cfg)?;
        let e = fd_check(&cfg).with_context(|| name.to_string())?;
        worst.insert(name, e);
    }
    eprintln!("finite differences (f64), max relative error: {worst:?}");
    for (name, e) in &worst {
        assert!(
            *e < 1e-6,
            "{name}: analytic vs finite-difference gradient error {e:.2e}"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Names and configuration errors
// ---------------------------------------------------------------------------------------------

#[test]
fn unknown_loss_type_is_an_error_naming_it() {
    match "sigmod".parse::<LossType>() {
        Err(LossError::UnknownLossType(n)) => assert_eq!(n, "sigmod"),
        other => panic!("expected UnknownLossType, got {other:?}"),
    }
    let err = serde_json::from_str::<DpoConfig>(r#"{"loss_type": ["sigmoid", "dpo_hinge_typo"]}"#)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("dpo_hinge_typo"),
        "error should name the type: {err}"
    );
    let err = serde_json::from_str::<DpoConfig>(r#"{"f_divergence_type": "kl_sideways"}"#)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("kl_sideways"), "{err}");
}

#[test]
fn names_round_trip_and_aot_pair_is_an_alias() -> Result<()> {
    for t in LossType::ALL {
        assert_eq!(t.name().parse::<LossType>()?, t);
    }
    assert_eq!("aot_pair".parse::<LossType>()?, LossType::AotUnpaired);
    let cfg: DpoConfig = serde_json::from_str(r#"{"loss_type": "aot_pair", "beta": 0.3}"#)?;
    assert_eq!(cfg.loss_type, vec![LossType::AotUnpaired]);
    let back: DpoConfig = serde_json::from_str(&serde_json::to_string(&cfg)?)?;
    assert_eq!(back, cfg);
    assert!(
        serde_json::from_str::<DpoConfig>(r#"{"betta": 0.1}"#).is_err(),
        "unknown field"
    );
    Ok(())
}

#[test]
fn configurations_trl_rejects_are_errors() -> Result<()> {
    let dev = Device::Cpu;
    let one = Tensor::new(&[-1.0f32, -2.0], &dev)?;
    let n = Tensor::new(&[1.0f32, 2.0], &dev)?;
    let inputs = DpoInputs::new(
        one.clone(),
        one.clone(),
        one.clone(),
        one.clone(),
        n.clone(),
        n,
    );
    let bad = [
        r#"{"loss_type": "exo_pair"}"#,
        r#"{"loss_type": "nca_pair", "f_divergence_type": "js_divergence"}"#,
        r#"{"loss_type": "aot", "use_weighting": true}"#,
        r#"{"loss_type": ["sigmoid", "ipo"], "loss_weights": [1.0]}"#,
        r#"{"loss_type": "robust", "label_smoothing": 0.5}"#,
        r#"{"beta": 0.0}"#,
        r#"{"ld_alpha": 1.5}"#,
        r#"{"ld_alpha": 0.5}"#,
        r#"{"use_weighting": true}"#,
    ];
    for s in bad {
        let cfg: DpoConfig = serde_json::from_str(s)?;
        let r = dpo_loss(&inputs, &cfg, &mut DpoState::default());
        assert!(
            matches!(
                r,
                Err(LossError::InvalidConfig(_) | LossError::InvalidInput(_))
            ),
            "{s}: {r:?}"
        );
    }
    let short = DpoInputs::new(
        one.clone(),
        one.clone(),
        one.clone(),
        Tensor::new(&[-1.0f32], &dev)?,
        one.clone(),
        one,
    );
    assert!(matches!(
        dpo_loss(&short, &DpoConfig::default(), &mut DpoState::default()),
        Err(LossError::InvalidInput(_))
    ));
    Ok(())
}
