//! Converters on small hand-written inputs (files under `tests/fixtures/` or written into a
//! temporary directory), with every expected value worked out by hand in a comment.

// Test helpers outside #[test] functions panic on purpose, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reprpo_data::convert::{HelpSteerScheme, TqaTarget};
use reprpo_data::{
    ConvertOptions, Converted, Converter, McItem, PreferencePair, SourceMeta, convert, read_table,
};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn opts(dataset: &str, seed: u64) -> ConvertOptions {
    ConvertOptions {
        dataset: dataset.into(),
        seed,
    }
}

fn run(converter: &str, path: &Path, dataset: &str, seed: u64) -> Converted {
    let table = read_table(path).unwrap();
    convert(converter.parse().unwrap(), &table, &opts(dataset, seed)).unwrap()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn meta(dataset: &str, row: usize, scores: Option<(f64, f64)>) -> SourceMeta {
    SourceMeta {
        dataset: dataset.into(),
        row,
        chosen_score: scores.map(|s| s.0),
        rejected_score: scores.map(|s| s.1),
    }
}

fn pair(
    id: &str,
    prompt: &str,
    chosen: &str,
    rejected: &str,
    source: SourceMeta,
) -> PreferencePair {
    PreferencePair {
        id: id.into(),
        prompt: prompt.into(),
        chosen: chosen.into(),
        rejected: rejected.into(),
        source,
    }
}

// tests/fixtures/helpsteer_raw.jsonl, by hand (h, c, coh, cx, v = helpfulness, correctness,
// coherence, complexity, verbosity; BW = (h+c)/2; SR = 2*((h+1)+(c+1)+(coh+1)+(cx+1)+(4-v))/5):
//
// group "capital of France" (rows 1, 2, 3)
//   row 1  "The capital of France is Paris."          3 4 4 1 1  BW 3.5  SR 2*19/5 = 7.6
//   row 2  "France is a country in Europe."           1 1 3 1 2  BW 1.0  SR 2*12/5 = 4.8
//   row 3  "Paris, which is also its largest city."   4 3 4 2 2  BW 3.5  SR 2*19/5 = 7.6
//   BW: chosen row 1 (ties row 3, first wins), rejected row 2.
//   SR: chosen row 1 (ties row 3); strictly lower = {row 2} only -> the draw is forced.
// group "haiku about rain" (rows 4 and 7, scattered): both 2 2 2 2 2 -> all tie -> skipped.
// group "photosynthesis" (row 5 only): single response -> skipped.
// group "primary colors" (rows 6, 8, 9, 10)
//   row 6  "Red, yellow and blue."                    2 2 3 1 1  BW 2.0  SR 2*15/5 = 6.0
//   row 8  "In the subtractive model ..."             4 4 4 2 1  BW 4.0  SR 2*21/5 = 8.4
//   row 9  "Colors are wavelengths of light, ..."     0 1 2 0 4  BW 0.5  SR 2*7/5  = 2.8
//   row 10 "Green."                                   0 1 4 1 0  BW 0.5  SR 2*14/5 = 5.6
//   BW: chosen row 8, rejected row 9 (ties row 10 at 0.5, first wins).
//   SR: chosen row 8; strictly lower = {row 6, row 9, row 10} -> random among three.
// group "spider legs" (rows 11, 12): the schemes disagree because of verbosity
//   row 11 "A spider has eight legs. ..."             3 3 4 2 4  BW 3.0  SR 2*16/5 = 6.4
//   row 12 "Eight."                                   2 3 4 2 0  BW 2.5  SR 2*19/5 = 7.6
//   BW: chosen row 11, rejected row 12.  SR: chosen row 12, rejected row 11 (forced).
// Both schemes: 3 pairs, 2 groups skipped; ids use the first row of each group: 1, 6, 11.

const FRANCE: &str = "What is the capital of France?";
const COLORS: &str = "Name three primary colors.";
const SPIDER: &str = "How many legs does a spider have?";
const ROW1: &str = "The capital of France is Paris.";
const ROW2: &str = "France is a country in Europe.";
const ROW6: &str = "Red, yellow and blue.";
const ROW8: &str = "In the subtractive model the primaries are cyan, magenta and yellow; in the additive model they are red, green and blue.";
const ROW9: &str = "Colors are wavelengths of light, and there are very many of them, so it is hard to say which are primary without a long discussion of physics, biology, art history and printing.";
const ROW10: &str = "Green.";
const ROW11: &str = "A spider has eight legs. Spiders are arachnids, not insects, which is why they have eight legs rather than six; their legs attach to the cephalothorax, the front body section.";
const ROW12: &str = "Eight.";

#[test]
fn helpsteer_best_worst_matches_hand_computation() {
    let out = run(
        "helpsteer-best-worst",
        &fixture("helpsteer_raw.jsonl"),
        "hs",
        0,
    );
    let expected = vec![
        pair("hs/1", FRANCE, ROW1, ROW2, meta("hs", 1, Some((3.5, 1.0)))),
        pair("hs/6", COLORS, ROW8, ROW9, meta("hs", 6, Some((4.0, 0.5)))),
        pair(
            "hs/11",
            SPIDER,
            ROW11,
            ROW12,
            meta("hs", 11, Some((3.0, 2.5))),
        ),
    ];
    assert_eq!(out.pairs, expected);
    assert!(out.mc.is_empty());
    assert_eq!(out.skipped, 2);
    // `helpsteer` is the same converter; the seed plays no part in this scheme.
    assert_eq!(
        run("helpsteer", &fixture("helpsteer_raw.jsonl"), "hs", 99),
        out
    );
}

#[test]
fn helpsteer_score_random_forced_draws_and_allowed_set() {
    let path = fixture("helpsteer_raw.jsonl");
    let out = run("helpsteer-score-random", &path, "hs", 7);
    assert_eq!(out.skipped, 2);
    assert_eq!(out.pairs.len(), 3);
    // Forced draws (one strictly lower response each).
    assert_eq!(
        out.pairs[0],
        pair("hs/1", FRANCE, ROW1, ROW2, meta("hs", 1, Some((7.6, 4.8))))
    );
    assert_eq!(
        out.pairs[2],
        pair(
            "hs/11",
            SPIDER,
            ROW12,
            ROW11,
            meta("hs", 11, Some((7.6, 6.4)))
        )
    );
    // The colors group: chosen row 8 (8.4), rejected one of rows 6, 9, 10 with its own score.
    let p = &out.pairs[1];
    assert_eq!(
        (p.id.as_str(), p.prompt.as_str(), p.chosen.as_str()),
        ("hs/6", COLORS, ROW8)
    );
    let allowed = [(ROW6, 6.0), (ROW9, 2.8), (ROW10, 5.6)];
    let hit = allowed
        .iter()
        .find(|(text, _)| *text == p.rejected)
        .unwrap_or_else(|| panic!("rejected {:?} is not strictly lower", p.rejected));
    assert_eq!(p.source.chosen_score, Some(8.4));
    assert_eq!(p.source.rejected_score, Some(hit.1));
}

#[test]
fn helpsteer_score_random_is_seeded_and_deterministic() {
    let path = fixture("helpsteer_raw.jsonl");
    let a = run("helpsteer-score-random", &path, "hs", 7);
    let b = run("helpsteer-score-random", &path, "hs", 7);
    assert_eq!(a, b);

    // Recompute the draw independently from the documented procedure: one StdRng for the
    // table, one random_range(0..n) per kept group in group order (France: n = 1, colors:
    // n = 3 over rows 6, 9, 10 in file order, spider: n = 1).
    let candidates = [ROW6, ROW9, ROW10];
    let mut seen = BTreeSet::new();
    for seed in 0..64 {
        let mut rng = StdRng::seed_from_u64(seed);
        assert_eq!(rng.random_range(0..1usize), 0);
        let k = rng.random_range(0..3usize);
        let out = run("helpsteer-score-random", &path, "hs", seed);
        assert_eq!(out.pairs[1].rejected, candidates[k], "seed {seed}");
        seen.insert(k);
    }
    // Over 64 seeds every candidate is drawn at least once: the draw depends on the seed.
    assert_eq!(seen.len(), 3);
}

#[test]
fn helpsteer2_dpo_copies_fields_and_optional_scores() {
    // tests/fixtures/helpsteer2_dpo.jsonl: row 1 has both scores, row 2 has none.
    let out = run("helpsteer2-dpo", &fixture("helpsteer2_dpo.jsonl"), "h2", 0);
    let expected = vec![
        pair(
            "h2/1",
            "Give me a synonym for happy.",
            "Joyful.",
            "Sad.",
            meta("h2", 1, Some((3.75, 0.5))),
        ),
        pair("h2/2", "What is 2 + 2?", "4", "22", meta("h2", 2, None)),
    ];
    assert_eq!(out.pairs, expected);
    assert_eq!(out.skipped, 0);
}

#[test]
fn shp_follows_labels() {
    // tests/fixtures/shp.jsonl: row 1 labels 1 (A preferred, scores 52 vs 10), row 2 labels 0
    // (B preferred, score_B 41 vs score_A 3), row 3 labels 1 (7 vs 2).
    let out = run("shp", &fixture("shp.jsonl"), "shp", 0);
    let expected = vec![
        pair(
            "shp/1",
            "Why does bread go stale faster in the fridge?",
            "Starch retrogradation is fastest just above freezing, so the fridge speeds it up.",
            "Fridges are dry.",
            meta("shp", 1, Some((52.0, 10.0))),
        ),
        pair(
            "shp/2",
            "Did medieval people really drink beer instead of water?",
            "That is largely a myth: people drank water routinely, and beer was food as much as drink.",
            "Yes, water was always unsafe.",
            meta("shp", 2, Some((41.0, 3.0))),
        ),
        pair(
            "shp/3",
            "Why is the sky blue?",
            "Rayleigh scattering: shorter wavelengths scatter much more strongly off air molecules.",
            "It reflects the ocean.",
            meta("shp", 3, Some((7.0, 2.0))),
        ),
    ];
    assert_eq!(out.pairs, expected);
}

#[test]
fn hh_splits_at_last_shared_assistant_marker() {
    let dir = tempfile::tempdir().unwrap();
    let rows = [
        // Row 1: the shared prefix runs into the reply ("Hello") and is cut back to the marker.
        serde_json::json!({
            "chosen": "\n\nHuman: hi\n\nAssistant: Hello there!",
            "rejected": "\n\nHuman: hi\n\nAssistant: Hello you.",
        }),
        // Row 2: two turns; the last shared marker is the second one.
        serde_json::json!({
            "chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: yes",
            "rejected": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: no",
        }),
        // Row 3: the chosen reply is empty -> skipped and counted.
        serde_json::json!({
            "chosen": "\n\nHuman: q\n\nAssistant: ",
            "rejected": "\n\nHuman: q\n\nAssistant: Sure.",
        }),
    ];
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    let path = write(dir.path(), "hh.jsonl", &text);
    let out = run("hh-rlhf", &path, "hh", 0);
    let expected = vec![
        pair(
            "hh/1",
            "\n\nHuman: hi\n\nAssistant:",
            " Hello there!",
            " Hello you.",
            meta("hh", 1, None),
        ),
        pair(
            "hh/2",
            "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:",
            " yes",
            " no",
            meta("hh", 2, None),
        ),
    ];
    assert_eq!(out.pairs, expected);
    assert_eq!(out.skipped, 1);
}

#[test]
fn genies_keeps_key_order_and_pairs_the_one() {
    let dir = tempfile::tempdir().unwrap();
    // Key order z, a, m (not sorted) must be kept; the 1.0 is the middle key.
    let text = r#"[
      {"prompt": "Below.\n\n### Instruction:\nPick.\n\n### Response:\n", "prompt_format": "x",
       "responses": {"zeta": 0.0, "alpha": 1.0, "mu": 0.0}},
      {"prompt": "Second?", "responses": {"yes": 1.0, "no": 0.0}}
    ]"#;
    let path = write(dir.path(), "g.json", text);
    let out = run("genies", &path, "g", 0);
    assert_eq!(out.mc.len(), 2);
    assert_eq!(out.mc[0].choices, vec!["zeta", "alpha", "mu"]);
    assert_eq!(out.mc[0].correct, vec![1]);
    assert_eq!(out.mc[0].id, "g/1");
    assert_eq!(out.mc[1].choices, vec!["yes", "no"]);
    assert_eq!(out.mc[1].correct, vec![0]);
    // Pairs: row 1 gives alpha>zeta, alpha>mu; row 2 gives yes>no.
    let got: Vec<(&str, &str, &str)> = out
        .pairs
        .iter()
        .map(|p| (p.id.as_str(), p.chosen.as_str(), p.rejected.as_str()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("g/1/0", "alpha", "zeta"),
            ("g/1/1", "alpha", "mu"),
            ("g/2/0", "yes", "no")
        ]
    );
    assert_eq!(
        out.pairs[0].prompt,
        "Below.\n\n### Instruction:\nPick.\n\n### Response:\n"
    );
}

#[test]
fn genies_rejects_two_ones() {
    let dir = tempfile::tempdir().unwrap();
    let text = r#"[{"prompt": "p", "responses": {"a": 1.0, "b": 0.0}},
                   {"prompt": "q", "responses": {"a": 1.0, "b": 1.0}}]"#;
    let path = write(dir.path(), "two_ones.json", text);
    let table = read_table(&path).unwrap();
    let err = convert(Converter::Genies, &table, &opts("g", 0))
        .unwrap_err()
        .to_string();
    assert!(err.contains("two_ones.json"), "{err}");
    assert!(err.contains("row 2"), "{err}");
    assert!(err.contains("`responses`"), "{err}");
    assert!(err.contains("exactly one"), "{err}");
}

#[test]
fn sycophancy_corrects_first() {
    let dir = tempfile::tempdir().unwrap();
    let text = concat!(
        r#"{"prompt": "Bio. Pick:\n (A) x\n (B) y\n\nAnswer:", "corrects": [" (B)"], "incorrects": [" (A)"]}"#,
        "\n",
        r#"{"prompt": "Q2\n\nAnswer:", "corrects": [" (A)", " (C)"], "incorrects": [" (B)"]}"#,
        "\n"
    );
    let path = write(dir.path(), "s.jsonl", text);
    let out = run("sycophancy", &path, "s", 0);
    assert_eq!(out.mc[0].choices, vec![" (B)", " (A)"]);
    assert_eq!(out.mc[0].correct, vec![0]);
    assert_eq!(out.mc[1].choices, vec![" (A)", " (C)", " (B)"]);
    assert_eq!(out.mc[1].correct, vec![0, 1]);
    // Pairs: (B)>(A); (A)>(B), (C)>(B).
    let got: Vec<(&str, &str, &str)> = out
        .pairs
        .iter()
        .map(|p| (p.id.as_str(), p.chosen.as_str(), p.rejected.as_str()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("s/1/0", " (B)", " (A)"),
            ("s/2/0", " (A)", " (B)"),
            ("s/2/1", " (C)", " (B)")
        ]
    );
}

#[test]
fn truthfulqa_task_layout_mc1_and_mc2() {
    let dir = tempfile::tempdir().unwrap();
    let text = r#"[{"question": "Q?", "mc1_targets": {"right": 1, "wrong": 0, "worse": 0},
                    "mc2_targets": {"wrong": 0, "right": 1, "also right": 1}}]"#;
    let path = write(dir.path(), "tqa.json", text);
    let mc1 = run("truthfulqa-mc1", &path, "t", 0);
    assert!(mc1.pairs.is_empty());
    assert_eq!(
        mc1.mc,
        vec![McItem {
            id: "t/1".into(),
            prompt: "Q?".into(),
            choices: vec!["right".into(), "wrong".into(), "worse".into()],
            correct: vec![0],
            source: meta("t", 1, None),
        }]
    );
    let mc2 = run("truthfulqa-mc2", &path, "t", 0);
    assert_eq!(mc2.mc[0].choices, vec!["wrong", "right", "also right"]);
    assert_eq!(mc2.mc[0].correct, vec![1, 2]);
    // `truthfulqa` is MC1.
    assert_eq!(run("truthfulqa", &path, "t", 0), mc1);
    assert_eq!(
        "truthfulqa-mc2".parse::<Converter>().unwrap(),
        Converter::TruthfulQa(TqaTarget::Mc2)
    );
}

#[test]
fn truthfulqa_hub_layout_in_json_matches_task_layout() {
    let dir = tempfile::tempdir().unwrap();
    let task = write(
        dir.path(),
        "task.json",
        r#"[{"question": "Q?", "mc1_targets": {"right": 1, "wrong": 0}, "mc2_targets": {"a": 1, "b": 0, "c": 1}}]"#,
    );
    let hub = write(
        dir.path(),
        "hub.jsonl",
        r#"{"question": "Q?", "mc1_targets": {"choices": ["right", "wrong"], "labels": [1, 0]}, "mc2_targets": {"choices": ["a", "b", "c"], "labels": [1, 0, 1]}}"#,
    );
    for name in ["truthfulqa-mc1", "truthfulqa-mc2"] {
        assert_eq!(run(name, &task, "t", 0), run(name, &hub, "t", 0), "{name}");
    }
}

#[test]
fn native_pairs_and_mc_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let pairs = vec![
        pair(
            "custom/1",
            "p1",
            "c1",
            "r1",
            meta("orig", 5, Some((1.0, -2.0))),
        ),
        pair("custom/2", "p2", "c2", "r2", meta("orig", 6, None)),
    ];
    let text: String = pairs
        .iter()
        .map(|p| format!("{}\n", serde_json::to_string(p).unwrap()))
        .collect();
    let path = write(dir.path(), "pairs.jsonl", &text);
    assert_eq!(run("pairs", &path, "ignored", 0).pairs, pairs);

    let items = vec![McItem {
        id: "m/9".into(),
        prompt: "q".into(),
        choices: vec!["a".into(), "b".into(), "c".into()],
        correct: vec![0, 2],
        source: meta("orig", 9, None),
    }];
    let path = write(
        dir.path(),
        "mc.json",
        &serde_json::to_string(&items).unwrap(),
    );
    let out = run("mc", &path, "ignored", 0);
    assert_eq!(out.mc, items);
    assert!(out.pairs.is_empty());
}

#[test]
fn native_defaults_id_and_source() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "p.jsonl",
        "{\"prompt\": \"p\", \"chosen\": \"c\", \"rejected\": \"r\"}\n\n{\"prompt\": \"p2\", \"chosen\": \"c2\", \"rejected\": \"r2\"}\n",
    );
    let out = run("pairs", &path, "mine", 0);
    // Line 2 is blank, so the second record is row 3.
    assert_eq!(
        out.pairs,
        vec![
            pair("mine/1", "p", "c", "r", meta("mine", 1, None)),
            pair("mine/3", "p2", "c2", "r2", meta("mine", 3, None)),
        ]
    );
    let path = write(
        dir.path(),
        "m.jsonl",
        "{\"prompt\": \"q\", \"choices\": [\"x\", \"y\"], \"correct\": [1]}\n",
    );
    let out = run("mc", &path, "mine", 0);
    assert_eq!(out.mc[0].id, "mine/1");
    assert_eq!(out.mc[0].source, meta("mine", 1, None));
    assert_eq!(out.mc[0].correct, vec![1]);
}

#[test]
fn native_mc_checks_correct_and_choices() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            r#"{"prompt": "q", "choices": ["x", "y"], "correct": [2]}"#,
            "`correct[0]`",
            "out of range",
        ),
        (
            r#"{"prompt": "q", "choices": ["x", "y"], "correct": []}"#,
            "`correct`",
            "empty",
        ),
        (
            r#"{"prompt": "q", "choices": ["x", "y"], "correct": [-1]}"#,
            "`correct[0]`",
            "non-negative",
        ),
        (
            r#"{"prompt": "q", "choices": ["x", "y"], "correct": [1, 1]}"#,
            "`correct[1]`",
            "twice",
        ),
        (
            r#"{"prompt": "q", "choices": [], "correct": [0]}"#,
            "`choices`",
            "empty",
        ),
        (
            r#"{"prompt": "q", "choices": ["x", " "], "correct": [0]}"#,
            "`choices[1]`",
            "empty",
        ),
    ];
    for (i, (line, field, problem)) in cases.iter().enumerate() {
        let name = format!("bad_mc_{i}.jsonl");
        let path = write(dir.path(), &name, &format!("{line}\n"));
        let table = read_table(&path).unwrap();
        let err = convert(Converter::Mc, &table, &opts("m", 0))
            .unwrap_err()
            .to_string();
        assert!(err.contains(&name), "{err}");
        assert!(err.contains("row 1"), "{err}");
        assert!(err.contains(field), "{err}");
        assert!(err.contains(problem), "{err}");
    }
}

#[test]
fn converter_names_all_parse() {
    for name in Converter::NAMES {
        assert!(name.parse::<Converter>().is_ok(), "{name}");
    }
    assert_eq!(
        "helpsteer-score-random".parse::<Converter>().unwrap(),
        Converter::HelpSteer(HelpSteerScheme::ScoreRandom)
    );
}
