//! The reference's `hra` transform (`HRATransform`): per key of width `d`, a product of `r`
//! Householder reflections, applied per token as `y = x A`.
//!
//! # Formula
//! Parameter `u` `[d, r]` (`transforms.<key>.hra_u`). With `apply_GS` (default), modified
//! Gram–Schmidt over the columns in order, `w_0 = u_0 / ‖u_0‖`, `w_i = normalize(u_i` with
//! `(w_jᵀ ·) w_j` removed for `j = 0..i-1` in turn`)`, and `A = I - 2 W Wᵀ`; without it,
//! `û_i = u_i / ‖u_i‖` and `A = (I - 2 û_0 û_0ᵀ) ··· (I - 2 û_{r-1} û_{r-1}ᵀ)`. The product is
//! applied to `x` reflection by reflection (`x - 2 (x w) wᵀ`), never formed as `[d, d]`.
//!
//! Initialisation as the reference: for even `r`, `r/2` columns drawn from `U(±1/sqrt(r/2))`,
//! each repeated twice, so with `apply_GS` every second Gram–Schmidt residual is zero in exact
//! arithmetic and its normalised direction is rounding noise (or NaN, which the trainer's
//! non-finite guard then reports). The reference trains with that initialisation; so does this
//! port, for parity (its fixture test loads non-degenerate vectors). Odd `r`: all columns drawn
//! from `U(±1/sqrt(r))`.

use candle_core::{D, Tensor, Var};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use super::{ActTransform, Acts, TransformSite, map_keys, prefix, tokens_matmul, uniform_var};
use crate::error::Result;

/// The reference's `HRAConfig` (its defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, documented::DocumentedFields)]
#[serde(default, deny_unknown_fields)]
pub struct HraConfig {
    /// Number of reflections.
    pub r: usize,
    /// Orthogonalise the reflection vectors (Gram–Schmidt) first.
    #[serde(rename = "apply_GS", alias = "apply_gs")]
    pub apply_gs: bool,
}

impl Default for HraConfig {
    fn default() -> Self {
        HraConfig {
            r: 38,
            apply_gs: true,
        }
    }
}

/// The transform over every key.
#[derive(Debug)]
pub(crate) struct Hra {
    cfg: HraConfig,
    u: Vec<(String, Var)>,
}

impl Hra {
    pub(crate) fn new(cfg: &HraConfig, site: &TransformSite<'_>) -> Result<Self> {
        if cfg.r == 0 {
            return Err(crate::error::ModelError::Config {
                file: "transform".into(),
                key: "r".into(),
                problem: "HRA needs at least one reflection".into(),
            });
        }
        let mut rng = StdRng::seed_from_u64(site.seed);
        let mut u = Vec::new();
        for (key, &d) in site.sizes {
            u.push((key.clone(), init(&mut rng, d, cfg.r, site.device)?));
        }
        Ok(Hra {
            cfg: cfg.clone(),
            u,
        })
    }

    /// The unit reflection vectors `[d, r]` (columns) of one key, f32.
    fn vectors(&self, u: &Tensor) -> Result<Tensor> {
        let unit =
            |c: &Tensor| -> Result<Tensor> { Ok(c.broadcast_div(&c.sqr()?.sum_all()?.sqrt()?)?) };
        let cols: Vec<Tensor> = (0..self.cfg.r)
            .map(|i| u.narrow(1, i, 1))
            .collect::<candle_core::Result<_>>()?;
        if !self.cfg.apply_gs {
            let n = u.sqr()?.sum_keepdim(0)?.sqrt()?;
            return Ok(u.broadcast_div(&n)?);
        }
        let mut w: Vec<Tensor> = Vec::with_capacity(cols.len());
        for c in &cols {
            let mut ui = c.clone();
            for wj in &w {
                let dot = wj.t()?.matmul(&ui)?; // [1, 1]
                ui = (ui - wj.broadcast_mul(&dot)?)?;
            }
            w.push(unit(&ui)?);
        }
        Ok(Tensor::cat(&w, 1)?)
    }
}

fn init(rng: &mut StdRng, d: usize, r: usize, dev: &candle_core::Device) -> Result<Var> {
    if r % 2 == 1 {
        return uniform_var(rng, &[d, r], 1.0 / (r as f64).sqrt(), dev);
    }
    let half = uniform_var(rng, &[d, r / 2], 1.0 / ((r / 2) as f64).sqrt(), dev)?;
    let t = half.as_tensor();
    let twice = Tensor::stack(&[t, t], 2)?.reshape((d, r))?;
    Ok(Var::from_tensor(&twice)?)
}

impl ActTransform for Hra {
    fn apply(&self, maps: &[&Acts], _train: bool) -> Result<Vec<Acts>> {
        let mut vecs = std::collections::BTreeMap::new();
        for (key, u) in &self.u {
            vecs.insert(key.as_str(), self.vectors(u.as_tensor())?);
        }
        let gs = self.cfg.apply_gs;
        map_keys(maps, |key, x| {
            let Some(w) = vecs.get(key) else {
                return Ok(None);
            };
            let w = w.to_dtype(x.dtype())?;
            if gs {
                // x (I - 2 W Wᵀ) = x - 2 (x W) Wᵀ
                let xw = tokens_matmul(x, &w)?;
                return Ok(Some((x - (tokens_matmul(&xw, &w.t()?)? * 2.0)?)?));
            }
            let mut y = x.clone();
            for i in 0..w.dim(1)? {
                let c = w.narrow(1, i, 1)?; // [d, 1]
                let proj = tokens_matmul(&y, &c)?; // [..., 1]
                y = (&y - (proj.broadcast_mul(&c.squeeze(D::Minus1)?)? * 2.0)?)?;
            }
            Ok(Some(y))
        })
    }

    fn params(&self) -> Vec<(String, Var)> {
        self.u
            .iter()
            .map(|(k, v)| (format!("{}.hra_u", prefix(k)), v.clone()))
            .collect()
    }
}
