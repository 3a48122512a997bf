//! Loading and adapter details not covered by the reference fixtures: sharded safetensors
//! (`model.safetensors.index.json`), bad weight files, LoRA dropout (training only, inverted
//! scaling) and PEFT's two LoRA initialisations.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use reprpo_models::{ForwardSpec, Llama, llama, peft};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

fn logits(m: &Llama, ids: &Tensor, spec: &ForwardSpec) -> Tensor {
    m.forward(ids, None, None, spec).unwrap().logits.unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn sharded_weights_load_like_a_single_file() {
    let src = fixture("llama_tied");
    let all = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    let (a, b) = names.split_at(names.len() / 2);
    let mut map = serde_json::Map::new();
    for (shard, part) in [
        ("model-00001-of-00002.safetensors", a),
        ("model-00002-of-00002.safetensors", b),
    ] {
        let t: HashMap<String, Tensor> = part
            .iter()
            .map(|k| ((*k).clone(), all[*k].clone()))
            .collect();
        candle_core::safetensors::save(&t, dir.path().join(shard)).unwrap();
        for k in part.iter() {
            map.insert((*k).clone(), serde_json::json!(shard));
        }
    }
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
    let one = Llama::load(&src, DType::F32, &Device::Cpu).unwrap();
    let two = Llama::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[3u32, 7, 11, 2, 5]], &Device::Cpu).unwrap();
    let spec = ForwardSpec::logits();
    assert_eq!(
        max_abs(&logits(&one, &ids, &spec), &logits(&two, &ids, &spec)),
        0.0
    );
    // A shard missing a tensor: the error names the tensor.
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    let t: HashMap<String, Tensor> = b
        .iter()
        .skip(1)
        .map(|k| ((*k).clone(), all[*k].clone()))
        .collect();
    candle_core::safetensors::save(&t, dir.path().join("model-00002-of-00002.safetensors"))
        .unwrap();
    let err = Llama::load(dir.path(), DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(b[0].as_str()) && err.contains("missing"),
        "{err}"
    );
}

#[test]
fn a_truncated_weight_file_is_a_clear_error() {
    let src = fixture("llama_tied");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    std::fs::write(
        dir.path().join("model.safetensors"),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();
    let err = Llama::load(dir.path(), DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.safetensors"), "{err}");
}

/// Dropout acts on the adapter input in training only, with inverted scaling: eval output is
/// deterministic and equal to the no-dropout adapter; training output differs and is random.
#[test]
fn lora_dropout_only_in_training() {
    let mut m = Llama::load(&fixture("llama_tied"), DType::F32, &Device::Cpu).unwrap();
    let mut cfg = peft::AdapterConfig::lora(4, 8.0, &["q_proj", "v_proj", "down_proj"]);
    if let peft::AdapterKind::Lora { dropout, .. } = &mut cfg.kind {
        *dropout = 0.5;
    }
    peft::add_adapter(&mut m, "d", cfg, None, 0).unwrap();
    for (name, var) in peft::adapter_params(&m, 0) {
        if name.ends_with("lora_B.weight") {
            var.set(&var.as_tensor().randn_like(0.0, 0.5).unwrap())
                .unwrap();
        }
    }
    let ids = Tensor::new(&[[3u32, 7, 11, 2, 5, 9, 1, 4]], &Device::Cpu).unwrap();
    let eval = ForwardSpec::logits();
    let train = ForwardSpec {
        train: true,
        ..ForwardSpec::logits()
    };
    let e1 = logits(&m, &ids, &eval);
    let e2 = logits(&m, &ids, &eval);
    assert_eq!(max_abs(&e1, &e2), 0.0);
    let t1 = logits(&m, &ids, &train);
    let t2 = logits(&m, &ids, &train);
    assert!(
        max_abs(&t1, &e1) > 1e-4,
        "dropout changed nothing in training"
    );
    assert!(max_abs(&t1, &t2) > 1e-4, "dropout masks repeat");
    // Base path is untouched by dropout: with adapters off, train == eval.
    let off_t = ForwardSpec {
        adapters_off: true,
        train: true,
        ..ForwardSpec::logits()
    };
    let off_e = ForwardSpec {
        adapters_off: true,
        ..ForwardSpec::logits()
    };
    assert_eq!(
        max_abs(&logits(&m, &ids, &off_t), &logits(&m, &ids, &off_e)),
        0.0
    );
}

/// PEFT's LoRA initialisations: B = 0 (the adapter starts as the identity), A kaiming-uniform
/// with bound 1/sqrt(in) (PEFT: `kaiming_uniform_(a=sqrt(5))`), or normal with std 1/r.
#[test]
fn lora_initialisations() {
    for gaussian in [false, true] {
        let mut m = Llama::load(&fixture("llama_gqa_rope3"), DType::F32, &Device::Cpu).unwrap();
        let mut raw = peft::AdapterConfig::lora(4, 8.0, &llama::PROJECTIONS).raw;
        if gaussian {
            raw.insert("init_lora_weights".into(), serde_json::json!("gaussian"));
        }
        let cfg = peft::AdapterConfig::from_json(raw, std::path::Path::new("adapter_config.json"))
            .unwrap();
        let ids = Tensor::new(&[[3u32, 7, 11, 2, 5]], &Device::Cpu).unwrap();
        let base = logits(&m, &ids, &ForwardSpec::logits());
        peft::add_adapter(&mut m, "x", cfg, None, 1).unwrap();
        assert_eq!(
            max_abs(&logits(&m, &ids, &ForwardSpec::logits()), &base),
            0.0
        );
        let mut a_vals = Vec::new();
        let mut fan_in = 0;
        for (name, var) in peft::adapter_params(&m, 0) {
            let t = var.as_tensor();
            if name.ends_with("lora_B.weight") {
                assert_eq!(
                    t.abs()
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap(),
                    0.0
                );
            } else if name.ends_with("q_proj.lora_A.weight") {
                fan_in = t.dim(1).unwrap();
                a_vals.extend(t.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            }
        }
        let n = a_vals.len() as f32;
        let mean = a_vals.iter().sum::<f32>() / n;
        let std = (a_vals.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / n).sqrt();
        if gaussian {
            // std 1/r = 0.25 over 768 draws: within 10%.
            assert!((std - 0.25).abs() < 0.025, "gaussian std {std}");
        } else {
            let bound = 1.0 / (fan_in as f32).sqrt();
            assert!(
                a_vals.iter().all(|x| x.abs() <= bound),
                "outside the kaiming bound"
            );
            // Uniform(-b, b) has std b/sqrt(3).
            let want = bound / 3f32.sqrt();
            assert!(
                (std - want).abs() < 0.1 * want,
                "uniform std {std} vs {want}"
            );
        }
    }
}

/// `"all-linear"` targets every linear layer but the output head (PEFT's rule): 7 per Llama layer.
#[test]
fn all_linear_targets_every_projection() {
    let mut m = Llama::load(&fixture("llama_gqa_rope3"), DType::F32, &Device::Cpu).unwrap();
    let mut raw = peft::AdapterConfig::lora(2, 4.0, &["q_proj"]).raw;
    raw.insert("target_modules".into(), serde_json::json!("all-linear"));
    let cfg =
        peft::AdapterConfig::from_json(raw, std::path::Path::new("adapter_config.json")).unwrap();
    peft::add_adapter(&mut m, "all", cfg, None, 0).unwrap();
    let params = peft::adapter_params(&m, 0);
    assert_eq!(params.len(), 3 * 7 * 2);
    assert!(params.iter().all(|(k, _)| !k.contains("lm_head")));
}

/// f16 weights: logits close to f32 (f16 has 11 bits of mantissa, finer than bf16's 8; the same
/// reasoning as the bf16 test gives 2% + 0.05).
#[test]
fn f16_is_close_to_f32() {
    let dir = fixture("llama_gqa_rope3");
    let ids = Tensor::new(&[[3u32, 7, 11, 2, 5, 9, 1, 4]], &Device::Cpu).unwrap();
    let a = logits(
        &Llama::load(&dir, DType::F32, &Device::Cpu).unwrap(),
        &ids,
        &ForwardSpec::logits(),
    );
    let b = logits(
        &Llama::load(&dir, DType::F16, &Device::Cpu).unwrap(),
        &ids,
        &ForwardSpec::logits(),
    );
    assert_eq!(b.dtype(), DType::F16);
    let b = b.to_dtype(DType::F32).unwrap();
    let diff = (&b - &a).unwrap().abs().unwrap();
    let tol = ((a.abs().unwrap() * 0.02).unwrap() + 0.05).unwrap();
    let over: f32 = diff
        .gt(&tol)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert_eq!(over, 0.0);
}

/// `Llama::random` is seeded: the same seed gives the same model, another seed another one.
#[test]
fn random_models_are_seeded() {
    let cfg = reprpo_models::LlamaConfig::preset("tiny").unwrap();
    let ids = Tensor::new(&[[3u32, 7, 11, 2, 5]], &Device::Cpu).unwrap();
    let m = |seed| Llama::random(cfg.clone(), 0.02, seed, DType::F32, &Device::Cpu).unwrap();
    let a = logits(&m(1), &ids, &ForwardSpec::logits());
    let b = logits(&m(1), &ids, &ForwardSpec::logits());
    let c = logits(&m(2), &ids, &ForwardSpec::logits());
    assert_eq!(max_abs(&a, &b), 0.0);
    assert!(max_abs(&a, &c) > 1e-4);
    assert!(reprpo_models::LlamaConfig::preset("nope").is_none());
}
