//! Shared by the evaluation tests: the tiny default model with a random LoRA.

#![allow(dead_code, clippy::unwrap_used)]

use candle_core::{DType, Device, Tensor};
use reprpo_eval::evaluate::Subject;
use reprpo_models::{Llama, LlamaConfig, peft};

/// The tiny default model with a LoRA whose weights are random (a fresh LoRA is the identity);
/// the adapter's index.
pub fn lora_model() -> (Llama, usize) {
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
    (m, idx)
}

/// The base (no adapter) and the LoRA adapter `idx`.
pub fn base_and_lora(idx: usize) -> [Subject; 2] {
    [
        Subject {
            label: "base".into(),
            adapter: None,
        },
        Subject {
            label: "lora".into(),
            adapter: Some(idx),
        },
    ]
}
