//! The reference's transforms built from the model's vocabulary matrices: `svd` (remove the part
//! of each activation that the embedding and the output head read) and `supr` (keep the features
//! that the last token's activation grows between consecutive collected layers). Neither has
//! trainable parameters; both are rebuilt from the model, never saved.
//!
//! # `svd` (`SVDLayer`)
//! For a matrix `W` `[V, d]` (`V ≥ d`, as the reference requires) with singular values `S` and
//! right singular vectors `Vt`: `τ = quantile(S, q)` (linear interpolation, as `torch.quantile`),
//! `S' = max(S, τ)` (0 stays 0), `S' ← S' ‖S‖ / ‖S'‖`, and the map `M = Vtᵀ diag(S') Vt`
//! (`q ≥ 1`: `M = Vtᵀ Vt`). Computed here as `g(WᵀW)` from the symmetric eigendecomposition of the
//! `[d, d]` Gram matrix in f64 (faer), which gives the same `M` without a `[V, d]` SVD and without
//! the singular vectors' sign ambiguity. With `dual_svd` (default): `a = h M_embed`,
//! `b = h M_head`, `io = a + b - ((a·b) / (b·b)) b`; otherwise `io = h M_head`. Output
//! `y = h - io` (differentiable in `h`; computed in f32 for bf16 activations, whose rounding the
//! cancellation would otherwise amplify; the reference runs it in bf16).
//!
//! # `supr` (`SupressedHSTransform`)
//! Hidden-state keys only (integers), at least two. Sorted numerically into `X_0 .. X_{L-1}`
//! (`[B, T, d]`); on the last position `h_l = X_l[:, T-1]` (detached) the reference computes
//! `δ_l = ((h_{l+1} - h_l) Woᵀ) Wo⁺ᵀ` (`Wo⁺` the pseudo-inverse of the head), which is
//! `(h_{l+1} - h_l) P` with `P = Woᵀ Wo (Woᵀ Wo)⁺` the projector on the head's row space (the
//! identity for a full-rank head, the usual case; computed from the same eigendecomposition).
//! The mask `m_l = [δ_l > 0.1]` (`[B, d]`, constant) gives `{key_{l+1}: X_{l+1} ⊙ m_l}` over
//! every position: the lowest key is dropped.

use std::collections::BTreeMap;

use candle_core::{DType, Device, IndexOp, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::{ActTransform, Acts, ModelMatrices, TransformSite, map_keys, tokens_matmul};
use crate::error::{ModelError, Result};

/// The reference's `SVDConfig` (its defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, documented::DocumentedFields)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct SvdConfig {
    /// Quantile of the singular values below which they are raised (`≥ 1`: a hard projection).
    pub quantile: f64,
    /// Use the embedding and the head (else the head only).
    pub dual_svd: bool,
}

impl Default for SvdConfig {
    fn default() -> Self {
        SvdConfig {
            quantile: 0.3,
            dual_svd: true,
        }
    }
}

/// The reference's `SupressedHSConfig` (no fields).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SupprConfig {}

fn config_err(key: &str, problem: String) -> ModelError {
    ModelError::Config {
        file: "transform".into(),
        key: key.into(),
        problem,
    }
}

fn matrices<'a>(site: &'a TransformSite<'_>, kind: &str) -> Result<&'a ModelMatrices> {
    site.matrices.ok_or_else(|| {
        config_err(
            "kind",
            format!("{kind} needs the model's embedding and output head"),
        )
    })
}

/// Eigenvalues (ascending) and eigenvectors (columns, `[d, d]` row-major) of `WᵀW` in f64.
fn gram_eigen(w: &Tensor) -> Result<(Vec<f64>, Vec<f64>)> {
    let w = w.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let g = w.t()?.matmul(&w)?;
    let d = g.dim(0)?;
    let data: Vec<f64> = g.flatten_all()?.to_vec1()?;
    let m = faer::Mat::<f64>::from_fn(d, d, |i, j| data[i * d + j]);
    let evd = m
        .self_adjoint_eigen(faer::Side::Lower)
        .map_err(|e| ModelError::Invalid(format!("eigendecomposition failed: {e:?}")))?;
    let s = evd.S().column_vector();
    let lambdas: Vec<f64> = (0..d).map(|i| s[i]).collect();
    let u = evd.U();
    let mut vecs = vec![0f64; d * d];
    for i in 0..d {
        for j in 0..d {
            vecs[i * d + j] = u[(i, j)];
        }
    }
    Ok((lambdas, vecs))
}

/// `U diag(f) Uᵀ` as an f32 `[d, d]` tensor on `dev`.
fn spectral_matrix(u: &[f64], f: &[f64], dev: &Device) -> Result<Tensor> {
    let d = f.len();
    let uf: Vec<f64> = (0..d * d).map(|k| u[k] * f[k % d]).collect();
    let u = Tensor::from_vec(u.to_vec(), (d, d), &Device::Cpu)?;
    let uf = Tensor::from_vec(uf, (d, d), &Device::Cpu)?;
    Ok(uf.matmul(&u.t()?)?.to_dtype(DType::F32)?.to_device(dev)?)
}

/// `torch.quantile` of ascending `s` at `q` (linear interpolation).
fn quantile(s: &[f64], q: f64) -> f64 {
    let pos = q * (s.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = (lo + 1).min(s.len() - 1);
    s[lo] + (s[hi] - s[lo]) * (pos - lo as f64)
}

/// `M` of the module docs for `w` `[V, d]`.
fn svd_map(w: &Tensor, cfg: &SvdConfig, dev: &Device) -> Result<Tensor> {
    let (v, d) = w.dims2()?;
    if v < d {
        return Err(config_err(
            "kind",
            format!("svd needs at least as many vocabulary rows as hidden features ({v} < {d})"),
        ));
    }
    let (lambdas, u) = gram_eigen(w)?;
    let s: Vec<f64> = lambdas.iter().map(|l| l.max(0.0).sqrt()).collect();
    if cfg.quantile >= 1.0 {
        return spectral_matrix(&u, &vec![1.0; d], dev);
    }
    let tau = quantile(&s, cfg.quantile);
    let soft: Vec<f64> = s
        .iter()
        .map(|&x| if x > 0.0 { x.max(tau) } else { 0.0 })
        .collect();
    let norm = |x: &[f64]| x.iter().map(|v| v * v).sum::<f64>().sqrt();
    let c = norm(&s) / norm(&soft);
    let scaled: Vec<f64> = soft.iter().map(|x| x * c).collect();
    spectral_matrix(&u, &scaled, dev)
}

/// The `svd` transform.
#[derive(Debug)]
pub(crate) struct Svd {
    embed: Option<Tensor>,
    head: Tensor,
    keys: Vec<String>,
}

impl Svd {
    pub(crate) fn new(cfg: &SvdConfig, site: &TransformSite<'_>) -> Result<Self> {
        let m = matrices(site, "svd")?;
        let d = m.head.dim(1)?;
        if let Some((k, w)) = site.sizes.iter().find(|(_, w)| **w != d) {
            return Err(config_err(
                "collect_hs",
                format!("svd maps hidden states of width {d}; activation {k} has width {w}"),
            ));
        }
        let head = svd_map(&m.head, cfg, site.device)?;
        let embed = if cfg.dual_svd {
            Some(svd_map(&m.embed, cfg, site.device)?)
        } else {
            None
        };
        Ok(Svd {
            embed,
            head,
            keys: site.sizes.keys().cloned().collect(),
        })
    }
}

impl ActTransform for Svd {
    fn apply(&self, maps: &[&Acts], _train: bool) -> Result<Vec<Acts>> {
        map_keys(maps, |key, h_in| {
            if !self.keys.iter().any(|k| k == key) {
                return Ok(None);
            }
            // `h - io` cancels most of `h` (the singular values scale it up): computed in f32
            // whatever the activations' dtype, then rounded once.
            let h = &h_in.to_dtype(DType::F32)?;
            let b = tokens_matmul(h, &self.head)?;
            let io = match &self.embed {
                None => b,
                Some(me) => {
                    let a = tokens_matmul(h, me)?;
                    let ab = (&a * &b)?.sum_keepdim(candle_core::D::Minus1)?;
                    let bb = b.sqr()?.sum_keepdim(candle_core::D::Minus1)?;
                    ((&a + &b)? - b.broadcast_mul(&ab.div(&bb)?)?)?
                }
            };
            Ok(Some((h - io)?.to_dtype(h_in.dtype())?))
        })
    }
    fn params(&self) -> Vec<(String, Var)> {
        vec![]
    }
}

/// The `supr` transform.
#[derive(Debug)]
pub(crate) struct Suppressed {
    /// The head's row-space projector, `None` for a full-rank head (the identity).
    projector: Option<Tensor>,
}

impl Suppressed {
    pub(crate) fn new(_cfg: &SupprConfig, site: &TransformSite<'_>) -> Result<Self> {
        if !site.hidden_states || site.sizes.keys().any(|k| k.parse::<usize>().is_err()) {
            return Err(config_err(
                "collect_hs",
                "supr works on hidden states (collect_hs = true) only".into(),
            ));
        }
        if site.sizes.len() < 2 {
            return Err(config_err(
                "collection_layers",
                "supr needs at least two collected layers (it drops the lowest)".into(),
            ));
        }
        let m = matrices(site, "supr")?;
        let (lambdas, u) = gram_eigen(&m.head)?;
        let max = lambdas.iter().cloned().fold(0.0, f64::max);
        let (v, d) = m.head.dims2()?;
        let tol = max * (v.max(d) as f64 * f64::from(f32::EPSILON)).powi(2);
        let keep: Vec<f64> = lambdas
            .iter()
            .map(|&l| f64::from(u8::from(l > tol)))
            .collect();
        let projector = if keep.iter().all(|&k| k == 1.0) {
            None
        } else {
            Some(spectral_matrix(&u, &keep, site.device)?)
        };
        Ok(Suppressed { projector })
    }

    fn one(&self, acts: &Acts) -> Result<Acts> {
        let mut keys: Vec<(usize, &String)> = acts
            .keys()
            .map(|k| {
                k.parse::<usize>()
                    .map(|i| (i, k))
                    .map_err(|_| ModelError::Invalid(format!("supr: key {k:?} is not a layer")))
            })
            .collect::<Result<_>>()?;
        keys.sort();
        let last = |k: &String| -> Result<Tensor> {
            let x = &acts[k];
            let t = x.dim(1)?;
            Ok(x.i((.., t - 1, ..))?.detach().to_dtype(DType::F32)?)
        };
        let mut out = BTreeMap::new();
        for pair in keys.windows(2) {
            let (lo, hi) = (pair[0].1, pair[1].1);
            let mut delta = (last(hi)? - last(lo)?)?;
            if let Some(p) = &self.projector {
                delta = delta.matmul(p)?;
            }
            let x = &acts[hi];
            let mask = delta.gt(0.1)?.to_dtype(x.dtype())?.unsqueeze(1)?;
            out.insert(hi.clone(), x.broadcast_mul(&mask)?);
        }
        Ok(out)
    }
}

impl ActTransform for Suppressed {
    fn apply(&self, maps: &[&Acts], _train: bool) -> Result<Vec<Acts>> {
        maps.iter().map(|m| self.one(m)).collect()
    }
    fn params(&self) -> Vec<(String, Var)> {
        vec![]
    }
}
