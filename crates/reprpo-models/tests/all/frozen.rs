//! The frozen-weight matmul: same values and input gradient as candle's matmul (f32 and f64,
//! checked against finite differences in f64), and no gradient for the frozen weight.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use candle_core::{DType, Device, Tensor, Var};
use reprpo_models::frozen::frozen_matmul;

#[test]
fn values_and_input_gradient_match_matmul_and_weight_gets_none() {
    for dt in [DType::F32, DType::F64] {
        let dev = Device::Cpu;
        let x = Var::from_tensor(
            &Tensor::randn(0f32, 1.0, (7, 5), &dev)
                .unwrap()
                .to_dtype(dt)
                .unwrap(),
        )
        .unwrap();
        let w = Tensor::randn(0f32, 1.0, (3, 5), &dev)
            .unwrap()
            .to_dtype(dt)
            .unwrap();
        let g = Tensor::randn(0f32, 1.0, (7, 3), &dev)
            .unwrap()
            .to_dtype(dt)
            .unwrap();
        let ours = frozen_matmul(x.as_tensor(), &w).unwrap();
        let plain = x.as_tensor().matmul(&w.t().unwrap()).unwrap();
        let d: f64 = (&ours - &plain)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(d < 1e-5, "{dt:?}: forward differs by {d}");
        let go = (&ours * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let gp = (&plain * &g)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let a = go.get(x.as_tensor()).unwrap();
        let b = gp.get(x.as_tensor()).unwrap();
        let d: f64 = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(d < 1e-5, "{dt:?}: input gradient differs by {d}");
        assert!(
            go.get(&w).is_none(),
            "the frozen weight must get no gradient"
        );
        // This count tests the workspace's candle-core PATCH, not this crate: upstream candle
        // stores (and computes) gradients for the constants too (`g`, and for the plain matmul
        // the weight-sized `w.t()`: 2 stored gradients each), the patched backward
        // (third_party/candle-core/REPRPO.md) keeps only the variable's. On stock candle-core
        // (tests/downstream/) the value and gradient checks above hold and these counts are 2.
        assert_eq!(go.get_ids().count(), 1, "the patched backward (REPRPO.md)");
        assert_eq!(gp.get_ids().count(), 1, "the patched backward (REPRPO.md)");
        if dt == DType::F64 {
            // Finite differences of s(x) = sum(g * x W^T) at one entry.
            let xv: Vec<Vec<f64>> = x.as_tensor().to_vec2().unwrap();
            let eps = 1e-6;
            let s = |xs: &Vec<Vec<f64>>| -> f64 {
                let t = Tensor::new(xs.clone(), &dev).unwrap();
                (frozen_matmul(&t, &w).unwrap() * &g)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar()
                    .unwrap()
            };
            let mut up = xv.clone();
            up[2][3] += eps;
            let mut down = xv.clone();
            down[2][3] -= eps;
            let fd = (s(&up) - s(&down)) / (2.0 * eps);
            let an: Vec<Vec<f64>> = a.to_vec2().unwrap();
            assert!(
                (fd - an[2][3]).abs() < 1e-6,
                "finite difference {fd} vs {}",
                an[2][3]
            );
        }
    }
}

/// A bf16 product with a weight over the blocking threshold (2^24 elements: an 8B
/// model's output head is 2^29): the forward equals candle's whole-operand bf16 matmul bit for
/// bit (the same f32 GEMM per output element, one rounding), the input gradient is the f32
/// product `g W` rounded once, up to the blocks' summation order. (f16 has gemm's own kernel
/// and is not blocked.)
#[test]
fn large_bf16_weights_run_in_blocks_with_the_same_values() {
    let dev = Device::Cpu;
    let (m, n, k) = (6, 33_000, 520);
    {
        let dt = DType::BF16;
        let x = Var::from_tensor(
            &Tensor::randn(0f32, 1.0, (m, k), &dev)
                .unwrap()
                .to_dtype(dt)
                .unwrap(),
        )
        .unwrap();
        let w = Tensor::randn(0f32, 0.05, (n, k), &dev)
            .unwrap()
            .to_dtype(dt)
            .unwrap();
        let ours = frozen_matmul(x.as_tensor(), &w).unwrap();
        // candle's own half-precision matmul (whole operands widened) as the reference.
        let plain = x.as_tensor().matmul(&w.t().unwrap()).unwrap();
        let bits = |t: &Tensor| -> Vec<f32> {
            t.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let (a, b) = (bits(&ours), bits(&plain));
        let same = a
            .iter()
            .zip(&b)
            .filter(|(x, y)| x.to_bits() == y.to_bits())
            .count();
        assert_eq!(
            same,
            a.len(),
            "{dt:?}: forward differs in {} of {}",
            a.len() - same,
            a.len()
        );
        let g = Tensor::randn(0f32, 1.0, (m, n), &dev)
            .unwrap()
            .to_dtype(dt)
            .unwrap();
        let grads = (&ours * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let got = bits(grads.get(x.as_tensor()).unwrap());
        let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let want = bits(&f(&g).matmul(&f(&w)).unwrap());
        let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        let err = got
            .iter()
            .zip(&want)
            .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        // One rounding to bf16 (8 bits) / f16 (11 bits) of values up to `scale`.
        let tol = scale * 8e-3;
        assert!(
            err <= tol,
            "{dt:?}: input gradient off by {err} (scale {scale})"
        );
        assert!(
            grads.get(&w).is_none(),
            "{dt:?}: the frozen weight got a gradient"
        );
    }
}
