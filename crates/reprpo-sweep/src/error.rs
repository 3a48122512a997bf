//! `SweepError`, the crate's one error type: every variant names the file (and the key or run)
//! it is about.

use std::path::{Path, PathBuf};

/// Why a sweep could not be planned, run or reported.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    /// A file could not be read, written or renamed.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The sweep file is not valid TOML (or not UTF-8).
    #[error("{file}: {problem}")]
    Parse {
        /// The sweep file.
        file: PathBuf,
        /// What the parser said (with line and column).
        problem: String,
    },
    /// A key of the sweep file (or of the configuration it sets) is unknown or has a bad value.
    #[error("{file}: `{key}`: {problem}")]
    Key {
        /// The sweep file.
        file: PathBuf,
        /// The key, as written in the sweep file (`axes."train.lr"`, `baseline`, ...).
        key: String,
        /// What is wrong.
        problem: String,
    },
    /// A sweep folder's own file (`plan.json`, a run's `status.json`, a result) is damaged or
    /// missing.
    #[error("{path}: {problem}")]
    Folder {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// `run-one` was given an index the plan does not have.
    #[error("{plan}: run index {index} is out of range (the plan has {count} runs: 0..={last})", last = count.saturating_sub(1))]
    Index {
        /// The plan file.
        plan: PathBuf,
        /// The index asked for.
        index: usize,
        /// How many runs the plan has.
        count: usize,
    },
    /// Other command-line input that cannot work (e.g. `--jobs 0`, no index and no
    /// `SLURM_ARRAY_TASK_ID`).
    #[error("{0}")]
    Usage(String),
    /// A chart could not be drawn.
    #[error("{path}: cannot draw the chart: {problem}")]
    Plot {
        /// The PNG file.
        path: PathBuf,
        /// What plotters said.
        problem: String,
    },
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, SweepError>;

/// A closure turning an I/O error on `path` into [`SweepError::Io`].
pub fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SweepError + '_ {
    move |source| SweepError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A [`SweepError::Key`].
pub fn key_err(file: &Path, key: impl Into<String>, problem: impl Into<String>) -> SweepError {
    SweepError::Key {
        file: file.to_path_buf(),
        key: key.into(),
        problem: problem.into(),
    }
}

/// A [`SweepError::Folder`].
pub fn folder_err(path: &Path, problem: impl Into<String>) -> SweepError {
    SweepError::Folder {
        path: path.to_path_buf(),
        problem: problem.into(),
    }
}
