//! Criterion bench of `token_logps` (fused CPU kernel) against `token_logps_slow` (composed
//! candle ops): forward, and forward + backward of `sum(per_token)`, at the `small` step shape
//! (4 x 128 positions, vocabulary 32000), f32 and bf16.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;

use candle_core::{DType, Device, Tensor, Var};
use criterion::{Criterion, criterion_group, criterion_main};
use reprpo_models::logps::{token_logps, token_logps_slow};

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    let (b, t, v) = (4, 128, 32000);
    let logits = Tensor::randn(0f32, 3.0, (b, t, v), &dev).unwrap();
    let ids = Tensor::rand(0f32, v as f32, (b, t), &dev)
        .unwrap()
        .to_dtype(DType::U32)
        .unwrap();
    let mask = Tensor::ones((b, t), DType::F32, &dev).unwrap();
    for dt in [DType::F32, DType::BF16] {
        let x = Var::from_tensor(&logits.to_dtype(dt).unwrap()).unwrap();
        for (name, f) in [
            ("fused", token_logps as fn(_, _, _) -> _),
            ("composed", token_logps_slow),
        ] {
            c.bench_function(&format!("logps_{name}_{dt:?}_fwd"), |bch| {
                bch.iter(|| black_box(f(x.as_tensor(), &ids, &mask).unwrap().sum))
            });
            c.bench_function(&format!("logps_{name}_{dt:?}_fwd_bwd"), |bch| {
                bch.iter(|| {
                    let out = f(x.as_tensor(), &ids, &mask).unwrap();
                    black_box(out.sum.sum_all().unwrap().backward().unwrap())
                })
            });
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
