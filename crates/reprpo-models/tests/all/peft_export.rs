//! Adapters made and saved here, for PEFT to load (`tests/reference/check_rust_adapters.py`):
//! for each adapter kind, a fresh adapter on the `llama_gqa_rope3` fixture with every parameter
//! set to random values, saved with `peft::save_adapter`, plus the logits this crate computes with
//! it. Run with `REPRPO_EXPORT_DIR=/some/dir cargo test -p reprpo-models --test all peft_export:: -- --ignored`;
//! without the variable the test writes into a temporary folder and only checks the round trip.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use reprpo_models::{ForwardSpec, Llama, peft};

#[test]
#[ignore = "export for the Python PEFT check; run explicitly"]
fn export_adapters_for_peft() {
    let base = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models/llama_gqa_rope3");
    let tmp = tempfile::tempdir().unwrap();
    let out = std::env::var("REPRPO_EXPORT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| tmp.path().to_path_buf());
    let inputs =
        candle_core::safetensors::load(base.join("adapters/inputs.safetensors"), &Device::Cpu)
            .unwrap();
    let ids = inputs["input_ids"].to_dtype(DType::U32).unwrap();
    let mask = &inputs["attention_mask"];
    let pos = inputs["position_ids"].to_dtype(DType::U32).unwrap();
    for (i, kind) in [
        "lora_r4",
        "rslora_r4",
        "dora_r4",
        "lora_layers",
        "boft_factor1",
        "boft_nbf2_reference",
        "oft",
        "oft_cayley",
        "hra",
        "hra_gs",
    ]
    .iter()
    .enumerate()
    {
        let text =
            std::fs::read_to_string(base.join("adapters").join(kind).join("adapter_config.json"))
                .unwrap();
        let mut raw: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&text).unwrap();
        if *kind == "hra_gs" {
            // A new Gram-Schmidt HRA adapter needs init_weights = false (see orth.rs).
            raw.insert("init_weights".into(), serde_json::json!(false));
        }
        let config =
            peft::AdapterConfig::from_json(raw, std::path::Path::new("adapter_config.json"))
                .unwrap();
        let mut model = Llama::load(&base, DType::F32, &Device::Cpu).unwrap();
        peft::add_adapter(&mut model, "default", config, None, i as u64).unwrap();
        for (name, var) in peft::adapter_params(&model, 0) {
            let t = var.as_tensor();
            let noise = t.randn_like(0.0, 0.1).unwrap();
            let v = if name.ends_with("boft_s") || name.ends_with("lora_magnitude_vector") {
                (t + noise).unwrap()
            } else {
                noise
            };
            var.set(&v).unwrap();
        }
        let dir = out.join(kind);
        peft::save_adapter(&model, "default", &dir).unwrap();
        let spec = ForwardSpec::logits();
        let logits = model
            .forward(&ids, Some(mask), Some(&pos), &spec)
            .unwrap()
            .logits
            .unwrap();
        let t: HashMap<String, Tensor> = [("logits".to_string(), logits.clone())]
            .into_iter()
            .collect();
        candle_core::safetensors::save(&t, dir.join("rust_logits.safetensors")).unwrap();
        // Round trip here.
        let mut again = Llama::load(&base, DType::F32, &Device::Cpu).unwrap();
        peft::load_adapter(&mut again, &dir, "default").unwrap();
        let l2 = again
            .forward(&ids, Some(mask), Some(&pos), &spec)
            .unwrap()
            .logits
            .unwrap();
        let d: f32 = (l2 - &logits)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert_eq!(d, 0.0, "{kind}: reload differs");
    }
}
