//! Transforms of collected activations before a method loss (the reference ReprPO project's
//! `reprpo/interventions/transforms/`): `none`, `ether` (Htypes `ether`, `etherplus`, `oft`,
//! `etherplusHH`), `hra`, `svd`, `supr` and `ortho`. A transform maps each collected activation
//! `[B, T, H_key]` (per token, over the last dimension) and is applied, with the same parameters,
//! to the policy's and the reference's chosen and rejected activations alike; its trainable
//! parameters (candle `Var`s, f32) train beside the adapter and are saved beside it
//! (`transform.safetensors`, names as the reference's state dict: `transforms.<key>.<param>`).
//!
//! They live here rather than in `reprpo-losses` because they are parametrised modules like the
//! adapters: they need the differentiable batched inverse of [`crate::linalg`] (OFT's Cayley map,
//! ortho's Householder accumulation), the model's embedding and output head (svd, supr), and the
//! adapters' save/load conventions. The formulas are on each kind's file.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor, Var};
use rand::Rng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

mod ether;
mod hra;
mod ortho;
mod spectral;

pub use ether::EtherConfig;
pub use hra::HraConfig;
pub use ortho::OrthoConfig;
pub use spectral::{SupprConfig, SvdConfig};

/// Which transform, with its reference configuration (defaults as the reference's).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
#[non_exhaustive]
pub enum TransformConfig {
    /// The identity.
    #[default]
    None,
    /// ETHER-style reflections in a rank-`⌊d / reduction⌋` bottleneck.
    Ether(EtherConfig),
    /// Householder reflections (HRA).
    Hra(HraConfig),
    /// Removal of the part of each activation the embedding / output head read (SVD).
    Svd(SvdConfig),
    /// Keep the features that the last token's activation grows between collected layers.
    Supr(SupprConfig),
    /// A learned orthogonal map (PyTorch's Householder parametrization).
    Ortho(OrthoConfig),
}

impl TransformConfig {
    /// The name used in the reference's experiment names (`none`, `ether`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            TransformConfig::None => "none",
            TransformConfig::Ether(_) => "ether",
            TransformConfig::Hra(_) => "hra",
            TransformConfig::Svd(_) => "svd",
            TransformConfig::Supr(_) => "supr",
            TransformConfig::Ortho(_) => "ortho",
        }
    }
}

/// Collected activations by key.
pub type Acts = BTreeMap<String, Tensor>;

/// `f` applied to every key's activation of every map, with `f(key, x)`; keys `f` returns `None`
/// for are kept as they are.
pub(crate) fn map_keys(
    maps: &[&Acts],
    f: impl Fn(&str, &Tensor) -> Result<Option<Tensor>>,
) -> Result<Vec<Acts>> {
    maps.iter()
        .map(|m| {
            m.iter()
                .map(|(k, x)| Ok((k.clone(), f(k, x)?.unwrap_or_else(|| x.clone()))))
                .collect()
        })
        .collect()
}

/// The model matrices `svd` and `supr` read: the input embedding and the output head, both
/// `[vocab, hidden]` (the same tensor for tied embeddings).
#[derive(Debug, Clone)]
pub struct ModelMatrices {
    /// Input embedding `[V, d]`.
    pub embed: Tensor,
    /// Output head `[V, d]`.
    pub head: Tensor,
}

/// A transform of collected activations.
pub trait ActTransform: std::fmt::Debug + Send + Sync {
    /// Each activation map of `maps` transformed with the same parameters (keys may change:
    /// `supr` drops the lowest layer); `train`: dropout on. The maps are the four outputs of a
    /// method (policy / reference, chosen / rejected), so a transform builds its matrices once.
    fn apply(&self, maps: &[&Acts], train: bool) -> Result<Vec<Acts>>;
    /// Trainable parameters with their state-dict names.
    fn params(&self) -> Vec<(String, Var)>;
    /// Constant tensors saved with the parameters (ETHER's frozen down-projection, ortho's base),
    /// held as `Var`s so that loading can set them, but never trained.
    fn buffers(&self) -> Vec<(String, Var)> {
        vec![]
    }
}

/// The identity.
#[derive(Debug)]
struct Identity;

impl ActTransform for Identity {
    fn apply(&self, maps: &[&Acts], _train: bool) -> Result<Vec<Acts>> {
        Ok(maps.iter().map(|m| (*m).clone()).collect())
    }
    fn params(&self) -> Vec<(String, Var)> {
        vec![]
    }
}

/// Where a transform is built: activation widths per key, the model's matrices (svd, supr), the
/// device, and the seed of its random initialisation.
#[derive(Debug, Clone)]
pub struct TransformSite<'a> {
    /// `key -> width` of every collected activation.
    pub sizes: &'a BTreeMap<String, usize>,
    /// Embedding and head, when the transform needs them.
    pub matrices: Option<&'a ModelMatrices>,
    /// Device of the parameters.
    pub device: &'a Device,
    /// Seed of the initialisation.
    pub seed: u64,
    /// Whether the activations are hidden states (integer keys), as `supr` requires.
    pub hidden_states: bool,
}

/// Build the transform `cfg` for `site`, checking what the configuration needs (the error names
/// the `transform.*` key).
pub fn build(cfg: &TransformConfig, site: &TransformSite<'_>) -> Result<Box<dyn ActTransform>> {
    Ok(match cfg {
        TransformConfig::None => Box::new(Identity),
        TransformConfig::Ether(c) => Box::new(ether::Ether::new(c, site)?),
        TransformConfig::Hra(c) => Box::new(hra::Hra::new(c, site)?),
        TransformConfig::Svd(c) => Box::new(spectral::Svd::new(c, site)?),
        TransformConfig::Supr(c) => Box::new(spectral::Suppressed::new(c, site)?),
        TransformConfig::Ortho(c) => Box::new(ortho::Ortho::new(c, site)?),
    })
}

/// The state-dict prefix of key `key`'s per-key transform.
pub(crate) fn prefix(key: &str) -> String {
    format!("transforms.{key}")
}

/// A `Var` of `shape` drawn i.i.d. from `U(-bound, bound)` (PyTorch's `kaiming_uniform_(a=√5)`
/// has `bound = 1 / sqrt(fan_in)`).
pub(crate) fn uniform_var(
    rng: &mut StdRng,
    shape: &[usize],
    bound: f64,
    dev: &Device,
) -> Result<Var> {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|_| ((rng.random::<f64>() * 2.0 - 1.0) * bound) as f32)
        .collect();
    Ok(Var::from_tensor(&Tensor::from_vec(data, shape, dev)?)?)
}

/// Load saved parameters and buffers into `t` (every one of its names must be present with its
/// shape; extra names are an error), from a safetensors file.
pub fn load_into(t: &dyn ActTransform, file: &Path, dev: &Device) -> Result<()> {
    let saved = candle_core::safetensors::load(file, dev).map_err(|e| ModelError::Format {
        file: file.to_path_buf(),
        problem: e.to_string(),
    })?;
    set_from(t, &saved, file)
}

/// [`load_into`] from a map of tensors (`origin` names where they came from in errors).
pub fn set_from(
    t: &dyn ActTransform,
    saved: &std::collections::HashMap<String, Tensor>,
    origin: &Path,
) -> Result<()> {
    let mut expected = 0;
    for (name, var) in t.params().into_iter().chain(t.buffers()) {
        let src = saved_tensor(saved, &name, var.dims(), origin)?;
        var.set(&src.to_dtype(var.dtype())?)?;
        expected += 1;
    }
    if saved.len() != expected {
        let known: Vec<String> = t
            .params()
            .into_iter()
            .chain(t.buffers())
            .map(|(n, _)| n)
            .collect();
        let extra: Vec<&String> = saved.keys().filter(|k| !known.contains(k)).collect();
        return Err(ModelError::Format {
            file: origin.to_path_buf(),
            problem: format!("tensors this transform does not have: {extra:?}"),
        });
    }
    Ok(())
}

fn saved_tensor<'a>(
    saved: &'a std::collections::HashMap<String, Tensor>,
    name: &str,
    dims: &[usize],
    origin: &Path,
) -> Result<&'a Tensor> {
    let src = saved.get(name).ok_or_else(|| ModelError::Format {
        file: origin.to_path_buf(),
        problem: format!("missing transform tensor {name}"),
    })?;
    if src.dims() != dims {
        return Err(ModelError::Format {
            file: origin.to_path_buf(),
            problem: format!("{name}: shape {:?}, expected {dims:?}", src.dims()),
        });
    }
    Ok(src)
}

/// Every parameter and buffer of `t`, by name (what [`load_into`] reads back).
pub fn tensors(t: &dyn ActTransform) -> BTreeMap<String, Tensor> {
    t.params()
        .into_iter()
        .chain(t.buffers())
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect()
}

/// `x` `[..., d]` times `m` `[d, e]` (a per-token linear map), in `x`'s dtype.
pub(crate) fn tokens_matmul(x: &Tensor, m: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let d = dims[dims.len() - 1];
    let rows = x.elem_count() / d.max(1);
    let y = x.reshape((rows, d))?.matmul(&m.to_dtype(x.dtype())?)?;
    let mut out = dims;
    let last = out.len() - 1;
    out[last] = m.dim(1)?;
    Ok(y.reshape(out)?)
}
