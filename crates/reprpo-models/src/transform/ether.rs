//! The reference's `ether` transform (`ETHERLinearSmall`): per key of width `d`, a rank-`f`
//! bottleneck `d -> f -> d` (`f = ⌊d / reduction⌋`) whose down-projection is a fixed random
//! matrix rotated by trainable block reflections. Not an orthogonal map on `d`.
//!
//! # Formula
//! Parameters per key (`nb` blocks, `n = d / nb`): `W` `[f, d]` (`transforms.<key>.linear.weight`,
//! constant: the reference reads its `.data`), `U` `[d, f]` (`linear_up.weight`, trained) and the
//! blocks' vectors, by `Htype`:
//! - `ether`: `R` `[nb, n]`; `H_r = I - 2 R_rᵀ R_r / (R_r R_rᵀ)` (a reflection; not the identity at
//!   initialisation);
//! - `etherplus`: `R, R2` `[nb, n]` (`R2 = -R` initially); `H_r = I - R_rᵀR_r/‖R_r‖² +
//!   R2_rᵀR2_r/‖R2_r‖²` (the identity initially);
//! - `oft`: `R` `[nb, n, n]` (zeros initially); `S = (R - Rᵀ)/2`, `H_r = (I + S)(I - S)^-1`;
//! - `etherplusHH`: `H` from `(R, R2)` as `etherplus`, and `H2` from `(R3, R4)` `[nb, f/nb]`.
//!
//! The adapted down-projection `W̃` uses the reference's raw row-major reshapes: (1) unless
//! `flip_side`, view `W`'s buffer as `nb` consecutive `[f, n]` chunks `P_r` and set `P_r H_r`;
//! (2) with `flip_side` (blocks then sized by `f`) or `etherplusHH`, view the buffer as `nb`
//! chunks `[f/nb, d]` `S_r` and set `H_r S_r` (`H2_r S_r` for HH). Per token:
//! `y = dropout(x) W̃ᵀ Uᵀ`. `H` and `W̃` are built in f32 from the f32 parameters and cast to the
//! activations' dtype for the product (the reference builds some of them in f32 under autocast).

use std::collections::BTreeMap;

use candle_core::{D, DType, Tensor, Var};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use super::{ActTransform, Acts, TransformSite, map_keys, prefix, tokens_matmul, uniform_var};
use crate::error::{ModelError, Result};

/// The reference's `ETHERConfig` (its defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, documented::DocumentedFields)]
#[serde(default, deny_unknown_fields)]
pub struct EtherConfig {
    /// Number of diagonal blocks.
    pub nb: usize,
    /// `ether`, `etherplus`, `oft` or `etherplusHH`.
    #[serde(rename = "Htype", alias = "htype")]
    pub htype: String,
    /// Dropout on the input of the bottleneck (training only).
    pub ether_dropout: f64,
    /// Apply the blocks on the `f` side instead of the `d` side (ignored by `etherplusHH`).
    pub flip_side: bool,
    /// `f = ⌊d / reduction⌋`.
    pub reduction: usize,
}

impl Default for EtherConfig {
    fn default() -> Self {
        EtherConfig {
            nb: 2,
            htype: "ether".into(),
            ether_dropout: 0.0,
            flip_side: false,
            reduction: 60,
        }
    }
}

/// One key's parameters.
#[derive(Debug)]
struct Block {
    key: String,
    w: Var,
    up: Var,
    r: Vec<(String, Var)>,
}

/// The transform over every key.
#[derive(Debug)]
pub(crate) struct Ether {
    cfg: EtherConfig,
    hh: bool,
    flip: bool,
    blocks: Vec<Block>,
}

fn bad(key: &str, problem: String) -> ModelError {
    ModelError::Config {
        file: "transform".into(),
        key: key.into(),
        problem,
    }
}

impl Ether {
    pub(crate) fn new(cfg: &EtherConfig, site: &TransformSite<'_>) -> Result<Self> {
        let hh = cfg.htype == "etherplusHH";
        if !matches!(
            cfg.htype.as_str(),
            "ether" | "etherplus" | "oft" | "etherplusHH"
        ) {
            return Err(bad(
                "Htype",
                format!(
                    "{:?}: expected ether, etherplus, oft or etherplusHH",
                    cfg.htype
                ),
            ));
        }
        if cfg.nb == 0 || cfg.reduction == 0 {
            return Err(bad("nb", "nb and reduction must be at least 1".into()));
        }
        let flip = cfg.flip_side && !hh;
        let mut rng = StdRng::seed_from_u64(site.seed);
        let mut blocks = Vec::new();
        for (key, &d) in site.sizes {
            let f = d / cfg.reduction;
            let side = if flip { f } else { d };
            let divides = |x: usize| x.is_multiple_of(cfg.nb);
            if f == 0 || !divides(d) || !divides(side) || (hh && !divides(f)) {
                return Err(bad(
                    if f == 0 { "reduction" } else { "nb" },
                    format!(
                        "activation {key} has width {d}: ETHER needs nb = {} to divide {d}{}, and \
                         ⌊{d} / reduction {}⌋ = {f} to be at least 1",
                        cfg.nb,
                        if hh || flip {
                            format!(" and {f}")
                        } else {
                            String::new()
                        },
                        cfg.reduction
                    ),
                ));
            }
            let dev = site.device;
            let w = uniform_var(&mut rng, &[f, d], 1.0 / (d as f64).sqrt(), dev)?;
            let up = uniform_var(&mut rng, &[d, f], 1.0 / (f as f64).sqrt(), dev)?;
            let r = block_params(cfg, side / cfg.nb, f / cfg.nb, &mut rng, dev)?;
            blocks.push(Block {
                key: key.clone(),
                w,
                up,
                r,
            });
        }
        Ok(Ether {
            cfg: cfg.clone(),
            hh,
            flip,
            blocks,
        })
    }

    /// `W̃` `[f, d]` of one key (f32).
    fn weight(&self, b: &Block) -> Result<Tensor> {
        let nb = self.cfg.nb;
        let w = b.w.as_tensor().detach();
        let (f, d) = w.dims2()?;
        let r = |i: usize| b.r[i].1.as_tensor();
        let h = match self.cfg.htype.as_str() {
            "ether" => reflection(r(0))?,
            "oft" => cayley(r(0))?,
            _ => etherplus(r(0), r(1))?,
        };
        let mut w = w;
        if !self.flip {
            w = w.reshape((nb, f, d / nb))?.matmul(&h)?.reshape((f, d))?;
        }
        if self.flip || self.hh {
            let h2 = if self.hh { etherplus(r(2), r(3))? } else { h };
            w = h2.matmul(&w.reshape((nb, f / nb, d))?)?.reshape((f, d))?;
        }
        Ok(w)
    }
}

/// The block vectors of the configuration's `Htype`, with the reference's initialisation.
fn block_params(
    cfg: &EtherConfig,
    n: usize,
    n2: usize,
    rng: &mut StdRng,
    dev: &candle_core::Device,
) -> Result<Vec<(String, Var)>> {
    let nb = cfg.nb;
    let mut pair = |name: &str, name2: &str, n: usize| -> Result<Vec<(String, Var)>> {
        let a = uniform_var(rng, &[nb, n], 1.0 / (n as f64).sqrt(), dev)?;
        let b = Var::from_tensor(&a.as_tensor().neg()?)?;
        Ok(vec![(name.into(), a), (name2.into(), b)])
    };
    Ok(match cfg.htype.as_str() {
        "ether" => {
            let a = uniform_var(rng, &[nb, n], 1.0 / (n as f64).sqrt(), dev)?;
            vec![("ether_R".into(), a)]
        }
        "oft" => vec![(
            "ether_R".into(),
            Var::from_tensor(&Tensor::zeros((nb, n, n), DType::F32, dev)?)?,
        )],
        "etherplus" => pair("ether_R", "ether_R2", n)?,
        _ => {
            let mut v = pair("ether_R", "ether_R2", n)?;
            v.extend(pair("ether_R3", "ether_R4", n2)?);
            v
        }
    })
}

/// `R_rᵀ R_r / (R_r R_rᵀ)` per block, `[nb, n, n]`.
fn outer_unit(r: &Tensor) -> Result<Tensor> {
    let r3 = r.unsqueeze(1)?; // [nb, 1, n]
    let outer = r3.transpose(1, 2)?.matmul(&r3)?;
    let sq = r3.sqr()?.sum_keepdim(D::Minus1)?; // [nb, 1, 1]
    Ok(outer.broadcast_div(&sq)?)
}

fn eye_like(r: &Tensor) -> Result<Tensor> {
    let n = r.dim(D::Minus1)?;
    Ok(Tensor::eye(n, r.dtype(), r.device())?.unsqueeze(0)?)
}

fn reflection(r: &Tensor) -> Result<Tensor> {
    Ok(eye_like(r)?.broadcast_sub(&(outer_unit(r)? * 2.0)?)?)
}

fn etherplus(r1: &Tensor, r2: &Tensor) -> Result<Tensor> {
    Ok(eye_like(r1)?
        .broadcast_sub(&outer_unit(r1)?)?
        .add(&outer_unit(r2)?)?)
}

fn cayley(r: &Tensor) -> Result<Tensor> {
    let s = ((r - r.transpose(1, 2)?)? * 0.5)?;
    let eye = eye_like(r)?;
    let inv = crate::linalg::inverse(&eye.broadcast_sub(&s)?)?;
    Ok(eye.broadcast_add(&s)?.matmul(&inv)?)
}

impl ActTransform for Ether {
    fn apply(&self, maps: &[&Acts], train: bool) -> Result<Vec<Acts>> {
        let mut weights = BTreeMap::new();
        for b in &self.blocks {
            weights.insert(
                b.key.as_str(),
                (self.weight(b)?.t()?, b.up.as_tensor().t()?),
            );
        }
        map_keys(maps, |key, x| {
            let Some((wt, upt)) = weights.get(key) else {
                return Ok(None);
            };
            let x = if train && self.cfg.ether_dropout > 0.0 {
                crate::adapter::dropout(x, self.cfg.ether_dropout)?
            } else {
                x.clone()
            };
            Ok(Some(tokens_matmul(&tokens_matmul(&x, wt)?, upt)?))
        })
    }

    fn params(&self) -> Vec<(String, Var)> {
        let mut v = Vec::new();
        for b in &self.blocks {
            let p = prefix(&b.key);
            for (n, r) in &b.r {
                v.push((format!("{p}.{n}"), r.clone()));
            }
            v.push((format!("{p}.linear_up.weight"), b.up.clone()));
        }
        v
    }

    fn buffers(&self) -> Vec<(String, Var)> {
        self.blocks
            .iter()
            .map(|b| (format!("{}.linear.weight", prefix(&b.key)), b.w.clone()))
            .collect()
    }
}
