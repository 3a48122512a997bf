//! The results table: one row per model (the base, then each adapter), one column per dataset
//! (marked train / ID / OOD / unrelated), built from per-example scores, plus the GENIES shift
//! table; rendered for the terminal, Markdown, CSV and JSON.
//!
//! # Cells ([`mc_cell`], [`pref_cell`])
//! Over the `N` items of a dataset:
//! - multiple choice: `acc = (1/N) sum [argmax_i l_i in C]`, `prob = (1/N) sum P` (the mean
//!   normalised probability of the correct answer(s): TruthfulQA MC1 / MC2), and the
//!   length-normalised `acc_norm`, `prob_norm`;
//! - pairs: `acc = (1/N) sum [delta > 0]`, `prob = (1/N) sum sigmoid(delta)`, and, for an adapter,
//!   `reward_acc = (1/N) sum [r_w > r_l]` and `margin = (1/N) sum (r_w - r_l)` (DPO rewards
//!   against the base, see [`crate::score`]).
//!
//! # GENIES ([`shift_rows`])
//! For a shift (source, target) and a model with accuracies `a_src`, `a_tgt` and the base's
//! `b_src`, `b_tgt`: `gain_id = a_src / b_src`, `gain_ood = a_tgt / b_tgt`, and, where a
//! target-tuned accuracy `t` is given, the differential elicitation
//! `de = (a_tgt - b_tgt) / t` (generalisation minus baseline over target-tuned).

use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};
use crate::score::{DpoReward, McScore, PrefScore};
use crate::suite::{Role, Shift};

/// A dataset column.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Column {
    /// Dataset name.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// `mc` or `pairs`.
    pub kind: String,
}

impl Column {
    /// `name (ID)` etc.
    pub fn header(&self) -> String {
        format!("{} ({})", self.name, self.role.mark())
    }
}

/// The aggregate scores of one model on one dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    /// Items scored.
    pub n: usize,
    /// Accuracy.
    pub acc: f64,
    /// Mean probability of the correct answer (MC) or mean `sigmoid(delta)` (pairs).
    pub prob: f64,
    /// MC: accuracy from length-normalised log-probabilities.
    pub acc_norm: Option<f64>,
    /// MC: mean length-normalised probability of the correct answer.
    pub prob_norm: Option<f64>,
    /// Pairs, adapters: DPO reward accuracy against the base.
    pub reward_acc: Option<f64>,
    /// Pairs, adapters: mean DPO reward margin against the base.
    pub margin: Option<f64>,
}

fn mean(xs: impl Iterator<Item = f64>) -> f64 {
    let (s, n) = xs.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 { f64::NAN } else { s / n as f64 }
}

fn b(x: bool) -> f64 {
    if x { 1.0 } else { 0.0 }
}

/// The cell of a multiple-choice dataset.
pub fn mc_cell(scores: &[McScore]) -> Cell {
    Cell {
        n: scores.len(),
        acc: mean(scores.iter().map(|s| b(s.acc))),
        prob: mean(scores.iter().map(|s| s.prob_correct)),
        acc_norm: Some(mean(scores.iter().map(|s| b(s.acc_norm)))),
        prob_norm: Some(mean(scores.iter().map(|s| s.prob_correct_norm))),
        reward_acc: None,
        margin: None,
    }
}

/// The cell of a pair dataset; `rewards` (one per pair) for an adapter.
pub fn pref_cell(scores: &[PrefScore], rewards: Option<&[DpoReward]>) -> Result<Cell> {
    if let Some(r) = rewards
        && r.len() != scores.len()
    {
        return Err(EvalError::Invalid(format!(
            "pref_cell: {} rewards for {} pairs",
            r.len(),
            scores.len()
        )));
    }
    Ok(Cell {
        n: scores.len(),
        acc: mean(scores.iter().map(|s| b(s.correct))),
        prob: mean(scores.iter().map(|s| s.prob)),
        acc_norm: None,
        prob_norm: None,
        reward_acc: rewards.map(|r| mean(r.iter().map(|x| b(x.correct)))),
        margin: rewards.map(|r| mean(r.iter().map(|x| x.margin))),
    })
}

/// One model's row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// `base` or the adapter's label.
    pub model: String,
    /// One cell per column (`None`: not scored).
    pub cells: Vec<Option<Cell>>,
}

/// One (model, shift) line of the GENIES table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShiftRow {
    /// The model.
    pub model: String,
    /// Source dataset (ID).
    pub source: String,
    /// Target dataset (OOD).
    pub target: String,
    /// `a_src`.
    pub id_acc: f64,
    /// `a_tgt`.
    pub ood_acc: f64,
    /// `b_src`.
    pub base_id_acc: f64,
    /// `b_tgt`.
    pub base_ood_acc: f64,
    /// `a_src / b_src`.
    pub gain_id: f64,
    /// `a_tgt / b_tgt`.
    pub gain_ood: f64,
    /// `(a_tgt - b_tgt) / t` when the target-tuned accuracy `t` is given.
    pub differential_elicitation: Option<f64>,
}

/// The whole table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Table {
    /// Suite name.
    pub suite: String,
    /// Dataset columns.
    pub columns: Vec<Column>,
    /// Rows: the base first.
    pub rows: Vec<Row>,
    /// GENIES lines (empty without shifts).
    pub shifts: Vec<ShiftRow>,
    /// How long items were cut, and how many.
    #[serde(default)]
    pub truncation: TruncationNote,
}

/// What evaluation cut from items longer than the model's context (see
/// `EvalOptions::truncation`), said in every rendering's header.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TruncationNote {
    /// The rule, in words.
    pub rule: String,
    /// `(dataset, items cut, items scored)` for each dataset with any item cut.
    pub items: Vec<(String, usize, usize)>,
}

impl TruncationNote {
    /// One header line: the rule and how many items it cut, per dataset.
    pub fn line(&self) -> String {
        let cut = if self.items.is_empty() {
            "no item truncated".to_string()
        } else {
            let per: Vec<String> = self
                .items
                .iter()
                .map(|(d, n, of)| format!("{n} of {of} items of {d}"))
                .collect();
            format!("TRUNCATED {}", per.join(", "))
        };
        format!("truncation: {cut} ({})", self.rule)
    }
}

/// GENIES lines for every non-base row and every shift (see the module docs). `rows[0]` is
/// the base. Shifts whose columns are missing or unscored are skipped.
pub fn shift_rows(columns: &[Column], rows: &[Row], shifts: &[Shift]) -> Vec<ShiftRow> {
    let col = |name: &str| columns.iter().position(|c| c.name == name);
    let acc = |row: &Row, i: usize| row.cells.get(i).and_then(|c| c.as_ref()).map(|c| c.acc);
    let Some(base) = rows.first() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for row in rows.iter().skip(1) {
        for s in shifts {
            let (Some(si), Some(ti)) = (col(&s.source), col(&s.target)) else {
                continue;
            };
            let (Some(a_src), Some(a_tgt), Some(b_src), Some(b_tgt)) =
                (acc(row, si), acc(row, ti), acc(base, si), acc(base, ti))
            else {
                continue;
            };
            out.push(ShiftRow {
                model: row.model.clone(),
                source: s.source.clone(),
                target: s.target.clone(),
                id_acc: a_src,
                ood_acc: a_tgt,
                base_id_acc: b_src,
                base_ood_acc: b_tgt,
                gain_id: a_src / b_src,
                gain_ood: a_tgt / b_tgt,
                differential_elicitation: s.target_tuned.map(|t| (a_tgt - b_tgt) / t),
            });
        }
    }
    out
}

fn fmt(x: Option<f64>) -> String {
    match x {
        Some(v) if v.is_finite() => format!("{v:.3}"),
        Some(_) => "nan".into(),
        None => "-".into(),
    }
}

/// A Markdown table from a header and rows of cells (pipes in cells escaped).
fn md(header: &[String], rows: &[Vec<String>]) -> String {
    let esc = |s: &str| s.replace('|', "\\|").replace('\n', " ");
    let mut s = format!(
        "| {} |\n|{}\n",
        header
            .iter()
            .map(|h| esc(h))
            .collect::<Vec<_>>()
            .join(" | "),
        header
            .iter()
            .enumerate()
            .map(|(i, _)| if i == 0 { "---|" } else { "---:|" })
            .collect::<String>()
    );
    for r in rows {
        s.push_str(&format!(
            "| {} |\n",
            r.iter().map(|c| esc(c)).collect::<Vec<_>>().join(" | ")
        ));
    }
    s
}

/// Columns padded to their widest entry, for the terminal.
fn aligned(header: &[String], rows: &[Vec<String>]) -> String {
    let n = header.len();
    let widths: Vec<usize> = (0..n)
        .map(|i| {
            rows.iter()
                .map(|r| r.get(i).map_or(0, |c| c.chars().count()))
                .chain([header[i].chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[String]| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i == 0 {
                    format!("{c:<w$}", w = widths[i])
                } else {
                    format!("{c:>w$}", w = widths[i])
                }
            })
            .collect::<Vec<_>>()
            .join("  ")
    };
    let mut s = line(header);
    s.push('\n');
    s.push_str(&"-".repeat(widths.iter().sum::<usize>() + 2 * n.saturating_sub(1)));
    s.push('\n');
    for r in rows {
        s.push_str(&line(r));
        s.push('\n');
    }
    s
}

impl Table {
    /// Header and rows of one metric (`pick` reads it from a cell).
    fn metric_grid(&self, pick: impl Fn(&Cell) -> Option<f64>) -> (Vec<String>, Vec<Vec<String>>) {
        let mut header = vec!["model".to_string()];
        header.extend(self.columns.iter().map(Column::header));
        let rows = self
            .rows
            .iter()
            .map(|r| {
                let mut v = vec![r.model.clone()];
                v.extend(r.cells.iter().map(|c| fmt(c.as_ref().and_then(&pick))));
                v
            })
            .collect();
        (header, rows)
    }

    fn shift_grid(&self) -> (Vec<String>, Vec<Vec<String>>) {
        let header = [
            "model",
            "source (ID)",
            "target (OOD)",
            "acc ID",
            "acc OOD",
            "base ID",
            "base OOD",
            "gain ID",
            "gain OOD",
            "diff. elicitation",
        ]
        .map(String::from)
        .to_vec();
        let rows = self
            .shifts
            .iter()
            .map(|s| {
                vec![
                    s.model.clone(),
                    s.source.clone(),
                    s.target.clone(),
                    fmt(Some(s.id_acc)),
                    fmt(Some(s.ood_acc)),
                    fmt(Some(s.base_id_acc)),
                    fmt(Some(s.base_ood_acc)),
                    fmt(Some(s.gain_id)),
                    fmt(Some(s.gain_ood)),
                    fmt(s.differential_elicitation),
                ]
            })
            .collect();
        (header, rows)
    }

    fn has_rewards(&self) -> bool {
        self.rows
            .iter()
            .any(|r| r.cells.iter().flatten().any(|c| c.reward_acc.is_some()))
    }

    /// Sections as (title, header, rows).
    #[allow(clippy::type_complexity)]
    fn sections(&self) -> Vec<(String, Vec<String>, Vec<Vec<String>>)> {
        let mut out = Vec::new();
        let (h, r) = self.metric_grid(|c| Some(c.acc));
        out.push((
            "Accuracy (MC: argmax of summed log-prob; pairs: delta > 0)".into(),
            h,
            r,
        ));
        let (h, r) = self.metric_grid(|c| Some(c.prob));
        out.push((
            "Mean probability of the correct answer (MC: normalised over the choices, MC2 for several true answers; pairs: sigmoid(delta))".into(),
            h,
            r,
        ));
        if self.columns.iter().any(|c| c.kind == "mc") {
            let (h, r) = self.metric_grid(|c| c.acc_norm);
            out.push((
                "MC accuracy, length-normalised log-probabilities".into(),
                h,
                r,
            ));
        }
        if self.has_rewards() {
            let (h, r) = self.metric_grid(|c| c.reward_acc);
            out.push(("DPO reward accuracy against the base".into(), h, r));
            let (h, r) = self.metric_grid(|c| c.margin);
            out.push(("Mean DPO reward margin against the base".into(), h, r));
        }
        if !self.shifts.is_empty() {
            let (h, r) = self.shift_grid();
            out.push((
                "GENIES shifts (gain = accuracy / base accuracy)".into(),
                h,
                r,
            ));
        }
        out
    }

    /// Markdown: one table per metric, then the GENIES table.
    pub fn to_markdown(&self) -> String {
        let mut s = format!(
            "# Evaluation: suite `{}`\n\n{}\n",
            self.suite,
            self.truncation.line()
        );
        for (title, h, r) in self.sections() {
            s.push_str(&format!("\n## {title}\n\n{}", md(&h, &r)));
        }
        s
    }

    /// Plain aligned text for the terminal.
    pub fn to_terminal(&self) -> String {
        let mut s = format!("suite {}\n{}\n", self.suite, self.truncation.line());
        for (title, h, r) in self.sections() {
            s.push_str(&format!("\n{title}\n{}", aligned(&h, &r)));
        }
        s
    }

    /// CSV, one line per (model, dataset):
    /// `model,dataset,role,kind,n,acc,prob,acc_norm,prob_norm,reward_acc,margin` (empty = n/a).
    pub fn to_csv(&self) -> String {
        let opt = |x: Option<f64>| x.map(|v| format!("{v}")).unwrap_or_default();
        let q = |s: &str| {
            if s.contains([',', '"', '\n']) {
                format!("\"{}\"", s.replace('"', "\"\""))
            } else {
                s.to_string()
            }
        };
        let mut s = String::from(
            "model,dataset,role,kind,n,acc,prob,acc_norm,prob_norm,reward_acc,margin\n",
        );
        for r in &self.rows {
            for (c, cell) in self.columns.iter().zip(&r.cells) {
                let Some(x) = cell else { continue };
                s.push_str(&format!(
                    "{},{},{},{},{},{},{},{},{},{},{}\n",
                    q(&r.model),
                    q(&c.name),
                    c.role.mark(),
                    c.kind,
                    x.n,
                    x.acc,
                    x.prob,
                    opt(x.acc_norm),
                    opt(x.prob_norm),
                    opt(x.reward_acc),
                    opt(x.margin)
                ));
            }
        }
        s
    }

    /// Pretty JSON of the whole table.
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self).map_err(|e| EvalError::Invalid(e.to_string()))
    }
}
