//! Criterion benches of the reference ReprPO project's method losses (`reprpo_losses::methods`,
//! issue 17), forward + backward on the CPU; the side-by-side comparison with the reference's own
//! PyTorch code is `tests/reference/bench_methods.sh`, which reads these results.
//!
//! - `method_{mse,prefvec,rank}/{set}{K}x{B}x{T}x{H}_{f32,bf16}`: `mse_loss`, `prefvec_loss` and
//!   `rank_loss` with their reference defaults (transform `none`), backward into the policy's
//!   chosen and rejected activations of every key and its two `[B]` sequence log-probabilities.
//!   `set` is `hs` (K = 3 hidden-state keys, all of width H) or `side` (K = 4 module inputs:
//!   `o_proj` of width H and `down_proj` of width 11H/4, the ratio of the `small` Llama's
//!   intermediate size, for two layers). Shapes: the realistic 8 x 512 x 2048 and the small
//!   2 x 64 x 256 of the loss benches (`benches/losses.rs`).
//! - `method_reduce/...`: the step every loss starts with, `reduce_tokens` (the sink-filtered
//!   token mean) of every key of the four maps, backward of the sum into the policy's activations;
//!   `method_reduce_log_softmax/...` the same of the per-token log-softmax (`rank`'s reduction).
//! - `method_metrics/...`: `add_reference_metrics` alone (the DPO metrics and the every-position
//!   cosines the reference logs around each loss), forward only (all detached).
//!
//! - With `REPRPO_BENCH_WRITTEN_OUT=1`, also `method_{mse,prefvec,rank}_written_out/...`: the same
//!   losses under `reprpo_kernels::written_out`, the chain of candle ops of other devices (what
//!   ran on the CPU too before the fused token reduction and cosine kernels).
//!
//! The chosen NLLs `[B, T]` (read by prefvec's and rank's metrics) are inputs: on both sides they
//! come from the logits, outside the loss here (`reprpo_models::logps::unshifted_nll`).
//!
//! Inputs: per key, `ref_c ~ N(0, 1)`, `ref_r = 0.6 ref_c + 0.8 N`, `pi_c = ref_c + 0.3 N`,
//! `pi_r = ref_r + 0.3 N`; masks as `benches/losses.rs` (example `b` of `B`: chosen left-padded by
//! `b T / (4B)`, rejected right-padded by `b T / (3B)`). Each iteration runs on a thread of
//! candle's CPU pool (`Device::with_context`), as the trainer does. mimalloc is the allocator, as
//! in `xtask`. Filter with e.g. `cargo bench -p reprpo-losses --bench methods -- x2x64x`.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Duration;

use candle_core::{DType, Device, Tensor, Var};
use criterion::{Criterion, SamplingMode, criterion_group, criterion_main};
use reprpo_losses::LossOut;
use reprpo_losses::methods::reduce::reduce_log_softmax_tokens;
use reprpo_losses::methods::{
    Collected, MethodInputs, MseConfig, PrefVecConfig, RankConfig, add_reference_metrics, mse_loss,
    prefvec_loss, rank_loss, reduce_tokens,
};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DTYPES: [(DType, &str); 2] = [(DType::F32, "f32"), (DType::BF16, "bf16")];

/// `(name, key -> width)` of an activation set at hidden size `h`.
fn key_set(set: &str, h: usize) -> Vec<(String, usize)> {
    match set {
        "hs" => ["2", "4", "6"].iter().map(|k| (k.to_string(), h)).collect(),
        _ => [1, 2]
            .iter()
            .flat_map(|l| {
                [
                    (format!("model.layers.{l}.self_attn.o_proj"), h),
                    (format!("model.layers.{l}.mlp.down_proj"), 11 * h / 4),
                ]
            })
            .collect(),
    }
}

/// The masks of the module docs, `[B, T]` f32.
fn masks(b: usize, t: usize, dev: &Device) -> (Tensor, Tensor) {
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
    (
        Tensor::from_vec(mc, (b, t), dev).unwrap(),
        Tensor::from_vec(mr, (b, t), dev).unwrap(),
    )
}

/// Method inputs for `keys` at `[B, T, width]` in `dtype`, and the policy's variables.
fn method_inputs(
    keys: &[(String, usize)],
    (b, t): (usize, usize),
    dtype: DType,
) -> (MethodInputs, Vec<Var>) {
    let dev = Device::Cpu;
    let (mc, mr) = masks(b, t, &dev);
    let mut maps: [BTreeMap<String, Tensor>; 4] = Default::default();
    let mut vars = Vec::new();
    for (k, h) in keys {
        let randn = |s: f32| Tensor::randn(0f32, s, (b, t, *h), &dev).unwrap();
        let rc = randn(1.0);
        let rr = ((&rc * 0.6).unwrap() + randn(0.8)).unwrap();
        let pc = Var::from_tensor(&(&rc + randn(0.3)).unwrap().to_dtype(dtype).unwrap()).unwrap();
        let pr = Var::from_tensor(&(&rr + randn(0.3)).unwrap().to_dtype(dtype).unwrap()).unwrap();
        maps[0].insert(k.clone(), pc.as_tensor().clone());
        maps[1].insert(k.clone(), pr.as_tensor().clone());
        maps[2].insert(k.clone(), rc.to_dtype(dtype).unwrap());
        maps[3].insert(k.clone(), rr.to_dtype(dtype).unwrap());
        vars.push(pc);
        vars.push(pr);
    }
    let logp = |off: f32| {
        Tensor::randn(off, 5.0, b, &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    let lpc = Var::from_tensor(&logp(-100.0)).unwrap();
    let lpr = Var::from_tensor(&logp(-110.0)).unwrap();
    let nll = |s: f32| {
        (Tensor::rand(0f32, s, (b, t), &dev).unwrap() * &mc)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    let [m0, m1, m2, m3] = maps;
    let inputs = MethodInputs {
        pi_cho: Collected {
            acts: m0,
            mask: mc.clone(),
            logps: lpc.as_tensor().clone(),
        },
        pi_rej: Collected {
            acts: m1,
            mask: mr.clone(),
            logps: lpr.as_tensor().clone(),
        },
        ref_cho: Collected {
            acts: m2,
            mask: mc.clone(),
            logps: logp(-101.0),
        },
        ref_rej: Collected {
            acts: m3,
            mask: mr,
            logps: logp(-109.0),
        },
        nll_pi: Some(nll(6.0)),
        nll_ref: Some(nll(6.0)),
    };
    vars.push(lpc);
    vars.push(lpr);
    (inputs, vars)
}

type LossFn = fn(&MethodInputs) -> reprpo_losses::Result<LossOut>;

fn losses() -> [(&'static str, LossFn); 3] {
    [
        ("mse", |i| mse_loss(i, &MseConfig::default())),
        ("prefvec", |i| prefvec_loss(i, &PrefVecConfig::default())),
        ("rank", |i| rank_loss(i, &RankConfig::default())),
    ]
}

type ReduceFn = fn(&Tensor, &Tensor) -> reprpo_losses::Result<Tensor>;

fn reductions() -> [(&'static str, ReduceFn); 2] {
    [
        ("reduce", reduce_tokens),
        ("reduce_log_softmax", reduce_log_softmax_tokens),
    ]
}

fn bench_methods(c: &mut Criterion) {
    let dev = Device::Cpu;
    // With REPRPO_BENCH_WRITTEN_OUT=1 each loss also runs as `method_{loss}_written_out`: the
    // chain of candle ops that other devices take (and that the fused kernels replaced here).
    let chain = std::env::var_os("REPRPO_BENCH_WRITTEN_OUT").is_some_and(|v| v == "1");
    let paths: &[(&str, bool)] = if chain {
        &[("", false), ("_written_out", true)]
    } else {
        &[("", false)]
    };
    for ((b, t, h), big) in [((2, 64, 256), false), ((8, 512, 2048), true)] {
        for set in ["hs", "side"] {
            let keys = key_set(set, h);
            let sname = format!("{set}{}x{b}x{t}x{h}", keys.len());
            for (dtype, dn) in DTYPES {
                // Made on first use, so that a filtered run does not build the inputs it skips.
                let inputs = std::cell::OnceCell::new();
                let get = || inputs.get_or_init(|| method_inputs(&keys, (b, t), dtype));
                let configure = |g: &mut criterion::BenchmarkGroup<'_, _>| {
                    if big {
                        g.sample_size(10)
                            .sampling_mode(SamplingMode::Flat)
                            .warm_up_time(Duration::from_millis(500))
                            .measurement_time(Duration::from_secs(3));
                    } else {
                        g.sample_size(20)
                            .warm_up_time(Duration::from_millis(300))
                            .measurement_time(Duration::from_secs(1));
                    }
                };
                for (lname, f) in losses() {
                    for &(suffix, chain) in paths {
                        let mut g = c.benchmark_group(format!("method_{lname}{suffix}"));
                        configure(&mut g);
                        g.bench_function(format!("{sname}_{dn}"), |bch| {
                            let (inp, vars) = get();
                            bch.iter(|| {
                                dev.with_context(|| {
                                    let step = || {
                                        let out = f(inp).unwrap();
                                        let grads = out.loss.backward().unwrap();
                                        black_box(grads.get(vars[0].as_tensor()).is_some());
                                    };
                                    if chain {
                                        reprpo_kernels::written_out(step);
                                    } else {
                                        step();
                                    }
                                })
                            })
                        });
                        g.finish();
                    }
                }
                // The shared first step alone: `reduce_tokens` (rank: of the log-softmax) of
                // every key of the four maps, backward of the sum into the policy's activations.
                for (rname, red) in reductions() {
                    let mut g = c.benchmark_group(format!("method_{rname}"));
                    configure(&mut g);
                    g.bench_function(format!("{sname}_{dn}"), |bch| {
                        let (inp, vars) = get();
                        bch.iter(|| {
                            dev.with_context(|| {
                                let mut total = None::<Tensor>;
                                for c in [&inp.pi_cho, &inp.pi_rej, &inp.ref_cho, &inp.ref_rej] {
                                    for x in c.acts.values() {
                                        let r = red(x, &c.mask).unwrap().sum_all().unwrap();
                                        total = Some(match total {
                                            Some(t) => (t + r).unwrap(),
                                            None => r,
                                        });
                                    }
                                }
                                let grads = total.unwrap().backward().unwrap();
                                black_box(grads.get(vars[0].as_tensor()).is_some());
                            })
                        })
                    });
                    g.finish();
                }
                let mut g = c.benchmark_group("method_metrics");
                configure(&mut g);
                g.bench_function(format!("{sname}_{dn}"), |bch| {
                    let (inp, _) = get();
                    bch.iter(|| {
                        dev.with_context(|| {
                            let mut m = BTreeMap::new();
                            add_reference_metrics(inp, &mut m).unwrap();
                            // The values on the host, as a logging step reads them.
                            for v in m.values() {
                                black_box(v.to_dtype(DType::F32).unwrap().to_scalar::<f32>().ok());
                            }
                        })
                    })
                });
                g.finish();
            }
        }
    }
}

criterion_group!(benches, bench_methods);
criterion_main!(benches);
