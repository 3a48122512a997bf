//! The doctor's optimiser and linear-algebra checks: three AdamW steps (weight decay, bias
//! correction) after global-norm clipping, and the batched inverse (the Cayley transforms of
//! BOFT and OFT) with its gradient.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use reprpo_models::linalg;
use reprpo_train::optim::{AdamW, AdamWConfig, clip_grad_norm};

use super::inputs::Seeded;
use super::{Check, Outputs};

/// Every optimiser and linear-algebra check.
pub(crate) fn checks() -> Vec<Check> {
    let mut v = vec![Check::new("optim.adamw.clipped.f32", DType::F32, adamw)];
    for dt in [DType::F32, DType::F64] {
        let d = if dt == DType::F64 { "f64" } else { "f32" };
        v.push(Check::new(
            format!("linalg.inverse.cayley.{d}"),
            dt,
            move |dev| inverse(dt, dev),
        ));
    }
    v
}

/// Three clipped AdamW updates of two parameters with seeded gradients; the parameters and
/// moments after them.
fn adamw(dev: &Device) -> Result<Outputs> {
    let mut rng = Seeded::new(51);
    let params = vec![
        (
            "a".to_string(),
            Var::from_tensor(&rng.normal(&[16, 8], 0.5, DType::F32, dev)?)?,
        ),
        (
            "b".to_string(),
            Var::from_tensor(&rng.normal(&[8], 0.5, DType::F32, dev)?)?,
        ),
    ];
    let mut opt = AdamW::new(
        params.clone(),
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        },
    )?;
    for _ in 0..3 {
        let mut grads = params
            .iter()
            .map(|(_, p)| Ok(Some(rng.normal(p.dims(), 1.0, DType::F32, dev)?)))
            .collect::<Result<Vec<_>>>()?;
        clip_grad_norm(&mut grads, 2.0)?;
        opt.update(&grads, 1e-2)?;
    }
    let mut o: Outputs = params
        .iter()
        .map(|(n, p)| (format!("param.{n}"), p.as_tensor().clone()))
        .collect();
    let mut state: Vec<_> = opt.state().into_iter().collect();
    state.sort_by(|a, b| a.0.cmp(&b.0));
    o.extend(state);
    Ok(o)
}

/// `(I + Q)^-1` for a batch of skew-symmetric `Q` (block size 8, as OFT's Cayley transform),
/// and the gradient of `sum(inv * W)` in `Q`'s generator.
fn inverse(dt: DType, dev: &Device) -> Result<Outputs> {
    let (blocks, n) = (6, 8);
    let mut rng = Seeded::new(52);
    let raw = Var::from_tensor(&rng.normal(&[blocks, n, n], 0.4, dt, dev)?)?;
    let q = (raw.as_tensor() - raw.as_tensor().transpose(1, 2)?)?;
    let eye = Tensor::eye(n, dt, dev)?.unsqueeze(0)?;
    let a = q.broadcast_add(&eye)?;
    let inv = linalg::inverse(&a)?;
    let w = rng.normal(&[blocks, n, n], 1.0, dt, dev)?;
    let g = (&inv * w)?.sum_all()?.backward()?;
    let gq = g
        .get(raw.as_tensor())
        .context("no gradient reached the generator")?;
    Ok(vec![
        ("inverse".into(), inv),
        ("grad.generator".into(), gq.clone()),
    ])
}
