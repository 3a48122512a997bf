//! Gradient checkpointing (`ForwardSpec::checkpoint`, `checkpoint::backward`): for LoRA, DoRA
//! and BOFT on a random Llama and on the Phi-3 fixture, with a left-padded batch, the gradient of
//! every adapter parameter equals the one without checkpointing (f32, relative error <= 1e-5),
//! every parameter gets a non-zero gradient, with logits and hidden states and on the early-exit
//! path; several forwards in one step (policy + detached reference) and gradient accumulation
//! over several backward calls; seeded dropout recomputed identically; a plain `backward()` over a
//! checkpointed forward is an error rather than a silent loss of gradients.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use candle_core::{DType, Device, Tensor, Var};
use reprpo_models::adapter::AdapterHost;
use reprpo_models::checkpoint;
use reprpo_models::peft::{self, AdapterConfig};
use reprpo_models::{CausalLm, ForwardSpec, Llama, LlamaConfig, Phi3, llama};
use serde_json::Value;

use common::{fixture, max_abs, rel_err};

#[derive(Clone, Copy, Debug)]
enum Kind {
    Lora,
    Dora,
    Boft,
}

/// A PEFT config of `kind` on every linear layer (from the committed PEFT configs as templates).
fn config(kind: Kind, phi3: bool, dropout: f64) -> AdapterConfig {
    let template = match kind {
        Kind::Lora | Kind::Dora => "llama_gqa_rope3/adapters/dora_r4",
        Kind::Boft => "phi3_mini/adapters/boft_factor1",
    };
    let path = fixture(template).join("adapter_config.json");
    let mut raw: serde_json::Map<String, Value> =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let targets: &[&str] = if phi3 {
        &["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    } else {
        &llama::PROJECTIONS
    };
    raw.insert("target_modules".into(), serde_json::json!(targets));
    match kind {
        Kind::Lora | Kind::Dora => {
            raw.insert("use_dora".into(), Value::Bool(matches!(kind, Kind::Dora)));
            raw.insert("lora_dropout".into(), serde_json::json!(dropout));
        }
        Kind::Boft => {
            raw.insert("boft_dropout".into(), serde_json::json!(dropout));
            if !phi3 {
                // Llama tiny: widths 64..384, blocks of 4 with two butterfly factors.
                raw.insert("boft_block_num".into(), serde_json::json!(0));
                raw.insert("boft_block_size".into(), serde_json::json!(4));
                raw.insert("boft_n_butterfly_factor".into(), serde_json::json!(2));
            }
        }
    }
    AdapterConfig::from_json(raw, &path).unwrap()
}

/// Add adapter `kind` and move every parameter away from its init (LoRA's B and BOFT's R start
/// at zero, which would leave some gradients zero).
fn add<M: AdapterHost>(model: &mut M, kind: Kind, phi3: bool, dropout: f64) {
    peft::add_adapter(model, "default", config(kind, phi3, dropout), None, 3).unwrap();
    for (i, (_, v)) in peft::adapter_params(model, 0).iter().enumerate() {
        let t = v.as_tensor();
        let noise = seeded(t.dims(), 100 + i as u64).affine(0.1, 0.0).unwrap();
        v.set(&(t + noise).unwrap()).unwrap();
    }
}

/// Uniform(-1, 1) values from a small LCG (the same on every machine).
fn seeded(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn llama(kind: Kind, dropout: f64) -> Llama {
    let mut cfg = LlamaConfig::preset("tiny").unwrap();
    cfg.vocab_size = 64;
    cfg.tie_word_embeddings = false;
    let mut m = Llama::random(cfg, 0.1, 7, DType::F32, &Device::Cpu).unwrap();
    add(&mut m, kind, false, dropout);
    m
}

fn phi3(kind: Kind, dropout: f64) -> Phi3 {
    let mut m = Phi3::load(&fixture("phi3_mini"), DType::F32, &Device::Cpu).unwrap();
    add(&mut m, kind, true, dropout);
    m
}

/// A left-padded batch of 3 rows x 12 tokens (vocab 64): ids, attention mask.
fn batch() -> (Tensor, Tensor) {
    let (b, t) = (3usize, 12usize);
    let pad = [0usize, 3, 7];
    let ids: Vec<u32> = (0..b * t).map(|i| ((i * 37 + 11) % 64) as u32).collect();
    let mask: Vec<f32> = (0..b * t)
        .map(|i| if i % t >= pad[i / t] { 1.0 } else { 0.0 })
        .collect();
    (
        Tensor::from_vec(ids, (b, t), &Device::Cpu).unwrap(),
        Tensor::from_vec(mask, (b, t), &Device::Cpu).unwrap(),
    )
}

/// A scalar of every output of the forward: `sum(logits * W) + sum_i sum(hidden_i * W_i)`.
fn objective<M: CausalLm>(model: &M, spec: &ForwardSpec) -> Tensor {
    let (ids, mask) = batch();
    let out = model.forward(&ids, Some(&mask), None, spec).unwrap();
    let mut terms = Vec::new();
    if let Some(l) = out.logits {
        terms.push((&l * seeded(l.dims(), 1)).unwrap().sum_all().unwrap());
    }
    assert_eq!(out.hidden.len(), spec.hidden_layers.len());
    for (i, h) in out.hidden {
        terms.push(
            (&h * seeded(h.dims(), 10 + i as u64))
                .unwrap()
                .sum_all()
                .unwrap(),
        );
    }
    terms
        .into_iter()
        .reduce(|a, b| (a + b).unwrap())
        .expect("the forward returned nothing")
}

/// Gradients of every adapter parameter, in `adapter_params` order.
fn grads_of<M: AdapterHost>(
    model: &M,
    store: &candle_core::backprop::GradStore,
) -> Vec<(String, Tensor)> {
    peft::adapter_params(model, 0)
        .into_iter()
        .map(|(n, v)| {
            let g = store
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("no gradient reached {n}"))
                .clone();
            (n, g)
        })
        .collect()
}

/// Worst relative error between two gradient lists; panics on a zero gradient.
fn compare(what: &str, got: &[(String, Tensor)], want: &[(String, Tensor)]) -> f32 {
    assert_eq!(got.len(), want.len());
    assert!(!want.is_empty(), "{what}: no adapter parameters");
    let mut worst = 0f32;
    for ((n, g), (_, w)) in got.iter().zip(want) {
        assert!(max_abs(w) > 0.0, "{what}: zero gradient at {n}");
        assert!(
            max_abs(g) > 0.0,
            "{what}: zero checkpointed gradient at {n}"
        );
        let e = rel_err(g, w);
        assert!(e <= 1e-5, "{what}: {n}: relative error {e}");
        worst = worst.max(e);
    }
    worst
}

/// With and without checkpointing, same gradients, for one model and spec.
fn check<M: CausalLm + AdapterHost>(what: &str, model: &M, spec: ForwardSpec) -> f32 {
    let plain = objective(model, &spec);
    let want = grads_of(model, &plain.backward().unwrap());
    // checkpoint::backward without checkpointing is plain backward.
    let again = grads_of(model, &checkpoint::backward(&plain).unwrap());
    assert_eq!(compare(what, &again, &want), 0.0);
    let ck = ForwardSpec {
        checkpoint: true,
        ..spec
    };
    let s = objective(model, &ck);
    let v1: f32 = plain.to_scalar().unwrap();
    let v2: f32 = s.to_scalar().unwrap();
    assert!(
        (v1 - v2).abs() <= 1e-5 * v1.abs().max(1.0),
        "{what}: objective {v1} vs checkpointed {v2}"
    );
    let got = grads_of(model, &checkpoint::backward(&s).unwrap());
    let e = compare(what, &got, &want);
    eprintln!("{what}: max relative gradient difference {e:.2e}");
    e
}

fn full(hidden: Vec<isize>) -> ForwardSpec {
    ForwardSpec {
        hidden_layers: hidden,
        logits: true,
        ..Default::default()
    }
}

fn early(hidden: Vec<isize>) -> ForwardSpec {
    ForwardSpec {
        hidden_layers: hidden,
        logits: false,
        ..Default::default()
    }
}

#[test]
fn llama_gradients_equal_with_checkpointing() {
    for kind in [Kind::Lora, Kind::Dora, Kind::Boft] {
        let m = llama(kind, 0.0);
        check(&format!("llama/{kind:?}/logits"), &m, full(vec![0, 2, -1]));
        // Early exit: the deepest state is layer 2 of 4, no logits.
        let e = early(vec![1, 2]);
        let n_params = peft::adapter_params(&m, 0).len();
        // Layers 3 and 4 get no gradient on this path: compare the first two layers' only.
        let plain = objective(&m, &e);
        let want = plain.backward().unwrap();
        let s = objective(
            &m,
            &ForwardSpec {
                checkpoint: true,
                ..e.clone()
            },
        );
        let got = checkpoint::backward(&s).unwrap();
        let mut reached = 0;
        for (n, v) in peft::adapter_params(&m, 0) {
            match (got.get(v.as_tensor()), want.get(v.as_tensor())) {
                (Some(g), Some(w)) => {
                    assert!(max_abs(w) > 0.0, "early exit: zero gradient at {n}");
                    let err = rel_err(g, w);
                    assert!(err <= 1e-5, "early exit {kind:?}: {n}: {err}");
                    reached += 1;
                }
                (None, None) => assert!(
                    n.contains("layers.2.") || n.contains("layers.3."),
                    "{n} got no gradient on the early-exit path"
                ),
                (g, w) => panic!(
                    "{n}: checkpointed has gradient {}, plain {}",
                    g.is_some(),
                    w.is_some()
                ),
            }
        }
        assert_eq!(reached * 2, n_params, "{kind:?}: half the layers are used");
    }
}

#[test]
fn phi3_gradients_equal_with_checkpointing() {
    for kind in [Kind::Lora, Kind::Dora, Kind::Boft] {
        let m = phi3(kind, 0.0);
        check(&format!("phi3/{kind:?}/logits"), &m, full(vec![1, -1]));
        // Early exit at layer 1 of 2: only layer 0's parameters are reached.
        let s = objective(
            &m,
            &ForwardSpec {
                checkpoint: true,
                ..early(vec![1])
            },
        );
        let got = checkpoint::backward(&s).unwrap();
        let want = objective(&m, &early(vec![1])).backward().unwrap();
        for (n, v) in peft::adapter_params(&m, 0) {
            let layer0 = n.contains("layers.0.");
            assert_eq!(got.get(v.as_tensor()).is_some(), layer0, "{n}");
            if layer0 {
                let e = rel_err(
                    got.get(v.as_tensor()).unwrap(),
                    want.get(v.as_tensor()).unwrap(),
                );
                assert!(e <= 1e-5, "phi3 early exit {kind:?}: {n}: {e}");
            }
        }
    }
}

/// One DPO-like step: a policy forward (chosen and rejected rows in one batch) and a reference
/// forward with adapters off whose outputs are detached, combined into one loss.
fn pair_loss<M: CausalLm>(model: &M, checkpoint: bool, weight_seed: u64) -> Tensor {
    let (ids, mask) = batch();
    let spec = ForwardSpec {
        hidden_layers: vec![2],
        logits: true,
        checkpoint,
        ..Default::default()
    };
    let reference = model
        .forward(
            &ids,
            Some(&mask),
            None,
            &ForwardSpec {
                adapters_off: true,
                ..spec.clone()
            },
        )
        .unwrap();
    let ref_logits = reference.logits.unwrap().detach();
    let out = model.forward(&ids, Some(&mask), None, &spec).unwrap();
    let logits = out.logits.unwrap();
    let diff = (&logits - &ref_logits).unwrap();
    let w = seeded(diff.dims(), weight_seed);
    let h = &out.hidden[0].1;
    ((diff * w).unwrap().sum_all().unwrap() + (h.sqr().unwrap().mean_all().unwrap() * 0.5).unwrap())
        .unwrap()
}

#[test]
fn several_forwards_and_accumulation() {
    let m = llama(Kind::Lora, 0.0);
    let params: Vec<(String, Var)> = peft::adapter_params(&m, 0);
    for seed in [5u64, 6] {
        let want = grads_of(&m, &pair_loss(&m, false, seed).backward().unwrap());
        // Two backward calls in a row (accumulation): each returns only its own gradients.
        let first = grads_of(
            &m,
            &checkpoint::backward(&pair_loss(&m, true, seed)).unwrap(),
        );
        let second = grads_of(
            &m,
            &checkpoint::backward(&pair_loss(&m, true, seed)).unwrap(),
        );
        compare("pair/first", &first, &want);
        compare("pair/second", &second, &want);
        for ((n, a), (_, b)) in first.iter().zip(&second) {
            assert_eq!(rel_err(a, b), 0.0, "{n}: the second call differs");
        }
    }
    // Two policy forwards summed into one loss: each adapter parameter's gradient is the sum.
    let two = (pair_loss(&m, true, 5) + pair_loss(&m, true, 6)).unwrap();
    let got = grads_of(&m, &checkpoint::backward(&two).unwrap());
    let a = grads_of(&m, &pair_loss(&m, false, 5).backward().unwrap());
    let b = grads_of(&m, &pair_loss(&m, false, 6).backward().unwrap());
    let want: Vec<(String, Tensor)> = a
        .into_iter()
        .zip(b)
        .map(|((n, x), (_, y))| (n, (x + y).unwrap()))
        .collect();
    compare("two forwards", &got, &want);
    assert_eq!(params.len(), got.len());
}

#[test]
fn seeded_dropout_is_recomputed_identically() {
    for kind in [Kind::Lora, Kind::Dora, Kind::Boft] {
        let m = llama(kind, 0.25);
        let spec = ForwardSpec {
            train: true,
            dropout_seed: Some(42),
            ..full(vec![1])
        };
        let e = check(&format!("llama/{kind:?}/dropout"), &m, spec.clone());
        assert!(e <= 1e-5);
        // The dropout is real: another seed gives another objective.
        let a: f32 = objective(&m, &spec).to_scalar().unwrap();
        let b: f32 = objective(
            &m,
            &ForwardSpec {
                dropout_seed: Some(43),
                ..spec
            },
        )
        .to_scalar()
        .unwrap();
        assert_ne!(a, b, "{kind:?}: dropout had no effect");
    }
    // Unseeded, checkpointed, in training: still consistent (finite, every parameter reached).
    let m = llama(Kind::Lora, 0.25);
    let spec = ForwardSpec {
        train: true,
        checkpoint: true,
        ..full(vec![])
    };
    let g = grads_of(&m, &checkpoint::backward(&objective(&m, &spec)).unwrap());
    for (n, t) in g {
        let v = max_abs(&t);
        assert!(v.is_finite() && v > 0.0, "{n}: {v}");
    }
}

#[test]
fn plain_backward_over_checkpointed_forward_is_an_error() {
    let m = llama(Kind::Lora, 0.0);
    let spec = ForwardSpec {
        checkpoint: true,
        ..full(vec![])
    };
    let err = objective(&m, &spec).backward().unwrap_err().to_string();
    assert!(err.contains("checkpoint::backward"), "{err}");
    // The reference forward (adapters off) needs no side channel: no graph at all.
    let off = ForwardSpec {
        adapters_off: true,
        ..spec
    };
    let (ids, mask) = batch();
    let logits = m
        .forward(&ids, Some(&mask), None, &off)
        .unwrap()
        .logits
        .unwrap();
    assert!(
        !logits.track_op(),
        "the adapter-off forward recorded a graph"
    );
}
