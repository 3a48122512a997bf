//! The CPU matmul of the patched candle-core (third_party/candle-core, `reprpo-matmul.patch`):
//! batches of small products run in parallel and the destination is not zeroed first. Each
//! product here is checked element by element against a plain f64 triple loop, for the layouts
//! the models use (contiguous, transposed rhs, a batch-broadcast rhs, an empty inner dimension).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use candle_core::{DType, Device, Tensor};

/// `a [b, m, k] x c [b, k, n]` by loops in f64.
fn naive(a: &Tensor, c: &Tensor) -> Vec<Vec<Vec<f64>>> {
    let a: Vec<Vec<Vec<f64>>> = a.to_dtype(DType::F64).unwrap().to_vec3().unwrap();
    let c: Vec<Vec<Vec<f64>>> = c.to_dtype(DType::F64).unwrap().to_vec3().unwrap();
    a.iter()
        .zip(&c)
        .map(|(ab, cb)| {
            ab.iter()
                .map(|row| {
                    (0..cb.first().map_or(0, Vec::len))
                        .map(|j| row.iter().zip(cb).map(|(x, r)| x * r[j]).sum())
                        .collect()
                })
                .collect()
        })
        .collect()
}

fn check(a: &Tensor, c: &Tensor, what: &str) {
    let got: Vec<Vec<Vec<f32>>> = a.matmul(c).unwrap().to_vec3().unwrap();
    let want = naive(a, &c.contiguous().unwrap());
    assert_eq!(got.len(), want.len(), "{what}");
    let mut worst = 0f64;
    for (gb, wb) in got.iter().zip(&want) {
        for (gr, wr) in gb.iter().zip(wb) {
            assert_eq!(gr.len(), wr.len(), "{what}");
            for (g, w) in gr.iter().zip(wr) {
                worst = worst.max((f64::from(*g) - w).abs());
            }
        }
    }
    assert!(worst < 1e-5, "{what}: max abs diff {worst}");
}

#[test]
fn batched_small_products_match_a_naive_product() {
    let dev = Device::Cpu;
    let a = Tensor::randn(0f32, 1.0, (24, 9, 16), &dev).unwrap();
    let c = Tensor::randn(0f32, 1.0, (24, 16, 11), &dev).unwrap();
    check(&a, &c, "contiguous batch of 24");
    // Attention's scores: q k^T with k transposed in place.
    let k = Tensor::randn(0f32, 1.0, (24, 11, 16), &dev).unwrap();
    check(&a, &k.transpose(1, 2).unwrap(), "transposed rhs");
    // One rhs for every batch entry (stride 0 on the batch).
    let w = Tensor::randn(0f32, 1.0, (1, 16, 7), &dev).unwrap();
    check(
        &a,
        &w.broadcast_as((24, 16, 7)).unwrap(),
        "batch-broadcast rhs",
    );
    // A batch-broadcast lhs goes through the per-entry loop.
    let l = Tensor::randn(0f32, 1.0, (1, 9, 16), &dev).unwrap();
    check(
        &l.broadcast_as((24, 9, 16)).unwrap(),
        &c,
        "batch-broadcast lhs",
    );
    // One large product (gemm's own threading) beside the small ones.
    let big_a = Tensor::randn(0f32, 1.0, (2, 130, 140), &dev).unwrap();
    let big_c = Tensor::randn(0f32, 1.0, (2, 140, 150), &dev).unwrap();
    let got: Vec<Vec<Vec<f32>>> = big_a.matmul(&big_c).unwrap().to_vec3().unwrap();
    let want = naive(&big_a, &big_c);
    let worst = got
        .iter()
        .flatten()
        .flatten()
        .zip(want.iter().flatten().flatten())
        .map(|(g, w)| (f64::from(*g) - w).abs())
        .fold(0f64, f64::max);
    assert!(worst < 1e-3, "large product: {worst}");
}

#[test]
fn an_empty_inner_dimension_gives_zeros() {
    // The destination is not zeroed by candle any more: gemm must write the zeros itself.
    let dev = Device::Cpu;
    for _ in 0..3 {
        // Allocate and free garbage of the same size first, so that a skipped write would show.
        let junk = Tensor::full(7.5f32, (6, 5, 4), &dev).unwrap();
        drop(junk);
        let a = Tensor::zeros((6, 5, 0), DType::F32, &dev).unwrap();
        let c = Tensor::zeros((6, 0, 4), DType::F32, &dev).unwrap();
        let got: Vec<f32> = a
            .matmul(&c)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(got.len(), 6 * 5 * 4);
        assert!(got.iter().all(|&v| v == 0.0), "{got:?}");
    }
}
