//! reprpo-train: the training job behind `cargo xtask train`.
//!
//! - [`config`]: the layered configuration (defaults < presets < file < env < overrides) and its
//!   validation;
//! - [`data`]: dataset names to tokenised pairs and device batches;
//! - [`init_from`]: the `[adapter]` table of a run started from an existing adapter;
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

pub mod config;
pub mod data;
pub mod error;
pub mod gradproj;
pub mod init_from;
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
