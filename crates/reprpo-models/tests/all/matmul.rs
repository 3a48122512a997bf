//! The CPU matmul of the patched candle-core (third_party/candle-core, `reprpo-matmul.patch`):
//! batches of small products run in parallel and the destination is not zeroed first. Each
//! product here is checked element by element against a plain f64 triple loop, for the layouts
//! the models use (contiguous, transposed rhs, a batch-broadcast rhs, an empty inner dimension).
//! And its half-precision conversions (`reprpo-dtype.patch`, split over threads): `to_dtype`
//! between bf16 / f16 and f32 and the bf16 matmul against `half`'s scalar conversions.
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

/// `n` f32 values with the conversions' edge cases first (ties to even, NaN, infinities,
/// subnormals, overflow to infinity in f16), then a seeded spread.
fn edge_values(n: usize) -> Vec<f32> {
    let mut v = vec![
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        0.0,
        -0.0,
        1.0 + f32::EPSILON * 64.0, // a bf16 tie
        f32::from_bits(0x3f80_8000),
        f32::from_bits(0x3f81_8000),
        1e-40,
        -7e-39,
        70000.0,
        65519.0,
        f32::MAX,
    ];
    let mut s = 0x9e37_79b9u32;
    while v.len() < n {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        v.push(f32::from_bits(s) % 1e6);
    }
    v
}

fn bits_eq(a: &[f32], b: &[f32]) -> bool {
    a.iter()
        .zip(b)
        .all(|(x, y)| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()))
}

#[test]
fn half_conversions_equal_the_scalar_ones() {
    use half::{bf16, f16};
    // Over the threading threshold (and a view with an offset: the non-contiguous path too).
    let v = edge_values(300_001);
    let t = Tensor::from_vec(v.clone(), v.len(), &Device::Cpu).unwrap();
    let want_b: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
    let want_h: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
    let got_b: Vec<bf16> = t.to_dtype(DType::BF16).unwrap().to_vec1().unwrap();
    let got_h: Vec<f16> = t.to_dtype(DType::F16).unwrap().to_vec1().unwrap();
    let same = |a: &[u16], b: &[u16]| a == b;
    let bits_b = |x: &[bf16]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    let bits_h = |x: &[f16]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert!(same(&bits_b(&got_b), &bits_b(&want_b)), "f32 -> bf16");
    assert!(same(&bits_h(&got_h), &bits_h(&want_h)), "f32 -> f16");
    let back_b: Vec<f32> = Tensor::from_vec(want_b.clone(), v.len(), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap();
    let back_h: Vec<f32> = Tensor::from_vec(want_h.clone(), v.len(), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap();
    let scalar_b: Vec<f32> = want_b.iter().map(|x| x.to_f32()).collect();
    let scalar_h: Vec<f32> = want_h.iter().map(|x| x.to_f32()).collect();
    assert!(bits_eq(&back_b, &scalar_b), "bf16 -> f32");
    assert!(bits_eq(&back_h, &scalar_h), "f16 -> f32");
    // A strided view (every other element of a [n/2, 2] matrix's first column).
    let m = t
        .narrow(0, 1, 300_000)
        .unwrap()
        .reshape((150_000, 2))
        .unwrap();
    let col: Vec<f32> = m
        .narrow(1, 0, 1)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let want: Vec<f32> = (0..150_000)
        .map(|i| bf16::from_f32(v[1 + 2 * i]).to_f32())
        .collect();
    assert!(bits_eq(&col, &want), "strided f32 -> bf16 -> f32");
}

#[test]
fn bf16_matmul_is_the_f32_product_rounded_once() {
    use half::bf16;
    let dev = Device::Cpu;
    let a = Tensor::randn(0f32, 1.0, (3, 257, 130), &dev)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let b = Tensor::randn(0f32, 1.0, (3, 130, 65), &dev)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let got: Vec<bf16> = a
        .matmul(&b)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    let want: Vec<bf16> = f(&a)
        .matmul(&f(&b))
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(got, want);
    // And close to the exact product (one bf16 rounding of an f32 accumulation).
    let exact = naive(&a, &b);
    let flat: Vec<f64> = exact.iter().flatten().flatten().copied().collect();
    for (g, w) in got.iter().zip(&flat) {
        assert!(
            (f64::from(g.to_f32()) - w).abs() <= 1e-2 * (1.0 + w.abs()),
            "{g} vs {w}"
        );
    }
}
