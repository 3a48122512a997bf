//! Writing a [`Report`] into a folder, every file atomically (a temporary file in the same
//! folder, then a rename), so an interruption never leaves a half-written table:
//!
//! ```text
//! <dir>/table.md          the tables (Markdown)
//! <dir>/table.csv         one line per (model, dataset)
//! <dir>/table.json        the whole table (columns, rows, cells, GENIES lines, truncation)
//! <dir>/examples.jsonl    one line per (model, item): every log-probability, the normalised
//!                         probability of the correct answer, correct or not
//! <dir>/examples-<label>.jsonl  the same lines, one file per model (`examples-base.jsonl`, ...;
//!                         the label made safe for a file name by [`file_label`])
//! <dir>/generations.md    greedy continuations, base and each adapter side by side
//! <dir>/scores.png        bar chart of the accuracies (one group per dataset)
//! ```

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{EvalError, Result};
use crate::evaluate::{Generation, Report};
use crate::plot::{BarSeries, bar_chart};

/// Write `bytes` to `path` atomically (temporary file beside it, then rename; the workspace's
/// one implementation, [`reprpo_data::write::write_file_atomic`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    reprpo_data::write::write_file_atomic(path, bytes).map_err(|f| EvalError::Io {
        path: f.path,
        source: f.source,
    })
}

/// A model label as a file-name part: ASCII letters, digits, `.`, `_` and `-` are kept, every
/// other character becomes `_` (`org/model@v1` -> `org_model_v1`), leading dots too; never empty.
pub fn file_label(label: &str) -> String {
    let s: String = label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let s = match s.strip_prefix('.') {
        Some(rest) => format!("_{rest}"),
        None => s,
    };
    if s.is_empty() { "_".into() } else { s }
}

/// The examples as JSON lines.
fn jsonl<'a>(rows: impl Iterator<Item = &'a Value>) -> Result<Vec<u8>> {
    let mut out = String::new();
    for e in rows {
        out.push_str(&serde_json::to_string(e).map_err(|e| EvalError::Invalid(e.to_string()))?);
        out.push('\n');
    }
    Ok(out.into_bytes())
}

/// `examples-<label>.jsonl` per model (rows of the table first, then any other `model` of the
/// examples): `(file name, lines)`. Labels that make the same file name get `-2`, `-3`, ...
fn per_model_examples(report: &Report) -> Result<Vec<(String, Vec<u8>)>> {
    let mut models: Vec<&str> = report.table.rows.iter().map(|r| r.model.as_str()).collect();
    for e in &report.examples {
        if let Some(m) = e.get("model").and_then(Value::as_str)
            && !models.contains(&m)
        {
            models.push(m);
        }
    }
    let mut used = HashSet::new();
    let mut files = Vec::with_capacity(models.len());
    for m in models {
        let stem = file_label(m);
        let mut name = format!("examples-{stem}.jsonl");
        let mut n = 1;
        while !used.insert(name.clone()) {
            n += 1;
            name = format!("examples-{stem}-{n}.jsonl");
        }
        let rows = report
            .examples
            .iter()
            .filter(|e| e.get("model").and_then(Value::as_str) == Some(m));
        files.push((name, jsonl(rows)?));
    }
    Ok(files)
}

/// Generations as Markdown: per prompt, a table with one row per model.
pub(crate) fn generations_markdown(gens: &[Generation]) -> String {
    let esc = |s: &str| s.replace('|', "\\|").replace('\n', "⏎");
    let mut s = String::from("# Greedy generations, with and without each adapter\n");
    for g in gens {
        s.push_str(&format!(
            "\n## {} `{}`\n\nPrompt: `{}`\n\n| model | continuation |\n|---|---|\n",
            g.dataset,
            g.id,
            esc(&g.prompt)
        ));
        for (label, text) in &g.outputs {
            s.push_str(&format!("| {} | {} |\n", esc(label), esc(text)));
        }
    }
    s
}

/// Write every output file of `report` into `dir`; returns the paths written.
pub fn write_report(dir: &Path, report: &Report) -> Result<Vec<PathBuf>> {
    let t = &report.table;
    let mut written = Vec::new();
    let mut put = |name: &str, bytes: Vec<u8>| -> Result<()> {
        let p = dir.join(name);
        write_atomic(&p, &bytes)?;
        written.push(p);
        Ok(())
    };
    put("table.md", t.to_markdown().into_bytes())?;
    put("table.csv", t.to_csv().into_bytes())?;
    put("table.json", t.to_json()?.into_bytes())?;
    put("examples.jsonl", jsonl(report.examples.iter())?)?;
    for (name, bytes) in per_model_examples(report)? {
        put(&name, bytes)?;
    }
    put(
        "generations.md",
        generations_markdown(&report.generations).into_bytes(),
    )?;
    let groups: Vec<String> = t.columns.iter().map(|c| c.header()).collect();
    let bars: Vec<BarSeries> = t
        .rows
        .iter()
        .map(|r| BarSeries {
            name: r.model.clone(),
            values: r
                .cells
                .iter()
                .map(|c| c.as_ref().map_or(f64::NAN, |c| c.acc))
                .collect(),
        })
        .collect();
    let png = dir.join("scores.png");
    bar_chart(
        &png,
        &format!("suite {}: accuracy", t.suite),
        "accuracy",
        &groups,
        &bars,
    )?;
    written.push(png);
    Ok(written)
}
