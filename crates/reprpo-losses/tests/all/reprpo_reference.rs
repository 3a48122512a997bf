//! The ReprPO family against an independent PyTorch implementation of the issue's formulas.
//!
//! Fixture: `tests/fixtures/losses/reprpo.{json,safetensors}`, written by
//! `tests/reference/gen_reprpo_fixtures.py` (float64 reference values from float32 inputs, 3 layers x
//! 4 pairs x 12 tokens x 16 hidden). Every case is run in f32: loss, per-example loss and metrics
//! within 1e-5 relative, gradients w.r.t. both policy hidden states within 1e-4 relative. The same
//! cases in f64 must match to 1e-9, and a few variants are checked against central finite
//! differences in f64.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor, Var};
use reprpo_losses::{
    HiddenPairs, LossError, ReprPoConfig, ReprPoVariant, TokenReduction, default_layers,
    reprpo_loss, resolve_layers, stack_layers,
};

const LOSS_RTOL: f64 = 1e-5;
const GRAD_RTOL: f64 = 1e-4;
/// Absolute floor for expected values that are (nearly) zero.
const ATOL: f64 = 1e-7;

struct Fixture {
    meta: serde_json::Value,
    tensors: HashMap<String, Tensor>,
}

fn load() -> Result<Fixture> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/losses");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reprpo.json"))?)?;
    let tensors = candle_core::safetensors::load(dir.join("reprpo.safetensors"), &Device::Cpu)?;
    Ok(Fixture { meta, tensors })
}

fn to_vec(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
}

/// The largest error over elements: `max(|g - w| - atol, 0) / |w|` (0 within the absolute floor).
/// Infinite where the lengths differ, where there is nothing to compare, or where an element's
/// difference is NaN (a NaN of ours or of the reference): `f64::max` drops NaN, and a zip stops
/// at the shorter side, so without this a short, empty or NaN result would pass any tolerance.
fn rel_err_atol(got: &[f64], want: &[f64], atol: f64) -> f64 {
    if got.len() != want.len() || want.is_empty() {
        return f64::INFINITY;
    }
    got.iter()
        .zip(want)
        .map(|(g, w)| match (g - w).abs() {
            d if d.is_nan() => f64::INFINITY,
            d => (d - atol).max(0.0) / w.abs().max(1e-30),
        })
        .fold(0.0, f64::max)
}

#[test]
fn rel_err_atol_fails_short_empty_and_nan_results() {
    let want = [1.0, -2.0, 4.0];
    assert_eq!(rel_err_atol(&want, &want, 0.0), 0.0);
    assert!((rel_err_atol(&[1.0, -2.0, 4.4], &want, 0.0) - 0.1).abs() < 1e-12);
    assert_eq!(rel_err_atol(&want[..2], &want, 0.0), f64::INFINITY);
    assert_eq!(rel_err_atol(&[], &want, 0.0), f64::INFINITY);
    assert_eq!(rel_err_atol(&[], &[], 0.0), f64::INFINITY);
    assert_eq!(
        rel_err_atol(&[1.0, f64::NAN, 4.0], &want, 0.0),
        f64::INFINITY
    );
    assert_eq!(rel_err_atol(&[1.0], &[f64::NAN], 0.0), f64::INFINITY);
}

struct Case {
    name: String,
    cfg: ReprPoConfig,
    progress: f64,
    inputs: String,
    loss: f64,
    metrics: BTreeMap<String, f64>,
}

fn cases(fx: &Fixture) -> Result<Vec<Case>> {
    fx.meta["cases"]
        .as_array()
        .context("cases")?
        .iter()
        .map(|c| {
            let name = c["name"].as_str().context("name")?.to_string();
            Ok(Case {
                cfg: serde_json::from_value(c["config"].clone())
                    .with_context(|| format!("{name}: config"))?,
                progress: c["progress"].as_f64().context("progress")?,
                inputs: c["inputs"].as_str().context("inputs")?.to_string(),
                loss: c["loss"].as_f64().context("loss")?,
                metrics: serde_json::from_value(c["metrics"].clone())?,
                name,
            })
        })
        .collect()
}

/// The inputs of a set in `dtype`, with the four hidden-state tensors as variables.
fn inputs(fx: &Fixture, set: &str, dtype: DType) -> Result<(HiddenPairs, [Var; 4])> {
    let get = |k: &str| -> Result<Tensor> {
        Ok(fx
            .tensors
            .get(&format!("{set}.{k}"))
            .with_context(|| format!("missing {set}.{k}"))?
            .to_dtype(dtype)?)
    };
    let v = |k: &str| -> Result<Var> { Ok(Var::from_tensor(&get(k)?)?) };
    let vars = [
        v("policy_chosen")?,
        v("policy_rejected")?,
        v("reference_chosen")?,
        v("reference_rejected")?,
    ];
    let mut hp = HiddenPairs::new(
        vars[0].as_tensor().clone(),
        vars[1].as_tensor().clone(),
        vars[2].as_tensor().clone(),
        vars[3].as_tensor().clone(),
        get("chosen_mask")?,
        get("rejected_mask")?,
    );
    hp.dpo_z = Some(get("dpo_z")?);
    Ok((hp, vars))
}

#[derive(Default, Debug)]
struct Worst {
    loss: f64,
    metric: f64,
    grad: f64,
}

fn run_all(dtype: DType, loss_tol: f64, grad_tol: f64, atol: f64) -> Result<Worst> {
    let rel_err = |g: &[f64], w: &[f64]| rel_err_atol(g, w, atol);
    let fx = load()?;
    let all = cases(&fx)?;
    if all.len() < 30 {
        bail!("only {} cases in the fixture", all.len());
    }
    let mut worst = Worst::default();
    let mut failures = Vec::new();
    for c in &all {
        let (hp, vars) = inputs(&fx, &c.inputs, dtype)?;
        let out = reprpo_loss(&hp, &c.cfg, c.progress)?;
        let loss = out.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let e = rel_err(&[loss], &[c.loss]);
        worst.loss = worst.loss.max(e);
        if e > loss_tol {
            failures.push(format!("{}: loss {loss} vs {}", c.name, c.loss));
        }
        let pe = to_vec(&out.per_example)?;
        let pe_want = to_vec(&fx.tensors[&format!("{}.per_example", c.name)])?;
        let e = rel_err(&pe, &pe_want);
        worst.loss = worst.loss.max(e);
        if e > loss_tol {
            failures.push(format!("{}: per_example {pe:?} vs {pe_want:?}", c.name));
        }
        let got = out.metrics_f64()?;
        if got.keys().collect::<Vec<_>>() != c.metrics.keys().collect::<Vec<_>>() {
            failures.push(format!("{}: metric names {:?}", c.name, got.keys()));
        }
        for (k, want) in &c.metrics {
            let g = got.get(k).copied().unwrap_or(f64::NAN);
            let e = rel_err(&[g], &[*want]);
            worst.metric = worst.metric.max(e);
            if e.is_nan() || e > loss_tol {
                failures.push(format!("{}: metric {k} {g} vs {want}", c.name));
            }
        }
        let grads = out.loss.backward()?;
        for (i, which) in ["policy_chosen", "policy_rejected"].iter().enumerate() {
            // No gradient at all (e.g. a coefficient of exactly 0 cuts the graph) means zeros.
            let g = match grads.get(vars[i].as_tensor()) {
                Some(g) => to_vec(g)?,
                None => vec![0.0; vars[i].as_tensor().elem_count()],
            };
            if g.iter().any(|x| !x.is_finite()) {
                failures.push(format!("{}: non-finite gradient for {which}", c.name));
            }
            let want = to_vec(&fx.tensors[&format!("{}.grad_{which}", c.name)])?;
            let e = rel_err(&g, &want);
            worst.grad = worst.grad.max(e);
            if e > grad_tol {
                failures.push(format!("{}: gradient {which} error {e:.2e}", c.name));
            }
        }
        for (i, which) in [(2, "reference_chosen"), (3, "reference_rejected")] {
            if let Some(g) = grads.get(vars[i].as_tensor())
                && to_vec(g)?.iter().any(|x| *x != 0.0)
            {
                failures.push(format!("{}: gradient reached {which}", c.name));
            }
        }
    }
    eprintln!(
        "{dtype:?}: {} cases, worst relative errors {worst:?}",
        all.len()
    );
    if !failures.is_empty() {
        bail!("{} failures:\n{}", failures.len(), failures.join("\n"));
    }
    Ok(worst)
}

#[test]
fn matches_pytorch_reference_f32() -> Result<()> {
    run_all(DType::F32, LOSS_RTOL, GRAD_RTOL, ATOL)?;
    Ok(())
}

#[test]
fn matches_pytorch_reference_f64() -> Result<()> {
    // Gradients are stored rounded to f32, so in f64 they are held to the f32 rounding only.
    run_all(DType::F64, 1e-9, 1e-6, 1e-13)?;
    Ok(())
}

#[test]
fn fixture_covers_every_variant_and_option() -> Result<()> {
    let fx = load()?;
    let all = cases(&fx)?;
    for v in ReprPoVariant::ALL {
        if !all.iter().any(|c| c.cfg.variant == v) {
            bail!("no case for variant {}", v.name());
        }
    }
    let any = |f: &dyn Fn(&Case) -> bool| all.iter().any(f);
    assert!(any(&|c| c.cfg.example_weights));
    assert!(any(&|c| c.cfg.token_reduction == TokenReduction::Mean));
    assert!(any(
        &|c| c.cfg.schedule == reprpo_losses::Schedule::CircuitBreakers
    ));
    assert!(any(&|c| c.inputs == "masked_row"));
    assert!(any(&|c| c.inputs == "at_reference"));
    Ok(())
}

/// The loss of `base` inputs in f64 with `pi_c`, `pi_r` replaced by the given values.
fn eval_f64(fx: &Fixture, cfg: &ReprPoConfig, p: f64, pc: &[f64], pr: &[f64]) -> Result<f64> {
    let (mut hp, _) = inputs(fx, "base", DType::F64)?;
    let shape = hp.policy_chosen.shape().clone();
    hp.policy_chosen = Tensor::from_slice(pc, shape.clone(), &Device::Cpu)?;
    hp.policy_rejected = Tensor::from_slice(pr, shape, &Device::Cpu)?;
    Ok(reprpo_loss(&hp, cfg, p)?.loss.to_scalar::<f64>()?)
}

#[test]
fn finite_differences_f64() -> Result<()> {
    let fx = load()?;
    let all = cases(&fx)?;
    let names = [
        "original_p03",
        "weights",
        "mean_tokens",
        "direction",
        "normalized_mse",
        "topk_f02",
        "symlog",
        "cka",
        "adaptive",
        "ldr",
    ];
    let h = 1e-6;
    let mut worst: f64 = 0.0;
    for name in names {
        let c = all.iter().find(|c| c.name == name).context(name)?;
        let (hp, vars) = inputs(&fx, &c.inputs, DType::F64)?;
        let out = reprpo_loss(&hp, &c.cfg, c.progress)?;
        let grads = out.loss.backward()?;
        let gc = to_vec(grads.get(vars[0].as_tensor()).context("grad")?)?;
        let gr = to_vec(grads.get(vars[1].as_tensor()).context("grad")?)?;
        let pc = to_vec(vars[0].as_tensor())?;
        let pr = to_vec(vars[1].as_tensor())?;
        let scale = gc
            .iter()
            .chain(&gr)
            .fold(0.0_f64, |m, x| m.max(x.abs()))
            .max(1e-12);
        // A spread of coordinates, in real and padded positions, of both tensors.
        for k in 0..12 {
            let idx = (k * 193 + 7) % pc.len();
            for (which, base, g) in [(0, &pc, &gc), (1, &pr, &gr)] {
                let mut plus = base.clone();
                let mut minus = base.clone();
                plus[idx] += h;
                minus[idx] -= h;
                let (fp, fm) = if which == 0 {
                    (
                        eval_f64(&fx, &c.cfg, c.progress, &plus, &pr)?,
                        eval_f64(&fx, &c.cfg, c.progress, &minus, &pr)?,
                    )
                } else {
                    (
                        eval_f64(&fx, &c.cfg, c.progress, &pc, &plus)?,
                        eval_f64(&fx, &c.cfg, c.progress, &pc, &minus)?,
                    )
                };
                let fd = (fp - fm) / (2.0 * h);
                let e = (fd - g[idx]).abs() / scale;
                worst = worst.max(e);
                if e > 1e-6 {
                    bail!(
                        "{name}: tensor {which} index {idx}: autograd {} vs fd {fd}",
                        g[idx]
                    );
                }
            }
        }
    }
    eprintln!("finite differences (f64): worst error relative to the gradient scale {worst:.2e}");
    Ok(())
}

/// Everything masked: every term is 0 and every gradient is 0, never NaN, for every variant and
/// both token reductions.
#[test]
fn all_masked_is_zero_not_nan() -> Result<()> {
    let fx = load()?;
    for v in ReprPoVariant::ALL {
        for tr in [TokenReduction::PerPosition, TokenReduction::Mean] {
            if v == ReprPoVariant::Cka && tr == TokenReduction::Mean {
                continue;
            }
            for weights in [false, true] {
                let (mut hp, vars) = inputs(&fx, "base", DType::F32)?;
                hp.chosen_mask = hp.chosen_mask.zeros_like()?;
                hp.rejected_mask = hp.rejected_mask.zeros_like()?;
                let cfg = ReprPoConfig {
                    variant: v,
                    token_reduction: tr,
                    example_weights: weights,
                    ..Default::default()
                };
                let out = reprpo_loss(&hp, &cfg, 0.5)?;
                let loss = out.loss.to_scalar::<f32>()?;
                assert_eq!(loss, 0.0, "{v:?} {tr:?}");
                for (k, m) in out.metrics_f64()? {
                    assert!(m.is_finite(), "{v:?} {tr:?}: metric {k} = {m}");
                }
                let grads = out.loss.backward()?;
                for var in &vars[..2] {
                    if let Some(g) = grads.get(var.as_tensor()) {
                        assert!(to_vec(g)?.iter().all(|x| *x == 0.0), "{v:?} {tr:?}");
                    }
                }
            }
        }
    }
    Ok(())
}

/// NaN or infinite hidden states at padded positions do not leak into the loss or gradients.
#[test]
fn garbage_at_padding_does_not_leak() -> Result<()> {
    let fx = load()?;
    let (hp, _) = inputs(&fx, "masked_row", DType::F32)?;
    let cfg = ReprPoConfig::default();
    let clean = reprpo_loss(&hp, &cfg, 0.5)?.loss.to_scalar::<f32>()?;
    // Example 1 of `masked_row` has no real token in either sequence: fill it with NaN.
    let poison = |t: &Tensor| -> Result<Tensor> {
        let (l, b, tt, h) = t.dims4()?;
        let mut v = to_vec(t)?;
        for li in 0..l {
            for ti in 0..tt {
                for hi in 0..h {
                    v[((li * b + 1) * tt + ti) * h + hi] = f64::NAN;
                }
            }
        }
        Ok(Tensor::from_vec(v, (l, b, tt, h), &Device::Cpu)?.to_dtype(DType::F32)?)
    };
    let pc = Var::from_tensor(&poison(&hp.policy_chosen)?)?;
    let mut hp2 = hp.clone();
    hp2.policy_chosen = pc.as_tensor().clone();
    let out = reprpo_loss(&hp2, &cfg, 0.5)?;
    assert_eq!(out.loss.to_scalar::<f32>()?, clean);
    let g = to_vec(out.loss.backward()?.get(pc.as_tensor()).context("grad")?)?;
    assert!(g.iter().all(|x| x.is_finite()));
    Ok(())
}

#[test]
fn layer_selection() -> Result<()> {
    assert_eq!(default_layers(24), vec![8, 16, 19]);
    assert_eq!(default_layers(32), vec![11, 21, 26]);
    assert_eq!(default_layers(2), vec![1, 2]);
    assert_eq!(default_layers(1), vec![1]);
    assert!(default_layers(0).is_empty());
    assert_eq!(resolve_layers(&[-1, 0, 3, -5], 5)?, vec![4, 0, 3, 0]);
    assert!(matches!(
        resolve_layers(&[5], 5),
        Err(LossError::InvalidConfig(_))
    ));
    assert!(matches!(
        resolve_layers(&[-6], 5),
        Err(LossError::InvalidConfig(_))
    ));
    let cfg = ReprPoConfig {
        layers: Some(vec![-1, 2]),
        ..Default::default()
    };
    assert_eq!(cfg.hidden_state_indices(4)?, vec![4, 2]);
    assert_eq!(
        ReprPoConfig::default().hidden_state_indices(24)?,
        vec![8, 16, 19]
    );
    let hs: Vec<Tensor> = (0..5)
        .map(|i| Tensor::full(i as f32, (2, 3, 4), &Device::Cpu))
        .collect::<candle_core::Result<_>>()?;
    let st = stack_layers(&hs, &[4, 1])?;
    assert_eq!(st.dims(), &[2, 2, 3, 4]);
    assert_eq!(st.get(0)?.flatten_all()?.to_vec1::<f32>()?[0], 4.0);
    assert!(stack_layers(&hs, &[5]).is_err());
    Ok(())
}

#[test]
fn names_and_config_serde() -> Result<()> {
    for v in ReprPoVariant::ALL {
        let s = serde_json::to_string(&v)?;
        assert_eq!(s, format!("\"{}\"", v.name()));
        let back: ReprPoVariant = serde_json::from_str(&s)?;
        assert_eq!(back, v);
    }
    let alias: ReprPoVariant = serde_json::from_str("\"reprpo\"")?;
    assert_eq!(alias, ReprPoVariant::Original);
    let cfg: ReprPoConfig = serde_json::from_str(
        r#"{"variant": "normalized-mse", "schedule": "circuit-breakers", "token_reduction": "mean"}"#,
    )?;
    assert_eq!(cfg.variant, ReprPoVariant::NormalizedMse);
    assert_eq!(cfg.alpha, 10.0);
    assert!(serde_json::from_str::<ReprPoConfig>(r#"{"nope": 1}"#).is_err());
    assert!(serde_json::from_str::<ReprPoConfig>(r#"{"variant": "l2"}"#).is_err());
    Ok(())
}

#[test]
fn invalid_configurations_and_inputs_are_errors() -> Result<()> {
    let fx = load()?;
    let (hp, _) = inputs(&fx, "base", DType::F32)?;
    let bad = |cfg: ReprPoConfig, p: f64| {
        matches!(reprpo_loss(&hp, &cfg, p), Err(LossError::InvalidConfig(_)))
    };
    assert!(bad(ReprPoConfig::default(), 1.5));
    assert!(bad(ReprPoConfig::default(), -0.1));
    assert!(bad(
        ReprPoConfig {
            variant: ReprPoVariant::Cka,
            token_reduction: TokenReduction::Mean,
            ..Default::default()
        },
        0.5
    ));
    assert!(bad(
        ReprPoConfig {
            topk_fraction: 0.0,
            ..Default::default()
        },
        0.5
    ));
    assert!(bad(
        ReprPoConfig {
            alpha: -1.0,
            ..Default::default()
        },
        0.5
    ));
    assert!(bad(
        ReprPoConfig {
            ldr_eps: 0.0,
            ..Default::default()
        },
        0.5
    ));
    let mut no_z = hp.clone();
    no_z.dpo_z = None;
    let cfg = ReprPoConfig {
        example_weights: true,
        ..Default::default()
    };
    assert!(matches!(
        reprpo_loss(&no_z, &cfg, 0.5),
        Err(LossError::InvalidInput(_))
    ));
    let mut wrong = hp.clone();
    wrong.rejected_mask = wrong.rejected_mask.narrow(1, 0, 5)?;
    assert!(matches!(
        reprpo_loss(&wrong, &ReprPoConfig::default(), 0.5),
        Err(LossError::InvalidInput(_))
    ));
    Ok(())
}
