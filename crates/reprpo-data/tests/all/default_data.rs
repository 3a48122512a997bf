//! Tests of the built-in default data: the committed files are exactly `generate(DEFAULT_SEED)`,
//! the splits are disjoint and shifted as documented, the limits hold, and the preference is
//! visible in the bytes of the completions (a property of the data, not of any model).
//!
//! Regenerate the committed files with
//! `REPRPO_REGENERATE=1 cargo test -p reprpo-data --test all default_data::`.

// Helpers outside `#[test]` functions may fail loudly too: this is test code.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

use reprpo_data::default_data::{
    self, DATASET_NAMES, DEFAULT_SEED, DefaultData, FILE_NAMES, MAX_COMPLETION_BYTES,
    MAX_PROMPT_BYTES, MC_LEN, OOD_LEN, OOD_TOPICS, TEST_LEN, TRAIN_LEN, TRAIN_PREFIXES,
    TRAIN_REQUESTS, TRAIN_TOPICS,
};
use reprpo_data::{McItem, PreferencePair};

/// A prompt and its longest completion fit in 120 bytes.
const _: () = assert!(MAX_PROMPT_BYTES + MAX_COMPLETION_BYTES <= 120);

fn default_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("embedded")
}

fn data() -> DefaultData {
    default_data::generate(DEFAULT_SEED)
}

#[test]
fn committed_files_equal_the_generator_byte_for_byte() {
    let dir = default_dir();
    let regenerate = std::env::var("REPRPO_REGENERATE").is_ok_and(|v| v == "1");
    if regenerate {
        default_data::write_all(&dir, DEFAULT_SEED).unwrap();
        println!("regenerated {}", dir.display());
    }
    let files = data().to_jsonl().unwrap();
    for (name, text) in &files {
        let on_disk = std::fs::read_to_string(dir.join(name)).unwrap();
        assert!(
            on_disk == *text,
            "crates/reprpo-data/embedded/{name} differs from generate(DEFAULT_SEED); regenerate with \
             REPRPO_REGENERATE=1 cargo test -p reprpo-data --test all default_data::"
        );
    }
    if regenerate {
        println!(
            "the embedded copies are compiled in: rerun without REPRPO_REGENERATE to check them"
        );
        return;
    }
    let embedded = [
        default_data::TRAIN_JSONL,
        default_data::TEST_JSONL,
        default_data::OOD_JSONL,
        default_data::MC_JSONL,
    ];
    for ((name, text), emb) in files.iter().zip(embedded) {
        assert!(emb == text, "embedded {name} differs from the generator");
    }
}

#[test]
fn embedded_parses_to_the_generated_data() {
    if std::env::var("REPRPO_REGENERATE").is_ok_and(|v| v == "1") {
        println!("skipped while regenerating: the embedded copies are stale until rebuilt");
        return;
    }
    assert_eq!(default_data::embedded().unwrap(), data());
}

#[test]
fn generation_is_deterministic_and_depends_on_the_seed() {
    assert_eq!(default_data::generate(7), default_data::generate(7));
    assert_ne!(
        default_data::generate(7).train,
        default_data::generate(8).train
    );
}

#[test]
fn sizes_ids_and_sources() {
    let d = data();
    assert_eq!(d.train.len(), TRAIN_LEN);
    assert_eq!(d.test.len(), TEST_LEN);
    assert_eq!(d.ood.len(), OOD_LEN);
    assert_eq!(d.mc.len(), MC_LEN);
    for (split, pairs) in [(0, &d.train), (1, &d.test), (2, &d.ood)] {
        for (i, p) in pairs.iter().enumerate() {
            assert_eq!(p.id, format!("{}/{}", DATASET_NAMES[split], i + 1));
            assert_eq!(p.source.dataset, DATASET_NAMES[split]);
            assert_eq!(p.source.row, i + 1);
        }
    }
    for (i, m) in d.mc.iter().enumerate() {
        assert_eq!(m.id, format!("default-mc/{}", i + 1));
        assert_eq!(m.source.dataset, "default-mc");
        assert_eq!(m.source.row, i + 1);
    }
    assert_eq!(
        FILE_NAMES,
        ["train.jsonl", "test.jsonl", "ood.jsonl", "mc.jsonl"]
    );
}

#[test]
fn prompts_are_unique_and_held_out_splits_are_disjoint_from_train() {
    let d = data();
    let train: BTreeSet<&str> = d.train.iter().map(|p| p.prompt.as_str()).collect();
    assert_eq!(train.len(), d.train.len(), "train prompts repeat");
    let test: BTreeSet<&str> = d.test.iter().map(|p| p.prompt.as_str()).collect();
    assert_eq!(test.len(), d.test.len(), "test prompts repeat");
    assert!(train.is_disjoint(&test));
    let mc: BTreeSet<&str> = d.mc.iter().map(|m| m.prompt.as_str()).collect();
    assert!(train.is_disjoint(&mc));
    assert!(test.is_disjoint(&mc));
    for p in d.train.iter().chain(&d.test) {
        assert!(p.prompt.starts_with("User: ") && p.prompt.ends_with("\nAssistant:"));
    }
}

/// The fixed text of each template (the pieces around `{t}`) that is long enough to identify it.
fn template_pieces(templates: &[&str]) -> Vec<String> {
    templates
        .iter()
        .flat_map(|t| t.split("{t}"))
        .map(|s| s.trim().to_string())
        .filter(|s| s.len() >= 4)
        .collect()
}

/// Sentences of a completion with the topic blanked out.
fn sentences(text: &str, topic_lists: &[&[&str]]) -> Vec<String> {
    let mut t = text.to_string();
    for list in topic_lists {
        // Longest first so that a topic inside another is not half-replaced.
        let mut topics: Vec<&str> = list.to_vec();
        topics.sort_by_key(|s| std::cmp::Reverse(s.len()));
        for topic in topics {
            t = t.replace(topic, "{t}");
        }
    }
    t.split_inclusive(['.', '!', '?'])
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

#[test]
fn ood_shares_no_format_template_topic_or_reply_sentence_with_train() {
    let d = data();
    // Topic lists: disjoint, and no topic inside another across the lists.
    for a in TRAIN_TOPICS {
        for b in OOD_TOPICS {
            let (a, b) = (a.to_lowercase(), b.to_lowercase());
            assert!(!a.contains(&b) && !b.contains(&a), "`{a}` / `{b}`");
        }
    }
    let pieces = template_pieces(TRAIN_REQUESTS);
    for p in &d.ood {
        let prompt = p.prompt.to_lowercase();
        assert!(!p.prompt.contains("User:") && !p.prompt.contains("Assistant:"));
        for topic in TRAIN_TOPICS {
            assert!(
                !prompt.contains(&topic.to_lowercase()),
                "{} has `{topic}`",
                p.prompt
            );
        }
        for piece in &pieces {
            assert!(
                !p.prompt.contains(piece.as_str()),
                "{} has `{piece}`",
                p.prompt
            );
        }
        for prefix in TRAIN_PREFIXES.iter().filter(|s| !s.is_empty()) {
            assert!(
                !p.prompt.contains(prefix.trim()),
                "{} has `{prefix}`",
                p.prompt
            );
        }
    }
    for p in &d.train {
        let prompt = p.prompt.to_lowercase();
        for topic in OOD_TOPICS {
            assert!(
                !prompt.contains(&topic.to_lowercase()),
                "{} has `{topic}`",
                p.prompt
            );
        }
    }
    let lists: &[&[&str]] = &[TRAIN_TOPICS, OOD_TOPICS];
    let train_sentences: BTreeSet<String> = d
        .train
        .iter()
        .flat_map(|p| [&p.chosen, &p.rejected])
        .flat_map(|c| sentences(c, lists))
        .collect();
    for p in &d.ood {
        for s in sentences(&p.chosen, lists)
            .into_iter()
            .chain(sentences(&p.rejected, lists))
        {
            assert!(
                !train_sentences.contains(&s),
                "OOD reply sentence `{s}` occurs in train"
            );
        }
    }
}

#[test]
fn every_mc_item_has_exactly_one_correct_among_distinct_choices() {
    let d = data();
    let mut positions = BTreeSet::new();
    for m in &d.mc {
        assert_eq!(m.correct.len(), 1, "{}", m.id);
        assert!(m.correct[0] < m.choices.len());
        assert!((3..=4).contains(&m.choices.len()), "{}", m.id);
        let distinct: BTreeSet<&String> = m.choices.iter().collect();
        assert_eq!(distinct.len(), m.choices.len(), "{}", m.id);
        positions.insert(m.correct[0]);
    }
    assert!(
        positions.len() >= 3,
        "the correct choice sits in too few positions"
    );
}

#[test]
fn chosen_differs_from_rejected_everywhere() {
    let d = data();
    for p in d.train.iter().chain(&d.test).chain(&d.ood) {
        assert_ne!(p.chosen, p.rejected, "{}", p.id);
    }
}

fn all_texts(d: &DefaultData) -> Vec<(&str, &str, bool)> {
    let mut out = Vec::new();
    for p in d.train.iter().chain(&d.test).chain(&d.ood) {
        out.push((p.id.as_str(), p.prompt.as_str(), true));
        out.push((p.id.as_str(), p.chosen.as_str(), false));
        out.push((p.id.as_str(), p.rejected.as_str(), false));
    }
    for m in &d.mc {
        out.push((m.id.as_str(), m.prompt.as_str(), true));
        for c in &m.choices {
            out.push((m.id.as_str(), c.as_str(), false));
        }
    }
    out
}

#[test]
fn lengths_fit_the_byte_limits_and_text_is_ascii() {
    let d = data();
    for (id, text, is_prompt) in all_texts(&d) {
        let max = if is_prompt {
            MAX_PROMPT_BYTES
        } else {
            MAX_COMPLETION_BYTES
        };
        assert!(text.len() <= max, "{id}: {} bytes: {text:?}", text.len());
        assert!(
            text.bytes()
                .all(|b| b == b'\n' || (0x20..0x7f).contains(&b)),
            "{id}: not printable ASCII: {text:?}"
        );
        if !is_prompt {
            assert!(
                text.starts_with(' ') && !text.contains('\n'),
                "{id}: {text:?}"
            );
        }
    }
}

/// A multinomial naive-Bayes classifier over the byte n-grams (n = 1 or 2) of a completion,
/// with add-one smoothing: positive class = chosen, negative = rejected.
struct NaiveBayes {
    n: usize,
    pos: HashMap<Vec<u8>, f64>,
    neg: HashMap<Vec<u8>, f64>,
    pos_total: f64,
    neg_total: f64,
    vocab: f64,
}

impl NaiveBayes {
    fn grams(&self, text: &str) -> Vec<Vec<u8>> {
        text.as_bytes()
            .windows(self.n)
            .map(<[u8]>::to_vec)
            .collect()
    }

    fn train(n: usize, pairs: &[PreferencePair]) -> NaiveBayes {
        let mut nb = NaiveBayes {
            n,
            pos: HashMap::new(),
            neg: HashMap::new(),
            pos_total: 0.0,
            neg_total: 0.0,
            vocab: 0.0,
        };
        for p in pairs {
            for g in nb.grams(&p.chosen) {
                *nb.pos.entry(g).or_default() += 1.0;
                nb.pos_total += 1.0;
            }
            for g in nb.grams(&p.rejected) {
                *nb.neg.entry(g).or_default() += 1.0;
                nb.neg_total += 1.0;
            }
        }
        let vocab: BTreeSet<&Vec<u8>> = nb.pos.keys().chain(nb.neg.keys()).collect();
        nb.vocab = vocab.len() as f64 + 1.0;
        nb
    }

    /// Log-odds that `text` is a chosen completion.
    fn score(&self, text: &str) -> f64 {
        self.grams(text)
            .iter()
            .map(|g| {
                let p =
                    (self.pos.get(g).copied().unwrap_or(0.0) + 1.0) / (self.pos_total + self.vocab);
                let q =
                    (self.neg.get(g).copied().unwrap_or(0.0) + 1.0) / (self.neg_total + self.vocab);
                (p / q).ln()
            })
            .sum()
    }

    /// Fraction of pairs whose chosen completion scores strictly higher than the rejected one.
    fn pair_accuracy(&self, pairs: &[PreferencePair]) -> f64 {
        let right = pairs
            .iter()
            .filter(|p| self.score(&p.chosen) > self.score(&p.rejected))
            .count();
        right as f64 / pairs.len() as f64
    }

    /// Fraction of MC items whose unique highest-scoring choice is the correct one.
    fn mc_accuracy(&self, items: &[McItem]) -> f64 {
        let right = items
            .iter()
            .filter(|m| {
                let scores: Vec<f64> = m.choices.iter().map(|c| self.score(c)).collect();
                let best = scores[m.correct[0]];
                scores
                    .iter()
                    .enumerate()
                    .all(|(i, &s)| i == m.correct[0] || s < best)
            })
            .count();
        right as f64 / items.len() as f64
    }
}

/// The preference is visible in the surface bytes: a naive-Bayes classifier over byte bigrams of
/// the completions alone, fitted on `train`, ranks chosen above rejected on held-out `test`,
/// on `ood` (no reply sentence in common with `train`) and on the MC items. This is a property of
/// the data (a tiny byte-level model has the signal available), not a claim about any model.
#[test]
fn byte_ngram_naive_bayes_separates_chosen_from_rejected() {
    let d = data();
    // The length baseline, for comparison: "the longer completion is the chosen one".
    let longer = |pairs: &[PreferencePair]| {
        pairs
            .iter()
            .filter(|p| p.chosen.len() > p.rejected.len())
            .count() as f64
            / pairs.len() as f64
    };
    println!(
        "longer-is-chosen baseline: train {:.3}, test {:.3}, ood {:.3}",
        longer(&d.train),
        longer(&d.test),
        longer(&d.ood)
    );
    for n in [1, 2] {
        let nb = NaiveBayes::train(n, &d.train);
        let (train, test, ood, mc) = (
            nb.pair_accuracy(&d.train),
            nb.pair_accuracy(&d.test),
            nb.pair_accuracy(&d.ood),
            nb.mc_accuracy(&d.mc),
        );
        println!(
            "byte {n}-gram naive Bayes: train {train:.3}, test {test:.3}, ood {ood:.3}, mc {mc:.3}"
        );
        if n == 2 {
            assert!(test > 0.9, "test accuracy {test}");
            assert!(ood > 0.7, "ood accuracy {ood}");
            assert!(mc > 0.9, "mc accuracy {mc}");
        }
    }
}

#[test]
fn write_all_writes_the_four_files_and_no_temporaries() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("nested/default");
    default_data::write_all(&target, 5).unwrap();
    let expected = default_data::generate(5).to_jsonl().unwrap();
    let mut names: Vec<String> = std::fs::read_dir(&target)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["mc.jsonl", "ood.jsonl", "test.jsonl", "train.jsonl"]
    );
    for (name, text) in expected {
        assert_eq!(std::fs::read_to_string(target.join(name)).unwrap(), text);
    }
    // Overwriting an existing file works too.
    default_data::write_all(&target, 6).unwrap();
    let again = default_data::generate(6).to_jsonl().unwrap();
    assert_eq!(
        std::fs::read_to_string(target.join("train.jsonl")).unwrap(),
        again[0].1
    );
}
