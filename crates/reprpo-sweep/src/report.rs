//! `sweep report DIR`: per suite, one row per configuration and one column per dataset (with its
//! role: train / ID / OOD / unrelated), each cell the mean over seeds with its 95% Student-t
//! interval, and the paired difference against the configuration's baseline (same seeds); written
//! as `report/report.md`, `report.csv`, `report.json` and one `report/<suite>.png` per suite
//! (grouped bars with the intervals as error bars).
//!
//! A cell is `failed` when any of its configuration's runs failed or gave a non-finite value
//! (its values are still listed; no mean is formed from the others), `incomplete` when some seeds
//! have not run (the mean is over those that have), `missing` when none has. A configuration is
//! never dropped: every planned one has its row in every suite.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::fsx::{write_atomic, write_json};
use crate::plan::{Plan, read_plan};
use crate::results::{Measure, RunResult, TRAIN_JOB, read_run};
use crate::stats::{Interval, LEVEL, mean_ci, paired_ci};

/// The whole report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The sweep's name.
    pub name: String,
    /// `acc` or `prob`.
    pub metric: String,
    /// The intervals' confidence level.
    pub level: f64,
    /// The planned seeds.
    pub seeds: Vec<u64>,
    /// Every run and where it stands.
    pub runs: Vec<RunRow>,
    /// One table per suite.
    pub suites: Vec<SuiteTable>,
}

/// A run's line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRow {
    /// Plan index.
    pub index: usize,
    /// Folder name.
    pub id: String,
    /// Configuration label.
    pub label: String,
    /// Seed.
    pub seed: u64,
    /// `ok`, `failed` or `missing`.
    pub state: String,
    /// Why it failed.
    pub error: Option<String>,
}

/// A dataset column.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Column {
    /// Dataset name.
    pub dataset: String,
    /// Its role.
    pub role: String,
}

/// One suite's table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SuiteTable {
    /// The suite (`train-job`: the training job's own held-out evaluation).
    pub suite: String,
    /// Its datasets.
    pub columns: Vec<Column>,
    /// One row per configuration, in plan order.
    pub rows: Vec<ConfigRow>,
}

/// A configuration's row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigRow {
    /// Plan index of the configuration.
    pub config: usize,
    /// Its label.
    pub label: String,
    /// Its baseline's label.
    pub baseline: Option<String>,
    /// Whether it is some configuration's baseline.
    pub is_baseline: bool,
    /// Its runs in words: `2 of 2 ok`, `FAILED: seed 1 (1 of 2 ok)`, `1 of 2 ok, 1 not run`.
    pub runs: String,
    /// One cell per column.
    pub cells: Vec<CellStat>,
}

/// One (configuration, dataset) cell.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CellStat {
    /// `ok`, `incomplete`, `failed` or `missing`.
    pub status: String,
    /// `(seed, value)` of every run that gave one.
    pub values: Vec<(u64, f64)>,
    /// Seeds whose run failed or whose value is not finite.
    pub failed_seeds: Vec<u64>,
    /// Mean and interval (none when failed or missing).
    pub summary: Option<Interval>,
    /// The paired difference against the baseline (none without one, or when either failed).
    pub vs_baseline: Option<Interval>,
    /// `ok`, `failed` (this or the baseline cell), `missing` (no common seed) or none.
    pub vs_status: Option<String>,
}

/// Per run: its seed and result.
type Results = Vec<(u64, usize, RunResult)>;

/// Build the report of the sweep folder `dir`.
pub fn build(dir: &Path) -> Result<Report> {
    let plan = read_plan(dir)?;
    let results: Results = plan
        .runs
        .iter()
        .map(|r| (r.seed, r.config, read_run(dir, &plan, r)))
        .collect();
    let runs = plan
        .runs
        .iter()
        .zip(&results)
        .map(|(r, (_, _, res))| {
            let (state, error) = match res {
                RunResult::Ok(_) => ("ok", None),
                RunResult::Failed(e) => ("failed", Some(e.clone())),
                RunResult::Missing => ("missing", None),
            };
            RunRow {
                index: r.index,
                id: r.id.clone(),
                label: r.label.clone(),
                seed: r.seed,
                state: state.into(),
                error,
            }
        })
        .collect();
    let suites = suite_names(&plan, &results)
        .into_iter()
        .map(|s| suite_table(&plan, &results, &s))
        .collect();
    Ok(Report {
        name: plan.name.clone(),
        metric: plan.metric.name().into(),
        level: LEVEL,
        seeds: plan.seeds.clone(),
        runs,
        suites,
    })
}

/// `train-job`, then the eval suites, then any other suite a result names.
fn suite_names(plan: &Plan, results: &Results) -> Vec<String> {
    let mut out = vec![TRAIN_JOB.to_string()];
    out.extend(plan.eval.suites.iter().map(|s| s.name.clone()));
    for m in measures(results) {
        if !out.contains(&m.suite) {
            out.push(m.suite.clone());
        }
    }
    out
}

fn measures(results: &Results) -> impl Iterator<Item = &Measure> {
    results.iter().flat_map(|(_, _, r)| match r {
        RunResult::Ok(m) => m.as_slice(),
        _ => &[],
    })
}

fn suite_table(plan: &Plan, results: &Results, suite: &str) -> SuiteTable {
    let mut columns: Vec<Column> = Vec::new();
    for m in measures(results).filter(|m| m.suite == suite) {
        if !columns.iter().any(|c| c.dataset == m.dataset) {
            columns.push(Column {
                dataset: m.dataset.clone(),
                role: m.role.clone(),
            });
        }
    }
    let cells: Vec<Vec<CellStat>> = plan
        .configs
        .iter()
        .map(|c| {
            let col_cells = columns
                .iter()
                .map(|col| cell(plan, results, c.index, suite, &col.dataset));
            col_cells.collect()
        })
        .collect();
    let rows = plan
        .configs
        .iter()
        .map(|c| {
            let mut row_cells = cells[c.index].clone();
            if let Some(b) = c.baseline {
                for (cell, base) in row_cells.iter_mut().zip(&cells[b]) {
                    compare(cell, base);
                }
            }
            ConfigRow {
                config: c.index,
                label: c.label.clone(),
                baseline: c.baseline.map(|b| plan.configs[b].label.clone()),
                is_baseline: plan.configs.iter().any(|o| o.baseline == Some(c.index)),
                runs: runs_in_words(results, c.index),
                cells: row_cells,
            }
        })
        .collect();
    SuiteTable {
        suite: suite.into(),
        columns,
        rows,
    }
}

/// How the runs of configuration `config` stand, in words.
fn runs_in_words(results: &Results, config: usize) -> String {
    let mine: Vec<&(u64, usize, RunResult)> =
        results.iter().filter(|(_, c, _)| *c == config).collect();
    let ok = mine
        .iter()
        .filter(|r| matches!(r.2, RunResult::Ok(_)))
        .count();
    let failed: Vec<String> = mine
        .iter()
        .filter(|r| matches!(r.2, RunResult::Failed(_)))
        .map(|r| r.0.to_string())
        .collect();
    let missing = mine.iter().filter(|r| r.2 == RunResult::Missing).count();
    let mut s = format!("{ok} of {} ok", mine.len());
    if !failed.is_empty() {
        let seeds = if failed.len() == 1 { "seed" } else { "seeds" };
        s = format!("FAILED: {seeds} {} ({s})", failed.join(", "));
    }
    if missing > 0 {
        s.push_str(&format!(", {missing} not run"));
    }
    s
}

/// The cell of configuration `config` on `(suite, dataset)`.
fn cell(plan: &Plan, results: &Results, config: usize, suite: &str, dataset: &str) -> CellStat {
    let mut values = Vec::new();
    let mut failed_seeds = Vec::new();
    for (seed, _, r) in results.iter().filter(|(_, c, _)| *c == config) {
        match r {
            RunResult::Failed(_) => failed_seeds.push(*seed),
            RunResult::Missing => {}
            RunResult::Ok(ms) => {
                let v = ms.iter().find(|m| m.suite == suite && m.dataset == dataset);
                match v.map(|m| m.value) {
                    Some(x) if x.is_finite() => values.push((*seed, x)),
                    Some(x) => {
                        values.push((*seed, x));
                        failed_seeds.push(*seed);
                    }
                    None => {}
                }
            }
        }
    }
    let planned = plan.seeds.len();
    let xs: Vec<f64> = values.iter().map(|(_, x)| *x).collect();
    let (status, summary) = if !failed_seeds.is_empty() {
        ("failed", None)
    } else if values.is_empty() {
        ("missing", None)
    } else if values.len() < planned {
        ("incomplete", mean_ci(&xs, LEVEL))
    } else {
        ("ok", mean_ci(&xs, LEVEL))
    };
    CellStat {
        status: status.into(),
        values,
        failed_seeds,
        summary,
        vs_baseline: None,
        vs_status: None,
    }
}

/// Fill `cell`'s paired difference against `base` over their common seeds.
fn compare(cell: &mut CellStat, base: &CellStat) {
    if cell.status == "failed" || base.status == "failed" {
        cell.vs_status = Some("failed".into());
        return;
    }
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for (seed, x) in &cell.values {
        if let Some((_, y)) = base.values.iter().find(|(s, _)| s == seed) {
            a.push(*x);
            b.push(*y);
        }
    }
    cell.vs_baseline = paired_ci(&a, &b, LEVEL);
    cell.vs_status = Some(if a.is_empty() { "missing" } else { "ok" }.into());
}

/// `0.812 ± 0.034 (n=5)`, `0.812 (n=1)`.
fn show_interval(i: &Interval, signed: bool) -> String {
    let m = if signed {
        format!("{:+.3}", i.mean)
    } else {
        format!("{:.3}", i.mean)
    };
    match i.half_width {
        Some(h) => format!("{m} ± {h:.3} (n={})", i.n),
        None => format!("{m} (n={}, no interval)", i.n),
    }
}

fn show_cell(c: &CellStat, planned: usize) -> String {
    match (c.status.as_str(), &c.summary) {
        ("failed", _) => {
            let seeds: Vec<String> = c.failed_seeds.iter().map(|s| s.to_string()).collect();
            format!("FAILED (seed {})", seeds.join(", "))
        }
        ("incomplete", Some(i)) => {
            format!("{} [{} of {planned} seeds]", show_interval(i, false), i.n)
        }
        (_, Some(i)) => show_interval(i, false),
        _ => "not run".into(),
    }
}

fn show_diff(c: &CellStat) -> String {
    match (c.vs_status.as_deref(), &c.vs_baseline) {
        (Some("failed"), _) => "FAILED".into(),
        (_, Some(i)) => show_interval(i, true),
        _ => "not run".into(),
    }
}

/// The Markdown report.
pub fn to_markdown(r: &Report) -> String {
    let mut s = String::new();
    let ok = r.runs.iter().filter(|x| x.state == "ok").count();
    let failed = r.runs.iter().filter(|x| x.state == "failed").count();
    let _ = writeln!(
        s,
        "# Sweep `{}`: {}, mean ± {:.0}% confidence interval over seeds (Student t)\n",
        r.name,
        r.metric,
        100.0 * r.level
    );
    let _ = writeln!(
        s,
        "{} runs planned ({} seeds): {ok} ok, {failed} failed, {} not run.",
        r.runs.len(),
        r.seeds.len(),
        r.runs.len() - ok - failed
    );
    for t in &r.suites {
        suite_markdown(&mut s, t, r.seeds.len());
    }
    let bad: Vec<&RunRow> = r.runs.iter().filter(|x| x.state == "failed").collect();
    if !bad.is_empty() {
        s.push_str("\n## Failed runs\n\n");
        for x in bad {
            let e = x.error.as_deref().unwrap_or("").replace('\n', " ");
            let _ = writeln!(s, "- `{}` (index {}, seed {}): {e}", x.id, x.index, x.seed);
        }
    }
    s
}

fn suite_markdown(s: &mut String, t: &SuiteTable, planned: usize) {
    let what = if t.suite == TRAIN_JOB {
        " (the training job's held-out evaluation, summary.json)"
    } else {
        ""
    };
    let _ = writeln!(s, "\n## Suite `{}`{what}\n", t.suite);
    let mut head = vec!["runs".to_string()];
    head.extend(
        t.columns
            .iter()
            .map(|c| format!("{} ({})", c.dataset, c.role)),
    );
    let _ = writeln!(s, "| configuration | {} |", head.join(" | "));
    let _ = writeln!(s, "|---|{}", "---|".repeat(head.len()));
    for row in &t.rows {
        let mark = if row.is_baseline { " (baseline)" } else { "" };
        let mut cells = vec![row.runs.clone()];
        cells.extend(row.cells.iter().map(|c| show_cell(c, planned)));
        let _ = writeln!(s, "| {}{mark} | {} |", row.label, cells.join(" | "));
    }
    head.remove(0);
    let compared: Vec<&ConfigRow> = t.rows.iter().filter(|r| r.baseline.is_some()).collect();
    if compared.is_empty() || t.columns.is_empty() {
        return;
    }
    s.push_str("\nPaired difference against the baseline (same seeds), mean ± 95% CI:\n\n");
    let _ = writeln!(s, "| configuration - baseline | {} |", head.join(" | "));
    let _ = writeln!(s, "|---|{}", "---|".repeat(head.len()));
    for row in compared {
        let cells: Vec<String> = row.cells.iter().map(show_diff).collect();
        let b = row.baseline.as_deref().unwrap_or("");
        let _ = writeln!(s, "| {} - {b} | {} |", row.label, cells.join(" | "));
    }
}

/// CSV, one line per (suite, dataset, configuration).
pub fn to_csv(r: &Report) -> String {
    let q = |s: &str| {
        if s.contains([',', '"', '\n']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s.to_string()
        }
    };
    let f = |x: Option<f64>| x.map(|v| v.to_string()).unwrap_or_default();
    let mut s = String::from(
        "suite,dataset,role,config,label,status,n,mean,sd,ci_low,ci_high,baseline,diff_status,diff_n,diff_mean,diff_low,diff_high\n",
    );
    for t in &r.suites {
        for row in &t.rows {
            for (col, c) in t.columns.iter().zip(&row.cells) {
                let i = c.summary.as_ref();
                let d = c.vs_baseline.as_ref();
                let _ = writeln!(
                    s,
                    "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
                    q(&t.suite),
                    q(&col.dataset),
                    q(&col.role),
                    row.config,
                    q(&row.label),
                    c.status,
                    i.map(|i| i.n.to_string()).unwrap_or_default(),
                    f(i.map(|i| i.mean)),
                    f(i.and_then(|i| i.sd)),
                    f(i.and_then(|i| i.lo)),
                    f(i.and_then(|i| i.hi)),
                    q(row.baseline.as_deref().unwrap_or("")),
                    c.vs_status.as_deref().unwrap_or(""),
                    d.map(|i| i.n.to_string()).unwrap_or_default(),
                    f(d.map(|i| i.mean)),
                    f(d.and_then(|i| i.lo)),
                    f(d.and_then(|i| i.hi)),
                );
            }
        }
    }
    s
}

/// Write `report/report.{md,csv,json}` and a chart per suite; the files written.
pub fn write(dir: &Path, r: &Report) -> Result<Vec<PathBuf>> {
    let out = dir.join("report");
    let mut written = Vec::new();
    let md = out.join("report.md");
    write_atomic(&md, to_markdown(r).as_bytes())?;
    written.push(md);
    let csv = out.join("report.csv");
    write_atomic(&csv, to_csv(r).as_bytes())?;
    written.push(csv);
    let json = out.join("report.json");
    write_json(&json, r)?;
    written.push(json);
    for t in &r.suites {
        let png = out.join(format!("{}.png", crate::plan::slug(&t.suite)));
        crate::plot::suite_chart(&png, r, t)?;
        written.push(png);
    }
    Ok(written)
}
