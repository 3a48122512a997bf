//! Training on a quantised base (`model.quantize`, issue 19) through the job: adapters train on
//! NF4, FP4 (with double quantisation) and int8 bases, the configurations that cannot work are
//! errors naming their key before anything runs, and the run's memory reaches `metrics.jsonl`
//! and the summary. The quantisation itself is checked against bitsandbytes in the models
//! crate (`quant_reference.rs`, `qlora_reference.rs`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::path::Path;

use common::{config, ctx};
use reprpo_train::trainer;

fn rows(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Train two steps; the adapter must move from its initial value (LoRA's B and BOFT's R start
/// at 0 and must not stay there) and every logged loss be finite.
fn trains(extra: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let mut all = vec!["loss=dpo", "train.max_steps=2", "train.lr=1e-2"];
    all.extend_from_slice(extra);
    let cfg = config(tmp.path(), &all);
    let out = trainer::train(&cfg, &ctx(false), None).unwrap();
    assert_eq!(out.steps, 2, "{extra:?}");
    let bits = common::adapter_bits(&out.run_dir.join("adapter"));
    let moved = bits
        .iter()
        .filter(|(k, _)| k.contains("lora_B") || k.contains("boft_R"))
        .any(|(_, v)| v.iter().any(|&b| f32::from_bits(b) != 0.0));
    assert!(moved, "{extra:?}: the adapter did not move");
    for r in rows(&out.run_dir) {
        if let Some(l) = r.get("loss") {
            assert!(l.as_f64().unwrap().is_finite(), "{extra:?}: {r}");
        }
    }
}

#[test]
fn lora_trains_on_nf4_fp4_double_quant_and_int8_bases() {
    trains(&["model.quantize=nf4"]);
    trains(&["model.quantize=fp4", "model.double_quant=true"]);
    trains(&["model.quantize=int8"]);
}

#[test]
fn dora_and_boft_train_on_an_nf4_base() {
    trains(&["model.quantize=nf4", "adapter.kind=dora"]);
    trains(&["model.quantize=nf4", "adapter.kind=boft"]);
}

#[test]
fn a_quantised_base_changes_the_first_step_but_not_by_much() {
    // The same run on the dense and the NF4 base: the first step's DPO metrics are ln 2 for
    // both (policy = reference while B = 0), but the chosen log-probabilities differ (the
    // quantised weights are not the dense ones) by less than their spread.
    let logps = |q: &str| {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = config(
            tmp.path(),
            &[
                "loss=dpo",
                "train.max_steps=1",
                &format!("model.quantize={q}"),
            ],
        );
        let out = trainer::train(&cfg, &ctx(false), None).unwrap();
        let r = rows(&out.run_dir);
        let first = r.iter().find(|r| r.get("loss").is_some()).unwrap().clone();
        (
            first["loss"].as_f64().unwrap(),
            first["logps/chosen"].as_f64().unwrap(),
        )
    };
    let (l_dense, c_dense) = logps("none");
    let (l_nf4, c_nf4) = logps("nf4");
    let ln2 = std::f64::consts::LN_2;
    assert!((l_dense - ln2).abs() < 1e-6 && (l_nf4 - ln2).abs() < 1e-6);
    assert!(
        c_dense != c_nf4,
        "the quantised base gave the dense log-probabilities"
    );
    assert!(
        (c_dense - c_nf4).abs() < 0.05 * c_dense.abs(),
        "{c_dense} vs {c_nf4}"
    );
}

#[test]
fn configurations_that_cannot_work_name_their_key() {
    let err = |extra: &[&str]| -> String {
        let mut all = vec!["loss=dpo"];
        all.extend_from_slice(extra);
        let overrides = all.iter().map(|s| s.to_string()).collect();
        reprpo_train::TrainConfig::resolve(&reprpo_train::config::Sources {
            overrides,
            ..Default::default()
        })
        .and_then(|c| c.validate().map(|_| c))
        .unwrap_err()
        .to_string()
    };
    let e = err(&["model.quantize=nf5"]);
    assert!(
        e.contains("model.quantize") && e.contains("nf4, fp4 or int8"),
        "{e}"
    );
    let e = err(&["model.quantize=int8", "model.double_quant=true"]);
    assert!(e.contains("model.double_quant"), "{e}");
    let e = err(&["model.double_quant=true"]);
    assert!(e.contains("model.double_quant"), "{e}");
    let e = err(&["model.quantize=nf4", "sft.steps=5"]);
    assert!(e.contains("sft.steps") && e.contains("quantised"), "{e}");
    let e = err(&["model.quantize=nf4", "adapter.kind=full", "sft.steps=0"]);
    assert!(e.contains("adapter.kind") && e.contains("quantised"), "{e}");
}

#[test]
fn memory_is_logged_and_summarised() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(
        tmp.path(),
        &["loss=dpo", "train.max_steps=2", "run.log_memory=true"],
    );
    let out = trainer::train(&cfg, &ctx(false), None).unwrap();
    let peak = |v: Option<&serde_json::Value>| v.and_then(serde_json::Value::as_f64);
    // This process holds at least the test binary and the model: more than 1 MiB, less than
    // the machine.
    let plausible = |m: f64| m > 1.0 && m < 1e7;
    let logged: Vec<f64> = rows(&out.run_dir)
        .iter()
        .filter(|r| r.get("loss").is_some())
        .map(|r| peak(r.get("memory/peak_rss_mib")).unwrap())
        .collect();
    assert_eq!(logged.len(), 2);
    assert!(logged.iter().all(|&m| plausible(m)), "{logged:?}");
    assert!(logged[1] >= logged[0], "a peak cannot fall: {logged:?}");
    let s = peak(out.summary.get("memory/peak_rss_mib")).unwrap();
    assert!(s >= logged[1], "summary {s} < last logged {}", logged[1]);
    let off = config(tmp.path(), &["loss=dpo", "train.max_steps=1"]);
    let out = trainer::train(&off, &ctx(false), None).unwrap();
    assert!(
        rows(&out.run_dir)
            .iter()
            .all(|r| r.get("memory/peak_rss_mib").is_none())
    );
    assert!(out.summary.contains_key("memory/peak_rss_mib"));
}

#[test]
fn the_weight_estimate_matches_the_bytes_a_loaded_base_holds() {
    use reprpo_models::adapter::{AdapterHost, BaseWeight};
    use reprpo_models::{LlamaConfig, LoadOptions};
    let tmp = tempfile::tempdir().unwrap();
    for (q, dq) in [
        ("none", false),
        ("nf4", false),
        ("fp4", true),
        ("int8", false),
    ] {
        let cfg = config(
            tmp.path(),
            &[
                "model.name_or_path=small",
                &format!("model.quantize={q}"),
                &format!("model.double_quant={dq}"),
            ],
        );
        let preset = LlamaConfig::preset("small").unwrap();
        let opts = LoadOptions {
            dtype: candle_core::DType::F32,
            device: candle_core::Device::Cpu,
            quantize: cfg.model.quant_config().unwrap(),
        };
        let m = reprpo_models::Llama::random_with(preset.clone(), 0.02, 0, &opts).unwrap();
        let linear: usize = m
            .linears()
            .iter()
            .map(|l| match &l.weight {
                BaseWeight::Dense(w) => w.elem_count() * 4,
                BaseWeight::Quant { q, .. } => q.nbytes(),
            })
            .sum();
        let tied = if preset.tie_word_embeddings { 1 } else { 2 };
        let held = (linear + tied * preset.vocab_size * preset.hidden_size * 4) as f64;
        let shape = reprpo_train::memory::shape_of(&cfg).unwrap();
        let est = reprpo_train::memory::estimate(&cfg, &shape).weights;
        // The estimate leaves out the norms and the 4-bit code books (a few KiB).
        assert!(
            (est - held).abs() <= 0.005 * held,
            "{q} double_quant={dq}: estimate {est} vs held {held}"
        );
    }
}

#[test]
fn merging_into_a_quantised_base_is_an_error_naming_the_layer() {
    use reprpo_models::adapter::AdapterHost;
    use reprpo_models::{LlamaConfig, LoadOptions, peft};
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), &["model.quantize=nf4", "sft.steps=0"]);
    let opts = LoadOptions {
        dtype: candle_core::DType::F32,
        device: candle_core::Device::Cpu,
        quantize: cfg.model.quant_config().unwrap(),
    };
    let mut m =
        reprpo_models::Llama::random_with(LlamaConfig::preset("tiny").unwrap(), 0.02, 0, &opts)
            .unwrap();
    peft::add_adapter(
        &mut m,
        "policy",
        peft::AdapterConfig::lora(4, 8.0, &["q_proj"]),
        None,
        0,
    )
    .unwrap();
    let lin = m
        .linears_mut()
        .into_iter()
        .find(|l| l.name.ends_with("q_proj"))
        .unwrap();
    let e = lin.merge(0).unwrap_err().to_string();
    assert!(
        e.contains("model.layers.0.self_attn.q_proj") && e.contains("quantised"),
        "{e}"
    );
    let e = peft::export_merged(&m, "policy", tmp.path(), &tmp.path().join("merged"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("quantised"), "{e}");
    assert!(!tmp.path().join("merged").exists());
}
