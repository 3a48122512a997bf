//! The key lists of `cargo xtask eval --help` and `cargo xtask analyze --help`, generated from the config structs themselves: one
//! `key = default  # doc` line per key, the defaults from the structs' `Default` impls (through
//! serde, so they cannot drift), the doc from the first sentence of the field's `///` comment in
//! the struct's source (compiled into the binary with `include_str!`).

use std::collections::BTreeMap;

use reprpo_eval::EvalOptions;
use reprpo_train::TrainConfig;
use serde_json::Value;

const EVALUATE_RS: &str = include_str!("../../../crates/reprpo-eval/src/evaluate.rs");
const ANALYZE_RS: &str = include_str!("../../../crates/reprpo-eval/src/analyze/mod.rs");
const TOKENIZE_RS: &str = include_str!("../../../crates/reprpo-data/src/tokenize.rs");
const CONFIG_RS: &str = include_str!("../../../crates/reprpo-train/src/config.rs");

/// The first sentence of each field's `///` comment in `pub struct {name} {` of `src`.
fn field_docs(src: &str, name: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let head = format!("pub struct {name} {{");
    let mut lines = src
        .lines()
        .map(str::trim)
        .skip_while(|l| *l != head)
        .skip(1);
    let mut doc = Vec::new();
    for line in lines.by_ref().take_while(|l| *l != "}") {
        if let Some(d) = line.strip_prefix("///") {
            doc.push(d.trim().to_string());
        } else if let Some((field, _)) = line.strip_prefix("pub ").and_then(|f| f.split_once(':')) {
            out.insert(field.trim().to_string(), first_sentence(&doc.join(" ")));
            doc.clear();
        } else if !line.starts_with("#[") {
            doc.clear();
        }
    }
    out
}

/// Up to the first `. ` (the sentence's full stop kept out), or all of it; rustdoc links
/// (`` [`x`] ``) as plain code.
fn first_sentence(s: &str) -> String {
    let s = s.split_once(". ").map_or(s, |(a, _)| a);
    s.trim_end_matches('.')
        .replace("[`", "`")
        .replace("`]", "`")
}

/// `(dotted key, value)` for every leaf of `v`; values as JSON, `(unset)` for a missing one.
pub fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                flatten(&format!("{prefix}{k}."), x, out);
            }
        }
        Value::Null => out.push((prefix.trim_end_matches('.').into(), "(unset)".into())),
        other => out.push((prefix.trim_end_matches('.').into(), other.to_string())),
    }
}

/// The lines of one section: `key = default  # doc`, aligned.
fn section(title: &str, prefix: &str, v: &Value, doc: &dyn Fn(&str) -> Option<String>) -> String {
    let mut keys = Vec::new();
    flatten(prefix, v, &mut keys);
    let lhs: Vec<String> = keys.iter().map(|(k, x)| format!("{k} = {x}")).collect();
    let width = lhs.iter().map(String::len).max().unwrap_or(0);
    let mut s = format!("{title}:\n");
    for ((k, _), l) in keys.iter().zip(&lhs) {
        let d = doc(k.strip_prefix(prefix).unwrap_or(k)).unwrap_or_default();
        s.push_str(&format!("  {l:<width$}  # {d}\n"));
    }
    s
}

/// The key list of a job: the base model's keys, then the job's own options (`title`), whose
/// defaults are `opts` and whose docs are the fields of `pub struct {name}` in `src`
/// (`tokenize.*` from `TokenizeConfig`), then `tail`.
fn keys_help(title: &str, src: &str, name: &str, opts: Value, tail: &str) -> String {
    let model = field_docs(CONFIG_RS, "ModelConfig");
    let own = field_docs(src, name);
    let tok = field_docs(TOKENIZE_RS, "TokenizeConfig");
    let model_v = serde_json::to_value(TrainConfig::default().model).unwrap_or(Value::Null);
    let doc = |k: &str| match k.split_once('.') {
        Some(("tokenize", f)) => tok.get(f).cloned(),
        _ => own.get(k).cloned(),
    };
    format!(
        "Keys (key=value, after the options) with their defaults:\n\n{}\n{}\n{tail}",
        section(
            "Base model (model.*; default: the adapters' own base)",
            "model.",
            &model_v,
            &|k| model.get(k).cloned()
        ),
        section(title, "", &opts, &doc),
    )
}

/// The key list for `eval --help` (clap's `after_help`).
pub fn help() -> String {
    keys_help(
        "Evaluation",
        EVALUATE_RS,
        "EvalOptions",
        serde_json::to_value(EvalOptions::default()).unwrap_or(Value::Null),
        "tokenize.* defaults to the first run folder's [data] tokenisation (the values above are \
         the library's), and its length limits apply only with truncation=\"training\"; \
         max_length (unset) becomes the model's max_position_embeddings.",
    )
}

/// The key list for `analyze --help`.
pub fn analyze_help() -> String {
    keys_help(
        "Analysis",
        ANALYZE_RS,
        "AnalyzeOptions",
        serde_json::to_value(reprpo_eval::analyze::AnalyzeOptions::default())
            .unwrap_or(Value::Null),
        "tokenize.* defaults to the first run folder's [data] tokenisation (the values above are \
         the library's). Lists are TOML: layers=[4,8,-1] top_k=[1,3].",
    )
}
