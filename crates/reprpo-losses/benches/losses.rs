//! Criterion benches of the loss kernels, forward + backward on the CPU (the side-by-side
//! comparison with PyTorch is `tests/reference/bench_losses.sh`, which reads these results):
//!
//! - `dpo_{sigmoid,ipo,hinge}/b{8,2}_{f32,bf16}`: `dpo_loss` on `[B]` summed log-probabilities,
//!   backward into the two policy inputs;
//! - `reprpo_{variant}/{L}x{B}x{T}x{H}_{f32,bf16}`: `reprpo_loss` at the realistic shape
//!   3 x 8 x 512 x 2048 and the small shape 3 x 2 x 64 x 256, progress 0.5, backward into the two
//!   policy hidden-state tensors; `reprpo_original_fused` is the fused kernel (`reprpo_loss`),
//!   `reprpo_original_unfused` the same loss through `reprpo_loss_unfused` (in the input dtype);
//!   every other variant through `reprpo_loss`: the fused kernel for all but `cka`, which runs its
//!   chain of candle ops, in f32 for bf16 inputs (what `reprpo_loss` does with half-precision
//!   hidden states off the fused path); `reprpo_original_mean` is the original distance with
//!   `token_reduction = mean` (pooled sequences; the chain of candle ops).
//!
//! Masks: example `b` of `B` has its chosen sequence left-padded by `b T / (4B)` positions and its
//! rejected sequence right-padded by `b T / (3B)` (integer division), as in the PyTorch script.
//! Sample counts are small (10 at the realistic shape, flat sampling) so that the whole bench takes
//! minutes on two cores; filter with e.g. `cargo bench -p reprpo-losses --bench losses -- 3x2x64`.
//! `reprpo_original_unfused` runs in bf16 at the realistic shape only with `REPRPO_BENCH_FULL=1`
//! (candle's native bf16 chain: seconds per step).
//!
//! The global allocator is mimalloc, as in the `xtask` binary that trains (with glibc's allocator
//! every iteration pays page faults for its freshly mapped gradient buffers).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;
use std::time::Duration;

use candle_core::{DType, Device, Tensor, Var};
use criterion::{Criterion, SamplingMode, criterion_group, criterion_main};
use reprpo_losses::{
    DpoConfig, DpoInputs, DpoState, HiddenPairs, LossType, ReprPoConfig, ReprPoVariant,
    TokenReduction, reprpo_loss, reprpo_loss_unfused,
};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DTYPES: [(DType, &str); 2] = [(DType::F32, "f32"), (DType::BF16, "bf16")];

fn dpo_inputs(b: usize, dtype: DType) -> (DpoInputs, [Var; 2]) {
    let dev = Device::Cpu;
    let logp = |off: f32| {
        Tensor::randn(off, 5.0, b, &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    let pc = Var::from_tensor(&logp(-100.0)).unwrap();
    let pr = Var::from_tensor(&logp(-110.0)).unwrap();
    let n = Tensor::full(50f32, b, &dev)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let inputs = DpoInputs::new(
        pc.as_tensor().clone(),
        pr.as_tensor().clone(),
        logp(-101.0),
        logp(-109.0),
        n.clone(),
        n,
    );
    (inputs, [pc, pr])
}

fn bench_dpo(c: &mut Criterion) {
    let mut g = c.benchmark_group("dpo");
    g.warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    for (lt, name) in [
        (LossType::Sigmoid, "sigmoid"),
        (LossType::Ipo, "ipo"),
        (LossType::Hinge, "hinge"),
    ] {
        let cfg = DpoConfig {
            loss_type: vec![lt],
            ..Default::default()
        };
        for b in [8, 2] {
            for (dtype, dn) in DTYPES {
                let (inputs, vars) = dpo_inputs(b, dtype);
                g.bench_function(format!("{name}/b{b}_{dn}"), |bch| {
                    bch.iter(|| {
                        let mut state = DpoState::default();
                        let out = reprpo_losses::dpo_loss(&inputs, &cfg, &mut state).unwrap();
                        let grads = out.loss.backward().unwrap();
                        black_box(grads.get(vars[0].as_tensor()).is_some());
                    })
                });
            }
        }
    }
    g.finish();
}

/// Hidden-state inputs `[L, B, T, H]` with the masks of the module documentation.
fn hidden_inputs(
    (l, b, t, h): (usize, usize, usize, usize),
    dtype: DType,
) -> (HiddenPairs, [Var; 2]) {
    let dev = Device::Cpu;
    let randn = |s: f32| Tensor::randn(0f32, s, (l, b, t, h), &dev).unwrap();
    let rc = randn(1.0);
    let rr = ((&rc * 0.6).unwrap() + randn(0.8)).unwrap();
    let pc = (&rc + randn(0.3)).unwrap();
    let pr = (&rr + randn(0.3)).unwrap();
    let cast = |x: Tensor| x.to_dtype(dtype).unwrap();
    let mut mc = vec![0f32; b * t];
    let mut mr = vec![0f32; b * t];
    for bi in 0..b {
        let pad_c = bi * t / (4 * b);
        let pad_r = bi * t / (3 * b);
        for ti in 0..t {
            mc[bi * t + ti] = f32::from(u8::from(ti >= pad_c));
            mr[bi * t + ti] = f32::from(u8::from(ti < t - pad_r));
        }
    }
    let pc = Var::from_tensor(&cast(pc)).unwrap();
    let pr = Var::from_tensor(&cast(pr)).unwrap();
    let mut hp = HiddenPairs::new(
        pc.as_tensor().clone(),
        pr.as_tensor().clone(),
        cast(rc),
        cast(rr),
        Tensor::from_vec(mc, (b, t), &dev).unwrap(),
        Tensor::from_vec(mr, (b, t), &dev).unwrap(),
    );
    hp.dpo_z = Some(Tensor::randn(0f32, 0.1, b, &dev).unwrap());
    (hp, [pc, pr])
}

type LossFn = fn(&HiddenPairs, &ReprPoConfig, f64) -> reprpo_losses::Result<reprpo_losses::LossOut>;

fn kernels() -> Vec<(String, ReprPoConfig, LossFn)> {
    let mut v: Vec<(String, ReprPoConfig, LossFn)> = vec![
        (
            "original_fused".into(),
            ReprPoConfig::default(),
            reprpo_loss,
        ),
        (
            "original_unfused".into(),
            ReprPoConfig::default(),
            reprpo_loss_unfused,
        ),
    ];
    for var in ReprPoVariant::ALL {
        if var == ReprPoVariant::Original {
            continue;
        }
        let cfg = ReprPoConfig {
            variant: var,
            ..Default::default()
        };
        // rr-only takes the fused kernel too; its unfused chain is `original_unfused` minus a
        // multiply by 0.
        v.push((var.name().replace('-', "_"), cfg, reprpo_loss));
    }
    // Token reduction `mean` (pool each sequence over its real tokens, then compare per (l, b)):
    // the chain of candle ops (no fused kernel), in f32 for bf16 inputs.
    v.push((
        "original_mean".into(),
        ReprPoConfig {
            token_reduction: TokenReduction::Mean,
            ..Default::default()
        },
        reprpo_loss,
    ));
    v
}

fn bench_reprpo(c: &mut Criterion) {
    let full = std::env::var_os("REPRPO_BENCH_FULL").is_some_and(|v| v == "1");
    for (shape, big) in [((3, 2, 64, 256), false), ((3, 8, 512, 2048), true)] {
        let sname = format!("{}x{}x{}x{}", shape.0, shape.1, shape.2, shape.3);
        for (dtype, dn) in DTYPES {
            // Made on first use, so that a filtered run does not build the inputs it skips.
            let inputs = std::cell::OnceCell::new();
            for (kname, cfg, f) in kernels() {
                // The native bf16 chain takes seconds per step at the realistic shape; it runs
                // only with REPRPO_BENCH_FULL=1 (as tests/reference/bench_losses.sh sets).
                if big && dtype == DType::BF16 && kname == "original_unfused" && !full {
                    continue;
                }
                let mut g = c.benchmark_group(format!("reprpo_{kname}"));
                if big {
                    g.sample_size(10)
                        .sampling_mode(SamplingMode::Flat)
                        .warm_up_time(Duration::from_millis(500))
                        .measurement_time(Duration::from_secs(2));
                } else {
                    g.sample_size(20)
                        .warm_up_time(Duration::from_millis(300))
                        .measurement_time(Duration::from_secs(1));
                }
                g.bench_function(format!("{sname}_{dn}"), |bch| {
                    let (hp, vars) = inputs.get_or_init(|| hidden_inputs(shape, dtype));
                    bch.iter(|| {
                        let out = f(hp, &cfg, 0.5).unwrap();
                        let grads = out.loss.backward().unwrap();
                        black_box(grads.get(vars[1].as_tensor()).is_some());
                    })
                });
                g.finish();
            }
        }
    }
}

criterion_group!(benches, bench_dpo, bench_reprpo);
criterion_main!(benches);
