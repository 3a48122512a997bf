//! A QLoRA step against transformers + bitsandbytes + PEFT (issue 19). Fixtures in
//! `tests/fixtures/quant/` from `tests/reference/gen_quant_fixtures.py` (the pre-quantised folder
//! and its logits) and `tests/reference/gen_qlora_fixtures.py` (`qlora/`: the dense original of
//! that folder, a PEFT LoRA adapter, and per case the logits, loss and LoRA gradients of one
//! step; versions and code paths in `qlora/qlora.json`).
//!
//! Cases: the bitsandbytes pre-quantised nf4 folder read as it is; the dense folder quantised here
//! at load time to int8 (transformers' `load_in_8bit`) and to nf4 + double quant (`load_in_4bit`,
//! which bitsandbytes packs into exactly the pre-quantised folder's tensors).
//!
//! Loss: the mean next-token cross-entropy over attended targets,
//! `sum_{b, t < T-1, mask[b, t+1] = 1} -log_softmax(logits[b, t])[ids[b, t+1]] / count`.
//!
//! Tolerance: max |ours - reference| <= 1e-4 * max |reference| for logits, loss and every
//! gradient (f32 compute); the quantised matmul against a dense matmul with the dequantised
//! weight within 1e-6 relative.
//!
//! Also the pre-quantised LLM.int8 folder (`tiny_llama_bnb_int8/`, gen_quant_fixtures.py:
//! transformers' `load_in_8bit` + `save_pretrained`, int8 weights stored as safetensors I8): it
//! loads as saved, nothing re-quantised, with transformers' logits within 1e-4 (absolute), and
//! the loader's errors on damaged int8 / 4-bit folders name the folder and the tensor.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use common::{max_abs, next_token_loss, quant_dir};

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use reprpo_models::adapter::{AdapterHost, BaseWeight};
use reprpo_models::quant::{QuantConfig, QuantTensor, QuantType, read_safetensors};
use reprpo_models::weights::{LazyFiles, TensorSource};
use reprpo_models::{ForwardSpec, Llama, LoadOptions, checkpoint, peft};

const TOL: f32 = 1e-4;

fn qlora_dir() -> PathBuf {
    quant_dir().join("qlora")
}

fn st(path: PathBuf) -> HashMap<String, Tensor> {
    read_safetensors(&path).unwrap()
}

/// max |a - b| / max |b|.
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    max_abs(&(a - b).unwrap()) / max_abs(b).max(1e-30)
}

fn opts(quantize: Option<QuantConfig>) -> LoadOptions {
    LoadOptions {
        dtype: DType::F32,
        device: Device::Cpu,
        quantize,
    }
}

fn nf4_dq() -> QuantConfig {
    QuantConfig {
        qtype: QuantType::Nf4,
        block_size: 64,
        double_quant: true,
    }
}

/// Worst relative errors of one step: (logits, loss, gradients).
struct Errors {
    logits: f32,
    loss: f32,
    grads: f32,
}

/// `model` with the fixture's PEFT adapter active: one forward, the loss and its gradients
/// against case `case` of `qlora.safetensors`.
fn qlora_step(model: Llama, case: &str) -> Errors {
    qlora_step_with(model, case, false)
}

/// [`qlora_step`], with gradient checkpointing when `ckpt` (each block recomputed in the
/// backward, as PEFT's `prepare_model_for_kbit_training` enables by default).
fn qlora_step_with(mut model: Llama, case: &str, ckpt: bool) -> Errors {
    let fx = st(qlora_dir().join("qlora.safetensors"));
    let ids = fx["input_ids"].to_dtype(DType::U32).unwrap();
    let mask = &fx["attention_mask"];
    let idx = peft::load_adapter(&mut model, &qlora_dir().join("adapter"), "policy").unwrap();
    assert_eq!(idx, 0);
    model.adapters.active = Some(0);
    let spec = ForwardSpec {
        train: true,
        checkpoint: ckpt,
        ..ForwardSpec::logits()
    };
    let logits = model
        .forward(&ids, Some(mask), None, &spec)
        .unwrap()
        .logits
        .unwrap();
    let e_logits = rel_err(&logits, &fx[&format!("{case}.logits")]);
    assert!(e_logits <= TOL, "{case}: logits rel err {e_logits}");

    let loss = next_token_loss(&logits, &ids, mask);
    let want_loss = &fx[&format!("{case}.loss")];
    let e_loss = rel_err(&loss.reshape(1).unwrap(), want_loss);
    assert!(e_loss <= TOL, "{case}: loss {loss} vs {want_loss}");

    let grads = checkpoint::backward(&loss).unwrap();
    let params = peft::adapter_params(&model, 0);
    let prefix = format!("{case}.grad.");
    let n_want = fx.keys().filter(|k| k.starts_with(&prefix)).count();
    assert_eq!(params.len(), 28, "{case}: 2 x 7 projections x 2 layers");
    assert_eq!(params.len(), n_want, "{case}: parameter count");
    let mut e_grads = 0f32;
    for (name, var) in &params {
        let want = fx
            .get(&format!("{prefix}{name}"))
            .unwrap_or_else(|| panic!("{case}: PEFT has no gradient named {name}"));
        let got = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{case}: no gradient reached {name}"));
        assert!(max_abs(got) > 0.0, "{case}: zero gradient at {name}");
        let e = rel_err(got, want);
        assert!(e <= TOL, "{case}: gradient {name} rel err {e}");
        e_grads = e_grads.max(e);
    }
    eprintln!(
        "{case}: logits {e_logits:.2e}, loss {e_loss:.2e}, gradients {e_grads:.2e} ({} params)",
        params.len()
    );
    Errors {
        logits: e_logits,
        loss: e_loss,
        grads: e_grads,
    }
}

fn logits_of(model: &Llama, ids: &Tensor) -> Tensor {
    model
        .forward(ids, None, None, &ForwardSpec::logits())
        .unwrap()
        .logits
        .unwrap()
}

/// The folder bitsandbytes' `save_pretrained` wrote loads as it is and gives transformers'
/// logits; asking for the same quantisation changes nothing, asking for another is an error.
#[test]
fn prequantised_folder_logits_match_transformers() {
    let folder = quant_dir().join("tiny_llama_bnb_nf4");
    let reference = st(quant_dir().join("tiny_llama_bnb_nf4_reference.safetensors"));
    let ids = reference["input_ids"].to_dtype(DType::U32).unwrap();
    let model = Llama::load_with(&folder, &opts(None)).unwrap();
    let logits = logits_of(&model, &ids);
    let e = rel_err(&logits, &reference["logits"]);
    eprintln!("pre-quantised nf4 folder: logits rel err {e:.2e}");
    assert!(e <= TOL, "logits rel err {e}");

    let same = Llama::load_with(&folder, &opts(Some(nf4_dq()))).unwrap();
    assert_eq!(rel_err(&logits_of(&same, &ids), &logits), 0.0);
    let err = Llama::load_with(&folder, &opts(Some(QuantConfig::new(QuantType::Int8))))
        .unwrap_err()
        .to_string();
    assert!(err.contains("pre-quantised"), "{err}");

    // The dense original gives transformers' unquantised logits.
    let dense = Llama::load_with(&qlora_dir().join("tiny_llama_dense"), &opts(None)).unwrap();
    let e = rel_err(&logits_of(&dense, &ids), &reference["logits_unquantised"]);
    assert!(e <= TOL, "dense logits rel err {e}");
}

/// The LLM.int8 folder transformers + bitsandbytes saved (`load_in_8bit`, `save_pretrained`):
/// read as it is (I8 `weight`, `SCB`, `weight_format`; each layer writes back the saved bytes,
/// so nothing was re-quantised) and transformers' logits within 1e-4 (its train-mode CPU path,
/// `MatMul8bitFp`: dequantise, f32 linear, as we compute; its eval-mode LLM.int8 inference also
/// quantises the activations, which we do not, and is only reported).
#[test]
fn prequantised_int8_folder_logits_match_transformers() {
    let folder = quant_dir().join("tiny_llama_bnb_int8");
    let reference = st(quant_dir().join("tiny_llama_bnb_int8_reference.safetensors"));
    let ids = reference["input_ids"].to_dtype(DType::U32).unwrap();
    let model = Llama::load_with(&folder, &opts(None)).unwrap();

    let saved = st(folder.join("model.safetensors"));
    let mut n_int8 = 0;
    for lin in model.linears() {
        let BaseWeight::Quant { q, .. } = &lin.weight else {
            panic!("{}: not read as a quantised weight", lin.name);
        };
        assert_eq!(q.qtype(), QuantType::Int8, "{}", lin.name);
        let tensors = q.to_bnb(&format!("{}.", lin.name)).unwrap();
        assert_eq!(tensors.len(), 3, "{}: weight, SCB, weight_format", lin.name);
        for (name, t) in tensors {
            let want = &saved[&name];
            assert_eq!((t.dtype(), t.dims()), (want.dtype(), want.dims()), "{name}");
            let eq = t.eq(want).unwrap().flatten_all().unwrap();
            assert_eq!(eq.min(0).unwrap().to_scalar::<u8>().unwrap(), 1, "{name}");
        }
        n_int8 += 1;
    }
    assert_eq!(n_int8, 14);

    let logits = logits_of(&model, &ids);
    let e = max_abs(&(&logits - &reference["logits"]).unwrap());
    let inference = max_abs(&(&logits - &reference["logits_llm_int8_inference"]).unwrap());
    eprintln!(
        "pre-quantised int8 folder: logits max abs err {e:.2e} (max |logit| {:.2}); \
         vs bitsandbytes' eval-mode LLM.int8 inference {inference:.2e}",
        max_abs(&reference["logits"])
    );
    assert!(e <= TOL, "logits max abs err {e}");

    let same = Llama::load_with(&folder, &opts(Some(QuantConfig::new(QuantType::Int8)))).unwrap();
    assert_eq!(rel_err(&logits_of(&same, &ids), &logits), 0.0);
    let err = Llama::load_with(&folder, &opts(Some(nf4_dq())))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("pre-quantised") && err.contains("q_proj.weight"),
        "{err}"
    );
}

/// A copy of the model folder `from` in a temporary directory with the safetensors tensors
/// filtered by `keep` (dtypes, shapes and bytes as they were, I8 included).
fn damaged_copy(from: &std::path::Path, keep: impl Fn(&str) -> bool) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(from.join("config.json"), dir.path().join("config.json")).unwrap();
    let bytes = std::fs::read(from.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> =
        st.tensors().into_iter().filter(|(n, _)| keep(n)).collect();
    safetensors::serialize_to_file(views, None, &dir.path().join("model.safetensors")).unwrap();
    dir
}

/// Damaged pre-quantised folders: errors, naming the folder and the tensor, never a silent cast
/// of quantised bytes.
#[test]
fn damaged_prequantised_folders_are_errors() {
    let (int8, nf4) = (
        quant_dir().join("tiny_llama_bnb_int8"),
        quant_dir().join("tiny_llama_bnb_nf4"),
    );
    let t = "model.layers.1.mlp.up_proj";
    // (folder, tensors removed, what the error must say besides the folder and `t`)
    let cases: Vec<(&PathBuf, Vec<String>, Vec<&str>)> = vec![
        // int8 row scales gone, `weight_format` still there
        (
            &int8,
            vec![format!("{t}.SCB")],
            vec!["SCB", "weight_format", "missing"],
        ),
        // both int8 state tensors gone: the I8 weight alone is no float weight
        (
            &int8,
            vec![format!("{t}.SCB"), format!("{t}.weight_format")],
            vec!["weight", "integer data", "expected a float"],
        ),
        // the int8 weight itself gone
        (
            &int8,
            vec![format!("{t}.weight")],
            vec!["weight", "missing"],
        ),
        // nf4: the quant state gone, absmax still there
        (
            &nf4,
            vec![format!("{t}.weight.quant_state.bitsandbytes__nf4")],
            vec!["quant_state.bitsandbytes__nf4", "missing"],
        ),
    ];
    for (folder, drop, want) in cases {
        let copy = damaged_copy(folder, |n| !drop.iter().any(|d| d == n));
        let err = Llama::load_with(copy.path(), &opts(None))
            .unwrap_err()
            .to_string();
        eprintln!("without {drop:?}: {err}");
        assert!(err.contains(&copy.path().display().to_string()), "{err}");
        assert!(err.contains(t), "{err}");
        for w in want {
            assert!(err.contains(w), "without {drop:?}: {err:?} lacks {w:?}");
        }
    }
}

/// `LazyFiles::names_with_prefix` (a range of its sorted map) answers what filtering every name
/// would, also where one layer index is a prefix of another (`layers.1.` vs `layers.10.`).
#[test]
fn lazy_files_names_with_prefix_equals_filter() {
    let files = LazyFiles::open(&quant_dir().join("tiny_llama_bnb_nf4")).unwrap();
    let all = files.names();
    for prefix in [
        "",
        "model.",
        "model.layers.1.",
        "model.layers.1",
        "model.layers.0.self_attn.q_proj.",
        "model.layers.0.self_attn.q_proj.weight.",
        "lm_head.weight",
        "zzz",
    ] {
        let mut want: Vec<String> = all
            .iter()
            .filter(|n| n.starts_with(prefix))
            .cloned()
            .collect();
        want.sort();
        let got = files.names_with_prefix(prefix);
        assert_eq!(got, want, "prefix {prefix:?}");
    }
    let mut m: HashMap<String, Tensor> = HashMap::new();
    for n in ["a.1.x", "a.10.x", "a.1", "b"] {
        m.insert(
            n.into(),
            Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap(),
        );
    }
    let mut got = m.names_with_prefix("a.1.");
    got.sort();
    assert_eq!(got, ["a.1.x"]);
}

#[test]
fn qlora_step_on_prequantised_nf4_matches_peft() {
    let folder = quant_dir().join("tiny_llama_bnb_nf4");
    qlora_step(Llama::load_with(&folder, &opts(None)).unwrap(), "nf4");
}

/// The same step with every fused CPU kernel off (the quantised layers take the dense-matmul
/// fallback path of other devices).
#[test]
fn qlora_step_written_out_matches_peft() {
    let folder = quant_dir().join("tiny_llama_bnb_nf4");
    reprpo_kernels::written_out(|| {
        qlora_step(Llama::load_with(&folder, &opts(None)).unwrap(), "nf4");
    });
}

/// The dense folder quantised here at load time to nf4 + double quant: the pre-quantised folder's
/// weights (bitsandbytes packs them identically, checked by the fixture script), so the same
/// logits bit for bit, and PEFT's step.
#[test]
fn qlora_step_nf4_quantised_at_load_matches_peft() {
    let dense = qlora_dir().join("tiny_llama_dense");
    let model = Llama::load_with(&dense, &opts(Some(nf4_dq()))).unwrap();
    let pre = Llama::load_with(&quant_dir().join("tiny_llama_bnb_nf4"), &opts(None)).unwrap();
    let fx = st(qlora_dir().join("qlora.safetensors"));
    let ids = fx["input_ids"].to_dtype(DType::U32).unwrap();
    assert_eq!(
        rel_err(&logits_of(&model, &ids), &logits_of(&pre, &ids)),
        0.0
    );
    qlora_step(model, "nf4");
}

/// Gradient checkpointing on quantised bases (the QLoRA memory setting: the 8B step of
/// docs/perf.md runs with it): blocks recomputed in the backward give PEFT's (non-checkpointed)
/// logits, loss and adapter gradients, on the pre-quantised nf4 folder and on int8 quantised at
/// load time.
#[test]
fn qlora_step_with_gradient_checkpointing_matches_peft() {
    let folder = quant_dir().join("tiny_llama_bnb_nf4");
    qlora_step_with(Llama::load_with(&folder, &opts(None)).unwrap(), "nf4", true);
    let dense = qlora_dir().join("tiny_llama_dense");
    let model = Llama::load_with(&dense, &opts(Some(QuantConfig::new(QuantType::Int8)))).unwrap();
    qlora_step_with(model, "int8", true);
}

/// The dense folder quantised here at load time to LLM.int8 (transformers' `load_in_8bit`; its
/// train-mode CPU forward dequantises and multiplies in f32, as we do).
#[test]
fn qlora_step_int8_quantised_at_load_matches_peft() {
    let dense = qlora_dir().join("tiny_llama_dense");
    let model = Llama::load_with(&dense, &opts(Some(QuantConfig::new(QuantType::Int8)))).unwrap();
    let e = qlora_step(model, "int8");
    assert!(e.logits <= TOL && e.loss <= TOL && e.grads <= TOL);
}

/// `frozen::quant_matmul` (the fused CPU op, and the written-out fallback) against a plain matmul
/// with the dequantised weight: values and the gradient with respect to the input.
#[test]
fn quant_matmul_input_gradient_equals_dense() {
    let fx = st(quant_dir().join("quant.safetensors"));
    let w = &fx["a.input"]; // [32, 96]: blocks straddle rows
    let (n, k) = w.dims2().unwrap();
    let m = 5;
    let xs: Vec<f32> = (0..m * k)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    let gs: Vec<f32> = (0..m * n)
        .map(|i| ((i * 13 % 29) as f32 / 14.0) - 1.0)
        .collect();
    let g = Tensor::from_vec(gs, (m, n), &Device::Cpu).unwrap();
    for cfg in [
        nf4_dq(),
        QuantConfig::new(QuantType::Fp4),
        QuantConfig::new(QuantType::Int8),
    ] {
        let q = Arc::new(QuantTensor::quantize(w, &cfg, "a").unwrap());
        let dq = q.dequantize(DType::F32, &Device::Cpu).unwrap();
        let run = |quant: bool| -> (Tensor, Tensor) {
            let x = Var::from_vec(xs.clone(), (m, k), &Device::Cpu).unwrap();
            let y = if quant {
                reprpo_models::frozen::quant_matmul(x.as_tensor(), &q).unwrap()
            } else {
                x.as_tensor().matmul(&dq.t().unwrap()).unwrap()
            };
            let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            (y, grads.get(x.as_tensor()).unwrap().clone())
        };
        let (y_ref, gx_ref) = run(false);
        let ((y, gx), kernels) = reprpo_kernels::trace_cpu_kernels(|| run(true));
        assert!(kernels.contains(&"quant-matmul"), "{kernels:?}");
        let ((y_w, gx_w), kernels_w) =
            reprpo_kernels::trace_cpu_kernels(|| reprpo_kernels::written_out(|| run(true)));
        assert!(!kernels_w.contains(&"quant-matmul"), "{kernels_w:?}");
        for (what, a, b) in [
            ("y", &y, &y_ref),
            ("dx", &gx, &gx_ref),
            ("y written out", &y_w, &y_ref),
            ("dx written out", &gx_w, &gx_ref),
        ] {
            let e = rel_err(a, b);
            assert!(e <= 1e-6, "{:?} {what}: rel err {e}", cfg.qtype);
            eprintln!("{:?} {what}: rel err {e:.2e}", cfg.qtype);
        }
    }
}
