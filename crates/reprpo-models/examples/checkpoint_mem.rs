//! Peak memory and time of one training step (forward + backward into LoRA parameters) of a
//! random Llama preset, with or without gradient checkpointing, for `docs/perf.md`:
//!
//! ```sh
//! cargo run --release -p reprpo-models --example checkpoint_mem -- small 2 1024 on
//! cargo run --release -p reprpo-models --example checkpoint_mem -- small 2 1024 off
//! ```
//!
//! The step is the one of `xtask bench step` (LoRA r = 16, alpha = 16 on all seven projections,
//! objective `sum(logits * W)`); one process per setting, since the peak resident set (VmHWM)
//! is a process-wide high-water mark. A fifth argument runs that many timed steps after two
//! warm-ups and reports their median. Prints one JSON line.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use reprpo_models::{ForwardSpec, Llama, LlamaConfig, checkpoint, llama, peft};

fn vm(key: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let preset = args.get(1).map_or("small", String::as_str);
    let batch: usize = args.get(2).map_or(2, |s| s.parse().unwrap());
    let seq: usize = args.get(3).map_or(1024, |s| s.parse().unwrap());
    let ck = args.get(4).map_or("on", String::as_str) == "on";
    let cfg = LlamaConfig::preset(preset).expect("preset: tiny or small");
    let vocab = cfg.vocab_size;
    let dev = Device::Cpu;
    let mut model = Llama::random(cfg, 0.02, 0, DType::F32, &dev).unwrap();
    peft::add_adapter(
        &mut model,
        "default",
        peft::AdapterConfig::lora(16, 16.0, &llama::PROJECTIONS),
        None,
        0,
    )
    .unwrap();
    let params = peft::adapter_params(&model, 0);
    let ids = Tensor::rand(0f32, vocab as f32, (batch, seq), &dev)
        .unwrap()
        .to_dtype(DType::U32)
        .unwrap();
    let weight = Tensor::randn(0f32, 1.0, (batch, seq, vocab), &dev).unwrap();
    let before = vm("VmRSS:");
    let spec = ForwardSpec {
        checkpoint: ck,
        ..ForwardSpec::logits()
    };
    let steps: usize = args.get(5).map_or(0, |s| s.parse().unwrap());
    let runs = if steps == 0 { 1 } else { steps + 2 };
    let mut times = Vec::new();
    for i in 0..runs {
        let t0 = Instant::now();
        let out = model.forward(&ids, None, None, &spec).unwrap();
        let s = (out.logits.unwrap() * &weight).unwrap().sum_all().unwrap();
        let grads = checkpoint::backward(&s).unwrap();
        let secs = t0.elapsed().as_secs_f64();
        let reached = params
            .iter()
            .filter(|(_, v)| grads.get(v.as_tensor()).is_some())
            .count();
        assert_eq!(reached, params.len(), "not every parameter got a gradient");
        if steps == 0 || i >= 2 {
            times.push(secs);
        }
    }
    times.sort_by(f64::total_cmp);
    let secs = times[times.len() / 2];
    println!(
        "{}",
        serde_json::json!({"preset": preset, "batch": batch, "seq": seq, "checkpoint": ck,
            "step_s": secs, "rss_before_step_mib": before, "peak_rss_mib": vm("VmHWM:")})
    );
}
