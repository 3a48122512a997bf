//! The gradient interventions of the reference ReprPO project
//! (`wassname/repr-preference-optimization` at bd9ae63, `projgrad` and `projbp`): DPO whose
//! gradient is projected onto, and clipped along, a preference direction read from the outputs of
//! the adapted linear layers. This file holds the tensor side, device-agnostic (composed candle
//! ops, nothing read back): the directions, the `projgrad` rewrite of a parameter's gradient, and
//! the `projbp` rewrite of the gradient at a module output with the hook that applies it in the
//! backward pass. The training side (four forwards, DPO, when the rewrites run) is
//! `reprpo_train::gradproj`.
//!
//! # Hooked modules
//! The linear layers whose active adapter has trainable parameters ([`hooked_modules`]; the
//! reference's `enabled_modules`: PEFT tuner layers with a parameter that requires grad). Their
//! outputs `a [B, T, H]` (base + adapter delta; the base alone in a reference forward) are read as
//! taps (`collect::Tap::output`).
//!
//! # Directions
//! Per hooked module, from the outputs of a chosen forward `a_c` and a rejected one `a_r` with
//! their attention masks `m_c`, `m_r` `[B, T]` ([`preference_dirs`]):
//! - pooled outputs ([`pooled`]), by [`Pooling`]:
//!   - [`Pooling::FirstExample`], the reference's behaviour: `Ā[b] = Σ_t m[b,t] a[0,t] / Σ_t m[b,t]`.
//!     Only example 0's activation is used, averaged under *each* example's mask (its forward hook
//!     stores the `[B, T, H]` output as a tuple of its B rows and its consumers take element 0);
//!   - [`Pooling::PerExample`], what the code intends: `Ā[b] = Σ_t m[b,t] a[b,t] / Σ_t m[b,t]`.
//!
//!   No epsilon: a row without a real token gives NaN, as in the reference.
//! - `v[b] = Ā_c[b] − Ā_r[b]`, negated with `reverse_pref`.
//!
//! # `projgrad` ([`projgrad`]), after the backward pass, per parameter gradient `G`
//! `v̄ = mean_b v[b]` `[H]`, `u = v̄ / max(‖v̄‖, ε)`, `ε = 1e-12`. The axis is found by shape, as
//! the reference does ([`WeightDim`]): the first axis when `G.dim(0) = H` and `weight_dim ∈ {0, 2}`,
//! else the last when `G.dim(1) = H` and `weight_dim ∈ {1, 2}`, else `G` is left alone. With
//! `X = G` (last axis) or `X = Gᵀ` (first axis), `X` `[o, H]`:
//! 1. `mag_clip = c`: `r_h = max(1, mean_o X[o,h] / (max(v̄_h, ε) c))`, `X ← X / r` (per column,
//!    elementwise against the signed, non-unit `v̄`: negative components give `r ≈ 1e12`);
//! 2. `P = (X u) uᵀ`, `O = X − P`;
//! 3. `s_o = max(‖O_o‖, ε) / max(‖P_o‖, ε)` per row with `scale_orth`, else 1;
//! 4. `X' = leaky_relu(P, neg_slope) + β O / s` (elementwise on the projected vector's components).
//!
//! Metrics: `proj_frac = ‖relu(P)‖_F / ‖X‖_F`, `nproj_frac = ‖relu(−P)‖_F / ‖X‖_F` (`X` after 1).
//!
//! The match is by shape coincidence: the direction lives in the module's output space, but with
//! `weight_dim = 1` it is applied to LoRA A's *input* axis whenever `in = out` (Llama q_proj). The
//! reference also keeps a transposed `u` for the later parameters of a module after a first-axis
//! match; that only matters when the rank equals the output width and is not reproduced (each
//! gradient is matched on its own).
//!
//! # `projbp` ([`projbp`]), in the backward pass, on the gradient `g` `[B, T, H]` at a module output
//! `u_b = v_b / max(‖v_b‖, ε)`:
//! 1. `mag_clip = c`: `r_b = max(1, ‖mean_t g[b]‖ / (max(‖v_b‖, ε) c))`, `g ← g / r_b`;
//! 2. per token `P = (g·u_b) u_b`, `O = g − P`;
//! 3. `s = max(‖O‖, ε) / max(‖P‖, ε)` per token with `scale_orth`, else 1;
//! 4. `g₂ = leaky_relu(P, neg_slope) + β O s` (projbp **multiplies** by `s`; projgrad divides);
//! 5. `g₂ ← g₂ max(‖g‖_F, ε) / max(‖g₂‖_F, ε)` over the whole `[B, T, H]` (`g` after 1).
//!
//! The rewritten gradient flows into the adapter and, through the base weight, to every earlier
//! layer. [`GradHooks`] carries the directions: a forward whose [`ForwardSpec::grad_hooks`] is set
//! hands it to every linear layer through `adapter::Ctx`, and `adapter::Linear::forward` of a
//! hooked module wraps its output in an identity op whose backward is the rewrite (checkpointed
//! blocks take the hooks into their recomputation). It fires once per forward that reached the
//! module, as the reference's backward pre-hook.
//!
//! Neither rewrite depends on the sign of `u` (`P` is quadratic in it), so `reverse_pref` changes
//! nothing but projgrad's `mag_clip`, which reads the signed `v̄`.
//!
//! [`ForwardSpec::grad_hooks`]: crate::ForwardSpec::grad_hooks

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{CpuStorage, CustomOp1, D, DType, IndexOp, Layout, Shape, Tensor};

use crate::adapter::{AdapterHost, Ctx};
use crate::error::{ModelError, Result};

/// The clamp of norms and of direction components (the reference's `eps`).
pub(crate) const EPS: f64 = 1e-12;

/// How a module's outputs are pooled over tokens before the direction is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pooling {
    /// The reference's behaviour: example 0's output under each example's mask.
    #[default]
    FirstExample,
    /// Each example's own output under its mask.
    PerExample,
}

/// Which gradient axis projgrad matches against the direction's width (the reference's
/// `weight_dim`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightDim {
    /// `0`: the first axis (`G.dim(0) = H`).
    First,
    /// `1`: the last axis (`G.dim(1) = H`), the reference's default.
    Last,
    /// `2`: the first axis if it matches, else the last.
    Both,
}

impl WeightDim {
    /// From the reference's integer (0, 1, 2).
    pub fn from_index(i: u8) -> Option<Self> {
        match i {
            0 => Some(WeightDim::First),
            1 => Some(WeightDim::Last),
            2 => Some(WeightDim::Both),
            _ => None,
        }
    }
}

/// The switches both rewrites share (the module docs give the formulas).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rewrite {
    /// `β`: the multiplier of the orthogonal part.
    pub beta: f64,
    /// Rescale the orthogonal part by `‖O‖ / ‖P‖` (projgrad divides by it, projbp multiplies).
    pub scale_orth: bool,
    /// Slope of the leaky ReLU on the projected part's components (0: ReLU).
    pub neg_slope: f64,
    /// Clip the gradient's magnitude against the direction's (`None`: off).
    pub mag_clip: Option<f64>,
}

/// `[B, H]` f32: each example's pooled output `Ā[b]` (see [`Pooling`]), from `out` `[B, T, H]`
/// and `mask` `[B, T]` (0/1, any dtype). Detached.
pub fn pooled(out: &Tensor, mask: &Tensor, pooling: Pooling) -> Result<Tensor> {
    let (b, t, _) = out.dims3()?;
    if mask.dims() != [b, t] {
        return Err(ModelError::Invalid(format!(
            "gradproj: mask {:?} does not fit outputs {:?}",
            mask.dims(),
            out.dims()
        )));
    }
    let a = out.detach().to_dtype(DType::F32)?;
    let m = mask.detach().to_dtype(DType::F32)?;
    let total = m.sum_keepdim(D::Minus1)?;
    let sum = match pooling {
        // [B, T] x [T, H]: every example's mask over example 0's tokens.
        Pooling::FirstExample => m.matmul(&a.i(0)?.contiguous()?)?,
        Pooling::PerExample => a.broadcast_mul(&m.unsqueeze(D::Minus1)?)?.sum(1)?,
    };
    Ok(sum.broadcast_div(&total)?)
}

/// `[B, H]` f32: `v[b] = Ā_c[b] − Ā_r[b]` of one module (negated with `reverse`), from the
/// chosen outputs and mask and the rejected ones (module docs).
pub fn preference_dirs(
    chosen: (&Tensor, &Tensor),
    rejected: (&Tensor, &Tensor),
    pooling: Pooling,
    reverse: bool,
) -> Result<Tensor> {
    let v = (pooled(chosen.0, chosen.1, pooling)? - pooled(rejected.0, rejected.1, pooling)?)?;
    Ok(if reverse { v.neg()? } else { v })
}

/// The module paths of `host`'s linear layers whose active adapter has trainable parameters, in
/// model order (the modules both interventions hook).
pub fn hooked_modules(host: &dyn AdapterHost) -> Vec<String> {
    let ctx = Ctx {
        adapter: host.adapter_set().active,
        ..Ctx::default()
    };
    host.linears()
        .into_iter()
        .filter(|l| !l.active_params(&ctx).is_empty())
        .map(|l| l.name.clone())
        .collect()
}

/// `max(x, 0) + slope min(x, 0)`.
fn leaky_relu(x: &Tensor, slope: f64) -> Result<Tensor> {
    let pos = x.relu()?;
    Ok((&pos + ((x - &pos)? * slope)?)?)
}

/// `max(‖x‖, ε)` over the last axis, kept.
fn norm_last(x: &Tensor) -> Result<Tensor> {
    Ok(x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.maximum(EPS)?)
}

/// `‖x‖_F` (unclamped).
fn frobenius(x: &Tensor) -> Result<Tensor> {
    Ok(x.sqr()?.sum_all()?.sqrt()?)
}

/// One gradient rewritten by [`projgrad`].
#[derive(Debug, Clone)]
pub struct Projected {
    /// The new gradient, shaped and typed as the old one.
    pub grad: Tensor,
    /// `‖relu(P)‖_F / ‖X‖_F` (f32 scalar).
    pub proj_frac: Tensor,
    /// `‖relu(−P)‖_F / ‖X‖_F` (f32 scalar).
    pub nproj_frac: Tensor,
}

/// The axis of `dims` that projgrad projects along for a direction of width `h` (`Some(0)`,
/// `Some(1)`), or `None`: the gradient is left alone. Only 2-D gradients are matched.
pub(crate) fn matched_axis(dims: &[usize], h: usize, weight_dim: WeightDim) -> Option<usize> {
    let [first, last] = dims else {
        return None;
    };
    let first_ok = matches!(weight_dim, WeightDim::First | WeightDim::Both);
    let last_ok = matches!(weight_dim, WeightDim::Last | WeightDim::Both);
    if *first == h && first_ok {
        Some(0)
    } else if *last == h && last_ok {
        Some(1)
    } else {
        None
    }
}

/// projgrad's rewrite of the gradient `grad` (2-D) of one parameter of a module whose direction is
/// `v` (`[H]`: `mean_b v[b]` of [`preference_dirs`]); `None` when no axis matches (module docs).
pub fn projgrad(
    grad: &Tensor,
    v: &Tensor,
    weight_dim: WeightDim,
    cfg: &Rewrite,
) -> Result<Option<Projected>> {
    let h = v.dim(0)?;
    let Some(axis) = matched_axis(grad.dims(), h, weight_dim) else {
        return Ok(None);
    };
    let g = grad.detach().to_dtype(DType::F32)?;
    let x = if axis == 0 { g.t()? } else { g };
    let v = v.detach().to_dtype(DType::F32)?.unsqueeze(0)?;
    let x = match cfg.mag_clip {
        None => x,
        Some(c) => {
            let r = x
                .mean_keepdim(0)?
                .div(&(v.maximum(EPS)? * c)?)?
                .maximum(1.0)?;
            x.broadcast_div(&r)?
        }
    };
    let u = v.broadcast_div(&norm_last(&v)?)?;
    let p = x.matmul(&u.t()?)?.broadcast_mul(&u)?;
    let o = (&x - &p)?;
    let o = if cfg.scale_orth {
        let s = norm_last(&o)?.div(&norm_last(&p)?)?;
        o.broadcast_div(&s)?
    } else {
        o
    };
    let new = (leaky_relu(&p, cfg.neg_slope)? + (o * cfg.beta)?)?;
    let new = if axis == 0 { new.t()? } else { new };
    let n = frobenius(&x)?;
    Ok(Some(Projected {
        grad: new.contiguous()?.to_dtype(grad.dtype())?,
        proj_frac: frobenius(&p.relu()?)?.div(&n)?,
        nproj_frac: frobenius(&p.neg()?.relu()?)?.div(&n)?,
    }))
}

/// projbp's rewrite of the gradient `g` `[B, T, H]` at a module output, with the per-example
/// directions `v` `[B, H]` of [`preference_dirs`] (module docs); the result has `g`'s dtype.
pub fn projbp(g: &Tensor, v: &Tensor, cfg: &Rewrite) -> Result<Tensor> {
    let (b, _, h) = g.dims3()?;
    if v.dims() != [b, h] {
        return Err(ModelError::Invalid(format!(
            "projbp: directions {:?} do not fit the gradient {:?}",
            v.dims(),
            g.dims()
        )));
    }
    let x = g.detach().to_dtype(DType::F32)?;
    let v = v.detach().to_dtype(DType::F32)?;
    let vn = norm_last(&v)?;
    let u = v.broadcast_div(&vn)?.unsqueeze(1)?;
    let x = match cfg.mag_clip {
        None => x,
        Some(c) => {
            // ‖mean_t g[b]‖, unclamped (0 gives the ratio 0, clamped to 1).
            let mean_norm = x.mean(1)?.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
            let r = mean_norm.div(&(&vn * c)?)?.maximum(1.0)?;
            x.broadcast_div(&r.unsqueeze(1)?)?
        }
    };
    let p = x
        .broadcast_mul(&u)?
        .sum_keepdim(D::Minus1)?
        .broadcast_mul(&u)?;
    let o = (&x - &p)?;
    let o = if cfg.scale_orth {
        let s = norm_last(&o)?.div(&norm_last(&p)?)?;
        o.broadcast_mul(&s)?
    } else {
        o
    };
    let g2 = (leaky_relu(&p, cfg.neg_slope)? + (o * cfg.beta)?)?;
    let ratio = frobenius(&x)?
        .maximum(EPS)?
        .div(&frobenius(&g2)?.maximum(EPS)?)?;
    Ok(g2.broadcast_mul(&ratio)?.to_dtype(g.dtype())?)
}

/// projbp's hooks for one forward: per hooked module its directions `v` `[B, H]`, the switches,
/// and how often each module's rewrite ran (see the module docs).
#[derive(Debug)]
pub struct GradHooks {
    cfg: Rewrite,
    dirs: HashMap<String, Hook>,
}

#[derive(Debug)]
struct Hook {
    v: Tensor,
    calls: Arc<AtomicUsize>,
}

impl GradHooks {
    /// Hooks rewriting the output gradient of each module of `dirs` (module path, `v [B, H]`).
    pub fn projbp(cfg: Rewrite, dirs: Vec<(String, Tensor)>) -> Self {
        let dirs = dirs
            .into_iter()
            .map(|(m, v)| {
                let hook = Hook {
                    v: v.detach(),
                    calls: Arc::new(AtomicUsize::new(0)),
                };
                (m, hook)
            })
            .collect();
        GradHooks { cfg, dirs }
    }

    /// How many times each hooked module's rewrite ran in backward passes, by module path.
    pub fn calls(&self) -> std::collections::BTreeMap<String, usize> {
        self.dirs
            .iter()
            .map(|(m, h)| (m.clone(), h.calls.load(Ordering::Relaxed)))
            .collect()
    }

    /// `y` (the output of module `name`) unchanged, wrapped in the identity op whose backward
    /// rewrites its gradient, when `name` is hooked and `y` is part of a graph.
    pub(crate) fn wrap(&self, name: &str, y: &Tensor) -> Result<Tensor> {
        let Some(hook) = self.dirs.get(name) else {
            return Ok(y.clone());
        };
        if !y.track_op() || crate::checkpoint::no_grad() {
            return Ok(y.clone());
        }
        Ok(y.apply_op1(ProjBpOp {
            v: hook.v.clone(),
            cfg: self.cfg,
            calls: hook.calls.clone(),
        })?)
    }
}

/// The identity whose backward is [`projbp`].
struct ProjBpOp {
    v: Tensor,
    cfg: Rewrite,
    calls: Arc<AtomicUsize>,
}

/// A contiguous copy of the `layout` view of `s` (the identity's forward on any backend).
fn copy_view<S>(s: &S, layout: &Layout) -> candle_core::Result<(S, Shape)>
where
    S: BackendStorage,
    S::Device: BackendDevice<Storage = S>,
{
    let mut out = s.device().zeros_impl(layout.shape(), s.dtype())?;
    s.copy_strided_src(&mut out, 0, layout)?;
    Ok((out, layout.shape().clone()))
}

impl CustomOp1 for ProjBpOp {
    fn name(&self) -> &'static str {
        "projbp-hook"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        reprpo_kernels::ran_cpu_kernel(self.name());
        copy_view(s, l)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        copy_view(s, l)
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        projbp(g, &self.v, &self.cfg)
            .map(Some)
            .map_err(|e| match e {
                ModelError::Candle(c) => c,
                other => candle_core::Error::Msg(other.to_string()),
            })
    }
}
