//! Converters `pairs` and `mc`: read back our own serialised [`PreferencePair`] and [`McItem`]
//! rows.

use serde_json::Value;

use super::{ConvertOptions, Converted, id_and_meta};
use crate::error::Result;
use crate::read::{RowRef, Table, kind};
use crate::types::{McItem, PreferencePair, SourceMeta};

/// Converter `pairs`: rows in the [`PreferencePair`] layout.
///
/// Source schema, one row per pair:
/// `{id?: string, prompt: string, chosen: string, rejected: string, source?: SourceMeta}`.
///
/// Mapping: every field is copied as-is. `prompt`, `chosen` and `rejected` must hold more than
/// white space. A missing (or null) `id` becomes `<opts.dataset>/<row>`; a missing (or null)
/// `source` becomes `{dataset: opts.dataset, row}` without scores, while a present `source` is
/// kept as written (so a round trip through a file loses nothing). No MC items; nothing skipped.
pub fn pairs(table: &Table, opts: &ConvertOptions) -> Result<Converted> {
    let mut out = Vec::with_capacity(table.len());
    for r in table.rows() {
        let (id, source) = id_and_source(&r, opts)?;
        out.push(PreferencePair {
            id,
            prompt: r.text("prompt")?.to_string(),
            chosen: r.text("chosen")?.to_string(),
            rejected: r.text("rejected")?.to_string(),
            source,
        });
    }
    Ok(Converted {
        pairs: out,
        ..Converted::default()
    })
}

/// Converter `mc`: rows in the [`McItem`] layout.
///
/// Source schema, one row per item:
/// `{id?: string, prompt: string, choices: [string, ...], correct: [integer, ...],
/// source?: SourceMeta}`.
///
/// Mapping: copied as-is into an [`McItem`]; `id` and `source` default as for [`pairs`].
/// `prompt` and every choice must hold more than white space; `choices` must be non-empty;
/// `correct` must be non-empty, hold non-negative integers below `choices.len()` and no
/// duplicates (it is sorted ascending). Pairs are not derived (use [`McItem::to_pairs`]).
pub fn mc(table: &Table, opts: &ConvertOptions) -> Result<Converted> {
    let mut out = Vec::with_capacity(table.len());
    for r in table.rows() {
        let (id, source) = id_and_source(&r, opts)?;
        let prompt = r.text("prompt")?.to_string();
        let choices = r.str_list("choices")?;
        if choices.is_empty() {
            return Err(r.err("choices", "empty list"));
        }
        for (i, c) in choices.iter().enumerate() {
            if c.trim().is_empty() {
                return Err(r.err(&format!("choices[{i}]"), "empty"));
            }
        }
        let raw = r.array("correct")?;
        if raw.is_empty() {
            return Err(r.err(
                "correct",
                "empty list (at least one choice must be correct)",
            ));
        }
        let mut correct = Vec::with_capacity(raw.len());
        for (i, v) in raw.iter().enumerate() {
            let field = format!("correct[{i}]");
            let idx = v.as_u64().ok_or_else(|| {
                r.err(
                    &field,
                    format!("expected a non-negative integer, found {}", describe(v)),
                )
            })?;
            let idx = usize::try_from(idx)
                .ok()
                .filter(|&k| k < choices.len())
                .ok_or_else(|| {
                    r.err(
                        &field,
                        format!("index {idx} out of range for {} choices", choices.len()),
                    )
                })?;
            if correct.contains(&idx) {
                return Err(r.err(&field, format!("index {idx} listed twice")));
            }
            correct.push(idx);
        }
        correct.sort_unstable();
        out.push(McItem {
            id,
            prompt,
            choices: choices.into_iter().map(str::to_string).collect(),
            correct,
            source,
        });
    }
    Ok(Converted {
        mc: out,
        ..Converted::default()
    })
}

/// `id` and `source` of a native row, defaulted from the dataset name and row number.
fn id_and_source(r: &RowRef<'_>, opts: &ConvertOptions) -> Result<(String, SourceMeta)> {
    let (default_id, default_meta) = id_and_meta(opts, r.row());
    let id = match r.record.fields.get("id") {
        None | Some(Value::Null) => default_id,
        Some(_) => r.text("id")?.to_string(),
    };
    let source = match r.record.fields.get("source") {
        None | Some(Value::Null) => default_meta,
        Some(v) => serde_json::from_value::<SourceMeta>(v.clone())
            .map_err(|e| r.err("source", format!("not a source record: {e}")))?,
    };
    Ok((id, source))
}

/// A value's JSON type, with the value itself for numbers (so `-1` and `1.5` are shown).
fn describe(v: &Value) -> String {
    match v {
        Value::Number(n) => n.to_string(),
        other => kind(other).to_string(),
    }
}
