//! Shared by the training-job tests: the job context and a small, fast configuration on the
//! embedded default data (8 pairs, batches of 4, no SFT stage, no plots, no extra eval sets,
//! logging every step, constant learning rate), with `extra` overrides after it.

#![allow(dead_code, clippy::unwrap_used)]

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
    candle_core::safetensors::load(
        dir.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap()
    .into_iter()
    .map(|(k, v)| {
        let bits = v.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        (k, bits.into_iter().map(f32::to_bits).collect())
    })
    .collect()
}
