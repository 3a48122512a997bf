//! PEFT adapters on a pre-quantised base, both directions (issue 19). Fixtures in
//! `tests/fixtures/quant/` from `tests/reference/gen_quant_fixtures.py`: `tiny_llama_bnb_nf4/`
//! (transformers + bitsandbytes, nf4 with double quantisation, `save_pretrained`) and `peft_nf4/`
//! (a LoRA adapter trained by PEFT on that folder for 4 AdamW steps and saved with PEFT's
//! `save_pretrained`, plus PEFT's logits of base + adapter and of the base alone on a padded batch;
//! versions in `quant.json`).
//!
//! PEFT -> here (checked by `cargo test`): the adapter loads on the folder read as it is, with
//! PEFT's logits within 1e-4 (absolute, every position including padding).
//!
//! here -> PEFT: what `cargo test` checks and what only Python can check.
//! - Checked here: the adapter saved by `peft::save_adapter` after loading PEFT's has PEFT's file's
//!   tensor names, dtypes, shapes and bytes (bit for bit), and an `adapter_config.json` equal, as
//!   JSON, to PEFT's (same keys and values; the formatting differs, and the safetensors header has
//!   no `{"format": "pt"}` metadata, which PEFT's loader does not need). Adapters made here (one
//!   SGD step on PEFT's adapter; a new LoRA adapter whose config this crate writes from scratch)
//!   save with PEFT's tensor names, F32, and load back here with the same logits bit for bit.
//! - Checked by Python only, by hand:
//!   `REPRPO_EXPORT_DIR=/tmp/rust_qlora cargo test -p reprpo-models --test all peft_prequantised::` keeps
//!   those adapters (with `rust_logits.safetensors`, our logits on the fixture batch) in that
//!   folder, and `/work/venvs/bnb/bin/python tests/reference/gen_quant_fixtures.py
//!   --check-rust-adapters /tmp/rust_qlora` loads each with `PeftModel.from_pretrained` on the
//!   same pre-quantised folder, checks PEFT holds exactly the file's tensors and that its logits
//!   are within 1e-4 of ours. `cargo test` does not run Python: a change to `save_adapter` that
//!   PEFT can no longer read is caught here only where it changes names, dtypes, values or the
//!   config's JSON.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use common::{max_abs, next_token_loss, quant_dir};

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use reprpo_models::quant::read_safetensors;
use reprpo_models::{ForwardSpec, Llama, LoadOptions, llama, peft};
use serde_json::Value;

const TOL: f32 = 1e-4;

fn peft_dir() -> PathBuf {
    quant_dir().join("peft_nf4")
}

fn base() -> Llama {
    let opts = LoadOptions::dense(DType::F32, &Device::Cpu);
    Llama::load_with(&quant_dir().join("tiny_llama_bnb_nf4"), &opts).unwrap()
}

struct Fixture {
    ids: Tensor,
    mask: Tensor,
    t: HashMap<String, Tensor>,
}

fn fixture() -> Fixture {
    let t = read_safetensors(&peft_dir().join("peft_nf4.safetensors")).unwrap();
    Fixture {
        ids: t["input_ids"].to_dtype(DType::U32).unwrap(),
        mask: t["attention_mask"].clone(),
        t,
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    max_abs(&(a - b).unwrap())
}

fn logits(model: &Llama, fx: &Fixture) -> Tensor {
    model
        .forward(&fx.ids, Some(&fx.mask), None, &ForwardSpec::logits())
        .unwrap()
        .logits
        .unwrap()
}

/// `model` with the adapter of folder `dir` loaded and active.
fn with_adapter(mut model: Llama, dir: &Path) -> Llama {
    let idx = peft::load_adapter(&mut model, dir, "default").unwrap();
    model.adapters.active = Some(idx);
    model
}

/// Every tensor of a safetensors file: (dtype, shape, bytes).
type Raw = HashMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)>;

fn raw_tensors(file: &Path) -> Raw {
    let bytes = std::fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect()
}

fn json(file: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap()
}

/// PEFT -> here: PEFT's adapter on the pre-quantised folder gives PEFT's logits; the base alone
/// gives PEFT's `disable_adapter()` logits.
#[test]
fn peft_adapter_on_prequantised_nf4_matches_peft() {
    let fx = fixture();
    let model = base();
    let e_base = max_abs_diff(&logits(&model, &fx), &fx.t["logits_base"]);
    let model = with_adapter(model, &peft_dir().join("adapter"));
    let got = logits(&model, &fx);
    let e = max_abs_diff(&got, &fx.t["logits"]);
    let moved = max_abs_diff(&fx.t["logits"], &fx.t["logits_base"]);
    eprintln!(
        "PEFT adapter on pre-quantised nf4: logits max abs err {e:.2e} (base alone {e_base:.2e}; \
         the adapter moves logits by {moved:.2}, max |logit| {:.2})",
        max_abs(&fx.t["logits"])
    );
    assert!(moved > 0.1, "the adapter barely moves the logits: {moved}");
    assert!(e_base <= TOL, "base logits max abs err {e_base}");
    assert!(e <= TOL, "logits max abs err {e}");
}

/// here -> PEFT, the part `cargo test` can check: the adapter saved here is PEFT's file, tensor
/// for tensor and bit for bit, with the same config, and it loads back here unchanged.
#[test]
fn adapter_saved_here_is_pefts_file() {
    let fx = fixture();
    let pdir = peft_dir().join("adapter");
    let model = with_adapter(base(), &pdir);
    let tmp = tempfile::tempdir().unwrap();
    let ours = tmp.path().join("adapter");
    peft::save_adapter(&model, "default", &ours).unwrap();

    let (want, got) = (
        raw_tensors(&pdir.join("adapter_model.safetensors")),
        raw_tensors(&ours.join("adapter_model.safetensors")),
    );
    let mut names: Vec<&String> = want.keys().collect();
    names.sort();
    let mut got_names: Vec<&String> = got.keys().collect();
    got_names.sort();
    assert_eq!(got_names, names, "tensor names");
    assert_eq!(names.len(), 28, "2 layers x 7 projections x (A, B)");
    for n in names {
        let (w, g) = (&want[n], &got[n]);
        assert_eq!(g.0, w.0, "{n}: dtype");
        assert_eq!(g.1, w.1, "{n}: shape");
        assert!(g.2 == w.2, "{n}: bytes differ");
    }
    assert_eq!(
        json(&ours.join("adapter_config.json")),
        json(&pdir.join("adapter_config.json")),
        "adapter_config.json"
    );

    let again = with_adapter(base(), &ours);
    assert_eq!(
        max_abs_diff(&logits(&again, &fx), &logits(&model, &fx)),
        0.0
    );
}

/// One plain SGD step on `model`'s active adapter with the next-token loss of the batch.
fn sgd_step(model: &Llama, fx: &Fixture, lr: f64) {
    let spec = ForwardSpec {
        train: true,
        ..ForwardSpec::logits()
    };
    let out = model
        .forward(&fx.ids, Some(&fx.mask), None, &spec)
        .unwrap()
        .logits
        .unwrap();
    let grads = next_token_loss(&out, &fx.ids, &fx.mask).backward().unwrap();
    for (name, var) in peft::adapter_params(model, 0) {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient at {name}"));
        var.set(&(var.as_tensor() - (g * lr).unwrap()).unwrap())
            .unwrap();
    }
}

/// here -> PEFT, adapters made here: saved with PEFT's names (those of PEFT's own file for the
/// same targets and rank), F32, a config this crate parses back, and the same logits when loaded
/// back here. With `REPRPO_EXPORT_DIR` set they stay there for the Python check (module docs).
#[test]
fn adapters_made_here_save_as_peft() {
    let fx = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let out = std::env::var("REPRPO_EXPORT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| tmp.path().to_path_buf());
    let pdir = peft_dir().join("adapter");
    let peft_names: Raw = raw_tensors(&pdir.join("adapter_model.safetensors"));

    // PEFT's adapter after one step trained here, and a new adapter configured here.
    let stepped = with_adapter(base(), &pdir);
    sgd_step(&stepped, &fx, 0.5);
    let mut fresh = base();
    let config = peft::AdapterConfig::lora(4, 8.0, &llama::PROJECTIONS);
    let idx = peft::add_adapter(&mut fresh, "default", config, None, 7).unwrap();
    fresh.adapters.active = Some(idx);
    for (_, var) in peft::adapter_params(&fresh, idx) {
        // B starts at zero: draw every weight so that the adapter does something
        let v = var.as_tensor().randn_like(0.0, 0.2).unwrap();
        var.set(&v).unwrap();
    }

    for (kind, model) in [("peft_nf4_step_here", &stepped), ("new_lora_here", &fresh)] {
        let dir = out.join(kind);
        peft::save_adapter(model, "default", &dir).unwrap();
        let ours = logits(model, &fx);
        let saved = raw_tensors(&dir.join("adapter_model.safetensors"));
        let mut names: Vec<&String> = saved.keys().collect();
        names.sort();
        let mut want: Vec<&String> = peft_names.keys().collect();
        want.sort();
        assert_eq!(names, want, "{kind}: tensor names");
        for (n, (dtype, shape, _)) in &saved {
            assert_eq!(*dtype, safetensors::Dtype::F32, "{kind}: {n}");
            assert_eq!(*shape, peft_names[n].1, "{kind}: {n}");
        }
        let cfg = json(&dir.join("adapter_config.json"));
        assert_eq!(cfg["peft_type"], "LORA", "{kind}");
        assert_eq!(cfg["r"].as_u64(), Some(4), "{kind}");
        assert_eq!(cfg["lora_alpha"].as_f64(), Some(8.0), "{kind}");
        peft::AdapterConfig::load(&dir).unwrap();
        let again = with_adapter(base(), &dir);
        assert_eq!(max_abs_diff(&logits(&again, &fx), &ours), 0.0, "{kind}");
        let moved = max_abs_diff(&ours, &fx.t["logits_base"]);
        assert!(moved > 1e-2, "{kind}: the adapter barely moves the logits");
        let t: HashMap<String, Tensor> = [("logits".to_string(), ours)].into_iter().collect();
        candle_core::safetensors::save(&t, dir.join("rust_logits.safetensors")).unwrap();
        eprintln!(
            "{kind}: saved in {} ({} tensors; moves logits by {moved:.2})",
            dir.display(),
            saved.len()
        );
    }
    let diff = max_abs_diff(&logits(&stepped, &fx), &fx.t["logits"]);
    assert!(diff > 1e-3, "the step here changed nothing: {diff}");
}
