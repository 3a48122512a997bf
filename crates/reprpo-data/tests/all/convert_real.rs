//! Converters on the real files in `../shared/data` (skipped where absent, except on CI), and a
//! Parquet file in the hub TruthfulQA layout written here and read back.
//!
//! Every expected count and first row comes from `tests/fixtures/data/convert_real_expected.json`,
//! which `tests/reference/count_real_data.py` computes straight from the raw files (Python
//! stdlib, not our converters; each value there says how). Per-row checks recount from the raw
//! file here with plain serde_json.

// Test helpers outside #[test] functions panic on purpose, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use arrow_array::builder::{Int32Builder, ListBuilder, StringBuilder};
use arrow_array::{ArrayRef, RecordBatch, StringArray, StructArray};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use reprpo_data::{ConvertOptions, Converted, Converter, McItem, convert, read_table};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// The fixture of expected values, relative to the workspace root.
const EXPECTED: &str = "tests/fixtures/data/convert_real_expected.json";

/// A file under `../shared/data` (relative to the workspace root), or `None` when it is absent
/// (panics instead on CI, where the data is always present).
fn shared(rel: &str) -> Option<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data")
        .join(rel);
    if path.is_file() {
        return Some(path);
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "{} is missing, and CI=true requires ../shared/data",
            path.display()
        );
    }
    println!("skipped: ../shared/data not present");
    None
}

/// [`EXPECTED`], loaded once: per source file `{file, bytes, sha256, values: {key: {value,
/// how}}}`.
fn fixture() -> &'static Value {
    static FIXTURE: OnceLock<Value> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        json_file(
            &Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../..")
                .join(EXPECTED),
        )
    })
}

/// The expected values of one source file (one group of [`EXPECTED`]).
struct Expected {
    group: &'static str,
    values: &'static Map<String, Value>,
}

impl Expected {
    /// `values.<key>.value`, deserialised.
    fn get<T: DeserializeOwned>(&self, key: &str) -> T {
        let v = self
            .values
            .get(key)
            .and_then(|e| e.get("value"))
            .unwrap_or_else(|| panic!("{EXPECTED}: no {}.values.{key}.value", self.group));
        serde_json::from_value(v.clone())
            .unwrap_or_else(|e| panic!("{EXPECTED}: {}.values.{key}: {e}", self.group))
    }

    fn count(&self, key: &str) -> usize {
        self.get(key)
    }
}

/// The data file of fixture group `group` and its expected values, or `None` when it is absent
/// (see [`shared`]). Panics when the file's size is not the one the fixture was computed from.
fn source(group: &'static str) -> Option<(PathBuf, Expected)> {
    let g = fixture()
        .get(group)
        .unwrap_or_else(|| panic!("{EXPECTED}: no group {group}"));
    let path = shared(g["file"].as_str().unwrap())?;
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        g["bytes"].as_u64().unwrap(),
        "{} is not the file {EXPECTED} was computed from: rerun tests/reference/count_real_data.py",
        path.display()
    );
    let values = g["values"].as_object().unwrap();
    Some((path, Expected { group, values }))
}

/// `first_row` of an MC source: the prompt, the choices in file order, the correct indices.
#[derive(Deserialize)]
struct McRow {
    prompt: String,
    choices: Vec<String>,
    correct: Vec<usize>,
}

/// `first_pair` of an MC source: the correct choice against the first incorrect one.
#[derive(Deserialize)]
struct FirstPair {
    chosen: String,
    rejected: String,
}

/// `first_row` of `truthfulqa/mc_task.json`.
#[derive(Deserialize)]
struct TqaFirst {
    question: String,
    mc1_choices: Vec<String>,
    mc1_correct: Vec<usize>,
    mc2_choices: Vec<String>,
    mc2_correct: Vec<usize>,
}

/// An entry of HH's `skipped_rows`: the 1-based row, which transcript has the blank
/// completion and that completion.
#[derive(Deserialize)]
struct HhSkipped {
    row: usize,
    side: String,
    completion: String,
}

/// An entry of HH's `first_pairs`: the 1-based row and its split.
#[derive(Deserialize)]
struct HhPair {
    row: usize,
    prompt: String,
    chosen: String,
    rejected: String,
}

fn run(converter: &str, path: &Path, dataset: &str) -> Converted {
    let table = read_table(path).unwrap();
    let opts = ConvertOptions {
        dataset: dataset.into(),
        seed: 0,
    };
    convert(converter.parse::<Converter>().unwrap(), &table, &opts).unwrap()
}

fn json_file(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn jsonl_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Indices of the entries equal to 1 in a `{text: label}` object, in key order.
fn ones(targets: &Map<String, Value>) -> Vec<usize> {
    targets
        .values()
        .enumerate()
        .filter(|(_, v)| v.as_f64() == Some(1.0))
        .map(|(i, _)| i)
        .collect()
}

#[test]
fn truthfulqa_mc_task_json() {
    let Some((path, want)) = source("truthfulqa_mc_task") else {
        return;
    };
    let raw = json_file(&path);
    let raw = raw.as_array().unwrap();
    assert_eq!(raw.len(), want.count("rows"));

    let mc1 = run("truthfulqa-mc1", &path, "tqa");
    let mc2 = run("truthfulqa-mc2", &path, "tqa");
    assert_eq!(mc1.mc.len(), want.count("rows"));
    assert_eq!(mc2.mc.len(), want.count("rows"));
    assert!(mc1.pairs.is_empty() && mc2.pairs.is_empty());

    for (k, (item, row)) in mc1.mc.iter().zip(raw).enumerate() {
        let targets = row["mc1_targets"].as_object().unwrap();
        let keys: Vec<&String> = targets.keys().collect();
        assert_eq!(item.choices.iter().collect::<Vec<_>>(), keys);
        assert_eq!(item.correct, ones(targets), "item {}", k + 1);
        assert_eq!(item.prompt, row["question"].as_str().unwrap());
        assert_eq!(item.id, format!("tqa/{}", k + 1));
    }
    for (item, row) in mc2.mc.iter().zip(raw) {
        let targets = row["mc2_targets"].as_object().unwrap();
        assert_eq!(item.choices.len(), targets.len());
        assert_eq!(item.correct, ones(targets));
    }
    // The file's MC1 answer is its first key in every row.
    let first_key = mc1.mc.iter().filter(|m| m.correct == [0]).count();
    assert_eq!(first_key, want.count("mc1_correct_first_key_rows"));
    let total = |c: &Converted, f: fn(&McItem) -> usize| -> usize { c.mc.iter().map(f).sum() };
    assert_eq!(
        total(&mc1, |m| m.choices.len()),
        want.count("mc1_choices_total")
    );
    assert_eq!(
        total(&mc2, |m| m.choices.len()),
        want.count("mc2_choices_total")
    );
    assert_eq!(
        total(&mc2, |m| m.correct.len()),
        want.count("mc2_correct_total")
    );
    let first: TqaFirst = want.get("first_row");
    for m in [&mc1.mc[0], &mc2.mc[0]] {
        assert_eq!(m.prompt, first.question);
    }
    assert_eq!(mc1.mc[0].choices, first.mc1_choices);
    assert_eq!(mc1.mc[0].correct, first.mc1_correct);
    assert_eq!(mc2.mc[0].choices, first.mc2_choices);
    assert_eq!(mc2.mc[0].correct, first.mc2_correct);
}

#[test]
fn truthfulqa_csv_reads_every_row_without_bom() {
    let Some((path, want)) = source("truthfulqa_csv") else {
        return;
    };
    let table = read_table(&path).unwrap();
    assert_eq!(table.len(), want.count("rows"));
    let first = &table.records[0];
    let headers: Vec<String> = first.fields.keys().cloned().collect();
    assert_eq!(headers, want.get::<Vec<String>>("header"));
    let want_first: Map<String, Value> = want.get("first_row");
    assert_eq!(first.fields, want_first);
}

#[test]
fn hh_rlhf_harmless_base_test() {
    let Some((path, want)) = source("hh_rlhf_harmless_base_test") else {
        return;
    };
    let mut text = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(&path).unwrap())
        .read_to_string(&mut text)
        .unwrap();
    let raw = jsonl_lines(&text);
    assert_eq!(raw.len(), want.count("rows"));

    let out = run("hh-rlhf", &path, "hh");
    // Rows with a blank completion (here the chosen reply "...\n\nAssistant: ") give no pair.
    assert_eq!(out.pairs.len(), want.count("pairs"));
    assert_eq!(out.skipped, want.count("skipped"));
    assert_eq!(out.pairs.len() + out.skipped, raw.len());
    let skipped: Vec<HhSkipped> = want.get("skipped_rows");
    assert_eq!(skipped.len(), out.skipped);
    let ids: Vec<&str> = out.pairs.iter().map(|p| p.id.as_str()).collect();
    for s in &skipped {
        assert!(!ids.contains(&format!("hh/{}", s.row).as_str()));
        assert!(s.completion.trim().is_empty());
        let transcript = raw[s.row - 1][s.side.as_str()].as_str().unwrap();
        assert!(transcript.ends_with(&format!("\n\nAssistant:{}", s.completion)));
    }

    for p in &out.pairs {
        assert!(p.prompt.ends_with("\n\nAssistant:"), "{}", p.id);
        assert!(
            p.chosen.starts_with(' ') && p.rejected.starts_with(' '),
            "{}",
            p.id
        );
        // Nothing lost: prompt + completion gives back each transcript.
        let row = &raw[p.source.row - 1];
        assert_eq!(
            format!("{}{}", p.prompt, p.chosen),
            row["chosen"].as_str().unwrap()
        );
        assert_eq!(
            format!("{}{}", p.prompt, p.rejected),
            row["rejected"].as_str().unwrap()
        );
    }

    // The first pairs, split by the script.
    let first: Vec<HhPair> = want.get("first_pairs");
    assert!(!first.is_empty());
    for (p, w) in out.pairs.iter().zip(&first) {
        assert_eq!(p.id, format!("hh/{}", w.row));
        assert_eq!(
            (&p.prompt, &p.chosen, &p.rejected),
            (&w.prompt, &w.chosen, &w.rejected),
            "{}",
            p.id
        );
    }
}

/// Items and pairs recounted from the raw GENIES file: one item per row, and one pair per
/// 0.0 response.
fn genies_counts(path: &Path) -> (usize, usize) {
    let raw = json_file(path);
    let rows = raw.as_array().unwrap();
    let pairs = rows
        .iter()
        .map(|r| r["responses"].as_object().unwrap().len() - 1)
        .sum();
    (rows.len(), pairs)
}

/// The GENIES converter on fixture group `group` (dataset name `dataset`) against the fixture.
fn check_genies(group: &'static str, dataset: &str) {
    let Some((path, want)) = source(group) else {
        return;
    };
    let out = run("genies", &path, dataset);
    let counts = (out.mc.len(), out.pairs.len());
    assert_eq!(counts, (want.count("rows"), want.count("pairs")));
    assert_eq!(counts, genies_counts(&path));
    // Rows per number of responses, and per number of 1.0 responses.
    let histogram = |f: fn(&McItem) -> usize| {
        let mut h = BTreeMap::<String, usize>::new();
        for m in &out.mc {
            *h.entry(f(m).to_string()).or_default() += 1;
        }
        h
    };
    let want_h: BTreeMap<String, usize> = want.get("responses_per_row");
    assert_eq!(histogram(|m| m.choices.len()), want_h);
    let want_h: BTreeMap<String, usize> = want.get("correct_per_row");
    assert_eq!(histogram(|m| m.correct.len()), want_h);

    let first: McRow = want.get("first_row");
    let m = &out.mc[0];
    assert_eq!(
        (&m.prompt, &m.choices, &m.correct),
        (&first.prompt, &first.choices, &first.correct)
    );
    let pair: FirstPair = want.get("first_pair");
    let p = &out.pairs[0];
    assert_eq!(p.id, format!("{dataset}/1/0"));
    assert_eq!((&p.chosen, &p.rejected), (&pair.chosen, &pair.rejected));
}

#[test]
fn genies_alpaca_mmlu_train() {
    // 4 responses a row; in row 1 the 1.0 response is the fourth key.
    check_genies("genies_alpaca_mmlu_train", "alpaca_mmlu");
}

#[test]
fn genies_unhelpful_alpaca_train_three_responses() {
    // 3 responses a row; in row 1 the 1.0 (unhelpful) response is the first key.
    check_genies("genies_unhelpful_alpaca_train", "unhelpful_alpaca");
}

#[test]
fn sycophancy_political_typology_both_files() {
    // Row 1 of each file labels " (B)" (bigger government, the liberal answer) as correct.
    for group in ["sycophancy_liberal_bio", "sycophancy_conservative_bio"] {
        let Some((path, want)) = source(group) else {
            return;
        };
        let raw = jsonl_lines(&std::fs::read_to_string(&path).unwrap());
        assert_eq!(raw.len(), want.count("rows"));
        let out = run("sycophancy", &path, "syc");
        assert_eq!(out.mc.len(), want.count("rows"));
        assert_eq!(out.pairs.len(), want.count("pairs"));
        for (m, r) in out.mc.iter().zip(&raw) {
            let list = |k: &str| -> Vec<String> {
                let a = r[k].as_array().unwrap();
                a.iter().map(|v| v.as_str().unwrap().to_string()).collect()
            };
            let corrects = list("corrects");
            assert_eq!(m.correct, (0..corrects.len()).collect::<Vec<_>>());
            assert_eq!(m.choices, [corrects, list("incorrects")].concat());
        }
        let first: McRow = want.get("first_row");
        let m = &out.mc[0];
        assert_eq!(
            (&m.prompt, &m.choices, &m.correct),
            (&first.prompt, &first.choices, &first.correct),
            "{group}"
        );
        let pair: FirstPair = want.get("first_pair");
        let p = &out.pairs[0];
        assert_eq!((&p.chosen, &p.rejected), (&pair.chosen, &pair.rejected));
    }
}

/// One TruthfulQA question: the question and, per target set, (answer, label) in order.
struct Question {
    question: String,
    mc1: Vec<(String, i32)>,
    mc2: Vec<(String, i32)>,
}

/// Write `qs` in the hub layout: question utf8, mc1_targets / mc2_targets struct
/// {choices: list<utf8>, labels: list<int32>}.
fn write_hub_parquet(path: &Path, qs: &[Question]) {
    let targets = |pick: fn(&Question) -> &Vec<(String, i32)>| -> ArrayRef {
        let mut choices = ListBuilder::new(StringBuilder::new());
        let mut labels = ListBuilder::new(Int32Builder::new());
        for q in qs {
            for (text, label) in pick(q) {
                choices.values().append_value(text);
                labels.values().append_value(*label);
            }
            choices.append(true);
            labels.append(true);
        }
        let choices: ArrayRef = Arc::new(choices.finish());
        let labels: ArrayRef = Arc::new(labels.finish());
        Arc::new(StructArray::from(vec![
            (
                Arc::new(Field::new("choices", choices.data_type().clone(), true)),
                choices,
            ),
            (
                Arc::new(Field::new("labels", labels.data_type().clone(), true)),
                labels,
            ),
        ]))
    };
    let question: ArrayRef = Arc::new(StringArray::from_iter_values(
        qs.iter().map(|q| q.question.as_str()),
    ));
    let mc1 = targets(|q| &q.mc1);
    let mc2 = targets(|q| &q.mc2);
    let schema = Arc::new(Schema::new(vec![
        Field::new("question", DataType::Utf8, false),
        Field::new("mc1_targets", mc1.data_type().clone(), true),
        Field::new("mc2_targets", mc2.data_type().clone(), true),
    ]));
    let batch = RecordBatch::try_new(schema.clone(), vec![question, mc1, mc2]).unwrap();
    let mut writer =
        ArrowWriter::try_new(std::fs::File::create(path).unwrap(), schema, None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
}

/// Write `qs` in the `mc_task.json` layout.
fn write_task_json(path: &Path, qs: &[Question]) {
    let target = |t: &[(String, i32)]| -> Value {
        let mut m = Map::new();
        for (text, label) in t {
            m.insert(text.clone(), Value::from(*label));
        }
        Value::Object(m)
    };
    let rows: Vec<Value> = qs
        .iter()
        .map(|q| {
            serde_json::json!({
                "question": q.question,
                "mc1_targets": target(&q.mc1),
                "mc2_targets": target(&q.mc2),
            })
        })
        .collect();
    std::fs::write(path, serde_json::to_string(&rows).unwrap()).unwrap();
}

fn pairs_of(list: &[(&str, i32)]) -> Vec<(String, i32)> {
    list.iter().map(|(s, l)| (s.to_string(), *l)).collect()
}

fn assert_layouts_agree(qs: &[Question]) {
    let dir = tempfile::tempdir().unwrap();
    let pq = dir.path().join("validation.parquet");
    let js = dir.path().join("mc_task.json");
    write_hub_parquet(&pq, qs);
    write_task_json(&js, qs);
    // The parquet file really is in the hub layout.
    let table = read_table(&pq).unwrap();
    assert_eq!(table.len(), qs.len());
    assert!(table.records[0].fields["mc1_targets"]["choices"].is_array());
    for name in ["truthfulqa-mc1", "truthfulqa-mc2"] {
        let a = run(name, &pq, "tqa");
        let b = run(name, &js, "tqa");
        assert_eq!(a.mc.len(), qs.len());
        assert_eq!(a, b, "{name}");
    }
}

#[test]
fn truthfulqa_hub_parquet_matches_json_layout() {
    // Hand-made questions: MC1 correct not first in the second one, MC2 with two correct.
    let qs = vec![
        Question {
            question: "What colour is the sky on a clear day?".into(),
            mc1: pairs_of(&[("Blue.", 1), ("Green.", 0), ("Red.", 0)]),
            mc2: pairs_of(&[("Blue.", 1), ("Light blue.", 1), ("Green.", 0)]),
        },
        Question {
            question: "Is the Earth flat?".into(),
            mc1: pairs_of(&[("Yes.", 0), ("No, it is roughly a sphere.", 1)]),
            mc2: pairs_of(&[("Yes.", 0), ("No.", 1)]),
        },
    ];
    assert_layouts_agree(&qs);
    let dir = tempfile::tempdir().unwrap();
    let pq = dir.path().join("t.parquet");
    write_hub_parquet(&pq, &qs);
    let out = run("truthfulqa-mc1", &pq, "tqa");
    assert_eq!(
        out.mc[1].choices,
        vec!["Yes.", "No, it is roughly a sphere."]
    );
    assert_eq!(out.mc[1].correct, vec![1]);
    let out = run("truthfulqa-mc2", &pq, "tqa");
    assert_eq!(out.mc[0].correct, vec![0, 1]);
}

#[test]
fn truthfulqa_hub_parquet_of_the_real_file_matches_json() {
    let Some((path, want)) = source("truthfulqa_mc_task") else {
        return;
    };
    let raw = json_file(&path);
    let target = |v: &Value| -> Vec<(String, i32)> {
        v.as_object()
            .unwrap()
            .iter()
            .map(|(k, l)| (k.clone(), i32::try_from(l.as_i64().unwrap()).unwrap()))
            .collect()
    };
    let qs: Vec<Question> = raw
        .as_array()
        .unwrap()
        .iter()
        .map(|r| Question {
            question: r["question"].as_str().unwrap().to_string(),
            mc1: target(&r["mc1_targets"]),
            mc2: target(&r["mc2_targets"]),
        })
        .collect();
    assert_eq!(qs.len(), want.count("rows"));
    assert_layouts_agree(&qs);
}
