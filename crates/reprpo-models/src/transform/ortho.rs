//! The reference's `ortho` transform: a learned orthogonal map per key, as PyTorch's
//! `parametrizations.orthogonal` with the Householder map and its trivialisation (the reference
//! keeps it out of its experiment list because PyTorch's `householder_product` has no bf16
//! kernel; here the map is built in f32 from f32 parameters, so bf16 activations work).
//!
//! # Formula
//! Parameters per key of width `d`: `X` `[d, d]` (`transforms.<key>.transform.parametrizations.
//! weight.original`, initially `-I`) and the constant `B` `[d, d]` (`...weight.0.base`, a random
//! orthogonal matrix). With `A` the strictly lower triangle of `X`, `V = I + A` (column `j` is the
//! Householder vector `v_j`, `τ_j = 2 / ‖v_j‖²`), the product `H_0 ··· H_{d-1}` of
//! `H_j = I - τ_j v_j v_jᵀ` is accumulated in one step as `I - V M^-1 Vᵀ` with
//! `M = striu(VᵀV) + diag(VᵀV) / 2` (the "UT transform" of Joffrain et al., 2006), so
//! `Q = B (I - V M^-1 Vᵀ) diag(s)` with `s_j = trunc(X_jj)` (constant, as PyTorch's integer
//! cast), and `y = x Qᵀ` per token. At initialisation `Q = B`. Only the `householder` map is
//! implemented; `cayley` and `matrix_exp` are errors naming `transform.orthogonal_map`.

use candle_core::{DType, Tensor, Var};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use super::{ActTransform, Acts, TransformSite, map_keys, prefix, tokens_matmul};
use crate::error::{ModelError, Result};

/// The reference's `OrthoConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, documented::DocumentedFields)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct OrthoConfig {
    /// `householder` (the only map implemented).
    pub orthogonal_map: String,
}

impl Default for OrthoConfig {
    fn default() -> Self {
        OrthoConfig {
            orthogonal_map: "householder".into(),
        }
    }
}

#[derive(Debug)]
struct Block {
    key: String,
    x: Var,
    base: Var,
}

/// The transform over every key.
#[derive(Debug)]
pub(crate) struct Ortho {
    blocks: Vec<Block>,
}

impl Ortho {
    pub(crate) fn new(cfg: &OrthoConfig, site: &TransformSite<'_>) -> Result<Self> {
        if cfg.orthogonal_map != "householder" {
            return Err(ModelError::Config {
                file: "transform".into(),
                key: "orthogonal_map".into(),
                problem: format!(
                    "{:?} is not implemented; use \"householder\"",
                    cfg.orthogonal_map
                ),
            });
        }
        let mut rng = StdRng::seed_from_u64(site.seed);
        let mut blocks = Vec::new();
        for (key, &d) in site.sizes {
            let x = (Tensor::eye(d, DType::F32, site.device)? * -1.0)?;
            let base = random_orthogonal(&mut rng, d, site.device)?;
            blocks.push(Block {
                key: key.clone(),
                x: Var::from_tensor(&x)?,
                base: Var::from_tensor(&base)?,
            });
        }
        Ok(Ortho { blocks })
    }
}

/// `Q` of the module docs, f32 `[d, d]`.
fn q_matrix(x: &Tensor, base: &Tensor) -> Result<Tensor> {
    let d = x.dim(0)?;
    let dev = x.device();
    let eye = Tensor::eye(d, DType::F32, dev)?;
    let strict_lower = Tensor::tril2(d, DType::F32, dev)?.sub(&eye)?;
    let v = (x * &strict_lower)?.add(&eye)?;
    let g = v.t()?.matmul(&v)?;
    let strict_upper = strict_lower.t()?;
    let m = ((&g * &strict_upper)? + ((&g * &eye)? * 0.5)?)?;
    let minv = crate::linalg::inverse(&m)?;
    let qh = (&eye - v.matmul(&minv)?.matmul(&v.t()?)?)?;
    let signs = (x.detach() * &eye)?
        .sum(1)?
        .to_dtype(DType::I64)?
        .to_dtype(DType::F32)?;
    Ok(base.matmul(&qh)?.broadcast_mul(&signs.unsqueeze(0)?)?)
}

/// A random orthogonal `[d, d]` matrix: Gram–Schmidt (twice, f64) of a standard normal one.
fn random_orthogonal(rng: &mut StdRng, d: usize, dev: &candle_core::Device) -> Result<Tensor> {
    use rand::Rng;
    let mut cols: Vec<Vec<f64>> = Vec::with_capacity(d);
    for _ in 0..d {
        let mut c: Vec<f64> = (0..d)
            .map(|_| {
                let u1: f64 = rng.random::<f64>().max(1e-300);
                let u2: f64 = rng.random();
                (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
            })
            .collect();
        for _ in 0..2 {
            for p in &cols {
                let dot: f64 = p.iter().zip(&c).map(|(a, b)| a * b).sum();
                c.iter_mut().zip(p).for_each(|(ci, pi)| *ci -= dot * pi);
            }
        }
        let n = c.iter().map(|v| v * v).sum::<f64>().sqrt();
        cols.push(c.into_iter().map(|v| v / n).collect());
    }
    let mut data = vec![0f32; d * d];
    for (j, c) in cols.iter().enumerate() {
        for (i, v) in c.iter().enumerate() {
            data[i * d + j] = *v as f32;
        }
    }
    Ok(Tensor::from_vec(data, (d, d), dev)?)
}

impl ActTransform for Ortho {
    fn apply(&self, maps: &[&Acts], _train: bool) -> Result<Vec<Acts>> {
        let mut qs = std::collections::BTreeMap::new();
        for b in &self.blocks {
            qs.insert(
                b.key.as_str(),
                q_matrix(b.x.as_tensor(), &b.base.as_tensor().detach())?.t()?,
            );
        }
        map_keys(maps, |key, x| match qs.get(key) {
            Some(qt) => Ok(Some(tokens_matmul(x, qt)?)),
            None => Ok(None),
        })
    }

    fn params(&self) -> Vec<(String, Var)> {
        self.blocks
            .iter()
            .map(|b| {
                let n = format!(
                    "{}.transform.parametrizations.weight.original",
                    prefix(&b.key)
                );
                (n, b.x.clone())
            })
            .collect()
    }

    fn buffers(&self) -> Vec<(String, Var)> {
        self.blocks
            .iter()
            .map(|b| {
                let n = format!(
                    "{}.transform.parametrizations.weight.0.base",
                    prefix(&b.key)
                );
                (n, b.base.clone())
            })
            .collect()
    }
}
