//! `EvalError`, the one error type of the evaluation crate: every variant names what it is
//! about (file, key, dataset row and field), so a bad suite or item is found without a debugger.

use std::path::PathBuf;

/// Everything that can go wrong while scoring and reporting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EvalError {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The model (forward, adapter loading) failed.
    #[error(transparent)]
    Model(#[from] reprpo_models::ModelError),
    /// Reading, converting or tokenising data failed.
    #[error(transparent)]
    Data(#[from] reprpo_data::DataError),
    /// Drawing a chart failed.
    #[error(transparent)]
    Plot(#[from] crate::plot::PlotError),
    /// A suite file (or an override) is wrong: the file, the key and what is wrong.
    #[error("{file}: key `{key}`: {problem}")]
    Config {
        /// The suite file (or `(overrides)`).
        file: PathBuf,
        /// The key, dotted (`dataset[2].role`).
        key: String,
        /// What is wrong.
        problem: String,
    },
    /// One item cannot be scored: its dataset, 1-based row, id and field.
    #[error("dataset {dataset}, row {row} (id {id}): field `{field}`: {problem}")]
    Item {
        /// Dataset (recipe) name.
        dataset: String,
        /// 1-based row in the dataset's source.
        row: usize,
        /// The item's id.
        id: String,
        /// The field at fault (`choices`, `correct`, `prompt`, ...).
        field: String,
        /// What is wrong.
        problem: String,
    },
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Inconsistent input to a score or table function (e.g. lengths that do not match).
    #[error("{0}")]
    Invalid(String),
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, EvalError>;

/// A closure mapping an I/O error on `path` to [`EvalError::Io`].
pub fn io(path: &std::path::Path) -> impl Fn(std::io::Error) -> EvalError + '_ {
    move |source| EvalError::Io {
        path: path.to_path_buf(),
        source,
    }
}
