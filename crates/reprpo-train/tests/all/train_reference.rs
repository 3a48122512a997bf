#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The first logged step of a real training run against the Python references.
//!
//! Each case runs [`reprpo_train::train`] on the fixture model (`tests/fixtures/train/model`: a tiny
//! random Llama with GQA, tied embeddings and the project's byte-level tokenizer) and the 4 fixture
//! pairs (`tests/fixtures/train/pairs.jsonl` through the recipe `datasets/train-fixture.toml`),
//! starting from a non-trivial PEFT adapter (`adapter.init_from=tests/fixtures/train/{lora,dora}`),
//! with `train.lr=0`, `train.max_steps=1`, `train.logging_steps=1` and `train.batch_size=4` (one
//! batch holding every pair, so the seeded data order only permutes rows of means). It reads the
//! first line of `metrics.jsonl` and compares every value the reference wrote
//! (`tests/fixtures/train/expected.json`):
//!
//! - DPO types (sigmoid, ipo, hinge, a sigmoid + sft mixture, sigmoid with DoRA; LD-DPO and WPO
//!   have fixtures and tests too): `loss` and TRL's `rewards/chosen`, `rewards/rejected`,
//!   `rewards/accuracies`, `rewards/margins`, `logps/chosen`, `logps/rejected`, `logits/chosen`,
//!   `logits/rejected`, as logged by TRL 1.16.0's own `DPOTrainer._compute_loss` on the same batch
//!   with the real PEFT model (TRL does the policy forward and the adapter-disabled reference
//!   forward itself; so the runs set `adapter.reference=base`, see reference_model.rs for
//!   `initial`);
//! - ReprPO (original, with DoRA, with example weights, with `reprpo.layers=[1,-1]`): `loss`,
//!   `loss_rr`, `loss_retain`, `coef_rr`, `coef_retain`, `cosine/chosen`, `cosine/rejected` from
//!   the independent PyTorch reference of `tests/reference/gen_reprpo_fixtures.py` on the hidden
//!   states of transformers' forward (adapter on / disabled), at progress 0;
//! - both: `grad_norm` (global L2 norm of the adapter gradients before clipping, from PyTorch's
//!   backward through the PEFT model) and `learning_rate` (0).
//!
//! Tolerance: the Rust side computes in f32 and the references in f32 (TRL) or f64 from f32 hidden
//! states (ReprPO), so each value must satisfy `|rust - python| <= 1e-4 * |python| + 1e-5`
//! (relative 1e-4, absolute 1e-5 for values near 0; `rewards/accuracies` is a count over 4 pairs
//! and must match exactly up to that tolerance too).
//!
//! How the fixtures were made (from the workspace root):
//!
//! ```sh
//! # 1. the byte-level tokenizer files (once):
//! cargo test -p reprpo-train --test all train_reference:: -- --ignored write_fixture_tokenizer
//! # 2. model, adapters, pairs, recipe and expected values (tests/reference/requirements-train.txt):
//! /work/venvs/cur/bin/python tests/reference/gen_train_fixtures.py
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use reprpo_train::config::Sources;
use reprpo_train::trainer::JobContext;
use reprpo_train::{TrainConfig, train};
use serde_json::Value;

/// Relative tolerance (f32 against f32 / f64 references).
const RTOL: f64 = 1e-4;
/// Absolute tolerance for values near 0.
const ATOL: f64 = 1e-5;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/train")
}

fn expected() -> Value {
    let text = std::fs::read_to_string(fixtures().join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn case(name: &str) -> Value {
    expected()["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no case {name} in expected.json"))
        .clone()
}

/// Runs one step of `case` and returns the first line of its `metrics.jsonl`.
fn first_logged_step(case: &Value) -> BTreeMap<String, Value> {
    let out = tempfile::tempdir().unwrap();
    let fx = fixtures();
    let mut overrides: Vec<String> = vec![
        format!("model.name_or_path={}", fx.join("model").display()),
        "data.datasets=[train-fixture]".into(),
        "data.eval_datasets=[]".into(),
        "data.ood_datasets=[]".into(),
        format!(
            "adapter.init_from={}",
            fx.join(case["adapter"].as_str().unwrap()).display()
        ),
        // The fixtures' reference is the adapter-disabled model (TRL's `use_adapter(model, None)`);
        // the frozen-initial-adapter reference is checked in reference_model.rs.
        "adapter.reference=base".into(),
        "train.lr=0".into(),
        "train.max_steps=1".into(),
        "train.logging_steps=1".into(),
        "train.batch_size=4".into(),
        "train.warmup_ratio=0".into(),
        format!("run.out_dir={}", out.path().display()),
        "run.plots=false".into(),
    ];
    for o in case["overrides"].as_array().unwrap() {
        overrides.push(o.as_str().unwrap().to_string());
    }
    let cfg = TrainConfig::resolve(&Sources {
        file: None,
        overrides,
        env: false,
    })
    .unwrap();
    let ctx = JobContext {
        datasets_dir: fx.join("datasets"),
        stop: Arc::new(AtomicBool::new(false)),
        progress: false,
    };
    let outcome = train(&cfg, &ctx, None).unwrap_or_else(|e| panic!("{}: {e}", case["name"]));
    let text = std::fs::read_to_string(outcome.run_dir.join("metrics.jsonl")).unwrap();
    let first = text.lines().next().expect("metrics.jsonl is empty");
    serde_json::from_str(first).unwrap()
}

/// Compares every metric of `name` and prints the differences.
fn check(name: &str) {
    let c = case(name);
    let got = first_logged_step(&c);
    assert_eq!(got.get("step").and_then(Value::as_u64), Some(1), "{name}");
    let mut failures = Vec::new();
    println!("{name}:");
    for (k, want) in c["metrics"].as_object().unwrap() {
        let want = want.as_f64().unwrap();
        let Some(have) = got.get(k).and_then(Value::as_f64) else {
            failures.push(format!("{k}: missing from metrics.jsonl (python {want})"));
            continue;
        };
        let diff = (have - want).abs();
        let rel = diff / want.abs().max(f64::MIN_POSITIVE);
        println!("  {k:20} rust {have:+.8e}  python {want:+.8e}  |diff| {diff:.2e}  rel {rel:.2e}");
        if diff > RTOL * want.abs() + ATOL {
            failures.push(format!(
                "{k}: rust {have} python {want} (|diff| {diff:.3e})"
            ));
        }
    }
    assert!(failures.is_empty(), "{name}:\n  {}", failures.join("\n  "));
}

#[test]
fn dpo_sigmoid_lora() {
    check("dpo_sigmoid_lora");
}

#[test]
fn ipo_lora() {
    check("ipo_lora");
}

#[test]
fn hinge_lora() {
    check("hinge_lora");
}

#[test]
fn mix_sigmoid_sft_lora() {
    check("mix_sigmoid_sft_lora");
}

#[test]
fn dpo_sigmoid_dora() {
    check("dpo_sigmoid_dora");
}

/// LD-DPO (`dpo.ld_alpha`): the objective fills `DpoInputs::ld_tails` from the full logits.
#[test]
fn ld_alpha_sigmoid_lora() {
    check("ld_alpha_sigmoid_lora");
}

/// WPO (`dpo.use_weighting`): the objective fills `DpoInputs::wpo_log_weights` from the full
/// logits.
#[test]
fn wpo_sigmoid_lora() {
    check("wpo_sigmoid_lora");
}

#[test]
fn reprpo_lora() {
    check("reprpo_lora");
}

#[test]
fn reprpo_dora() {
    check("reprpo_dora");
}

#[test]
fn reprpo_weights_lora() {
    check("reprpo_weights_lora");
}

#[test]
fn reprpo_last_layer_lora() {
    check("reprpo_last_layer_lora");
}

/// Writes the byte-level tokenizer files of the fixture model (run once; committed).
#[test]
#[ignore = "writes tests/fixtures/train/model/tokenizer*.json"]
fn write_fixture_tokenizer() {
    let dir = fixtures().join("model");
    std::fs::create_dir_all(&dir).unwrap();
    reprpo_data::Tok::byte_level()
        .unwrap()
        .save_dir(&dir)
        .unwrap();
}
