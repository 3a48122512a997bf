//! Tokenisation against ids, masks and batches that TRL itself produced
//! (`tests/reference/gen_tokenize_fixtures.py`: TRL 0.9.6 for `classic`, TRL 1.16.0 for
//! `trl-current`, transformers for chat templates), on two tokenizers trained by that script.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use reprpo_data::chat::Message;
use reprpo_data::tokenize::{self, Layout, TokenizationMode, TokenizeConfig, Truncation};
use reprpo_data::{PreferencePair, SourceMeta, Tok};
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tokenize")
}

fn load(name: &str) -> Value {
    let text = std::fs::read_to_string(fixtures().join(name)).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn tok(name: &str) -> Tok {
    Tok::from_dir(&fixtures().join(name)).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap() as u32)
        .collect()
}

fn ints(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

fn pairs(cases: &Value) -> Vec<PreferencePair> {
    cases
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, c)| PreferencePair {
            id: format!("fixture/{}", i + 1),
            prompt: c["prompt"].as_str().unwrap().into(),
            chosen: c["chosen"].as_str().unwrap().into(),
            rejected: c["rejected"].as_str().unwrap().into(),
            source: SourceMeta {
                dataset: "fixture".into(),
                row: i + 1,
                ..Default::default()
            },
        })
        .collect()
}

fn truncation(v: &Value) -> Truncation {
    match v.as_str().unwrap() {
        "keep_end" => Truncation::KeepEnd,
        "keep_start" => Truncation::KeepStart,
        other => panic!("{other}"),
    }
}

/// TRL 0.9.6 `DPOTrainer.tokenize_row` per row, and `DPODataCollatorWithPadding` +
/// `concatenated_inputs` for the first four rows (right-padded, loss where labels != -100).
#[test]
fn classic_matches_trl_0_9() {
    let fx = load("classic.json");
    assert_eq!(fx["trl"], "0.9.6");
    let pairs = pairs(&fx["cases"]);
    let runs = fx["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 8);
    let mut chat_runs = 0;
    let mut merged_prompts = 0;
    let mut truncated = 0;
    for run in runs {
        let tk = tok(run["tokenizer"].as_str().unwrap());
        let c = &run["config"];
        let cfg = TokenizeConfig {
            tokenization: TokenizationMode::Classic,
            max_length: Some(c["max_length"].as_u64().unwrap() as usize),
            max_prompt_length: Some(c["max_prompt_length"].as_u64().unwrap() as usize),
            truncation_mode: truncation(&c["truncation_mode"]),
            chat_template: c["chat_template"].as_bool().unwrap_or(false),
            ..Default::default()
        };
        let name = format!("{} {}", run["tokenizer"], c["name"]);
        chat_runs += usize::from(cfg.chat_template);
        assert_eq!(tk.pad, run["pad"].as_u64().unwrap() as u32, "{name}");
        let got = tokenize::tokenize_pairs(&tk, &pairs, &cfg).unwrap();
        assert!(got.dropped.is_empty());
        let rows = run["rows"].as_array().unwrap();
        assert_eq!(got.pairs.len(), rows.len());
        for (i, (g, want)) in got.pairs.iter().zip(rows).enumerate() {
            assert_eq!(
                g.prompt,
                ids(&want["prompt_input_ids"]),
                "{name} row {i} prompt"
            );
            for (k, key) in ["chosen", "rejected"].iter().enumerate() {
                let full = ids(&want[format!("{key}_input_ids")]);
                let labels = ints(&want[format!("{key}_labels")]);
                let n_prompt = labels.iter().filter(|&&l| l == -100).count();
                let s = &g.seqs[k];
                assert_eq!(s.prompt, full[..n_prompt], "{name} row {i} {key} prompt");
                assert_eq!(
                    s.completion,
                    full[n_prompt..],
                    "{name} row {i} {key} completion"
                );
                if s.prompt.len() != g.prompt.len() {
                    merged_prompts += 1;
                }
            }
            truncated += usize::from(g.truncated);
        }
        if cfg.chat_template {
            continue;
        }
        // The collated batch of the first four pairs, TRL's model input.
        let first: Vec<_> = got.pairs.iter().take(4).collect();
        let b = tokenize::collate_pairs(&first, tk.pad, Layout::Right).unwrap();
        let want = &run["batch_of_first_4"];
        let want_ids: Vec<Vec<u32>> = want["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(ids)
            .collect();
        assert_eq!(b.rows, 8);
        assert_eq!(b.seq_len, want_ids[0].len(), "{name} batch width");
        for r in 0..8 {
            assert_eq!(b.row_ids(r), want_ids[r].as_slice(), "{name} batch row {r}");
            let am = ints(&want["attention_mask"][r]);
            let lm: Vec<i64> = ints(&want["labels"][r])
                .iter()
                .map(|&l| i64::from(l != -100))
                .collect();
            let row = r * b.seq_len..(r + 1) * b.seq_len;
            let got_am: Vec<i64> = b.attention_mask[row.clone()]
                .iter()
                .map(|&x| i64::from(x))
                .collect();
            let got_lm: Vec<i64> = b.loss_mask[row].iter().map(|&x| i64::from(x)).collect();
            assert_eq!(got_am, am, "{name} attention row {r}");
            assert_eq!(got_lm, lm, "{name} loss mask row {r}");
        }
    }
    // The fixture must exercise the merge rule and truncation, or this test proves little.
    assert!(
        merged_prompts > 0,
        "no case where a prompt token merged into the completion"
    );
    assert!(truncated > 0, "no case was truncated");
    assert_eq!(chat_runs, 2, "one chat-template run per tokenizer");
}

/// TRL 1.16.0 `DPOTrainer._prepare_dataset` rows (dropped rows absent) and
/// `DataCollatorForPreference` batches of the first four kept rows.
#[test]
fn current_matches_trl_1_16() {
    let fx = load("current.json");
    assert_eq!(fx["trl"], "1.16.0");
    let pairs = pairs(&fx["cases"]);
    let mut dropped_total = 0;
    let mut chat_runs = 0;
    for run in fx["runs"].as_array().unwrap() {
        let tk = tok(run["tokenizer"].as_str().unwrap());
        let c = &run["config"];
        let cfg = TokenizeConfig {
            max_length: Some(c["max_length"].as_u64().unwrap() as usize),
            truncation_mode: truncation(&c["truncation_mode"]),
            drop_too_long: true,
            chat_template: c["chat_template"].as_bool().unwrap_or(false),
            ..TokenizeConfig::trl_current()
        };
        let name = format!("{} {}", run["tokenizer"], c["name"]);
        chat_runs += usize::from(cfg.chat_template);
        let got = tokenize::tokenize_pairs(&tk, &pairs, &cfg).unwrap();
        let rows = run["rows"].as_array().unwrap();
        let kept: Vec<usize> = rows
            .iter()
            .map(|r| r["idx"].as_u64().unwrap() as usize)
            .collect();
        let want_dropped: Vec<String> = (0..pairs.len())
            .filter(|i| !kept.contains(i))
            .map(|i| pairs[i].id.clone())
            .collect();
        assert_eq!(got.dropped, want_dropped, "{name} dropped");
        dropped_total += want_dropped.len();
        // TRL truncates in the collator; here truncation happens at tokenisation, so compare the
        // untruncated split with TRL's rows and the truncated sequences with TRL's batch.
        let untruncated = TokenizeConfig {
            max_length: None,
            ..cfg.clone()
        };
        let full = tokenize::tokenize_pairs(&tk, &pairs, &untruncated).unwrap();
        for (want, &i) in rows.iter().zip(&kept) {
            let g = &full.pairs[i];
            assert_eq!(g.prompt, ids(&want["prompt_ids"]), "{name} row {i} prompt");
            assert_eq!(
                g.seqs[0].completion,
                ids(&want["chosen_ids"]),
                "{name} row {i} chosen"
            );
            assert_eq!(
                g.seqs[1].completion,
                ids(&want["rejected_ids"]),
                "{name} row {i} rejected"
            );
        }
        if cfg.chat_template {
            continue;
        }
        let first: Vec<_> = got.pairs.iter().take(4).collect();
        let b = tokenize::collate_pairs(&first, tk.pad, Layout::Right).unwrap();
        let want = &run["batch_of_first_4"];
        let want_ids: Vec<Vec<u32>> = want["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(ids)
            .collect();
        assert_eq!(b.seq_len, want_ids[0].len(), "{name} batch width");
        for r in 0..8 {
            assert_eq!(b.row_ids(r), want_ids[r].as_slice(), "{name} batch row {r}");
            let row = r * b.seq_len..(r + 1) * b.seq_len;
            let am: Vec<i64> = b.attention_mask[row.clone()]
                .iter()
                .map(|&x| i64::from(x))
                .collect();
            let lm: Vec<i64> = b.loss_mask[row].iter().map(|&x| i64::from(x)).collect();
            assert_eq!(
                am,
                ints(&want["attention_mask"][r]),
                "{name} attention row {r}"
            );
            assert_eq!(
                lm,
                ints(&want["completion_mask"][r]),
                "{name} completion row {r}"
            );
        }
    }
    assert!(
        dropped_total > 0,
        "the fixture must include prompts that fill max_length"
    );
    assert_eq!(chat_runs, 2, "one conversational run per tokenizer");
}

/// Without `drop_too_long`, a prompt that fills `max_length` is an error naming dataset, row, field.
#[test]
fn current_too_long_prompt_is_an_error_naming_the_row() {
    let fx = load("current.json");
    let pairs = pairs(&fx["cases"]);
    let tk = tok("bytelevel");
    let cfg = TokenizeConfig {
        max_length: Some(40),
        ..TokenizeConfig::trl_current()
    };
    let err = tokenize::tokenize_pairs(&tk, &pairs, &cfg)
        .unwrap_err()
        .to_string();
    assert!(err.contains("fixture, row 1"), "{err}");
    assert!(err.contains("`prompt`"), "{err}");
    assert!(err.contains("max_length = 40"), "{err}");
}

/// The prompt-left layout holds the same tokens as TRL's right-padded rows, moved so that every
/// completion starts at column `prompt_cols`.
#[test]
fn prompt_left_layout_aligns_completions() {
    let fx = load("classic.json");
    let pairs = pairs(&fx["cases"]);
    let tk = tok("metaspace");
    let got = tokenize::tokenize_pairs(&tk, &pairs, &TokenizeConfig::default()).unwrap();
    let all: Vec<_> = got.pairs.iter().collect();
    let left = tokenize::collate_pairs(&all, tk.pad, Layout::PromptLeft).unwrap();
    let right = tokenize::collate_pairs(&all, tk.pad, Layout::Right).unwrap();
    let n = all.len();
    for r in 0..2 * n {
        let s = &all[r % n].seqs[r / n];
        let row = left.row_ids(r);
        let start = left.prompt_cols - s.prompt.len();
        assert!(row[..start].iter().all(|&t| t == tk.pad));
        assert_eq!(&row[start..left.prompt_cols], s.prompt.as_slice());
        assert_eq!(
            &row[left.prompt_cols..left.prompt_cols + s.completion.len()],
            s.completion.as_slice()
        );
        let lm = &left.loss_mask[r * left.seq_len..(r + 1) * left.seq_len];
        assert_eq!(
            lm.iter().map(|&x| x as usize).sum::<usize>(),
            s.completion.len()
        );
        assert_eq!(
            lm[left.prompt_cols], 1,
            "the first completion token is at prompt_cols"
        );
        let am = &left.attention_mask[r * left.seq_len..(r + 1) * left.seq_len];
        assert_eq!(am.iter().map(|&x| x as usize).sum::<usize>(), s.len());
        // Same real tokens as the right-padded row.
        let real_right: Vec<u32> = right.row_ids(r)[..s.len()].to_vec();
        let real_left: Vec<u32> = row[start..start + s.len()].to_vec();
        assert_eq!(real_left, real_right);
    }
}

/// Chat templates render exactly as `transformers`' `apply_chat_template(tokenize=False)`.
#[test]
fn chat_templates_match_transformers() {
    let fx = load("chat.json");
    let cases = fx["cases"].as_array().unwrap();
    assert!(cases.len() >= 8);
    for c in cases {
        let tk = tok(c["tokenizer"].as_str().unwrap());
        let tmpl = tk.chat_template.as_ref().unwrap();
        let msgs: Vec<Message> = c["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        let got = tmpl
            .render(&msgs, c["add_generation_prompt"].as_bool().unwrap())
            .unwrap();
        assert_eq!(got, c["text"].as_str().unwrap(), "{c}");
    }
}

/// A template that raises (roles not alternating) gives a clear error, not a panic.
#[test]
fn chat_template_raise_exception_is_an_error() {
    let tk = tok("metaspace");
    let tmpl = tk.chat_template.as_ref().unwrap();
    let err = tmpl
        .render(&[Message::new("assistant", "x")], false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("alternate"), "{err}");
}

/// The built-in byte-level tokenizer: one token per byte, BOS with special tokens, lossless.
#[test]
fn byte_level_tokenizer_is_one_token_per_byte() {
    let tk = Tok::byte_level().unwrap();
    let text = "Hi é 中 🙂\n";
    let with = tk.encode(text, true).unwrap();
    let without = tk.encode(text, false).unwrap();
    assert_eq!(with[0], 1);
    assert_eq!(&with[1..], without.as_slice());
    let want: Vec<u32> = text.bytes().map(|b| u32::from(b) + 3).collect();
    assert_eq!(without, want);
    assert_eq!(tk.decode(&without, true).unwrap(), text);
    // EOS as text is the EOS token.
    assert_eq!(
        tk.encode("a</s>", false).unwrap(),
        vec![u32::from(b'a') + 3, 2]
    );
    // Saved and reloaded, it is the same tokenizer.
    let dir = tempfile::tempdir().unwrap();
    tk.save_dir(dir.path()).unwrap();
    let back = Tok::from_dir(dir.path()).unwrap();
    assert_eq!(back.encode(text, true).unwrap(), with);
    assert_eq!((back.bos, back.eos, back.pad), (Some(1), 2, 0));
}

/// Multiple-choice items and SFT text follow the same rules: MC choices get no EOS by default,
/// each choice is a row, and SFT text is BOS + text + EOS with loss on all but BOS.
#[test]
fn mc_and_sft_tokenisation() {
    use reprpo_data::McItem;
    let tk = Tok::byte_level().unwrap();
    let item = McItem {
        id: "m/1".into(),
        prompt: "Q:".into(),
        choices: vec![" a".into(), " bb".into(), " c".into()],
        correct: vec![1],
        source: SourceMeta::default(),
    };
    let cfg = TokenizeConfig::default();
    let groups = tokenize::tokenize_mc(&tk, &[item.clone(), item], &cfg).unwrap();
    let g: Vec<_> = groups.iter().map(|g| g.as_ref().unwrap()).collect();
    let b = |s: &str| s.bytes().map(|x| u32::from(x) + 3).collect::<Vec<u32>>();
    assert_eq!(g[0].seqs[1].prompt, [vec![1], b("Q:")].concat());
    assert_eq!(g[0].seqs[1].completion, b(" bb"));
    let (batch, index) = tokenize::collate_mc(&g, tk.pad, Layout::PromptLeft);
    assert_eq!(batch.rows, 6);
    assert_eq!(index[4], (1, 1));
    assert_eq!(batch.seq_len, 3 + 3);
    let sft = tokenize::tokenize_sft(&tk, &["hey"], &cfg).unwrap();
    assert_eq!(sft[0].prompt, vec![1]);
    assert_eq!(sft[0].completion, [b("hey"), vec![2]].concat());
}
