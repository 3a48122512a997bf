//! Shared by the training-job tests: the job context and a small, fast configuration on the
//! embedded default data (8 pairs, batches of 4, no SFT stage, no plots, no extra eval sets,
//! logging every step, constant learning rate, no memory in the log), with `extra` overrides
//! after it.

#![allow(dead_code, clippy::unwrap_used, clippy::panic)]

pub mod step_fixture;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use reprpo_train::TrainConfig;
use reprpo_train::config::Sources;
use reprpo_train::trainer::JobContext;

/// The repository's `datasets/`.
pub fn datasets_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets")
}

/// A job context; `stop`: the Ctrl-C flag already set.
pub fn ctx(stop: bool) -> JobContext {
    JobContext {
        datasets_dir: datasets_dir(),
        stop: Arc::new(AtomicBool::new(stop)),
        progress: false,
    }
}

/// The small configuration writing runs under `out`, then `extra` overrides.
pub fn config(out: &Path, extra: &[&str]) -> TrainConfig {
    let mut overrides: Vec<String> = vec![
        format!("run.out_dir={}", out.display()),
        "run.plots=false".into(),
        "sft.steps=0".into(),
        "data.n_train=8".into(),
        "data.eval_datasets=[]".into(),
        "data.ood_datasets=[]".into(),
        "train.batch_size=4".into(),
        "train.n_eval_examples=8".into(),
        "train.logging_steps=1".into(),
        "train.warmup_ratio=0".into(),
        "train.schedule=constant".into(),
        // Logs compared across runs: without the process's memory, which differs run to run
        // (`memory_is_logged_and_summarised` in jobs.rs turns it back on).
        "run.log_memory=false".into(),
    ];
    overrides.extend(extra.iter().map(|s| s.to_string()));
    TrainConfig::resolve(&Sources {
        file: None,
        overrides,
        env: false,
    })
    .unwrap()
}

/// The bits of every tensor of the adapter in `dir` (`adapter_model.safetensors`), by name: for
/// comparing two runs bit for bit.
pub fn adapter_bits(dir: &Path) -> std::collections::BTreeMap<String, Vec<u32>> {
    tensor_bits(&dir.join("adapter_model.safetensors"))
}

/// The bits of every f32 tensor of a safetensors file, by name.
pub fn tensor_bits(file: &Path) -> std::collections::BTreeMap<String, Vec<u32>> {
    candle_core::safetensors::load(file, &candle_core::Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, v)| {
            let bits = v.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (k, bits.into_iter().map(f32::to_bits).collect())
        })
        .collect()
}

/// The small configuration of a run that explodes: DPO at learning rate 1e30 without clipping,
/// a checkpoint every step, then `extra` (the warm-up and the length).
pub fn exploding(out: &Path, extra: &[&str]) -> TrainConfig {
    let mut all = vec![
        "loss=dpo",
        "train.lr=1e30",
        "train.max_grad_norm=0",
        "run.save_steps=1",
    ];
    all.extend_from_slice(extra);
    config(out, &all)
}

/// Train `cfg`, which must stop on a non-finite value: (the step the error names, the checkpoint
/// it names as the last good one, the error).
pub fn non_finite_stop(cfg: &TrainConfig) -> (usize, Option<PathBuf>, reprpo_train::TrainError) {
    let err = reprpo_train::trainer::train(cfg, &ctx(false), None).unwrap_err();
    match &err {
        reprpo_train::TrainError::NonFinite {
            step,
            last_checkpoint,
            ..
        } => (*step, last_checkpoint.clone(), err),
        _ => panic!("expected a non-finite error, got {err}"),
    }
}

/// The `step` of every record of a run's `metrics.jsonl`, in order.
pub fn logged_steps(run: &Path) -> Vec<u64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

/// `tests/fixtures/train/<name>` parsed as JSON.
pub fn train_fixture_json(name: &str) -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/train")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The entry of `all["cases"]` whose `key` is `value` (`file` names the fixture in the panic).
pub fn find_case(all: &serde_json::Value, key: &str, value: &str, file: &str) -> serde_json::Value {
    all["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c[key] == value)
        .unwrap_or_else(|| panic!("no case with {key} = {value} in {file}"))
        .clone()
}
