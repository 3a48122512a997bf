//! Bad inputs: every error's message names the file, the row and the field where there is one.

// Test helpers outside #[test] functions panic on purpose, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::path::{Path, PathBuf};

use reprpo_data::{ConvertOptions, Converter, DataError, convert, read_table};

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn opts() -> ConvertOptions {
    ConvertOptions {
        dataset: "bad".into(),
        seed: 0,
    }
}

/// Read `bytes` as file `name` and run `converter`; the error it must end in, as text.
fn error_of(converter: &str, name: &str, bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), name, bytes);
    let result =
        read_table(&path).and_then(|t| convert(converter.parse::<Converter>()?, &t, &opts()));
    match result {
        Ok(out) => panic!("{name}: expected an error, got {out:?}"),
        Err(e) => e.to_string(),
    }
}

fn assert_has(err: &str, parts: &[&str]) {
    for part in parts {
        assert!(err.contains(part), "{err:?} lacks {part:?}");
    }
}

const GOOD_PAIR: &str = r#"{"prompt": "p", "chosen": "c", "rejected": "r"}"#;

#[test]
fn malformed_json_array() {
    let text = "[\n{\"prompt\": \"p\", \"chosen\": \"c\", \"rejected\": \"r\"},\n{\"prompt\": \"x\", \"chosen\": }\n]";
    let err = error_of("pairs", "broken.json", text.as_bytes());
    // A JSON document that does not parse has no row; the message gives its line instead.
    assert_has(&err, &["broken.json", "malformed JSON", "line 3"]);
}

#[test]
fn malformed_jsonl_line_3() {
    let text = format!("{GOOD_PAIR}\n{GOOD_PAIR}\n{{\"prompt\": \"p\", \n{GOOD_PAIR}\n");
    let err = error_of("pairs", "broken.jsonl", text.as_bytes());
    assert_has(&err, &["broken.jsonl", "row 3", "malformed JSONL"]);
}

#[test]
fn malformed_csv_wrong_field_count() {
    let text = "prompt,chosen,rejected\np,c,r\np2,c2\n";
    let err = error_of("pairs", "broken.csv", text.as_bytes());
    assert_has(&err, &["broken.csv", "row 2", "malformed CSV"]);
}

#[test]
fn corrupt_parquet() {
    let err = error_of(
        "pairs",
        "garbage.parquet",
        b"this is not a parquet file at all, just some bytes",
    );
    assert_has(&err, &["garbage.parquet", "malformed Parquet"]);
}

#[test]
fn missing_column() {
    let text = "{\"chosen\": \"\\n\\nHuman: a\\n\\nAssistant: b\"}\n";
    let err = error_of("hh-rlhf", "no_rejected.jsonl", text.as_bytes());
    assert_has(
        &err,
        &["no_rejected.jsonl", "row 1", "field `rejected`", "missing"],
    );
}

#[test]
fn mistyped_column() {
    let text = format!("{GOOD_PAIR}\n{{\"prompt\": 5, \"chosen\": \"c\", \"rejected\": \"r\"}}\n");
    let err = error_of("pairs", "typed.jsonl", text.as_bytes());
    assert_has(
        &err,
        &[
            "typed.jsonl",
            "row 2",
            "field `prompt`",
            "expected a string, found a number",
        ],
    );
}

#[test]
fn empty_prompt() {
    let text =
        format!("{GOOD_PAIR}\n{{\"prompt\": \"  \", \"chosen\": \"c\", \"rejected\": \"r\"}}\n");
    let err = error_of("pairs", "empty_prompt.jsonl", text.as_bytes());
    assert_has(
        &err,
        &["empty_prompt.jsonl", "row 2", "field `prompt`", "empty"],
    );
}

#[test]
fn empty_completion() {
    let text = "{\"prompt\": \"p\", \"chosen\": \"\", \"rejected\": \"r\"}\n";
    let err = error_of("pairs", "empty_chosen.jsonl", text.as_bytes());
    assert_has(
        &err,
        &["empty_chosen.jsonl", "row 1", "field `chosen`", "empty"],
    );
}

#[test]
fn empty_text_is_named_by_every_converter() {
    // (converter, file name, contents, field that is empty, row)
    let cases: &[(&str, &str, &str, &str, &str)] = &[
        (
            "mc",
            "mc.jsonl",
            r#"{"prompt": "", "choices": ["a"], "correct": [0]}"#,
            "`prompt`",
            "row 1",
        ),
        (
            "helpsteer",
            "hs.jsonl",
            r#"{"prompt": "p", "response": " ", "helpfulness": 1, "correctness": 1, "coherence": 1, "complexity": 1, "verbosity": 1}"#,
            "`response`",
            "row 1",
        ),
        (
            "helpsteer-score-random",
            "hs.jsonl",
            r#"{"prompt": "", "response": "x", "helpfulness": 1, "correctness": 1, "coherence": 1, "complexity": 1, "verbosity": 1}"#,
            "`prompt`",
            "row 1",
        ),
        (
            "helpsteer2-dpo",
            "h2.jsonl",
            r#"{"prompt": "p", "chosen_response": "c", "rejected_response": ""}"#,
            "`rejected_response`",
            "row 1",
        ),
        (
            "hh-rlhf",
            "hh.jsonl",
            r#"{"chosen": "", "rejected": "x"}"#,
            "`chosen`",
            "row 1",
        ),
        (
            "shp",
            "shp.jsonl",
            r#"{"history": "h", "human_ref_A": "", "human_ref_B": "b", "labels": 1, "score_A": 1, "score_B": 0}"#,
            "`human_ref_A`",
            "row 1",
        ),
        (
            "genies",
            "g.json",
            r#"[{"prompt": "p", "responses": {"": 1.0, "b": 0.0}}]"#,
            "`responses`",
            "row 1",
        ),
        (
            "truthfulqa-mc1",
            "t.json",
            r#"[{"question": "", "mc1_targets": {"a": 1}}]"#,
            "`question`",
            "row 1",
        ),
        (
            "truthfulqa-mc2",
            "t.json",
            r#"[{"question": "q", "mc2_targets": {"choices": ["a", ""], "labels": [1, 0]}}]"#,
            "`mc2_targets.choices[1]`",
            "row 1",
        ),
        (
            "sycophancy",
            "s.jsonl",
            r#"{"prompt": "p", "corrects": [" (A)"], "incorrects": [""]}"#,
            "`incorrects[0]`",
            "row 1",
        ),
    ];
    for (converter, name, text, field, row) in cases {
        let err = error_of(converter, name, text.as_bytes());
        assert_has(&err, &[name, row, field]);
    }
}

#[test]
fn non_utf8_in_jsonl_field() {
    let mut bytes = format!("{GOOD_PAIR}\n").into_bytes();
    bytes.extend_from_slice(b"{\"prompt\": \"p\", \"chosen\": \"caf\xe9\", \"rejected\": \"r\"}\n");
    let err = error_of("pairs", "latin1.jsonl", &bytes);
    assert_has(
        &err,
        &["latin1.jsonl", "row 2", "field `chosen`", "not valid UTF-8"],
    );
}

#[test]
fn non_utf8_in_csv_cell() {
    let mut bytes = b"prompt,chosen,rejected\np,c,r\n".to_vec();
    bytes.extend_from_slice(b"p2,c2,r\xff2\n");
    let err = error_of("pairs", "latin1.csv", &bytes);
    assert_has(
        &err,
        &["latin1.csv", "row 2", "field `rejected`", "not valid UTF-8"],
    );
}

#[test]
fn unknown_converter_name() {
    let err = "helpstear".parse::<Converter>().unwrap_err();
    assert!(matches!(err, DataError::Invalid(_)));
    let err = err.to_string();
    assert_has(
        &err,
        &[
            "unknown converter `helpstear`",
            "helpsteer-score-random",
            "sycophancy",
        ],
    );
}

#[test]
fn unknown_file_extension() {
    let err = error_of("pairs", "pairs.txt", GOOD_PAIR.as_bytes());
    assert_has(&err, &["pairs.txt", "unknown format"]);
}

#[test]
fn truncated_gzip() {
    let mut text = String::new();
    for i in 0..200 {
        text.push_str(&format!(
            "{{\"prompt\": \"prompt {i}\", \"chosen\": \"chosen {i}\", \"rejected\": \"rejected {i}\"}}\n"
        ));
    }
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(text.as_bytes()).unwrap();
    let gz = enc.finish().unwrap();
    // Sanity: the whole stream reads.
    let dir = tempfile::tempdir().unwrap();
    let whole = write(dir.path(), "whole.jsonl.gz", &gz);
    assert_eq!(read_table(&whole).unwrap().len(), 200);
    let err = error_of("pairs", "cut.jsonl.gz", &gz[..gz.len() / 2]);
    assert_has(&err, &["cut.jsonl.gz", "malformed gzip"]);
}

#[test]
fn hh_without_assistant_in_shared_prefix() {
    // The transcripts differ inside the first human turn, before any "\n\nAssistant:".
    let text = concat!(
        r#"{"chosen": "\n\nHuman: hi\n\nAssistant: yes", "rejected": "\n\nHuman: hi\n\nAssistant: no"}"#,
        "\n",
        r#"{"chosen": "\n\nHuman: hello\n\nAssistant: yes", "rejected": "\n\nHuman: bye\n\nAssistant: no"}"#,
        "\n"
    );
    let err = error_of("hh-rlhf", "hh.jsonl", text.as_bytes());
    assert_has(&err, &["hh.jsonl", "row 2", "field `chosen`", "Assistant:"]);
}

#[test]
fn truthfulqa_bad_targets() {
    let cases: &[(&str, &str, &str)] = &[
        // Missing target set.
        (
            r#"[{"question": "q", "mc2_targets": {"a": 1}}]"#,
            "`mc1_targets`",
            "missing",
        ),
        // Lengths differ (hub layout).
        (
            r#"[{"question": "q", "mc1_targets": {"choices": ["a", "b"], "labels": [1]}}]"#,
            "`mc1_targets.labels`",
            "1 labels for 2 choices",
        ),
        // No label 1.
        (
            r#"[{"question": "q", "mc1_targets": {"a": 0, "b": 0}}]"#,
            "`mc1_targets`",
            "no answer has label 1",
        ),
        // MC1 with two.
        (
            r#"[{"question": "q", "mc1_targets": {"choices": ["a", "b"], "labels": [1, 1]}}]"#,
            "`mc1_targets`",
            "exactly one",
        ),
        // A label that is not 0/1.
        (
            r#"[{"question": "q", "mc1_targets": {"a": 1, "b": 2}}]"#,
            "`mc1_targets[\"b\"]`",
            "expected label 0 or 1",
        ),
    ];
    for (text, field, problem) in cases {
        let err = error_of("truthfulqa-mc1", "tqa.json", text.as_bytes());
        assert_has(&err, &["tqa.json", "row 1", field, problem]);
    }
}

#[test]
fn shp_bad_label() {
    let text = r#"{"history": "h", "human_ref_A": "a", "human_ref_B": "b", "labels": 2, "score_A": 1, "score_B": 0}"#;
    let err = error_of("shp", "shp.jsonl", text.as_bytes());
    assert_has(
        &err,
        &["shp.jsonl", "row 1", "field `labels`", "expected 0 or 1"],
    );
}

#[test]
fn helpsteer_attribute_out_of_range() {
    let text = concat!(
        r#"{"prompt": "p", "response": "a", "helpfulness": 1, "correctness": 1, "coherence": 1, "complexity": 1, "verbosity": 1}"#,
        "\n",
        r#"{"prompt": "p", "response": "b", "helpfulness": 5, "correctness": 1, "coherence": 1, "complexity": 1, "verbosity": 1}"#,
        "\n"
    );
    let err = error_of("helpsteer", "hs.jsonl", text.as_bytes());
    assert_has(
        &err,
        &["hs.jsonl", "row 2", "field `helpfulness`", "outside 0..=4"],
    );
}

#[test]
fn sycophancy_empty_corrects() {
    let text = r#"{"prompt": "p", "corrects": [], "incorrects": [" (A)"]}"#;
    let err = error_of("sycophancy", "s.jsonl", text.as_bytes());
    assert_has(&err, &["s.jsonl", "row 1", "field `corrects`", "empty"]);
}
