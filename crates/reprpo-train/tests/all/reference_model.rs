#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! `adapter.reference`: the reference model of the DPO and ReprPO losses is either a frozen copy
//! of the adapter the run starts from (`"initial"`, TRL's DPOTrainer with a PEFT model) or the base
//! with the adapter off (`"base"`).
//!
//! - Against TRL 1.16.0 (`tests/fixtures/train/reference_model.json`, written by
//!   `tests/reference/gen_reference_fixtures.py`): 10 optimizer steps of DPO (sigmoid, beta 0.1)
//!   from the fixture LoRA adapter (`adapter.init_from=tests/fixtures/train/lora`, not an
//!   identity) on the 4 fixture pairs in one batch, AdamW at a constant learning rate 5e-3,
//!   clipping at 1.0 (it clips: the first step's norm is about 4), for both references: every
//!   logged value at every step (loss, rewards/*, logps/*, logits/*, grad_norm, learning_rate)
//!   within `1e-4 * |python| + 1e-5` (the tolerance of train_reference.rs) at every step (seen, CPU:
//!   `grad_norm` relative 6e-5 at step 9 of `base`, the largest; loss 1.4e-5; rewards 1.2e-5;
//!   `logps/*` absolute 8e-5 on values near -110 to -210).
//! - Step 1 with `"initial"`: loss ln 2 and rewards exactly 0; with `"base"` not (DPO); for ReprPO
//!   the reference hidden states are the policy's at step 1 (`cosine/chosen` 1, `loss_retain` 0)
//!   with `"initial"` and not with `"base"`.
//! - Config: the default follows `adapter.init_from`, explicit values win (also against a loaded
//!   adapter's table), a bad value names the key, and `resolved_config.toml` / `--print-config`
//!   (`TrainConfig::to_toml`) and `summary.json` show it.
//! - Resume: a run with `"initial"` stopped after its first step and resumed ends with the same
//!   adapter, bit for bit, as an uninterrupted run; the checkpoint keeps the frozen copy
//!   (`reference_adapter/`, bit-equal to the `init_from` adapter), and a checkpoint without it is
//!   refused naming `adapter.reference`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use crate::common;

use reprpo_train::config::Sources;
use reprpo_train::trainer::{self, JobContext, Outcome};
use reprpo_train::{TrainConfig, TrainError};
use serde_json::Value;

/// Relative tolerance (f32 against TRL's f32), as train_reference.rs.
const RTOL: f64 = 1e-4;
/// Absolute tolerance for values near 0, as train_reference.rs.
const ATOL: f64 = 1e-5;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/train")
}

fn ctx(stop: bool) -> JobContext {
    JobContext {
        datasets_dir: fixtures().join("datasets"),
        stop: Arc::new(AtomicBool::new(stop)),
        progress: false,
    }
}

/// The fixture model, pairs and LoRA adapter, logging every step, then `extra`.
fn overrides(out: &Path, extra: &[String]) -> Vec<String> {
    let fx = fixtures();
    let mut v = vec![
        format!("model.name_or_path={}", fx.join("model").display()),
        "data.datasets=[train-fixture]".into(),
        "data.eval_datasets=[]".into(),
        "data.ood_datasets=[]".into(),
        format!("adapter.init_from={}", fx.join("lora").display()),
        "train.batch_size=4".into(),
        "train.logging_steps=1".into(),
        "train.warmup_ratio=0".into(),
        format!("run.out_dir={}", out.display()),
        "run.plots=false".into(),
        // Logs compared across runs: without the process's memory, which differs run to run.
        "run.log_memory=false".into(),
    ];
    v.extend_from_slice(extra);
    v
}

fn resolve(overrides: Vec<String>) -> Result<TrainConfig, TrainError> {
    TrainConfig::resolve(&Sources {
        file: None,
        overrides,
        env: false,
    })
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn run(out: &Path, extra: &[String]) -> Outcome {
    let cfg = resolve(overrides(out, extra)).unwrap();
    trainer::train(&cfg, &ctx(false), None).unwrap()
}

fn logged(run_dir: &Path) -> Vec<BTreeMap<String, Value>> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|r: &BTreeMap<String, Value>| r.contains_key("loss"))
        .collect()
}

fn trl_case(reference: &str) -> Value {
    let all = common::train_fixture_json("reference_model.json");
    common::find_case(&all, "reference", reference, "reference_model.json")
}

/// Runs the TRL case's overrides and compares every metric of every step.
fn check_trajectory(reference: &str) {
    let case = trl_case(reference);
    let tmp = tempfile::tempdir().unwrap();
    let extra: Vec<String> = case["overrides"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_str().unwrap().to_string())
        .collect();
    let out = run(tmp.path(), &extra);
    assert_eq!(out.summary["reference"], reference);
    let got = logged(&out.run_dir);
    let want = case["steps"].as_array().unwrap();
    assert_eq!(got.len(), want.len(), "logged steps");
    let mut failures = Vec::new();
    for (have, want) in got.iter().zip(want) {
        let step = want["step"].as_u64().unwrap();
        assert_eq!(have["step"].as_u64(), Some(step));
        for (k, w) in want.as_object().unwrap() {
            if k == "step" {
                continue;
            }
            let w = w.as_f64().unwrap();
            let Some(h) = have.get(k).and_then(Value::as_f64) else {
                failures.push(format!("step {step} {k}: missing (python {w})"));
                continue;
            };
            let diff = (h - w).abs();
            println!(
                "{reference} step {step:2} {k:18} rust {h:+.8e} python {w:+.8e} |diff| {diff:.2e}"
            );
            if diff > RTOL * w.abs() + ATOL {
                failures.push(format!(
                    "step {step} {k}: rust {h} python {w} (|diff| {diff:.3e})"
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{reference}:\n  {}",
        failures.join("\n  ")
    );
}

#[test]
fn trl_trajectory_with_the_initial_adapter_as_reference() {
    check_trajectory("initial");
}

#[test]
fn trl_trajectory_with_the_base_as_reference() {
    check_trajectory("base");
}

/// One step at learning rate 0 with `loss` and `reference`; its logged metrics.
fn first_step(loss: &str, reference: &str) -> BTreeMap<String, Value> {
    let tmp = tempfile::tempdir().unwrap();
    let extra = strings(&[
        &format!("loss={loss}"),
        &format!("adapter.reference={reference}"),
        "train.lr=0",
        "train.max_steps=1",
    ]);
    logged(&run(tmp.path(), &extra).run_dir).remove(0)
}

fn metric(m: &BTreeMap<String, Value>, k: &str) -> f64 {
    m.get(k)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("{k} missing from {m:?}"))
}

#[test]
fn dpo_step_one_is_ln2_with_the_initial_adapter_only() {
    let initial = first_step("dpo", "initial");
    assert_eq!(metric(&initial, "rewards/chosen"), 0.0);
    assert_eq!(metric(&initial, "rewards/rejected"), 0.0);
    let loss = metric(&initial, "loss");
    assert!((loss - std::f64::consts::LN_2).abs() < 1e-6, "{loss}");
    let base = first_step("dpo", "base");
    let loss = metric(&base, "loss");
    assert!((loss - std::f64::consts::LN_2).abs() > 0.05, "{loss}");
    assert!(metric(&base, "rewards/chosen").abs() > 0.1);
}

#[test]
fn reprpo_reference_hidden_states_follow_the_key() {
    // cos(pi_cho, ref_cho) and the retain distance ||pi_cho - ref_cho||: 1 and 0 exactly when the
    // reference is the policy as it starts.
    let initial = first_step("reprpo", "initial");
    let c = metric(&initial, "cosine/chosen");
    assert!((c - 1.0).abs() < 1e-5, "{c}");
    assert_eq!(metric(&initial, "loss_retain"), 0.0);
    let base = first_step("reprpo", "base");
    assert!(metric(&base, "cosine/chosen") < 0.999);
    assert!(metric(&base, "loss_retain") > 1e-2);
    assert_ne!(metric(&base, "loss_rr"), metric(&initial, "loss_rr"));
}

#[test]
fn the_default_follows_init_from_and_explicit_values_win() {
    let out = Path::new("unused");
    let with_init = resolve(overrides(out, &[])).unwrap();
    assert_eq!(with_init.adapter.reference, "initial");
    let plain = resolve(strings(&["run.plots=false"])).unwrap();
    assert_eq!(plain.adapter.reference, "base");
    let explicit = resolve(overrides(out, &strings(&["adapter.reference=base"]))).unwrap();
    assert_eq!(explicit.adapter.reference, "base");
    let fresh = resolve(strings(&["adapter.reference=initial"])).unwrap();
    assert_eq!(fresh.adapter.reference, "initial");
    // What --print-config prints and resolved_config.toml holds.
    for (cfg, want) in [(&with_init, "initial"), (&plain, "base")] {
        let table: toml::Table = cfg.to_toml().unwrap().parse().unwrap();
        assert_eq!(table["adapter"]["reference"].as_str(), Some(want));
    }
    let err = resolve(strings(&["adapter.reference=frozen"])).unwrap_err();
    match err {
        TrainError::Config { key, problem } => {
            assert_eq!(key, "adapter.reference");
            assert!(problem.contains("\"initial\" or \"base\""), "{problem}");
        }
        e => panic!("{e}"),
    }
}

/// DPO from the fixture LoRA with the initial adapter as reference: 4 steps of 2 pairs, a
/// checkpoint every step.
fn resumable(out: &Path) -> TrainConfig {
    let extra = strings(&[
        "loss=dpo",
        "train.batch_size=2",
        "train.lr=5e-3",
        "train.schedule=constant",
        "train.max_steps=4",
        "run.save_steps=1",
        "run.save_total_limit=10",
    ]);
    let cfg = resolve(overrides(out, &extra)).unwrap();
    assert_eq!(cfg.adapter.reference, "initial");
    cfg
}

#[test]
fn resume_with_the_initial_reference_is_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let straight = trainer::train(&resumable(tmp.path()), &ctx(false), None).unwrap();
    let stopped = trainer::train(&resumable(tmp.path()), &ctx(true), None).unwrap();
    assert!(stopped.interrupted && stopped.steps == 1);
    let ck = stopped.run_dir.join("checkpoints/step-0000001");
    let frozen = common::adapter_bits(&ck.join("reference_adapter"));
    assert_eq!(frozen, common::adapter_bits(&fixtures().join("lora")));
    assert_ne!(
        common::adapter_bits(&ck.join("adapter")),
        frozen,
        "the policy moved"
    );
    let cfg = resumable(Path::new("unused"));
    let resumed = trainer::train(&cfg, &ctx(false), Some(&stopped.run_dir)).unwrap();
    assert_eq!(resumed.steps, 4);
    assert_eq!(
        common::adapter_bits(&resumed.run_dir.join("adapter")),
        common::adapter_bits(&straight.run_dir.join("adapter"))
    );
    let (a, b) = (logged(&resumed.run_dir), logged(&straight.run_dir));
    assert_eq!(a, b, "metrics.jsonl");
}

#[test]
fn a_checkpoint_without_the_frozen_copy_is_refused_naming_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let stopped = trainer::train(&resumable(tmp.path()), &ctx(true), None).unwrap();
    let ck = stopped.run_dir.join("checkpoints/step-0000001");
    std::fs::remove_dir_all(ck.join("reference_adapter")).unwrap();
    reprpo_train::run::write_manifest(&ck).unwrap();
    let cfg = resumable(Path::new("unused"));
    let err = trainer::train(&cfg, &ctx(false), Some(&stopped.run_dir)).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("adapter.reference") && msg.contains("reference_adapter"),
        "{msg}"
    );
}
