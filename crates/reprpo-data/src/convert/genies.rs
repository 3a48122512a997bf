//! Converter `genies`: GENIES distributions (Clymer et al. 2023) into MC items and their pairs.

use super::{ConvertOptions, Converted, id_and_meta, with_pairs};
use crate::error::Result;
use crate::read::Table;
use crate::types::McItem;

/// Converter `genies`: `distributions/<name>/{train,test}.json` of Joshuaclymer/GENIES.
///
/// Source schema, one row per question (extra keys such as `instruction`, `input`,
/// `prompt_format` are ignored): `{prompt: string, responses: {<response text>: score}}` with 2
/// or more responses whose scores are exactly one 1.0 and otherwise 0.0.
///
/// Mapping: one [`McItem`] per row, id `<dataset>/<row>`, prompt = `prompt`, choices = the keys
/// of `responses` in the file's key order, correct = `[index of the 1.0]`; pairs =
/// [`McItem::to_pairs`] (the 1.0 response against each 0.0 response, ids `<dataset>/<row>/<k>`).
/// Nothing skipped.
///
/// Errors (naming `responses`): not an object, fewer than 2 responses, an empty response text,
/// a score that is not a number, 0.0 or 1.0, or not exactly one 1.0. An empty `prompt` is an
/// error naming `prompt`.
pub fn genies(table: &Table, opts: &ConvertOptions) -> Result<Converted> {
    let mut items = Vec::with_capacity(table.len());
    for r in table.rows() {
        let prompt = r.text("prompt")?;
        let responses = r.object("responses")?;
        if responses.len() < 2 {
            return Err(r.err(
                "responses",
                format!("expected at least 2 responses, found {}", responses.len()),
            ));
        }
        let mut choices = Vec::with_capacity(responses.len());
        let mut correct = Vec::new();
        for (i, (text, score)) in responses.iter().enumerate() {
            if text.trim().is_empty() {
                return Err(r.err("responses", format!("response {} has empty text", i + 1)));
            }
            match score.as_f64() {
                Some(1.0) => correct.push(i),
                Some(0.0) => {}
                _ => {
                    return Err(r.err(
                        "responses",
                        format!("response {} has score {score}, expected 1.0 or 0.0", i + 1),
                    ));
                }
            }
            choices.push(text.clone());
        }
        if correct.len() != 1 {
            return Err(r.err(
                "responses",
                format!("expected exactly one score 1.0, found {}", correct.len()),
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
    Ok(with_pairs(items, 0))
}
