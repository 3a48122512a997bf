//! Criterion bench of the reference ReprPO project's activation transforms under its `prefvec`
//! loss (issue 17): `transform_{ether,hra}_prefvec/hs3x{B}x{T}x{H}_{f32,bf16}` is
//! `reprpo_models::transform` (`ether` and `hra` with the reference's defaults: ETHER nb 2,
//! reduction 60, Htype `ether`; HRA r 38 with Gram–Schmidt) applied to the four activation maps
//! (policy / reference, chosen / rejected; 3 hidden-state keys of width H), then
//! `reprpo_losses::methods::prefvec_loss` with its defaults, and the backward into the policy's
//! activations and log-probabilities and the transform's parameters. Shapes: the realistic
//! 8 x 512 x 2048 and the small 2 x 64 x 256 of the loss benches. The side-by-side comparison
//! with the reference's own PyTorch code is `tests/reference/bench_methods.sh`.
//!
//! Inputs as `crates/reprpo-losses/benches/methods.rs` (same distributions and masks). HRA's
//! vectors are redrawn i.i.d. from `U(±1/sqrt(r/2))` (the reference's initialisation repeats every
//! column, which makes every second Gram–Schmidt residual rounding noise), as the PyTorch side
//! does. Each iteration runs on a thread of candle's CPU pool (`Device::with_context`); mimalloc
//! is the allocator, as in `xtask`.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Duration;

use candle_core::{DType, Device, Tensor, Var};
use criterion::{Criterion, SamplingMode, criterion_group, criterion_main};
use reprpo_losses::methods::{Collected, MethodInputs, PrefVecConfig, prefvec_loss};
use reprpo_models::transform::{self, EtherConfig, HraConfig, TransformConfig, TransformSite};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DTYPES: [(DType, &str); 2] = [(DType::F32, "f32"), (DType::BF16, "bf16")];
const KEYS: [&str; 3] = ["2", "4", "6"];

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

/// The four collected maps (untransformed) and the policy's variables.
fn inputs((b, t, h): (usize, usize, usize), dtype: DType) -> (MethodInputs, Vec<Var>) {
    let dev = Device::Cpu;
    let (mc, mr) = masks(b, t, &dev);
    let mut maps: [BTreeMap<String, Tensor>; 4] = Default::default();
    let mut vars = Vec::new();
    for k in KEYS {
        let randn = |s: f32| Tensor::randn(0f32, s, (b, t, h), &dev).unwrap();
        let rc = randn(1.0);
        let rr = ((&rc * 0.6).unwrap() + randn(0.8)).unwrap();
        let pc = Var::from_tensor(&(&rc + randn(0.3)).unwrap().to_dtype(dtype).unwrap()).unwrap();
        let pr = Var::from_tensor(&(&rr + randn(0.3)).unwrap().to_dtype(dtype).unwrap()).unwrap();
        maps[0].insert(k.into(), pc.as_tensor().clone());
        maps[1].insert(k.into(), pr.as_tensor().clone());
        maps[2].insert(k.into(), rc.to_dtype(dtype).unwrap());
        maps[3].insert(k.into(), rr.to_dtype(dtype).unwrap());
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
    let nll = || {
        (Tensor::rand(0f32, 6.0, (b, t), &dev).unwrap() * &mc)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    let [m0, m1, m2, m3] = maps;
    let c = |acts, mask: &Tensor, logps: Tensor| Collected {
        acts,
        mask: mask.clone(),
        logps,
    };
    let inp = MethodInputs {
        pi_cho: c(m0, &mc, lpc.as_tensor().clone()),
        pi_rej: c(m1, &mr, lpr.as_tensor().clone()),
        ref_cho: c(m2, &mc, logp(-101.0)),
        ref_rej: c(m3, &mr, logp(-109.0)),
        nll_pi: Some(nll()),
        nll_ref: Some(nll()),
    };
    vars.push(lpc);
    vars.push(lpr);
    (inp, vars)
}

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    let cfg = PrefVecConfig::default();
    for ((b, t, h), big) in [((2, 64, 256), false), ((8, 512, 2048), true)] {
        let sizes: BTreeMap<String, usize> = KEYS.iter().map(|k| (k.to_string(), h)).collect();
        let site = TransformSite {
            sizes: &sizes,
            matrices: None,
            device: &dev,
            seed: 0,
            hidden_states: true,
        };
        let sname = format!("hs{}x{b}x{t}x{h}", KEYS.len());
        for (tname, tcfg) in [
            ("ether", TransformConfig::Ether(EtherConfig::default())),
            ("hra", TransformConfig::Hra(HraConfig::default())),
        ] {
            let tr = transform::build(&tcfg, &site).unwrap();
            if tname == "hra" {
                for (_, v) in tr.params() {
                    let r = v.dim(1).unwrap();
                    let bound = 1.0 / (r as f64 / 2.0).sqrt();
                    let u = Tensor::rand(-bound as f32, bound as f32, v.dims(), &dev).unwrap();
                    v.set(&u).unwrap();
                }
            }
            let params: Vec<Var> = tr.params().into_iter().map(|(_, v)| v).collect();
            for (dtype, dn) in DTYPES {
                let data = std::cell::OnceCell::new();
                let mut g = c.benchmark_group(format!("transform_{tname}_prefvec"));
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
                g.bench_function(format!("{sname}_{dn}"), |bch| {
                    let (inp, vars) = data.get_or_init(|| inputs((b, t, h), dtype));
                    bch.iter(|| {
                        dev.with_context(|| {
                            let maps = tr
                                .apply(
                                    &[
                                        &inp.pi_cho.acts,
                                        &inp.pi_rej.acts,
                                        &inp.ref_cho.acts,
                                        &inp.ref_rej.acts,
                                    ],
                                    true,
                                )
                                .unwrap();
                            let [m0, m1, m2, m3]: [_; 4] = maps.try_into().unwrap();
                            let with = |c: &Collected, acts| Collected { acts, ..c.clone() };
                            let x = MethodInputs {
                                pi_cho: with(&inp.pi_cho, m0),
                                pi_rej: with(&inp.pi_rej, m1),
                                ref_cho: with(&inp.ref_cho, m2),
                                ref_rej: with(&inp.ref_rej, m3),
                                nll_pi: inp.nll_pi.clone(),
                                nll_ref: inp.nll_ref.clone(),
                            };
                            let out = prefvec_loss(&x, &cfg).unwrap();
                            let grads = out.loss.backward().unwrap();
                            black_box(grads.get(vars[0].as_tensor()).is_some());
                            black_box(grads.get(params[0].as_tensor()).is_some());
                        })
                    })
                });
                g.finish();
            }
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
