//! Helpers shared by the reference tests: fixture paths, safetensors loading, masked relative
//! errors, and the one adapter check (outputs, adapter-off base, objective and every gradient
//! against PEFT's fixture) used for every architecture and adapter kind.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use reprpo_models::adapter::AdapterHost;
use reprpo_models::{CausalLm, ForwardSpec, Output, peft};

/// `tests/fixtures/models/<name>`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

/// All tensors of a safetensors file, on the CPU.
pub fn st(path: PathBuf) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

/// Max |x| of a tensor; infinite when x holds a NaN (candle's `max` skips NaN, so a NaN error
/// would otherwise pass every bound).
pub fn max_abs(x: &Tensor) -> f32 {
    let v: Vec<f32> = x
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    v.iter()
        .map(|a| if a.is_nan() { f32::INFINITY } else { a.abs() })
        .fold(0.0, f32::max)
}

/// Largest `|got - want|` and largest `|want|` over the real positions (`mask` [B, T] is 1) of
/// `[B, T, V]` logits; NaN in `got` counts as infinitely far.
pub fn masked_max_abs_diff(got: &Tensor, want: &Tensor, mask: &Tensor) -> (f32, f32) {
    let (b, t, v) = want.dims3().unwrap();
    assert_eq!(got.dims(), want.dims());
    let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
    let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
    let mask: Vec<i64> = mask.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(mask.len(), b * t);
    let (mut max_diff, mut max_want, mut n) = (0f32, 0f32, 0usize);
    for (i, _) in mask.iter().enumerate().filter(|(_, m)| **m == 1) {
        for j in i * v..(i + 1) * v {
            let d = (got[j] - want[j]).abs();
            max_diff = max_diff.max(if d.is_nan() { f32::INFINITY } else { d });
            max_want = max_want.max(want[j].abs());
            n += 1;
        }
    }
    assert!(n > 0, "no real position");
    (max_diff, max_want)
}

/// Logits and every hidden state (`0..=L`) of one forward over `ids` with `mask`.
pub fn forward_all_states<M: CausalLm>(model: &M, ids: &Tensor, mask: &Tensor) -> Output {
    let spec = ForwardSpec {
        hidden_layers: (0..=model.num_layers() as isize).collect(),
        logits: true,
        ..Default::default()
    };
    model.forward(ids, Some(mask), None, &spec).unwrap()
}

/// bf16 logits `got` against the f32 reference `want` at the real positions of `mask`: at most
/// `bound` apart (absolute), with some logit above 1 in magnitude so that the bound means
/// something; prints the measured error.
pub fn assert_bf16_logits(name: &str, got: &Tensor, want: &Tensor, mask: &Tensor, bound: f32) {
    let (max_diff, max_want) = masked_max_abs_diff(got, want, mask);
    eprintln!(
        "{name} bf16 vs f32 reference: max |diff| {max_diff:.3e} at real positions \
         (max |logit| {max_want:.2}), bound {bound}"
    );
    assert!(
        max_want > 1.0,
        "logits too small to test the bound: {max_want}"
    );
    assert!(
        max_diff <= bound,
        "bf16 logits off by {max_diff} > {bound} at a real position"
    );
}

/// Max |a - b| / max |b|, both over the positions where `mask` (`[B, T]`) is 1.
pub fn rel_err_masked(a: &Tensor, b: &Tensor, mask: &Tensor) -> f32 {
    let m = mask.to_dtype(DType::F32).unwrap().unsqueeze(2).unwrap();
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    let diff = (&a - &b).unwrap().abs().unwrap().broadcast_mul(&m).unwrap();
    let scale = b.abs().unwrap().broadcast_mul(&m).unwrap();
    max_abs(&diff) / max_abs(&scale).max(1e-12)
}

/// Max |a - b| / max |b|.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).unwrap()) / max_abs(b).max(1e-12)
}

/// Pointwise max |a - b| / (1 + |b|) over positions where `mask` is 1 (a, b: `[B, T, ...]`).
pub fn max_rel_err(a: &Tensor, b: &Tensor, mask: &Tensor) -> f32 {
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    let m = mask.to_dtype(DType::F32).unwrap();
    let extra = a.rank() - 2;
    let mut m = m;
    for _ in 0..extra {
        m = m.unsqueeze(m.rank()).unwrap();
    }
    let err = ((&a - &b).unwrap().abs().unwrap() / (b.abs().unwrap() + 1.0).unwrap()).unwrap();
    max_abs(&err.broadcast_mul(&m).unwrap())
}

/// How an adapter folder is loaded (PEFT's loader or an opt-in variant).
pub type Loader<M> = fn(&mut M, &Path, &str) -> reprpo_models::Result<usize>;

/// PEFT's loader for any model.
pub fn peft_load<M: AdapterHost>(
    m: &mut M,
    dir: &Path,
    name: &str,
) -> reprpo_models::Result<usize> {
    peft::load_adapter(m, dir, name)
}

/// Load `adapter` of the `base` fixture into `model` with `load`, and compare with PEFT: logits and
/// hidden states `1` and `last_hidden` (masked relative error < 1e-4), adapter-off logits equal to
/// the base's, the adapter changes the logits, the objective sum(logits * W) within 1e-3, and the
/// gradient of every adapter parameter (relative error < 1e-4, non-zero unless PEFT's is zero).
/// Returns the worst errors (logits, hidden, gradients).
pub fn check_adapter<M: CausalLm + AdapterHost>(
    mut model: M,
    base: &str,
    adapter: &str,
    last_hidden: usize,
    load: Loader<M>,
) -> (f32, f32, f32) {
    let dir = fixture(base);
    let adir = dir.join("adapters").join(adapter);
    let inputs = st(dir.join("adapters/inputs.safetensors"));
    let expected = st(adir.join("expected.safetensors"));
    let want_grads = st(adir.join("gradients.safetensors"));
    load(&mut model, &adir, "default").unwrap();
    let ids = inputs["input_ids"].to_dtype(DType::U32).unwrap();
    let mask = &inputs["attention_mask"];
    let pos = inputs["position_ids"].to_dtype(DType::U32).unwrap();
    let spec = ForwardSpec {
        hidden_layers: vec![1, last_hidden as isize],
        logits: true,
        ..Default::default()
    };
    let out = model.forward(&ids, Some(mask), Some(&pos), &spec).unwrap();
    let logits = out.logits.unwrap();
    let e_logits = rel_err_masked(&logits, &expected["logits"], mask);
    assert!(
        e_logits < 1e-4,
        "{base}/{adapter}: logits rel err {e_logits}"
    );
    let mut e_hidden = 0f32;
    assert_eq!(out.hidden.len(), 2);
    for (i, h) in &out.hidden {
        let e = rel_err_masked(h, &expected[&format!("hidden_states_{i}")], mask);
        assert!(e < 1e-4, "{base}/{adapter}: hidden {i} rel err {e}");
        e_hidden = e_hidden.max(e);
    }
    let off = ForwardSpec {
        adapters_off: true,
        ..ForwardSpec::logits()
    };
    let base_logits = model
        .forward(&ids, Some(mask), Some(&pos), &off)
        .unwrap()
        .logits
        .unwrap();
    let e = rel_err_masked(&base_logits, &inputs["logits_base"], mask);
    assert!(e < 1e-4, "{base}/{adapter}: adapter-off logits rel err {e}");
    assert!(
        rel_err_masked(&logits, &base_logits, mask) > 1e-3,
        "{base}/{adapter}: the adapter changes nothing"
    );
    let s = (&logits * &inputs["grad_weight"])
        .unwrap()
        .sum_all()
        .unwrap();
    let want_s: Vec<f32> = expected["objective"].to_vec1().unwrap();
    let got_s: f32 = s.to_scalar().unwrap();
    assert!(
        (got_s - want_s[0]).abs() < 1e-3,
        "{base}/{adapter}: objective {got_s} vs PEFT {}",
        want_s[0]
    );
    let grads = s.backward().unwrap();
    let params = peft::adapter_params(&model, 0);
    assert_eq!(
        params.len(),
        want_grads.len(),
        "{base}/{adapter}: parameter count"
    );
    let mut e_grad = 0f32;
    for (name, var) in &params {
        let want = want_grads
            .get(name)
            .unwrap_or_else(|| panic!("{base}/{adapter}: PEFT has no gradient named {name}"));
        let got = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{base}/{adapter}: no gradient reached {name}"));
        assert_eq!(got.dims(), want.dims(), "{base}/{adapter}: {name} shape");
        assert!(
            max_abs(got) > 0.0 || max_abs(want) == 0.0,
            "{base}/{adapter}: zero gradient at {name}"
        );
        let e = rel_err(got, want);
        assert!(e < 1e-4, "{base}/{adapter}: gradient {name} rel err {e}");
        e_grad = e_grad.max(e);
    }
    eprintln!(
        "{base}/{adapter}: logits {e_logits:.2e}, hidden {e_hidden:.2e}, gradients {e_grad:.2e} ({} params)",
        params.len()
    );
    (e_logits, e_hidden, e_grad)
}

/// `forward_after` against full forwards: a prefix of `ids` goes through `forward_cached`, then
/// three continuations of different lengths (right-padded into one batch, padding with a token
/// id that is not the real one, so a leak would show) through `forward_after`; each row's logits
/// at its real positions must equal those of a full forward over prefix + row. Returns the max
/// abs difference.
#[allow(dead_code)]
pub fn after_matches_full<M: CausalLm>(model: &M, ids: &[u32]) -> f32 {
    let dev = Device::Cpu;
    let p = 4;
    assert!(ids.len() >= p + 6, "need at least 10 ids");
    let mut rev: Vec<u32> = ids[p..p + 6].to_vec();
    rev.reverse();
    let rows: Vec<Vec<u32>> = vec![
        ids[p..p + 6].to_vec(),
        ids[p..p + 2].to_vec(),
        rev[..4].to_vec(),
    ];
    let width = 6;
    let pad = ids[0];
    let mut flat = Vec::new();
    let mut mask = Vec::new();
    for r in &rows {
        for j in 0..width {
            flat.push(r.get(j).copied().unwrap_or(pad));
            mask.push(u8::from(j < r.len()));
        }
    }
    let mut cache = reprpo_models::KvCache::default();
    let prefix = Tensor::new(&ids[..p], &dev).unwrap().unsqueeze(0).unwrap();
    let last = model.forward_cached(&prefix, &mut cache).unwrap();
    let after = model
        .forward_after(
            &Tensor::from_vec(flat, (rows.len(), width), &dev).unwrap(),
            Some(&Tensor::from_vec(mask, (rows.len(), width), &dev).unwrap()),
            &cache,
        )
        .unwrap();
    assert_eq!(cache.len, p, "forward_after must not change the cache");
    // No new tokens: an error naming the call, not a panic, and the cache is left as it was.
    let empty = Tensor::zeros((1, 0), candle_core::DType::U32, &dev).unwrap();
    let err = model.forward_cached(&empty, &mut cache).unwrap_err();
    assert!(err.to_string().contains("forward_cached needs"), "{err}");
    let err = model.forward_after(&empty, None, &cache).unwrap_err();
    assert!(err.to_string().contains("forward_after needs"), "{err}");
    assert_eq!(cache.len, p);
    let mut worst = 0f32;
    for (r, row) in rows.iter().enumerate() {
        let seq: Vec<u32> = ids[..p].iter().chain(row).copied().collect();
        let full = model
            .forward(
                &Tensor::new(seq.as_slice(), &dev)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap(),
                None,
                None,
                &ForwardSpec::logits(),
            )
            .unwrap()
            .logits
            .unwrap()
            .squeeze(0)
            .unwrap();
        let d = (&last.squeeze(0).unwrap() - full.get(p - 1).unwrap()).unwrap();
        worst = worst.max(max_abs(&d));
        for j in 0..row.len() {
            let got = after.get(r).unwrap().get(j).unwrap();
            let d = (&got - full.get(p + j).unwrap()).unwrap();
            worst = worst.max(max_abs(&d));
        }
    }
    worst
}

/// `tests/fixtures/quant` (the bitsandbytes / QLoRA fixtures of `gen_quant_fixtures.py`).
pub fn quant_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/quant")
}

/// The mean next-token cross-entropy of `logits` `[B, T, V]` over the attended targets of `ids`
/// (`mask` `[B, T]`), as PEFT's fixtures compute their QLoRA objective.
pub fn next_token_loss(logits: &Tensor, ids: &Tensor, mask: &Tensor) -> Tensor {
    let t = ids.dim(1).unwrap();
    let lp =
        candle_nn::ops::log_softmax(&logits.narrow(1, 0, t - 1).unwrap(), candle_core::D::Minus1)
            .unwrap();
    let tgt = ids
        .narrow(1, 1, t - 1)
        .unwrap()
        .contiguous()
        .unwrap()
        .unsqueeze(2)
        .unwrap();
    let nll = lp
        .gather(&tgt, 2)
        .unwrap()
        .squeeze(2)
        .unwrap()
        .neg()
        .unwrap();
    let m = mask
        .narrow(1, 1, t - 1)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    ((nll * &m).unwrap().sum_all().unwrap()
        / m.sum_all().unwrap().to_scalar::<f32>().unwrap() as f64)
        .unwrap()
}
