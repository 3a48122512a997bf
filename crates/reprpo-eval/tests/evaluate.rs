//! End to end on the embedded default: the tiny random Llama with a LoRA adapter, the default
//! suite, both scorer paths, the base from the same weights, and the files of a report; and the
//! same evaluation on the written-out path that other devices take.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "all/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use reprpo_data::Tok;
use reprpo_data::tokenize::{self, Layout, TokenizeConfig};
use reprpo_eval::evaluate::{EvalOptions, Subject, evaluate};
use reprpo_eval::output::write_report;
use reprpo_eval::scorer::ScoreMode;
use reprpo_eval::suite::{Items, Suite, load_dataset};
use reprpo_models::logps::token_logps;
use reprpo_models::{ForwardSpec, Llama};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn model() -> (Llama, usize) {
    common::lora_model()
}

/// The default suite's datasets, `limit` items each.
fn default_suite(limit: usize) -> Vec<reprpo_eval::suite::Loaded> {
    let suite = Suite::by_name(
        "default",
        &root().join("datasets/suites"),
        &root().join("datasets"),
    )
    .unwrap();
    suite
        .datasets
        .iter()
        .map(|d| load_dataset(d, &root(), Some(limit)).unwrap())
        .collect()
}

fn logp_fields(e: &serde_json::Value) -> Vec<f64> {
    if let Some(a) = e["logps"].as_array() {
        a.iter().map(|x| x.as_f64().unwrap()).collect()
    } else {
        vec![
            e["logp_chosen"].as_f64().unwrap(),
            e["logp_rejected"].as_f64().unwrap(),
        ]
    }
}

#[test]
fn default_suite_prefix_and_full_agree_and_report_is_written() {
    let (mut m, idx) = model();
    let tok = Tok::byte_level().unwrap();
    let data = default_suite(5);
    let subjects = common::base_and_lora(idx);
    let mut opts = EvalOptions {
        mc_mode: ScoreMode::PrefixCache,
        pair_mode: ScoreMode::PrefixCache,
        generations: 2,
        max_new_tokens: 8,
        ..Default::default()
    };
    let prefix = evaluate(&mut m, &tok, &subjects, &data, &[], "default", &opts).unwrap();
    opts.mc_mode = ScoreMode::Full;
    opts.pair_mode = ScoreMode::Full;
    opts.batch_tokens = 300;
    let full = evaluate(&mut m, &tok, &subjects, &data, &[], "default", &opts).unwrap();
    assert_eq!(prefix.examples.len(), 2 * 20);
    assert_eq!(full.examples.len(), prefix.examples.len());
    let mut worst: f64 = 0.0;
    for (a, b) in prefix.examples.iter().zip(&full.examples) {
        assert_eq!(a["id"], b["id"]);
        let (la, lb) = (logp_fields(a), logp_fields(b));
        assert!(!la.is_empty(), "{}: no log-probabilities", a["id"]);
        assert_eq!(la.len(), lb.len(), "{}: log-probabilities", a["id"]);
        for (x, y) in la.into_iter().zip(lb) {
            worst = worst.max((x - y).abs() / y.abs());
        }
    }
    println!("prefix cache vs padded batches: worst relative difference {worst:.2e}");
    assert!(worst < 1e-4);
    // The adapter changes the scores; the base row has no DPO rewards, the adapter row has.
    let first_lora = &prefix.examples[20];
    assert_eq!(first_lora["model"], "lora");
    assert_ne!(logp_fields(&prefix.examples[0]), logp_fields(first_lora));
    assert!(prefix.examples[0].get("reward_margin").is_none());
    assert!(first_lora.get("reward_margin").is_some());
    let rows = &prefix.table.rows;
    assert_eq!(rows[0].model, "base");
    assert!(rows[1].cells[1].as_ref().unwrap().reward_acc.is_some());
    assert_eq!(prefix.generations.len(), 2);
    assert_eq!(prefix.generations[0].outputs.len(), 2);

    let dir = tempfile::tempdir().unwrap();
    let written = write_report(dir.path(), &prefix).unwrap();
    for name in [
        "table.md",
        "table.csv",
        "table.json",
        "examples.jsonl",
        "generations.md",
        "scores.png",
    ] {
        assert!(written.contains(&dir.path().join(name)), "{name}");
        assert!(
            std::fs::metadata(dir.path().join(name)).unwrap().len() > 0,
            "{name}"
        );
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty());
    let jsonl = std::fs::read_to_string(dir.path().join("examples.jsonl")).unwrap();
    assert_eq!(jsonl.lines().count(), 40);
    let md = std::fs::read_to_string(dir.path().join("table.md")).unwrap();
    assert!(
        md.contains("default-ood (OOD)") && md.contains("| lora |"),
        "{md}"
    );
}

/// The base row comes from the same weights with the adapter off: its pair log-probabilities
/// equal those of a forward with `adapters_off` while the adapter is active.
#[test]
fn base_scores_equal_an_adapters_off_forward() {
    let (mut m, idx) = model();
    let tok = Tok::byte_level().unwrap();
    let d = reprpo_data::default_data::embedded().unwrap();
    let pairs = d.test[..3].to_vec();
    let suite = Suite::by_name(
        "default",
        &root().join("datasets/suites"),
        &root().join("datasets"),
    )
    .unwrap();
    let mut loaded = load_dataset(&suite.datasets[1], &root(), None).unwrap();
    loaded.items = Items::Pairs(pairs.clone());
    let subjects = [Subject {
        label: "base".into(),
        adapter: None,
    }];
    let opts = EvalOptions {
        generations: 0,
        ..Default::default()
    };
    let r = evaluate(&mut m, &tok, &subjects, &[loaded], &[], "t", &opts).unwrap();

    m.adapters.active = Some(idx);
    let tp = tokenize::tokenize_pairs(&tok, &pairs, &TokenizeConfig::default()).unwrap();
    let refs: Vec<_> = tp.pairs.iter().collect();
    let b = tokenize::collate_pairs(&refs, tok.pad, Layout::Right).unwrap();
    let shape = (b.rows, b.seq_len);
    let ids = Tensor::from_vec(b.input_ids, shape, &Device::Cpu).unwrap();
    let mask = Tensor::from_vec(b.attention_mask, shape, &Device::Cpu).unwrap();
    let loss = Tensor::from_vec(b.loss_mask, shape, &Device::Cpu).unwrap();
    let spec = ForwardSpec {
        adapters_off: true,
        ..ForwardSpec::logits()
    };
    let out = m.forward(&ids, Some(&mask), None, &spec).unwrap();
    let lp = token_logps(&out.logits.unwrap(), &ids, &loss).unwrap();
    let sums: Vec<f32> = lp.sum.to_vec1().unwrap();
    for (i, e) in r.examples.iter().enumerate() {
        let (c, rj) = (sums[i] as f64, sums[i + 3] as f64);
        assert!((e["logp_chosen"].as_f64().unwrap() - c).abs() <= 1e-4 * c.abs());
        assert!((e["logp_rejected"].as_f64().unwrap() - rj).abs() <= 1e-4 * rj.abs());
    }
}

/// `ScoreMode::Auto` sends a group with a long shared prompt through the cache and one with a
/// short prompt to padded batches, keeps the groups in order, and gives the numbers of full mode.
#[test]
fn auto_mode_mixes_both_paths_and_equals_full() {
    use reprpo_data::tokenize::{Group, Seq};
    use reprpo_eval::scorer::{ScoreOptions, score_groups};
    let (mut m, idx) = model();
    m.adapters.active = Some(idx);
    let group = |p: usize, tails: &[usize], salt: u32| {
        let prompt: Vec<u32> = (0..p as u32).map(|i| 3 + (i * 7 + salt) % 250).collect();
        let seqs = tails
            .iter()
            .enumerate()
            .map(|(k, &w)| Seq {
                prompt: prompt.clone(),
                completion: (0..w as u32)
                    .map(|i| 3 + (i * 13 + 31 * k as u32 + salt) % 250)
                    .collect(),
            })
            .collect();
        Group {
            prompt,
            seqs,
            truncated: false,
        }
    };
    // 3 (P + C W) <= 2 C (P + W): 3 (6 + 2 * 9) = 72 > 60 -> full; 3 (40 + 4 * 5) = 180 <= 360
    // -> cache; 3 (5 + 2 * 7) = 57 > 48 -> full; 3 (60 + 5 * 2) = 210 <= 620 -> cache;
    // 3 (10 + 2 * 2) = 42 <= 48 -> cache (a factor of 1.71: factor 2 would have sent it to full).
    let groups = [
        group(6, &[9, 4], 1),
        group(40, &[5, 3, 2, 4], 2),
        group(5, &[2, 7], 3),
        group(60, &[1, 2, 2, 1, 2], 4),
        group(10, &[2, 1], 5),
    ];
    let refs: Vec<&Group> = groups.iter().collect();
    let run = |mode| {
        let opts = ScoreOptions {
            mode,
            batch_tokens: 64,
            pad: 0,
        };
        let mut calls = Vec::new();
        let out = score_groups(&m, &refs, &opts, &mut |n| calls.push(n)).unwrap();
        (out, calls)
    };
    let (full, _) = run(ScoreMode::Full);
    let (auto, calls) = run(ScoreMode::Auto);
    // Full batches report the two short groups at once, then one call per cached group.
    assert_eq!(calls, vec![2, 1, 1, 1]);
    assert_eq!(calls.iter().sum::<usize>(), groups.len());
    assert_eq!(auto.len(), groups.len());
    assert_eq!(full.len(), groups.len());
    let mut worst: f64 = 0.0;
    for (g, (a, f)) in groups.iter().zip(auto.iter().zip(&full)) {
        assert_eq!(a.len(), g.seqs.len());
        assert_eq!(f.len(), g.seqs.len());
        for (x, y) in a.iter().zip(f) {
            assert_eq!(x.tokens, y.tokens);
            worst = worst.max((x.sum - y.sum).abs() / y.sum.abs());
        }
    }
    println!("auto vs full: worst relative difference {worst:.2e}");
    assert!(worst < 1e-5, "{worst}");
}

/// What an evaluation would run on a GPU, asserted on the CPU: under
/// `reprpo_kernels::written_out` (the path of every non-CPU device) `evaluate` runs no custom op
/// that lacks a CUDA forward, and scores what the fused CPU kernels score.
#[test]
fn written_out_evaluation_runs_device_ops_and_scores_the_same() {
    let (mut m, idx) = model();
    let tok = Tok::byte_level().unwrap();
    let data = default_suite(4);
    let subjects = common::base_and_lora(idx);
    for mode in [ScoreMode::PrefixCache, ScoreMode::Full] {
        let opts = EvalOptions {
            mc_mode: mode,
            pair_mode: mode,
            generations: 1,
            max_new_tokens: 6,
            ..Default::default()
        };
        let mut run = |written: bool| {
            Device::Cpu.with_context(|| {
                reprpo_kernels::trace_cpu_kernels(|| {
                    let mut job = || evaluate(&mut m, &tok, &subjects, &data, &[], "d", &opts);
                    if written {
                        reprpo_kernels::written_out(job)
                    } else {
                        job()
                    }
                })
            })
        };
        let (fused, seen_fused) = run(false);
        let (written, seen) = run(true);
        let (fused, written) = (fused.unwrap(), written.unwrap());
        assert!(
            seen.iter().all(|op| *op == "checkpoint"),
            "{mode:?}: CPU-only custom ops on the device path: {seen:?}"
        );
        assert!(!seen_fused.is_empty(), "the trace saw no fused kernel");
        let (a, b) = (
            fused
                .examples
                .iter()
                .flat_map(logp_fields)
                .collect::<Vec<_>>(),
            written
                .examples
                .iter()
                .flat_map(logp_fields)
                .collect::<Vec<_>>(),
        );
        assert_eq!(a.len(), b.len());
        assert!(!a.is_empty());
        for (x, y) in a.iter().zip(&b) {
            assert!(
                (x - y).abs() <= 1e-4 * x.abs().max(1.0),
                "{mode:?}: {x} vs {y}"
            );
        }
    }
}
