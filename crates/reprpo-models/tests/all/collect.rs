//! Side activations (`ForwardSpec::taps`, `reprpo_models::collect`) against the reference ReprPO
//! project and baukit (fixtures from `tests/reference/gen_taps_fixtures.py`, in
//! `tests/fixtures/methods/`): the layer syntax table of `parse_collection_layers`, the module
//! selection of `get_regexp_layers` (same sets, our order, our documented stricter errors), the
//! inputs / outputs baukit's `TraceDict` recorded on a tiny PEFT LoRA Llama with the adapter on
//! and off (1e-5 abs), the LoRA gradients of sum(tap * w) (PyTorch's, relative 1e-4), the same
//! gradients with checkpointing (blocks holding taps run unchecked), the early exit at the
//! deepest tapped block (a later block with a broken weight is never run), and Phi-3's fused
//! modules.
//!
//! Reference (Python, abridged from the generator):
//! ```text
//! with TraceDict(model, names, retain_input=True, retain_output=True) as ret:
//!     model(input_ids=ids, attention_mask=mask, use_cache=False)
//! tap = ret[name].input  # o_proj, down_proj;  ret[name].output  # q/k/v/gate/up_proj
//! s = sum((tap * w).sum() for each tap); s.backward()   # adapter on
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

use candle_core::{D, DType, Device, Tensor};
use reprpo_models::adapter::AdapterHost;
use reprpo_models::collect::{linear_names, parse_layers, select_modules, side_taps};
use reprpo_models::{ForwardSpec, Llama, Output, Phi3, Tap, TapSide, checkpoint, peft};
use serde_json::Value;

use common::{max_abs, rel_err, st};

fn methods() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/methods")
}

fn meta() -> Value {
    serde_json::from_str(&std::fs::read_to_string(methods().join("taps.json")).unwrap()).unwrap()
}

fn tensors() -> HashMap<String, Tensor> {
    st(methods().join("taps.safetensors"))
}

/// The tiny Llama with its LoRA adapter active.
fn model() -> Llama {
    let dir = methods().join("tiny_llama");
    let mut m = Llama::load(&dir, DType::F32, &Device::Cpu).unwrap();
    peft::load_adapter(&mut m, &dir.join("adapter"), "default").unwrap();
    m
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

/// The taps of the generator's objective, in its order.
fn objective_taps(meta: &Value) -> Vec<Tap> {
    meta["objective_taps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let module = p[0].as_str().unwrap();
            match p[1].as_str().unwrap() {
                "input" => Tap::input(module),
                _ => Tap::output(module),
            }
        })
        .collect()
}

fn side_name(t: &Tap) -> &'static str {
    match t.side {
        TapSide::Input => "input",
        TapSide::Output => "output",
    }
}

fn run(m: &Llama, spec: &ForwardSpec) -> reprpo_models::Result<Output> {
    let t = tensors();
    let ids = t["input_ids"].to_dtype(DType::U32).unwrap();
    m.forward(&ids, Some(&t["attention_mask"]), None, spec)
}

#[test]
fn layer_table_matches_reference() {
    let meta = meta();
    let rows = meta["layers"].as_array().unwrap();
    assert!(rows.len() >= 14);
    for row in rows {
        let spec = row["spec"].as_str().unwrap();
        let n = row["n"].as_u64().unwrap() as usize;
        let got = parse_layers(spec, n);
        match (&row["result"], got) {
            (Value::Array(want), Ok(got)) => {
                let want: Vec<usize> = want.iter().map(|v| v.as_u64().unwrap() as usize).collect();
                assert_eq!(got, want, "{spec:?} with N={n}");
            }
            (Value::Null, Err(e)) => {
                let msg = e.to_string();
                assert!(msg.contains(&format!("\"{spec}\"")), "{msg} names no spec");
                eprintln!("{spec:?} N={n}: {msg}  (reference: {})", row["error"]);
            }
            (want, got) => panic!(
                "{spec:?} with N={n}: reference {want} {}, ours {got:?}",
                row
            ),
        }
    }
}

#[test]
fn module_selection_matches_reference() {
    let meta = meta();
    let llama = model();
    let llama_names = linear_names(&llama);
    let phi3 = Phi3::load(&common::fixture("phi3_mini"), DType::F32, &Device::Cpu).unwrap();
    let phi3_names = linear_names(&phi3);
    for row in meta["selection"].as_array().unwrap() {
        let patterns = strings(&row["patterns"]);
        let names = match row["model"].as_str().unwrap() {
            "phi3" => &phi3_names,
            _ => &llama_names,
        };
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let got = select_modules(&patterns, &refs);
        // Ours is stricter, on purpose: any pattern that matches nothing is an error, and so is
        // Python-only regex syntax.
        let unmatched: Vec<&String> = patterns
            .iter()
            .filter(|p| select_modules(std::slice::from_ref(*p), &refs).is_err())
            .collect();
        match (&row["modules"], got) {
            (Value::Array(_), Ok(got)) => {
                let want: BTreeSet<String> = strings(&row["modules"]).into_iter().collect();
                assert_eq!(
                    got.iter().cloned().collect::<BTreeSet<_>>(),
                    want,
                    "{patterns:?}"
                );
                let pos: Vec<usize> = got
                    .iter()
                    .map(|g| names.iter().position(|n| n == g).unwrap())
                    .collect();
                assert!(pos.windows(2).all(|w| w[0] < w[1]), "not in model order");
            }
            (_, Err(e)) => {
                let msg = e.to_string();
                assert!(!unmatched.is_empty(), "{patterns:?}: {msg}");
                for p in &unmatched {
                    assert!(msg.contains(p.as_str()), "{msg} does not name {p}");
                }
                if row["modules"].is_array() {
                    // The reference accepted it: without the unmatched patterns ours agrees.
                    let rest: Vec<String> = patterns
                        .iter()
                        .filter(|p| !unmatched.contains(p))
                        .cloned()
                        .collect();
                    let want: BTreeSet<String> = strings(&row["modules"]).into_iter().collect();
                    if !rest.is_empty() {
                        let got: BTreeSet<String> =
                            select_modules(&rest, &refs).unwrap().into_iter().collect();
                        assert_eq!(got, want, "{patterns:?} without {unmatched:?}");
                    }
                }
                eprintln!("{patterns:?}: {msg}");
            }
            (want, Ok(got)) => panic!("{patterns:?}: reference {want}, ours {got:?}"),
        }
    }
}

#[test]
fn phi3_default_output_keys_name_the_missing_ones() {
    let phi3 = Phi3::load(&common::fixture("phi3_mini"), DType::F32, &Device::Cpu).unwrap();
    let names = linear_names(&phi3);
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let keys: Vec<String> = [
        ".*q_proj$",
        ".*k_proj$",
        ".*v_proj$",
        ".*gate_proj$",
        ".*up_proj$",
    ]
    .map(String::from)
    .to_vec();
    let msg = select_modules(&keys, &refs).unwrap_err().to_string();
    for p in [".*q_proj$", ".*k_proj$", ".*gate_proj$"] {
        assert!(msg.contains(p), "{msg}");
    }
    assert!(
        !msg.contains(".*v_proj$") && !msg.contains(".*up_proj$"),
        "{msg}"
    );
    let bad = select_modules(&[r".*(?<!k)_proj$".to_string()], &refs).unwrap_err();
    assert!(bad.to_string().contains("(?<!k)"), "{bad}");
}

#[test]
fn side_taps_all_blocks_or_the_parsed_layers() {
    let meta = meta();
    let side = &meta["side_paths"];
    let m = model();
    let names = linear_names(&m);
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let keys = strings(&side["patterns"]);
    let spec = side["collection_layers"].as_str().unwrap();
    let layers = parse_layers(spec, 4).unwrap();
    let want_layers: Vec<usize> = side["parsed_layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(layers, want_layers);
    // The reference at bd9ae63: every block, whatever the layers say.
    let all = side_taps(&keys, None, TapSide::Input, &refs).unwrap();
    let got: BTreeSet<String> = all.iter().map(|t| t.module.clone()).collect();
    let want: BTreeSet<String> = strings(&side["paths"]).into_iter().collect();
    assert_eq!(got, want);
    assert!(all.iter().all(|t| t.side == TapSide::Input));
    // The intended restriction.
    let some = side_taps(&keys, Some(&layers), TapSide::Input, &refs).unwrap();
    let got: Vec<&str> = some.iter().map(|t| t.module.as_str()).collect();
    assert_eq!(
        got,
        [
            "model.layers.1.self_attn.o_proj",
            "model.layers.1.mlp.down_proj"
        ]
    );
    let none = side_taps(&keys, Some(&[]), TapSide::Input, &refs).unwrap_err();
    assert!(none.to_string().contains("o_proj"), "{none}");
}

/// Every tap of the fixture within 1e-5 abs of baukit's, adapter on and off, with and without
/// logits (the early exit changes nothing here: the last block holds taps).
#[test]
fn taps_match_baukit() {
    let meta = meta();
    let t = tensors();
    let m = model();
    let taps = objective_taps(&meta);
    assert_eq!(taps.len(), 4 * 7);
    for (prefix, off) in [("on", false), ("off", true)] {
        for logits in [false, true] {
            let spec = ForwardSpec {
                taps: taps.clone(),
                logits,
                adapters_off: off,
                ..Default::default()
            };
            let out = run(&m, &spec).unwrap();
            assert_eq!(out.logits.is_some(), logits);
            assert_eq!(out.taps.len(), taps.len());
            let mut worst = 0f32;
            for (tap, (name, got)) in taps.iter().zip(&out.taps) {
                assert_eq!(name, &tap.module);
                let want = &t[&format!("{prefix}.{}.{}", tap.module, side_name(tap))];
                assert_eq!(got.dims(), want.dims(), "{name}");
                let e = max_abs(&(got - want).unwrap());
                assert!(e < 1e-5, "{prefix} {name} {:?}: max abs err {e}", tap.side);
                worst = worst.max(e);
            }
            eprintln!("adapter {prefix}, logits {logits}: worst abs err {worst:.2e}");
        }
    }
}

/// s = sum over taps of sum(tap * w) with the adapter on, and its gradients.
fn objective_grads(m: &Llama, taps: &[Tap], ckpt: bool) -> (f32, HashMap<String, Tensor>) {
    let t = tensors();
    let spec = ForwardSpec {
        taps: taps.to_vec(),
        train: true,
        checkpoint: ckpt,
        ..Default::default()
    };
    let out = run(m, &spec).unwrap();
    let mut s = Tensor::zeros((), DType::F32, &Device::Cpu).unwrap();
    for (tap, (_, x)) in taps.iter().zip(&out.taps) {
        let w = &t[&format!("w.{}.{}", tap.module, side_name(tap))];
        s = (s + (x * w).unwrap().sum_all().unwrap()).unwrap();
    }
    let grads = checkpoint::backward(&s).unwrap();
    let by_name = peft::adapter_params(m, 0)
        .into_iter()
        .filter_map(|(name, v)| grads.get(v.as_tensor()).map(|g| (name, g.clone())))
        .collect();
    (s.to_scalar().unwrap(), by_name)
}

#[test]
fn tap_gradients_match_pytorch() {
    let meta = meta();
    let t = tensors();
    let m = model();
    let (s, grads) = objective_grads(&m, &objective_taps(&meta), false);
    let want_s: Vec<f32> = t["objective"].to_vec1().unwrap();
    assert!(
        (s - want_s[0]).abs() <= 1e-4 * want_s[0].abs().max(1.0),
        "objective {s} vs {}",
        want_s[0]
    );
    let params = peft::adapter_params(&m, 0);
    assert_eq!(params.len(), 16);
    for (name, _) in &params {
        let want = &t[&format!("grad.{name}")];
        let got = grads
            .get(name)
            .unwrap_or_else(|| panic!("no gradient at {name}"));
        assert!(max_abs(got) > 0.0, "zero gradient at {name}");
        let e = rel_err(got, want);
        assert!(e < 1e-4, "{name}: rel err {e}");
    }
}

/// With checkpointing the blocks holding taps run unchecked: taps in blocks 1 and 3 only, block
/// 0 and 2 checkpointed; every LoRA gradient equals the unchecked forward's.
#[test]
fn checkpointing_keeps_tapped_blocks_in_the_graph() {
    let m = model();
    let taps: Vec<Tap> = objective_taps(&meta())
        .into_iter()
        .filter(|t| {
            t.module.starts_with("model.layers.1.") || t.module.starts_with("model.layers.3.")
        })
        .collect();
    let (s0, plain) = objective_grads(&m, &taps, false);
    let (s1, ckpt) = objective_grads(&m, &taps, true);
    assert!((s0 - s1).abs() <= 1e-5 * s0.abs().max(1.0), "{s0} vs {s1}");
    assert_eq!(plain.len(), 16);
    assert_eq!(
        ckpt.len(),
        16,
        "a LoRA parameter got no gradient with checkpointing"
    );
    for (name, g) in &plain {
        let e = rel_err(&ckpt[name], g);
        assert!(e < 1e-5, "{name}: rel err {e}");
    }
}

/// A model whose block 2 cannot run (its o_proj weight has the wrong shape).
fn broken_block_2() -> Llama {
    let mut m = model();
    for lin in m.linears_mut() {
        if lin.name == "model.layers.2.self_attn.o_proj" {
            lin.weight = reprpo_models::adapter::BaseWeight::Dense(
                Tensor::zeros((1, 1), DType::F32, &Device::Cpu).unwrap(),
            );
        }
    }
    m
}

#[test]
fn early_exit_stops_after_the_deepest_tap() {
    let m = broken_block_2();
    let at = |l: usize| {
        vec![
            Tap::input(format!("model.layers.{l}.self_attn.o_proj")),
            Tap::output(format!("model.layers.{l}.mlp.up_proj")),
        ]
    };
    let spec = |taps: Vec<Tap>, logits: bool, hidden: Vec<isize>| ForwardSpec {
        taps,
        logits,
        hidden_layers: hidden,
        ..Default::default()
    };
    // Taps in block 1 and no logits: block 2 never runs.
    let out = run(&m, &spec(at(1), false, vec![])).unwrap();
    assert!(out.logits.is_none());
    let dims: Vec<&[usize]> = out.taps.iter().map(|(_, x)| x.dims()).collect();
    assert_eq!(dims, [&[3, 10, 32][..], &[3, 10, 48][..]]);
    // The same taps agree with the healthy model's.
    let healthy = run(&model(), &spec(at(1), true, vec![])).unwrap();
    for ((_, a), (_, b)) in out.taps.iter().zip(&healthy.taps) {
        assert_eq!(max_abs(&(a - b).unwrap()), 0.0);
    }
    // Hidden state 2 (output of block 1) with the taps: still no block 2.
    assert!(run(&m, &spec(at(1), false, vec![2])).is_ok());
    // Anything that needs block 2 fails on the broken weight, which shows the check above bites.
    assert!(run(&m, &spec(at(1), true, vec![])).is_err());
    assert!(run(&m, &spec(at(2), false, vec![])).is_err());
    assert!(run(&m, &spec(at(1), false, vec![3])).is_err());
}

#[test]
fn taps_of_unknown_modules_are_errors() {
    let m = model();
    let spec = ForwardSpec {
        taps: vec![Tap::input("model.layers.9.self_attn.o_proj")],
        ..Default::default()
    };
    let e = run(&m, &spec).unwrap_err().to_string();
    assert!(e.contains("model.layers.9.self_attn.o_proj"), "{e}");
    // PEFT's prefix is not part of a tap's name.
    let spec = ForwardSpec {
        taps: vec![Tap::input(
            "base_model.model.model.layers.0.self_attn.o_proj",
        )],
        ..Default::default()
    };
    assert!(run(&m, &spec).is_err());
}

/// Phi-3's fused modules: input and output of `gate_up_proj` (output = input times the adapted
/// weight, adapter delta included), and `down_proj`'s input is `silu(gate) * up` of it.
#[test]
fn phi3_fused_modules() {
    let dir = common::fixture("phi3_mini");
    let mut m = Phi3::load(&dir, DType::F32, &Device::Cpu).unwrap();
    peft::load_adapter(&mut m, &dir.join("adapters/lora_r4"), "default").unwrap();
    let inputs = st(dir.join("adapters/inputs.safetensors"));
    let ids = inputs["input_ids"].to_dtype(DType::U32).unwrap();
    let mask = &inputs["attention_mask"];
    let l = "model.layers.1";
    let spec = ForwardSpec {
        taps: vec![
            Tap::input(format!("{l}.mlp.gate_up_proj")),
            Tap::output(format!("{l}.mlp.gate_up_proj")),
            Tap::input(format!("{l}.mlp.down_proj")),
            Tap::output(format!("{l}.self_attn.qkv_proj")),
        ],
        ..Default::default()
    };
    let out = m.forward(&ids, Some(mask), None, &spec).unwrap();
    let [(_, x), (_, y), (_, act), (_, qkv)] = &out.taps[..] else {
        panic!("four taps expected");
    };
    assert_eq!(qkv.dims(), &[2, 20, 192]);
    let lin = m
        .linears()
        .into_iter()
        .find(|l| l.name.ends_with("1.mlp.gate_up_proj"));
    let w = lin.unwrap().adapted_weight(0).unwrap();
    let want = x.broadcast_matmul(&w.t().unwrap()).unwrap();
    assert!(rel_err(y, &want) < 1e-5, "gate_up output is not x W'^T");
    let base = x
        .broadcast_matmul(&lin_weight(&m, "1.mlp.gate_up_proj").t().unwrap())
        .unwrap();
    assert!(rel_err(y, &base) > 1e-4, "the adapter delta is missing");
    let i = y.dim(D::Minus1).unwrap() / 2;
    let gate = y.narrow(D::Minus1, 0, i).unwrap();
    let up = y.narrow(D::Minus1, i, i).unwrap();
    let want = (gate.silu().unwrap() * up).unwrap();
    assert!(
        rel_err(act, &want) < 1e-5,
        "down_proj input is not silu(gate) * up"
    );
}

fn lin_weight(m: &Phi3, suffix: &str) -> Tensor {
    let lins = m.linears();
    let lin = lins.iter().find(|l| l.name.ends_with(suffix)).unwrap();
    lin.base_weight().unwrap()
}
