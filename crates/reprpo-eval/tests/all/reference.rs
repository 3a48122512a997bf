//! Per-choice log-probabilities and the scores built on them against transformers + PEFT
//! (tests/reference/gen_eval_fixtures.py): a tiny random Llama, with no adapter, a LoRA and a
//! BOFT adapter, scored by both scorer paths (prompt KV cache; padded batches).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use candle_core::{DType, Device};
use reprpo_data::tokenize::{Group, Seq};
use reprpo_eval::score::{dpo_reward, mc_score, pref_score};
use reprpo_eval::scorer::{ScoreMode, ScoreOptions, score_groups};
use reprpo_models::{Llama, peft};
use serde_json::Value;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/eval")
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join("expected.json")).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap()
}

/// The fixture's MC items and pairs as groups (no BOS: the ids are used as they are).
fn groups(e: &Value) -> (Vec<Group>, Vec<Group>) {
    let group = |prompt: Vec<u32>, comps: Vec<Vec<u32>>| Group {
        prompt: prompt.clone(),
        seqs: comps
            .into_iter()
            .map(|c| Seq {
                prompt: prompt.clone(),
                completion: c,
            })
            .collect(),
        truncated: false,
    };
    let mc = e["mc"]
        .as_array()
        .unwrap()
        .iter()
        .map(|it| {
            group(
                ids(&it["prompt"]),
                it["choices"].as_array().unwrap().iter().map(ids).collect(),
            )
        })
        .collect();
    let pairs = e["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            group(
                ids(&p["prompt"]),
                vec![ids(&p["chosen"]), ids(&p["rejected"])],
            )
        })
        .collect();
    (mc, pairs)
}

/// Asserts `got` and `want` have the same, non-zero length: a zip of the two compares nothing
/// past the shorter one, so a short (or empty) result would otherwise pass.
fn same_len<A, B>(what: &str, got: &[A], want: &[B]) {
    assert!(!want.is_empty(), "{what}: nothing to compare");
    assert_eq!(got.len(), want.len(), "{what}: lengths (ours, reference)");
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

#[test]
fn logps_match_transformers_and_peft_for_base_lora_and_boft() {
    let e = expected();
    let (mc, pairs) = groups(&e);
    let mut model = Llama::load(&dir().join("model"), DType::F32, &Device::Cpu).unwrap();
    let lora = peft::load_adapter(&mut model, &dir().join("model/adapters/lora"), "lora").unwrap();
    let boft = peft::load_adapter(&mut model, &dir().join("model/adapters/boft"), "boft").unwrap();
    let mut worst: f64 = 0.0;
    for (name, active) in [("base", None), ("lora", Some(lora)), ("boft", Some(boft))] {
        model.adapters.active = active;
        let want = &e["scores"][name];
        for mode in [ScoreMode::PrefixCache, ScoreMode::Full] {
            // batch_tokens 24: several padded batches of mixed lengths.
            let opts = ScoreOptions {
                mode,
                batch_tokens: 24,
                pad: 0,
            };
            let mc_refs: Vec<&Group> = mc.iter().collect();
            let got = score_groups(&model, &mc_refs, &opts, &mut |_| {}).unwrap();
            let want_mc = want["mc"].as_array().unwrap();
            same_len(&format!("{name} {mode:?} mc"), &got, want_mc);
            for (i, (g, w)) in got.iter().zip(want_mc).enumerate() {
                let want_logps = w["logps"].as_array().unwrap();
                same_len(&format!("{name} {mode:?} mc {i} choices"), g, want_logps);
                for (k, (s, wl)) in g.iter().zip(want_logps).enumerate() {
                    let r = rel(s.sum, f(wl));
                    worst = worst.max(r);
                    assert!(
                        r < 1e-4,
                        "{name} {mode:?} mc {i} choice {k}: {} vs {}",
                        s.sum,
                        f(wl)
                    );
                    assert_eq!(s.tokens, mc[i].seqs[k].completion.len());
                }
            }
            let pair_refs: Vec<&Group> = pairs.iter().collect();
            let got = score_groups(&model, &pair_refs, &opts, &mut |_| {}).unwrap();
            let want_pairs = want["pairs"].as_array().unwrap();
            same_len(&format!("{name} {mode:?} pairs"), &got, want_pairs);
            for (i, (g, w)) in got.iter().zip(want_pairs).enumerate() {
                let keys = ["logp_chosen", "logp_rejected"];
                same_len(&format!("{name} {mode:?} pair {i}"), g, &keys);
                for (s, key) in g.iter().zip(keys) {
                    let r = rel(s.sum, f(&w[key]));
                    worst = worst.max(r);
                    assert!(
                        r < 1e-4,
                        "{name} {mode:?} pair {i} {key}: {} vs {}",
                        s.sum,
                        f(&w[key])
                    );
                }
            }
        }
    }
    println!("worst relative difference of a log-probability: {worst:.2e}");
}

/// The score formulas on the reference's own log-probabilities give the reference's scores
/// (computed independently with numpy in the generator).
#[test]
fn scores_match_the_reference_formulas() {
    let e = expected();
    let beta = f(&e["beta"]);
    for name in ["base", "lora", "boft"] {
        let want = &e["scores"][name];
        let (items, want_mc) = (e["mc"].as_array().unwrap(), want["mc"].as_array().unwrap());
        same_len(&format!("{name} mc"), items, want_mc);
        for (it, w) in items.iter().zip(want_mc) {
            let l: Vec<f64> = w["logps"].as_array().unwrap().iter().map(f).collect();
            let n: Vec<usize> = it["choices"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c.as_array().unwrap().len())
                .collect();
            let correct: Vec<usize> = ids(&it["correct"]).iter().map(|&c| c as usize).collect();
            let s = mc_score(&l, &n, &correct).unwrap();
            assert!((s.prob_correct - f(&w["prob_correct"])).abs() < 1e-12);
            assert!((s.prob_correct_norm - f(&w["prob_correct_norm"])).abs() < 1e-12);
            assert_eq!(s.pred as u64, w["pred"].as_u64().unwrap());
            assert_eq!(s.acc, w["acc"].as_bool().unwrap());
            assert_eq!(s.acc_norm, w["acc_norm"].as_bool().unwrap());
            let want_probs = w["probs"].as_array().unwrap();
            same_len(&format!("{name} mc probs"), &s.probs, want_probs);
            for (p, wp) in s.probs.iter().zip(want_probs) {
                assert!((p - f(wp)).abs() < 1e-12);
            }
        }
        let base = &e["scores"]["base"]["pairs"];
        let (pairs, want_pairs) = (
            e["pairs"].as_array().unwrap(),
            want["pairs"].as_array().unwrap(),
        );
        same_len(&format!("{name} pairs"), pairs, want_pairs);
        for (i, (p, w)) in pairs.iter().zip(want_pairs).enumerate() {
            let nw = p["chosen"].as_array().unwrap().len();
            let nl = p["rejected"].as_array().unwrap().len();
            let s = pref_score(f(&w["logp_chosen"]), nw, f(&w["logp_rejected"]), nl).unwrap();
            assert!((s.delta - f(&w["delta"])).abs() < 1e-12);
            assert!((s.prob - f(&w["prob"])).abs() < 1e-12);
            assert_eq!(s.correct, w["correct"].as_bool().unwrap());
            if name != "base" {
                let b = &base[i];
                let bs = pref_score(f(&b["logp_chosen"]), nw, f(&b["logp_rejected"]), nl).unwrap();
                let r = dpo_reward(&s, &bs, beta);
                assert!((r.chosen - f(&w["reward_chosen"])).abs() < 1e-12);
                assert!((r.margin - f(&w["reward_margin"])).abs() < 1e-12);
                assert_eq!(r.correct, w["reward_correct"].as_bool().unwrap());
            }
        }
    }
}
