//! Criterion bench of one training step of a random Llama at the `tiny` shape of
//! `xtask bench step` (vocab 512, hidden 128, 4 layers, 4 heads, 2 key/value heads, LoRA r=16 on
//! all seven projections, batch 4 x 64 and 8 x 128): forward alone, and forward + backward of
//! `sum(logits * W)` into the LoRA parameters. Each iteration runs on a thread of candle's CPU
//! pool (`Device::with_context`), as the train and eval jobs do (docs/ARCHITECTURE.md); handing
//! the iteration over costs tens of microseconds against steps of milliseconds. The side-by-side
//! comparison with PyTorch + PEFT is `tests/reference/bench_step.sh`. The allocator is mimalloc,
//! as in the `xtask` binary; run with `MIMALLOC_PURGE_DELAY=-1` for `xtask`'s setting (freed
//! memory kept for reuse).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;

use candle_core::{DType, Device, Tensor};
use criterion::{Criterion, criterion_group, criterion_main};
use reprpo_models::{ForwardSpec, Llama, LlamaConfig, llama, peft};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn tiny_model() -> Llama {
    let cfg = LlamaConfig::preset("tiny").unwrap();
    let mut model = Llama::random(cfg, 0.02, 0, DType::F32, &Device::Cpu).unwrap();
    peft::add_adapter(
        &mut model,
        "default",
        peft::AdapterConfig::lora(16, 16.0, &llama::PROJECTIONS),
        None,
        0,
    )
    .unwrap();
    model
}

fn bench(c: &mut Criterion) {
    let model = tiny_model();
    let params = peft::adapter_params(&model, 0);
    let vocab = model.config.vocab_size;
    let dev = Device::Cpu;
    for (batch, seq) in [(4, 64), (8, 128)] {
        let ids = Tensor::rand(0f32, vocab as f32, (batch, seq), &dev)
            .unwrap()
            .to_dtype(DType::U32)
            .unwrap();
        let weight = Tensor::randn(0f32, 1.0, (batch, seq, vocab), &dev).unwrap();
        c.bench_function(&format!("cpu_llama_tiny_forward_{batch}x{seq}"), |bch| {
            bch.iter(|| {
                dev.with_context(|| {
                    let out = model
                        .forward(&ids, None, None, &ForwardSpec::logits())
                        .unwrap();
                    black_box(out.logits.unwrap());
                })
            })
        });
        c.bench_function(&format!("cpu_llama_tiny_step_{batch}x{seq}"), |bch| {
            bch.iter(|| {
                dev.with_context(|| {
                    let out = model
                        .forward(&ids, None, None, &ForwardSpec::logits())
                        .unwrap();
                    let s = (out.logits.unwrap() * &weight).unwrap().sum_all().unwrap();
                    let grads = s.backward().unwrap();
                    assert!(
                        params
                            .iter()
                            .all(|(_, v)| grads.get(v.as_tensor()).is_some())
                    );
                    black_box(grads);
                })
            })
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
