//! The fused kernels (`reprpo_loss` per position on the CPU) against the unfused chain of candle
//! ops (`reprpo_loss_unfused`), on seeded random inputs with left and right padding, an example with no real token at all, an example whose rejected side is all
//! padding, and positions where the policy equals the reference exactly (distance 0).
//!
//! Every variant (original, rr-only, direction, normalized-mse, topk, symlog, adaptive, ldr through
//! the row kernel of `fused.rs`, cka through `cka.rs`) with default and other parameters, weights
//! and both schedules.
//!
//! - f32: the fused kernel against the unfused chain in f64 on the same (f32) inputs: values,
//!   per-example losses and metrics within 1e-5 relative, elementwise; gradients within 1e-5
//!   relative per hidden-state row, `‖g - w‖ / ‖w‖` (rows below 1e-3 of the largest row norm are
//!   measured relative to that 1e-3). Not elementwise: where a gradient is a difference of two
//!   scaled rows (the cosine's `y / (‖x‖ ‖y‖) - cos x / ‖x‖²`, the normalised difference
//!   `x / ‖x‖ - y / ‖y‖`), single elements near a sign change carry f32's absolute rounding of the
//!   terms, 1e-4 of their own size and more, in the unfused f32 chain as much as here. The
//!   unfused f32 chain's error against the same reference is printed alongside. Two
//!   ill-conditioned cases have looser bounds, because f32 rounding in them depends on the
//!   summation order (gemm's threading) and varies by 2x between runs and machines:
//!   `cka` on the shapes with fewer than 10 tokens (bound 1e-2), where CKA is close to 1 (few
//!   centred rows) and `1 - CKA` and its gradient lose digits in f32 (the unfused f32 chain is off
//!   by up to 1.2e-3, the kernel by up to 1.8e-3 in the runs seen; at 40 tokens cka meets 1e-5
//!   like every other variant), and `symlog` of pooled means (token reduction `mean`, bound 2e-4),
//!   whose `ln(|x| + 1e-6)` amplifies the rounding of near-zero means (both 1.1e-5-3.3e-5: the
//!   distance part is the same f32 chain). The f64 comparison below is exact in both.
//! - f64: fused against unfused, values and gradients elementwise within 1e-11 (same floor).
//! - f64: the fused backward against central finite differences of the fused forward.
//! - bf16 / f16: the fused kernel on rounded inputs against the unfused f32 chain on the same
//!   rounded inputs. The kernel accumulates in f32 and rounds once at the end, so each value and
//!   each gradient element is the f32 result rounded to the 16-bit type: within its unit roundoff
//!   `u = 2^-p` (p = 8 significant bits for bf16, 11 for f16) plus f32 noise. The tolerance is
//!   `2u` (2^-7 = 7.8e-3 for bf16, 2^-10 = 9.8e-4 for f16); errors seen: up to 0.97u.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use anyhow::{Result, bail};
use candle_core::{DType, Device, Tensor, Var};
use reprpo_losses::{
    HiddenPairs, LossOut, ReprPoConfig, ReprPoVariant, Schedule, TokenReduction, reprpo_loss,
    reprpo_loss_unfused, uses_fused_kernel,
};

/// A small seeded generator (xorshift64*), uniform in `[-1, 1)` and roughly normal.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let v = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        (v >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
    fn normal(&mut self) -> f64 {
        (0..4).map(|_| self.next()).sum::<f64>() * 0.866
    }
    fn vec(&mut self, n: usize, scale: f64) -> Vec<f64> {
        (0..n).map(|_| scale * self.normal()).collect()
    }
}

/// Host data of one input set: `[L, B, T, H]` hidden states and `[B, T]` masks, as f64.
#[derive(Clone)]
struct Raw {
    dims: (usize, usize, usize, usize),
    pc: Vec<f64>,
    pr: Vec<f64>,
    rc: Vec<f64>,
    rr: Vec<f64>,
    mc: Vec<f64>,
    mr: Vec<f64>,
    z: Vec<f64>,
}

/// Masks per example, cycling: full / full; chosen left-padded by 3, rejected right-padded;
/// nothing real at all; chosen real, rejected all padding; chosen right-padded, rejected
/// left-padded by 2; a random pattern.
fn raw(seed: u64, l: usize, b: usize, t: usize, h: usize) -> Raw {
    let mut g = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let n = l * b * t * h;
    let rc = g.vec(n, 1.0);
    let rr: Vec<f64> = rc
        .iter()
        .zip(g.vec(n, 0.8))
        .map(|(r, e)| 0.6 * r + e)
        .collect();
    let noise_c = g.vec(n, 0.3);
    let mut pc: Vec<f64> = rc.iter().zip(&noise_c).map(|(r, e)| r + e).collect();
    let pr: Vec<f64> = rr.iter().zip(g.vec(n, 0.3)).map(|(r, e)| r + e).collect();
    let mut mc = vec![0.0; b * t];
    let mut mr = vec![0.0; b * t];
    for bi in 0..b {
        for ti in 0..t {
            let (c, r) = match bi % 6 {
                0 => (true, true),
                1 => (ti >= 3, ti + 2 < t),
                2 => (false, false),
                3 => (true, false),
                4 => (ti + 1 < t, ti >= 2),
                _ => (g.next() > -0.4, g.next() > -0.4),
            };
            mc[bi * t + ti] = f64::from(u8::from(c));
            mr[bi * t + ti] = f64::from(u8::from(r));
        }
    }
    // Retain distance exactly 0 at every (l, 0, 1, :): the policy equals the reference there.
    for li in 0..l {
        let o = ((li * b) * t + 1) * h;
        pc[o..o + h].copy_from_slice(&rc[o..o + h]);
    }
    let z = g.vec(b, 0.1);
    Raw {
        dims: (l, b, t, h),
        pc,
        pr,
        rc,
        rr,
        mc,
        mr,
        z,
    }
}

fn tensor(v: &[f64], shape: &[usize], dtype: DType) -> Result<Tensor> {
    Ok(Tensor::from_slice(v, shape, &Device::Cpu)?.to_dtype(dtype)?)
}

/// The inputs in `dtype` (hidden states first rounded to `round`), policy tensors as variables.
fn inputs(r: &Raw, dtype: DType, round: DType) -> Result<(HiddenPairs, Var, Var)> {
    let (l, b, t, h) = r.dims;
    let hs =
        |v: &[f64]| -> Result<Tensor> { Ok(tensor(v, &[l, b, t, h], round)?.to_dtype(dtype)?) };
    let pc = Var::from_tensor(&hs(&r.pc)?)?;
    let pr = Var::from_tensor(&hs(&r.pr)?)?;
    let mut hp = HiddenPairs::new(
        pc.as_tensor().clone(),
        pr.as_tensor().clone(),
        hs(&r.rc)?,
        hs(&r.rr)?,
        tensor(&r.mc, &[b, t], DType::F32)?,
        tensor(&r.mr, &[b, t], DType::F32)?,
    );
    hp.dpo_z = Some(tensor(&r.z, &[b], DType::F32)?);
    Ok((hp, pc, pr))
}

fn to_vec(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
}

/// The largest elementwise relative error `|g - w| / max(|w|, floor)`, where
/// `floor = max(atol, 1e-3 max_j |w_j|)`: elements far below the tensor's scale (a gradient
/// coordinate where `x_h - y_h` happens to be tiny) are measured relative to 1e-3 of that scale.
fn rel_err(got: &[f64], want: &[f64], atol: f64) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0_f64, |m, w| m.max(w.abs()));
    let floor = (1e-3 * scale).max(atol).max(1e-300);
    got.iter()
        .zip(want)
        .map(|(g, w)| {
            if g.is_nan() || w.is_nan() {
                f64::INFINITY
            } else {
                (g - w).abs() / w.abs().max(floor)
            }
        })
        .fold(0.0, f64::max)
}

/// The largest relative error per row of `h` elements, `‖g_r - w_r‖ / max(‖w_r‖, floor)`, where
/// `floor = 1e-3 max_r ‖w_r‖`.
fn row_err(got: &[f64], want: &[f64], h: usize) -> f64 {
    assert_eq!(got.len(), want.len());
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let scale = want.chunks(h).map(norm).fold(0.0_f64, f64::max);
    let floor = (1e-3 * scale).max(1e-300);
    got.chunks(h)
        .zip(want.chunks(h))
        .map(|(g, w)| {
            let d: Vec<f64> = g.iter().zip(w).map(|(a, b)| a - b).collect();
            let e = norm(&d) / norm(w).max(floor);
            if e.is_nan() { f64::INFINITY } else { e }
        })
        .fold(0.0, f64::max)
}

/// Everything a case produces: loss, per-example loss, metrics (sorted by name), gradients.
struct Got {
    loss: Vec<f64>,
    per_example: Vec<f64>,
    metrics: Vec<(String, f64)>,
    grad_c: Vec<f64>,
    grad_r: Vec<f64>,
}

fn run(
    f: fn(&HiddenPairs, &ReprPoConfig, f64) -> reprpo_losses::Result<LossOut>,
    hp: &HiddenPairs,
    pc: &Var,
    pr: &Var,
    cfg: &ReprPoConfig,
    p: f64,
) -> Result<Got> {
    let out = f(hp, cfg, p)?;
    let grads = out.loss.backward()?;
    let g = |v: &Var| -> Result<Vec<f64>> {
        Ok(match grads.get(v.as_tensor()) {
            Some(g) => to_vec(g)?,
            None => vec![0.0; v.as_tensor().elem_count()],
        })
    };
    for t in [&hp.reference_chosen, &hp.reference_rejected] {
        if grads.get(t).is_some() {
            bail!("a gradient reached the reference hidden states");
        }
    }
    Ok(Got {
        loss: vec![out.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?],
        per_example: to_vec(&out.per_example)?,
        metrics: out.metrics_f64()?.into_iter().collect(),
        grad_c: g(pc)?,
        grad_r: g(pr)?,
    })
}

fn configs() -> Vec<(String, ReprPoConfig, f64)> {
    let d = ReprPoConfig::default;
    let mut cases = vec![
        ("original_p0".into(), d(), 0.0),
        ("original_p03".into(), d(), 0.3),
        ("original_p1".into(), d(), 1.0),
        (
            "weights".into(),
            ReprPoConfig {
                example_weights: true,
                ..d()
            },
            0.6,
        ),
        (
            "circuit_breakers".into(),
            ReprPoConfig {
                schedule: Schedule::CircuitBreakers,
                alpha: 3.0,
                ..d()
            },
            0.4,
        ),
        (
            "rr_only_weights".into(),
            ReprPoConfig {
                variant: ReprPoVariant::RrOnly,
                example_weights: true,
                ..d()
            },
            0.5,
        ),
    ];
    // Every other per-position variant, with its default parameters and with others.
    let v = |name: &str, variant: ReprPoVariant, f: fn(&mut ReprPoConfig), p: f64| {
        let mut cfg = ReprPoConfig { variant, ..d() };
        f(&mut cfg);
        (name.to_string(), cfg, p)
    };
    cases.extend([
        v("direction", ReprPoVariant::Direction, |_| {}, 0.4),
        v(
            "direction_w02_weights",
            ReprPoVariant::Direction,
            |c| {
                c.direction_weight = 0.2;
                c.example_weights = true;
            },
            0.7,
        ),
        v("normalized_mse", ReprPoVariant::NormalizedMse, |_| {}, 0.5),
        v("topk", ReprPoVariant::Topk, |_| {}, 0.5),
        v(
            "topk_f03",
            ReprPoVariant::Topk,
            |c| c.topk_fraction = 0.3,
            0.2,
        ),
        v("symlog", ReprPoVariant::Symlog, |_| {}, 0.6),
        v("adaptive", ReprPoVariant::Adaptive, |_| {}, 0.5),
        v(
            "adaptive_thr03_cb",
            ReprPoVariant::Adaptive,
            |c| {
                c.adaptive_threshold = 0.3;
                c.schedule = Schedule::CircuitBreakers;
            },
            0.5,
        ),
        v("cka", ReprPoVariant::Cka, |_| {}, 0.5),
        v(
            "cka_weights_cb",
            ReprPoVariant::Cka,
            |c| {
                c.example_weights = true;
                c.schedule = Schedule::CircuitBreakers;
            },
            0.3,
        ),
        v(
            "mean_original",
            ReprPoVariant::Original,
            |c| c.token_reduction = TokenReduction::Mean,
            0.5,
        ),
        v(
            "mean_direction_weights",
            ReprPoVariant::Direction,
            |c| {
                c.token_reduction = TokenReduction::Mean;
                c.example_weights = true;
            },
            0.4,
        ),
        v(
            "mean_ldr",
            ReprPoVariant::Ldr,
            |c| c.token_reduction = TokenReduction::Mean,
            0.6,
        ),
        v(
            "mean_symlog_cb",
            ReprPoVariant::Symlog,
            |c| {
                c.token_reduction = TokenReduction::Mean;
                c.schedule = Schedule::CircuitBreakers;
            },
            0.5,
        ),
        v("ldr", ReprPoVariant::Ldr, |_| {}, 0.5),
        v(
            "ldr_weights_eps",
            ReprPoVariant::Ldr,
            |c| {
                c.example_weights = true;
                c.ldr_eps = 1e-2;
            },
            0.3,
        ),
    ]);
    cases
}

/// Shapes: hidden sizes below, at and off the kernel's 8 lanes; the last is large enough for the
/// parallel path (> 2^15 elements per tensor).
const SHAPES: [(usize, usize, usize, usize); 4] =
    [(1, 6, 7, 5), (2, 6, 9, 37), (3, 7, 5, 64), (2, 6, 40, 150)];

#[derive(Debug, Default)]
struct Worst {
    value: f64,
    grad: f64,
    /// The unfused chain in the same dtype against the same reference (row-wise mode only).
    unfused_grad: f64,
}

/// Compares the fused path in `dtype` with the unfused path in `ref_dtype`, both on inputs rounded
/// to `dtype`.
///
/// `atol`: the smallest magnitude measured relatively (the smallest normal number of `dtype`, below
/// which its spacing is absolute). `rowwise`: gradients compared per hidden-state row
/// ([`row_err`]) instead of elementwise.
fn compare(dtype: DType, ref_dtype: DType, tol: f64, atol: f64, rowwise: bool) -> Result<Worst> {
    let mut worst = Worst::default();
    let mut failures = Vec::new();
    let mut relaxed = Vec::new();
    for (si, &(l, b, t, h)) in SHAPES.iter().enumerate() {
        let r = raw(si as u64 + 1, l, b, t, h);
        let (hp, pc, pr) = inputs(&r, dtype, dtype)?;
        let (hq, qc, qr) = inputs(&r, ref_dtype, dtype)?;
        for (name, cfg, p) in configs() {
            if !uses_fused_kernel(&cfg, &hp.policy_chosen) {
                bail!("{name}: the fused kernel does not apply");
            }
            let got = run(reprpo_loss, &hp, &pc, &pr, &cfg, p)?;
            let want = run(reprpo_loss_unfused, &hq, &qc, &qr, &cfg, p)?;
            // Row-wise (f32) mode: the unfused chain in the same dtype is measured against the
            // same reference and printed; two ill-conditioned cases have their own bounds (see
            // the file's docs).
            let ill_conditioned_tol = if !rowwise {
                None
            } else if cfg.variant == ReprPoVariant::Cka && t < 10 {
                Some(1e-2)
            } else if cfg.variant == ReprPoVariant::Symlog
                && cfg.token_reduction == TokenReduction::Mean
            {
                Some(2e-4)
            } else {
                None
            };
            let un = if rowwise {
                Some(run(reprpo_loss_unfused, &hp, &pc, &pr, &cfg, p)?)
            } else {
                None
            };
            let tag = format!("{dtype:?} {:?} {name}", (l, b, t, h));
            if !got
                .metrics
                .iter()
                .map(|x| &x.0)
                .eq(want.metrics.iter().map(|x| &x.0))
            {
                failures.push(format!("{tag}: metric names differ"));
            }
            let mut check = |what: &str, pick: &dyn Fn(&Got) -> Vec<f64>, grad: bool| {
                let err = |g: &Got| {
                    if grad && rowwise {
                        row_err(&pick(g), &pick(&want), h)
                    } else {
                        rel_err(&pick(g), &pick(&want), atol)
                    }
                };
                let e = err(&got);
                let e_un = un.as_ref().map_or(0.0, err);
                if grad {
                    worst.grad = worst.grad.max(e);
                    worst.unfused_grad = worst.unfused_grad.max(e_un);
                } else {
                    worst.value = worst.value.max(e);
                }
                let allowed = ill_conditioned_tol.unwrap_or(tol);
                if e > tol && e <= allowed {
                    relaxed.push(format!(
                        "{tag}: {what} error {e:.2e} (unfused {dtype:?} chain {e_un:.2e})"
                    ));
                }
                if e > allowed {
                    failures.push(format!("{tag}: {what} error {e:.3e}"));
                }
            };
            check("loss", &|g| g.loss.clone(), false);
            check("per_example", &|g| g.per_example.clone(), false);
            for (i, (k, _)) in want.metrics.iter().enumerate() {
                check(
                    k,
                    &|g| vec![g.metrics.get(i).map_or(f64::NAN, |m| m.1)],
                    false,
                );
            }
            check("grad policy_chosen", &|g| g.grad_c.clone(), true);
            check("grad policy_rejected", &|g| g.grad_r.clone(), true);
            // Padded positions get exactly zero gradient.
            for (li, bi, ti) in
                (0..l).flat_map(|li| (0..b).flat_map(move |bi| (0..t).map(move |ti| (li, bi, ti))))
            {
                let o = ((li * b + bi) * t + ti) * h;
                if r.mc[bi * t + ti] == 0.0 && got.grad_c[o..o + h].iter().any(|&x| x != 0.0) {
                    failures.push(format!("{tag}: gradient at a padded chosen position"));
                }
                // Token reduction `mean` pools the rejected sequence over all its real tokens.
                let counted = if cfg.token_reduction == TokenReduction::Mean {
                    r.mr[bi * t + ti]
                } else {
                    r.mc[bi * t + ti] * r.mr[bi * t + ti]
                };
                if counted == 0.0 && got.grad_r[o..o + h].iter().any(|&x| x != 0.0) {
                    failures.push(format!("{tag}: gradient at an uncounted rejected position"));
                }
            }
        }
    }
    eprintln!("fused {dtype:?} vs unfused {ref_dtype:?}: worst relative errors {worst:?}");
    for r in &relaxed {
        eprintln!("  ill-conditioned case, beyond {tol:.0e} but within its own bound: {r}");
    }
    if !failures.is_empty() {
        bail!("{} failures:\n{}", failures.len(), failures.join("\n"));
    }
    Ok(worst)
}

#[test]
fn fused_matches_unfused_f32() -> Result<()> {
    compare(DType::F32, DType::F64, 1e-5, 0.0, true)?;
    Ok(())
}

#[test]
fn fused_matches_unfused_f64() -> Result<()> {
    compare(DType::F64, DType::F64, 1e-11, 0.0, false)?;
    Ok(())
}

#[test]
fn fused_bf16_is_the_f32_result_rounded() -> Result<()> {
    // Tolerance: twice bf16's unit roundoff 2^-8 (see the file's documentation). For comparison
    // the unfused chain in bf16 is measured against the same reference and printed.
    compare(DType::BF16, DType::F32, 2f64.powi(-7), 1.2e-38, false)?;
    let (l, b, t, h) = SHAPES[1];
    let r = raw(2, l, b, t, h);
    let (hp, pc, pr) = inputs(&r, DType::BF16, DType::BF16)?;
    let (hq, qc, qr) = inputs(&r, DType::F32, DType::BF16)?;
    let cfg = ReprPoConfig::default();
    let fused = run(reprpo_loss, &hp, &pc, &pr, &cfg, 0.3)?;
    let unfused = run(reprpo_loss_unfused, &hp, &pc, &pr, &cfg, 0.3)?;
    let want = run(reprpo_loss_unfused, &hq, &qc, &qr, &cfg, 0.3)?;
    eprintln!(
        "bf16 loss vs f32 on the same inputs: fused {:.2e}, unfused bf16 chain {:.2e}",
        rel_err(&fused.loss, &want.loss, 0.0),
        rel_err(&unfused.loss, &want.loss, 0.0)
    );
    Ok(())
}

#[test]
fn fused_f16_is_the_f32_result_rounded() -> Result<()> {
    // f16's smallest normal is 2^-14 = 6.1e-5; the gradients of these small tests lie partly
    // below it, where f16's spacing is the absolute 2^-24.
    compare(
        DType::F16,
        DType::F32,
        2f64.powi(-10),
        2f64.powi(-14),
        false,
    )?;
    Ok(())
}

/// The fused backward in f64 against central differences of the fused forward, at coordinates of
/// real and padded positions of both policy tensors. For `direction`, the chosen rows where the
/// policy equals the reference exactly are skipped: `|‖x‖ - ‖y‖|` has its kink there (the kernel
/// takes the subgradient 0, as PyTorch's `abs` does) and central differences across a kink are off
/// by O(step).
#[test]
fn fused_finite_differences_f64() -> Result<()> {
    let (l, b, t, h) = SHAPES[1];
    let r = raw(7, l, b, t, h);
    let step = 1e-6;
    let mut worst: f64 = 0.0;
    for (name, cfg, p) in configs() {
        let (hp, pc, pr) = inputs(&r, DType::F64, DType::F64)?;
        let g = run(reprpo_loss, &hp, &pc, &pr, &cfg, p)?;
        let scale = g
            .grad_c
            .iter()
            .chain(&g.grad_r)
            .fold(0.0_f64, |m, x| m.max(x.abs()))
            .max(1e-12);
        let eval = |which: usize, idx: usize, d: f64| -> Result<f64> {
            let mut q = r.clone();
            if which == 0 {
                q.pc[idx] += d;
            } else {
                q.pr[idx] += d;
            }
            let (hq, _, _) = inputs(&q, DType::F64, DType::F64)?;
            Ok(reprpo_loss(&hq, &cfg, p)?.loss.to_scalar::<f64>()?)
        };
        let n = r.pc.len();
        for k in 0..40 {
            let idx = (k * 1543 + 11) % n;
            let kink_row = idx / h % (b * t) == 1;
            for (which, grad) in [(0, &g.grad_c), (1, &g.grad_r)] {
                if which == 0 && kink_row && cfg.variant == ReprPoVariant::Direction {
                    continue;
                }
                let fd = (eval(which, idx, step)? - eval(which, idx, -step)?) / (2.0 * step);
                let e = (fd - grad[idx]).abs() / scale;
                worst = worst.max(e);
                if e > 1e-7 {
                    bail!(
                        "{name}: tensor {which} index {idx}: fused backward {} vs fd {fd}",
                        grad[idx]
                    );
                }
            }
        }
    }
    eprintln!(
        "fused finite differences (f64): worst error relative to the gradient scale {worst:.2e}"
    );
    Ok(())
}

/// NaN and infinity at every padded position (of all four hidden-state tensors) change nothing.
#[test]
fn fused_ignores_garbage_at_padding() -> Result<()> {
    let (l, b, t, h) = SHAPES[1];
    let r = raw(3, l, b, t, h);
    let mut q = r.clone();
    for li in 0..l {
        for bi in 0..b {
            for ti in 0..t {
                let o = ((li * b + bi) * t + ti) * h;
                let k = bi * t + ti;
                if r.mc[k] == 0.0 {
                    q.pc[o..o + h].fill(f64::NAN);
                    q.rc[o..o + h].fill(f64::INFINITY);
                }
                if r.mr[k] == 0.0 {
                    q.pr[o..o + h].fill(f64::NAN);
                    q.rr[o..o + h].fill(f64::NAN);
                }
            }
        }
    }
    let cfg = ReprPoConfig {
        example_weights: true,
        ..Default::default()
    };
    let (hp, pc, pr) = inputs(&r, DType::F32, DType::F32)?;
    let (hq, qc, qr) = inputs(&q, DType::F32, DType::F32)?;
    let clean = run(reprpo_loss, &hp, &pc, &pr, &cfg, 0.5)?;
    let dirty = run(reprpo_loss, &hq, &qc, &qr, &cfg, 0.5)?;
    assert_eq!(clean.loss, dirty.loss);
    assert_eq!(clean.per_example, dirty.per_example);
    assert_eq!(clean.metrics, dirty.metrics);
    assert_eq!(clean.grad_c, dirty.grad_c);
    assert_eq!(clean.grad_r, dirty.grad_r);
    Ok(())
}

/// Nothing real: loss, parts and gradients are 0 and every metric is finite, in every float dtype.
#[test]
fn fused_all_masked_is_zero() -> Result<()> {
    for dtype in [DType::F32, DType::F64, DType::BF16, DType::F16] {
        let (l, b, t, h) = SHAPES[3];
        let mut r = raw(4, l, b, t, h);
        r.mc.fill(0.0);
        r.mr.fill(0.0);
        for weights in [false, true] {
            let cfg = ReprPoConfig {
                example_weights: weights,
                ..Default::default()
            };
            let (hp, pc, pr) = inputs(&r, dtype, dtype)?;
            let g = run(reprpo_loss, &hp, &pc, &pr, &cfg, 0.5)?;
            assert_eq!(g.loss, vec![0.0], "{dtype:?}");
            assert!(g.per_example.iter().all(|&x| x == 0.0));
            assert!(g.metrics.iter().all(|(_, v)| v.is_finite()));
            assert!(g.grad_c.iter().chain(&g.grad_r).all(|&x| x == 0.0));
        }
    }
    Ok(())
}

/// Non-contiguous hidden states (a transposed view) and untracked inputs take the fused path with
/// the same result.
#[test]
fn fused_non_contiguous_and_untracked() -> Result<()> {
    let (l, b, t, h) = SHAPES[2];
    let r = raw(5, l, b, t, h);
    let (hp, pc, pr) = inputs(&r, DType::F32, DType::F32)?;
    let cfg = ReprPoConfig::default();
    let want = run(reprpo_loss_unfused, &hp, &pc, &pr, &cfg, 0.5)?;
    // The same values stored [L, B, H, T] and viewed back as [L, B, T, H].
    let strided =
        |x: &Tensor| -> Result<Tensor> { Ok(x.transpose(2, 3)?.contiguous()?.transpose(2, 3)?) };
    let mut hq = hp.clone();
    let vc = Var::from_tensor(&pc.as_tensor().transpose(2, 3)?.contiguous()?)?;
    hq.policy_chosen = vc.as_tensor().transpose(2, 3)?;
    hq.policy_rejected = strided(&hp.policy_rejected)?;
    hq.reference_chosen = strided(&hp.reference_chosen)?;
    assert!(!hq.policy_chosen.is_contiguous());
    let out = reprpo_loss(&hq, &cfg, 0.5)?;
    let loss = out.loss.to_scalar::<f32>()? as f64;
    assert!(rel_err(&[loss], &want.loss, 0.0) < 1e-6);
    let grads = out.loss.backward()?;
    let gc = to_vec(&grads.get(vc.as_tensor()).unwrap().transpose(2, 3)?)?;
    assert!(rel_err(&gc, &want.grad_c, 1e-7) < 1e-5);
    // Untracked policy tensors: no gradient anywhere, same loss.
    let mut hd = hp.clone();
    hd.policy_chosen = hp.policy_chosen.detach();
    hd.policy_rejected = hp.policy_rejected.detach();
    let out = reprpo_loss(&hd, &cfg, 0.5)?;
    assert!(rel_err(&[out.loss.to_scalar::<f32>()? as f64], &want.loss, 0.0) < 1e-6);
    Ok(())
}

#[test]
fn fused_kernel_selection() -> Result<()> {
    let x = Tensor::zeros((1, 1, 1, 4), DType::F32, &Device::Cpu)?;
    let xi = Tensor::zeros((1, 1, 1, 4), DType::U32, &Device::Cpu)?;
    let d = ReprPoConfig::default;
    assert!(uses_fused_kernel(&d(), &x));
    assert!(!uses_fused_kernel(&d(), &xi));
    assert!(uses_fused_kernel(
        &ReprPoConfig {
            token_reduction: TokenReduction::Mean,
            ..d()
        },
        &x
    ));
    for v in ReprPoVariant::ALL {
        let cfg = ReprPoConfig { variant: v, ..d() };
        assert!(uses_fused_kernel(&cfg, &x), "{v:?}");
    }
    Ok(())
}
