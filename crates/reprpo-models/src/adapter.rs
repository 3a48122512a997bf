//! Adapters on linear layers, one mechanism for every kind: a [`Linear`] holds its frozen base
//! weight and, per named adapter, a [`ModuleAdapter`] whose parameters are candle `Var`s (the only
//! trainable tensors). Which adapter is active, whether adapters are off (the base model), which
//! adapter stands for the reference model (none: the base; or a frozen copy of the initial
//! adapter, [`AdapterSet::reference`]), train mode, the recorder of side activations
//! ([`crate::collect`]) and the gradient hooks of projbp ([`crate::gradproj::GradHooks`]) travel
//! in a [`Ctx`] with each forward.
//!
//! # Formulas (x: input `[N, in]`, W: base weight `[out, in]`)
//! - base: `y = x W^T`
//! - LoRA: `y = x W^T + s * dropout(x) A^T B^T`, A `[r, in]`, B `[out, r]`, s = alpha / r, or
//!   alpha / sqrt(r) with rsLoRA. Only the adapter branch is scaled.
//! - DoRA (PEFT): `W' = W + s B A`, `n = ||W'||` per output row (L2 over `in`), **detached**;
//!   `y = (m / n) * (x W^T + s * dropout(x) A^T B^T)` with magnitude m `[out]` (when dropout is
//!   off this is `x (m / n * W')^T`).
//! - Orthogonal kinds (BOFT, OFT, HRA): `y = x (R W)^T`-style transforms, see `orth.rs`.
//!
//! The base weight is dense or quantised ([`BaseWeight`], `model.quantize`, see [`crate::quant`]).
//! A quantised W enters the same formulas as `dequant(W)` in the compute dtype: `x W^T` through
//! [`crate::frozen::quant_matmul`] (dequantised in the forward and again in the backward, so no
//! dense copy outlives the op), the LoRA branch unchanged, DoRA's norm and the orthogonal kinds'
//! `R W` from a dequantised copy (as PEFT does on a bitsandbytes base). Merging into a quantised
//! weight is an error: it would need a re-quantisation that changes the base.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};

use crate::checkpoint::param;
use crate::collect::TapRecorder;
use crate::error::{ModelError, Result};
use crate::gradproj::GradHooks;

/// Per-forward adapter state.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ctx<'a> {
    /// Index of the adapter to apply; `None`: base weights only.
    pub adapter: Option<usize>,
    /// Training mode (adapter dropout on).
    pub train: bool,
    /// Where the linear layers hand their inputs and outputs when a forward asks for taps
    /// (`ForwardSpec::taps`, see [`crate::collect`]); `None`: nothing is recorded.
    pub taps: Option<&'a TapRecorder>,
    /// Rewrites of the gradient at the outputs of hooked modules (`ForwardSpec::grad_hooks`,
    /// see [`crate::gradproj`]); `None`: the backward pass is left alone.
    pub grad_hooks: Option<&'a GradHooks>,
}

/// LoRA / DoRA parameters of one linear layer.
#[derive(Debug, Clone)]
pub struct LoraModule {
    /// `[r, in]`.
    pub a: Var,
    /// `[out, r]`.
    pub b: Var,
    /// DoRA magnitude `[out]`, when DoRA.
    pub magnitude: Option<Var>,
    /// alpha / r (or alpha / sqrt(r)).
    pub scale: f64,
    /// Dropout probability on the adapter input (training only).
    pub dropout: f64,
}

/// One adapter on one linear layer.
#[derive(Debug, Clone)]
pub enum ModuleAdapter {
    /// LoRA or DoRA.
    Lora(LoraModule),
    /// A weight transform (BOFT, OFT, HRA): the adapted weight is a function of the base weight.
    Transform(std::sync::Arc<dyn WeightTransform>),
}

/// An adapter that replaces the base weight by a transformed one (orthogonal fine-tuning).
pub trait WeightTransform: std::fmt::Debug + Send + Sync {
    /// The adapted weight `[out, in]` from the base weight `w` (in the compute dtype).
    fn weight(&self, w: &Tensor, train: bool) -> Result<Tensor>;
    /// The trainable parameters with their PEFT key suffix (e.g. `boft_R`, `hra_u`).
    fn params(&self) -> Vec<(String, Var)>;
}

impl ModuleAdapter {
    /// Trainable parameters with their PEFT key suffix (`lora_A.weight`, ...).
    pub fn params(&self) -> Vec<(String, Var)> {
        match self {
            ModuleAdapter::Lora(m) => {
                let mut v = vec![
                    ("lora_A.weight".to_string(), m.a.clone()),
                    ("lora_B.weight".to_string(), m.b.clone()),
                ];
                if let Some(mag) = &m.magnitude {
                    v.push(("lora_magnitude_vector".to_string(), mag.clone()));
                }
                v
            }
            ModuleAdapter::Transform(t) => t.params(),
        }
    }
}

/// The frozen base weight `[out, in]` of a [`Linear`].
#[derive(Clone)]
pub enum BaseWeight {
    /// In the compute dtype.
    Dense(Tensor),
    /// Quantised (NF4, FP4 or int8); dequantised to `dtype` on `device` where it is used.
    Quant {
        /// The packed weight.
        q: Arc<crate::quant::QuantTensor>,
        /// The compute dtype.
        dtype: DType,
        /// Where the dequantised weight and the layer's outputs live.
        device: Device,
    },
}

impl std::fmt::Debug for BaseWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BaseWeight::Dense(t) => write!(f, "Dense({:?}, {:?})", t.dims(), t.dtype()),
            BaseWeight::Quant { q, dtype, .. } => {
                write!(f, "Quant({:?}, {:?} -> {dtype:?})", q.shape(), q.qtype())
            }
        }
    }
}

impl BaseWeight {
    /// `(out, in)`.
    pub fn dims2(&self) -> (usize, usize) {
        match self {
            BaseWeight::Dense(t) => {
                let d = t.dims();
                (d[0], d.get(1).copied().unwrap_or(1))
            }
            BaseWeight::Quant { q, .. } => q.shape(),
        }
    }

    /// The device of the layer.
    pub fn device(&self) -> &Device {
        match self {
            BaseWeight::Dense(t) => t.device(),
            BaseWeight::Quant { device, .. } => device,
        }
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        match self {
            BaseWeight::Dense(t) => t.dtype(),
            BaseWeight::Quant { dtype, .. } => *dtype,
        }
    }

    /// The weight as a dense tensor in the compute dtype (a dequantised copy when quantised).
    pub fn dense(&self) -> Result<Tensor> {
        match self {
            BaseWeight::Dense(t) => Ok(t.clone()),
            BaseWeight::Quant { q, dtype, device } => q.dequantize(*dtype, device),
        }
    }

    /// The quantised weight, when it is one.
    pub fn quantized(&self) -> Option<&crate::quant::QuantTensor> {
        match self {
            BaseWeight::Quant { q, .. } => Some(q),
            BaseWeight::Dense(_) => None,
        }
    }
}

/// A linear layer `y = x W^T` (no bias) with optional adapters.
#[derive(Debug, Clone)]
pub struct Linear {
    /// Module path in Hugging Face naming (`model.layers.0.self_attn.q_proj`).
    pub name: String,
    /// Frozen base weight `[out, in]`.
    pub weight: BaseWeight,
    /// Adapter slot per registered adapter index (`None`: this adapter does not target it).
    pub adapters: Vec<Option<ModuleAdapter>>,
    /// When an adapter is merged into `weight`: its index and the original weight, restored
    /// exactly by [`Linear::unmerge`].
    pub merged: Option<(usize, Tensor)>,
}

fn flat(x: &Tensor) -> Result<(Tensor, Vec<usize>)> {
    let dims = x.dims().to_vec();
    let inp = dims[dims.len() - 1];
    let rows = x.elem_count() / inp.max(1);
    Ok((x.reshape((rows, inp))?, dims))
}

fn unflat(y: Tensor, mut dims: Vec<usize>, out: usize) -> Result<Tensor> {
    let last = dims.len() - 1;
    dims[last] = out;
    Ok(y.reshape(dims)?)
}

/// `x` with entries zeroed with probability `p` and the rest scaled by 1/(1-p).
/// Inside a seeded scope (`checkpoint`) the mask comes from the scope's generator, so a
/// recomputation draws the same mask.
pub(crate) fn dropout(x: &Tensor, p: f64) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let keep = match crate::checkpoint::dropout_rng() {
        Some(mut rng) => {
            use rand::Rng;
            let m: Vec<f32> = (0..x.elem_count())
                .map(|_| if rng.random::<f64>() >= p { 1.0 } else { 0.0 })
                .collect();
            Tensor::from_vec(m, x.shape(), x.device())?.to_dtype(x.dtype())?
        }
        None => x.rand_like(0.0, 1.0)?.ge(p)?.to_dtype(x.dtype())?,
    };
    Ok((x * keep)?.affine(1.0 / (1.0 - p), 0.0)?)
}

impl Linear {
    /// A layer without adapters.
    pub fn new(name: String, weight: Tensor) -> Self {
        Self::with_base(name, BaseWeight::Dense(weight))
    }

    /// A layer without adapters on a dense or quantised base.
    pub fn with_base(name: String, weight: BaseWeight) -> Self {
        Linear {
            name,
            weight,
            adapters: vec![],
            merged: None,
        }
    }

    /// Output features.
    pub fn out_dim(&self) -> usize {
        self.weight.dims2().0
    }

    /// Input features.
    pub fn in_dim(&self) -> usize {
        self.weight.dims2().1
    }

    /// The device of the layer.
    pub fn device(&self) -> &Device {
        self.weight.device()
    }

    /// `x W^T` with the base weight alone (no gradient to W).
    fn base_matmul(&self, x2: &Tensor) -> Result<Tensor> {
        match &self.weight {
            BaseWeight::Dense(w) => crate::frozen::frozen_matmul(x2, w),
            BaseWeight::Quant { q, .. } => crate::frozen::quant_matmul(x2, q),
        }
    }

    fn adapter(&self, ctx: &Ctx<'_>) -> Option<&ModuleAdapter> {
        let i = ctx.adapter?;
        if matches!(&self.merged, Some((j, _)) if *j == i) {
            return None;
        }
        self.adapters.get(i)?.as_ref()
    }

    /// Apply to `x` of shape `[..., in]`.
    pub fn forward(&self, x: &Tensor, ctx: &Ctx<'_>) -> Result<Tensor> {
        let (x2, dims) = flat(x)?;
        let out = self.out_dim();
        let y = match self.adapter(ctx) {
            None => self.base_matmul(&x2)?,
            Some(ModuleAdapter::Lora(m))
                if m.magnitude.is_none() && !(ctx.train && m.dropout > 0.0) =>
            {
                // Plain LoRA without dropout: one fused node (`frozen::lora_matmul`).
                let dt = x2.dtype();
                let a = param(&m.a).to_dtype(dt)?;
                let b = param(&m.b).to_dtype(dt)?;
                match &self.weight {
                    BaseWeight::Dense(w) => crate::frozen::lora_matmul(&x2, w, &a, &b, m.scale)?,
                    BaseWeight::Quant { q, .. } => {
                        crate::frozen::lora_quant_matmul(&x2, q, &a, &b, m.scale)?
                    }
                }
            }
            Some(ModuleAdapter::Lora(m)) => {
                let dt = x2.dtype();
                let (pa, pb) = (param(&m.a), param(&m.b));
                let a = pa.to_dtype(dt)?;
                let b = pb.to_dtype(dt)?;
                let xin = if ctx.train {
                    dropout(&x2, m.dropout)?
                } else {
                    x2.clone()
                };
                let base = self.base_matmul(&x2)?;
                let lora = (xin.matmul(&a.t()?)?.matmul(&b.t()?)? * m.scale)?;
                match &m.magnitude {
                    None => (base + lora)?,
                    Some(mag) => {
                        // PEFT: the norm of the adapted weight is detached (no gradient).
                        let w0 = self.weight.dense()?.to_dtype(DType::F32)?;
                        let w = (w0 + (pb.matmul(&pa)? * m.scale)?)?;
                        let norm = w.sqr()?.sum_keepdim(1)?.sqrt()?.detach().squeeze(1)?;
                        let factor = param(mag).div(&norm)?.to_dtype(dt)?.unsqueeze(0)?;
                        (base + lora)?.broadcast_mul(&factor)?
                    }
                }
            }
            Some(ModuleAdapter::Transform(t)) => {
                let mut w = t.weight(&self.weight.dense()?, ctx.train)?;
                if crate::checkpoint::no_grad() {
                    w = w.detach();
                }
                x2.matmul(&w.t()?)?
            }
        };
        let y = unflat(y, dims, out)?;
        if let Some(rec) = ctx.taps {
            rec.record(&self.name, x, &y)?;
        }
        match ctx.grad_hooks {
            Some(h) => h.wrap(&self.name, &y),
            None => Ok(y),
        }
    }

    /// The trainable parameters this layer reads in a forward with `ctx` (none when adapters are
    /// off, this layer is not targeted, or the adapter is merged).
    pub fn active_params(&self, ctx: &Ctx<'_>) -> Vec<Var> {
        self.adapter(ctx)
            .map(|a| a.params().into_iter().map(|(_, v)| v).collect())
            .unwrap_or_default()
    }

    /// The effective weight with adapter `i` applied (for merging and checks).
    pub fn adapted_weight(&self, i: usize) -> Result<Tensor> {
        let base = self.weight.dense()?;
        let Some(Some(a)) = self.adapters.get(i) else {
            return Ok(base);
        };
        let dt = base.dtype();
        Ok(match a {
            ModuleAdapter::Lora(m) => {
                let delta = (m.b.as_tensor().matmul(m.a.as_tensor())? * m.scale)?;
                let w = (base.to_dtype(DType::F32)? + delta)?;
                match &m.magnitude {
                    None => w.to_dtype(dt)?,
                    Some(mag) => {
                        let norm = w.sqr()?.sum_keepdim(1)?.sqrt()?;
                        w.broadcast_mul(&mag.as_tensor().unsqueeze(1)?.div(&norm)?)?
                            .to_dtype(dt)?
                    }
                }
            }
            ModuleAdapter::Transform(t) => t.weight(&base, false)?,
        })
    }

    /// Merge adapter `i` into the base weight (the forward then skips it). Merging while another
    /// adapter is merged is an error. Returns whether anything was merged.
    pub fn merge(&mut self, i: usize) -> Result<bool> {
        if self.adapters.get(i).and_then(Option::as_ref).is_none() {
            return Ok(false);
        }
        match &self.merged {
            Some((j, _)) if *j == i => return Ok(false),
            Some(_) => {
                return Err(ModelError::Invalid(format!(
                    "{}: another adapter is already merged; unmerge it first",
                    self.name
                )));
            }
            None => {}
        }
        if self.weight.quantized().is_some() {
            return Err(ModelError::Invalid(format!(
                "{}: the base weight is quantised (model.quantize); an adapter cannot be merged \
                 into it without re-quantising the base. Load the base unquantised to merge",
                self.name
            )));
        }
        let adapted = self.adapted_weight(i)?;
        let original = std::mem::replace(&mut self.weight, BaseWeight::Dense(adapted));
        self.merged = Some((i, original.dense()?));
        Ok(true)
    }

    /// Restore the exact base weight if an adapter is merged.
    pub fn unmerge(&mut self) {
        if let Some((_, w)) = self.merged.take() {
            self.weight = BaseWeight::Dense(w);
        }
    }

    /// The base weight without any merged adapter, dense (a dequantised copy when quantised).
    pub fn base_weight(&self) -> Result<Tensor> {
        match &self.merged {
            Some((_, w)) => Ok(w.clone()),
            None => self.weight.dense(),
        }
    }
}

/// The adapters registered on a model: names, which one is active, and their configs.
#[derive(Debug, Clone, Default)]
pub struct AdapterSet {
    /// Adapter names by index.
    pub names: Vec<String>,
    /// Their configs.
    pub configs: Vec<crate::peft::AdapterConfig>,
    /// The active adapter (applied unless a forward turns adapters off).
    pub active: Option<usize>,
    /// The adapter a reference forward (`ForwardSpec::reference`) applies: a frozen copy of the
    /// policy's initial adapter (see `peft::add_frozen_copy`). `None`: the reference is the base.
    pub reference: Option<usize>,
}

impl AdapterSet {
    /// Index of adapter `name`.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }
}

/// A model whose linear layers can carry adapters (one implementation per architecture).
pub trait AdapterHost {
    /// Every adaptable linear layer (not `lm_head`), in a fixed order, with its module path.
    fn linears_mut(&mut self) -> Vec<&mut Linear>;
    /// Every adaptable linear layer, read-only.
    fn linears(&self) -> Vec<&Linear>;
    /// The registry.
    fn adapter_set(&self) -> &AdapterSet;
    /// The registry, mutable.
    fn adapter_set_mut(&mut self) -> &mut AdapterSet;
}
