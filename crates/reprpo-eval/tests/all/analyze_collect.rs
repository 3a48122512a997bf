//! What the hidden-state analysis collects, against the model run one sequence at a time with no
//! padding: each pair's pooled chosen / rejected states are the mean of the completion tokens'
//! hidden states, the kept per-token states are those states, and the margin is the difference
//! of the completions' summed log-probabilities (the evaluator's `score_groups`). Batches of
//! several pairs (right-padded) and a batch limit that splits the pairs are both exercised, with
//! the adapter made active and not.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor};
use reprpo_data::tokenize::{self, TokenizeConfig};
use reprpo_data::{PreferencePair, Tok};
use reprpo_eval::analyze::{AnalyzeOptions, analyze, collect};
use reprpo_eval::scorer::{ScoreMode, ScoreOptions, score_groups};
use reprpo_eval::suite::{Items, Suite, load_dataset};
use reprpo_models::adapter::AdapterHost;
use reprpo_models::{CausalLm, ForwardSpec, Llama};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn pairs(limit: usize) -> Vec<PreferencePair> {
    let suite = Suite::by_name(
        "default",
        &root().join("datasets/suites"),
        &root().join("datasets"),
    )
    .unwrap();
    match load_dataset(&suite.datasets[0], &root(), Some(limit))
        .unwrap()
        .items
    {
        Items::Pairs(p) => p,
        Items::Mc(_) => panic!("the default train set is pairs"),
    }
}

fn model() -> (Llama, usize) {
    common::lora_model()
}

/// One sequence alone: the completion positions' states at `layers`, `[layer][token][hidden]`.
fn alone(m: &Llama, prompt: &[u32], completion: &[u32], layers: &[usize]) -> Vec<Vec<Vec<f64>>> {
    let ids: Vec<u32> = prompt.iter().chain(completion).copied().collect();
    let t = ids.len();
    let ids = Tensor::from_vec(ids, (1, t), &Device::Cpu).unwrap();
    let spec = ForwardSpec {
        hidden_layers: layers.iter().map(|&l| l as isize).collect(),
        ..Default::default()
    };
    let o = m.forward(&ids, None, None, &spec).unwrap();
    o.hidden
        .iter()
        .map(|(_, h)| {
            let h = h.i(0).unwrap().to_dtype(DType::F64).unwrap();
            let rows: Vec<Vec<f64>> = h.to_vec2().unwrap();
            rows[prompt.len()..].to_vec()
        })
        .collect()
}

fn mean(rows: &[Vec<f64>]) -> Vec<f64> {
    let mut m = vec![0.0; rows[0].len()];
    for r in rows {
        m.iter_mut()
            .zip(r)
            .for_each(|(a, x)| *a += x / rows.len() as f64);
    }
    m
}

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0.0, |m, (x, y)| m.max((x - y).abs()))
}

fn check(m: &mut Llama, adapter: Option<usize>, batch_tokens: usize) {
    m.adapter_set_mut().active = adapter;
    let tok = Tok::byte_level().unwrap();
    let p = pairs(5);
    let layers = [1, m.num_layers()];
    let opts = AnalyzeOptions {
        batch_tokens,
        by_token_pairs: 3,
        tokenize: TokenizeConfig::default(),
        ..Default::default()
    };
    let c = collect(&*m, &tok, "default", &p, &layers, &opts).unwrap();
    let t = tokenize::tokenize_pairs(&tok, &p, &opts.tokenize).unwrap();
    assert_eq!(c.margin.len(), t.pairs.len());
    assert_eq!(c.tokens.len(), 3);
    let groups: Vec<_> = t.pairs.iter().collect();
    let score = ScoreOptions {
        mode: ScoreMode::Full,
        batch_tokens: 1,
        pad: 0,
    };
    let logps = score_groups(&*m, &groups, &score, &mut |_| {}).unwrap();
    for (i, g) in t.pairs.iter().enumerate() {
        let want = logps[i][0].sum - logps[i][1].sum;
        assert!(
            (c.margin[i] - want).abs() <= 1e-4 * want.abs().max(1.0),
            "pair {i}: margin {} vs {want}",
            c.margin[i]
        );
        for (k, seq) in g.seqs.iter().enumerate() {
            let states = alone(m, &seq.prompt, &seq.completion, &layers);
            for (li, s) in states.iter().enumerate() {
                let pooled = if k == 0 {
                    &c.pooled[li].chosen[i]
                } else {
                    &c.pooled[li].rejected[i]
                };
                let d = max_diff(pooled, &mean(s));
                assert!(d <= 1e-5, "pair {i} seq {k} layer {li}: pooled off by {d}");
                if let Some(pt) = c.tokens.get(i) {
                    let kept = if k == 0 {
                        &pt.chosen[li]
                    } else {
                        &pt.rejected[li]
                    };
                    assert_eq!(kept.len(), seq.completion.len());
                    for (a, b) in kept.iter().zip(s) {
                        assert!(max_diff(a, b) <= 1e-5, "pair {i} seq {k} layer {li} tokens");
                    }
                }
            }
        }
    }
}

#[test]
fn pooled_states_tokens_and_margins_are_those_of_each_sequence_alone() {
    let (mut m, idx) = model();
    // One batch of every pair, then batches of one pair each (the limit splits them).
    check(&mut m, None, 1 << 20);
    check(&mut m, Some(idx), 1 << 20);
    check(&mut m, Some(idx), 1);
}

#[test]
fn analyze_switches_the_adapter_per_subject_and_leaves_it_off() {
    let (mut m, idx) = model();
    let tok = Tok::byte_level().unwrap();
    let data = vec![("default".to_string(), pairs(6))];
    let subjects = common::base_and_lora(idx);
    let opts = AnalyzeOptions::default();
    let a = analyze(&mut m, &tok, &subjects, &data, &[2], &opts).unwrap();
    m.adapter_set_mut().active = Some(idx);
    let with = collect(&m, &tok, "default", &data[0].1, &[2], &opts).unwrap();
    m.adapter_set_mut().active = None;
    let without = collect(&m, &tok, "default", &data[0].1, &[2], &opts).unwrap();
    assert_eq!(a[0].data[0].margin, without.margin);
    assert_eq!(a[1].data[0].margin, with.margin);
    assert_ne!(with.margin, without.margin);
    assert_eq!(m.adapter_set().active, None);
}
