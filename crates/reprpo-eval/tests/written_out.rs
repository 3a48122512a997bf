//! What an evaluation would run on a GPU, asserted on the CPU: `evaluate` (prefix-cache and
//! padded-batch scoring, greedy generations) under `reprpo_kernels::written_out` takes the path
//! of every non-CPU device, runs no custom op that lacks a CUDA forward, and scores what the
//! fused CPU kernels score.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use reprpo_data::Tok;
use reprpo_eval::evaluate::{EvalOptions, Subject, evaluate};
use reprpo_eval::scorer::ScoreMode;
use reprpo_eval::suite::{Suite, load_dataset};
use reprpo_models::{Llama, LlamaConfig, peft};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Every `logps` / `logp_*` number of a report's examples, in order.
fn numbers(examples: &[serde_json::Value]) -> Vec<f64> {
    let mut v = Vec::new();
    for e in examples {
        if let Some(a) = e["logps"].as_array() {
            v.extend(a.iter().map(|x| x.as_f64().unwrap()));
        } else {
            v.push(e["logp_chosen"].as_f64().unwrap());
            v.push(e["logp_rejected"].as_f64().unwrap());
        }
    }
    v
}

#[test]
fn written_out_evaluation_runs_device_ops_and_scores_the_same() {
    let cfg = LlamaConfig::preset("tiny").unwrap();
    let mut m = Llama::random(cfg, 0.02, 0, DType::F32, &Device::Cpu).unwrap();
    let idx = peft::add_adapter(
        &mut m,
        "a",
        peft::AdapterConfig::lora(4, 8.0, &["q_proj", "v_proj", "down_proj"]),
        None,
        0,
    )
    .unwrap();
    for (_, v) in peft::adapter_params(&m, idx) {
        let shape = v.as_tensor().shape().clone();
        v.set(&Tensor::randn(0f32, 0.2, shape, &Device::Cpu).unwrap())
            .unwrap();
    }
    let tok = Tok::byte_level().unwrap();
    let suite = Suite::by_name(
        "default",
        &root().join("datasets/suites"),
        &root().join("datasets"),
    )
    .unwrap();
    let data: Vec<_> = suite
        .datasets
        .iter()
        .map(|d| load_dataset(d, &root(), Some(4)).unwrap())
        .collect();
    let subjects = [
        Subject {
            label: "base".into(),
            adapter: None,
        },
        Subject {
            label: "lora".into(),
            adapter: Some(idx),
        },
    ];
    for mode in [ScoreMode::PrefixCache, ScoreMode::Full] {
        let opts = EvalOptions {
            mc_mode: mode,
            pair_mode: mode,
            generations: 1,
            max_new_tokens: 6,
            ..Default::default()
        };
        let mut run = |written: bool| {
            Device::Cpu.with_context(|| {
                reprpo_kernels::trace_cpu_kernels(|| {
                    let mut job = || evaluate(&mut m, &tok, &subjects, &data, &[], "d", &opts);
                    if written {
                        reprpo_kernels::written_out(job)
                    } else {
                        job()
                    }
                })
            })
        };
        let (fused, seen_fused) = run(false);
        let (written, seen) = run(true);
        let (fused, written) = (fused.unwrap(), written.unwrap());
        assert!(
            seen.iter().all(|op| *op == "checkpoint"),
            "{mode:?}: CPU-only custom ops on the device path: {seen:?}"
        );
        assert!(!seen_fused.is_empty(), "the trace saw no fused kernel");
        let (a, b) = (numbers(&fused.examples), numbers(&written.examples));
        assert_eq!(a.len(), b.len());
        assert!(!a.is_empty());
        for (x, y) in a.iter().zip(&b) {
            assert!(
                (x - y).abs() <= 1e-4 * x.abs().max(1.0),
                "{mode:?}: {x} vs {y}"
            );
        }
    }
}
