//! Converter `shp`: Stanford Human Preferences (stanfordnlp/SHP) rows into preference pairs.

use super::{ConvertOptions, Converted};
use crate::error::Result;
use crate::read::Table;
use crate::types::{PreferencePair, SourceMeta};

/// Converter `shp`: stanfordnlp/SHP rows.
///
/// Source schema, one row per pair (other SHP columns such as `post_id`, `domain`,
/// `upvote_ratio`, `c_root_id_A/B`, `created_at_utc_A/B`, `seconds_difference`, `score_ratio` are
/// ignored): `{history: string, human_ref_A: string, human_ref_B: string, labels: 0|1,
/// score_A: number, score_B: number}`.
///
/// Mapping: prompt = `history`; `labels` = 1 means A is preferred (chosen = `human_ref_A`,
/// rejected = `human_ref_B`, chosen_score = `score_A`, rejected_score = `score_B`), 0 means B is
/// preferred (the reverse). Id `<dataset>/<row>`, no MC items, nothing skipped.
///
/// Errors: empty `history`, `human_ref_A` or `human_ref_B`; `labels` other than 0 or 1; missing
/// or non-numeric scores.
pub fn shp(table: &Table, opts: &ConvertOptions) -> Result<Converted> {
    let mut out = Converted::default();
    for r in table.rows() {
        let prompt = r.text("history")?;
        let a = r.text("human_ref_A")?;
        let b = r.text("human_ref_B")?;
        let label = r.f64("labels")?;
        let score_a = r.f64("score_A")?;
        let score_b = r.f64("score_B")?;
        let (chosen, rejected, chosen_score, rejected_score) = if label == 1.0 {
            (a, b, score_a, score_b)
        } else if label == 0.0 {
            (b, a, score_b, score_a)
        } else {
            return Err(r.err("labels", format!("expected 0 or 1, found {label}")));
        };
        out.pairs.push(PreferencePair {
            id: format!("{}/{}", opts.dataset, r.row()),
            prompt: prompt.to_string(),
            chosen: chosen.to_string(),
            rejected: rejected.to_string(),
            source: SourceMeta {
                dataset: opts.dataset.clone(),
                row: r.row(),
                chosen_score: Some(chosen_score),
                rejected_score: Some(rejected_score),
            },
        });
    }
    Ok(out)
}
