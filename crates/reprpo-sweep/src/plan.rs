//! The plan: a sweep file expanded into configurations and runs, every run's configuration
//! resolved (and so validated) the way `cargo xtask train --print-config` resolves it, and written
//! into the sweep folder:
//!
//! ```text
//! <dir>/plan.json            the plan (written last: a folder with it is planned)
//! <dir>/sweep.toml           a copy of the sweep file
//! <dir>/configs/<id>.toml    each run's resolved configuration (what run-one trains)
//! <dir>/runs/<id>/           each run's results (see `run_one.rs`)
//! ```
//!
//! Order: seeds outermost, then variants (file order), then the axes (alphabetical keys, the
//! first slowest; values in file order), so a partly run sweep has every configuration at its
//! first seeds. A run's id is its label made safe for a folder name plus `-s<seed>`: the same
//! file plans the same ids, and extending an axis keeps the ids (and results) of the runs that
//! were there.

use std::path::{Path, PathBuf};

use reprpo_train::config::parse_override;
use reprpo_train::{Sources, TrainConfig, TrainError};
use serde::{Deserialize, Serialize};

use crate::error::{Result, folder_err, io, key_err};
use crate::fsx::{read_json, write_atomic, write_json};
use crate::results::{Measure, RunResult, TRAIN_JOB, run_measures};
use crate::search::Search;
use crate::spec::{EvalSpec, Metric, SlurmSpec, SweepSpec};
use crate::tpe::{Objective, Point, Tpe};

/// The plan file's format version.
pub const PLAN_VERSION: u32 = 1;
/// Longest folder-name part taken from a label (longer ones end in a hash of the label).
const MAX_SLUG: usize = 80;

/// A planned sweep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// [`PLAN_VERSION`].
    pub version: u32,
    /// The sweep's name.
    pub name: String,
    /// Free text from the sweep file.
    pub description: Option<String>,
    /// The sweep file it was planned from.
    pub sweep_file: PathBuf,
    /// The base train config file, if any.
    pub base_file: Option<PathBuf>,
    /// The seeds.
    pub seeds: Vec<u64>,
    /// The keys each seed sets.
    pub seed_keys: Vec<String>,
    /// The metric reports compare.
    pub metric: Metric,
    /// The baseline as written in the sweep file.
    pub baseline: Option<String>,
    /// Evaluation after each run.
    pub eval: EvalSpec,
    /// `sweep slurm`'s resources.
    pub slurm: SlurmSpec,
    /// The configurations (one per variant x axis combination).
    pub configs: Vec<ConfigEntry>,
    /// The runs (one per seed x configuration).
    pub runs: Vec<PlannedRun>,
}

/// One configuration: what its runs share.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigEntry {
    /// Its position in [`Plan::configs`].
    pub index: usize,
    /// Its label: the variant's name and the `key=value` of every axis with more than one value
    /// (`base` when nothing varies).
    pub label: String,
    /// What it sets that varies: `("variant", name)` and `(axis key, value)`.
    pub settings: Vec<(String, String)>,
    /// Its `key=value` overrides (base keys, variant keys, axes), without the seed keys.
    pub overrides: Vec<String>,
    /// The configuration it is compared with (none for the baseline itself or without one).
    pub baseline: Option<usize>,
}

/// One run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannedRun {
    /// Its position in [`Plan::runs`] (`run-one INDEX`, `SLURM_ARRAY_TASK_ID`).
    pub index: usize,
    /// Its folder name under `runs/` (and `configs/<id>.toml`).
    pub id: String,
    /// Its configuration's index.
    pub config: usize,
    /// Its configuration's label.
    pub label: String,
    /// Its seed.
    pub seed: u64,
    /// Every `key=value` override, seed keys last: `cargo xtask train [BASE] OVERRIDES` trains it.
    pub overrides: Vec<String>,
    /// FNV-1a hash of its resolved configuration (`configs/<id>.toml`), recorded in its status.
    pub config_hash: String,
}

/// What planning needs from the workspace.
#[derive(Debug, Clone)]
pub struct PlanContext {
    /// The `datasets/` folder (suites are in `datasets/suites/`).
    pub datasets_dir: PathBuf,
    /// The sweep folder the plan goes to, whose finished runs a TPE search reads to propose its
    /// next round (`None`, or a folder without runs: the startup trials only).
    pub sweep_dir: Option<PathBuf>,
}

/// A plan with every run's resolved configuration (TOML), in run order.
#[derive(Debug, Clone)]
pub struct Planned {
    /// The plan.
    pub plan: Plan,
    /// `configs/<id>.toml` of each run.
    pub configs: Vec<String>,
}

/// FNV-1a, 64 bits: a hash that is the same on every machine and Rust version.
pub fn fnv64(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A value as a label shows it: strings bare, everything else as TOML writes it.
fn show(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A run's folder name: its configuration's [`slug`] and its seed (`<slug>-s<seed>`).
fn run_id(label: &str, seed: u64) -> String {
    format!("{}-s{seed}", slug(label))
}

/// `label` as a folder name: ASCII letters, digits, `.`, `-` and `_` kept, `=` as `-`, spaces as
/// `_`, the rest `_`; longer than `MAX_SLUG`: cut, with a hash of the whole label.
pub fn slug(label: &str) -> String {
    let s: String = label
        .chars()
        .map(|c| match c {
            c if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') => c,
            '=' => '-',
            _ => '_',
        })
        .collect();
    let s = s.trim_start_matches('.').to_string();
    if s.len() <= MAX_SLUG && !s.is_empty() {
        return s;
    }
    let cut: String = s.chars().take(MAX_SLUG - 9).collect();
    format!("{cut}-{:08x}", fnv64(label) as u32)
}

/// Where a configuration key came from in the sweep file, for error messages.
#[derive(Debug, Clone)]
struct Origin {
    /// The configuration key (aliases resolved: `lr` -> `train.lr`).
    key: String,
    /// The `key=value` argument.
    arg: String,
    /// Where in the sweep file (`axes."train.lr"`, `variant "dpo": loss`, `base: train.lr`).
    at: String,
}

/// A configuration before it has an index: overrides with their origins, and its coordinates.
#[derive(Debug, Clone)]
struct Draft {
    origins: Vec<Origin>,
    variant: Option<usize>,
    combo: Vec<usize>,
    /// The random search's point.
    trial: Option<Trial>,
}

/// A point of the random search: its number and values.
type Trial = (usize, Vec<(String, toml::Value)>);

fn origin(file: &Path, key: &str, value: &toml::Value, at: String) -> Result<Origin> {
    let arg = format!("{key}={value}");
    let (norm, _) = parse_override(&arg).map_err(|e| key_err(file, &at, e.to_string()))?;
    Ok(Origin { key: norm, arg, at })
}

/// Every combination of the axes' value indices, the first axis slowest.
fn combos(axes: &[(String, Vec<toml::Value>)]) -> Vec<Vec<usize>> {
    let mut out = vec![Vec::new()];
    for (_, values) in axes {
        out = out
            .into_iter()
            .flat_map(|c| {
                (0..values.len()).map(move |i| {
                    let mut c = c.clone();
                    c.push(i);
                    c
                })
            })
            .collect();
    }
    out
}

/// The variants' indices (`[None]` without variants).
fn variant_indices(spec: &SweepSpec) -> Vec<Option<usize>> {
    if spec.variants.is_empty() {
        vec![None]
    } else {
        (0..spec.variants.len()).map(Some).collect()
    }
}

fn drafts(spec: &SweepSpec, ctx: &PlanContext) -> Result<Vec<Draft>> {
    let f = &spec.file;
    let mut base = Vec::with_capacity(spec.base_keys.len());
    for (k, v) in &spec.base_keys {
        base.push(origin(f, k, v, format!("base.\"{k}\""))?);
    }
    let points = match &spec.search {
        None => None,
        Some(s) => Some(match &s.tpe {
            None => s.draws(),
            Some(t) => tpe_points(spec, &base, s, t, ctx)?,
        }),
    };
    let trials: Vec<Option<Trial>> = match points {
        None => vec![None],
        Some(p) => p.into_iter().enumerate().map(Some).collect(),
    };
    let mut out = Vec::new();
    for v in variant_indices(spec) {
        for combo in combos(&spec.axes) {
            for trial in &trials {
                out.push(draft(spec, &base, v, &combo, trial.clone())?);
            }
        }
    }
    Ok(out)
}

/// TPE's trials: the random startup points, then a round of proposals each time every run of
/// every trial so far has finished in the sweep folder (see `tpe.rs`). A trial without a finite
/// value (its runs failed) is told as the worst value of the others, so TPE leaves a region
/// where training diverges; with no finite value at all, nothing is told (TPE's prior).
fn tpe_points(
    spec: &SweepSpec,
    base: &[Origin],
    s: &Search,
    t: &Tpe,
    ctx: &PlanContext,
) -> Result<Vec<Point>> {
    let o = &t.objective;
    if o.suite != TRAIN_JOB && !spec.eval.suites.iter().any(|x| x.name == o.suite) {
        return Err(key_err(
            &spec.file,
            "search.objective.suite",
            format!(
                "`{}` is neither `{TRAIN_JOB}` nor a suite of `[eval] suites`",
                o.suite
            ),
        ));
    }
    let mut points: Vec<Point> = s.draws().into_iter().take(t.startup).collect();
    let Some(dir) = &ctx.sweep_dir else {
        return Ok(points);
    };
    let mut round = 1;
    while points.len() < s.budget {
        let mut history = Vec::with_capacity(points.len());
        let mut failed = Vec::new();
        for (k, p) in points.iter().enumerate() {
            match trial_value(spec, base, (k, p.clone()), o, dir)? {
                None => return Ok(points),
                Some(Some(v)) => history.push((p.clone(), v)),
                Some(None) => failed.push(p.clone()),
            }
        }
        // A failed trial (diverged, non-finite) marks a bad region: told as the worst value seen.
        let worst =
            history
                .iter()
                .map(|(_, v)| *v)
                .reduce(if o.maximize { f64::min } else { f64::max });
        if let Some(w) = worst {
            history.extend(failed.into_iter().map(|p| (p, w)));
        }
        let n = t.batch.min(s.budget - points.len());
        let new = crate::tpe::propose(s, t, &history, n, round)
            .map_err(|e| key_err(&spec.file, "search", e))?;
        points.extend(new);
        round += 1;
    }
    Ok(points)
}

/// A trial's objective: `None` while one of its runs is not finished, then the mean of its
/// runs' finite values (`Some(None)` when there is none: every run failed or was not finite).
fn trial_value(
    spec: &SweepSpec,
    base: &[Origin],
    trial: Trial,
    o: &Objective,
    dir: &Path,
) -> Result<Option<Option<f64>>> {
    let mut values = Vec::new();
    for v in variant_indices(spec) {
        for combo in combos(&spec.axes) {
            let d = draft(spec, base, v, &combo, Some(trial.clone()))?;
            let name = label(spec, &d);
            for &seed in &spec.seeds {
                let id = run_id(&name, seed);
                match run_measures(dir, &id, &spec.eval.suites, spec.metric) {
                    RunResult::Missing => return Ok(None),
                    RunResult::Failed(_) => {}
                    RunResult::Ok(m) => values.push(objective_of(spec, &id, &m, o)?),
                }
            }
        }
    }
    let finite: Vec<f64> = values.into_iter().filter(|v| v.is_finite()).collect();
    Ok(Some(
        (!finite.is_empty()).then(|| finite.iter().sum::<f64>() / finite.len() as f64),
    ))
}

/// The objective's value among a run's measures; an error naming what the run has.
fn objective_of(spec: &SweepSpec, id: &str, m: &[Measure], o: &Objective) -> Result<f64> {
    m.iter()
        .find(|x| x.suite == o.suite && x.dataset == o.dataset)
        .map(|x| x.value)
        .ok_or_else(|| {
            let have: Vec<String> = m
                .iter()
                .filter(|x| x.suite == o.suite)
                .map(|x| x.dataset.clone())
                .collect();
            key_err(
                &spec.file,
                "search.objective.dataset",
                format!(
                    "run `{id}` has no dataset `{}` in suite `{}` (it has: {})",
                    o.dataset,
                    o.suite,
                    have.join(", ")
                ),
            )
        })
}

/// One configuration's overrides: base, variant, axes, search point.
fn draft(
    spec: &SweepSpec,
    base: &[Origin],
    variant: Option<usize>,
    combo: &[usize],
    trial: Option<Trial>,
) -> Result<Draft> {
    let f = &spec.file;
    let mut origins = base.to_vec();
    if let Some(vi) = variant {
        let var = &spec.variants[vi];
        for (k, val) in &var.keys {
            let at = format!("variant \"{}\": \"{k}\"", var.name);
            origins.push(origin(f, k, val, at)?);
        }
    }
    for ((k, values), &i) in spec.axes.iter().zip(combo) {
        origins.push(origin(f, k, &values[i], format!("axes.\"{k}\""))?);
    }
    for (k, val) in trial.iter().flat_map(|(_, p)| p) {
        origins.push(origin(f, k, val, format!("search.space.\"{k}\""))?);
    }
    Ok(Draft {
        origins,
        variant,
        combo: combo.to_vec(),
        trial,
    })
}

fn settings(spec: &SweepSpec, d: &Draft) -> Vec<(String, String)> {
    let mut s = Vec::new();
    if let Some(v) = d.variant {
        s.push(("variant".to_string(), spec.variants[v].name.clone()));
    }
    for ((k, values), &i) in spec.axes.iter().zip(&d.combo) {
        s.push((k.clone(), show(&values[i])));
    }
    for (k, v) in d.trial.iter().flat_map(|(_, p)| p) {
        s.push((k.clone(), show(v)));
    }
    s
}

fn label(spec: &SweepSpec, d: &Draft) -> String {
    let mut parts = Vec::new();
    if let Some(v) = d.variant.filter(|_| spec.variants.len() > 1) {
        parts.push(spec.variants[v].name.clone());
    }
    for ((k, values), &i) in spec.axes.iter().zip(&d.combo) {
        if values.len() > 1 {
            parts.push(format!("{k}={}", show(&values[i])));
        }
    }
    if let Some((n, point)) = &d.trial {
        parts.push(format!("trial-{n:02}"));
        parts.extend(point.iter().map(|(k, v)| format!("{k}={}", show(v))));
    }
    match (parts.is_empty(), d.variant) {
        (false, _) => parts.join(" "),
        (true, Some(v)) => spec.variants[v].name.clone(),
        (true, None) => "base".into(),
    }
}

/// Which configuration is each one's baseline (see the module docs of `spec.rs`).
fn baselines(spec: &SweepSpec, drafts: &[Draft], labels: &[String]) -> Result<Vec<Option<usize>>> {
    let Some(b) = &spec.baseline else {
        return Ok(vec![None; drafts.len()]);
    };
    if let Some(i) = labels.iter().position(|l| l == b) {
        return Ok((0..drafts.len()).map(|j| (j != i).then_some(i)).collect());
    }
    // The coordinate it names: (None, variant) or (Some(axis), value index).
    let coord: Option<(Option<usize>, usize)> =
        match spec.variants.iter().position(|v| &v.name == b) {
            Some(vi) => Some((None, vi)),
            None => axis_value(spec, b)?,
        };
    let Some((axis, value)) = coord else {
        return Err(key_err(
            &spec.file,
            "baseline",
            format!(
                "`{b}` is no configuration label, variant name or axis value (labels: {})",
                labels.join("; ")
            ),
        ));
    };
    let counterpart = |d: &Draft| -> Option<usize> {
        drafts.iter().position(|o| match axis {
            None => o.variant == Some(value) && o.combo == d.combo && o.trial == d.trial,
            Some(a) => {
                o.variant == d.variant
                    && o.trial == d.trial
                    && o.combo[a] == value
                    && o.combo
                        .iter()
                        .zip(&d.combo)
                        .enumerate()
                        .all(|(k, (x, y))| k == a || x == y)
            }
        })
    };
    Ok(drafts
        .iter()
        .enumerate()
        .map(|(j, d)| counterpart(d).filter(|&i| i != j))
        .collect())
}

/// `key=value` of an axis, or a bare value found in exactly one axis: (axis, value index).
fn axis_value(spec: &SweepSpec, b: &str) -> Result<Option<(Option<usize>, usize)>> {
    let hits: Vec<(usize, usize)> = spec
        .axes
        .iter()
        .enumerate()
        .flat_map(|(a, (k, values))| {
            values.iter().enumerate().filter_map(move |(i, v)| {
                let shown = show(v);
                (b == shown || b == format!("{k}={shown}")).then_some((a, i))
            })
        })
        .collect();
    match hits.as_slice() {
        [] => Ok(None),
        [(a, i)] => Ok(Some((Some(*a), *i))),
        _ => Err(key_err(
            &spec.file,
            "baseline",
            format!("`{b}` is a value of several axes; write it as key=value"),
        )),
    }
}

/// Resolve one run's configuration; an error names where in the sweep file the bad key is.
fn resolve(
    spec: &SweepSpec,
    origins: &[Origin],
    overrides: &[String],
    label: &str,
) -> Result<String> {
    let src = Sources {
        file: spec.base_file.clone(),
        overrides: overrides.to_vec(),
        env: false,
    };
    let cfg = TrainConfig::resolve(&src).map_err(|e| resolve_err(spec, origins, label, e))?;
    cfg.to_toml()
        .map_err(|e| resolve_err(spec, origins, label, e))
}

fn resolve_err(
    spec: &SweepSpec,
    origins: &[Origin],
    label: &str,
    e: TrainError,
) -> crate::SweepError {
    let hit = |o: &&Origin| match &e {
        TrainError::Config { key, .. } => {
            key == &o.key
                || key.starts_with(&format!("{}.", o.key))
                || o.key.starts_with(&format!("{key}."))
        }
        TrainError::Override { arg, .. } => arg == &o.arg,
        _ => false,
    };
    match origins.iter().rev().find(hit) {
        Some(o) => key_err(&spec.file, &o.at, e.to_string()),
        None => key_err(
            &spec.file,
            format!("configuration `{label}`"),
            e.to_string(),
        ),
    }
}

/// Check the eval suites and options.
fn check_eval(spec: &SweepSpec, ctx: &PlanContext) -> Result<()> {
    use reprpo_eval::suite::Suite;
    let suites_dir = ctx.datasets_dir.join("suites");
    for s in &spec.eval.suites {
        let loaded = if s.arg.ends_with(".toml") || s.arg.contains('/') {
            Suite::load(Path::new(&s.arg), &ctx.datasets_dir)
        } else {
            Suite::by_name(&s.arg, &suites_dir, &ctx.datasets_dir)
        };
        loaded.map_err(|e| key_err(&spec.file, "eval.suites", e.to_string()))?;
    }
    let mut table = toml::Table::try_from(reprpo_eval::evaluate::EvalOptions::default())
        .map_err(|e| key_err(&spec.file, "eval.options", e.to_string()))?;
    for kv in &spec.eval.options {
        let (k, v) =
            parse_override(kv).map_err(|e| key_err(&spec.file, "eval.options", e.to_string()))?;
        set_dotted(&mut table, &k, v);
    }
    table
        .try_into::<reprpo_eval::evaluate::EvalOptions>()
        .map_err(|e| key_err(&spec.file, "eval.options", e.to_string().trim().to_string()))?;
    Ok(())
}

/// Set `key` (dotted) in `table`, creating tables on the way.
fn set_dotted(table: &mut toml::Table, key: &str, value: toml::Value) {
    match key.split_once('.') {
        None => {
            table.insert(key.to_string(), value);
        }
        Some((head, rest)) => {
            let entry = table
                .entry(head.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if !entry.is_table() {
                *entry = toml::Value::Table(toml::Table::new());
            }
            if let toml::Value::Table(t) = entry {
                set_dotted(t, rest, value);
            }
        }
    }
}

/// Expand, check and resolve `spec` into a plan (nothing is written).
pub fn plan(spec: &SweepSpec, ctx: &PlanContext) -> Result<Planned> {
    check_eval(spec, ctx)?;
    let drafts = drafts(spec, ctx)?;
    let labels: Vec<String> = drafts.iter().map(|d| label(spec, d)).collect();
    let base_of = baselines(spec, &drafts, &labels)?;
    let mut configs = Vec::with_capacity(drafts.len());
    for (i, d) in drafts.iter().enumerate() {
        let slug_i = slug(&labels[i]);
        if let Some(j) = (0..i).find(|&j| slug(&labels[j]) == slug_i) {
            return Err(key_err(
                &spec.file,
                "variant",
                format!(
                    "configurations `{}` and `{}` would share the folder name `{slug_i}`; rename one",
                    labels[j], labels[i]
                ),
            ));
        }
        configs.push(ConfigEntry {
            index: i,
            label: labels[i].clone(),
            settings: settings(spec, d),
            overrides: d.origins.iter().map(|o| o.arg.clone()).collect(),
            baseline: base_of[i],
        });
    }
    let mut runs = Vec::with_capacity(configs.len() * spec.seeds.len());
    let mut resolved = Vec::with_capacity(runs.capacity());
    for &seed in &spec.seeds {
        for (c, d) in configs.iter().zip(&drafts) {
            let mut origins = d.origins.clone();
            for k in &spec.seed_keys {
                let v = toml::Value::Integer(seed as i64);
                origins.push(origin(&spec.file, k, &v, "seed_keys".into())?);
            }
            let overrides: Vec<String> = origins.iter().map(|o| o.arg.clone()).collect();
            let toml_text = resolve(spec, &origins, &overrides, &c.label)?;
            runs.push(PlannedRun {
                index: runs.len(),
                id: run_id(&c.label, seed),
                config: c.index,
                label: c.label.clone(),
                seed,
                overrides,
                config_hash: format!("{:016x}", fnv64(&toml_text)),
            });
            resolved.push(toml_text);
        }
    }
    let plan = Plan {
        version: PLAN_VERSION,
        name: spec.name.clone(),
        description: spec.description.clone(),
        sweep_file: spec.file.clone(),
        base_file: spec.base_file.clone(),
        seeds: spec.seeds.clone(),
        seed_keys: spec.seed_keys.clone(),
        metric: spec.metric,
        baseline: spec.baseline.clone(),
        eval: spec.eval.clone(),
        slurm: spec.slurm.clone(),
        configs,
        runs,
    };
    Ok(Planned {
        plan,
        configs: resolved,
    })
}

/// `<dir>/plan.json`.
pub fn plan_path(dir: &Path) -> PathBuf {
    dir.join("plan.json")
}

/// `<dir>/configs/<id>.toml`.
pub fn config_path(dir: &Path, id: &str) -> PathBuf {
    dir.join("configs").join(format!("{id}.toml"))
}

/// `<dir>/runs`.
pub fn runs_dir(dir: &Path) -> PathBuf {
    dir.join("runs")
}

/// Read `<dir>/plan.json`.
pub fn read_plan(dir: &Path) -> Result<Plan> {
    let path = plan_path(dir);
    if !path.is_file() {
        return Err(folder_err(
            &path,
            "no plan here: give a sweep folder (made by `sweep plan`) or a sweep file",
        ));
    }
    let plan: Plan = read_json(&path)?;
    if plan.version != PLAN_VERSION {
        return Err(folder_err(
            &path,
            format!(
                "plan version {} (this build reads {PLAN_VERSION}): plan again",
                plan.version
            ),
        ));
    }
    Ok(plan)
}

/// Write a plan into `dir`: the configs, the sweep file's copy, then `plan.json` (last, so a
/// folder with a plan is complete). Refuses when a finished run of the same id was trained with
/// another configuration.
pub fn write_plan(dir: &Path, planned: &Planned) -> Result<()> {
    for run in &planned.plan.runs {
        let status = runs_dir(dir).join(&run.id).join("status.json");
        if let Ok(s) = read_json::<crate::run_one::RunStatus>(&status)
            && s.config_hash != run.config_hash
        {
            return Err(folder_err(
                &status,
                format!(
                    "run `{}` was trained with another configuration than this plan gives it \
                     (hash {} against {}): plan into a new folder (--out), or remove {}",
                    run.id,
                    s.config_hash,
                    run.config_hash,
                    status.parent().unwrap_or(dir).display()
                ),
            ));
        }
    }
    for (run, text) in planned.plan.runs.iter().zip(&planned.configs) {
        write_atomic(&config_path(dir, &run.id), text.as_bytes())?;
    }
    let sweep = &planned.plan.sweep_file;
    let text = std::fs::read(sweep).map_err(io(sweep))?;
    write_atomic(&dir.join("sweep.toml"), &text)?;
    write_json(&plan_path(dir), &planned.plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_are_folder_names_and_long_ones_keep_a_hash() {
        assert_eq!(slug("reprpo train.lr=0.01"), "reprpo_train.lr-0.01");
        assert_eq!(slug("../x"), "_x");
        let long = "k=".repeat(60);
        let s = slug(&long);
        assert_eq!(s.len(), MAX_SLUG);
        assert_ne!(s, slug(&"k=".repeat(61)));
    }

    #[test]
    fn fnv_is_the_published_fnv1a() {
        // FNV-1a 64 of "a" (Fowler/Noll/Vo test vectors).
        assert_eq!(fnv64("a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv64(""), 0xcbf29ce484222325);
    }

    #[test]
    fn combos_run_the_first_axis_slowest() {
        let a = vec![
            (
                "a".to_string(),
                vec![toml::Value::Integer(1), toml::Value::Integer(2)],
            ),
            (
                "b".to_string(),
                vec![toml::Value::Integer(3), toml::Value::Integer(4)],
            ),
        ];
        assert_eq!(
            combos(&a),
            vec![vec![0, 0], vec![0, 1], vec![1, 0], vec![1, 1]]
        );
        assert_eq!(combos(&[]), vec![Vec::<usize>::new()]);
    }
}
