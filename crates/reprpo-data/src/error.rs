//! The data crate's one error type: every variant says where (file, row, field or key) and what.

use std::path::PathBuf;

/// Result alias for the data crate.
pub type Result<T> = std::result::Result<T, DataError>;

/// Everything that can go wrong while reading, converting or tokenising data.
///
/// Rows are 1-based record numbers: the line for JSONL, the element for a JSON array, the
/// record after the header for CSV, the row across all row groups for Parquet.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// The file could not be opened or read.
    #[error("{}: cannot read", file.display())]
    Io {
        /// The file.
        file: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file could not be written (output of `data prepare`, fixtures).
    #[error("{}: cannot write", file.display())]
    Write {
        /// The file.
        file: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A record is not well-formed in its container format (bad JSON, bad CSV, bad Parquet).
    #[error("{}, row {row}: malformed {format}: {message}", file.display())]
    Malformed {
        /// The file.
        file: PathBuf,
        /// 1-based record number (0 when the file as a whole is unreadable).
        row: usize,
        /// "JSON", "JSONL", "CSV", "Parquet", "gzip".
        format: &'static str,
        /// What the parser said.
        message: String,
    },
    /// A field of a record is missing, mistyped, empty or otherwise unusable.
    #[error("{}, row {row}, field `{field}`: {problem}", file.display())]
    Field {
        /// The file.
        file: PathBuf,
        /// 1-based record number.
        row: usize,
        /// The field (column, key path such as `mc1_targets.labels`).
        field: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The file holds no record at all (empty, blank lines only, a CSV header alone, `[]`).
    #[error("{}: no rows (the file is empty)", file.display())]
    NoRows {
        /// The file.
        file: PathBuf,
    },
    /// The file's extension names no format this crate reads.
    #[error("{}: unknown format (expected .jsonl, .json, .csv or .parquet, optionally .gz)", file.display())]
    UnknownFormat {
        /// The file.
        file: PathBuf,
    },
    /// A recipe name that `datasets/` does not define.
    #[error("unknown dataset recipe `{name}` (known: {known})")]
    UnknownRecipe {
        /// The requested name.
        name: String,
        /// The names that exist, comma-separated.
        known: String,
    },
    /// A recipe file or option is invalid.
    #[error("{}: key `{key}`: {problem}", file.display())]
    Config {
        /// The recipe or config file.
        file: PathBuf,
        /// The offending key.
        key: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The Hugging Face Hub could not give a file.
    #[error("hub dataset `{repo}`: {message}")]
    Hub {
        /// The dataset id, with config and split where known.
        repo: String,
        /// What went wrong (including "not cached while HF_HUB_OFFLINE=1").
        message: String,
    },
    /// The tokenizer could not be built, loaded or run.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template could not be rendered.
    #[error("chat template: {0}")]
    Template(String),
    /// A prompt that leaves no room for any completion token under the configured limits.
    #[error(
        "{dataset}, row {row}, field `prompt`: {tokens} prompt tokens leave no room for the completion (max_length = {max_length}); shorten it, raise max_length or set drop_too_long"
    )]
    TooLong {
        /// The dataset (or file) the pair came from.
        dataset: String,
        /// 1-based record number in it.
        row: usize,
        /// Length of the prompt in tokens.
        tokens: usize,
        /// The configured `max_length`.
        max_length: usize,
    },
    /// An argument outside its domain (empty batch, zero limits, ...).
    #[error("invalid argument: {0}")]
    Invalid(String),
}

impl DataError {
    /// A field error at `file`, `row`, `field`.
    pub fn field(
        file: impl Into<PathBuf>,
        row: usize,
        field: impl Into<String>,
        problem: impl Into<String>,
    ) -> Self {
        DataError::Field {
            file: file.into(),
            row,
            field: field.into(),
            problem: problem.into(),
        }
    }
}
