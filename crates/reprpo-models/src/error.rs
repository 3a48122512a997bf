//! The models crate's one error type.

use std::path::PathBuf;

/// Result alias for the models crate.
pub type Result<T> = std::result::Result<T, ModelError>;

/// Everything that can go wrong loading, converting or running a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A file could not be read.
    #[error("{}: cannot read", file.display())]
    Io {
        /// The file.
        file: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A file could not be written.
    #[error("{}: cannot write", file.display())]
    Write {
        /// The file.
        file: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A config file has a missing, mistyped or unsupported key.
    #[error("{}: key `{key}`: {problem}", file.display())]
    Config {
        /// The config file.
        file: PathBuf,
        /// The offending key.
        key: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A weight file lacks a tensor, or a tensor has the wrong shape.
    #[error("{}: tensor `{name}`: {problem}", file.display())]
    Weight {
        /// The weight file (or folder).
        file: PathBuf,
        /// The tensor name.
        name: String,
        /// What is wrong.
        problem: String,
    },
    /// A tensor read from a weight file holds NaN or infinite values.
    #[error(
        "{}: tensor `{name}`: {count} of {numel} values are not finite (NaN or infinity); \
         the file is corrupt or was saved from a diverged run",
        file.display()
    )]
    NonFinite {
        /// The weight file.
        file: PathBuf,
        /// The tensor name.
        name: String,
        /// How many of its values are NaN or infinite.
        count: u64,
        /// How many values it has.
        numel: usize,
    },
    /// A file is not in the expected binary format.
    #[error("{}: {problem}", file.display())]
    Format {
        /// The file.
        file: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// The tokenizer could not be built or run.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A quantised weight (or one to quantise) is missing a tensor, has a malformed tensor or
    /// quant-state key, or cannot be quantised.
    #[error("tensor `{name}`: {problem}")]
    Quant {
        /// The tensor name (for a quant-state key, the tensor holding it).
        name: String,
        /// What is wrong.
        problem: String,
    },
    /// An argument outside its domain (shapes, layer indices, ...).
    #[error("invalid argument: {0}")]
    Invalid(String),
}
