//! The Phi-3 forward against `transformers` 5.23 (eager attention, f32) and PEFT 0.21.2, from
//! fixtures written by `tests/reference/gen_model_fixtures.py`: logits and all L+1 hidden states
//! at real positions of a padded batch, plain RoPE and LongRoPE (short factors, long factors and
//! the per-batch choice between them), both `config.json` layouts, the RoPE tables, LoRA and BOFT
//! adapters on the fused `qkv_proj` / `gate_up_proj` layers (outputs and gradients), the KV cache,
//! sliding-window attention and partial rotary embeddings (phi3_mini with an edited config:
//! `phi3_mini/variants.safetensors`), and config errors that name the key.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use reprpo_models::phi3::{HfPhi3Config, Phi3Rope};
use reprpo_models::{ForwardSpec, KvCache, Phi3, Phi3Config};

use crate::common;

use common::{fixture as dir, max_rel_err};

fn load(name: &str, file: &str) -> HashMap<String, Tensor> {
    common::st(dir(name).join(file))
}

fn config_json(name: &str, file: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir(name).join(file)).unwrap()).unwrap()
}

fn validate(v: serde_json::Value) -> reprpo_models::Result<Phi3Config> {
    let cfg: HfPhi3Config = serde_json::from_value(v).unwrap();
    cfg.validate(std::path::Path::new("config.json"))
}

/// The model `name` with the config from `config` (a possibly edited `config.json`).
fn model_with(name: &str, config: serde_json::Value, dtype: DType) -> Phi3 {
    let config = validate(config).unwrap();
    let tensors = reprpo_models::llama::load_safetensors(&dir(name), &Device::Cpu).unwrap();
    Phi3::from_tensors(config, tensors, &dir(name), dtype, &Device::Cpu).unwrap()
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

fn u32s(t: &Tensor) -> Tensor {
    t.to_dtype(DType::U32).unwrap()
}

/// Logits and every hidden state of the plain forward (`position_ids` = None), and logits with the
/// cumsum positions, at real positions.
fn check_model(name: &str, config_file: &str) {
    let inputs = load(name, "inputs.safetensors");
    let expected = load(name, "expected.safetensors");
    let model = model_with(name, config_json(name, config_file), DType::F32);
    let ids = u32s(&inputs["input_ids"]);
    let mask = &inputs["attention_mask"];
    let hs = &expected["hidden_states"];
    let n_states = hs.dim(0).unwrap();
    assert_eq!(n_states, model.config.num_layers + 1);
    let out = common::forward_all_states(&model, &ids, mask);
    let err = max_rel_err(out.logits.as_ref().unwrap(), &expected["logits"], mask);
    eprintln!("{name} ({config_file}): logits rel err {err:.2e}");
    assert!(err < 1e-4, "{name}: logits rel err {err}");
    assert_eq!(out.hidden.len(), n_states);
    for (i, h) in &out.hidden {
        let err = max_rel_err(h, &hs.get(*i).unwrap(), mask);
        eprintln!("{name} ({config_file}): hidden state {i} rel err {err:.2e}");
        assert!(err < 1e-4, "{name}: hidden state {i} rel err {err}");
    }
    // The explicit plain positions give the same; the cumsum ones give `logits_cumsum_pos`.
    let pos = u32s(&inputs["position_ids"]);
    let out2 = model
        .forward(&ids, Some(mask), Some(&pos), &ForwardSpec::logits())
        .unwrap();
    assert_eq!(
        max_abs(out2.logits.as_ref().unwrap(), out.logits.as_ref().unwrap()),
        0.0
    );
    let pos = u32s(&inputs["position_ids_cumsum"]);
    let out = model
        .forward(&ids, Some(mask), Some(&pos), &ForwardSpec::logits())
        .unwrap();
    let err = max_rel_err(
        out.logits.as_ref().unwrap(),
        &expected["logits_cumsum_pos"],
        mask,
    );
    eprintln!("{name} ({config_file}): cumsum-position logits rel err {err:.2e}");
    assert!(err < 1e-4, "{name}: cumsum-position logits rel err {err}");
}

#[test]
fn phi3_mini_matches_transformers() {
    check_model("phi3_mini", "config.json");
}

#[test]
fn phi3_longrope_matches_transformers() {
    check_model("phi3_longrope", "config.json");
}

/// The 4.x layout (`rope_theta`, `rope_scaling` with `type`) gives the same config and outputs.
#[test]
fn legacy_config_layout_gives_the_same_model() {
    for name in ["phi3_mini", "phi3_longrope"] {
        check_model(name, "config_legacy.json");
        let a = Phi3Config::from_dir(&dir(name)).unwrap();
        let b = Phi3Config::from_file(&dir(name).join("config_legacy.json")).unwrap();
        assert_eq!(a, b, "{name}");
    }
    let cfg = Phi3Config::from_dir(&dir("phi3_longrope")).unwrap();
    match &cfg.rope {
        Phi3Rope::LongRope {
            original_max_position_embeddings,
            attention_factor,
            ..
        } => {
            assert_eq!(*original_max_position_embeddings, 16);
            // sqrt(1 + ln(64 / 16) / ln(16)) = sqrt(1.5)
            assert!((attention_factor - 1.5f64.sqrt()).abs() < 1e-12);
        }
        other => panic!("expected LongRoPE, got {other:?}"),
    }
}

/// `cos`, `sin` (attention factor included) and `inv_freq` equal transformers' for positions
/// 0..19 (long factors on phi3_longrope: 20 > 16) and 0..11 (short factors).
#[test]
fn rope_tables_match_transformers() {
    let check = |name: &str, t: usize, prefix: &str, long: bool| {
        let model = Phi3::load(&dir(name), DType::F32, &Device::Cpu).unwrap();
        let expected = load(name, "expected.safetensors");
        let pos = Tensor::arange(0u32, t as u32, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let (cos, sin) = model.rope_tables(&pos).unwrap();
        let cos = cos.squeeze(0).unwrap().squeeze(0).unwrap();
        let sin = sin.squeeze(0).unwrap().squeeze(0).unwrap();
        let ec = max_abs(&cos, &expected[&format!("{prefix}rope_cos")]);
        let es = max_abs(&sin, &expected[&format!("{prefix}rope_sin")]);
        let want: Vec<f32> = expected[&format!("{prefix}rope_inv_freq")]
            .to_vec1()
            .unwrap();
        let got = model.config.inv_freq(long);
        assert_eq!(got.len(), want.len());
        let ef = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (g - w).abs() / w.abs())
            .fold(0f32, f32::max);
        eprintln!("{name} {prefix}: cos {ec:.2e}, sin {es:.2e} max abs err; inv_freq rel {ef:.2e}");
        assert!(
            ec < 1e-5 && es < 1e-5,
            "{name} {prefix}: cos {ec}, sin {es}"
        );
        assert!(ef < 1e-6, "{name} {prefix}: inv_freq rel err {ef}");
    };
    check("phi3_mini", 20, "", false);
    check("phi3_longrope", 20, "", true);
    check("phi3_longrope", 12, "short_", false);
    // The two factor sets really differ, so the choice is tested.
    let cfg = Phi3Config::from_dir(&dir("phi3_longrope")).unwrap();
    assert!(
        cfg.inv_freq(true)
            .iter()
            .zip(cfg.inv_freq(false))
            .any(|(a, b)| (a - b).abs() > 1e-3 * b)
    );
    assert!(!cfg.uses_long_factors(16) && cfg.uses_long_factors(17));
}

/// T = 12 (max position 11 <= 16): the short factors; logits and hidden states.
#[test]
fn longrope_short_batch_uses_short_factors() {
    let name = "phi3_longrope";
    let inputs = load(name, "inputs.safetensors");
    let expected = load(name, "expected.safetensors");
    let model = Phi3::load(&dir(name), DType::F32, &Device::Cpu).unwrap();
    let ids = u32s(&inputs["short_input_ids"]);
    let mask = &inputs["short_attention_mask"];
    let pos = u32s(&inputs["short_position_ids"]);
    let spec = ForwardSpec {
        hidden_layers: vec![0, 1, 2],
        logits: true,
        ..Default::default()
    };
    for p in [None, Some(&pos)] {
        let out = model.forward(&ids, Some(mask), p, &spec).unwrap();
        let err = max_rel_err(
            out.logits.as_ref().unwrap(),
            &expected["short_logits"],
            mask,
        );
        eprintln!("short batch: logits rel err {err:.2e}");
        assert!(err < 1e-4, "short logits rel err {err}");
        for (i, h) in &out.hidden {
            let err = max_rel_err(h, &expected["short_hidden_states"].get(*i).unwrap(), mask);
            eprintln!("short batch: hidden state {i} rel err {err:.2e}");
            assert!(err < 1e-4, "short hidden state {i} rel err {err}");
        }
    }
}

/// All rows left-padded: plain positions (max 19) use the long factors, cumsum positions (max 15)
/// the short ones, and the valid logits really differ between the two.
#[test]
fn longrope_factor_choice_follows_the_batch_positions() {
    let name = "phi3_longrope";
    let inputs = load(name, "inputs.safetensors");
    let expected = load(name, "expected.safetensors");
    let model = Phi3::load(&dir(name), DType::F32, &Device::Cpu).unwrap();
    let ids = u32s(&inputs["allleft_input_ids"]);
    let mask = &inputs["allleft_attention_mask"];
    let plain = model
        .forward(&ids, Some(mask), None, &ForwardSpec::logits())
        .unwrap()
        .logits
        .unwrap();
    let err = max_rel_err(&plain, &expected["allleft_logits"], mask);
    eprintln!("all-left, plain positions (long factors): logits rel err {err:.2e}");
    assert!(err < 1e-4, "all-left plain logits rel err {err}");
    let pos = u32s(&inputs["allleft_position_ids"]);
    let again = model
        .forward(&ids, Some(mask), Some(&pos), &ForwardSpec::logits())
        .unwrap()
        .logits
        .unwrap();
    assert_eq!(max_abs(&again, &plain), 0.0);
    let pos = u32s(&inputs["allleft_position_ids_cumsum"]);
    let cumsum = model
        .forward(&ids, Some(mask), Some(&pos), &ForwardSpec::logits())
        .unwrap()
        .logits
        .unwrap();
    let err = max_rel_err(&cumsum, &expected["allleft_logits_cumsum_pos"], mask);
    eprintln!("all-left, cumsum positions (short factors): logits rel err {err:.2e}");
    assert!(err < 1e-4, "all-left cumsum logits rel err {err}");
    let apart = max_rel_err(
        &expected["allleft_logits"],
        &expected["allleft_logits_cumsum_pos"],
        mask,
    );
    assert!(
        apart > 1e-2,
        "the two factor sets give the same logits ({apart})"
    );
}

/// Early exit: hidden states without logits stop after the deepest layer asked for.
#[test]
fn early_exit_returns_the_same_states() {
    let name = "phi3_mini";
    let inputs = load(name, "inputs.safetensors");
    let expected = load(name, "expected.safetensors");
    let model = Phi3::load(&dir(name), DType::F32, &Device::Cpu).unwrap();
    let ids = u32s(&inputs["input_ids"]);
    let mask = &inputs["attention_mask"];
    let spec = ForwardSpec {
        hidden_layers: vec![1, -2, 0],
        logits: false,
        ..Default::default()
    };
    let out = model.forward(&ids, Some(mask), None, &spec).unwrap();
    assert!(out.logits.is_none());
    let idx: Vec<usize> = out.hidden.iter().map(|(i, _)| *i).collect();
    assert_eq!(idx, vec![1, 1, 0]);
    for (i, h) in &out.hidden {
        let err = max_rel_err(h, &expected["hidden_states"].get(*i).unwrap(), mask);
        assert!(err < 1e-4, "hidden state {i} rel err {err}");
    }
    let bad = ForwardSpec {
        hidden_layers: vec![3],
        ..Default::default()
    };
    assert!(model.forward(&ids, Some(mask), None, &bad).is_err());
}

/// Bound on `|logit(bf16 model) - logit(f32 transformers)|` at real positions of `phi3_longrope`
/// (this is for the bf16 path only; the f32 comparisons above hold 1e-4). Measured (candle CPU):
/// max |diff| 5.63e-2 over 6336 real logits whose largest |value| is 3.30 (mean 0.61); relative
/// to the logit it is 4.7e-2 at |logit| >= 1 (and unbounded near 0, so the bound is absolute).
/// That is ~3.6 bf16 ulps (2^-6) at the largest logits: bf16 rounds weights and activations to 8
/// significant bits (unit roundoff 2^-8 ~ 0.4%), compounded over 2 layers. The bound is the
/// measured maximum x 2 (the old one, 0.1 + 5% of |logit|, allowed up to 0.26, 4.7x the measured
/// error); a wrong mask, RoPE or attention factor is off by order 1.
const BF16_LOGIT_ATOL: f32 = 0.11;

/// bf16: logits within [`BF16_LOGIT_ATOL`] of the f32 reference.
#[test]
fn bf16_is_close_to_f32_reference() {
    let name = "phi3_longrope";
    let inputs = load(name, "inputs.safetensors");
    let expected = load(name, "expected.safetensors");
    let model = Phi3::load(&dir(name), DType::BF16, &Device::Cpu).unwrap();
    let ids = u32s(&inputs["input_ids"]);
    let mask = &inputs["attention_mask"];
    let logits = model
        .forward(&ids, Some(mask), None, &ForwardSpec::logits())
        .unwrap()
        .logits
        .unwrap();
    assert_eq!(logits.dtype(), DType::BF16);
    let got = logits.to_dtype(DType::F32).unwrap();
    let want = &expected["logits"];
    common::assert_bf16_logits(name, &got, want, mask, BF16_LOGIT_ATOL);
}

/// Load `adapter` on phi3_mini; compare outputs and gradients with PEFT's (`common::check_adapter`).
fn check_adapter(adapter: &str) {
    let model = Phi3::load(&dir("phi3_mini"), DType::F32, &Device::Cpu).unwrap();
    common::check_adapter(model, "phi3_mini", adapter, 2, common::peft_load);
}

#[test]
fn lora_on_fused_layers_matches_peft() {
    check_adapter("lora_r4");
}

#[test]
fn boft_on_fused_layers_matches_peft() {
    check_adapter("boft_factor1");
}

/// Logits of a cached forward (4 tokens, then one at a time) equal the full forward's.
fn cached_matches_full(model: &Phi3, ids: &[u32]) -> f32 {
    let row = |xs: &[u32]| Tensor::new(xs, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let full = model
        .forward(&row(ids), None, None, &ForwardSpec::logits())
        .unwrap()
        .logits
        .unwrap()
        .squeeze(0)
        .unwrap();
    let mut cache = KvCache::default();
    let mut got = vec![model.forward_cached(&row(&ids[..4]), &mut cache).unwrap()];
    for &t in &ids[4..] {
        got.push(model.forward_cached(&row(&[t]), &mut cache).unwrap());
    }
    assert_eq!(cache.len, ids.len());
    let mut worst = 0f32;
    for (k, g) in got.iter().enumerate() {
        let p = 3 + k;
        let d = max_abs(&g.squeeze(0).unwrap(), &full.get(p).unwrap());
        worst = worst.max(d);
    }
    worst
}

/// The first row of a fixture's `input_ids`.
fn first_row_ids(name: &str) -> Vec<u32> {
    u32s(&load(name, "inputs.safetensors")["input_ids"])
        .get(0)
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn cached_and_full_forward_agree() {
    let ids = first_row_ids("phi3_mini");
    let model = Phi3::load(&dir("phi3_mini"), DType::F32, &Device::Cpu).unwrap();
    let worst = cached_matches_full(&model, &ids);
    eprintln!("phi3_mini: cached vs full max abs diff {worst:.2e}");
    assert!(worst < 1e-4, "cached vs full: {worst}");
}

/// Continuations of a cached prompt in one padded batch equal full forwards (sliding window and
/// partial rotary included).
#[test]
fn forward_after_matches_full_forward() {
    let ids = first_row_ids("phi3_mini");
    let model = Phi3::load(&dir("phi3_mini"), DType::F32, &Device::Cpu).unwrap();
    let worst = common::after_matches_full(&model, &ids);
    eprintln!("phi3_mini: forward_after vs full max abs diff {worst:.2e}");
    assert!(worst < 1e-4, "forward_after vs full: {worst}");
}

/// LongRoPE with a cache: below the switch point the cached logits equal a full forward over the
/// prefix (short factors); the step that crosses it is refused until the cache is refilled, and
/// after the refill (long factors for everything, as transformers' generation does) the cached
/// logits equal the full forward again.
#[test]
fn longrope_cache_refills_at_the_switch_point() {
    let name = "phi3_longrope";
    let ids = first_row_ids(name);
    let model = Phi3::load(&dir(name), DType::F32, &Device::Cpu).unwrap();
    let row = |xs: &[u32]| Tensor::new(xs, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let last_of_full = |xs: &[u32]| {
        let l = model
            .forward(&row(xs), None, None, &ForwardSpec::logits())
            .unwrap()
            .logits
            .unwrap()
            .squeeze(0)
            .unwrap();
        l.get(xs.len() - 1).unwrap()
    };
    let mut cache = KvCache::default();
    let mut worst = 0f32;
    let first = model.forward_cached(&row(&ids[..4]), &mut cache).unwrap();
    worst = worst.max(max_abs(
        &first.squeeze(0).unwrap(),
        &last_of_full(&ids[..4]),
    ));
    for p in 4..ids.len() {
        if model.cache_needs_refill(&cache, 1) {
            assert_eq!(p, 16, "the switch comes when the 17th token arrives");
            let err = model
                .forward_cached(&row(&[ids[p]]), &mut cache)
                .unwrap_err();
            assert!(err.to_string().contains("reset the cache"), "{err}");
            cache = KvCache::default();
            let g = model.forward_cached(&row(&ids[..=p]), &mut cache).unwrap();
            worst = worst.max(max_abs(&g.squeeze(0).unwrap(), &last_of_full(&ids[..=p])));
            continue;
        }
        let g = model.forward_cached(&row(&[ids[p]]), &mut cache).unwrap();
        worst = worst.max(max_abs(&g.squeeze(0).unwrap(), &last_of_full(&ids[..=p])));
    }
    assert_eq!(cache.len, ids.len());
    eprintln!("phi3_longrope: cached vs full-prefix max abs diff {worst:.2e}");
    assert!(worst < 1e-4, "cached vs full prefix: {worst}");
    // The whole 20-token sequence at once (long factors) agrees with the last cached step, and
    // an early position of it differs from the short-factor prefix forward: the switch matters.
    let full = model
        .forward(&row(&ids), None, None, &ForwardSpec::logits())
        .unwrap()
        .logits
        .unwrap()
        .squeeze(0)
        .unwrap();
    assert!(max_abs(&full.get(10).unwrap(), &last_of_full(&ids[..11])) > 1e-3);
}

/// phi3_mini's weights with an edited config against transformers (`variant` in
/// `phi3_mini/variants.safetensors`, written by `gen_model_fixtures.py`): the logits and all L+1
/// hidden states of the plain forward on the fixture batch, at every real position. The variant's
/// logits must also differ from the unedited model's (so the edit is what is tested).
fn check_variant(model: &Phi3, variant: &str) {
    let inputs = load("phi3_mini", "inputs.safetensors");
    let expected = load("phi3_mini", "expected.safetensors");
    let variants = load("phi3_mini", "variants.safetensors");
    let ids = u32s(&inputs["input_ids"]);
    let mask = &inputs["attention_mask"];
    let want_logits = &variants[&format!("{variant}_logits")];
    let want_hidden = &variants[&format!("{variant}_hidden_states")];
    let n_states = want_hidden.dim(0).unwrap();
    assert_eq!(n_states, model.config.num_layers + 1);
    let out = common::forward_all_states(model, &ids, mask);
    let logits = out.logits.as_ref().unwrap();
    assert_eq!(logits.dims(), want_logits.dims());
    let err = max_rel_err(logits, want_logits, mask);
    eprintln!("{variant}: logits rel err vs transformers {err:.2e}");
    assert!(err < 1e-4, "{variant}: logits rel err {err}");
    assert_eq!(out.hidden.len(), n_states);
    for (k, (i, h)) in out.hidden.iter().enumerate() {
        assert_eq!(*i, k);
        let err = max_rel_err(h, &want_hidden.get(*i).unwrap(), mask);
        eprintln!("{variant}: hidden state {i} rel err vs transformers {err:.2e}");
        assert!(err < 1e-4, "{variant}: hidden state {i} rel err {err}");
    }
    let apart = max_rel_err(want_logits, &expected["logits"], mask);
    assert!(
        apart > 1e-2,
        "{variant}: transformers' logits equal the unedited model's ({apart})"
    );
}

#[test]
fn sliding_window_matches_transformers() {
    let mut cfg = config_json("phi3_mini", "config.json");
    cfg["sliding_window"] = serde_json::json!(5);
    let model = model_with("phi3_mini", cfg.clone(), DType::F32);
    assert_eq!(model.config.sliding_window, Some(5));
    check_variant(&model, "sliding_window_5");
    // With the window, the cache still agrees with the full forward.
    let ids = first_row_ids("phi3_mini");
    let worst = cached_matches_full(&model, &ids);
    assert!(worst < 1e-4, "sliding window: cached vs full {worst}");
    // A window as long as the sequence changes nothing.
    let inputs = load("phi3_mini", "inputs.safetensors");
    cfg["sliding_window"] = serde_json::json!(20);
    let wide = model_with("phi3_mini", cfg, DType::F32);
    let plain = Phi3::load(&dir("phi3_mini"), DType::F32, &Device::Cpu).unwrap();
    let run = |m: &Phi3| {
        m.forward(
            &u32s(&inputs["input_ids"]),
            Some(&inputs["attention_mask"]),
            None,
            &ForwardSpec::logits(),
        )
        .unwrap()
        .logits
        .unwrap()
    };
    assert_eq!(max_abs(&run(&wide), &run(&plain)), 0.0);
}

#[test]
fn partial_rotary_matches_transformers() {
    let mut cfg = config_json("phi3_mini", "config.json");
    cfg["rope_parameters"]["partial_rotary_factor"] = serde_json::json!(0.5);
    let model = model_with("phi3_mini", cfg, DType::F32);
    assert_eq!(model.config.rotary_dim, 8);
    check_variant(&model, "partial_rotary_half");
    // The 4.x layout with a top-level partial_rotary_factor means the same.
    let mut legacy = config_json("phi3_mini", "config_legacy.json");
    legacy["partial_rotary_factor"] = serde_json::json!(0.5);
    assert_eq!(validate(legacy).unwrap(), model.config);
}

/// `su` (the old name) is LongRoPE; unsupported values and unknown keys are errors naming the key.
#[test]
fn unsupported_config_values_are_errors_naming_the_key() {
    let base = config_json("phi3_longrope", "config.json");
    let legacy = config_json("phi3_longrope", "config_legacy.json");
    let want = validate(base.clone()).unwrap();
    let mut su = legacy.clone();
    su["rope_scaling"]["type"] = serde_json::json!("su");
    assert_eq!(validate(su).unwrap(), want);

    type Edit = fn(&mut serde_json::Value);
    let cases: [(&str, serde_json::Value, Edit, &str, &str); 10] = [
        (
            "5.x",
            base.clone(),
            |c| c["rope_parameters"]["rope_type"] = "dynamic".into(),
            "rope_parameters.rope_type",
            "unsupported rope type",
        ),
        (
            "4.x",
            legacy.clone(),
            |c| c["rope_scaling"]["type"] = "linear".into(),
            "rope_scaling.type",
            "unsupported rope type",
        ),
        (
            "5.x",
            base.clone(),
            |c| c["rope_parameters"]["long_factor"] = serde_json::json!([1.0, 2.0]),
            "rope_parameters.long_factor",
            "expected rotary_dim / 2 = 8",
        ),
        (
            "4.x",
            legacy.clone(),
            |c| {
                c["rope_scaling"]
                    .as_object_mut()
                    .unwrap()
                    .remove("short_factor");
            },
            "rope_scaling.short_factor",
            "missing",
        ),
        (
            "5.x",
            base.clone(),
            |c| c["rope_parameters"]["mscale"] = serde_json::json!(1.0),
            "rope_parameters.mscale",
            "unknown RoPE key",
        ),
        (
            "5.x",
            base.clone(),
            |c| c["rope_parameters"]["partial_rotary_factor"] = serde_json::json!(0.1875),
            "partial_rotary_factor",
            "even",
        ),
        (
            "5.x",
            base.clone(),
            |c| c["hidden_act"] = "gelu_new".into(),
            "hidden_act",
            "unsupported activation",
        ),
        (
            "5.x",
            base.clone(),
            |c| c["resid_pdrop"] = serde_json::json!(0.1),
            "resid_pdrop",
            "not supported",
        ),
        (
            "5.x",
            base.clone(),
            |c| c["model_type"] = "phi3small".into(),
            "model_type",
            "not phi3",
        ),
        (
            "5.x",
            base.clone(),
            |c| c["sliding_window"] = serde_json::json!(0),
            "sliding_window",
            "positive",
        ),
    ];
    for (layout, cfg, edit, key, msg) in cases {
        let mut c = cfg;
        edit(&mut c);
        let err = validate(c).unwrap_err().to_string();
        assert!(
            err.contains(&format!("key `{key}`")) && err.contains(msg),
            "{layout} {key}: {err}"
        );
    }
    // The default rope type rejects LongRoPE-only keys rather than ignoring them.
    let mut c = config_json("phi3_mini", "config.json");
    c["rope_parameters"]["long_factor"] = serde_json::json!(vec![1.0; 8]);
    let err = validate(c).unwrap_err().to_string();
    assert!(err.contains("key `rope_parameters.long_factor`"), "{err}");
}
