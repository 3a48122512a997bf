//! reprpo-train: the training job behind `cargo xtask train`.
//!
//! - [`config`]: the layered configuration (defaults < presets < file < env < overrides) and its
//!   validation;
//! - [`data`]: dataset names to tokenised pairs and device batches;
//! - `init_from` (crate-private): the `[adapter]` table of a run started from an existing adapter;
//! - [`gradproj`]: the reference ReprPO project's gradient interventions (`projgrad`, `projbp`);
//! - [`objective`]: one batch through the policy (adapter on) and reference (adapter off) forwards
//!   and the loss;
//! - [`optim`]: AdamW with checkpointable f32 or 8-bit state, schedules, clipping;
//! - [`run`]: the run folder and atomic checkpoints with their manifests;
//! - [`metrics`]: `metrics.jsonl`, copied into each checkpoint, checked and rebuilt on resume;
//! - [`memory`]: peak memory in the summary and the log, the memory estimate of `--print-config`;
//! - [`resume`](mod@resume): `--resume`: the checkpoint that verifies, the config checked against it, the
//!   overrides allowed on resume;
//! - [`trainer`]: the loop, resume, Ctrl-C, SFT stage and summary;
//! - [`plots`]: PNG charts from `metrics.jsonl`;
//! - [`tensorboard`]: the same scalars as TensorBoard event files (`run.tensorboard`).
//!
//! # Example: a training job from a `TrainConfig`
//!
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::AtomicBool;
//! use reprpo_train::{JobContext, Sources, TrainConfig, train};
//!
//! let out = std::env::temp_dir().join(format!("reprpo-doc-{}", std::process::id()));
//! // Defaults < presets < file < environment < overrides, as `cargo xtask train key=value`:
//! // ReprPO on the embedded default (tiny model, project's own data), two steps.
//! let overrides = [
//!     "loss=reprpo", "sft.steps=0", "data.n_train=8", "train.batch_size=4",
//!     "train.max_steps=2", "data.eval_datasets=[]", "data.ood_datasets=[]",
//!     "train.n_eval_examples=4", "run.plots=false",
//! ];
//! let mut overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
//! overrides.push(format!("run.out_dir={}", out.display()));
//! let cfg = TrainConfig::resolve(&Sources { file: None, overrides, env: false })?;
//! let ctx = JobContext {
//!     datasets_dir: "datasets".into(), // recipes; the embedded default needs none
//!     stop: Arc::new(AtomicBool::new(false)),
//!     progress: false,
//! };
//! let outcome = train(&cfg, &ctx, None)?;
//! assert_eq!(outcome.steps, 2);
//! assert!(outcome.run_dir.join("metrics.jsonl").is_file());
//! # std::fs::remove_dir_all(&out)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod config;
pub mod data;
pub mod error;
pub mod gradproj;
pub(crate) mod init_from;
pub mod memory;
pub mod method;
pub mod metrics;
pub mod objective;
pub mod optim;
pub mod plots;
pub mod resume;
pub mod run;
pub mod tensorboard;
pub mod trainer;

pub use config::{Sources, TrainConfig};
pub use error::{Result, TrainError};
pub use trainer::{JobContext, Outcome, resume, train};
