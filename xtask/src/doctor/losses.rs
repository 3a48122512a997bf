//! The doctor's loss checks: every DPO loss type (and the f-divergences) on seeded summed
//! log-probabilities, every ReprPO variant with both token reductions on seeded hidden states
//! with padding; each returns the loss, the per-example loss and the gradients in the policy's
//! inputs. The reference ReprPO project's method losses (`mse`, `prefvec`, `rank`) and their
//! sink-filtered token reduction (plain, and after the per-token log-softmax of `rank`) on seeded
//! activations of two widths with padding and a planted high-norm token.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use reprpo_losses::dpo::{DpoConfig, DpoInputs, DpoState, FDivergenceType, LossType, dpo_loss};
use reprpo_losses::methods::reduce::{reduce_log_softmax_tokens, reduce_tokens};
use reprpo_losses::methods::{Collected, MethodInputs, MethodLoss, method_loss};
use reprpo_losses::reprpo::{
    HiddenPairs, ReprPoConfig, ReprPoVariant, TokenReduction, reprpo_loss,
};

use super::inputs::Seeded;
use super::{Check, Outputs, grad_or_zero};

/// Every loss check.
pub(crate) fn checks() -> Vec<Check> {
    let mut v = Vec::new();
    for lt in LossType::ALL {
        v.push(Check::new(
            format!("losses.dpo.{}.f32", lt.name()),
            DType::F32,
            move |dev| dpo(lt, FDivergenceType::ReverseKl, dev),
        ));
    }
    for (name, f) in [
        ("forward_kl", FDivergenceType::ForwardKl),
        ("js_divergence", FDivergenceType::JsDivergence),
        ("alpha_divergence", FDivergenceType::AlphaDivergence),
    ] {
        v.push(Check::new(
            format!("losses.dpo.sigmoid.{name}.f32"),
            DType::F32,
            move |dev| dpo(LossType::Sigmoid, f, dev),
        ));
    }
    for dt in [DType::F32, DType::BF16] {
        let d = if dt == DType::BF16 { "bf16" } else { "f32" };
        for variant in ReprPoVariant::ALL {
            for red in [TokenReduction::PerPosition, TokenReduction::Mean] {
                let cfg = reprpo_config(variant, red, false);
                if cfg.validate().is_err() {
                    continue; // e.g. cka has no mean reduction
                }
                let r = match red {
                    TokenReduction::PerPosition => "per-position",
                    TokenReduction::Mean => "mean",
                };
                v.push(Check::new(
                    format!("losses.reprpo.{}.{r}.{d}", variant.name()),
                    dt,
                    move |dev| reprpo(&cfg, dt, dev),
                ));
            }
        }
        let cfg = reprpo_config(ReprPoVariant::Original, TokenReduction::PerPosition, true);
        v.push(Check::new(
            format!("losses.reprpo.original.example-weights.{d}"),
            dt,
            move |dev| reprpo(&cfg, dt, dev),
        ));
        for log_softmax in [false, true] {
            let r = if log_softmax {
                "reduce-log-softmax"
            } else {
                "reduce"
            };
            v.push(Check::new(
                format!("losses.methods.{r}.{d}"),
                dt,
                move |dev| method_reduce(log_softmax, dt, dev),
            ));
        }
    }
    for loss in ["mse", "prefvec", "rank"] {
        v.push(Check::new(
            format!("losses.methods.{loss}.f32"),
            DType::F32,
            move |dev| method(loss, dev),
        ));
    }
    v
}

const B: usize = 4;

/// `dpo_loss` with one loss type on seeded log-probabilities, and its gradients in the
/// policy's chosen and rejected log-probabilities.
fn dpo(lt: LossType, f: FDivergenceType, dev: &Device) -> Result<Outputs> {
    let mut rng = Seeded::new(41);
    let mut logps =
        |shift: f64| -> Result<Tensor> { Ok((rng.normal(&[B], 4.0, DType::F32, dev)? + shift)?) };
    let pc = Var::from_tensor(&logps(-40.0)?)?;
    let pr = Var::from_tensor(&logps(-45.0)?)?;
    let (rc, rr) = (logps(-41.0)?, logps(-44.0)?);
    let nc = Tensor::new(&[12f32, 9.0, 20.0, 5.0], dev)?;
    let nr = Tensor::new(&[10f32, 14.0, 7.0, 5.0], dev)?;
    let inputs = DpoInputs::new(
        pc.as_tensor().clone(),
        pr.as_tensor().clone(),
        rc,
        rr,
        nc,
        nr,
    );
    let cfg = DpoConfig {
        loss_type: vec![lt],
        f_divergence_type: f,
        label_smoothing: if matches!(
            lt,
            LossType::Robust | LossType::ExoPair | LossType::Aot | LossType::AotUnpaired
        ) {
            0.1
        } else {
            0.0
        },
        ..Default::default()
    };
    let out = dpo_loss(&inputs, &cfg, &mut DpoState::default())?;
    let g = out.loss.backward()?;
    Ok(vec![
        ("loss".into(), out.loss.clone()),
        ("per_example".into(), out.per_example.clone()),
        grad_or_zero(&g, &pc, "policy_chosen")?,
        grad_or_zero(&g, &pr, "policy_rejected")?,
    ])
}

fn reprpo_config(variant: ReprPoVariant, red: TokenReduction, weights: bool) -> ReprPoConfig {
    ReprPoConfig {
        variant,
        token_reduction: red,
        example_weights: weights,
        // A tenth of the positions: the default (0.5%) would pick one entry of these shapes.
        topk_fraction: 0.1,
        ..Default::default()
    }
}

/// `reprpo_loss` at progress 0.5 (both terms weighted) on hidden states `[2, B, 8, 32]` with
/// padded rows, and its gradients in the policy's hidden states.
fn reprpo(cfg: &ReprPoConfig, dt: DType, dev: &Device) -> Result<Outputs> {
    let (l, t, h) = (2, 8, 32);
    let mut rng = Seeded::new(42);
    let shape = [l, B, t, h];
    let rc = rng.normal(&shape, 1.0, dt, dev)?;
    let rr = (&rc + rng.normal(&shape, 0.5, dt, dev)?)?;
    let pc = Var::from_tensor(&(&rc + rng.normal(&shape, 0.2, dt, dev)?)?)?;
    let pr = Var::from_tensor(&(&rr + rng.normal(&shape, 0.2, dt, dev)?)?)?;
    let mask = |lens: [usize; B]| -> Result<Tensor> {
        let v: Vec<f32> = lens
            .iter()
            .flat_map(|&n| (0..t).map(move |i| if i < n { 1.0 } else { 0.0 }))
            .collect();
        Ok(Tensor::from_vec(v, (B, t), dev)?)
    };
    let mut inputs = HiddenPairs::new(
        pc.as_tensor().clone(),
        pr.as_tensor().clone(),
        rc,
        rr,
        mask([8, 5, 3, 7])?,
        mask([6, 8, 4, 2])?,
    );
    if cfg.example_weights {
        inputs.dpo_z = Some(rng.normal(&[B], 0.1, DType::F32, dev)?);
    }
    let out = reprpo_loss(&inputs, cfg, 0.5)?;
    let g = out.loss.backward()?;
    Ok(vec![
        ("loss".into(), out.loss.clone()),
        ("per_example".into(), out.per_example.clone()),
        grad_or_zero(&g, &pc, "policy_chosen")?,
        grad_or_zero(&g, &pr, "policy_rejected")?,
    ])
}

/// Seeded activations `[B, 8, h]` of the policy (variables) and the reference for the method
/// checks, with a planted high-norm token per row (the sink filter drops it).
fn method_acts(rng: &mut Seeded, h: usize, dt: DType, dev: &Device) -> Result<[Tensor; 4]> {
    let t = 8;
    let plant = |x: Tensor| -> Result<Tensor> {
        let scale: Vec<f32> = (0..B * t)
            .map(|i| if i % t == 1 { 5.0 } else { 1.0 })
            .collect();
        let s = Tensor::from_vec(scale, (B, t, 1), dev)?.to_dtype(dt)?;
        Ok(x.broadcast_mul(&s)?)
    };
    let shape = [B, t, h];
    let rc = plant(rng.normal(&shape, 1.0, dt, dev)?)?;
    let rr = (&rc + rng.normal(&shape, 0.5, dt, dev)?)?;
    let pc = (&rc + rng.normal(&shape, 0.2, dt, dev)?)?;
    let pr = (&rr + rng.normal(&shape, 0.2, dt, dev)?)?;
    Ok([pc, pr, rc, rr])
}

/// A `[B, 8]` 0/1 mask from the real lengths (right padding).
fn method_mask(lens: [usize; B], dev: &Device) -> Result<Tensor> {
    let v: Vec<f32> = lens
        .iter()
        .flat_map(|&n| (0..8).map(move |i| if i < n { 1.0 } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(v, (B, 8), dev)?)
}

/// `reduce_tokens` (or `reduce_log_softmax_tokens`) of seeded `[B, 8, 24]` activations with
/// padding, and the gradient of `sum(out * w)`.
fn method_reduce(log_softmax: bool, dt: DType, dev: &Device) -> Result<Outputs> {
    let mut rng = Seeded::new(7);
    let [pc, ..] = method_acts(&mut rng, 24, dt, dev)?;
    let x = Var::from_tensor(&pc)?;
    let mask = method_mask([8, 5, 3, 7], dev)?;
    let out = if log_softmax {
        reduce_log_softmax_tokens(x.as_tensor(), &mask)?
    } else {
        reduce_tokens(x.as_tensor(), &mask)?
    };
    let w = rng.normal(out.dims(), 1.0, dt, dev)?;
    let g = (&out * w)?.sum_all()?.backward()?;
    Ok(vec![("out".into(), out), grad_or_zero(&g, &x, "x")?])
}

/// `method_loss` with the reference's defaults of `loss` on seeded activations of two keys
/// (widths 24 and 40) with padding, and its gradients in the policy's activations and
/// log-probabilities.
fn method(loss: &str, dev: &Device) -> Result<Outputs> {
    let dt = DType::F32;
    let mut rng = Seeded::new(11);
    let (mc, mr) = (
        method_mask([8, 5, 3, 7], dev)?,
        method_mask([6, 8, 4, 8], dev)?,
    );
    let mut maps: [std::collections::BTreeMap<String, Tensor>; 4] = Default::default();
    let mut vars = Vec::new();
    for (k, h) in [("a", 24), ("b", 40)] {
        let [pc, pr, rc, rr] = method_acts(&mut rng, h, dt, dev)?;
        let (pc, pr) = (Var::from_tensor(&pc)?, Var::from_tensor(&pr)?);
        maps[0].insert(k.into(), pc.as_tensor().clone());
        maps[1].insert(k.into(), pr.as_tensor().clone());
        maps[2].insert(k.into(), rc);
        maps[3].insert(k.into(), rr);
        vars.push((format!("pi_cho.{k}"), pc));
        vars.push((format!("pi_rej.{k}"), pr));
    }
    let lp = |rng: &mut Seeded, off: f64| -> Result<Tensor> {
        Ok((rng.normal(&[B], 3.0, dt, dev)? + off)?)
    };
    let lpc = Var::from_tensor(&lp(&mut rng, -100.0)?)?;
    let lpr = Var::from_tensor(&lp(&mut rng, -104.0)?)?;
    let nll = |rng: &mut Seeded| -> Result<Tensor> {
        Ok((rng.normal(&[B, 8], 1.0, dt, dev)?.abs()? * &mc)?)
    };
    let [m0, m1, m2, m3] = maps;
    let c = |acts, mask: &Tensor, logps: Tensor| Collected {
        acts,
        mask: mask.clone(),
        logps,
    };
    let inputs = MethodInputs {
        pi_cho: c(m0, &mc, lpc.as_tensor().clone()),
        pi_rej: c(m1, &mr, lpr.as_tensor().clone()),
        ref_cho: c(m2, &mc, lp(&mut rng, -101.0)?),
        ref_rej: c(m3, &mr, lp(&mut rng, -103.0)?),
        nll_pi: Some(nll(&mut rng)?),
        nll_ref: Some(nll(&mut rng)?),
    };
    let cfg: MethodLoss = serde_json::from_value(serde_json::json!({ "kind": loss }))?;
    let out = method_loss(&inputs, &cfg)?;
    let g = out.loss.backward()?;
    let mut v = vec![
        ("loss".into(), out.loss.clone()),
        ("per_example".into(), out.per_example.clone()),
    ];
    for (name, var) in vars.iter().chain([
        &("logps.pi_cho".to_string(), lpc),
        &("logps.pi_rej".to_string(), lpr),
    ]) {
        v.push(grad_or_zero(&g, var, name)?);
    }
    Ok(v)
}
