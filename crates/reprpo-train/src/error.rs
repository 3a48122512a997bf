//! The one error type of the training crate.

use std::path::PathBuf;

/// Everything that can go wrong in configuring or running a training job.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrainError {
    /// A configuration key has a bad value, is unknown, or clashes with another.
    #[error("config key `{key}`: {problem}")]
    Config {
        /// The dotted key (`train.lr`).
        key: String,
        /// What is wrong, with a suggestion where one exists.
        problem: String,
    },
    /// A `key=value` argument that cannot be a configuration override (no `=`, an empty key, an
    /// empty part of a dotted key).
    #[error("argument `{arg}`: {problem}")]
    Override {
        /// The argument as given.
        arg: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A TOML configuration file that is not valid TOML (a duplicate key, a bad table header, ...)
    /// or not UTF-8, at a line and column (1-based).
    #[error("{}:{line}:{column}: {problem}", path.display())]
    ConfigFile {
        /// The file.
        path: PathBuf,
        /// The line.
        line: usize,
        /// The column (in characters).
        column: usize,
        /// What is wrong.
        problem: String,
    },
    /// A file or folder could not be read or written.
    // The cause is not the error's `source()`: its text is already in the message, and a chain
    // printer (`{:#}`) would repeat it.
    #[error("{}: {cause}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        cause: std::io::Error,
    },
    /// A file has unexpected content.
    #[error("{}: {problem}", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// A checkpoint's files do not match its `manifest.json` (or it has none, or an unreadable
    /// one): the checkpoint is damaged and is not resumed from.
    #[error("checkpoint {}: {}: {problem}", checkpoint.display(), file.display())]
    CorruptCheckpoint {
        /// The checkpoint folder.
        checkpoint: PathBuf,
        /// The file at fault, relative to the checkpoint folder.
        file: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// No checkpoint of a run verifies (or the run has none).
    #[error("{}: no intact checkpoint to resume from{}", run_dir.display(), if skipped.is_empty() { String::new() } else { format!(" ({})", skipped.join("; ")) })]
    NoCheckpoint {
        /// The run folder.
        run_dir: PathBuf,
        /// Each checkpoint skipped and why.
        skipped: Vec<String>,
    },
    /// The run's configuration is not the one its checkpoint was trained with.
    #[error(
        "{}: does not match checkpoint {} (config hash {found}, the checkpoint was written with {stored}): the configuration was edited or damaged; restore it (only {} may change on resume, given as key=value arguments)",
        path.display(), checkpoint.display(), crate::resume::RESUME_KEYS.join(", ")
    )]
    ConfigMismatch {
        /// The run's `resolved_config.toml`.
        path: PathBuf,
        /// The checkpoint.
        checkpoint: PathBuf,
        /// The hash stored in the checkpoint.
        stored: String,
        /// The hash of the configuration found.
        found: String,
    },
    /// `key=value` arguments given with `--resume` that cannot change on resume.
    #[error(
        "cannot change on resume: {}; only {} can (start a new run to change the others)",
        keys.join(", "), crate::resume::RESUME_KEYS.join(", ")
    )]
    ResumeOverride {
        /// The refused keys.
        keys: Vec<String>,
    },
    /// The loss or the gradient norm stopped being finite, or a parameter or AdamW moment about
    /// to be saved is not finite or exploding (see `trainer::EXPLODING`).
    #[error("step {step}: {}", non_finite_message(what, *value, last_checkpoint.as_deref(), hint))]
    NonFinite {
        /// The optimizer step (1-based) being computed.
        step: usize,
        /// `loss`, `gradient norm`, or the largest parameter or moment.
        what: &'static str,
        /// The value seen.
        value: f64,
        /// The newest finite checkpoint on disk, if any.
        last_checkpoint: Option<PathBuf>,
        /// More for the user (which tensor, the usual causes, the pairs of the step), starting
        /// with a space; may be empty.
        hint: String,
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
    move |cause| TrainError::Io { path, cause }
}

/// The text of [`TrainError::NonFinite`] after the step.
fn non_finite_message(
    what: &str,
    value: f64,
    last_checkpoint: Option<&std::path::Path>,
    hint: &str,
) -> String {
    let seen = if value.is_finite() {
        format!(
            "the {what} is {value:e}, over the limit of {:e}",
            crate::trainer::EXPLODING
        )
    } else {
        format!("the {what} is not finite ({value})")
    };
    let ck = match last_checkpoint {
        Some(p) => format!(
            "The newest finite checkpoint, left intact, is {} (resume from it)",
            p.display()
        ),
        None => "No finite checkpoint was written, so there is none to resume from".into(),
    };
    format!("{seen}; stopped. {ck}.{hint}")
}
