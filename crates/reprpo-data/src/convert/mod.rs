//! Converters: rows of a known dataset layout into [`PreferencePair`]s and/or [`McItem`]s.
//!
//! Each converter is named (the name recipes use) and works on a [`Table`], so it serves every
//! container format alike. Errors name the file, row and field.

use std::str::FromStr;

use crate::error::{DataError, Result};
use crate::read::Table;
use crate::types::{McItem, PreferencePair, SourceMeta};

pub mod chat;
pub mod genies;
pub mod helpsteer;
pub mod hh;
pub mod native;
pub mod shp;
pub mod sycophancy;
pub mod truthfulqa;

/// HelpSteer binarisation schemes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HelpSteerScheme {
    /// (a) chosen = best, rejected = worst by mean(helpfulness, correctness).
    BestWorst,
    /// (b) score = 2 * mean(helpfulness+1, correctness+1, coherence+1, complexity+1, 4-verbosity);
    /// chosen = best, rejected = a seeded random response with a strictly lower score.
    ScoreRandom,
}

/// Which TruthfulQA target set becomes the MC item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TqaTarget {
    /// `mc1_targets`: one correct answer.
    Mc1,
    /// `mc2_targets`: several correct answers.
    Mc2,
}

/// A named converter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Converter {
    /// `pairs`: our own serialised [`PreferencePair`] rows (`id` optional, `prompt`, `chosen`, `rejected`).
    Pairs,
    /// `mc`: our own serialised [`McItem`] rows (`id` optional, `prompt`, `choices`, `correct`).
    Mc,
    /// `helpsteer` / `helpsteer-best-worst` and `helpsteer-score-random`: raw HelpSteer(2) rows.
    HelpSteer(HelpSteerScheme),
    /// `helpsteer2-dpo`: prompt, chosen_response, rejected_response.
    HelpSteer2Dpo,
    /// `hh-rlhf`: full chosen/rejected transcripts; prompt = shared prefix up to the last "\n\nAssistant:".
    HhRlhf,
    /// `shp`: Stanford Human Preferences (history, human_ref_A/B, labels).
    Shp,
    /// `genies`: prompt + responses {text: score} with exactly one 1.0; MC items and their pairs.
    Genies,
    /// `truthfulqa-mc1` / `truthfulqa-mc2`: `mc_task.json` layout or the hub parquet layout.
    TruthfulQa(TqaTarget),
    /// `sycophancy`: Anthropic evals JSONL (prompt, corrects, incorrects).
    Sycophancy,
    /// `chat`: TRL's conversational format (`chosen`/`rejected` message lists, optional `prompt`).
    Chat,
    /// `auto`: whichever of `pairs`, `mc`, `chat` and `hh-rlhf` the columns call for
    /// ([`infer`]).
    Auto,
}

impl Converter {
    /// Every accepted name, for error messages and `--help`.
    pub const NAMES: &'static [&'static str] = &[
        "pairs",
        "mc",
        "helpsteer",
        "helpsteer-best-worst",
        "helpsteer-score-random",
        "helpsteer2-dpo",
        "hh-rlhf",
        "shp",
        "genies",
        "truthfulqa-mc1",
        "truthfulqa-mc2",
        "sycophancy",
        "chat",
        "auto",
    ];
}

impl FromStr for Converter {
    type Err = DataError;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "pairs" => Converter::Pairs,
            "mc" => Converter::Mc,
            "helpsteer" | "helpsteer-best-worst" => {
                Converter::HelpSteer(HelpSteerScheme::BestWorst)
            }
            "helpsteer-score-random" => Converter::HelpSteer(HelpSteerScheme::ScoreRandom),
            "helpsteer2-dpo" => Converter::HelpSteer2Dpo,
            "hh-rlhf" | "hh" => Converter::HhRlhf,
            "shp" => Converter::Shp,
            "genies" => Converter::Genies,
            "truthfulqa-mc1" | "truthfulqa" => Converter::TruthfulQa(TqaTarget::Mc1),
            "truthfulqa-mc2" => Converter::TruthfulQa(TqaTarget::Mc2),
            "sycophancy" => Converter::Sycophancy,
            "chat" => Converter::Chat,
            "auto" => Converter::Auto,
            other => {
                return Err(DataError::Invalid(format!(
                    "unknown converter `{other}` (known: {})",
                    Converter::NAMES.join(", ")
                )));
            }
        })
    }
}

/// Options every converter receives.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Name used as the id prefix and `source.dataset` (e.g. the recipe name or file stem).
    pub dataset: String,
    /// Seed for converters that draw at random (HelpSteer scheme b).
    pub seed: u64,
}

/// What a converter produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Converted {
    /// Preference pairs (empty for MC-only sources such as TruthfulQA, where pairs can be
    /// derived with [`McItem::to_pairs`]).
    pub pairs: Vec<PreferencePair>,
    /// Multiple-choice items (empty for pair-only sources).
    pub mc: Vec<McItem>,
    /// Groups or rows skipped on purpose (e.g. HelpSteer prompts whose responses all tie).
    pub skipped: usize,
}

/// Run `converter` on `table`.
///
/// Every converter reads the rows in file order, names the file, row and field in its errors,
/// and gives ids `<opts.dataset>/<row>` (pairs derived from an MC item get `/<k>` appended, as
/// [`McItem::to_pairs`] does). See each converter module for the exact source schema.
pub fn convert(converter: Converter, table: &Table, opts: &ConvertOptions) -> Result<Converted> {
    match converter {
        Converter::Pairs => native::pairs(table, opts),
        Converter::Mc => native::mc(table, opts),
        Converter::HelpSteer(scheme) => helpsteer::helpsteer(table, opts, scheme),
        Converter::HelpSteer2Dpo => helpsteer::helpsteer2_dpo(table, opts),
        Converter::HhRlhf => hh::hh_rlhf(table, opts),
        Converter::Shp => shp::shp(table, opts),
        Converter::Genies => genies::genies(table, opts),
        Converter::TruthfulQa(target) => truthfulqa::truthfulqa(table, opts, target),
        Converter::Sycophancy => sycophancy::sycophancy(table, opts),
        Converter::Chat => chat::chat(table, opts),
        Converter::Auto => convert(infer(table)?, table, opts),
    }
}

/// The converter the columns of `table`'s first row call for (converter `auto`):
///
/// | columns | converter |
/// |---|---|
/// | `prompt`, `chosen`, `rejected` strings | `pairs` |
/// | `prompt`, `choices`, `correct` | `mc` |
/// | `chosen`, `rejected` message lists (`prompt` optional) | `chat` (TRL conversational) |
/// | `chosen`, `rejected` strings, no `prompt` | `hh-rlhf` (full transcripts) |
///
/// Anything else is an error naming the file, the columns found and how to name a converter.
pub fn infer(table: &Table) -> Result<Converter> {
    let first = table.records.first();
    let fields = first.map(|r| &r.fields);
    let has = |k: &str| fields.is_some_and(|f| f.get(k).is_some_and(|v| !v.is_null()));
    let is_list = |k: &str| fields.is_some_and(|f| f.get(k).is_some_and(|v| v.is_array()));
    let found = if has("chosen") && has("rejected") {
        if is_list("chosen") && is_list("rejected") {
            Some(Converter::Chat)
        } else if has("prompt") {
            Some(Converter::Pairs)
        } else {
            Some(Converter::HhRlhf)
        }
    } else if has("prompt") && has("choices") && has("correct") {
        Some(Converter::Mc)
    } else {
        None
    };
    found.ok_or_else(|| {
        let columns: Vec<&str> = fields
            .map(|f| f.keys().map(String::as_str).collect())
            .unwrap_or_default();
        DataError::field(
            &table.file,
            first.map_or(1, |r| r.row),
            "(columns)",
            format!(
                "cannot tell the layout from the columns {columns:?}: expected prompt/chosen/\
                 rejected, prompt/choices/correct, or chosen/rejected (HH transcripts or TRL \
                 message lists); name a converter with `FILE:CONVERTER` (known: {})",
                Converter::NAMES.join(", ")
            ),
        )
    })
}

/// The id `<dataset>/<row>` and the provenance of an item from `row` without scores.
fn id_and_meta(opts: &ConvertOptions, row: usize) -> (String, SourceMeta) {
    (
        format!("{}/{row}", opts.dataset),
        SourceMeta {
            dataset: opts.dataset.clone(),
            row,
            chosen_score: None,
            rejected_score: None,
        },
    )
}

/// An MC item together with its pairs ([`McItem::to_pairs`]), for sources that give both.
fn with_pairs(items: Vec<McItem>, skipped: usize) -> Converted {
    let pairs = items.iter().flat_map(McItem::to_pairs).collect();
    Converted {
        pairs,
        mc: items,
        skipped,
    }
}
