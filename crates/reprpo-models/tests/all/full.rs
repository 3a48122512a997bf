//! Full fine-tuning as an adapter kind (`peft_type` `"FULL"`, `full.rs`) on the `llama_gqa_rope3`
//! fixture: with random deltas the adapted model equals a model whose linear weights were replaced
//! by `W + Δ` (f32, 1e-5 relative), adapters off give the base logits exactly, merge and unmerge
//! agree, the saved adapter reloads bit for bit. Gradients, in f64: the delta's gradient equals the
//! weight gradient that a LoRA adapter on the same layers sees (`∂L/∂B = s (∂L/∂W') Aᵀ` at
//! `B = 0`, an independent path through the fused LoRA matmul; 1e-6 relative, as both gradients
//! are rounded to the f32 of the adapter variables), and central finite
//! differences of the loss at step 2^-8 as a coarse second check (1e-3 of the gradient scale;
//! errors seen 1e-5 to 5e-5 with the unseeded random deltas: truncation at this step, and the
//! differences of this f64 forward stop shrinking below about 1e-9 of the loss, so smaller steps
//! are noisier, not more exact).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use candle_core::{D, DType, Device, Tensor};
use reprpo_models::adapter::AdapterHost;
use reprpo_models::{ForwardSpec, Llama, peft};

fn base() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/llama_gqa_rope3")
}

fn inputs() -> (Tensor, Tensor, Tensor) {
    let t =
        candle_core::safetensors::load(base().join("adapters/inputs.safetensors"), &Device::Cpu)
            .unwrap();
    (
        t["input_ids"].to_dtype(DType::U32).unwrap(),
        t["attention_mask"].clone(),
        t["position_ids"].to_dtype(DType::U32).unwrap(),
    )
}

fn full_config(targets: serde_json::Value) -> peft::AdapterConfig {
    let raw = serde_json::json!({ "peft_type": "FULL", "target_modules": targets });
    let serde_json::Value::Object(m) = raw else {
        unreachable!()
    };
    peft::AdapterConfig::from_json(m, Path::new("adapter_config.json")).unwrap()
}

fn logits(model: &Llama) -> Tensor {
    let (ids, mask, pos) = inputs();
    model
        .forward(&ids, Some(&mask), Some(&pos), &ForwardSpec::logits())
        .unwrap()
        .logits
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Random deltas (std 0.05) on every targeted layer.
fn randomise(model: &dyn AdapterHost) {
    for (_, var) in peft::adapter_params(model, 0) {
        var.set(&var.as_tensor().randn_like(0.0, 0.05).unwrap())
            .unwrap();
    }
}

#[test]
fn full_delta_equals_replaced_weights_and_round_trips() {
    let dev = Device::Cpu;
    let mut model = Llama::load(&base(), DType::F32, &dev).unwrap();
    let plain = logits(&model);
    peft::add_adapter(
        &mut model,
        "default",
        full_config("all-linear".into()),
        None,
        0,
    )
    .unwrap();
    // Zero deltas at the start: the adapted model is the base model.
    assert_eq!(max_abs(&(logits(&model) - &plain).unwrap()), 0.0);
    randomise(&model);
    let adapted = logits(&model);
    let scale = max_abs(&adapted);
    assert!(
        max_abs(&(&adapted - &plain).unwrap()) > 1e-3 * scale,
        "deltas change nothing"
    );

    // The reference computation: a model without adapters whose weights are W + Δ.
    let mut replaced = Llama::load(&base(), DType::F32, &dev).unwrap();
    let deltas: Vec<(String, Tensor)> = peft::adapter_params(&model, 0)
        .into_iter()
        .map(|(k, v)| (k, v.as_tensor().clone()))
        .collect();
    let mut n = 0;
    for lin in replaced.linears_mut() {
        let key = format!("{}{}.full_delta.weight", peft::KEY_PREFIX, lin.name);
        if let Some((_, d)) = deltas.iter().find(|(k, _)| *k == key) {
            let w = (lin.weight.dense().unwrap() + d).unwrap();
            lin.weight = reprpo_models::adapter::BaseWeight::Dense(w);
            n += 1;
        }
    }
    assert_eq!(n, deltas.len());
    assert_eq!(
        n,
        model.linears().len(),
        "all-linear targets every linear layer"
    );
    let e = max_abs(&(logits(&replaced) - &adapted).unwrap()) / scale;
    assert!(e < 1e-5, "adapted vs replaced weights: {e:e}");

    // Adapters off: the base logits exactly.
    let (ids, mask, pos) = inputs();
    let spec = ForwardSpec {
        adapters_off: true,
        ..ForwardSpec::logits()
    };
    let off = model
        .forward(&ids, Some(&mask), Some(&pos), &spec)
        .unwrap()
        .logits
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    assert_eq!(max_abs(&(off - &plain).unwrap()), 0.0);

    // Merge, unmerge.
    for lin in model.linears_mut() {
        lin.merge(0).unwrap();
    }
    let e = max_abs(&(logits(&model) - &adapted).unwrap()) / scale;
    assert!(e < 1e-5, "merged: {e:e}");
    for lin in model.linears_mut() {
        lin.unmerge();
    }
    assert_eq!(max_abs(&(logits(&model) - &adapted).unwrap()), 0.0);

    // Save and reload: the same logits bit for bit; the config says FULL.
    let tmp = tempfile::tempdir().unwrap();
    peft::save_adapter(&model, "default", tmp.path()).unwrap();
    let cfg = std::fs::read_to_string(tmp.path().join("adapter_config.json")).unwrap();
    assert!(cfg.contains("\"FULL\""), "{cfg}");
    let mut again = Llama::load(&base(), DType::F32, &dev).unwrap();
    peft::load_adapter(&mut again, tmp.path(), "default").unwrap();
    assert_eq!(max_abs(&(logits(&again) - &adapted).unwrap()), 0.0);
}

#[test]
fn full_delta_gradient_matches_finite_differences_f64() {
    let dev = Device::Cpu;
    let mut model = Llama::load(&base(), DType::F64, &dev).unwrap();
    let cfg = full_config(serde_json::json!(["q_proj", "down_proj"]));
    peft::add_adapter(&mut model, "default", cfg, None, 0).unwrap();
    randomise(&model);
    let params = peft::adapter_params(&model, 0);
    assert!(params.len() >= 2);
    // A loss with every logit in it: sum(logits * g) / n, plus a log-softmax term.
    let g = logits(&model).randn_like(0.0, 1.0).unwrap();
    let loss = |m: &Llama| -> Tensor {
        let l = logits(m);
        let lsm = candle_nn_free_log_softmax(&l);
        ((&l * &g).unwrap().mean_all().unwrap() + lsm.mean_all().unwrap()).unwrap()
    };
    let grads = loss(&model).backward().unwrap();
    let mut worst: f64 = 0.0;
    for (name, var) in &params {
        let gv = grads.get(var.as_tensor()).expect("a delta gets a gradient");
        let gvals: Vec<f32> = gv.flatten_all().unwrap().to_vec1().unwrap();
        let scale = gvals.iter().fold(0f64, |m, v| m.max(f64::from(v.abs())));
        assert!(scale > 0.0, "{name}: zero gradient");
        let base_vals: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let shape = var.as_tensor().shape().clone();
        for k in 0..6 {
            let idx = (k * 7919 + 3) % base_vals.len();
            // The deltas are f32: the step actually taken is the difference of the rounded
            // perturbed values.
            let h = 2f32.powi(-8);
            let at = |d: f32| -> (f64, f64) {
                let mut v = base_vals.clone();
                v[idx] += d;
                let x = f64::from(v[idx]);
                var.set(&Tensor::from_vec(v, shape.clone(), &dev).unwrap())
                    .unwrap();
                (loss(&model).to_scalar::<f64>().unwrap(), x)
            };
            let ((lp, xp), (lm, xm)) = (at(h), at(-h));
            let fd = (lp - lm) / (xp - xm);
            var.set(&Tensor::from_vec(base_vals.clone(), shape.clone(), &dev).unwrap())
                .unwrap();
            let e = (fd - f64::from(gvals[idx])).abs() / scale;
            worst = worst.max(e);
            assert!(
                e < 1e-3,
                "{name}[{idx}]: gradient {} vs fd {fd}",
                gvals[idx]
            );
        }
    }
    eprintln!("full delta gradient vs finite differences: worst {worst:.2e} of the scale");
}

#[test]
fn full_delta_gradient_is_the_weight_gradient_lora_sees() {
    let dev = Device::Cpu;
    let targets = serde_json::json!(["q_proj", "gate_proj"]);
    // FULL at delta 0 and LoRA at B = 0 both compute the base model.
    let mut full = Llama::load(&base(), DType::F64, &dev).unwrap();
    peft::add_adapter(&mut full, "default", full_config(targets.clone()), None, 0).unwrap();
    let mut lora = Llama::load(&base(), DType::F64, &dev).unwrap();
    let raw = serde_json::json!({
        "peft_type": "LORA", "r": 3, "lora_alpha": 6.0, "target_modules": targets
    });
    let serde_json::Value::Object(m) = raw else {
        unreachable!()
    };
    let lcfg = peft::AdapterConfig::from_json(m, Path::new("adapter_config.json")).unwrap();
    peft::add_adapter(&mut lora, "default", lcfg, None, 1).unwrap();
    let g = logits(&full).randn_like(0.0, 1.0).unwrap();
    let loss = |m: &Llama| (logits(m) * &g).unwrap().sum_all().unwrap();
    let gf = loss(&full).backward().unwrap();
    let gl = loss(&lora).backward().unwrap();
    let lp = peft::adapter_params(&lora, 0);
    let (mut checked, mut worst) = (0, 0f64);
    for (name, dvar) in peft::adapter_params(&full, 0) {
        let module = name.trim_end_matches(".full_delta.weight");
        let find = |suffix: &str| {
            lp.iter()
                .find(|(k, _)| *k == format!("{module}.{suffix}"))
                .map(|(_, v)| v.clone())
                .unwrap()
        };
        let (a, b) = (find("lora_A.weight"), find("lora_B.weight"));
        let gw = gf
            .get(dvar.as_tensor())
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let gb = gl.get(b.as_tensor()).unwrap().to_dtype(DType::F64).unwrap();
        // s = alpha / r = 2.
        let a64 = a.as_tensor().to_dtype(DType::F64).unwrap();
        let want = (gw.matmul(&a64.t().unwrap()).unwrap() * 2.0).unwrap();
        let e = max_abs(&(gb - &want).unwrap()) / max_abs(&want);
        assert!(e < 1e-6, "{module}: dL/dB vs s dL/dDelta A^T: {e:e}");
        worst = worst.max(e);
        checked += 1;
    }
    assert_eq!(
        checked,
        2 * full.config.num_layers,
        "two targets in every layer"
    );
    eprintln!("dL/dB vs s dL/dDelta A^T: worst {worst:.2e}");
}

/// `log_softmax` over the last dimension from candle-core ops.
fn candle_nn_free_log_softmax(x: &Tensor) -> Tensor {
    let m = x.max_keepdim(D::Minus1).unwrap();
    let s = x.broadcast_sub(&m).unwrap();
    let lse = s
        .exp()
        .unwrap()
        .sum_keepdim(D::Minus1)
        .unwrap()
        .log()
        .unwrap();
    s.broadcast_sub(&lse).unwrap()
}

/// The merged export of a full fine-tune loads as a plain model with the adapted model's logits,
/// for Llama and for Phi-3's fused `qkv_proj` / `gate_up_proj`.
#[test]
fn export_merged_reloads_as_the_adapted_model() {
    use reprpo_models::{CausalLm, Phi3};
    let dev = Device::Cpu;
    let fx = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models");
    let (ids, mask, pos) = inputs();
    let run = |m: &dyn CausalLm| -> Tensor {
        m.forward(&ids, Some(&mask), Some(&pos), &ForwardSpec::logits())
            .unwrap()
            .logits
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
    };
    let tmp = tempfile::tempdir().unwrap();
    // Llama.
    let dir = fx.join("llama_gqa_rope3");
    let mut m = Llama::load(&dir, DType::F32, &dev).unwrap();
    peft::add_adapter(&mut m, "default", full_config("all-linear".into()), None, 0).unwrap();
    randomise(&m);
    let out = tmp.path().join("llama");
    peft::export_merged(&m, "default", &dir, &out).unwrap();
    let merged = Llama::load(&out, DType::F32, &dev).unwrap();
    let (a, b) = (run(&m), run(&merged));
    let e = max_abs(&(&a - &b).unwrap()) / max_abs(&a);
    assert!(e < 1e-5, "llama merged export: {e:e}");
    assert!(out.join("config.json").is_file());
    // Phi-3 (fused projections), only the attention's qkv_proj targeted.
    let dir = fx.join("phi3_mini");
    let mut p = Phi3::load(&dir, DType::F32, &dev).unwrap();
    let plain = run(&p);
    peft::add_adapter(
        &mut p,
        "default",
        full_config(serde_json::json!(["qkv_proj"])),
        None,
        0,
    )
    .unwrap();
    randomise(&p);
    let out = tmp.path().join("phi3");
    peft::export_merged(&p, "default", &dir, &out).unwrap();
    let merged = Phi3::load(&out, DType::F32, &dev).unwrap();
    let (a, b) = (run(&p), run(&merged));
    let e = max_abs(&(&a - &b).unwrap()) / max_abs(&a);
    assert!(e < 1e-5, "phi3 merged export: {e:e}");
    assert!(
        max_abs(&(&a - &plain).unwrap()) > 1e-3 * max_abs(&a),
        "deltas change nothing"
    );
}
