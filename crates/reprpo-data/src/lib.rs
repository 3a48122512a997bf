//! reprpo-data: preference pairs and multiple-choice items from files and the Hugging Face Hub,
//! converters and binarisation for the usual preference datasets, named recipes, and
//! TRL-compatible tokenisation into padded batches.
//!
//! The crate knows nothing of devices or tensors: batches are plain `Vec<u32>` with shapes.
//!
//! # Example: reading and tokenising preference pairs
//!
//! ```
//! use reprpo_data::tokenize::{collate_pairs, tokenize_pairs};
//! use reprpo_data::{Layout, Tok, TokenizeConfig, default_data};
//!
//! // The embedded default pairs (any reader or recipe gives the same `PreferencePair`s).
//! let pairs = default_data::embedded()?.train;
//! let tok = Tok::byte_level()?;
//! // TRL 0.9's ("classic") tokenisation: prompt, completion + EOS, length limits.
//! let tokenized = tokenize_pairs(&tok, &pairs[..4], &TokenizeConfig::default())?;
//! let refs: Vec<_> = tokenized.pairs.iter().collect();
//! // Rows 0..4 the chosen sequences, 4..8 the rejected ones; prompts left-padded.
//! let batch = collate_pairs(&refs, tok.pad, Layout::PromptLeft)?;
//! assert_eq!(batch.rows, 8);
//! assert_eq!(batch.input_ids.len(), batch.rows * batch.seq_len);
//! # Ok::<(), reprpo_data::DataError>(())
//! ```

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
