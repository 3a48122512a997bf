//! `scoring = "open-pref-eval"` against open_pref_eval @ 0c7f3a3 itself
//! (tests/reference/gen_open_pref_eval_fixtures.py): a tiny random Llama and the byte-level BPE
//! tokenizer of tests/fixtures/tokenize/bytelevel; seven pairs under open_pref_eval's default limits
//! (512 / 1024, one pair cut) and small ones (8 / 20, most cut). The token ids equal those of its
//! `PreTokenizer`, and each pair's chosen and rejected scores, probability and correct flag equal
//! those of its `extract_logps` (score_ipo) with both scorer paths, through a suite file.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use reprpo_data::{PreferencePair, SourceMeta, Tok};
use reprpo_eval::evaluate::{EvalOptions, Subject, evaluate};
use reprpo_eval::open_pref_eval::{OpenPrefEval, tokenize_pairs};
use reprpo_eval::scorer::ScoreMode;
use reprpo_eval::suite::{Items, Scoring, Suite, load_dataset};
use reprpo_models::Llama;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn expected() -> Value {
    let text = std::fs::read_to_string(fixtures().join("open_pref_eval/expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn tok() -> Tok {
    Tok::from_dir(&fixtures().join("tokenize/bytelevel")).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| u32::try_from(x.as_u64().unwrap()).unwrap())
        .collect()
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap()
}

fn pairs(e: &Value) -> Vec<PreferencePair> {
    e["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, p)| PreferencePair {
            id: p["id"].as_str().unwrap().into(),
            prompt: p["prompt"].as_str().unwrap().into(),
            chosen: p["chosen"].as_str().unwrap().into(),
            rejected: p["rejected"].as_str().unwrap().into(),
            source: SourceMeta {
                dataset: "ope".into(),
                row: i + 1,
                ..Default::default()
            },
        })
        .collect()
}

fn settings(e: &Value) -> Vec<(String, OpenPrefEval, Vec<Value>)> {
    e["settings"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, s)| {
            let cfg = OpenPrefEval {
                max_prompt_length: s["max_prompt_length"].as_u64().unwrap() as usize,
                max_length: s["max_length"].as_u64().unwrap() as usize,
            };
            (name.clone(), cfg, s["results"].as_array().unwrap().clone())
        })
        .collect()
}

#[test]
fn tokenisation_matches_open_pref_eval() {
    let e = expected();
    let tok = tok();
    assert_eq!(tok.eos, u32::try_from(e["eos"].as_u64().unwrap()).unwrap());
    let pairs = pairs(&e);
    for (name, cfg, results) in settings(&e) {
        let groups = tokenize_pairs(&tok, &pairs, &cfg).unwrap();
        assert_eq!(groups.len(), results.len());
        for ((g, want), pair) in groups.iter().zip(&results).zip(&pairs) {
            let id = want["id"].as_str().unwrap();
            let prompt = ids(&want["prompt_ids"]);
            assert_eq!(g.prompt, prompt, "{name} {id}: prompt");
            assert_eq!(g.seqs.len(), 2);
            for (s, key) in g.seqs.iter().zip(["chosen", "rejected"]) {
                assert_eq!(s.prompt, prompt, "{name} {id}");
                assert_eq!(
                    s.completion,
                    ids(&want[format!("{key}_ids")]),
                    "{name} {id}: {key}"
                );
            }
            // `truncated` is whether a cut removed a token (open_pref_eval's own flags also say
            // true for a prompt or completion that fills its limit exactly).
            let full = |t: &str| tok.encode(t, false).unwrap().len();
            let cut = full(&pair.prompt) > prompt.len()
                || full(&pair.chosen) > g.seqs[0].completion.len()
                || full(&pair.rejected) > g.seqs[1].completion.len();
            assert_eq!(g.truncated, cut, "{name} {id}");
            if want["prompt_truncated"].as_bool() == Some(false)
                && want["chosen_truncated"].as_bool() == Some(false)
                && want["rejected_truncated"].as_bool() == Some(false)
            {
                assert!(!g.truncated, "{name} {id}");
            }
        }
    }
    // The cases that make open_pref_eval's separate encoding matter: encoded together, the
    // prompt and the completion merge across the boundary.
    let (p, c) = ("I drink wa", "ter every day");
    let joint = tok.encode(&format!("{p}{c}"), false).unwrap();
    let apart: Vec<u32> = [p, c]
        .iter()
        .flat_map(|t| tok.encode(t, false).unwrap())
        .collect();
    assert_ne!(joint, apart);
    // No BOS: the tokenizer would add one with special tokens.
    assert_eq!(tok.encode(p, true).unwrap()[0], tok.bos.unwrap());
    let g = &tokenize_pairs(&tok, &pairs[3..4], &OpenPrefEval::default()).unwrap()[0];
    assert_ne!(g.prompt[0], tok.bos.unwrap());
}

#[test]
fn bad_limits_are_errors() {
    let tok = tok();
    let e = expected();
    for (mpl, ml) in [(0, 10), (10, 10), (12, 10)] {
        let cfg = OpenPrefEval {
            max_prompt_length: mpl,
            max_length: ml,
        };
        let err = tokenize_pairs(&tok, &pairs(&e), &cfg)
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_prompt_length"), "{err}");
    }
}

/// Scores through a suite file (a pairs file beside it, `scoring = "open-pref-eval"`), with the
/// setting's limits, the base model only.
#[test]
fn scores_match_open_pref_eval_through_a_suite() {
    let e = expected();
    let tok = tok();
    let mut model = Llama::load(
        &fixtures().join("open_pref_eval/model"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut jsonl = String::new();
    for p in e["pairs"].as_array().unwrap() {
        let row = serde_json::json!({
            "prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]
        });
        jsonl.push_str(&format!("{row}\n"));
    }
    std::fs::write(dir.path().join("ope.jsonl"), jsonl).unwrap();
    let suite_file = dir.path().join("ope.toml");
    std::fs::write(
        &suite_file,
        "scoring = \"open-pref-eval\"\n[[dataset]]\nname = \"ope\"\nrecipe = \"ope.jsonl\"\nrole = \"test\"\n",
    )
    .unwrap();
    let suite = Suite::load(&suite_file, dir.path()).unwrap();
    assert_eq!(
        suite.scoring,
        Scoring::OpenPrefEval(OpenPrefEval::default())
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let loaded = load_dataset(&suite.datasets[0], &root, None).unwrap();
    let Items::Pairs(items) = &loaded.items else {
        panic!("pairs expected")
    };
    assert_eq!(items.len(), 7);
    let subjects = [Subject {
        label: "base".into(),
        adapter: None,
    }];
    let mut checked = 0;
    let mut worst = 0f64;
    for (name, cfg, results) in settings(&e) {
        let mut d = loaded.clone();
        d.spec.scoring = Scoring::OpenPrefEval(cfg);
        for mode in [ScoreMode::Full, ScoreMode::PrefixCache, ScoreMode::Auto] {
            let opts = EvalOptions {
                pair_mode: mode,
                generations: 0,
                // Neither applies to open-pref-eval datasets: they would cut everything here.
                max_length: Some(4),
                ..Default::default()
            };
            let report = evaluate(
                &mut model,
                &tok,
                &subjects,
                std::slice::from_ref(&d),
                &[],
                "ope",
                &opts,
            )
            .unwrap();
            assert!(
                report
                    .table
                    .truncation
                    .rule
                    .contains("open_pref_eval 0c7f3a3")
                    && report
                        .table
                        .truncation
                        .rule
                        .contains(&format!("last {} tokens", cfg.max_prompt_length)),
                "{}",
                report.table.truncation.rule
            );
            assert_eq!(report.examples.len(), results.len());
            let mut correct = 0;
            for (rec, want) in report.examples.iter().zip(&results) {
                let id = want["id"].as_str().unwrap();
                let nw = rec["tokens_chosen"].as_u64().unwrap() as usize;
                let nl = rec["tokens_rejected"].as_u64().unwrap() as usize;
                // The counted tokens are the completion's own (open_pref_eval's mask sum: no EOS).
                assert_eq!(nw, want["chosen_ids"].as_array().unwrap().len(), "{id}");
                assert_eq!(nl, want["rejected_ids"].as_array().unwrap().len(), "{id}");
                let sw = f(&rec["logp_chosen"]) / nw as f64;
                let sl = f(&rec["logp_rejected"]) / nl as f64;
                let close = |a: f64, b: f64| (a - b).abs() <= 1e-4 * b.abs().max(1.0);
                for (got, key) in [
                    (sw, "chosen_log_score"),
                    (sl, "rejected_log_score"),
                    (f(&rec["logp_chosen"]), "chosen_logp_sum"),
                    (f(&rec["logp_rejected"]), "rejected_logp_sum"),
                    (f(&rec["delta"]), "log_ratio"),
                    (f(&rec["prob_correct"]), "prob"),
                ] {
                    worst = worst.max((got - f(&want[key])).abs() / f(&want[key]).abs().max(1.0));
                    assert!(
                        close(got, f(&want[key])),
                        "{name} {mode:?} {id} {key}: {got} vs {}",
                        want[key]
                    );
                }
                assert_eq!(rec["correct"], want["correct"], "{name} {mode:?} {id}");
                correct += usize::from(want["correct"].as_bool().unwrap());
                checked += 1;
            }
            let acc = report.table.rows[0].cells[0].as_ref().unwrap().acc;
            assert!((acc - correct as f64 / results.len() as f64).abs() < 1e-12);
        }
    }
    assert_eq!(checked, 2 * 3 * 7);
    println!("largest difference from open_pref_eval: {worst:.2e} (relative, or absolute below 1)");
}
