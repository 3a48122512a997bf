//! The one error type of the training crate.

use std::path::PathBuf;

/// Everything that can go wrong in configuring or running a training job.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A configuration key has a bad value, is unknown, or clashes with another.
    #[error("config key `{key}`: {problem}")]
    Config {
        /// The dotted key (`train.lr`).
        key: String,
        /// What is wrong, with a suggestion where one exists.
        problem: String,
    },
    /// A file or folder could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file has unexpected content.
    #[error("{}: {problem}", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// The loss or a gradient stopped being finite.
    #[error(
        "step {step}: the {what} is not finite ({value}); stopped. The last good checkpoint is left intact{}",
        last_checkpoint.as_ref().map(|p| format!(" at {}", p.display())).unwrap_or_default()
    )]
    NonFinite {
        /// The optimizer step (1-based) being computed.
        step: usize,
        /// `loss` or `gradient norm`.
        what: &'static str,
        /// The value seen.
        value: f64,
        /// The newest checkpoint on disk, if any.
        last_checkpoint: Option<PathBuf>,
    },
    /// Data loading or tokenisation.
    #[error(transparent)]
    Data(#[from] reprpo_data::DataError),
    /// Model code.
    #[error(transparent)]
    Model(#[from] reprpo_models::ModelError),
    /// Loss code.
    #[error(transparent)]
    Loss(#[from] reprpo_losses::LossError),
    /// Evaluation code (the held-out preference scores).
    #[error(transparent)]
    Eval(#[from] reprpo_eval::EvalError),
    /// Tensor code.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Safetensors encoding.
    #[error(transparent)]
    Safetensors(#[from] safetensors::SafeTensorError),
}

/// Shorthand.
pub type Result<T> = std::result::Result<T, TrainError>;

/// An I/O error naming `path`.
pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> TrainError {
    let path = path.into();
    move |source| TrainError::Io { path, source }
}
