//! The device path of `linalg::inverse` (batched Newton-Schulz from candle ops, the path every
//! non-CPU device takes), run on the CPU under `reprpo_kernels::written_out` and compared with
//! the fused CPU op (Gauss-Jordan in f64): values and gradients on Cayley batches `I + S` of the
//! block sizes BOFT and OFT use, the documented convergence bound at its edge and beyond it
//! (NaN, never a silently wrong inverse), and whole BOFT / OFT forwards and backwards.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reprpo_models::linalg::{NS_ITERS, device_tolerance, inverse};
use reprpo_models::{ForwardSpec, Llama, peft};

use crate::common;

fn max_abs(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Max |a - b| / max |b|, in f64.
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    max_abs(&(&a - &b).unwrap()) / max_abs(&b)
}

/// `inverse(a)` and the gradient of `sum(inverse(a) * c)` w.r.t. `a`: the fused CPU op, or
/// (`device`) the device path under `written_out`.
fn value_and_grad(a: &Tensor, c: &Tensor, device: bool) -> (Tensor, Tensor) {
    let run = || {
        let var = Var::from_tensor(a).unwrap();
        let x = inverse(var.as_tensor()).unwrap();
        let l = (&x * c.to_dtype(a.dtype()).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let g = l.backward().unwrap().get(var.as_tensor()).unwrap().clone();
        (x, g)
    };
    if device {
        reprpo_kernels::written_out(run)
    } else {
        run()
    }
}

/// `I + S` for `m` random skew-symmetric `S` (`[m, b, b]`, f64), matrix `i` with entries of
/// standard deviation `scales[i % len]`.
fn cayley_batch(m: usize, b: usize, scales: &[f64], seed: u64) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut v = vec![0f64; m * b * b];
    for k in 0..m {
        let s = scales[k % scales.len()];
        for i in 0..b {
            v[k * b * b + i * b + i] = 1.0;
            for j in i + 1..b {
                // Uniform with the given standard deviation.
                let x = rng.random_range(-1.0..1.0) * s * 3f64.sqrt();
                v[k * b * b + i * b + j] = x;
                v[k * b * b + j * b + i] = -x;
            }
        }
    }
    Tensor::from_vec(v, (m, b, b), &Device::Cpu).unwrap()
}

/// `I + S` with `S = t (u v^T - v u^T)` for orthonormal `u`, `v` (`b >= 3`): singular values
/// of `I + S` are 1 (so the smallest is exactly 1, the worst case of the bound) and
/// `sqrt(1 + t^2)`; `t` is set so that the largest column sum of `|S|` is `norm_1`.
fn rank2_cayley(b: usize, norm_1: f64, seed: u64) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut u: Vec<f64> = (0..b).map(|_| rng.random_range(-1.0..1.0)).collect();
    let mut v: Vec<f64> = (0..b).map(|_| rng.random_range(-1.0..1.0)).collect();
    let nu = u.iter().map(|x| x * x).sum::<f64>().sqrt();
    u.iter_mut().for_each(|x| *x /= nu);
    let d = u.iter().zip(&v).map(|(a, b)| a * b).sum::<f64>();
    v.iter_mut().zip(&u).for_each(|(x, y)| *x -= d * y);
    let nv = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    v.iter_mut().for_each(|x| *x /= nv);
    let s: Vec<f64> = (0..b * b)
        .map(|k| u[k / b] * v[k % b] - v[k / b] * u[k % b])
        .collect();
    let col = (0..b)
        .map(|j| (0..b).map(|i| s[i * b + j].abs()).sum::<f64>())
        .fold(0f64, f64::max);
    let a: Vec<f64> = (0..b * b)
        .map(|k| s[k] * norm_1 / col + if k / b == k % b { 1.0 } else { 0.0 })
        .collect();
    Tensor::from_vec(a, (1, b, b), &Device::Cpu).unwrap()
}

/// Per matrix of `x` (`[m, b, b]`): whether every entry is NaN, and `max |I - A X|`.
fn nan_and_residual(a: &Tensor, x: &Tensor) -> Vec<(bool, f64)> {
    let a = a.to_dtype(DType::F64).unwrap();
    let x = x.to_dtype(DType::F64).unwrap();
    let b = a.dim(1).unwrap();
    let eye = Tensor::eye(b, DType::F64, &Device::Cpu).unwrap();
    let r = eye.broadcast_sub(&a.matmul(&x).unwrap()).unwrap();
    (0..a.dim(0).unwrap())
        .map(|i| {
            let xi = x.get(i).unwrap().flatten_all().unwrap();
            let all_nan = xi.to_vec1::<f64>().unwrap().iter().all(|v| v.is_nan());
            (all_nan, max_abs(&r.get(i).unwrap()))
        })
        .collect()
}

/// Cayley batches of the block sizes BOFT (4; 8 with `boft_block_num`) and OFT (8; PEFT's
/// default 32) use here, plus 2, with skew parts from trained-adapter size (0.01) to large
/// (1.0, largest column sums up to about 20 for b = 32): device path against the CPU op.
/// Tolerances (max abs difference relative to the CPU op's max abs entry): f64 1e-12 (the
/// 2-norm condition numbers are below 30, so both are exact up to a few hundred ulps; seen
/// 1.4e-15); f32 2e-6 (f32 arithmetic throughout against the CPU op's f64 accumulation, about
/// `b eps cond`; seen 2.4e-7). Every residual is within `device_tolerance`.
#[test]
fn cayley_batches_match_cpu_op() {
    for b in [2, 4, 8, 32] {
        let a = cayley_batch(8, b, &[0.01, 0.1, 0.3, 1.0], b as u64);
        let c = Tensor::randn(0f64, 1.0, (8, b, b), &Device::Cpu).unwrap();
        for (dt, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-6)] {
            let a = a.to_dtype(dt).unwrap();
            let (x_cpu, g_cpu) = value_and_grad(&a, &c, false);
            let (x_dev, g_dev) = value_and_grad(&a, &c, true);
            let (ex, eg) = (rel(&x_dev, &x_cpu), rel(&g_dev, &g_cpu));
            let worst = nan_and_residual(&a, &x_dev)
                .iter()
                .fold(0f64, |m, (nan, r)| {
                    assert!(!nan, "b {b} {dt:?}: NaN inside the bound");
                    m.max(*r)
                });
            eprintln!(
                "b {b:2} {dt:?}: value {ex:.1e}, gradient {eg:.1e}, max |I - AX| {worst:.1e}"
            );
            assert!(
                ex < tol && eg < tol,
                "b {b} {dt:?}: value {ex}, gradient {eg}"
            );
            assert!(
                worst <= device_tolerance(dt),
                "b {b} {dt:?}: residual {worst}"
            );
        }
    }
}

/// The rustdoc's bound: with `NS_ITERS` = 17, a Cayley block whose largest column sum of `|S|`
/// is at most 74 (f64) / 118 (f32) converges, including the worst case (smallest singular value
/// exactly 1). Checked just inside it (70 / 110, where the exact-arithmetic residual of the
/// detached iterate is `exp(-2^17 / 71^2)` = 5e-12 / `exp(-2^17 / 111^2)` = 2e-5), for b = 4,
/// 8 and 32: the value within 1e-10 (f64) / 1e-5 (f32) of the CPU op (seen 3e-15 / 1.3e-6),
/// the gradient within 10 times the residual tolerance (its error follows the detached
/// iterate's residual: seen 1e-11 / 4.8e-5). Far beyond it (3000: `exp(-2^17 / 3001^2)` = 0.985 of the initial residual is
/// left) the result is NaN, not a wrong matrix.
#[test]
fn convergence_bound_holds_at_its_edge_and_nan_beyond() {
    assert_eq!(NS_ITERS, 17, "the rustdoc's numbers are for 17 iterations");
    for b in [4, 8, 32] {
        for (dt, edge) in [(DType::F64, 70.0), (DType::F32, 110.0)] {
            let a = rank2_cayley(b, edge, 3).to_dtype(dt).unwrap();
            let c = Tensor::randn(0f64, 1.0, (1, b, b), &Device::Cpu).unwrap();
            let (x_cpu, g_cpu) = value_and_grad(&a, &c, false);
            let (x_dev, g_dev) = value_and_grad(&a, &c, true);
            let [(nan, r)] = nan_and_residual(&a, &x_dev)[..] else {
                panic!("one matrix")
            };
            let (ex, eg) = (rel(&x_dev, &x_cpu), rel(&g_dev, &g_cpu));
            eprintln!(
                "edge b {b:2} {dt:?} |S|_1 {edge}: residual {r:.1e}, value {ex:.1e}, gradient {eg:.1e}"
            );
            assert!(!nan && r <= device_tolerance(dt), "b {b} {dt:?}: {r}");
            let tol_value = if dt == DType::F64 { 1e-10 } else { 1e-5 };
            let tol_grad = 10.0 * device_tolerance(dt);
            assert!(
                ex < tol_value && eg < tol_grad,
                "b {b} {dt:?}: value {ex}, gradient {eg}"
            );

            let far = rank2_cayley(b, 3000.0, 3).to_dtype(dt).unwrap();
            let x = reprpo_kernels::written_out(|| inverse(&far)).unwrap();
            let [(nan, _)] = nan_and_residual(&far, &x)[..] else {
                panic!("one matrix")
            };
            assert!(nan, "b {b} {dt:?}: beyond the bound must be NaN");
            // The fused CPU op still inverts it (Gauss-Jordan has no such bound).
            let x = inverse(&far).unwrap();
            assert!(max_abs(&x).is_finite());
        }
    }
}

const BASE: &str = "llama_gqa_rope3";

/// Logits and every adapter gradient of `sum(logits * W)` for `adapter` of the fixture.
fn forward_backward(adapter: &str) -> (Tensor, Vec<(String, Tensor)>) {
    let dir = common::fixture(BASE);
    let inputs = common::st(dir.join("adapters/inputs.safetensors"));
    let mut model = Llama::load(&dir, DType::F32, &Device::Cpu).unwrap();
    peft::load_adapter(&mut model, &dir.join("adapters").join(adapter), "default").unwrap();
    let ids = inputs["input_ids"].to_dtype(DType::U32).unwrap();
    let pos = inputs["position_ids"].to_dtype(DType::U32).unwrap();
    let logits = model
        .forward(
            &ids,
            Some(&inputs["attention_mask"]),
            Some(&pos),
            &ForwardSpec::logits(),
        )
        .unwrap()
        .logits
        .unwrap();
    let grads = (&logits * &inputs["grad_weight"])
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g = peft::adapter_params(&model, 0)
        .into_iter()
        .map(|(name, var)| {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{adapter}: no gradient for {name}"))
                .clone();
            (name, g)
        })
        .collect();
    (logits, g)
}

/// BOFT (block 4 with 2 butterfly factors; 8 blocks of 8) and OFT with the exact Cayley
/// (blocks of 8): a forward and backward under `written_out` (Newton-Schulz inverse and every
/// other written-out op) against the fused path: logits and every adapter gradient within 1e-5
/// relative (f32 model; the inverse differs by about 1e-7, the rest is the written-out ops'
/// summation order), and against PEFT's fixture with the reference tests' 1e-4.
#[test]
fn boft_and_oft_written_out_agree_with_fused() {
    for adapter in ["boft_nbf2_reference", "boft_factor1", "oft_cayley"] {
        let (l_fused, g_fused) = forward_backward(adapter);
        let (l_dev, g_dev) = reprpo_kernels::written_out(|| forward_backward(adapter));
        let e_logits = rel(&l_dev, &l_fused);
        assert!(e_logits < 1e-5, "{adapter}: logits {e_logits}");
        assert_eq!(g_fused.len(), g_dev.len());
        let mut e_grad = 0f64;
        for ((name, gf), (name_d, gd)) in g_fused.iter().zip(&g_dev) {
            assert_eq!(name, name_d);
            assert!(max_abs(gd) > 0.0, "{adapter}: zero gradient at {name}");
            let e = rel(gd, gf);
            assert!(e < 1e-5, "{adapter}: gradient {name} {e}");
            e_grad = e_grad.max(e);
        }
        eprintln!(
            "{adapter}: written-out vs fused: logits {e_logits:.1e}, gradients {e_grad:.1e} ({} params)",
            g_dev.len()
        );
        reprpo_kernels::written_out(|| {
            common::check_adapter(
                Llama::load(&common::fixture(BASE), DType::F32, &Device::Cpu).unwrap(),
                BASE,
                adapter,
                3,
                common::peft_load,
            )
        });
    }
}
