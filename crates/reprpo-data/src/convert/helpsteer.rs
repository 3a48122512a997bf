//! Converters `helpsteer` (`helpsteer-best-worst`), `helpsteer-score-random` and `helpsteer2-dpo`:
//! binarise NVIDIA HelpSteer / HelpSteer2 attribute-scored responses into preference pairs.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use super::{ConvertOptions, Converted, HelpSteerScheme};
use crate::error::Result;
use crate::read::{RowRef, Table, group_rows};
use crate::types::{PreferencePair, SourceMeta};

/// The five HelpSteer attributes, each rated 0 to 4.
const ATTRIBUTES: [&str; 5] = [
    "helpfulness",
    "correctness",
    "coherence",
    "complexity",
    "verbosity",
];

/// One response of a prompt group with its score.
struct Scored<'a> {
    text: &'a str,
    score: f64,
}

/// Converters `helpsteer` / `helpsteer-best-worst` and `helpsteer-score-random`.
///
/// Source schema (nvidia/HelpSteer and nvidia/HelpSteer2, raw rows), one row per response:
/// `{prompt: string, response: string, helpfulness, correctness, coherence, complexity,
/// verbosity}`, the five attributes numbers (or numeric strings, for CSV) from 0 to 4. Several
/// rows, consecutive or scattered, share a prompt.
///
/// Mapping: rows are grouped by exact `prompt` text, groups in order of first appearance; each
/// group gives at most one pair with id `<dataset>/<first row of the group>`, `prompt` = the
/// prompt text and `source.row` = that first row.
///
/// - [`HelpSteerScheme::BestWorst`]: score = mean(helpfulness, correctness); chosen = the
///   highest-scoring response, rejected = the lowest-scoring one (ties: the first in file order).
/// - [`HelpSteerScheme::ScoreRandom`]: score = 2 × mean(helpfulness+1, correctness+1,
///   coherence+1, complexity+1, 4−verbosity); chosen = the highest-scoring response (first on
///   ties); rejected = a uniformly random one among the responses whose score is strictly lower,
///   taken in file order and drawn with one `StdRng::seed_from_u64(opts.seed)` for the whole
///   table, one `random_range(0..n)` draw per kept group in group order.
///
/// The two scores go into `source.chosen_score` / `source.rejected_score`. A group whose
/// responses all score the same (including a single-response group) gives no pair and counts in
/// `skipped`. Every row must have a non-empty `prompt` and `response` and all five attributes in
/// 0..=4 (only helpfulness and correctness are read for `BestWorst`). No MC items.
pub fn helpsteer(
    table: &Table,
    opts: &ConvertOptions,
    scheme: HelpSteerScheme,
) -> Result<Converted> {
    let groups = group_rows(table, "prompt")?;
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let mut out = Converted::default();
    for (first, rows) in &groups {
        let mut prompt = "";
        let mut scored = Vec::with_capacity(rows.len());
        for r in rows {
            prompt = r.text("prompt")?;
            scored.push(Scored {
                text: r.text("response")?,
                score: score(r, scheme)?,
            });
        }
        // Highest score, first in file order on ties.
        let mut best = 0;
        for (i, s) in scored.iter().enumerate() {
            if s.score > scored[best].score {
                best = i;
            }
        }
        let worst = match scheme {
            HelpSteerScheme::BestWorst => {
                // Lowest score, first in file order on ties.
                let mut worst = 0;
                for (i, s) in scored.iter().enumerate() {
                    if s.score < scored[worst].score {
                        worst = i;
                    }
                }
                (scored[worst].score < scored[best].score).then_some(worst)
            }
            HelpSteerScheme::ScoreRandom => {
                let lower: Vec<usize> = (0..scored.len())
                    .filter(|&i| scored[i].score < scored[best].score)
                    .collect();
                if lower.is_empty() {
                    None
                } else {
                    Some(lower[rng.random_range(0..lower.len())])
                }
            }
        };
        let Some(worst) = worst else {
            out.skipped += 1;
            continue;
        };
        out.pairs.push(PreferencePair {
            id: format!("{}/{first}", opts.dataset),
            prompt: prompt.to_string(),
            chosen: scored[best].text.to_string(),
            rejected: scored[worst].text.to_string(),
            source: SourceMeta {
                dataset: opts.dataset.clone(),
                row: *first,
                chosen_score: Some(scored[best].score),
                rejected_score: Some(scored[worst].score),
            },
        });
    }
    Ok(out)
}

/// The score of one response row under `scheme`.
fn score(r: &RowRef<'_>, scheme: HelpSteerScheme) -> Result<f64> {
    let attr = |name: &str| -> Result<f64> {
        let x = r.f64(name)?;
        if !(0.0..=4.0).contains(&x) {
            return Err(r.err(name, format!("{x} is outside 0..=4")));
        }
        Ok(x)
    };
    Ok(match scheme {
        HelpSteerScheme::BestWorst => (attr("helpfulness")? + attr("correctness")?) / 2.0,
        HelpSteerScheme::ScoreRandom => {
            let [h, c, coh, cx, v] = ATTRIBUTES;
            let sum = (attr(h)? + 1.0)
                + (attr(c)? + 1.0)
                + (attr(coh)? + 1.0)
                + (attr(cx)? + 1.0)
                + (4.0 - attr(v)?);
            2.0 * sum / 5.0
        }
    })
}

/// Converter `helpsteer2-dpo`: HelpSteer2 already binarised into DPO rows.
///
/// Source schema, one row per pair: `{prompt: string, chosen_response: string,
/// rejected_response: string, chosen_score?: number, rejected_score?: number}`.
///
/// Mapping: prompt = `prompt`, chosen = `chosen_response`, rejected = `rejected_response` (all
/// three non-empty), id `<dataset>/<row>`; `chosen_score` / `rejected_score`, where present and
/// not null (nor an empty CSV cell), go into `source.chosen_score` / `source.rejected_score` (a
/// present score must be a finite number). No MC items; nothing skipped.
pub fn helpsteer2_dpo(table: &Table, opts: &ConvertOptions) -> Result<Converted> {
    let mut out = Converted::default();
    for r in table.rows() {
        let optional = |name: &str| -> Result<Option<f64>> {
            match r.record.fields.get(name) {
                None | Some(Value::Null) => Ok(None),
                // CSV has no null: an empty cell is an absent score.
                Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
                Some(_) => {
                    let x = r.f64(name)?;
                    if !x.is_finite() {
                        return Err(r.err(name, format!("{x} is not a finite number")));
                    }
                    Ok(Some(x))
                }
            }
        };
        out.pairs.push(PreferencePair {
            id: format!("{}/{}", opts.dataset, r.row()),
            prompt: r.text("prompt")?.to_string(),
            chosen: r.text("chosen_response")?.to_string(),
            rejected: r.text("rejected_response")?.to_string(),
            source: SourceMeta {
                dataset: opts.dataset.clone(),
                row: r.row(),
                chosen_score: optional("chosen_score")?,
                rejected_score: optional("rejected_score")?,
            },
        });
    }
    Ok(out)
}
