//! The objective of a method preset on a real (tiny) model against the reference ReprPO project's
//! own training step (`PL_REPRPO_MODEL._loss_fn` with its real forward hooks; fixture
//! `tests/fixtures/methods/step.*`, written by `tests/reference/gen_methods_step_fixtures.py` on the
//! tiny Llama and PEFT adapter of `tests/fixtures/methods/tiny_llama`): the first step's loss, every
//! metric the reference logs, and the gradients of every LoRA tensor and transform parameter, for
//! `side-none-rank` (side activations: the inputs of every o_proj / down_proj) and an ETHER
//! prefvec run on hidden states. f32; relative error at most 1e-4.
//!
//! The preset `hs-ether-prefvec` itself is degenerate on this model (hidden size 32 gives
//! ETHER's bottleneck ⌊32 / 60⌋ = 0 features, so the reference maps every activation to 0 and
//! trains the DPO term alone); here that configuration is an error naming the key, tested below.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use reprpo_data::tokenize::Batch;
use reprpo_models::{Llama, peft};
use reprpo_train::TrainConfig;
use reprpo_train::config::Sources;
use reprpo_train::data::DeviceBatch;
use reprpo_train::method::{MethodSetup, method_batch_loss};
use serde_json::Value;

const TOL: f64 = 1e-4;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/methods")
}

fn model() -> Llama {
    let d = dir().join("tiny_llama");
    let mut m = Llama::load(&d, DType::F32, &Device::Cpu).unwrap();
    peft::load_adapter(&mut m, &d.join("adapter"), "policy").unwrap();
    m.adapters.active = Some(0);
    m
}

fn config(overrides: &[&str]) -> TrainConfig {
    TrainConfig::resolve(&Sources {
        overrides: overrides.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    })
    .unwrap()
}

fn batch(t: &HashMap<String, Tensor>) -> DeviceBatch {
    let ids = Tensor::cat(&[&t["batch/chosen"], &t["batch/rejected"]], 0).unwrap();
    let mask = Tensor::cat(&[&t["batch/chosen_mask"], &t["batch/rejected_mask"]], 0).unwrap();
    let (rows, seq_len) = ids.dims2().unwrap();
    let input_ids: Vec<u32> = ids
        .flatten_all()
        .unwrap()
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec1()
        .unwrap();
    let attention_mask: Vec<u8> = mask
        .flatten_all()
        .unwrap()
        .to_dtype(DType::U8)
        .unwrap()
        .to_vec1()
        .unwrap();
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

fn max_abs(x: &Tensor) -> f64 {
    f64::from(
        x.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
    )
}

fn check(case: &str, overrides: &[&str]) {
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("step.json")).unwrap()).unwrap();
    let t = candle_core::safetensors::load(dir().join("step.safetensors"), &Device::Cpu).unwrap();
    let c = json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == case)
        .unwrap();
    let m = model();
    let cfg = config(overrides);
    let setup = MethodSetup::new(&cfg, &m).unwrap();
    let prefix = format!("case/{case}/param/");
    let params: HashMap<String, Tensor> = t
        .iter()
        .filter_map(|(k, v)| k.strip_prefix(&prefix).map(|n| (n.to_string(), v.clone())))
        .collect();
    reprpo_models::transform::set_from(setup.transform.as_ref(), &params, &dir()).unwrap();
    let out = method_batch_loss(&m, &setup, &batch(&t), true, false, None).unwrap();
    let mut errs = Vec::new();
    let close = |a: f64, b: f64| (a - b).abs() <= TOL * b.abs().max(1e-3);
    let loss = f64::from(out.loss.to_scalar::<f32>().unwrap());
    let want = c["loss"].as_f64().unwrap();
    if !close(loss, want) {
        errs.push(format!("loss {loss} vs reference {want}"));
    }
    let info = c["info"].as_object().unwrap();
    for (k, v) in info {
        let w = v.as_f64().unwrap();
        match out.metrics.get(k) {
            None => errs.push(format!("metric {k} missing")),
            Some(g) => {
                let g = f64::from(g.to_scalar::<f32>().unwrap());
                if !close(g, w) {
                    errs.push(format!("metric {k}: {g} vs reference {w}"));
                }
            }
        }
    }
    let grads = out.loss.backward().unwrap();
    let mut named: Vec<(String, candle_core::Var)> = peft::adapter_params(&m, 0)
        .into_iter()
        .map(|(n, v)| {
            (
                format!("lora/{}", n.trim_start_matches(peft::KEY_PREFIX)),
                v,
            )
        })
        .collect();
    named.extend(setup.params());
    let mut checked = 0;
    for (name, v) in named {
        let Some(w) = t.get(&format!("case/{case}/grad/{name}")) else {
            errs.push(format!("no reference gradient for {name}"));
            continue;
        };
        let scale = max_abs(w);
        let got = grads
            .get(v.as_tensor())
            .cloned()
            .unwrap_or(w.zeros_like().unwrap());
        let diff = max_abs(&(got - w).unwrap());
        if diff > TOL * scale + 1e-7 {
            errs.push(format!(
                "{name}: max |diff| {diff:e}, reference max {scale:e}"
            ));
        }
        checked += 1;
    }
    assert!(checked >= 16, "{checked} gradients checked");
    assert!(
        errs.is_empty(),
        "{case}: {} problems:\n{}",
        errs.len(),
        errs.join("\n")
    );
}

#[test]
fn side_none_rank_first_step_matches_the_reference() {
    check("side-none-rank", &["loss=side-none-rank"]);
}

#[test]
fn hs_ether_prefvec_first_step_matches_the_reference() {
    check(
        "x-hs-ether-prefvec-reduction4-layers123",
        &[
            "loss=hs-ether-prefvec",
            "method.ether.reduction=4",
            "method.collection_layers=\"1,2,3\"",
        ],
    );
}

#[test]
fn the_degenerate_ether_bottleneck_is_an_error_naming_the_key() {
    let m = model();
    let cfg = config(&["loss=hs-ether-prefvec"]);
    let e = MethodSetup::new(&cfg, &m).unwrap_err().to_string();
    assert!(
        e.contains("method.ether.reduction") && e.contains("⌊32 / reduction 60⌋ = 0"),
        "{e}"
    );
}
