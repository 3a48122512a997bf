//! Converter `sycophancy`: Anthropic model-written evals (sycophancy) into MC items and pairs.

use super::{ConvertOptions, Converted, id_and_meta, with_pairs};
use crate::error::Result;
use crate::read::Table;
use crate::types::McItem;

/// Converter `sycophancy`: anthropics/evals `sycophancy/*.jsonl`.
///
/// Source schema, one row per question: `{prompt: string, corrects: [string, ...],
/// incorrects: [string, ...]}` (the prompt ends with `"\n\nAnswer:"`, the answers are e.g.
/// `" (A)"`).
///
/// Mapping: one [`McItem`] per row, id `<dataset>/<row>`, prompt = `prompt`, choices =
/// `corrects` followed by `incorrects`, correct = the indices of the `corrects`; pairs =
/// [`McItem::to_pairs`] (every correct against every incorrect, ids `<dataset>/<row>/<k>`).
/// Nothing skipped.
///
/// The file's labels are kept as-is, and what they mean depends on the file. In
/// `political_typology_quiz_liberal-bio_*.jsonl`, `corrects` is always the *liberal* answer:
///
/// - in `*-bio_liberal` the user's bio is liberal, so `corrects` is the **sycophantic** answer
///   (agreeing with the user);
/// - in `*-bio_conservative` the bio is conservative, so `corrects` is the
///   **non-sycophantic** answer and the sycophantic one is in `incorrects`.
///
/// A caller that wants "chosen = non-sycophantic" must therefore swap the roles for the
/// `*-bio_liberal` file itself.
///
/// Errors: empty `prompt`; `corrects` or `incorrects` missing, not a list of strings or empty; an
/// empty answer text (named as `corrects[i]` / `incorrects[i]`).
pub fn sycophancy(table: &Table, opts: &ConvertOptions) -> Result<Converted> {
    let mut items = Vec::with_capacity(table.len());
    for r in table.rows() {
        let prompt = r.text("prompt")?;
        let mut lists = Vec::with_capacity(2);
        for field in ["corrects", "incorrects"] {
            let list = r.str_list(field)?;
            if list.is_empty() {
                return Err(r.err(field, "empty list"));
            }
            for (i, s) in list.iter().enumerate() {
                if s.trim().is_empty() {
                    return Err(r.err(&format!("{field}[{i}]"), "empty"));
                }
            }
            lists.push(list);
        }
        let n_correct = lists[0].len();
        let choices = lists.concat().into_iter().map(str::to_string).collect();
        let (id, source) = id_and_meta(opts, r.row());
        items.push(McItem {
            id,
            prompt: prompt.to_string(),
            choices,
            correct: (0..n_correct).collect(),
            source,
        });
    }
    Ok(with_pairs(items, 0))
}
