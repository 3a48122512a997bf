//! `run-one DIR INDEX`: one run of a plan, the unit everything else calls (`sweep run` spawns
//! it, a Slurm array task is it).
//!
//! The run works in `<dir>/runs/.work-<id>.<host>.<pid>/` and, when it has finished (well or
//! not), renames that folder to `<dir>/runs/<id>/`, so a run folder is always complete:
//!
//! ```text
//! runs/<id>/status.json        ok | failed, the error, seed, config hash, host, times (written last)
//! runs/<id>/train/             the training job's run folder (summary.json, metrics.jsonl,
//!                              resolved_config.toml, adapter/, sft_adapter/, checkpoints/)
//! runs/<id>/eval/<suite>/      `cargo xtask eval` of the run on each suite (table.json, ...)
//! ```
//!
//! A run whose folder exists is done and skipped (`retry_failed` runs a failed one again). An
//! interrupted run (Ctrl-C, SIGTERM: the trainer stops at a step boundary) leaves no run folder
//! and is run again from the start next time; work folders of processes that are gone (this
//! host) are removed when the run starts again. Two processes on one run: the first to finish
//! keeps its folder, the other discards its work. The SFT stage is cached in `<dir>/.cache`
//! (a relative `sft.cache_dir` is taken relative to the sweep folder), shared by all runs.

use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use reprpo_train::TrainConfig;
use serde::{Deserialize, Serialize};

use crate::error::{Result, folder_err, io};
use crate::fsx::{hostname, process_gone, read_json, temp_sibling, write_json};
use crate::plan::{Plan, PlannedRun, config_path, fnv64, read_plan, runs_dir};
use crate::spec::SuiteRef;

/// An error of a training or evaluation job, as the binary reports it.
pub type JobError = Box<dyn std::error::Error + Send + Sync>;

/// How a training job ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Trained {
    /// Finished; its run folder.
    Finished(PathBuf),
    /// Stopped by Ctrl-C / SIGTERM before the end.
    Interrupted,
}

/// The jobs a run is made of; the binary gives the real ones (`xtask train`'s and `xtask eval`'s
/// code), tests give fakes.
pub trait Jobs {
    /// Train `cfg`; its `run.out_dir` is a fresh folder inside the run's work folder.
    fn train(&self, cfg: &TrainConfig) -> std::result::Result<Trained, JobError>;
    /// Evaluate the run folder `run_dir` on `suite` with the eval `options`, writing to `out`.
    fn eval(
        &self,
        run_dir: &Path,
        suite: &SuiteRef,
        options: &[String],
        out: &Path,
    ) -> std::result::Result<(), JobError>;
}

/// `ok` or `failed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Trained and evaluated.
    Ok,
    /// A job failed (the error is in the status).
    Failed,
}

/// `runs/<id>/status.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunStatus {
    /// How it ended.
    pub status: State,
    /// The error (and its causes), for a failed run.
    pub error: Option<String>,
    /// The run's index in the plan.
    pub index: usize,
    /// Its id.
    pub id: String,
    /// Its configuration's label.
    pub label: String,
    /// Its seed.
    pub seed: u64,
    /// The hash of the configuration it was trained with.
    pub config_hash: String,
    /// Where it ran.
    pub host: String,
    /// Start, seconds since the Unix epoch.
    pub started: u64,
    /// Wall time in seconds.
    pub seconds: f64,
}

/// What `run_one` did.
#[derive(Debug, Clone, PartialEq)]
pub enum RunOne {
    /// Ran; its status.
    Ran(RunStatus),
    /// Already done; its status.
    Skipped(RunStatus),
    /// Stopped before the end; nothing kept.
    Interrupted,
    /// Another process finished the same run first; this one's work was discarded.
    LostRace,
}

/// `runs/<id>/`.
pub fn run_dir(dir: &Path, id: &str) -> PathBuf {
    runs_dir(dir).join(id)
}

/// The status of a finished run, if its folder has one.
pub fn status_of(dir: &Path, id: &str) -> Option<RunStatus> {
    read_json(&run_dir(dir, id).join("status.json")).ok()
}

/// Run `index` of the plan in `dir` (skipped if done; `retry_failed`: a failed run is run again).
pub fn run_one(dir: &Path, index: usize, jobs: &dyn Jobs, retry_failed: bool) -> Result<RunOne> {
    let plan = read_plan(dir)?;
    let run = plan
        .runs
        .get(index)
        .ok_or_else(|| crate::SweepError::Index {
            plan: crate::plan::plan_path(dir),
            index,
            count: plan.runs.len(),
        })?;
    let done = run_dir(dir, &run.id);
    if done.exists() {
        match status_of(dir, &run.id) {
            Some(s) if s.status == State::Failed && retry_failed => discard(&done)?,
            Some(s) => return Ok(RunOne::Skipped(s)),
            None => {
                return Err(folder_err(
                    &done,
                    "a run folder without status.json (not written by run-one): remove it",
                ));
            }
        }
    }
    let cfg = planned_config(dir, run)?;
    remove_stale_work(dir, &run.id);
    let work = work_dir(dir, &run.id);
    std::fs::create_dir_all(&work).map_err(io(&work))?;
    let started = now();
    let clock = Instant::now();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        execute(&plan, cfg, &work, &done, jobs)
    }))
    .unwrap_or_else(|p| Err(format!("panicked: {}", panic_text(&p))));
    let error = match outcome {
        Ok(false) => {
            let _ = std::fs::remove_dir_all(&work);
            return Ok(RunOne::Interrupted);
        }
        Ok(true) => None,
        Err(e) => Some(e),
    };
    let status = RunStatus {
        status: if error.is_none() {
            State::Ok
        } else {
            State::Failed
        },
        error,
        index,
        id: run.id.clone(),
        label: run.label.clone(),
        seed: run.seed,
        config_hash: run.config_hash.clone(),
        host: hostname(),
        started,
        seconds: clock.elapsed().as_secs_f64(),
    };
    finish(&work, &done, status)
}

/// Write the status into the work folder and rename it into place.
fn finish(work: &Path, done: &Path, status: RunStatus) -> Result<RunOne> {
    write_json(&work.join("status.json"), &status)?;
    match std::fs::rename(work, done) {
        Ok(()) => Ok(RunOne::Ran(status)),
        Err(_) if done.join("status.json").is_file() => {
            let _ = std::fs::remove_dir_all(work);
            Ok(RunOne::LostRace)
        }
        Err(e) => Err(io(done)(e)),
    }
}

/// Record a run as failed without running it (its process died without a status): an empty run
/// folder with the status, unless one exists by now.
pub fn record_failure(dir: &Path, run: &PlannedRun, error: String) -> Result<()> {
    let done = run_dir(dir, &run.id);
    if done.exists() {
        return Ok(());
    }
    let work = work_dir(dir, &run.id);
    std::fs::create_dir_all(&work).map_err(io(&work))?;
    let status = RunStatus {
        status: State::Failed,
        error: Some(error),
        index: run.index,
        id: run.id.clone(),
        label: run.label.clone(),
        seed: run.seed,
        config_hash: run.config_hash.clone(),
        host: hostname(),
        started: now(),
        seconds: 0.0,
    };
    finish(&work, &done, status).map(|_| ())
}

/// The run's planned configuration (`configs/<id>.toml`, checked against the plan's hash), its
/// output in the work folder's `out/` and its SFT cache in the sweep folder.
fn planned_config(dir: &Path, run: &PlannedRun) -> Result<TrainConfig> {
    let path = config_path(dir, &run.id);
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    let hash = format!("{:016x}", fnv64(&text));
    if hash != run.config_hash {
        return Err(folder_err(
            &path,
            format!(
                "edited since planning (hash {hash}, the plan has {}): plan again",
                run.config_hash
            ),
        ));
    }
    let mut cfg =
        TrainConfig::from_toml_file(&path).map_err(|e| folder_err(&path, e.to_string()))?;
    if cfg.sft.cache_dir.is_relative() {
        cfg.sft.cache_dir = std::path::absolute(dir.join(&cfg.sft.cache_dir)).map_err(io(dir))?;
    }
    Ok(cfg)
}

/// Train, then evaluate on every suite; `Ok(false)`: interrupted; `Err`: the error, with its
/// causes.
fn execute(
    plan: &Plan,
    mut cfg: TrainConfig,
    work: &Path,
    done: &Path,
    jobs: &dyn Jobs,
) -> std::result::Result<bool, String> {
    cfg.run.out_dir = work.join("out");
    let trained = match jobs.train(&cfg).map_err(|e| chain(&*e))? {
        Trained::Interrupted => return Ok(false),
        Trained::Finished(d) => d,
    };
    let train = work.join("train");
    std::fs::rename(&trained, &train).map_err(|e| format!("{}: {e}", trained.display()))?;
    let _ = std::fs::remove_dir(work.join("out"));
    relocate_summary(&train, &done.join("train"))?;
    for suite in &plan.eval.suites {
        let out = work.join("eval").join(&suite.name);
        jobs.eval(&train, suite, &plan.eval.options, &out)
            .map_err(|e| format!("eval suite {}: {}", suite.name, chain(&*e)))?;
    }
    Ok(true)
}

/// The training job's `summary.json` names its run folder (`run_dir`), which `run_one` moves to
/// `runs/<id>/train/`: point it there (a summary without the key is left as it is).
fn relocate_summary(train: &Path, fin: &Path) -> std::result::Result<(), String> {
    let path = train.join("summary.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(());
    };
    let mut v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let Some(slot) = v.get_mut("run_dir") else {
        return Ok(());
    };
    *slot = fin.display().to_string().into();
    write_json(&path, &v).map_err(|e| e.to_string())
}

/// An error and its causes, `: `-separated (causes already in the message are not repeated).
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        if !out.contains(&s) {
            out = format!("{out}: {s}");
        }
        cur = c.source();
    }
    out
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `runs/.work-<id>.<host>.<pid>`.
fn work_dir(dir: &Path, id: &str) -> PathBuf {
    runs_dir(dir).join(format!(".work-{id}.{}.{}", hostname(), std::process::id()))
}

/// Remove the work folders of `id` left by processes of this host that are gone.
fn remove_stale_work(dir: &Path, id: &str) {
    let prefix = format!(".work-{id}.{}.", hostname());
    let Ok(entries) = std::fs::read_dir(runs_dir(dir)) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix(&prefix)
            .and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(process_gone) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Move a failed run's folder aside and remove it.
fn discard(done: &Path) -> Result<()> {
    let aside = temp_sibling(done, "discarded");
    std::fs::rename(done, &aside).map_err(io(done))?;
    std::fs::remove_dir_all(&aside).map_err(io(&aside))
}
