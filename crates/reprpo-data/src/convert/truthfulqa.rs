//! Converters `truthfulqa-mc1` / `truthfulqa-mc2`: TruthfulQA multiple-choice questions, from
//! either the original `mc_task.json` layout or the Hugging Face hub (parquet) layout.

use serde_json::{Map, Value};

use super::{ConvertOptions, Converted, TqaTarget, id_and_meta};
use crate::error::Result;
use crate::read::{RowRef, Table, kind};
use crate::types::McItem;

/// Converters `truthfulqa-mc1` (`truthfulqa`) and `truthfulqa-mc2`.
///
/// Source schema, one row per question, in one of two layouts detected per row from the
/// target field (`mc1_targets` for [`TqaTarget::Mc1`], `mc2_targets` for [`TqaTarget::Mc2`];
/// the other one is not read):
///
/// - (a) `mc_task.json` (sylinrl/TruthfulQA `data/mc_task.json`):
///   `{question: string, mc1_targets: {<answer text>: 0|1, ...}, mc2_targets: {...}}`; the
///   key order is the choice order.
/// - (b) hub layout (`truthful_qa`, config `multiple_choice`, parquet):
///   `{question: string, mc1_targets: {choices: [string, ...], labels: [0|1, ...]},
///   mc2_targets: {...}}`. A target object whose `choices` is an array is read as (b).
///
/// Mapping: one [`McItem`] per row, id `<dataset>/<row>`, prompt = `question` (as-is, no
/// template), choices = the answers in order, correct = the indices labelled 1. Pairs are not
/// derived (`pairs` is empty; use [`McItem::to_pairs`]); nothing skipped.
///
/// Errors: empty `question`; target missing or not an object; (b) `labels` missing or not the
/// same length as `choices`; a label other than 0 or 1; no answers; an empty answer text; no
/// label 1 (and, for MC1, more than one).
pub fn truthfulqa(table: &Table, opts: &ConvertOptions, target: TqaTarget) -> Result<Converted> {
    let field = match target {
        TqaTarget::Mc1 => "mc1_targets",
        TqaTarget::Mc2 => "mc2_targets",
    };
    let mut items = Vec::with_capacity(table.len());
    for r in table.rows() {
        let prompt = r.text("question")?;
        let targets = r.object(field)?;
        let (choices, labels) = match targets.get("choices") {
            Some(Value::Array(_)) => hub_layout(&r, field, targets)?,
            _ => task_layout(&r, field, targets)?,
        };
        if choices.is_empty() {
            return Err(r.err(field, "no answers"));
        }
        let correct: Vec<usize> = (0..labels.len()).filter(|&i| labels[i]).collect();
        if correct.is_empty() {
            return Err(r.err(field, "no answer has label 1"));
        }
        if target == TqaTarget::Mc1 && correct.len() != 1 {
            return Err(r.err(
                field,
                format!("expected exactly one label 1, found {}", correct.len()),
            ));
        }
        let (id, source) = id_and_meta(opts, r.row());
        items.push(McItem {
            id,
            prompt: prompt.to_string(),
            choices,
            correct,
            source,
        });
    }
    Ok(Converted {
        mc: items,
        ..Converted::default()
    })
}

/// Layout (a): `{answer text: 0|1}` in key order.
fn task_layout(
    r: &RowRef<'_>,
    field: &str,
    targets: &Map<String, Value>,
) -> Result<(Vec<String>, Vec<bool>)> {
    let mut choices = Vec::with_capacity(targets.len());
    let mut labels = Vec::with_capacity(targets.len());
    for (i, (text, label)) in targets.iter().enumerate() {
        if text.trim().is_empty() {
            return Err(r.err(field, format!("answer {} has empty text", i + 1)));
        }
        labels.push(label_value(r, &format!("{field}[{text:?}]"), label)?);
        choices.push(text.clone());
    }
    Ok((choices, labels))
}

/// Layout (b): `{choices: [..], labels: [..]}` of equal length.
fn hub_layout(
    r: &RowRef<'_>,
    field: &str,
    targets: &Map<String, Value>,
) -> Result<(Vec<String>, Vec<bool>)> {
    let choices_field = format!("{field}.choices");
    let labels_field = format!("{field}.labels");
    let raw_choices = match targets.get("choices") {
        Some(Value::Array(a)) => a,
        Some(other) => {
            return Err(r.err(
                &choices_field,
                format!("expected an array, found {}", kind(other)),
            ));
        }
        None => return Err(r.err(&choices_field, "missing")),
    };
    let raw_labels = match targets.get("labels") {
        Some(Value::Array(a)) => a,
        Some(other) => {
            return Err(r.err(
                &labels_field,
                format!("expected an array, found {}", kind(other)),
            ));
        }
        None => return Err(r.err(&labels_field, "missing")),
    };
    if raw_choices.len() != raw_labels.len() {
        return Err(r.err(
            &labels_field,
            format!(
                "{} labels for {} choices",
                raw_labels.len(),
                raw_choices.len()
            ),
        ));
    }
    let mut choices = Vec::with_capacity(raw_choices.len());
    for (i, v) in raw_choices.iter().enumerate() {
        let f = format!("{choices_field}[{i}]");
        let s = v
            .as_str()
            .ok_or_else(|| r.err(&f, format!("expected a string, found {}", kind(v))))?;
        if s.trim().is_empty() {
            return Err(r.err(&f, "empty"));
        }
        choices.push(s.to_string());
    }
    let labels = raw_labels
        .iter()
        .enumerate()
        .map(|(i, v)| label_value(r, &format!("{labels_field}[{i}]"), v))
        .collect::<Result<Vec<_>>>()?;
    Ok((choices, labels))
}

/// A 0/1 label as a boolean.
fn label_value(r: &RowRef<'_>, field: &str, v: &Value) -> Result<bool> {
    match v.as_f64() {
        Some(1.0) => Ok(true),
        Some(0.0) => Ok(false),
        _ => Err(r.err(field, format!("expected label 0 or 1, found {v}"))),
    }
}
