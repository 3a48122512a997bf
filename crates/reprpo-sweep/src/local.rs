//! `sweep run`: every run of a plan that is not done, `jobs` at a time, each a `run-one` child
//! process with its threads limited (`RAYON_NUM_THREADS` and `CANDLE_NUM_THREADS` = the cores
//! divided by `jobs`, at least 1) so that the runs do not fight over the cores. Each child's
//! output goes to `<dir>/logs/<id>.log`. A child that dies without writing its status (a crash,
//! a kill) is recorded as failed, unless it exited with 130 (interrupted: run again next time).
//! Stopping (the `stop` flag, set by Ctrl-C / SIGTERM) starts no new run, kills the running
//! ones and returns: the next `sweep run` continues with the runs not done.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::error::{Result, SweepError, io};
use crate::plan::{PlannedRun, read_plan};
use crate::run_one::{State, record_failure, status_of};

/// How `sweep run` runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LocalOptions {
    /// Runs at once.
    pub jobs: usize,
    /// Threads per run.
    pub threads: usize,
    /// Run failed runs again.
    pub retry_failed: bool,
}

/// What `sweep run` did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LocalSummary {
    /// Runs already done before it started.
    pub skipped: usize,
    /// Runs that finished ok.
    pub ok: usize,
    /// Runs that failed.
    pub failed: usize,
    /// Runs left not done (stopped).
    pub left: usize,
}

/// Threads per run: `cores / jobs`, at least 1.
pub fn threads_per_job(cores: usize, jobs: usize) -> usize {
    (cores / jobs.max(1)).max(1)
}

/// Whether `run` is done (ok, or failed and not to be retried).
fn is_done(dir: &Path, run: &PlannedRun, retry_failed: bool) -> bool {
    status_of(dir, &run.id).is_some_and(|s| s.status == State::Ok || !retry_failed)
}

/// Run every run of the plan in `dir` that is not done; `command(run)` is the `run-one` command
/// of a run; `say` gets one line per event.
pub fn run_local(
    dir: &Path,
    opts: &LocalOptions,
    command: &dyn Fn(&PlannedRun) -> Command,
    stop: &AtomicBool,
    say: &mut dyn FnMut(String),
) -> Result<LocalSummary> {
    if opts.jobs == 0 {
        return Err(SweepError::Usage("--jobs must be at least 1".into()));
    }
    let plan = read_plan(dir)?;
    let mut summary = LocalSummary::default();
    let mut pending: Vec<&PlannedRun> = Vec::new();
    for r in &plan.runs {
        if is_done(dir, r, opts.retry_failed) {
            summary.skipped += 1;
        } else {
            pending.push(r);
        }
    }
    say(format!(
        "{} runs: {} done, {} to run, {} at a time with {} threads each",
        plan.runs.len(),
        summary.skipped,
        pending.len(),
        opts.jobs,
        opts.threads
    ));
    pending.reverse();
    let mut running: Vec<(&PlannedRun, Child)> = Vec::new();
    while !pending.is_empty() || !running.is_empty() {
        if stop.load(Ordering::SeqCst) {
            for (r, mut c) in running.drain(..) {
                let _ = c.kill();
                let _ = c.wait();
                say(format!("stopped {}", r.id));
            }
            summary.left = plan.runs.len() - summary.skipped - summary.ok - summary.failed;
            return Ok(summary);
        }
        while running.len() < opts.jobs
            && let Some(r) = pending.pop()
        {
            let child = spawn(dir, r, opts, command)?;
            say(format!("started {} (index {})", r.id, r.index));
            running.push((r, child));
        }
        std::thread::sleep(Duration::from_millis(100));
        let mut still = Vec::with_capacity(running.len());
        for (r, mut c) in running {
            match c.try_wait().map_err(io(dir))? {
                None => still.push((r, c)),
                Some(code) => settle(dir, r, code, &mut summary, say)?,
            }
        }
        running = still;
    }
    Ok(summary)
}

fn spawn(
    dir: &Path,
    run: &PlannedRun,
    opts: &LocalOptions,
    command: &dyn Fn(&PlannedRun) -> Command,
) -> Result<Child> {
    let log_path = dir.join("logs").join(format!("{}.log", run.id));
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).map_err(io(&logs))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(io(&log_path))?;
    let log2 = log.try_clone().map_err(io(&log_path))?;
    let threads = opts.threads.to_string();
    let mut cmd = command(run);
    cmd.env("RAYON_NUM_THREADS", &threads)
        .env("CANDLE_NUM_THREADS", &threads)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2);
    cmd.spawn().map_err(io(&log_path))
}

/// Count a finished child; record a failure for one that left no status.
fn settle(
    dir: &Path,
    run: &PlannedRun,
    code: std::process::ExitStatus,
    summary: &mut LocalSummary,
    say: &mut dyn FnMut(String),
) -> Result<()> {
    let log = dir.join("logs").join(format!("{}.log", run.id));
    match status_of(dir, &run.id) {
        Some(s) if s.status == State::Ok => {
            summary.ok += 1;
            say(format!("ok      {} ({:.0} s)", run.id, s.seconds));
        }
        Some(s) => {
            summary.failed += 1;
            let e = s.error.unwrap_or_default();
            say(format!("FAILED  {}: {e}", run.id));
        }
        None if code.code() == Some(130) => {
            summary.left += 1;
            say(format!("interrupted {}", run.id));
        }
        None => {
            let e = format!(
                "run-one exited with {code} without a status; see {}",
                log.display()
            );
            record_failure(dir, run, e.clone())?;
            summary.failed += 1;
            say(format!("FAILED  {}: {e}", run.id));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::threads_per_job;

    #[test]
    fn threads_split_the_cores_and_never_reach_zero() {
        assert_eq!(threads_per_job(16, 4), 4);
        assert_eq!(threads_per_job(2, 2), 1);
        assert_eq!(threads_per_job(2, 5), 1);
        assert_eq!(threads_per_job(7, 2), 3);
    }
}
