//! The doctor's loss checks: every DPO loss type (and the f-divergences) on seeded summed
//! log-probabilities, every ReprPO variant with both token reductions on seeded hidden states
//! with padding; each returns the loss, the per-example loss and the gradients in the policy's
//! inputs.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use reprpo_losses::dpo::{DpoConfig, DpoInputs, DpoState, FDivergenceType, LossType, dpo_loss};
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
