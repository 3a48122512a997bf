//! reprpo-data: preference pairs and multiple-choice items from files and the Hugging Face Hub,
//! converters and binarisation for the usual preference datasets, named recipes, and
//! TRL-compatible tokenisation into padded batches.
//!
//! The crate knows nothing of devices or tensors: batches are plain `Vec<u32>` with shapes.

pub mod error;
pub mod read;
pub mod types;

pub use error::{DataError, Result};
pub use read::{Format, Record, RowRef, Table, read_table};
pub use types::{McItem, McKind, PreferencePair, SourceMeta};
pub mod convert;
pub use convert::{ConvertOptions, Converted, Converter, convert};
pub mod chat;
pub mod tokenize;
pub mod tokenizer;
pub use tokenize::{Batch, Layout, Seq, TokenizationMode, TokenizeConfig, Truncation};
pub use tokenizer::Tok;
pub mod default_data;
pub use default_data::DefaultData;
pub mod recipe;
pub use recipe::{HubSource, Recipe, Source, load_dir, load_mixture, resolve};
pub mod hub;
pub mod stats;
pub mod write;
