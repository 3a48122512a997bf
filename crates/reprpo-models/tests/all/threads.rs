//! The thread patch of the vendored candle-core (third_party/candle-core, `reprpo-threads.patch`):
//! inside `Device::with_context` (where `xtask` and the train/eval jobs run), candle's large
//! elementwise ops split their work over the rayon pool instead of the barrier pool. Each op here
//! is checked element by element against plain Rust on the same inputs, on and off the pool, on
//! sizes above candle's parallel threshold (64 Ki elements) that are not a multiple of its chunk
//! (16 Ki), for a contiguous unary op, a contiguous binary op and a broadcast binary op. A deep
//! backward on the pool checks that its threads have room for the graph recursion.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use candle_core::{Device, Tensor, Var};

/// Element count: above candle's 64 Ki threshold, not a multiple of its 16 Ki chunk.
const N: usize = 3 * 65_536 + 1_234;

fn inputs() -> (Vec<f32>, Vec<f32>) {
    let a: Vec<f32> = (0..N)
        .map(|i| ((i * 37 % 1001) as f32) * 1e-3 - 0.5)
        .collect();
    let b: Vec<f32> = (0..N).map(|i| ((i * 53 % 997) as f32) * 1e-3).collect();
    (a, b)
}

/// Every element of the three ops, compared exactly with the same f32 arithmetic in plain Rust.
fn check_ops(where_: &str) {
    let dev = Device::Cpu;
    let (a, b) = inputs();
    let ta = Tensor::from_slice(&a, N, &dev).unwrap();
    let tb = Tensor::from_slice(&b, N, &dev).unwrap();

    let got: Vec<f32> = ta.exp().unwrap().to_vec1().unwrap();
    for (i, (g, x)) in got.iter().zip(&a).enumerate() {
        assert_eq!(g.to_bits(), x.exp().to_bits(), "{where_}: exp at {i}");
    }
    assert_eq!(got.len(), N);

    let got: Vec<f32> = (&ta * &tb).unwrap().to_vec1().unwrap();
    for (i, g) in got.iter().enumerate() {
        assert_eq!(*g, a[i] * b[i], "{where_}: mul at {i}");
    }
    assert_eq!(got.len(), N);

    // [rows, cols] + [cols] broadcast over rows: a non-trivial NdIter walk per work unit.
    let (rows, cols) = (N / 1_000, 1_000);
    let m = Tensor::from_slice(&a[..rows * cols], (rows, cols), &dev).unwrap();
    let v = Tensor::from_slice(&b[..cols], cols, &dev).unwrap();
    let got: Vec<Vec<f32>> = m.broadcast_add(&v).unwrap().to_vec2().unwrap();
    for (r, row) in got.iter().enumerate() {
        for (c, g) in row.iter().enumerate() {
            assert_eq!(
                *g,
                a[r * cols + c] + b[c],
                "{where_}: broadcast add at {r},{c}"
            );
        }
    }
}

#[test]
fn elementwise_ops_cover_every_element_on_and_off_the_pool() {
    check_ops("calling thread");
    Device::Cpu.with_context(|| check_ops("candle's rayon pool"));
}

#[test]
fn pool_threads_have_room_for_a_deep_backward() {
    // 20000 chained ops: candle's backward walks the graph recursively; on a thread with rayon's
    // default 2 MiB stack this depth aborts with a stack overflow (checked once by hand). The
    // pool's threads have 64 MiB, more than the 8 MiB main thread that ran jobs before.
    let g = Device::Cpu.with_context(|| {
        let x = Var::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
        let mut y = x.as_tensor().clone();
        for _ in 0..20_000 {
            y = (y * 1.0001).unwrap();
        }
        let grads = y.sum_all().unwrap().backward().unwrap();
        grads.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap()
    });
    let want = 1.0001f64.powi(20_000) as f32;
    for v in g {
        assert!((v - want).abs() <= 1e-3 * want, "{v} vs {want}");
    }
}
