//! `logps::token_logps` (the fused CPU kernel) against torch's `log_softmax` + `gather` (values
//! and the gradient of a weighted sum, from `tests/reference/gen_logps.py`), against the composed
//! version `token_logps_slow` on larger shapes in f32, bf16 and f16 (values and gradients), and
//! against central finite differences in f64.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use reprpo_models::logps::{SeqLogps, shifted_logps, token_logps, token_logps_slow};

fn fixture() -> HashMap<String, Tensor> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/logps.safetensors");
    candle_core::safetensors::load(p, &Device::Cpu).unwrap()
}

/// Max |a - b| / (1 + |b|), elementwise, in f32.
fn err(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    assert_eq!(a.dims(), b.dims());
    let e = ((&a - &b).unwrap().abs().unwrap() / (b.abs().unwrap() + 1.0).unwrap()).unwrap();
    e.flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// Max |a - b| / max |b| (for gradients, whose entries are mostly small).
fn rel(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    assert_eq!(a.dims(), b.dims());
    let m = |t: &Tensor| -> f32 {
        t.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    m(&(&a - &b).unwrap()) / m(&b).max(1e-30)
}

type LogpsFn = fn(&Tensor, &Tensor, &Tensor) -> reprpo_models::Result<SeqLogps>;

/// Values and the gradient of `sum(per_token * weight)` with respect to the logits.
fn run(f: LogpsFn, logits: &Tensor, ids: &Tensor, mask: &Tensor, w: &Tensor) -> (SeqLogps, Tensor) {
    let x = Var::from_tensor(logits).unwrap();
    let out = f(x.as_tensor(), ids, mask).unwrap();
    let s = (&out.per_token * w).unwrap().sum_all().unwrap();
    let g = s.backward().unwrap().get(x.as_tensor()).unwrap().clone();
    assert_eq!(g.dtype(), logits.dtype());
    (out, g)
}

#[test]
fn matches_torch_log_softmax_gather() {
    let fx = fixture();
    for case in ["f32_v37", "f32_v130", "bf16_v130"] {
        let k = |n: &str| fx[&format!("{case}.{n}")].clone();
        let logits = k("logits");
        let ids = k("ids").to_dtype(DType::U32).unwrap();
        let mask = k("mask");
        let w = k("weight");
        // Gradients in bf16 are rounded to bf16 (8 bits of mantissa).
        let grad_tol = if logits.dtype() == DType::BF16 {
            4e-3
        } else {
            2e-6
        };
        for (name, f) in [
            ("fused", token_logps as LogpsFn),
            ("composed", token_logps_slow as LogpsFn),
        ] {
            let (out, g) = run(f, &logits, &ids, &mask, &w);
            let e_tok = err(&out.per_token, &k("per_token"));
            let e_sum = err(&out.sum, &k("sum"));
            let e_grad = rel(&g, &k("grad"));
            eprintln!("{case}/{name}: per-token {e_tok:.1e}, sum {e_sum:.1e}, grad {e_grad:.1e}");
            assert!(e_tok < 2e-6, "{case}/{name}: per-token error {e_tok}");
            assert!(e_sum < 2e-6, "{case}/{name}: sum error {e_sum}");
            assert_eq!(err(&out.count, &k("count")), 0.0, "{case}/{name}: count");
            assert!(e_grad < grad_tol, "{case}/{name}: gradient error {e_grad}");
        }
    }
}

/// Uniform(-scale, scale) logits with a few large rows, token ids, and a left-padded mask.
fn random_case(b: usize, t: usize, v: usize, seed: u64) -> (Tensor, Tensor, Tensor, Tensor) {
    let dev = Device::Cpu;
    let mut s = seed;
    let mut next = move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 33) as f32 / (1u64 << 31) as f32
    };
    let logits: Vec<f32> = (0..b * t * v)
        .map(|i| (next() * 2.0 - 1.0) * 6.0 + if i / v % 5 == 1 { 40.0 } else { 0.0 })
        .collect();
    let ids: Vec<u32> = (0..b * t)
        .map(|_| (next() * v as f32) as u32 % v as u32)
        .collect();
    let mask: Vec<f32> = (0..b * t)
        .map(|i| if i % t >= (i / t) * 3 { 1.0 } else { 0.0 })
        .collect();
    let w: Vec<f32> = (0..b * (t - 1)).map(|_| next() * 2.0 - 1.0).collect();
    (
        Tensor::from_vec(logits, (b, t, v), &dev).unwrap(),
        Tensor::from_vec(ids, (b, t), &dev).unwrap(),
        Tensor::from_vec(mask, (b, t), &dev).unwrap(),
        Tensor::from_vec(w, (b, t - 1), &dev).unwrap(),
    )
}

#[test]
fn fused_matches_composed() {
    // 3 x 50 rows of 1001 logits: several rayon tasks, a remainder after the 8-wide lanes.
    let (logits, ids, mask, w) = random_case(3, 50, 1001, 9);
    for dt in [DType::F32, DType::BF16, DType::F16] {
        let x = logits.to_dtype(dt).unwrap();
        let (a, ga) = run(token_logps, &x, &ids, &mask, &w);
        let (b, gb) = run(token_logps_slow, &x, &ids, &mask, &w);
        let e_tok = err(&a.per_token, &b.per_token);
        let e_grad = rel(&ga, &gb);
        eprintln!("{dt:?}: per-token {e_tok:.1e}, gradient {e_grad:.1e}");
        assert!(e_tok < 2e-6, "{dt:?}: per-token {e_tok}");
        assert!(err(&a.sum, &b.sum) < 2e-6, "{dt:?}: sum");
        assert_eq!(err(&a.count, &b.count), 0.0);
        // bf16 / f16 gradients are rounded to their type: one ulp apart at most.
        let tol = match dt {
            DType::F32 => 1e-6,
            DType::F16 => 1e-3,
            _ => 8e-3,
        };
        assert!(e_grad < tol, "{dt:?}: gradient {e_grad}");
        // The masked rows and the last position have exactly zero gradient.
        let g: Vec<Vec<Vec<f32>>> = ga.to_dtype(DType::F32).unwrap().to_vec3().unwrap();
        let m: Vec<Vec<f32>> = mask.to_vec2().unwrap();
        for (bi, row) in g.iter().enumerate() {
            for (ti, gv) in row.iter().enumerate() {
                let counted = ti + 1 < m[bi].len() && m[bi][ti + 1] > 0.0;
                let any = gv.iter().any(|&v| v != 0.0);
                assert_eq!(any, counted, "row {bi} position {ti}");
            }
        }
    }
}

#[test]
fn gradient_matches_finite_differences_f64() {
    let (logits, ids, _, w) = random_case(2, 5, 11, 3);
    let logits = (logits.to_dtype(DType::F64).unwrap() * 0.2).unwrap();
    let w = w.to_dtype(DType::F64).unwrap();
    let f = |x: &Tensor| -> Tensor {
        let lp = shifted_logps(x, &ids).unwrap();
        assert_eq!(lp.dtype(), DType::F64);
        (lp * &w).unwrap().sum_all().unwrap()
    };
    let x = Var::from_tensor(&logits).unwrap();
    let g = f(x.as_tensor())
        .backward()
        .unwrap()
        .get(x.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let base: Vec<f64> = logits.flatten_all().unwrap().to_vec1().unwrap();
    let h = 1e-6;
    let mut worst = 0f64;
    for i in 0..base.len() {
        let at = |d: f64| -> f64 {
            let mut v = base.clone();
            v[i] += d;
            let t = Tensor::from_vec(v, logits.dims(), &Device::Cpu).unwrap();
            f(&t).to_scalar().unwrap()
        };
        let fd = (at(h) - at(-h)) / (2.0 * h);
        worst = worst.max((fd - g[i]).abs() / (1.0 + g[i].abs()));
    }
    eprintln!(
        "finite differences: worst {worst:.1e} over {} logits",
        base.len()
    );
    assert!(worst < 1e-8, "finite-difference error {worst}");
}

#[test]
fn edge_cases() {
    let dev = Device::Cpu;
    // One position: nothing is predicted.
    let logits = Tensor::zeros((2, 1, 5), DType::F32, &dev).unwrap();
    let ids = Tensor::zeros((2, 1), DType::U32, &dev).unwrap();
    let mask = Tensor::ones((2, 1), DType::F32, &dev).unwrap();
    let out = token_logps(&logits, &ids, &mask).unwrap();
    assert_eq!(out.per_token.dims(), &[2, 0]);
    // Uniform logits: log(1/V) everywhere.
    let logits = Tensor::zeros((1, 3, 8), DType::F32, &dev).unwrap();
    let ids = Tensor::new(&[[1u32, 2, 7]], &dev).unwrap();
    let mask = Tensor::ones((1, 3), DType::F32, &dev).unwrap();
    let out = token_logps(&logits, &ids, &mask).unwrap();
    let v: Vec<f32> = out.per_token.flatten_all().unwrap().to_vec1().unwrap();
    for x in v {
        assert!((x - (1f32 / 8.0).ln()).abs() < 1e-6, "{x}");
    }
    // An id past the vocabulary is an error, not a panic.
    let ids = Tensor::new(&[[1u32, 2, 8]], &dev).unwrap();
    assert!(token_logps(&logits, &ids, &mask).is_err());
}

/// `row_logps` on the rows `(b, t-1)` of `[B, T, V]` logits with targets `ids[b, t]` gives
/// `shifted_logps`' values (the kernel of `token_logps`; f32 and bf16 logits: the same arithmetic,
/// 1e-6 relative; f64: 1e-12).
#[test]
fn row_logps_equals_token_logps_per_token() {
    use reprpo_models::logps::row_logps;
    let dev = candle_core::Device::Cpu;
    let (b, t, v) = (3usize, 6usize, 97usize);
    for dt in [
        candle_core::DType::F32,
        candle_core::DType::BF16,
        candle_core::DType::F64,
    ] {
        let logits = candle_core::Tensor::randn(0f32, 3.0, (b, t, v), &dev)
            .unwrap()
            .to_dtype(dt)
            .unwrap();
        let ids: Vec<u32> = (0..b * t).map(|i| ((i * 37 + 11) % v) as u32).collect();
        let ids_t = candle_core::Tensor::from_vec(ids.clone(), (b, t), &dev).unwrap();
        let want: Vec<Vec<f64>> = shifted_logps(&logits, &ids_t)
            .unwrap()
            .to_dtype(candle_core::DType::F64)
            .unwrap()
            .to_vec2()
            .unwrap();
        let mut rows = Vec::new();
        let mut targets = Vec::new();
        for bi in 0..b {
            for ti in 1..t {
                rows.push((bi * t + ti - 1) as u32);
                targets.push(ids[bi * t + ti]);
            }
        }
        let idx = candle_core::Tensor::from_vec(rows, b * (t - 1), &dev).unwrap();
        let sel = logits
            .reshape((b * t, v))
            .unwrap()
            .index_select(&idx, 0)
            .unwrap();
        let got = row_logps(&sel, &targets).unwrap();
        let tol = if dt == candle_core::DType::F64 {
            1e-12
        } else {
            1e-6
        };
        for bi in 0..b {
            for ti in 1..t {
                let g = got[bi * (t - 1) + ti - 1];
                let w = want[bi][ti - 1];
                assert!(
                    (g - w).abs() <= tol * w.abs().max(1.0),
                    "{dt:?} ({bi},{ti}): {g} vs {w}"
                );
            }
        }
        assert!(row_logps(&sel, &targets[1..]).is_err());
    }
}

/// `row_token_logps` on the selected rows `(b, t-1)` equals `token_logps`, values and the
/// gradient of a weighted sum with respect to the full logits (through the row selection), in f32
/// (1e-6) and f64 (1e-12).
#[test]
fn row_token_logps_values_and_gradient_equal_token_logps() {
    use reprpo_models::logps::row_token_logps;
    let dev = Device::Cpu;
    let (b, t, v) = (3usize, 7usize, 61usize);
    // Counted positions: a ragged completion mask.
    let mask: Vec<f32> = (0..b * t)
        .map(|i| f32::from(u8::from(i % t >= 2 + i / t)))
        .collect();
    let ids: Vec<u32> = (0..b * t).map(|i| ((i * 29 + 5) % v) as u32).collect();
    let weights: Vec<f32> = (0..b).map(|i| 0.5 + i as f32).collect();
    for (dt, tol) in [(DType::F32, 1e-6), (DType::F64, 1e-12)] {
        let x = Var::from_tensor(
            &Tensor::randn(0f32, 2.0, (b, t, v), &dev)
                .unwrap()
                .to_dtype(dt)
                .unwrap(),
        )
        .unwrap();
        let ids_t = Tensor::from_vec(ids.clone(), (b, t), &dev).unwrap();
        let mask_t = Tensor::from_vec(mask.clone(), (b, t), &dev).unwrap();
        let w = Tensor::from_vec(weights.clone(), b, &dev).unwrap();
        // The reference in the logits' precision: `shifted_logps` is f64 for f64 logits
        // (`token_logps` rounds its sums to f32).
        let acc = if dt == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let per_token = shifted_logps(x.as_tensor(), &ids_t).unwrap();
        let m = mask_t.narrow(1, 1, t - 1).unwrap().to_dtype(acc).unwrap();
        let full_sum = (per_token * m).unwrap().sum(1).unwrap();
        let loss_full = (full_sum * w.to_dtype(acc).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        // And `token_logps` itself agrees with it to f32 rounding.
        let tl = token_logps(x.as_tensor(), &ids_t, &mask_t).unwrap();
        let tl_loss = (tl.sum * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let fl = loss_full
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!((f64::from(tl_loss) - fl).abs() <= 1e-6 * fl.abs().max(1.0));
        let (mut pick, mut targets, mut owner) = (Vec::new(), Vec::new(), Vec::new());
        for bi in 0..b {
            for ti in 1..t {
                if mask[bi * t + ti] > 0.0 {
                    pick.push((bi * t + ti - 1) as u32);
                    targets.push(ids[bi * t + ti]);
                    owner.push(bi);
                }
            }
        }
        let n = pick.len();
        let sel = x
            .as_tensor()
            .reshape((b * t, v))
            .unwrap()
            .index_select(&Tensor::from_vec(pick, n, &dev).unwrap(), 0)
            .unwrap();
        let lp = row_token_logps(&sel, &targets).unwrap();
        let wr: Vec<f32> = owner.iter().map(|&o| weights[o]).collect();
        let wr = Tensor::from_vec(wr, n, &dev)
            .unwrap()
            .to_dtype(acc)
            .unwrap();
        let loss_rows = (lp * &wr).unwrap().sum_all().unwrap();
        let (a, c) = (
            loss_full
                .to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap(),
            loss_rows
                .to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap(),
        );
        assert!(
            (a - c).abs() <= tol * a.abs().max(1.0),
            "{dt:?}: {a} vs {c}"
        );
        let ga = loss_full.backward().unwrap();
        let gb = loss_rows.backward().unwrap();
        let ga = ga.get(x.as_tensor()).unwrap();
        let gb = gb.get(x.as_tensor()).unwrap();
        let e = err(ga, gb);
        assert!(
            f64::from(e) <= tol.max(1e-7),
            "{dt:?}: gradient differs by {e}"
        );
    }
}

#[test]
fn unshifted_nll_fused_matches_composed_with_gradient() {
    use reprpo_models::logps::unshifted_nll;
    // 2 x 9 rows of 1001 logits (SIMD vectors, a pair remainder and a scalar tail per row).
    let (logits, ids, mask, _) = random_case(2, 9, 1001, 17);
    let w = Tensor::rand(0f32, 1.0, (2, 9), &Device::Cpu).unwrap();
    let go = |x: &Var| {
        let nll = unshifted_nll(x.as_tensor(), &ids, &mask).unwrap();
        let g = (&nll * &w).unwrap().sum_all().unwrap().backward().unwrap();
        (nll, g.get(x).unwrap().clone())
    };
    let x = Var::from_tensor(&logits).unwrap();
    let (a, ga) = go(&x);
    let (b, gb) = reprpo_kernels::written_out(|| go(&x));
    let (e, eg) = (err(&a, &b), rel(&ga, &gb));
    eprintln!("unshifted_nll fused vs composed: values {e:.1e}, gradient {eg:.1e}");
    assert!(e < 2e-6, "values {e}");
    assert!(eg < 1e-6, "gradient {eg}");
    // Masked positions are exactly 0, counted ones -log p > 0.
    let (av, mv): (Vec<Vec<f32>>, Vec<Vec<f32>>) = (a.to_vec2().unwrap(), mask.to_vec2().unwrap());
    for (ra, rm) in av.iter().zip(&mv) {
        for (&v, &m) in ra.iter().zip(rm) {
            assert!(
                if m == 0.0 { v == 0.0 } else { v > 0.0 },
                "{v} under mask {m}"
            );
        }
    }
}
