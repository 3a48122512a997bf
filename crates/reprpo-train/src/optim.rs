//! AdamW with f32 state that can be saved and restored exactly, learning-rate schedules with
//! warm-up, and global-norm gradient clipping.
//!
//! candle-nn's `AdamW` keeps its moments private (no checkpoint, no bit-exact resume) and in the
//! variable's dtype; this one keeps `m`, `v` in f32 and exposes them as named tensors.
//!
//! # AdamW (as `torch.optim.AdamW`)
//! With gradient `g`, step `t` (1-based), learning rate `lr`, decoupled weight decay `wd`:
//!
//! `p <- p (1 - lr wd)`, `m <- b1 m + (1 - b1) g`, `v <- b2 v + (1 - b2) g^2`,
//! `p <- p - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)`.
//!
//! # Clipping (as `torch.nn.utils.clip_grad_norm_`)
//! `n = sqrt(sum_i ||g_i||^2)`; when `n > max`, every gradient is scaled by `max / (n + 1e-6)`.
//! The norm and the coefficient are computed on the gradients' device ([`global_grad_norm`],
//! [`clip_grads_to`]): the training step reads neither back.
//!
//! # Gated updates
//! [`AdamW::update_gated`] takes a u8 flag on the device and keeps the parameters and moments
//! as they were where it is 0 (the trainer's non-finite guard), again without a read.
//!
//! # Schedules (as `transformers`' schedulers)
//! Warm-up `w` steps: `lr_t = lr t / w` for `t < w`; then, with `q = (t - w) / (T - w)`:
//! constant `lr`; linear `lr (1 - q)`; cosine `lr (1 + cos(pi q)) / 2`; warmup-stable-decay
//! `lr` until the last `d T` steps, then linear to 0 over them.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};

use crate::error::{Result, TrainError};

/// A learning-rate schedule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Schedule {
    /// Constant after warm-up.
    Constant,
    /// Linear decay to 0.
    Linear,
    /// Cosine decay to 0.
    Cosine,
    /// Warmup, stable, then linear decay over the last `decay_ratio` of the steps.
    Wsd,
}

impl Schedule {
    /// Parse a schedule name (the `train.schedule` key).
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "constant" => Schedule::Constant,
            "linear" => Schedule::Linear,
            "cosine" => Schedule::Cosine,
            "wsd" | "warmup-stable-decay" => Schedule::Wsd,
            other => {
                return Err(TrainError::Config {
                    key: "train.schedule".into(),
                    problem: format!(
                        "unknown schedule {other:?}{}; known: constant, linear, cosine, wsd",
                        crate::config::suggest(
                            other,
                            &[
                                "constant".into(),
                                "linear".into(),
                                "cosine".into(),
                                "wsd".into()
                            ]
                        )
                    ),
                });
            }
        })
    }

    /// The learning rate for 0-based optimizer step `step` of `total`, `warmup` warm-up steps.
    pub fn lr(self, peak: f64, step: usize, total: usize, warmup: usize, decay_ratio: f64) -> f64 {
        if step < warmup {
            return peak * step as f64 / warmup.max(1) as f64;
        }
        let span = total.saturating_sub(warmup).max(1) as f64;
        let q = ((step - warmup) as f64 / span).clamp(0.0, 1.0);
        match self {
            Schedule::Constant => peak,
            Schedule::Linear => peak * (1.0 - q),
            Schedule::Cosine => peak * 0.5 * (1.0 + (std::f64::consts::PI * q).cos()),
            Schedule::Wsd => {
                let decay = ((total as f64) * decay_ratio).round().max(1.0);
                let start = total as f64 - decay;
                if (step as f64) < start {
                    peak
                } else {
                    peak * ((total as f64 - step as f64) / decay).clamp(0.0, 1.0)
                }
            }
        }
    }
}

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// beta1.
    pub beta1: f64,
    /// beta2.
    pub beta2: f64,
    /// eps.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

/// AdamW over named f32 variables (see the module docs).
#[derive(Debug)]
pub struct AdamW {
    cfg: AdamWConfig,
    params: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Updates done so far.
    pub step: usize,
}

impl AdamW {
    /// Zero moments for `params` (names must be unique).
    pub fn new(params: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let mut m = Vec::with_capacity(params.len());
        for (name, p) in &params {
            if p.dtype() != DType::F32 {
                return Err(TrainError::Config {
                    key: "adapter".into(),
                    problem: format!("trainable {name} is {:?}, expected f32", p.dtype()),
                });
            }
            m.push(p.zeros_like()?);
        }
        let v = m.clone();
        Ok(AdamW {
            cfg,
            params,
            m,
            v,
            step: 0,
        })
    }

    /// The variables.
    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// The gradient of each parameter in `store` (`None` where it has none), in parameter order.
    pub fn gradients(&self, store: &candle_core::backprop::GradStore) -> Vec<Option<Tensor>> {
        self.params
            .iter()
            .map(|(_, v)| store.get(v.as_tensor()).cloned())
            .collect()
    }

    /// One update with the gradients `grads[i]` of `params[i]` (`None`: no gradient, skipped
    /// as PyTorch skips parameters whose `.grad` is `None`).
    pub fn update(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        self.update_gated(grads, lr, None)
    }

    /// [`AdamW::update`] that takes effect only where `gate` (a u8 tensor of one element on the
    /// parameters' device) is 1: with 0, every parameter and moment keeps its value bit for bit
    /// (selected on the device, nothing read back). The step count advances either way.
    pub fn update_gated(
        &mut self,
        grads: &[Option<Tensor>],
        lr: f64,
        gate: Option<&Tensor>,
    ) -> Result<()> {
        let keep = |new: Tensor, old: &Tensor| -> Result<Tensor> {
            match gate {
                Some(ok) => Ok(ok.broadcast_as(new.shape())?.where_cond(&new, old)?),
                None => Ok(new),
            }
        };
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let bc1 = 1.0 - b1.powi(t);
        let bc2 = 1.0 - b2.powi(t);
        for (i, g) in grads.iter().enumerate() {
            let Some(g) = g else { continue };
            let g = g.to_dtype(DType::F32)?;
            let p = &self.params[i].1;
            let m = ((&self.m[i] * b1)? + (&g * (1.0 - b1))?)?;
            let v = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let denom = ((&v / bc2)?.sqrt()? + self.cfg.eps)?;
            let upd = ((&m / bc1)? / denom)?;
            let decayed = if self.cfg.weight_decay > 0.0 {
                (p.as_tensor() * (1.0 - lr * self.cfg.weight_decay))?
            } else {
                p.as_tensor().clone()
            };
            p.set(&keep((decayed - (upd * lr)?)?, p.as_tensor())?)?;
            self.m[i] = keep(m, &self.m[i])?;
            self.v[i] = keep(v, &self.v[i])?;
        }
        Ok(())
    }

    /// The largest magnitude of each parameter and moment, as one `[n]` f64 tensor on the
    /// device (NaN where a tensor holds a NaN or an infinity), with their names (`<name>`,
    /// `m.<name>`, `v.<name>`); `None` without parameters. Nothing is read back: the caller
    /// reads it once (before a checkpoint).
    pub fn magnitudes(&self) -> Result<Option<(Vec<String>, Tensor)>> {
        let mut names = Vec::new();
        let mut parts = Vec::new();
        for (i, (name, var)) in self.params.iter().enumerate() {
            for (label, t) in [
                (name.clone(), var.as_tensor()),
                (format!("m.{name}"), &self.m[i]),
                (format!("v.{name}"), &self.v[i]),
            ] {
                names.push(label);
                parts.push(max_magnitude(t)?);
            }
        }
        if parts.is_empty() {
            return Ok(None);
        }
        Ok(Some((names, Tensor::cat(&parts, 0)?)))
    }

    /// The state as named tensors (`m.<name>`, `v.<name>`), for a checkpoint.
    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            out.insert(format!("m.{name}"), self.m[i].clone());
            out.insert(format!("v.{name}"), self.v[i].clone());
        }
        out
    }

    /// Restore [`AdamW::state`] (every moment must be there with the right shape).
    pub fn load_state(
        &mut self,
        state: &HashMap<String, Tensor>,
        step: usize,
        file: &std::path::Path,
        device: &Device,
    ) -> Result<()> {
        for (i, (name, p)) in self.params.iter().enumerate() {
            for (slot, key) in [(0, format!("m.{name}")), (1, format!("v.{name}"))] {
                let t = state.get(&key).ok_or_else(|| TrainError::Malformed {
                    path: file.to_path_buf(),
                    problem: format!("optimizer state has no {key}"),
                })?;
                if t.dims() != p.dims() {
                    return Err(TrainError::Malformed {
                        path: file.to_path_buf(),
                        problem: format!("{key} has shape {:?}, expected {:?}", t.dims(), p.dims()),
                    });
                }
                let t = t.to_dtype(DType::F32)?.to_device(device)?;
                if slot == 0 {
                    self.m[i] = t;
                } else {
                    self.v[i] = t;
                }
            }
        }
        self.step = step;
        Ok(())
    }
}

/// The global L2 norm of `grads` as an f64 scalar on their device (`None` without any
/// gradient): each squared norm summed in f32, then the f64 squares summed in the parameters'
/// order (on the CPU bit for bit the sum the host would take).
pub fn global_grad_norm(grads: &[Option<Tensor>]) -> Result<Option<Tensor>> {
    let parts = grads
        .iter()
        .flatten()
        .map(|g| {
            Ok(g.to_dtype(DType::F32)?
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?)
        })
        .collect::<Result<Vec<Tensor>>>()?;
    if parts.is_empty() {
        return Ok(None);
    }
    Ok(Some(Tensor::stack(&parts, 0)?.sum_all()?.sqrt()?))
}

/// Scale `grads` by `max / (norm + 1e-6)` where `norm` (an f64 scalar from
/// [`global_grad_norm`]) exceeds `max`, else by exactly 1 (unchanged); `max <= 0`: off. The
/// coefficient is computed in f64 on the device and rounded once to each gradient's dtype, as
/// the host computation it replaces did; a NaN norm leaves the gradients unscaled.
pub fn clip_grads_to(grads: &mut [Option<Tensor>], norm: &Tensor, max: f64) -> Result<()> {
    if max <= 0.0 {
        return Ok(());
    }
    let one = norm.ones_like()?;
    // `1 * x + 0` and `1 * n + 1e-6` are exact: no rounding beyond the host formula's.
    let max_t = one.affine(max, 0.0)?;
    let coef = max_t.div(&norm.affine(1.0, 1e-6)?)?;
    let coef = norm.gt(&max_t)?.where_cond(&coef, &one)?;
    let coef32 = coef.to_dtype(DType::F32)?;
    for g in grads.iter_mut().flatten() {
        let c = if g.dtype() == DType::F32 {
            coef32.clone()
        } else {
            coef.to_dtype(g.dtype())?
        };
        *g = g.broadcast_mul(&c)?;
    }
    Ok(())
}

/// [`global_grad_norm`] then [`clip_grads_to`], with the norm read back to the host (0 without
/// gradients): for callers off the training step (the doctor's check); the trainer keeps the
/// norm on the device.
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max: f64) -> Result<f64> {
    let Some(norm) = global_grad_norm(grads)? else {
        return Ok(0.0);
    };
    clip_grads_to(grads, &norm, max)?;
    Ok(norm.to_scalar::<f64>()?)
}

/// `max |t|` as a `[1]` f64 tensor, NaN when `t` holds a NaN or an infinity (`t - t` is 0 for
/// every finite value and NaN otherwise, and its sum carries the NaN).
fn max_magnitude(t: &Tensor) -> Result<Tensor> {
    let t = t.flatten_all()?;
    if t.elem_count() == 0 {
        return Ok(Tensor::zeros(1, DType::F64, t.device())?);
    }
    let max = t.abs()?.max_keepdim(0)?.to_dtype(DType::F64)?;
    let nan = t.sub(&t)?.to_dtype(DType::F64)?.sum_keepdim(0)?;
    Ok((max + nan)?)
}
