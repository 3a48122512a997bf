//! The reference ReprPO project's first training steps on a tiny model (fixture
//! `tests/fixtures/methods/step.*`, written by `tests/reference/gen_methods_step_fixtures.py` on
//! the tiny Llama + PEFT LoRA of `tests/fixtures/methods/tiny_llama`), shared by the method and
//! gradient-projection step tests: the model with its adapter active, the fixture's cases and
//! tensors, and its batch.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use reprpo_data::tokenize::Batch;
use reprpo_models::{Llama, peft};
use reprpo_train::TrainConfig;
use reprpo_train::config::Sources;
use reprpo_train::data::DeviceBatch;
use serde_json::Value;

/// `tests/fixtures/methods`.
pub fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/methods")
}

/// The fixture's tiny Llama (f32, CPU) with its PEFT adapter loaded as "policy" and active.
pub fn model() -> Llama {
    let d = dir().join("tiny_llama");
    let mut m = Llama::load(&d, DType::F32, &Device::Cpu).unwrap();
    peft::load_adapter(&mut m, &d.join("adapter"), "policy").unwrap();
    m.adapters.active = Some(0);
    m
}

/// The default configuration with `overrides` (`key=value`), no file, no environment.
pub fn resolve<S: AsRef<str>>(overrides: &[S]) -> TrainConfig {
    TrainConfig::resolve(&Sources {
        overrides: overrides.iter().map(|s| s.as_ref().to_string()).collect(),
        ..Default::default()
    })
    .unwrap()
}

/// `max |x|` in f64.
pub fn max_abs(x: &Tensor) -> f64 {
    x.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// `step.json` (cases with their config, loss and metrics) and `step.safetensors` (batch,
/// parameters and gradients by name).
pub struct StepFixture {
    pub json: Value,
    pub t: HashMap<String, Tensor>,
}

impl StepFixture {
    pub fn load() -> Self {
        let json = serde_json::from_str(&std::fs::read_to_string(dir().join("step.json")).unwrap())
            .unwrap();
        let t =
            candle_core::safetensors::load(dir().join("step.safetensors"), &Device::Cpu).unwrap();
        StepFixture { json, t }
    }

    /// The case called `name`.
    pub fn case(&self, name: &str) -> &Value {
        self.json["cases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap()
    }

    /// The fixture's batch: chosen rows, then rejected rows; every attended token is scored.
    pub fn batch(&self) -> DeviceBatch {
        let t = &self.t;
        let ids = Tensor::cat(&[&t["batch/chosen"], &t["batch/rejected"]], 0).unwrap();
        let mask = Tensor::cat(&[&t["batch/chosen_mask"], &t["batch/rejected_mask"]], 0).unwrap();
        let (rows, seq_len) = ids.dims2().unwrap();
        let flat = |x: &Tensor, dt: DType| x.flatten_all().unwrap().to_dtype(dt).unwrap();
        let input_ids: Vec<u32> = flat(&ids, DType::U32).to_vec1().unwrap();
        let attention_mask: Vec<u8> = flat(&mask, DType::U8).to_vec1().unwrap();
        let b = Batch {
            rows,
            seq_len,
            input_ids,
            loss_mask: attention_mask.clone(),
            attention_mask,
            prompt_cols: 0,
        };
        DeviceBatch::new(&b, rows / 2, &Device::Cpu).unwrap()
    }
}
