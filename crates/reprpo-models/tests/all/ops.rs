//! The fused ops of `reprpo_models::ops` against their written-out differentiable versions:
//! values and gradients in f32 and f64, and the fused gradients against central finite
//! differences in f64. Also the fused grouped-query attention against `repeat_kv` attention.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use candle_core::{D, DType, Device, Tensor, Var};
use reprpo_models::llama::MASK_VALUE;
use reprpo_models::ops;

type Op = dyn Fn(&[Tensor]) -> Tensor;

fn randn(shape: &[usize], dt: DType, seed: u64) -> Tensor {
    // Deterministic pseudo-random values (candle's CPU rng is not seedable per call).
    let n: usize = shape.iter().product();
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let v: Vec<f64> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dt)
        .unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
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

/// Values of `op(inputs)` and gradients of `sum(op(inputs) * g)` for the inputs marked trainable.
fn run(
    op: &Op,
    inputs: &[Tensor],
    trainable: &[bool],
    g: &Tensor,
) -> (Tensor, Vec<Option<Tensor>>) {
    let vars: Vec<Option<Var>> = inputs
        .iter()
        .zip(trainable)
        .map(|(t, &tr)| tr.then(|| Var::from_tensor(t).unwrap()))
        .collect();
    let args: Vec<Tensor> = inputs
        .iter()
        .zip(&vars)
        .map(|(t, v)| {
            v.as_ref()
                .map_or_else(|| t.clone(), |v| v.as_tensor().clone())
        })
        .collect();
    let y = op(&args);
    let grads = (&y * g).unwrap().sum_all().unwrap().backward().unwrap();
    let gs = vars
        .iter()
        .map(|v| v.as_ref().and_then(|v| grads.get(v.as_tensor()).cloned()))
        .collect();
    (y, gs)
}

/// Fused vs slow: values and gradients (f32 and f64), then fused vs finite differences (f64)
/// unless `fd` is false.
#[allow(clippy::too_many_arguments)]
fn check(
    fd: bool,
    name: &str,
    fast: &Op,
    slow: &Op,
    shapes: &[Vec<usize>],
    trainable: &[bool],
    consts: &dyn Fn(DType) -> Vec<Tensor>,
) {
    for dt in [DType::F32, DType::F64] {
        let tol = if dt == DType::F32 { 1e-5 } else { 1e-12 };
        let mut inputs: Vec<Tensor> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| randn(s, dt, 17 + i as u64))
            .collect();
        inputs.extend(consts(dt));
        let mut tr = trainable.to_vec();
        tr.resize(inputs.len(), false);
        let y0 = fast(&inputs);
        let g = randn(y0.dims(), dt, 99);
        let (yf, gf) = run(fast, &inputs, &tr, &g);
        let (ys, gs) = run(slow, &inputs, &tr, &g);
        let d = max_diff(&yf, &ys);
        assert!(d < tol, "{name} {dt:?}: values differ by {d}");
        for (i, (a, b)) in gf.iter().zip(&gs).enumerate() {
            match (a, b) {
                (Some(a), Some(b)) => {
                    let d = max_diff(a, b);
                    assert!(
                        d < tol,
                        "{name} {dt:?}: gradient of input {i} differs by {d}"
                    );
                }
                (None, None) => {}
                _ => panic!("{name} {dt:?}: input {i} has a gradient on one side only"),
            }
        }
        if dt != DType::F64 || !fd {
            continue;
        }
        // Finite differences on a few entries of each trainable input.
        let loss = |ins: &[Tensor]| -> f64 {
            (fast(ins) * &g)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        for (i, grad) in gf.iter().enumerate() {
            let Some(grad) = grad else { continue };
            let flat: Vec<f64> = grad.flatten_all().unwrap().to_vec1().unwrap();
            let n = flat.len();
            for j in [0, n / 3, n / 2, n - 1] {
                let eps = 1e-6;
                let bump = |sign: f64| -> f64 {
                    let mut v: Vec<f64> = inputs[i].flatten_all().unwrap().to_vec1().unwrap();
                    v[j] += sign * eps;
                    let mut ins = inputs.clone();
                    ins[i] = Tensor::from_vec(v, inputs[i].dims(), &Device::Cpu).unwrap();
                    loss(&ins)
                };
                let fd = (bump(1.0) - bump(-1.0)) / (2.0 * eps);
                let err = (fd - flat[j]).abs() / (1.0 + flat[j].abs());
                assert!(
                    err < 1e-6,
                    "{name}: input {i}[{j}] finite difference {fd} vs {}",
                    flat[j]
                );
            }
        }
    }
}

#[test]
fn rms_norm_matches_slow_with_and_without_weight_gradient() {
    let fast: &Op = &|a| ops::rms_norm(&a[0], &a[1], 1e-6).unwrap();
    let slow: &Op = &rms_reference;
    let shapes = [vec![2, 3, 16], vec![16]];
    check(
        true,
        "rms_norm (trainable weight)",
        fast,
        slow,
        &shapes,
        &[true, true],
        &|_| vec![],
    );
    check(
        true,
        "rms_norm (frozen weight)",
        fast,
        slow,
        &shapes,
        &[true, false],
        &|_| vec![],
    );
}

/// `rms_norm_slow` computes in f32 whatever the dtype (as transformers); the fused op keeps f64
/// in f64. f64 is compared with the same formula written out without the cast.
fn rms_reference(a: &[Tensor]) -> Tensor {
    if a[0].dtype() == DType::F32 {
        return ops::rms_norm_slow(&a[0], &a[1], 1e-6).unwrap();
    }
    let var = a[0].sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
    a[0].broadcast_div(&(var + 1e-6).unwrap().sqrt().unwrap())
        .unwrap()
        .broadcast_mul(&a[1])
        .unwrap()
}

/// Shapes large enough for the fused kernels to split rows across threads.
#[test]
fn fused_ops_match_slow_on_multithreaded_sizes() {
    let rms: &Op = &|a| ops::rms_norm(&a[0], &a[1], 1e-6).unwrap();
    let rms_slow: &Op = &rms_reference;
    check(
        false,
        "rms_norm large",
        rms,
        rms_slow,
        &[vec![4, 64, 256], vec![256]],
        &[true, false],
        &|_| vec![],
    );
    let rope: &Op = &|a| ops::rope(&a[0], &a[1], &a[2]).unwrap();
    let rope_slow: &Op = &|a| ops::rope_slow(&a[0], &a[1], &a[2]).unwrap();
    check(
        false,
        "rope large",
        rope,
        rope_slow,
        &[vec![2, 4, 96, 64]],
        &[true],
        &|dt| tables(2, 96, 64, dt),
    );
    let sm: &Op = &|a| ops::masked_softmax(&a[0], &a[1], 0.125).unwrap();
    let sm_slow: &Op = &|a| ops::masked_softmax_slow(&a[0], &a[1], 0.125).unwrap();
    check(
        false,
        "softmax large",
        sm,
        sm_slow,
        &[vec![2, 2, 2 * 96, 96]],
        &[true],
        &|_| vec![mask(2, 96, 96, true)],
    );
    let silu: &Op = &|a| ops::silu_mul(&a[0], &a[1]).unwrap();
    let silu_slow: &Op = &|a| ops::silu_mul_slow(&a[0], &a[1]).unwrap();
    check(
        false,
        "silu_mul large",
        silu,
        silu_slow,
        &[vec![64, 1024], vec![64, 1024]],
        &[true, true],
        &|_| vec![],
    );
    let packed: &Op = &|a| ops::silu_mul_packed(&a[0]).unwrap();
    let packed_slow: &Op = &|a| {
        ops::silu_mul_slow(
            &a[0].narrow(D::Minus1, 0, 512).unwrap(),
            &a[0].narrow(D::Minus1, 512, 512).unwrap(),
        )
        .unwrap()
    };
    check(
        false,
        "silu_mul_packed large",
        packed,
        packed_slow,
        &[vec![96, 1024]],
        &[true],
        &|_| vec![],
    );
}

#[test]
fn frozen_rms_norm_weight_gets_no_gradient() {
    let x = Var::from_tensor(&randn(&[4, 8], DType::F32, 1)).unwrap();
    let f64_diff = max_diff(
        &ops::rms_norm(
            &x.as_tensor().to_dtype(DType::F64).unwrap(),
            &randn(&[8], DType::F64, 2),
            1e-5,
        )
        .unwrap(),
        &ops::rms_norm_slow(
            &x.as_tensor().to_dtype(DType::F64).unwrap(),
            &randn(&[8], DType::F64, 2),
            1e-5,
        )
        .unwrap(),
    );
    assert!(
        f64_diff < 1e-6,
        "f64 differs from the f32-internal slow version by {f64_diff}"
    );
    let w = randn(&[8], DType::F32, 2);
    let grads = ops::rms_norm(x.as_tensor(), &w, 1e-5)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(grads.get(x.as_tensor()).is_some());
    assert!(grads.get(&w).is_none());
}

fn tables(b: usize, t: usize, rd: usize, dt: DType) -> Vec<Tensor> {
    // cos/sin of position * inv_freq in the `cat(freqs, freqs)` layout, as the models build them.
    let inv: Vec<f64> = (0..rd / 2)
        .map(|i| 1.0 / 10_000f64.powf(2.0 * i as f64 / rd as f64))
        .collect();
    let mut f = Vec::new();
    for bi in 0..b {
        for p in 0..t {
            let pos = (p + 3 * bi) as f64;
            for _ in 0..2 {
                f.extend(inv.iter().map(|v| pos * v));
            }
        }
    }
    let f = Tensor::from_vec(f, (b, 1, t, rd), &Device::Cpu).unwrap();
    vec![
        f.cos().unwrap().to_dtype(dt).unwrap(),
        f.sin().unwrap().to_dtype(dt).unwrap(),
    ]
}

#[test]
fn rope_matches_slow() {
    let fast: &Op = &|a| ops::rope(&a[0], &a[1], &a[2]).unwrap();
    let slow: &Op = &|a| ops::rope_slow(&a[0], &a[1], &a[2]).unwrap();
    // Full rotary, per-batch tables.
    check(
        true,
        "rope",
        fast,
        slow,
        &[vec![2, 3, 5, 8]],
        &[true],
        &|dt| tables(2, 5, 8, dt),
    );
    // Shared tables, partial rotary (Phi-3's partial_rotary_factor).
    check(
        true,
        "rope partial",
        fast,
        slow,
        &[vec![2, 3, 5, 8]],
        &[true],
        &|dt| tables(1, 5, 4, dt),
    );
    // A strided input: [B, T, H, D] transposed to [B, H, T, D], as the models pass it.
    let fast_t: &Op = &|a| ops::rope(&a[0].transpose(1, 2).unwrap(), &a[1], &a[2]).unwrap();
    let slow_t: &Op = &|a| ops::rope_slow(&a[0].transpose(1, 2).unwrap(), &a[1], &a[2]).unwrap();
    check(
        true,
        "rope strided",
        fast_t,
        slow_t,
        &[vec![2, 5, 3, 8]],
        &[true],
        &|dt| tables(2, 5, 8, dt),
    );
}

fn mask(b: usize, t: usize, s: usize, padded: bool) -> Tensor {
    // Causal over the last t of s keys; with `padded`, batch row 1 has two left-padding keys
    // (and therefore fully masked query rows).
    let mut v = Vec::new();
    for bi in 0..b {
        for i in 0..t {
            for j in 0..s {
                let causal = j <= i + (s - t);
                let real = !(padded && bi == 1 && j < 2);
                v.push(if causal && real { 0f32 } else { MASK_VALUE });
            }
        }
    }
    Tensor::from_vec(v, (b, 1, t, s), &Device::Cpu).unwrap()
}

#[test]
fn masked_softmax_matches_slow() {
    const SCALE: f64 = 0.3;
    let fast: &Op = &|a| ops::masked_softmax(&a[0], &a[1], SCALE).unwrap();
    let slow: &Op = &|a| ops::masked_softmax_slow(&a[0], &a[1], SCALE).unwrap();
    // [B, G, R * T, S] with R = 2 repeats, per-batch padding mask. Rows with every key masked
    // have all scores equal to MASK_VALUE (the scores are absorbed), so their true derivative is
    // 0 while the analytic gradient (fused and slow alike) is not: no finite differences here.
    check(
        false,
        "softmax padded",
        fast,
        slow,
        &[vec![2, 2, 2 * 4, 4]],
        &[true],
        &|_| vec![mask(2, 4, 4, true)],
    );
    // Shared causal mask, more keys than queries (a cache).
    check(
        true,
        "softmax shared",
        fast,
        slow,
        &[vec![2, 3, 3, 6]],
        &[true],
        &|_| vec![mask(1, 3, 6, false)],
    );
}

#[test]
fn silu_mul_matches_slow() {
    let fast: &Op = &|a| ops::silu_mul(&a[0], &a[1]).unwrap();
    let slow: &Op = &|a| ops::silu_mul_slow(&a[0], &a[1]).unwrap();
    check(
        true,
        "silu_mul",
        fast,
        slow,
        &[vec![3, 4, 6], vec![3, 4, 6]],
        &[true, true],
        &|_| vec![],
    );
    let fast_p: &Op = &|a| ops::silu_mul_packed(&a[0]).unwrap();
    let slow_p: &Op = &|a| {
        let i = a[0].dim(D::Minus1).unwrap() / 2;
        ops::silu_mul_slow(
            &a[0].narrow(D::Minus1, 0, i).unwrap(),
            &a[0].narrow(D::Minus1, i, i).unwrap(),
        )
        .unwrap()
    };
    check(
        true,
        "silu_mul_packed",
        fast_p,
        slow_p,
        &[vec![3, 4, 12]],
        &[true],
        &|_| vec![],
    );
}

/// Attention as transformers' eager path: `repeat_kv`, scores, mask, softmax, values.
fn attention_reference(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Tensor {
    let (b, nh, t, hd) = q.dims4().unwrap();
    let (_, nkv, s, _) = k.dims4().unwrap();
    let rep = nh / nkv;
    let expand = |x: &Tensor| {
        x.unsqueeze(2)
            .unwrap()
            .broadcast_as((b, nkv, rep, s, hd))
            .unwrap()
            .reshape((b, nh, s, hd))
            .unwrap()
    };
    let (k, v) = (expand(k), expand(v));
    let scores = (q.matmul(&k.t().unwrap()).unwrap() / (hd as f64).sqrt()).unwrap();
    let scores = scores
        .broadcast_add(&mask.to_dtype(q.dtype()).unwrap())
        .unwrap();
    candle_nn::ops::softmax(&scores, D::Minus1)
        .unwrap()
        .matmul(&v)
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((b, t, nh * hd))
        .unwrap()
}

#[test]
fn grouped_query_attention_matches_repeat_kv() {
    let fast: &Op = &|a| ops::attention(&a[0], &a[1], &a[2], &a[3]).unwrap();
    let slow: &Op = &|a| attention_reference(&a[0], &a[1], &a[2], &a[3]);
    // f32 only in the fused path's scores; the check runs f32 and f64 inputs (f64 scores are
    // computed in f32 by both, as the models do), so compare f32 here.
    let shapes = [vec![2, 4, 5, 8], vec![2, 2, 5, 8], vec![2, 2, 5, 8]];
    for dt in [DType::F32] {
        let ins: Vec<Tensor> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| randn(s, dt, 5 + i as u64))
            .chain([mask(2, 5, 5, true)])
            .collect();
        let g = randn(&[2, 5, 32], dt, 7);
        let tr = [true, true, true, false];
        let (yf, gf) = run(fast, &ins, &tr, &g);
        let (ys, gs) = run(slow, &ins, &tr, &g);
        assert!(max_diff(&yf, &ys) < 1e-5);
        for (a, b) in gf.iter().zip(&gs).take(3) {
            let d = max_diff(a.as_ref().unwrap(), b.as_ref().unwrap());
            assert!(d < 1e-5, "attention gradient differs by {d}");
        }
    }
}

#[test]
fn lora_matmul_matches_written_out_lora() {
    use reprpo_models::frozen::lora_matmul;
    // Inputs: x [m, in], a [r, in], b [out, r] (trainable), w [out, in] (frozen).
    let fast: &Op = &|a| lora_matmul(&a[0], &a[3], &a[1], &a[2], 0.75).unwrap();
    let slow: &Op = &|a| {
        let base = a[0].matmul(&a[3].t().unwrap()).unwrap();
        let lora = a[0]
            .matmul(&a[1].t().unwrap())
            .unwrap()
            .matmul(&a[2].t().unwrap())
            .unwrap();
        (base + (lora * 0.75).unwrap()).unwrap()
    };
    let w = |dt| vec![randn(&[6, 5], dt, 3)];
    let shapes = [vec![7, 5], vec![2, 5], vec![6, 2]];
    check(
        true,
        "lora_matmul",
        fast,
        slow,
        &shapes,
        &[true, true, true],
        &w,
    );
    // The frozen weight gets no gradient even when it is a tracked tensor.
    let wv = Var::from_tensor(&randn(&[6, 5], DType::F32, 3)).unwrap();
    let x = Var::from_tensor(&randn(&[7, 5], DType::F32, 4)).unwrap();
    let grads = lora_matmul(
        x.as_tensor(),
        wv.as_tensor(),
        &randn(&[2, 5], DType::F32, 5),
        &randn(&[6, 2], DType::F32, 6),
        0.5,
    )
    .unwrap()
    .sum_all()
    .unwrap()
    .backward()
    .unwrap();
    assert!(grads.get(x.as_tensor()).is_some());
    assert!(grads.get(wv.as_tensor()).is_none());
}
