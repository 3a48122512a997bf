//! The optimizer: AdamW with f32 moments (`train.optim = "adamw"`, as `torch.optim.AdamW`) or
//! with 8-bit moments (`"adamw_8bit"`, as bitsandbytes' `AdamW8bit`), whose state is saved and
//! restored exactly; learning-rate schedules with warm-up; global-norm gradient clipping.
//!
//! candle-nn's `AdamW` keeps its moments private (no checkpoint, no bit-exact resume) and in the
//! variable's dtype; [`AdamW`] keeps them per parameter ([`Moments`]) and exposes them as named
//! tensors. One file per optimizer: [`adamw`] (f32), [`adamw8bit`] (blockwise 8-bit);
//! [`schedule`] the schedules.
//!
//! # AdamW (`"adamw"`, as `torch.optim.AdamW`)
//! With gradient `g`, step `t` (1-based), learning rate `lr`, decoupled weight decay `wd`:
//!
//! `p <- p (1 - lr wd)`, `m <- b1 m + (1 - b1) g`, `v <- b2 v + (1 - b2) g^2`,
//! `p <- p - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)`.
//!
//! # 8-bit AdamW (`"adamw_8bit"`, as `bnb.optim.AdamW8bit`)
//! Tensors of at least [`adamw8bit::MIN_8BIT_SIZE`] = 4096 elements keep `m` and `v` as u8 codes
//! with one f32 absmax per block of 256 elements (dynamic maps, signed for `m`, unsigned for
//! `v`); smaller ones keep f32 moments. With `m`, `v` dequantised:
//! `m <- b1 m + (1 - b1) g`, `v <- b2 v + (1 - b2) g^2`, `p <- p (1 - lr wd)`,
//! `p <- p - (lr / (1 - b1^t)) m / (sqrt(v) / sqrt(1 - b2^t) + eps)`, then `m`, `v`
//! requantised; small tensors use `eps sqrt(1 - b2^t)` in place of `eps` after the correction
//! (bitsandbytes' 32-bit formula). The exact rounding is in [`adamw8bit`]. State: 2 bytes per
//! element plus 8 per block, against 8 per element in f32 ([`AdamW::state_bytes`]).
//!
//! # Checkpointed state ([`AdamW::state`])
//! `m.<name>`, `v.<name>`: the moments of parameter `<name>`, f32 of its shape; for an 8-bit
//! tensor u8 codes of its shape, with `absmax_m.<name>`, `absmax_v.<name>` (`[blocks]` f32).
//! The 8-bit optimizer also writes [`KIND_8BIT_KEY`] (a u8 `[1]` tensor), which is how a
//! checkpoint records the kind: restoring it into the other kind is an error naming
//! `train.optim`.
//!
//! # Clipping (as `torch.nn.utils.clip_grad_norm_`)
//! `n = sqrt(sum_i ||g_i||^2)`; when `n > max`, every gradient is scaled by `max / (n + 1e-6)`.
//! The norm and the coefficient are computed on the gradients' device ([`global_grad_norm`],
//! [`clip_grads_to`]): the training step reads neither back.
//!
//! # Gated updates
//! [`AdamW::update_gated`] takes a u8 flag on the device and keeps the parameters and moments
//! (f32 or 8-bit codes and absmax) as they were where it is 0 (the trainer's non-finite guard),
//! again without a read.

pub mod adamw;
pub mod adamw8bit;
pub mod schedule;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};

use self::adamw8bit::{Codebooks, Quantized};
pub use self::schedule::Schedule;
use crate::error::{Result, TrainError};

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

/// The optimizer's kind (the `train.optim` key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OptimKind {
    /// `"adamw"`: f32 moments, `torch.optim.AdamW`.
    #[default]
    AdamW,
    /// `"adamw_8bit"`: blockwise 8-bit moments, bitsandbytes' `AdamW8bit`.
    AdamW8bit,
}

impl OptimKind {
    /// The values of `train.optim`.
    pub const NAMES: [&'static str; 2] = ["adamw", "adamw_8bit"];

    /// Parse a `train.optim` value.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "adamw" => Ok(OptimKind::AdamW),
            "adamw_8bit" => Ok(OptimKind::AdamW8bit),
            other => {
                let known: Vec<String> = Self::NAMES.iter().map(|s| s.to_string()).collect();
                Err(TrainError::Config {
                    key: "train.optim".into(),
                    problem: format!(
                        "unknown optimizer {other:?}{}; known: {}",
                        crate::config::suggest(other, &known),
                        Self::NAMES.join(", ")
                    ),
                })
            }
        }
    }

    /// The `train.optim` value.
    pub fn name(self) -> &'static str {
        match self {
            OptimKind::AdamW => "adamw",
            OptimKind::AdamW8bit => "adamw_8bit",
        }
    }
}

/// The key of the tensor that marks an 8-bit optimizer's checkpointed state.
pub const KIND_8BIT_KEY: &str = "optim.adamw_8bit";

/// The moments of one parameter.
#[derive(Debug, Clone)]
pub enum Moments {
    /// f32 `m`, `v` of the parameter's shape.
    F32 {
        /// First moment.
        m: Tensor,
        /// Second moment.
        v: Tensor,
    },
    /// Blockwise 8-bit (the 8-bit kind, tensors of at least `MIN_8BIT_SIZE` elements).
    Q8(Quantized),
}

impl Moments {
    /// Bytes held by the moments.
    pub fn bytes(&self) -> usize {
        match self {
            Moments::F32 { m, v } => 4 * (m.elem_count() + v.elem_count()),
            Moments::Q8(q) => q.bytes(),
        }
    }
}

/// AdamW over named f32 variables, f32 or 8-bit moments (see the module docs).
#[derive(Debug)]
pub struct AdamW {
    cfg: AdamWConfig,
    kind: OptimKind,
    params: Vec<(String, Var)>,
    moments: Vec<Moments>,
    /// The 8-bit kind's maps, on the parameters' device (`None` for f32 or no 8-bit tensor).
    books: Option<Codebooks>,
    /// Updates done so far.
    pub step: usize,
}

impl AdamW {
    /// Zero f32 moments for `params` (names must be unique): `torch.optim.AdamW`.
    pub fn new(params: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        Self::with_kind(params, cfg, OptimKind::AdamW)
    }

    /// Zero moments of `kind` for `params` (names must be unique).
    pub fn with_kind(
        params: Vec<(String, Var)>,
        cfg: AdamWConfig,
        kind: OptimKind,
    ) -> Result<Self> {
        let mut moments = Vec::with_capacity(params.len());
        let mut books = None;
        for (name, p) in &params {
            if p.dtype() != DType::F32 {
                return Err(TrainError::Config {
                    key: "adapter".into(),
                    problem: format!("trainable {name} is {:?}, expected f32", p.dtype()),
                });
            }
            if Self::is_8bit(kind, p.elem_count()) {
                if books.is_none() {
                    books = Some(Codebooks::new(p.device())?);
                }
                moments.push(Moments::Q8(Quantized::zeros(p.shape(), p.device())?));
            } else {
                let z = p.zeros_like()?;
                moments.push(Moments::F32 { m: z.clone(), v: z });
            }
        }
        Ok(AdamW {
            cfg,
            kind,
            params,
            moments,
            books,
            step: 0,
        })
    }

    /// Whether a tensor of `n` elements gets 8-bit moments under `kind`.
    fn is_8bit(kind: OptimKind, n: usize) -> bool {
        kind == OptimKind::AdamW8bit && n >= adamw8bit::MIN_8BIT_SIZE
    }

    /// The optimizer's kind.
    pub fn kind(&self) -> OptimKind {
        self.kind
    }

    /// The variables.
    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// The moments of each parameter, in parameter order.
    pub fn moments(&self) -> &[Moments] {
        &self.moments
    }

    /// Bytes held by the optimizer state (the moments; absmax included for 8-bit tensors).
    pub fn state_bytes(&self) -> usize {
        self.moments.iter().map(Moments::bytes).sum()
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
    /// parameters' device) is 1: with 0, every parameter and moment (8-bit codes and absmax
    /// included) keeps its value bit for bit (selected on the device, nothing read back). The
    /// step count advances either way.
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
        let t = self.step;
        let cfg = self.cfg;
        for (i, g) in grads.iter().enumerate() {
            let Some(g) = g else { continue };
            let g = g.to_dtype(DType::F32)?;
            let p = &self.params[i].1;
            let (new_p, new_moments) = match (&self.moments[i], self.kind) {
                (Moments::F32 { m, v }, OptimKind::AdamW) => {
                    let (np, nm, nv) = adamw::step(&cfg, p.as_tensor(), &g, m, v, lr, t)?;
                    (np, Moments::F32 { m: nm, v: nv })
                }
                (Moments::F32 { m, v }, OptimKind::AdamW8bit) => {
                    let (np, nm, nv) = adamw8bit::step_32bit(&cfg, p.as_tensor(), &g, m, v, lr, t)?;
                    (np, Moments::F32 { m: nm, v: nv })
                }
                (Moments::Q8(q), _) => {
                    let books = self.books.as_ref().ok_or_else(|| TrainError::Config {
                        key: "train.optim".into(),
                        problem: "8-bit moments without their maps".into(),
                    })?;
                    let (np, nq) = adamw8bit::step_8bit(&cfg, books, p.as_tensor(), &g, q, lr, t)?;
                    (np, Moments::Q8(nq))
                }
            };
            p.set(&keep(new_p, p.as_tensor())?)?;
            self.moments[i] = match (new_moments, &self.moments[i]) {
                (Moments::F32 { m, v }, Moments::F32 { m: om, v: ov }) => Moments::F32 {
                    m: keep(m, om)?,
                    v: keep(v, ov)?,
                },
                (Moments::Q8(n), Moments::Q8(o)) => Moments::Q8(Quantized {
                    m: keep(n.m, &o.m)?,
                    m_absmax: keep(n.m_absmax, &o.m_absmax)?,
                    v: keep(n.v, &o.v)?,
                    v_absmax: keep(n.v_absmax, &o.v_absmax)?,
                }),
                (new, _) => new,
            };
        }
        Ok(())
    }

    /// The largest magnitude of each parameter and moment, as one `[n]` f64 tensor on the
    /// device (NaN where a tensor holds a NaN or an infinity), with their names (`<name>`,
    /// `m.<name>`, `v.<name>`); `None` without parameters. For 8-bit moments it is the largest
    /// block absmax (a bound of the dequantised values, reached by the unsigned map). Nothing
    /// is read back: the caller reads it once (before a checkpoint).
    pub fn magnitudes(&self) -> Result<Option<(Vec<String>, Tensor)>> {
        let mut names = Vec::new();
        let mut parts = Vec::new();
        for (i, (name, var)) in self.params.iter().enumerate() {
            let (m, v) = match &self.moments[i] {
                Moments::F32 { m, v } => (m, v),
                Moments::Q8(q) => (&q.m_absmax, &q.v_absmax),
            };
            for (label, t) in [
                (name.clone(), var.as_tensor()),
                (format!("m.{name}"), m),
                (format!("v.{name}"), v),
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

    /// The state as named tensors (see the module docs), for a checkpoint.
    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            match &self.moments[i] {
                Moments::F32 { m, v } => {
                    out.insert(format!("m.{name}"), m.clone());
                    out.insert(format!("v.{name}"), v.clone());
                }
                Moments::Q8(q) => {
                    out.insert(format!("m.{name}"), q.m.clone());
                    out.insert(format!("v.{name}"), q.v.clone());
                    out.insert(format!("absmax_m.{name}"), q.m_absmax.clone());
                    out.insert(format!("absmax_v.{name}"), q.v_absmax.clone());
                }
            }
        }
        if self.kind == OptimKind::AdamW8bit
            && let Ok(marker) = Tensor::ones(1, DType::U8, &Device::Cpu)
        {
            out.insert(KIND_8BIT_KEY.into(), marker);
        }
        out
    }

    /// Restore [`AdamW::state`] (every moment must be there with the right shape and dtype;
    /// a state of the other kind is an error naming `train.optim`).
    pub fn load_state(
        &mut self,
        state: &HashMap<String, Tensor>,
        step: usize,
        file: &std::path::Path,
        device: &Device,
    ) -> Result<()> {
        let written = if state.contains_key(KIND_8BIT_KEY) {
            OptimKind::AdamW8bit
        } else {
            OptimKind::AdamW
        };
        if written != self.kind {
            return Err(TrainError::Config {
                key: "train.optim".into(),
                problem: format!(
                    "{} was written with train.optim = {:?} and this run has {:?}: resume with \
                     the checkpoint's value",
                    file.display(),
                    written.name(),
                    self.kind.name()
                ),
            });
        }
        let malformed = |problem: String| TrainError::Malformed {
            path: file.to_path_buf(),
            problem,
        };
        let get = |key: &str, dims: &[usize], dtype: DType| -> Result<Tensor> {
            let t = state
                .get(key)
                .ok_or_else(|| malformed(format!("optimizer state has no {key}")))?;
            if t.dims() != dims {
                return Err(malformed(format!(
                    "{key} has shape {:?}, expected {dims:?}",
                    t.dims()
                )));
            }
            if t.dtype() != dtype {
                return Err(malformed(format!(
                    "{key} is {:?}, expected {dtype:?}",
                    t.dtype()
                )));
            }
            Ok(t.to_device(device)?)
        };
        let mut restored = Vec::with_capacity(self.params.len());
        for (i, (name, p)) in self.params.iter().enumerate() {
            let (mk, vk) = (format!("m.{name}"), format!("v.{name}"));
            restored.push(match &self.moments[i] {
                Moments::F32 { .. } => {
                    if self.kind == OptimKind::AdamW {
                        // Older checkpoints may hold other float dtypes: converted as before.
                        let conv = |key: &str| -> Result<Tensor> {
                            let t = state.get(key).ok_or_else(|| {
                                malformed(format!("optimizer state has no {key}"))
                            })?;
                            if t.dims() != p.dims() {
                                return Err(malformed(format!(
                                    "{key} has shape {:?}, expected {:?}",
                                    t.dims(),
                                    p.dims()
                                )));
                            }
                            Ok(t.to_dtype(DType::F32)?.to_device(device)?)
                        };
                        Moments::F32 {
                            m: conv(&mk)?,
                            v: conv(&vk)?,
                        }
                    } else {
                        Moments::F32 {
                            m: get(&mk, p.dims(), DType::F32)?,
                            v: get(&vk, p.dims(), DType::F32)?,
                        }
                    }
                }
                Moments::Q8(_) => {
                    let nb = [adamw8bit::blocks(p.elem_count())];
                    Moments::Q8(Quantized {
                        m: get(&mk, p.dims(), DType::U8)?,
                        m_absmax: get(&format!("absmax_m.{name}"), &nb, DType::F32)?,
                        v: get(&vk, p.dims(), DType::U8)?,
                        v_absmax: get(&format!("absmax_v.{name}"), &nb, DType::F32)?,
                    })
                }
            });
        }
        self.moments = restored;
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
