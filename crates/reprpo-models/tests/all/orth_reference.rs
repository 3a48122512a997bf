//! Orthogonal adapters (BOFT, OFT, HRA) against PEFT 0.21.2 (fixtures from
//! `tests/reference/gen_model_fixtures.py`): PEFT's files load and give PEFT's logits, hidden
//! states and gradients; the adapter-off forward gives the base logits; the BOFT CPU-fallback
//! file is a clear error unless explicitly opted in; new adapters start at the identity; every
//! kind's backward agrees with finite differences; save/reload keeps PEFT's keys, shapes and
//! config.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand::rngs::StdRng;
use reprpo_models::adapter::{AdapterHost, WeightTransform};
use reprpo_models::{ForwardSpec, Llama, orth, peft};
use serde_json::{Map, Value};

use crate::common;

use common::{fixture as base_dir, max_abs, rel_err, rel_err_masked, st};

const BASE: &str = "llama_gqa_rope3";

fn adapter_dir(name: &str) -> PathBuf {
    base_dir(BASE).join("adapters").join(name)
}

struct Inputs {
    ids: Tensor,
    mask: Tensor,
    pos: Tensor,
    all: HashMap<String, Tensor>,
}

fn inputs() -> Inputs {
    let all = st(base_dir(BASE).join("adapters/inputs.safetensors"));
    Inputs {
        ids: all["input_ids"].to_dtype(DType::U32).unwrap(),
        mask: all["attention_mask"].clone(),
        pos: all["position_ids"].to_dtype(DType::U32).unwrap(),
        all,
    }
}

fn base_model() -> Llama {
    Llama::load(&base_dir(BASE), DType::F32, &Device::Cpu).unwrap()
}

fn logits(model: &Llama, inp: &Inputs, adapters_off: bool) -> Tensor {
    let spec = ForwardSpec {
        adapters_off,
        ..ForwardSpec::logits()
    };
    model
        .forward(&inp.ids, Some(&inp.mask), Some(&inp.pos), &spec)
        .unwrap()
        .logits
        .unwrap()
}

/// Load `adapter` with `load` (PEFT's loader or the BOFT CPU-fallback opt-in) and compare
/// outputs and gradients with PEFT's (`common::check_adapter`). Returns the worst relative errors
/// seen (logits, hidden, gradients) for the record.
fn check_with(adapter: &str, load: common::Loader<Llama>) -> (f32, f32, f32) {
    common::check_adapter(base_model(), BASE, adapter, 3, load)
}

fn peft_load(m: &mut Llama, dir: &Path, name: &str) -> reprpo_models::Result<usize> {
    peft::load_adapter(m, dir, name)
}

fn fallback_load(m: &mut Llama, dir: &Path, name: &str) -> reprpo_models::Result<usize> {
    orth::load_adapter_boft_cpu_fallback(m, dir, name)
}

fn check(adapter: &str) {
    check_with(adapter, peft_load);
}

#[test]
fn boft_butterfly_factor_2_matches_reference() {
    check("boft_nbf2_reference");
}

#[test]
fn boft_factor1_matches_peft() {
    check("boft_factor1");
}

#[test]
fn oft_cayley_neumann_matches_peft() {
    check("oft");
}

#[test]
fn oft_exact_cayley_matches_peft() {
    check("oft_cayley");
}

#[test]
fn hra_matches_peft() {
    check("hra");
}

#[test]
fn hra_gram_schmidt_matches_peft() {
    check("hra_gs");
}

/// PEFT's CPU fallback file (config: 2 factors; boft_R: 1) is a clear error by default; the
/// explicit opt-in gives PEFT's CPU outputs and gradients and records 1 factor in the config.
#[test]
fn boft_cpu_fallback_file_is_an_error_unless_opted_in() {
    let adir = adapter_dir("boft");
    let mut model = base_model();
    let err = peft::load_adapter(&mut model, &adir, "default")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("key `boft_n_butterfly_factor`")
            && err.contains("asks for 2")
            && err.contains("has 1")
            && err.contains("fbd_cuda")
            && err.contains("load_adapter_boft_cpu_fallback"),
        "{err}"
    );
    eprintln!("boft (PEFT CPU file): {err}");
    assert!(
        model.adapters.names.is_empty(),
        "a failed load registers nothing"
    );

    check_with("boft", fallback_load);

    // The opt-in changes nothing for a consistent file.
    check_with("boft_nbf2_reference", fallback_load);

    let mut model = base_model();
    orth::load_adapter_boft_cpu_fallback(&mut model, &adir, "cpu").unwrap();
    let out = tempfile::tempdir().unwrap();
    peft::save_adapter(&model, "cpu", out.path()).unwrap();
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["boft_n_butterfly_factor"], 1);
    // What it saved now loads without the opt-in, to the same outputs.
    peft::load_adapter(&mut model, out.path(), "again").unwrap();
    let inp = inputs();
    let first = logits(&model, &inp, false);
    model.adapters.active = model.adapters.index("again");
    let second = logits(&model, &inp, false);
    assert_eq!(rel_err_masked(&second, &first, &inp.mask), 0.0);
}

fn config_of(adapter: &str) -> Map<String, Value> {
    serde_json::from_str(
        &std::fs::read_to_string(adapter_dir(adapter).join("adapter_config.json")).unwrap(),
    )
    .unwrap()
}

fn parse(m: Map<String, Value>) -> reprpo_models::Result<peft::AdapterConfig> {
    peft::AdapterConfig::from_json(m, Path::new("adapter_config.json"))
}

/// New adapters (no weights) are the identity, as PEFT initialises them: logits equal the
/// base's; the gradient reaches every parameter (non-zero somewhere in each kind).
#[test]
fn new_adapters_start_at_identity() {
    let inp = inputs();
    let cases = [
        ("boft_nbf2_reference", 0.0f32),
        ("boft_factor1", 0.0),
        ("oft", 0.0),
        ("oft_cayley", 0.0),
        // Pairs of equal Householder vectors cancel up to round-off.
        ("hra", 1e-5),
    ];
    for (adapter, tol) in cases {
        let mut model = base_model();
        let config = parse(config_of(adapter)).unwrap();
        peft::add_adapter(&mut model, "new", config, None, 7).unwrap();
        let lg = logits(&model, &inp, false);
        let base = logits(&model, &inp, true);
        let e = rel_err_masked(&lg, &base, &inp.mask);
        assert!(e <= tol, "{adapter}: new adapter vs base rel err {e}");
        let e_peft = rel_err_masked(&lg, &inp.all["logits_base"], &inp.mask);
        assert!(
            e_peft < 1e-4,
            "{adapter}: new adapter vs PEFT's base {e_peft}"
        );
        let s = (&lg * &inp.all["grad_weight"]).unwrap().sum_all().unwrap();
        let grads = s.backward().unwrap();
        let params = peft::adapter_params(&model, 0);
        let peft_keys = st(adapter_dir(adapter).join("adapter_model.safetensors"));
        assert_eq!(params.len(), peft_keys.len(), "{adapter}");
        let mut nonzero = 0;
        for (name, var) in &params {
            assert_eq!(var.dims(), peft_keys[name].dims(), "{adapter}: {name}");
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{adapter}: no gradient reached {name}"));
            if max_abs(g) > 0.0 {
                nonzero += 1;
            }
        }
        // At the identity, the gradient of a skew-symmetric parameterisation is non-zero in
        // general; every tensor must get one.
        assert_eq!(nonzero, params.len(), "{adapter}: zero gradients at init");
        eprintln!("{adapter}: new adapter vs base rel err {e:.1e}");
    }
}

/// Saved here: PEFT's keys, shapes, values and config; reloads to identical outputs. Merging
/// gives the unmerged logits; unmerging restores the base.
#[test]
fn save_reload_round_trip() {
    let inp = inputs();
    for adapter in [
        "boft_nbf2_reference",
        "boft_factor1",
        "oft",
        "oft_cayley",
        "hra",
        "hra_gs",
    ] {
        let adir = adapter_dir(adapter);
        let mut model = base_model();
        peft::load_adapter(&mut model, &adir, "a").unwrap();
        let out = tempfile::tempdir().unwrap();
        peft::save_adapter(&model, "a", out.path()).unwrap();
        let theirs = st(adir.join("adapter_model.safetensors"));
        let ours = st(out.path().join("adapter_model.safetensors"));
        let mut a: Vec<_> = theirs
            .iter()
            .map(|(k, t)| (k.clone(), t.dims().to_vec(), t.dtype()))
            .collect();
        let mut b: Vec<_> = ours
            .iter()
            .map(|(k, t)| (k.clone(), t.dims().to_vec(), t.dtype()))
            .collect();
        a.sort_by(|x, y| x.0.cmp(&y.0));
        b.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(a, b, "{adapter}: keys, shapes, dtypes");
        for (k, t) in &theirs {
            assert_eq!(rel_err(&ours[k], t), 0.0, "{adapter}: {k} changed");
        }
        let cfg_ours: Map<String, Value> = serde_json::from_str(
            &std::fs::read_to_string(out.path().join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg_ours, config_of(adapter), "{adapter}: config");
        peft::load_adapter(&mut model, out.path(), "b").unwrap();
        let first = logits(&model, &inp, false);
        model.adapters.active = model.adapters.index("b");
        let second = logits(&model, &inp, false);
        assert_eq!(rel_err_masked(&second, &first, &inp.mask), 0.0, "{adapter}");
        let base_before = logits(&model, &inp, true);
        for lin in model.linears_mut() {
            lin.merge(1).unwrap();
        }
        let merged = logits(&model, &inp, false);
        let e = rel_err_masked(&merged, &first, &inp.mask);
        assert!(e < 1e-5, "{adapter}: merged vs unmerged rel err {e}");
        for lin in model.linears_mut() {
            lin.unmerge();
        }
        let base = logits(&model, &inp, true);
        assert_eq!(
            rel_err_masked(&base, &base_before, &inp.mask),
            0.0,
            "{adapter}: base after unmerge"
        );
    }
    // A new adapter saves with PEFT's key names and shapes and reloads identically.
    for adapter in ["boft_nbf2_reference", "oft", "hra"] {
        let mut cfg = config_of(adapter);
        cfg.insert("init_weights".into(), Value::Bool(false));
        let mut model = base_model();
        peft::add_adapter(&mut model, "new", parse(cfg).unwrap(), None, 3).unwrap();
        let out = tempfile::tempdir().unwrap();
        peft::save_adapter(&model, "new", out.path()).unwrap();
        let ours = st(out.path().join("adapter_model.safetensors"));
        let theirs = st(adapter_dir(adapter).join("adapter_model.safetensors"));
        let mut a: Vec<_> = theirs.iter().map(|(k, t)| (k, t.dims())).collect();
        let mut b: Vec<_> = ours.iter().map(|(k, t)| (k, t.dims())).collect();
        a.sort();
        b.sort();
        assert_eq!(a, b, "{adapter}: new adapter keys and shapes");
        peft::load_adapter(&mut model, out.path(), "reloaded").unwrap();
        let first = logits(&model, &inp, false);
        assert!(
            rel_err_masked(&first, &inp.all["logits_base"], &inp.mask) > 1e-3,
            "{adapter}: a random init should change the logits"
        );
        model.adapters.active = model.adapters.index("reloaded");
        let second = logits(&model, &inp, false);
        assert_eq!(rel_err_masked(&second, &first, &inp.mask), 0.0, "{adapter}");
    }
}

/// Each kind's backward (Cayley via the batched inverse, butterfly gathers, Neumann series,
/// Householder chain, Gram-Schmidt) against central finite differences, on one 64x64 layer in
/// f64 with random (non-identity) parameters.
#[test]
fn transform_gradients_match_finite_differences() {
    let dev = Device::Cpu;
    let w = Tensor::randn(0f64, 0.3, (48, 64), &dev).unwrap();
    let c = Tensor::randn(0f64, 1.0, (48, 64), &dev).unwrap();
    let mut cases: Vec<(&str, Map<String, Value>)> = vec![];
    for adapter in [
        "boft_nbf2_reference",
        "boft_factor1",
        "oft",
        "oft_cayley",
        "hra",
        "hra_gs",
    ] {
        let mut cfg = config_of(adapter);
        cfg.insert("init_weights".into(), Value::Bool(false));
        cases.push((adapter, cfg));
    }
    let mut cfg = config_of("oft");
    cfg.insert("block_share".into(), Value::Bool(true));
    cfg.insert("init_weights".into(), Value::Bool(false));
    cases.push(("oft block_share", cfg));
    for terms in [2, 3, 4, 7] {
        let mut cfg = config_of("oft");
        cfg.insert("num_cayley_neumann_terms".into(), Value::from(terms));
        cfg.insert("init_weights".into(), Value::Bool(false));
        cases.push(("oft neumann terms", cfg));
    }
    for (label, cfg) in cases {
        let config = parse(cfg).unwrap();
        let mut rng = StdRng::seed_from_u64(11);
        let mut used = 0;
        let t = orth::build(
            &config,
            "model.layers.0.self_attn.q_proj",
            48,
            64,
            None,
            &mut rng,
            &dev,
            &mut used,
        )
        .unwrap();
        let loss = |t: &dyn WeightTransform| -> Tensor {
            (t.weight(&w, false).unwrap() * &c)
                .unwrap()
                .sum_all()
                .unwrap()
        };
        let grads = loss(t.as_ref()).backward().unwrap();
        let mut checked = 0;
        let mut worst = 0f64;
        for (name, var) in t.params() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{label}: no gradient for {name}"))
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let orig = var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let scale = g.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(scale > 0.0, "{label}: zero gradient for {name}");
            // A spread of entries (all of small tensors).
            let step = (orig.len() / 40).max(1);
            for i in (0..orig.len()).step_by(step) {
                let h = 1e-3f32;
                let mut p = orig.clone();
                p[i] = orig[i] + h;
                var.set(&Tensor::from_vec(p, var.dims(), &dev).unwrap())
                    .unwrap();
                let lp: f64 = loss(t.as_ref()).to_scalar().unwrap();
                let mut m = orig.clone();
                m[i] = orig[i] - h;
                var.set(&Tensor::from_vec(m, var.dims(), &dev).unwrap())
                    .unwrap();
                let lm: f64 = loss(t.as_ref()).to_scalar().unwrap();
                var.set(&Tensor::from_vec(orig.clone(), var.dims(), &dev).unwrap())
                    .unwrap();
                // The perturbation as stored in f32.
                let dx = f64::from(orig[i] + h) - f64::from(orig[i] - h);
                let fd = (lp - lm) / dx;
                let err = (fd - f64::from(g[i])).abs() / f64::from(scale);
                assert!(
                    err < 2e-5,
                    "{label}: {name}[{i}] fd {fd} vs backward {} (scale {scale})",
                    g[i]
                );
                worst = worst.max(err);
                checked += 1;
            }
        }
        assert!(checked > 0);
        eprintln!("{label}: {checked} entries, max |fd - backward| / max |grad| = {worst:.1e}");
    }
}

/// BOFT dropout (training only): one random factor gets floor(p * D) blocks set to the
/// identity; evaluation is unaffected. Seen through `W = I` (then `W' = diag(s) M^T`).
#[test]
fn boft_dropout_sets_blocks_to_identity_in_training() {
    let dev = Device::Cpu;
    let mut cfg = config_of("boft_factor1");
    cfg.insert("boft_dropout".into(), Value::from(0.5));
    cfg.insert("init_weights".into(), Value::Bool(false));
    let config = parse(cfg).unwrap();
    let mut rng = StdRng::seed_from_u64(5);
    let mut used = 0;
    let t = orth::build(
        &config,
        "model.layers.0.mlp.up_proj",
        64,
        64,
        None,
        &mut rng,
        &dev,
        &mut used,
    )
    .unwrap();
    let params = t.params();
    let s = params[1].1.as_tensor().clone();
    let eye = Tensor::eye(64, DType::F32, &dev).unwrap();
    // M^T = diag(1/s) W'.
    let m_t = |train: bool| t.weight(&eye, train).unwrap().broadcast_div(&s).unwrap();
    let eval = m_t(false);
    assert_eq!(rel_err(&m_t(false), &eval), 0.0);
    for _ in 0..3 {
        let train = m_t(true);
        // Blocks of 8 on the diagonal: count those equal to the identity.
        let mut ident = 0;
        let mut same = 0;
        for blk in 0..8 {
            let tb = train
                .narrow(0, blk * 8, 8)
                .unwrap()
                .narrow(1, blk * 8, 8)
                .unwrap();
            let eb = eval
                .narrow(0, blk * 8, 8)
                .unwrap()
                .narrow(1, blk * 8, 8)
                .unwrap();
            let id = Tensor::eye(8, DType::F32, &dev).unwrap();
            if max_abs(&(&tb - &id).unwrap()) < 1e-6 {
                ident += 1;
            } else if max_abs(&(&tb - &eb).unwrap()) < 1e-6 {
                same += 1;
            }
        }
        assert_eq!((ident, same), (4, 4), "floor(0.5 * 8) identity blocks");
    }
}

/// Config keys: unknown keys, unsupported values and impossible geometries are errors naming
/// the key.
#[test]
fn orth_config_errors_name_the_key() {
    // (fixture, key set, value, key named in the error, message)
    let cases: Vec<(&str, &str, Value, &str, &str)> = vec![
        (
            "boft_factor1",
            "boft_frobnicate",
            Value::from(1),
            "boft_frobnicate",
            "unknown key",
        ),
        (
            "boft_factor1",
            "boft_block_size",
            Value::from(4),
            "boft_block_size",
            "exactly one of",
        ),
        (
            "boft_factor1",
            "boft_n_butterfly_factor",
            Value::from(0),
            "boft_n_butterfly_factor",
            "positive",
        ),
        (
            "boft_factor1",
            "boft_dropout",
            Value::from(1.5),
            "boft_dropout",
            "probability",
        ),
        (
            "boft_factor1",
            "init_weights",
            Value::from("pissa"),
            "init_weights",
            "boolean",
        ),
        ("oft", "coft", Value::Bool(true), "coft", "not implemented"),
        (
            "oft",
            "r",
            Value::from(8),
            "oft_block_size",
            "exactly one of",
        ),
        (
            "oft",
            "bias",
            Value::from("oft_only"),
            "bias",
            "not supported",
        ),
        ("hra", "r", Value::from(0), "r", "positive"),
        ("hra", "apply_GS", Value::from(1), "apply_GS", "boolean"),
    ];
    for (adapter, set, value, key, msg) in cases {
        let mut m = config_of(adapter);
        m.insert(set.into(), value);
        let err = match parse(m) {
            Err(e) => e.to_string(),
            // Kind-specific checks happen in orth::validate (and again when a layer is built).
            Ok(c) => orth::validate(&c, Path::new("adapter_config.json"))
                .unwrap_err()
                .to_string(),
        };
        assert!(
            err.contains(&format!("key `{key}`")) && err.contains(msg),
            "{adapter} {key}: {err}"
        );
    }
    // Geometry is checked per layer: N factors need in_features to be a multiple of
    // boft_block_size * 2^(N-1); 64 features in blocks of 4 allow up to 5 factors, not 6.
    let mut m = config_of("boft_nbf2_reference");
    m.insert("boft_n_butterfly_factor".into(), Value::from(6));
    let mut model = base_model();
    let err = peft::add_adapter(&mut model, "x", parse(m).unwrap(), None, 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("key `boft_n_butterfly_factor`"), "{err}");
    // A new Gram-Schmidt HRA with PEFT's default init is not orthogonal in PEFT: refused.
    let err = peft::add_adapter(
        &mut model,
        "x",
        parse(config_of("hra_gs")).unwrap(),
        None,
        0,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("key `apply_GS`"), "{err}");
}
