//! Orthogonal adapters as PEFT 0.21.2 computes them: BOFT, OFT and HRA. Each replaces the frozen
//! weight `W` `[out, in]` of a linear layer by an adapted weight `W'`, so `y = x W'^T`; the
//! formulas are on [`Boft`], [`Oft`] and [`Hra`]. Trainable parameters are f32 `Var`s under
//! PEFT's names (`boft_R`, `boft_s`, `oft_R.weight`, `hra_u`); the adapted weight is computed
//! in f32 (f64 for an f64 model) and cast to the model's dtype.
//!
//! Every config key of these kinds is listed by `config_keys`; values that would change the
//! maths in a way not implemented here are errors naming the key ([`validate`]).
//!
//! # BOFT butterfly factors (PEFT's CPU fallback)
//! PEFT builds BOFT layers with `boft_n_butterfly_factor > 1` only when its CUDA extension
//! `fbd_cuda` compiles; otherwise (CPU, no ninja/nvcc) it silently uses ONE factor and still
//! writes the configured number into `adapter_config.json`. Here the factor count comes from the
//! config: a file whose `boft_R` has fewer factors than the config asks for is an error (key
//! `boft_n_butterfly_factor`). [`load_adapter_boft_cpu_fallback`] is the explicit opt-in that
//! loads such a file as PEFT's CPU path computes it (one factor, no permutation), and records
//! `boft_n_butterfly_factor: 1` in the adapter's config so that it saves consistently.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value};

use crate::adapter::{AdapterHost, WeightTransform};
use crate::error::{ModelError, Result};
use crate::peft::{AdapterConfig, AdapterKind, KEY_PREFIX};

/// The config keys the orthogonal kind `peft_type` understands (besides the ones `peft.rs`
/// handles for every kind: targets, layers, and keys that are neutral at their default).
pub(crate) fn config_keys(peft_type: &str) -> Vec<&'static str> {
    match peft_type {
        "BOFT" => vec![
            "boft_block_size",
            "boft_block_num",
            "boft_n_butterfly_factor",
            "boft_dropout",
            "init_weights",
        ],
        "OFT" => vec![
            "r",
            "oft_block_size",
            "module_dropout",
            "coft",
            "eps",
            "block_share",
            "use_cayley_neumann",
            "num_cayley_neumann_terms",
            "init_weights",
        ],
        "HRA" => vec!["r", "apply_GS", "init_weights"],
        _ => vec![],
    }
}

/// How OFT turns its skew-symmetric blocks into rotations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cayley {
    /// `(I - Q)(I + Q)^-1`.
    Exact,
    /// PEFT's truncated Neumann series with this many terms (see [`Oft`]).
    Neumann(usize),
}

/// The settings of an orthogonal adapter, parsed and checked (independent of layer sizes).
#[derive(Debug, Clone, PartialEq)]
pub enum OrthSpec {
    /// BOFT: exactly one of `block_size` / `block_num` is non-zero.
    Boft {
        /// `boft_block_size` (0: derived from `block_num`).
        block_size: usize,
        /// `boft_block_num` (0: derived from `block_size`).
        block_num: usize,
        /// `boft_n_butterfly_factor` (>= 1).
        factors: usize,
        /// `boft_dropout`: in training, blocks of one random factor set to the identity.
        dropout: f64,
        /// `init_weights`: new adapters start at the identity (R = 0, s = 1).
        init_identity: bool,
    },
    /// OFT: exactly one of `r` / `block_size` is non-zero.
    Oft {
        /// `r`: number of blocks (0: derived from `block_size`).
        r: usize,
        /// `oft_block_size` (0: derived from `r`).
        block_size: usize,
        /// `use_cayley_neumann` / `num_cayley_neumann_terms`.
        cayley: Cayley,
        /// `block_share`: one set of parameters for all blocks.
        block_share: bool,
        /// `init_weights`: new adapters start at the identity (zero parameters).
        init_identity: bool,
    },
    /// HRA.
    Hra {
        /// `r`: number of Householder vectors.
        r: usize,
        /// `apply_GS`: Gram-Schmidt variant.
        gram_schmidt: bool,
        /// `init_weights`: PEFT's symmetric initialisation (pairs of equal vectors).
        init_identity: bool,
    },
}

fn cfg_err(file: &Path, key: &str, problem: impl Into<String>) -> ModelError {
    ModelError::Config {
        file: file.to_path_buf(),
        key: key.into(),
        problem: problem.into(),
    }
}

struct Keys<'a> {
    raw: &'a Map<String, Value>,
    file: &'a Path,
}

impl Keys<'_> {
    fn get(&self, k: &str) -> Option<&Value> {
        self.raw.get(k).filter(|v| !v.is_null())
    }
    fn usize(&self, k: &str, default: usize) -> Result<usize> {
        match self.get(k) {
            None => Ok(default),
            Some(v) => v
                .as_u64()
                .map(|x| x as usize)
                .ok_or_else(|| cfg_err(self.file, k, format!("{v} is not a non-negative integer"))),
        }
    }
    fn bool(&self, k: &str, default: bool) -> Result<bool> {
        match self.get(k) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| cfg_err(self.file, k, format!("{v} is not a boolean"))),
        }
    }
    fn prob(&self, k: &str) -> Result<f64> {
        match self.get(k) {
            None => Ok(0.0),
            Some(v) => match v.as_f64() {
                Some(p) if (0.0..1.0).contains(&p) => Ok(p),
                _ => Err(cfg_err(
                    self.file,
                    k,
                    format!("{v} is not a probability in [0, 1)"),
                )),
            },
        }
    }
}

/// Parse and check the kind-specific keys of `peft_type` in `raw`; `file` names the config.
pub fn parse(peft_type: &str, raw: &Map<String, Value>, file: &Path) -> Result<OrthSpec> {
    let k = Keys { raw, file };
    let init_identity = k.bool("init_weights", true)?;
    match peft_type {
        "BOFT" => {
            let block_size = k.usize("boft_block_size", 4)?;
            let block_num = k.usize("boft_block_num", 0)?;
            if (block_size == 0) == (block_num == 0) {
                return Err(cfg_err(
                    file,
                    "boft_block_size",
                    format!(
                        "exactly one of boft_block_size ({block_size}) and boft_block_num \
                         ({block_num}) must be non-zero"
                    ),
                ));
            }
            let factors = k.usize("boft_n_butterfly_factor", 1)?;
            if factors == 0 {
                return Err(cfg_err(
                    file,
                    "boft_n_butterfly_factor",
                    "must be a positive integer",
                ));
            }
            Ok(OrthSpec::Boft {
                block_size,
                block_num,
                factors,
                dropout: k.prob("boft_dropout")?,
                init_identity,
            })
        }
        "OFT" => {
            let r = k.usize("r", 0)?;
            let block_size = k.usize("oft_block_size", 32)?;
            if (r == 0) == (block_size == 0) {
                return Err(cfg_err(
                    file,
                    "oft_block_size",
                    format!(
                        "exactly one of r ({r}) and oft_block_size ({block_size}) must be non-zero"
                    ),
                ));
            }
            if k.bool("coft", false)? {
                return Err(cfg_err(
                    file,
                    "coft",
                    "constrained OFT (a projection of the parameters in every forward) is not \
                     implemented",
                ));
            }
            // eps only acts with coft; module_dropout is built but never applied to linear
            // layers by PEFT 0.21.2 (OFT's Linear.forward does not call it): no effect here either.
            if let Some(v) = k.get("eps")
                && v.as_f64().is_none()
            {
                return Err(cfg_err(file, "eps", format!("{v} is not a number")));
            }
            k.prob("module_dropout")?;
            let cayley = if k.bool("use_cayley_neumann", true)? {
                Cayley::Neumann(k.usize("num_cayley_neumann_terms", 5)?)
            } else {
                Cayley::Exact
            };
            Ok(OrthSpec::Oft {
                r,
                block_size,
                cayley,
                block_share: k.bool("block_share", false)?,
                init_identity,
            })
        }
        "HRA" => {
            let r = k.usize("r", 8)?;
            if r == 0 {
                return Err(cfg_err(file, "r", "must be a positive integer"));
            }
            Ok(OrthSpec::Hra {
                r,
                gram_schmidt: k.bool("apply_GS", false)?,
                init_identity,
            })
        }
        other => Err(cfg_err(
            file,
            "peft_type",
            format!("{other:?} is not an orthogonal adapter type"),
        )),
    }
}

/// Check the kind-specific keys of an orthogonal adapter config (`file` names it in errors).
pub fn validate(config: &AdapterConfig, file: &Path) -> Result<()> {
    match &config.kind {
        AdapterKind::Orth(raw) => parse(&config.peft_type, raw, file).map(|_| ()),
        AdapterKind::Lora { .. } | AdapterKind::Full => Ok(()),
    }
}

/// Which Python index set `block_butterfly_perm(n, b, r, n_butterfly_factor)` returns: the
/// features of each group of `n / b` are reordered in `r`-sized pieces, even pieces first.
fn butterfly_perm(
    n: usize,
    b: usize,
    r: usize,
    nbf: usize,
) -> std::result::Result<Vec<usize>, String> {
    if nbf == 0 {
        return Ok((0..n).collect());
    }
    if b == 0 || r == 0 || b * r * 2 > n || !n.is_multiple_of(b) {
        return Err(format!(
            "invalid butterfly: {b} blocks of pieces of {r} in {n} features"
        ));
    }
    let group = n / b;
    if !group.is_multiple_of(r) {
        return Err(format!(
            "group of {group} features is not a multiple of {r}"
        ));
    }
    let step = group / r;
    let seq: Vec<usize> = (0..step).step_by(2).chain((1..step).step_by(2)).collect();
    let mut order = Vec::with_capacity(group);
    for pos in seq {
        order.extend(pos * r..pos * r + r);
    }
    let mut idx = Vec::with_capacity(n);
    for g in (0..n).step_by(group) {
        idx.extend(order.iter().map(|o| g + o));
    }
    Ok(idx)
}

/// PEFT's `adjust_oft_parameters`: the divisor of `in_features` nearest to `params` (ties to the
/// lower one); `in_features` itself when `params >= in_features`.
fn adjust_oft(in_features: usize, params: usize) -> usize {
    if params >= in_features {
        return in_features;
    }
    let mut higher = params;
    while higher <= in_features && !in_features.is_multiple_of(higher) {
        higher += 1;
    }
    let mut lower = params;
    while lower > 1 && !in_features.is_multiple_of(lower) {
        lower -= 1;
    }
    if params - lower <= higher - params {
        lower
    } else {
        higher
    }
}

/// The compute dtype for the adapted weight: f64 for an f64 model, f32 otherwise.
fn compute_dtype(w: &Tensor) -> DType {
    if w.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// `W'[o, d, c] = sum_k W[o, d, k] q[d, c, k]`, i.e. `W blockdiag(q)^T`, for `w` `[out, D*b]`
/// and `q` `[D, b, b]`.
fn block_apply(w: &Tensor, q: &Tensor) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let (d, b, _) = q.dims3()?;
    if d == 1 {
        return Ok(w
            .reshape((out * inp / b, b))?
            .matmul(&q.get(0)?.t()?)?
            .reshape((out, inp))?);
    }
    let wb = w.reshape((out, d, b))?.transpose(0, 1)?.contiguous()?;
    let y = wb.matmul(&q.transpose(1, 2)?.contiguous()?)?;
    Ok(y.transpose(0, 1)?.contiguous()?.reshape((out, inp))?)
}

/// `2 (I + S)^-1 - I = (I - S)(I + S)^-1` for a batch `s` `[M, b, b]`.
fn cayley_exact(s: &Tensor) -> Result<Tensor> {
    let b = s.dim(1)?;
    let eye = Tensor::eye(b, s.dtype(), s.device())?;
    let inv = crate::linalg::inverse(&s.broadcast_add(&eye)?)?;
    Ok((inv * 2.0)?.broadcast_sub(&eye)?)
}

/// A standard normal sample (Box-Muller).
fn normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(1e-300);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

fn var_from(data: Vec<f32>, shape: &[usize], dev: &Device) -> Result<Var> {
    Ok(Var::from_tensor(&Tensor::from_vec(data, shape, dev)?)?)
}

/// BOFT (butterfly orthogonal fine-tuning).
///
/// With `boft_R` `[N, D, b, b]` and `boft_s` `[out, 1]`:
/// 1. per block, `S = (R - R^T) / 2` and `Q = (I - S)(I + S)^-1` (Cayley; computed as
///    `2 (I + S)^-1 - I`, the same matrix);
/// 2. `B_k = blockdiag(Q[k, 0..D])`;
/// 3. `M = P_{N-1} B_{N-1} P_{N-1}^T ... P_0 B_0 P_0^T` with `P_k = perm2mat(
///    block_butterfly_perm(in, D / 2^k, b / 2, N - 1))` (`P_k[i, perm[i]] = 1`; all identities
///    when N = 1, and P_0 is always the identity);
/// 4. `y = ((x M) W^T) * s[:, 0]`, i.e. `W' = diag(s) W M^T`.
///
/// The product is applied factor by factor to W's columns (a gather, a block-diagonal matmul,
/// a gather), never as a dense `[in, in]` matrix. `boft_dropout` (training only, as PEFT's
/// `MultiplicativeDropoutLayer`): one factor drawn at random has `floor(p D)` random blocks
/// replaced by the identity.
#[derive(Debug)]
pub struct Boft {
    r: Var,
    s: Var,
    /// Per factor: `(perm, inverse perm)` as U32 index tensors, `None` for the identity.
    perms: Vec<Option<(Tensor, Tensor)>>,
    dropout: f64,
    rng: Mutex<StdRng>,
}

impl Boft {
    /// The rotation blocks `Q` `[N, D, b, b]` in dtype `dt`.
    fn rotations(&self, dt: DType, train: bool) -> Result<Tensor> {
        let r = self.r.as_tensor().to_dtype(dt)?;
        let (n, d, b, _) = r.dims4()?;
        let r = r.reshape((n * d, b, b))?;
        let s = ((&r - r.transpose(1, 2)?)? * 0.5)?;
        let q = cayley_exact(&s)?.reshape((n, d, b, b))?;
        if !(train && self.dropout > 0.0) {
            return Ok(q);
        }
        let mut mask = vec![0f32; n * d];
        {
            // Seeded inside a checkpointed block, so that the recomputation draws the same blocks.
            let mut seeded = crate::checkpoint::dropout_rng();
            let mut guard;
            let rng: &mut StdRng = match seeded.as_mut() {
                Some(r) => r,
                None => {
                    guard = self.rng.lock().map_err(|_| {
                        ModelError::Invalid("BOFT dropout: RNG lock poisoned".into())
                    })?;
                    &mut guard
                }
            };
            let factor = rng.random_range(0..n);
            let k = (self.dropout * d as f64) as usize;
            let mut blocks: Vec<f32> = (0..d).map(|j| if j < k { 1.0 } else { 0.0 }).collect();
            for i in (1..d).rev() {
                let j = rng.random_range(0..=i);
                blocks.swap(i, j);
            }
            mask[factor * d..(factor + 1) * d].copy_from_slice(&blocks);
        }
        let mask = Tensor::from_vec(mask, (n, d, 1, 1), q.device())?.to_dtype(dt)?;
        let eye = Tensor::eye(b, dt, q.device())?.reshape((1, 1, b, b))?;
        let keep = mask.affine(-1.0, 1.0)?;
        Ok((q.broadcast_mul(&keep)? + eye.broadcast_mul(&mask)?)?)
    }
}

impl WeightTransform for Boft {
    fn weight(&self, w: &Tensor, train: bool) -> Result<Tensor> {
        let dt = compute_dtype(w);
        let q = self.rotations(dt, train)?;
        let mut wc = w.to_dtype(dt)?;
        for (k, perm) in self.perms.iter().enumerate() {
            if let Some((_, inv)) = perm {
                wc = wc.index_select(inv, 1)?;
            }
            wc = block_apply(&wc, &q.get(k)?)?;
            if let Some((p, _)) = perm {
                wc = wc.index_select(p, 1)?;
            }
        }
        let s = self.s.as_tensor().to_dtype(dt)?;
        Ok(wc.broadcast_mul(&s)?.to_dtype(w.dtype())?)
    }

    fn params(&self) -> Vec<(String, Var)> {
        vec![
            ("boft_R".to_string(), self.r.clone()),
            ("boft_s".to_string(), self.s.clone()),
        ]
    }
}

/// OFT (PEFT >= 0.18 parameterisation).
///
/// `oft_R.weight` `[r, b(b-1)/2]` (`[1, ...]` with `block_share`) holds, per block of `b` input
/// features, the strict upper triangle of a skew-symmetric `Q` in `torch.triu_indices(b, b, 1)`
/// (row-major) order: `Q[i, j] = v[p]`, `Q[j, i] = -v[p]`. The rotation is
/// - Cayley-Neumann with `n = num_cayley_neumann_terms` (default): `R = I + 2Q + 2Q^2 + ... +
///   2Q^(n-2) + Q^(n-1)` for n >= 4 (n = 5: `I + 2Q + 2Q^2 + 2Q^3 + Q^4`), exactly PEFT's
///   loop otherwise: n <= 1: `I`; n = 2: `I + 2Q`; n = 3: `I + 2Q + 2Q^2 + Q^3`;
/// - or the exact Cayley `R = (I - Q)(I + Q)^-1` (`use_cayley_neumann: false`).
///
/// The INPUT is rotated, `y = (x_blocks R) W^T`, i.e. `W' = W blockdiag(R)^T`.
#[derive(Debug)]
pub struct Oft {
    w: Var,
    block: usize,
    cayley: Cayley,
    /// `[b * b]` U32 indices into `[0, v, -v]` that build the skew-symmetric blocks.
    skew_idx: Tensor,
}

impl Oft {
    /// The rotation blocks `[m, b, b]` (m = number of parameter rows) in dtype `dt`.
    fn rotations(&self, dt: DType) -> Result<Tensor> {
        let v = self.w.as_tensor().to_dtype(dt)?;
        let m = v.dim(0)?;
        let b = self.block;
        let zero = Tensor::zeros((m, 1), dt, v.device())?;
        let aug = Tensor::cat(&[&zero, &v, &v.neg()?], 1)?;
        let q = aug.index_select(&self.skew_idx, 1)?.reshape((m, b, b))?;
        let eye = Tensor::eye(b, dt, v.device())?;
        Ok(match self.cayley {
            Cayley::Exact => cayley_exact(&q)?,
            Cayley::Neumann(n) => {
                let mut r = eye.broadcast_as((m, b, b))?.contiguous()?;
                if n > 1 {
                    r = (r + (&q * 2.0)?)?;
                    if n > 2 {
                        let q2 = q.matmul(&q)?;
                        r = (r + (&q2 * 2.0)?)?;
                        let mut qp = q2;
                        for _ in 3..n.saturating_sub(1) {
                            qp = qp.matmul(&q)?;
                            r = (r + (&qp * 2.0)?)?;
                        }
                        qp = qp.matmul(&q)?;
                        r = (r + qp)?;
                    }
                }
                r
            }
        })
    }
}

impl WeightTransform for Oft {
    fn weight(&self, w: &Tensor, _train: bool) -> Result<Tensor> {
        let dt = compute_dtype(w);
        let rot = self.rotations(dt)?;
        Ok(block_apply(&w.to_dtype(dt)?, &rot)?.to_dtype(w.dtype())?)
    }

    fn params(&self) -> Vec<(String, Var)> {
        vec![("oft_R.weight".to_string(), self.w.clone())]
    }
}

/// HRA (Householder reflection adaptation), with `hra_u` `[in, r]`.
///
/// - Default: `u_i = hra_u[:, i] / ||hra_u[:, i]||`, `H = (I - 2 u_0 u_0^T)(I - 2 u_1 u_1^T) ...
///   (I - 2 u_{r-1} u_{r-1}^T)`.
/// - `apply_GS`: modified Gram-Schmidt on the columns (`v_0 = u_0 / ||u_0||`; for i >= 1,
///   `u <- u - (v_j^T u) v_j` for j < i in order, then `v_i = u / ||u||`), `H = I - 2 V V^T`.
///
/// `W' = W H` (`y = x (W H)^T`), applied as rank-1 (rank-r) updates of W, never as a dense
/// `[in, in]` matrix.
#[derive(Debug)]
pub struct Hra {
    u: Var,
    gram_schmidt: bool,
}

impl WeightTransform for Hra {
    fn weight(&self, w: &Tensor, _train: bool) -> Result<Tensor> {
        let dt = compute_dtype(w);
        let u = self.u.as_tensor().to_dtype(dt)?;
        let r = u.dim(1)?;
        let mut wc = w.to_dtype(dt)?;
        if self.gram_schmidt {
            let mut cols: Vec<Tensor> = Vec::with_capacity(r);
            for i in 0..r {
                let mut ui = u.narrow(1, i, 1)?.contiguous()?;
                for c in &cols {
                    let proj = c.t()?.matmul(&ui)?;
                    ui = (ui - c.broadcast_mul(&proj)?)?;
                }
                let norm = ui.sqr()?.sum_all()?.sqrt()?;
                cols.push(ui.broadcast_div(&norm)?);
            }
            let v = Tensor::cat(&cols, 1)?;
            wc = (&wc - (wc.matmul(&v)?.matmul(&v.t()?)? * 2.0)?)?;
        } else {
            let norms = u.sqr()?.sum_keepdim(0)?.sqrt()?;
            let un = u.broadcast_div(&norms)?;
            for i in 0..r {
                let ui = un.narrow(1, i, 1)?.contiguous()?;
                wc = (&wc - (wc.matmul(&ui)?.matmul(&ui.t()?)? * 2.0)?)?;
            }
        }
        Ok(wc.to_dtype(w.dtype())?)
    }

    fn params(&self) -> Vec<(String, Var)> {
        vec![("hra_u".to_string(), self.u.clone())]
    }
}

/// `peft_version` as (major, minor), when the config has a parsable one.
fn peft_version(raw: &Map<String, Value>) -> Option<(u64, u64)> {
    let v = raw.get("peft_version")?.as_str()?;
    let v = v.split('@').next()?;
    let mut it = v.split('.');
    let major = it.next()?.parse().ok()?;
    let minor = it
        .next()?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .ok()?;
    Some((major, minor))
}

/// Build the module adapter for one linear layer `[out, inp]` at `module` (its path): from the
/// PEFT state dict `weights` (keys `base_model.model.<module>.<suffix>`; `used` counts the
/// tensors taken), or new as PEFT initialises it.
#[allow(clippy::too_many_arguments)]
pub fn build(
    config: &AdapterConfig,
    module: &str,
    out: usize,
    inp: usize,
    weights: Option<(&HashMap<String, Tensor>, &Path)>,
    rng: &mut StdRng,
    dev: &Device,
    used: &mut usize,
) -> Result<Arc<dyn WeightTransform>> {
    let AdapterKind::Orth(raw) = &config.kind else {
        return Err(ModelError::Invalid(format!(
            "{}: not an orthogonal adapter config",
            config.peft_type
        )));
    };
    let cfg_file: PathBuf = match weights {
        Some((_, f)) => f.with_file_name("adapter_config.json"),
        None => PathBuf::from("(adapter config)"),
    };
    let cfg_file = cfg_file.as_path();
    let spec = parse(&config.peft_type, raw, cfg_file)?;
    let key = |suffix: &str| format!("{KEY_PREFIX}{module}.{suffix}");
    // Take a tensor from the state dict, checking its shape.
    let mut fetch = |suffix: &str, shape: &[usize]| -> Result<Option<Var>> {
        let Some((w, file)) = weights else {
            return Ok(None);
        };
        let v = crate::peft::trainable_from(w, file, &key(suffix), shape, dev)?;
        *used += 1;
        Ok(Some(v))
    };
    match spec {
        OrthSpec::Boft {
            block_size,
            block_num,
            factors,
            dropout,
            init_identity,
        } => {
            // PEFT's CPU fallback writes fewer factors than its config says: a clear error (before
            // the geometry checks, which depend on the factor count).
            if let Some((w, file)) = weights
                && let Some(t) = w.get(&key("boft_R"))
                && let [n_file, _, _, _] = t.dims()
                && *n_file < factors
            {
                return Err(cfg_err(
                    cfg_file,
                    "boft_n_butterfly_factor",
                    format!(
                        "the config asks for {factors} butterfly factors but {} has {n_file} in \
                         `{}` {:?}. PEFT without its CUDA extension fbd_cuda (e.g. on CPU) \
                         silently trains and saves 1 factor while writing the configured number \
                         into adapter_config.json. Load it with \
                         orth::load_adapter_boft_cpu_fallback to get what PEFT's CPU path \
                         computes, or set boft_n_butterfly_factor to {n_file}",
                        file.display(),
                        key("boft_R"),
                        t.dims()
                    ),
                ));
            }
            let nbf = factors - 1;
            let layer_err = |key: &str, p: String| cfg_err(cfg_file, key, format!("{module}: {p}"));
            let (bs, bn) = if block_size == 0 {
                if !inp.is_multiple_of(block_num) {
                    return Err(layer_err(
                        "boft_block_num",
                        format!("in_features {inp} is not divisible by boft_block_num {block_num}"),
                    ));
                }
                if nbf != 0
                    && (nbf > block_num.ilog2() as usize || !block_num.is_multiple_of(1 << nbf))
                {
                    return Err(layer_err(
                        "boft_n_butterfly_factor",
                        format!(
                            "{factors} factors need boft_block_num ({block_num}) to be a multiple of 2^{nbf}"
                        ),
                    ));
                }
                (inp / block_num, block_num)
            } else {
                if !inp.is_multiple_of(block_size) {
                    return Err(layer_err(
                        "boft_block_size",
                        format!(
                            "in_features {inp} is not divisible by boft_block_size {block_size}"
                        ),
                    ));
                }
                if nbf != 0 && !inp.is_multiple_of(block_size << nbf) {
                    return Err(layer_err(
                        "boft_n_butterfly_factor",
                        format!(
                            "{factors} factors need in_features ({inp}) to be a multiple of \
                             boft_block_size * 2^{nbf} = {}",
                            block_size << nbf
                        ),
                    ));
                }
                (block_size, inp / block_size)
            };
            if nbf != 0 && (!bn.is_multiple_of(2) || !bs.is_multiple_of(2)) {
                return Err(layer_err(
                    "boft_n_butterfly_factor",
                    format!("butterfly factors need an even block number ({bn}) and size ({bs})"),
                ));
            }
            let mut perms = Vec::with_capacity(factors);
            for i in 0..factors {
                let p = butterfly_perm(inp, bn >> i, bs / 2, nbf)
                    .map_err(|e| layer_err("boft_n_butterfly_factor", e))?;
                if p.iter().enumerate().all(|(j, &v)| j == v) {
                    perms.push(None);
                    continue;
                }
                let mut inv = vec![0u32; inp];
                for (j, &v) in p.iter().enumerate() {
                    inv[v] = j as u32;
                }
                let p: Vec<u32> = p.into_iter().map(|v| v as u32).collect();
                perms.push(Some((
                    Tensor::from_vec(p, inp, dev)?,
                    Tensor::from_vec(inv, inp, dev)?,
                )));
            }
            let r = match fetch("boft_R", &[factors, bn, bs, bs])? {
                Some(v) => v,
                None => {
                    let n = factors * bn * bs * bs;
                    let data = if init_identity {
                        vec![0f32; n]
                    } else {
                        (0..n).map(|_| (0.1 * normal(rng)) as f32).collect()
                    };
                    var_from(data, &[factors, bn, bs, bs], dev)?
                }
            };
            let s = match fetch("boft_s", &[out, 1])? {
                Some(v) => v,
                None => {
                    let data = if init_identity {
                        vec![1f32; out]
                    } else {
                        (0..out).map(|_| (1.0 + 0.1 * normal(rng)) as f32).collect()
                    };
                    var_from(data, &[out, 1], dev)?
                }
            };
            Ok(Arc::new(Boft {
                r,
                s,
                perms,
                dropout,
                rng: Mutex::new(StdRng::seed_from_u64(rng.random())),
            }))
        }
        OrthSpec::Oft {
            r,
            block_size,
            cayley,
            block_share,
            init_identity,
        } => {
            if weights.is_some() {
                if !raw.contains_key("oft_block_size") {
                    return Err(cfg_err(
                        cfg_file,
                        "oft_block_size",
                        "missing: OFT adapters written before PEFT 0.14 use another format",
                    ));
                }
                if matches!(cayley, Cayley::Neumann(_))
                    && let Some((major, minor)) = peft_version(raw)
                    && (major, minor) < (0, 18)
                {
                    return Err(cfg_err(
                        cfg_file,
                        "use_cayley_neumann",
                        "written by PEFT < 0.18, whose Cayley-Neumann series differs from the \
                         one implemented here (PEFT >= 0.18)",
                    ));
                }
            }
            // PEFT's update_layer: the other size from the given one, adjusted to a divisor.
            let (blocks, b) = if r == 0 {
                let bs = if !inp.is_multiple_of(block_size) || block_size > inp {
                    adjust_oft(inp, block_size)
                } else {
                    block_size
                };
                (inp / bs, bs)
            } else {
                let r = if !inp.is_multiple_of(r) || r > inp {
                    adjust_oft(inp, r)
                } else {
                    r
                };
                (r, inp / r)
            };
            let n_el = b * (b - 1) / 2;
            let rows = if block_share { 1 } else { blocks };
            let w = match fetch("oft_R.weight", &[rows, n_el])? {
                Some(v) => v,
                None => {
                    let n = rows * n_el;
                    let data = if init_identity {
                        vec![0f32; n]
                    } else {
                        (0..n).map(|_| (0.1 * normal(rng)) as f32).collect()
                    };
                    var_from(data, &[rows, n_el], dev)?
                }
            };
            let mut idx = vec![0u32; b * b];
            let mut p = 0u32;
            for i in 0..b {
                for j in i + 1..b {
                    idx[i * b + j] = 1 + p;
                    idx[j * b + i] = 1 + n_el as u32 + p;
                    p += 1;
                }
            }
            Ok(Arc::new(Oft {
                w,
                block: b,
                cayley,
                skew_idx: Tensor::from_vec(idx, b * b, dev)?,
            }))
        }
        OrthSpec::Hra {
            r,
            gram_schmidt,
            init_identity,
        } => {
            let u = match fetch("hra_u", &[inp, r])? {
                Some(v) => v,
                None => {
                    if gram_schmidt && init_identity {
                        return Err(cfg_err(
                            cfg_file,
                            "apply_GS",
                            "a new HRA adapter with apply_GS and init_weights true is not \
                             supported: PEFT's initialisation repeats each vector twice, so \
                             Gram-Schmidt normalises round-off and H is not even orthogonal \
                             (PEFT 0.21.2: |H H^T - I| = 0.45 on a 64-wide layer); use \
                             init_weights false (random vectors; H = I - 2 V V^T is then a \
                             proper reflection, but never the identity)",
                        ));
                    }
                    // kaiming_uniform_(a = sqrt(5)) on [in, c]: bound 1 / sqrt(c) (torch's
                    // fan_in of a 2-D tensor is its column count).
                    let mut kaiming = |cols: usize| -> Vec<f32> {
                        let bound = 1.0 / (cols as f64).sqrt();
                        (0..inp * cols)
                            .map(|_| rng.random_range(-bound..bound) as f32)
                            .collect()
                    };
                    let data = if init_identity && r.is_multiple_of(2) {
                        // Pairs of equal columns: each pair of reflections cancels, H = I.
                        let half = kaiming(r / 2);
                        let mut full = vec![0f32; inp * r];
                        for i in 0..inp {
                            for j in 0..r {
                                full[i * r + j] = half[i * (r / 2) + j / 2];
                            }
                        }
                        full
                    } else {
                        kaiming(r)
                    };
                    var_from(data, &[inp, r], dev)?
                }
            };
            Ok(Arc::new(Hra { u, gram_schmidt }))
        }
    }
}

/// Load a PEFT adapter folder like [`crate::peft::load_adapter`], except that a BOFT adapter
/// saved by PEFT's CPU fallback (every `boft_R` with 1 factor while the config says more) is
/// loaded as PEFT's CPU path computes it: one factor, no butterfly permutation. The adapter's
/// config then says `boft_n_butterfly_factor: 1`, so it saves as what it is. Anything else
/// loads exactly as with `load_adapter`.
pub fn load_adapter_boft_cpu_fallback(
    host: &mut dyn AdapterHost,
    dir: &Path,
    name: &str,
) -> Result<usize> {
    let mut config = AdapterConfig::load(dir)?;
    let file = dir.join("adapter_model.safetensors");
    let dev = host
        .linears()
        .first()
        .map(|l| l.device().clone())
        .unwrap_or(Device::Cpu);
    let weights = candle_core::safetensors::load(&file, &dev).map_err(|e| ModelError::Format {
        file: file.clone(),
        problem: e.to_string(),
    })?;
    if config.peft_type == "BOFT" {
        let cfg_file = dir.join("adapter_config.json");
        if let OrthSpec::Boft { factors, .. } = parse("BOFT", &config.raw, &cfg_file)? {
            let file_factors: Vec<usize> = weights
                .iter()
                .filter(|(k, _)| k.ends_with(".boft_R"))
                .filter_map(|(_, t)| t.dims().first().copied())
                .collect();
            if factors > 1 && !file_factors.is_empty() && file_factors.iter().all(|&n| n == 1) {
                let one = Value::from(1);
                config
                    .raw
                    .insert("boft_n_butterfly_factor".into(), one.clone());
                if let AdapterKind::Orth(m) = &mut config.kind {
                    m.insert("boft_n_butterfly_factor".into(), one);
                }
            }
        }
    }
    crate::peft::add_adapter(host, name, config, Some((&weights, &file)), 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn butterfly_permutations_are_peft_s() {
        // README: P_0 is the identity; P_1 reorders the 2-element halves of each group of 8 in
        // the order [0, 2, 1, 3].
        assert_eq!(
            butterfly_perm(16, 4, 2, 1).unwrap(),
            (0..16).collect::<Vec<_>>()
        );
        assert_eq!(
            butterfly_perm(16, 2, 2, 1).unwrap(),
            vec![0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
        );
        assert_eq!(
            butterfly_perm(8, 2, 1, 0).unwrap(),
            (0..8).collect::<Vec<_>>()
        );
        assert!(butterfly_perm(8, 4, 2, 1).is_err());
    }

    /// PEFT 0.21.2's Cayley-Neumann loop, checked there for these n: n <= 1: I; n = 2: I + 2Q;
    /// n = 3 and n = 4: I + 2Q + 2Q^2 + Q^3; n >= 5: I + 2(Q + ... + Q^(n-2)) + Q^(n-1).
    #[test]
    fn neumann_series_is_peft_s() {
        let dev = Device::Cpu;
        let b = 4;
        let v = Tensor::new(&[[0.3f32, -0.2, 0.1, 0.25, -0.15, 0.05]], &dev).unwrap();
        let mut idx = vec![0u32; b * b];
        let mut p = 0u32;
        for i in 0..b {
            for j in i + 1..b {
                idx[i * b + j] = 1 + p;
                idx[j * b + i] = 7 + p;
                p += 1;
            }
        }
        let skew_idx = Tensor::from_vec(idx, b * b, &dev).unwrap();
        let q = Tensor::new(
            &[
                [0.0f32, 0.3, -0.2, 0.1],
                [-0.3, 0.0, 0.25, -0.15],
                [0.2, -0.25, 0.0, 0.05],
                [-0.1, 0.15, -0.05, 0.0],
            ],
            &dev,
        )
        .unwrap();
        let eye = Tensor::eye(b, DType::F32, &dev).unwrap();
        let pow = |k: usize| {
            let mut r = eye.clone();
            for _ in 0..k {
                r = r.matmul(&q).unwrap();
            }
            r
        };
        let series = |twos: usize, last: Option<usize>| {
            let mut r = eye.clone();
            for k in 1..=twos {
                r = (r + (pow(k) * 2.0).unwrap()).unwrap();
            }
            if let Some(k) = last {
                r = (r + pow(k)).unwrap();
            }
            r
        };
        let want = [
            (0, series(0, None)),
            (1, series(0, None)),
            (2, series(1, None)),
            (3, series(2, Some(3))),
            (4, series(2, Some(3))),
            (5, series(3, Some(4))),
            (7, series(5, Some(6))),
        ];
        for (n, w) in want {
            let oft = Oft {
                w: Var::from_tensor(&v).unwrap(),
                block: b,
                cayley: Cayley::Neumann(n),
                skew_idx: skew_idx.clone(),
            };
            let r = oft.rotations(DType::F32).unwrap().get(0).unwrap();
            let d: f32 = (r - &w)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(d < 1e-6, "n = {n}: {d}");
        }
    }

    #[test]
    fn oft_size_adjustment_is_peft_s() {
        assert_eq!(adjust_oft(64, 8), 8);
        assert_eq!(adjust_oft(96, 7), 6);
        assert_eq!(adjust_oft(100, 30), 25);
        assert_eq!(adjust_oft(64, 100), 64);
    }

    #[test]
    fn peft_versions_parse() {
        let m = |v: &str| {
            let mut m = Map::new();
            m.insert("peft_version".into(), Value::from(v));
            peft_version(&m)
        };
        assert_eq!(m("0.21.2"), Some((0, 21)));
        assert_eq!(m("0.17.1.dev0@abc"), Some((0, 17)));
        assert_eq!(m("0.18rc1"), Some((0, 18)));
        assert_eq!(m("x"), None);
    }
}
