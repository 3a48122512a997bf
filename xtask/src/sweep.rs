//! `cargo xtask sweep plan | run | run-one | report | slurm`: seeded sweeps over training
//! configurations (see `reprpo_sweep` for the sweep file, the folder layout and the statistics).
//!
//! This file is the command line and the real jobs of a run: training through
//! `reprpo_train::train` (what `cargo xtask train` runs) and evaluation through `eval::run` (what
//! `cargo xtask eval --adapter RUN --suite S --out DIR` runs), both in the `run-one` process.
//! `sweep run` starts one `run-one` child process per run, N at a time.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use reprpo_sweep::local::{LocalOptions, run_local, threads_per_job};
use reprpo_sweep::run_one::{JobError, State};
use reprpo_sweep::spec::SuiteRef;
use reprpo_sweep::{Jobs, Plan, PlanContext, RunOne, SweepSpec, Trained};
use reprpo_train::{JobContext, TrainConfig};

/// `sweep` subcommands.
#[derive(Subcommand)]
pub enum SweepCmd {
    /// List the runs of a sweep file (every key checked as `train --print-config` checks it) and
    /// write the plan into the sweep folder.
    Plan {
        /// The sweep file (TOML; see datasets/sweeps/).
        file: PathBuf,
        /// The sweep folder (default: runs/sweeps/NAME).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Run every run that is not done, N at a time (a sweep file is planned first); a stopped
    /// sweep continues where it stopped. Writes the report at the end.
    Run {
        /// A sweep file or a planned sweep folder.
        target: PathBuf,
        /// The sweep folder for a sweep file (default: runs/sweeps/NAME).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Runs at once (each gets cores / N threads).
        #[arg(long, default_value_t = 1)]
        jobs: usize,
        /// Run failed runs again.
        #[arg(long)]
        retry_failed: bool,
    },
    /// Run one run of a planned sweep folder (skipped when done); the index defaults to
    /// SLURM_ARRAY_TASK_ID.
    RunOne {
        /// The sweep folder.
        dir: PathBuf,
        /// The run's index in plan.json.
        index: Option<usize>,
        /// Run it again if it failed.
        #[arg(long)]
        retry_failed: bool,
    },
    /// Per suite and dataset role: mean ± 95% CI over seeds per configuration and the paired
    /// difference against the baseline (report/report.md, .csv, .json, SUITE.png).
    Report {
        /// The sweep folder.
        dir: PathBuf,
    },
    /// Plan a sweep file and write an sbatch array script (one task per run) into its folder.
    Slurm {
        /// The sweep file.
        file: PathBuf,
        /// The sweep folder (default: runs/sweeps/NAME).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// Run a `sweep` subcommand.
pub fn run(cmd: SweepCmd, root: &Path) -> Result<()> {
    match cmd {
        SweepCmd::Plan { file, out } => plan_cmd(&file, out, root).map(|_| ()),
        SweepCmd::Run {
            target,
            out,
            jobs,
            retry_failed,
        } => run_cmd(&target, out, jobs, retry_failed, root),
        SweepCmd::RunOne {
            dir,
            index,
            retry_failed,
        } => run_one_cmd(&dir, index, retry_failed, root),
        SweepCmd::Report { dir } => report_cmd(&dir),
        SweepCmd::Slurm { file, out } => slurm_cmd(&file, out, root),
    }
}

/// Plan `file` into `out` (default `runs/sweeps/<name>`, absolute); print the runs.
fn plan_cmd(file: &Path, out: Option<PathBuf>, root: &Path) -> Result<PathBuf> {
    let spec = SweepSpec::load(file)?;
    let dir = out.unwrap_or_else(|| PathBuf::from("runs/sweeps").join(&spec.name));
    let dir = std::path::absolute(&dir).with_context(|| dir.display().to_string())?;
    let ctx = PlanContext {
        datasets_dir: root.join("datasets"),
        sweep_dir: Some(dir.clone()),
    };
    let planned = reprpo_sweep::plan(&spec, &ctx)?;
    reprpo_sweep::write_plan(&dir, &planned)?;
    print_plan(&dir, &planned.plan);
    Ok(dir)
}

fn print_plan(dir: &Path, plan: &Plan) {
    println!(
        "sweep `{}`: {} configurations x {} seeds = {} runs, planned in {}",
        plan.name,
        plan.configs.len(),
        plan.seeds.len(),
        plan.runs.len(),
        dir.display()
    );
    println!("configurations:");
    for c in &plan.configs {
        let vs = match c.baseline {
            Some(b) => format!("vs {}", plan.configs[b].label),
            None if plan.configs.iter().any(|o| o.baseline == Some(c.index)) => "baseline".into(),
            None => String::new(),
        };
        println!("  {:>3}  {:<40} {vs}", c.index, c.label);
        println!("       {}", c.overrides.join(" "));
    }
    println!("runs (seed keys: {}):", plan.seed_keys.join(", "));
    println!("  {:>5}  {:<48} {:>6}  status", "index", "id", "seed");
    for r in &plan.runs {
        let status = match reprpo_sweep::run_one::status_of(dir, &r.id) {
            Some(s) if s.status == State::Ok => "done",
            Some(_) => "FAILED",
            None => "-",
        };
        println!("  {:>5}  {:<48} {:>6}  {status}", r.index, r.id, r.seed);
    }
}

/// A flag set by Ctrl-C / SIGTERM / SIGHUP.
fn stop_flag() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    ctrlc::set_handler(move || {
        if s.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("stopping: the current runs are abandoned and run again next time");
    })
    .context("installing the Ctrl-C handler")?;
    Ok(stop)
}

fn run_cmd(
    target: &Path,
    out: Option<PathBuf>,
    jobs: usize,
    retry_failed: bool,
    root: &Path,
) -> Result<()> {
    let dir = if target.is_file() {
        plan_cmd(target, out, root)?
    } else {
        std::path::absolute(target).with_context(|| target.display().to_string())?
    };
    let cores = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1);
    let opts = LocalOptions {
        jobs,
        threads: threads_per_job(cores, jobs),
        retry_failed,
    };
    let exe = std::env::current_exe().context("the path of this binary")?;
    let command = |r: &reprpo_sweep::PlannedRun| {
        let mut c = Command::new(&exe);
        c.arg("sweep")
            .arg("run-one")
            .arg(&dir)
            .arg(r.index.to_string());
        if retry_failed {
            c.arg("--retry-failed");
        }
        c
    };
    let stop = stop_flag()?;
    let mut summary = run_local(&dir, &opts, &command, &stop, &mut |line| println!("{line}"))?;
    // A TPE search grows the plan once a round has finished: plan again and run the new trials.
    while !stop.load(Ordering::SeqCst) && summary.left == 0 && grows(&dir, root)? {
        let more = run_local(&dir, &opts, &command, &stop, &mut |line| println!("{line}"))?;
        summary.ok += more.ok;
        summary.failed += more.failed;
        summary.left = more.left;
    }
    println!(
        "{} ok, {} failed, {} skipped (done before), {} not run",
        summary.ok, summary.failed, summary.skipped, summary.left
    );
    report_cmd(&dir)?;
    if stop.load(Ordering::SeqCst) {
        return Err(crate::train::Interrupted.into());
    }
    if summary.failed > 0 {
        bail!(
            "{} runs failed (see {}/report/report.md; `--retry-failed` runs them again)",
            summary.failed,
            dir.display()
        );
    }
    Ok(())
}

/// For a TPE search: plan the folder again from its sweep file (the next round, when every run
/// has finished); whether runs were added.
fn grows(dir: &Path, root: &Path) -> Result<bool> {
    let plan = reprpo_sweep::read_plan(dir)?;
    let spec = SweepSpec::load(&plan.sweep_file)?;
    if spec.search.as_ref().is_none_or(|s| s.tpe.is_none()) {
        return Ok(false);
    }
    let before = plan.runs.len();
    let after = plan_cmd(&plan.sweep_file, Some(dir.to_path_buf()), root)?;
    Ok(reprpo_sweep::read_plan(&after)?.runs.len() > before)
}

/// The index from the argument, else `SLURM_ARRAY_TASK_ID`.
fn task_index(index: Option<usize>) -> Result<usize> {
    if let Some(i) = index {
        return Ok(i);
    }
    let Ok(v) = std::env::var("SLURM_ARRAY_TASK_ID") else {
        bail!("give the run's INDEX, or set SLURM_ARRAY_TASK_ID (an array task)");
    };
    v.trim()
        .parse()
        .with_context(|| format!("SLURM_ARRAY_TASK_ID={v:?} is not a run index"))
}

fn run_one_cmd(dir: &Path, index: Option<usize>, retry_failed: bool, root: &Path) -> Result<()> {
    let index = task_index(index)?;
    let dir = std::path::absolute(dir).with_context(|| dir.display().to_string())?;
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "(all cores)".into());
    println!(
        "sweep {}: run index {index}, threads {threads}",
        dir.display()
    );
    let jobs = XtaskJobs {
        root: root.to_path_buf(),
        stop: stop_flag()?,
    };
    match reprpo_sweep::run_one(&dir, index, &jobs, retry_failed)? {
        RunOne::Skipped(s) => println!("{}: already done ({:?}); skipped", s.id, s.status),
        RunOne::LostRace => println!("run {index}: another process finished it first"),
        RunOne::Interrupted => return Err(crate::train::Interrupted.into()),
        RunOne::Ran(s) if s.status == State::Ok => {
            println!("{}: ok in {:.0} s", s.id, s.seconds)
        }
        RunOne::Ran(s) => bail!(
            "{}: failed: {}",
            s.id,
            s.error.unwrap_or_else(|| "(no message)".into())
        ),
    }
    Ok(())
}

fn report_cmd(dir: &Path) -> Result<()> {
    let report = reprpo_sweep::report::build(dir)?;
    let written = reprpo_sweep::report::write(dir, &report)?;
    print!("{}", reprpo_sweep::report::to_markdown(&report));
    println!("\nwritten:");
    for w in written {
        println!("  {}", w.display());
    }
    Ok(())
}

fn slurm_cmd(file: &Path, out: Option<PathBuf>, root: &Path) -> Result<()> {
    let dir = plan_cmd(file, out, root)?;
    let plan = reprpo_sweep::read_plan(&dir)?;
    let exe = std::env::current_exe().context("the path of this binary")?;
    let cwd = std::env::current_dir().context("the working directory")?;
    let text = reprpo_sweep::slurm::script(&dir, &plan, &exe, &cwd)?;
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| logs.display().to_string())?;
    let path = dir.join("sweep.sbatch");
    reprpo_sweep::fsx::write_atomic(&path, text.as_bytes())?;
    println!(
        "wrote {}; submit with: sbatch {}",
        path.display(),
        path.display()
    );
    Ok(())
}

/// The real jobs of a run: this binary's training and evaluation code, in process.
struct XtaskJobs {
    root: PathBuf,
    stop: Arc<AtomicBool>,
}

impl Jobs for XtaskJobs {
    fn train(&self, cfg: &TrainConfig) -> std::result::Result<Trained, JobError> {
        let ctx = JobContext {
            datasets_dir: self.root.join("datasets"),
            stop: self.stop.clone(),
            progress: false,
        };
        let out = reprpo_train::train(cfg, &ctx, None)?;
        if out.interrupted {
            return Ok(Trained::Interrupted);
        }
        println!("trained: {} ({} steps)", out.run_dir.display(), out.steps);
        Ok(Trained::Finished(out.run_dir))
    }

    fn eval(
        &self,
        run_dir: &Path,
        suite: &SuiteRef,
        options: &[String],
        out: &Path,
    ) -> std::result::Result<(), JobError> {
        let args = crate::eval::EvalArgs {
            adapters: vec![run_dir.display().to_string()],
            suite: Some(suite.arg.clone()),
            data: Vec::new(),
            out: Some(out.to_path_buf()),
            no_progress: true,
            overrides: options.to_vec(),
        };
        crate::eval::run(args, &self.root).map_err(|e| format!("{e:#}").into())
    }
}
