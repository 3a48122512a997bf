//! What a finished run measured: one value per (suite, dataset) of the chosen metric, read from
//! its folder.
//!
//! - suite `train-job`: the training job's own held-out evaluation, `train/summary.json`:
//!   `adapter/id/accuracy` (role ID, dataset `data/id`) and `adapter/ood/accuracy` (role OOD,
//!   dataset `data/ood`); `prob` reads `adapter/*/prob`;
//! - each eval suite: `eval/<suite>/table.json`, the adapter's row (the one that is not `base`),
//!   every scored column with its role (train / ID / OOD / unrelated) and `acc` or `prob`.
//!
//! A value may be non-finite; the report shows such a configuration as failed.

use std::path::Path;

use reprpo_eval::table::Table;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Result, folder_err};
use crate::fsx::read_json;
use crate::plan::{Plan, PlannedRun};
use crate::run_one::{State, run_dir, status_of};
use crate::spec::{Metric, SuiteRef};

/// The pseudo-suite of the training job's own evaluation.
pub const TRAIN_JOB: &str = "train-job";

/// One measured value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Measure {
    /// Suite (`train-job` or an eval suite's name).
    pub suite: String,
    /// Dataset (column) name.
    pub dataset: String,
    /// `train`, `ID`, `OOD` or `unrelated`.
    pub role: String,
    /// The metric's value.
    pub value: f64,
}

/// Where a run stands.
#[derive(Debug, Clone, PartialEq)]
pub enum RunResult {
    /// Done; its values.
    Ok(Vec<Measure>),
    /// Failed (or its results cannot be read): why.
    Failed(String),
    /// Not run (yet).
    Missing,
}

/// Read the result of `run` (a run trained with another configuration than the plan gives it
/// is failed).
pub fn read_run(dir: &Path, plan: &Plan, run: &PlannedRun) -> RunResult {
    if let Some(status) = status_of(dir, &run.id)
        && status.config_hash != run.config_hash
    {
        return RunResult::Failed(format!(
            "trained with another configuration (hash {}, the plan has {})",
            status.config_hash, run.config_hash
        ));
    }
    run_measures(dir, &run.id, &plan.eval.suites, plan.metric)
}

/// The values of run `id` of the sweep folder `dir`: the training job's and those of each eval
/// suite of `suites`.
pub fn run_measures(dir: &Path, id: &str, suites: &[SuiteRef], metric: Metric) -> RunResult {
    let Some(status) = status_of(dir, id) else {
        return RunResult::Missing;
    };
    if status.status == State::Failed {
        return RunResult::Failed(status.error.unwrap_or_else(|| "failed".into()));
    }
    let folder = run_dir(dir, id);
    let mut out = match train_job(&folder.join("train/summary.json"), metric) {
        Ok(m) => m,
        Err(e) => return RunResult::Failed(e.to_string()),
    };
    for s in suites {
        let path = folder.join("eval").join(&s.name).join("table.json");
        match suite_values(&path, &s.name, metric) {
            Ok(m) => out.extend(m),
            Err(e) => return RunResult::Failed(e.to_string()),
        }
    }
    RunResult::Ok(out)
}

/// The training summary's held-out values.
fn train_job(path: &Path, metric: Metric) -> Result<Vec<Measure>> {
    let s: serde_json::Map<String, Value> = read_json(path)?;
    let field = match metric {
        Metric::Acc => "accuracy",
        Metric::Prob => "prob",
    };
    let mut out = Vec::new();
    for (split, role) in [("id", "ID"), ("ood", "OOD")] {
        let Some(v) = s.get(&format!("adapter/{split}/{field}")) else {
            continue;
        };
        // A non-finite number is written as null by serde_json.
        let value = v.as_f64().unwrap_or(f64::NAN);
        let dataset = match s.get(&format!("data/{split}")) {
            Some(Value::String(d)) => d.clone(),
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join("+"),
            _ => split.to_string(),
        };
        out.push(Measure {
            suite: TRAIN_JOB.into(),
            dataset,
            role: role.into(),
            value,
        });
    }
    Ok(out)
}

/// An eval table's adapter row.
fn suite_values(path: &Path, suite: &str, metric: Metric) -> Result<Vec<Measure>> {
    let table: Table = read_json(path)?;
    let row = table
        .rows
        .iter()
        .find(|r| r.model != "base")
        .ok_or_else(|| folder_err(path, "no adapter row"))?;
    let mut out = Vec::new();
    for (col, cell) in table.columns.iter().zip(&row.cells) {
        let Some(cell) = cell else { continue };
        out.push(Measure {
            suite: suite.to_string(),
            dataset: col.name.clone(),
            role: col.role.mark().to_string(),
            value: match metric {
                Metric::Acc => cell.acc,
                Metric::Prob => cell.prob,
            },
        });
    }
    Ok(out)
}
