//! A NaN or an infinity in a saved adapter is refused at load, naming the tensor and the file,
//! for every adapter kind and both loaders (issue 15, point 14), instead of surfacing later as a
//! non-finite log-probability blamed on a dataset row.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use reprpo_models::{Llama, ModelError, orth, peft};

fn base() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/llama_gqa_rope3")
}

/// Copy adapter folder `src` to `dst`, with element 0 of tensor `name` (the first in name order
/// when `None`) set to `bad`. Returns the tensor's name.
fn poisoned_copy(src: &Path, dst: &Path, name: Option<&str>, bad: f32) -> String {
    std::fs::create_dir_all(dst).unwrap();
    std::fs::copy(
        src.join("adapter_config.json"),
        dst.join("adapter_config.json"),
    )
    .unwrap();
    let mut w = candle_core::safetensors::load(src.join("adapter_model.safetensors"), &Device::Cpu)
        .unwrap();
    let name = name.map(str::to_string).unwrap_or_else(|| {
        let mut k: Vec<&String> = w.keys().collect();
        k.sort();
        k[0].clone()
    });
    let t = &w[&name];
    let dtype = t.dtype();
    let mut v = t
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    v[0] = bad;
    let p = Tensor::from_vec(v, t.dims(), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    w.insert(name.clone(), p);
    candle_core::safetensors::save(&w, dst.join("adapter_model.safetensors")).unwrap();
    name
}

fn model() -> Llama {
    Llama::load(&base(), DType::F32, &Device::Cpu).unwrap()
}

fn expect_nonfinite(r: reprpo_models::Result<usize>, dir: &Path, name: &str) {
    let err = r.expect_err("a non-finite adapter tensor must be refused");
    let msg = err.to_string();
    match &err {
        ModelError::NonFinite {
            file,
            name: n,
            count,
            ..
        } => {
            assert_eq!(file, &dir.join("adapter_model.safetensors"), "{msg}");
            assert_eq!(n, name, "{msg}");
            assert_eq!(*count, 1, "{msg}");
        }
        other => panic!("expected NonFinite, got {other:?}: {msg}"),
    }
    assert!(msg.contains("adapter_model.safetensors"), "{msg}");
    assert!(msg.contains(&format!("tensor `{name}`")), "{msg}");
    assert!(msg.contains("not finite"), "{msg}");
}

#[test]
fn nan_or_inf_in_a_peft_adapter_names_tensor_and_file() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, kind) in ["lora_r4", "dora_r4", "boft", "oft", "hra"]
        .iter()
        .enumerate()
    {
        let bad = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][i % 3];
        let src = base().join("adapters").join(kind);
        let dir = tmp.path().join(kind);
        let name = poisoned_copy(&src, &dir, None, bad);
        expect_nonfinite(peft::load_adapter(&mut model(), &dir, "a"), &dir, &name);
        expect_nonfinite(
            orth::load_adapter_boft_cpu_fallback(&mut model(), &dir, "a"),
            &dir,
            &name,
        );
        // The untouched folder still loads.
        orth::load_adapter_boft_cpu_fallback(&mut model(), &src, "a").unwrap();
    }
}

#[test]
fn nan_in_a_full_fine_tune_delta_names_tensor_and_file() {
    let tmp = tempfile::tempdir().unwrap();
    let raw = serde_json::json!({ "peft_type": "FULL", "target_modules": ["q_proj"] });
    let serde_json::Value::Object(m) = raw else {
        unreachable!()
    };
    let cfg = peft::AdapterConfig::from_json(m, Path::new("adapter_config.json")).unwrap();
    let mut m = model();
    peft::add_adapter(&mut m, "default", cfg, None, 0).unwrap();
    let good = tmp.path().join("good");
    peft::save_adapter(&m, "default", &good).unwrap();
    let bad = tmp.path().join("bad");
    let mut names: Vec<String> = peft::adapter_params(&m, 0)
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    names.sort();
    let last = names.last().unwrap().clone();
    let name = poisoned_copy(&good, &bad, Some(&last), f32::NAN);
    expect_nonfinite(peft::load_adapter(&mut model(), &bad, "a"), &bad, &name);
    // bake_adapter goes through the same loader.
    let err = peft::bake_adapter(&mut model(), &bad).unwrap_err();
    assert!(matches!(err, ModelError::NonFinite { .. }), "{err}");
    peft::load_adapter(&mut model(), &good, "a").unwrap();
}

#[test]
fn check_finite_reads_every_tensor() {
    let w: HashMap<String, Tensor> = [
        (
            "a".to_string(),
            Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap(),
        ),
        (
            "b".to_string(),
            Tensor::new(&[1f32, f32::NAN, f32::INFINITY], &Device::Cpu)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap(),
        ),
    ]
    .into_iter()
    .collect();
    let err = peft::check_finite(&w, Path::new("x.safetensors")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "x.safetensors: tensor `b`: 2 of 3 values are not finite (NaN or infinity); the file is \
         corrupt or was saved from a diverged run"
    );
    peft::check_finite(&HashMap::new(), Path::new("x")).unwrap();
}
