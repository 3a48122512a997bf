//! reprpo-sweep: seeded sweeps over training configurations, above the train and eval crates.
//!
//! A sweep folder is a plan plus runs; `run-one INDEX` is the unit everything else calls:
//!
//! - [`spec`]: the sweep file (base config, axes, variants, seeds, baseline, eval suites,
//!   `[slurm]`); [`search`]: a random search over ranges with a budget and a seed, or
//!   [`tpe`]'s rounds of proposals from the results so far;
//! - [`plan`](mod@plan): the file expanded into configurations and runs, each run's configuration resolved
//!   (so validated) as `cargo xtask train` resolves it, written as `plan.json` + `configs/`;
//! - [`run_one`](mod@run_one): one run, trained and evaluated in a work folder renamed into `runs/<id>/` when
//!   it ends, with its `status.json`; done runs are skipped;
//! - [`local`]: `sweep run`: the runs not done, N child processes at a time, threads divided;
//! - [`slurm`]: the `sbatch` array script whose tasks are `run-one`;
//! - [`results`], [`stats`], [`report`], [`plot`]: per suite and dataset role, the mean over
//!   seeds with its Student-t interval and the paired difference against the baseline, as
//!   Markdown, CSV, JSON and a PNG.
//!
//! # Example: the interval of a report cell
//!
//! ```
//! use reprpo_sweep::stats::{LEVEL, mean_ci, paired_ci};
//!
//! // Held-out accuracy of five seeds of a method and of the baseline, seed by seed.
//! let method = [0.71, 0.74, 0.69, 0.73, 0.72];
//! let baseline = [0.66, 0.70, 0.65, 0.69, 0.66];
//! let m = mean_ci(&method, LEVEL).ok_or("no values")?;
//! assert!((m.mean - 0.718).abs() < 1e-12);
//! // Student t with 4 degrees of freedom: mean +- 2.776 sd / sqrt(5).
//! let half = 2.776445105 * m.sd.ok_or("one value")? / 5f64.sqrt();
//! assert!((m.half_width.ok_or("one value")? - half).abs() < 1e-8);
//! let d = paired_ci(&method, &baseline, LEVEL).ok_or("no pairs")?;
//! assert!(d.lo.ok_or("one pair")? > 0.0); // the method is better on these seeds
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod error;
pub mod fsx;
pub mod local;
pub mod plan;
pub mod plot;
pub mod report;
pub mod results;
pub mod run_one;
pub mod search;
pub mod slurm;
pub mod spec;
pub mod stats;
pub mod tpe;

pub use error::{Result, SweepError};
pub use plan::{Plan, PlanContext, Planned, PlannedRun, plan, read_plan, write_plan};
pub use run_one::{Jobs, RunOne, RunStatus, Trained, run_one};
pub use spec::SweepSpec;
