//! Adapters against PEFT 0.21.2 (fixtures from `tests/reference/gen_model_fixtures.py`): adapters
//! saved by PEFT load here and give PEFT's logits and hidden states, the adapter-off forward gives
//! the base logits, the gradient of a fixed scalar reaches every adapter parameter and equals
//! PEFT's, and an adapter saved here has PEFT's keys, shapes and config and reloads identically.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use candle_core::{DType, Device};
use reprpo_models::{ForwardSpec, Llama, peft};

use crate::common;

use common::{check_adapter, fixture as base_dir, peft_load, rel_err, rel_err_masked, st};

fn check(base: &str, adapter: &str, last_hidden: usize) {
    let model = Llama::load(&base_dir(base), DType::F32, &Device::Cpu).unwrap();
    check_adapter(model, base, adapter, last_hidden, peft_load);
}

#[test]
fn lora_matches_peft() {
    check("llama_gqa_rope3", "lora_r4", 3);
}

#[test]
fn rslora_matches_peft() {
    check("llama_gqa_rope3", "rslora_r4", 3);
}

#[test]
fn dora_matches_peft() {
    check("llama_gqa_rope3", "dora_r4", 3);
}

#[test]
fn layers_to_transform_matches_peft() {
    check("llama_gqa_rope3", "lora_layers", 3);
}

#[test]
fn regex_targets_match_peft() {
    check("llama_gqa_rope3", "lora_regex", 3);
}

/// Saved here: the same keys, shapes and config as PEFT's own files, and it reloads to the same
/// outputs. Merging gives the same logits as the unmerged adapter; unmerging restores the base
/// exactly.
#[test]
fn save_reload_merge_unmerge() {
    let dir = base_dir("llama_gqa_rope3");
    let adir = dir.join("adapters/dora_r4");
    let inputs = st(dir.join("adapters/inputs.safetensors"));
    let ids = inputs["input_ids"].to_dtype(DType::U32).unwrap();
    let mask = &inputs["attention_mask"];
    let mut model = Llama::load(&dir, DType::F32, &Device::Cpu).unwrap();
    peft::load_adapter(&mut model, &adir, "dora").unwrap();
    let out = tempfile::tempdir().unwrap();
    peft::save_adapter(&model, "dora", out.path()).unwrap();
    let peft_file = st(adir.join("adapter_model.safetensors"));
    let ours = st(out.path().join("adapter_model.safetensors"));
    let mut a: Vec<_> = peft_file
        .iter()
        .map(|(k, t)| (k.clone(), t.dims().to_vec(), t.dtype()))
        .collect();
    let mut b: Vec<_> = ours
        .iter()
        .map(|(k, t)| (k.clone(), t.dims().to_vec(), t.dtype()))
        .collect();
    a.sort_by(|x, y| x.0.cmp(&y.0));
    b.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(a, b);
    for (k, t) in &peft_file {
        assert_eq!(rel_err(&ours[k], t), 0.0, "{k} changed on the round trip");
    }
    let cfg_peft: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(adir.join("adapter_config.json")).unwrap())
            .unwrap();
    let cfg_ours: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg_peft, cfg_ours);
    // Reload ours as a second adapter; switch between them.
    peft::load_adapter(&mut model, out.path(), "again").unwrap();
    let run = |m: &Llama| {
        m.forward(&ids, Some(mask), None, &ForwardSpec::logits())
            .unwrap()
            .logits
            .unwrap()
    };
    let first = run(&model);
    model.adapters.active = model.adapters.index("again");
    let second = run(&model);
    assert_eq!(rel_err_masked(&second, &first, mask), 0.0);
    // Merge / unmerge.
    use reprpo_models::adapter::AdapterHost;
    for lin in model.linears_mut() {
        lin.merge(1).unwrap();
    }
    let merged = run(&model);
    let e = rel_err_masked(&merged, &first, mask);
    assert!(e < 1e-5, "merged vs unmerged rel err {e}");
    for lin in model.linears_mut() {
        lin.unmerge();
    }
    model.adapters.active = None;
    let base = run(&model);
    let e = rel_err_masked(&base, &inputs["logits_base"], mask);
    assert!(e < 1e-4, "after unmerge, base logits rel err {e}");
}

/// Config keys: unknown keys and unsupported values are errors naming the key.
#[test]
fn unknown_or_unsupported_config_keys_are_errors() {
    let adir = base_dir("llama_gqa_rope3").join("adapters/lora_r4");
    let text = std::fs::read_to_string(adir.join("adapter_config.json")).unwrap();
    let base: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text).unwrap();
    let cases = [
        ("lora_frobnicate", serde_json::json!(1), "unknown key"),
        ("bias", serde_json::json!("all"), "not supported"),
        ("fan_in_fan_out", serde_json::json!(true), "not supported"),
        (
            "rank_pattern",
            serde_json::json!({"q_proj": 8}),
            "not supported",
        ),
        (
            "modules_to_save",
            serde_json::json!(["lm_head"]),
            "not supported",
        ),
        (
            "peft_type",
            serde_json::json!("IA3"),
            "unsupported adapter type",
        ),
    ];
    for (k, v, msg) in cases {
        let mut m = base.clone();
        m.insert(k.into(), v);
        let err = peft::AdapterConfig::from_json(m, std::path::Path::new("adapter_config.json"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("key `{k}`")) && err.contains(msg),
            "{k}: {err}"
        );
    }
}
