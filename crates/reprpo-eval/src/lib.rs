//! reprpo-eval: the same evaluation methodology for every method, in distribution and out.
//!
//! - [`score`]: the scores as formulas over log-probabilities (multiple choice with MC1/MC2 and
//!   length-normalised variants, preference accuracy, DPO rewards against the base);
//! - [`scorer`]: the log-probabilities from a model (the prompt's KV cache reused for every
//!   choice, or padded full-sequence batches);
//! - [`suite`]: `datasets/suites/*.toml`, datasets with roles and GENIES shift pairs, and how
//!   they are scored (this project's way, or [`open_pref_eval`]'s: the reference ReprPO
//!   project's evaluation);
//! - [`evaluate`](mod@evaluate): base and adapters of one loaded model over a suite;
//! - [`table`], [`output`]: the results table (terminal, Markdown, CSV, JSON), per-example JSONL,
//!   generations, written atomically; [`plot`]: PNG charts;
//! - [`analyze`](mod@analyze): hidden-state analysis (consistency of the preference direction,
//!   principal directions, a linear probe and its transfer, pictures by neuron and by token).
//!
//! # Example: scoring a suite
//!
//! ```
//! use std::path::Path;
//! use candle_core::{DType, Device};
//! use reprpo_data::Tok;
//! use reprpo_eval::evaluate::{EvalOptions, Subject, evaluate};
//! use reprpo_eval::suite::{Suite, load_dataset};
//! use reprpo_models::{Llama, LlamaConfig};
//!
//! // The repository's `datasets/` (suites in `datasets/suites/`); here the `default` suite.
//! let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
//! let suite = Suite::by_name("default", &root.join("datasets/suites"), &root.join("datasets"))?;
//! let data = suite
//!     .datasets
//!     .iter()
//!     .map(|d| load_dataset(d, &root, Some(3)))
//!     .collect::<Result<Vec<_>, _>>()?;
//! let cfg = LlamaConfig::preset("tiny").ok_or("no such preset")?;
//! let mut model = Llama::random(cfg, 0.02, 0, DType::F32, &Device::Cpu)?;
//! // The base first; adapters (loaded with reprpo_models::peft) follow as more subjects.
//! let subjects = [Subject { label: "base".into(), adapter: None }];
//! let tok = Tok::byte_level()?;
//! let report = evaluate(&mut model, &tok, &subjects, &data, &suite.shifts, &suite.name,
//!     &EvalOptions::default())?;
//! assert_eq!(report.table.rows.len(), 1);
//! assert_eq!(report.table.columns.len(), data.len());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod analyze;
pub mod error;
pub mod evaluate;
pub mod open_pref_eval;
pub mod output;
pub mod plot;
pub mod score;
pub mod scorer;
pub mod suite;
pub mod table;

pub use error::{EvalError, Result};
pub use evaluate::{EvalOptions, EvalTruncation, Generation, Report, Subject, evaluate};
pub use open_pref_eval::OpenPrefEval;
pub use score::{DpoReward, McScore, PrefScore, dpo_reward, mc_score, pref_score};
pub use scorer::{ScoreMode, ScoreOptions, SeqLogp, score_groups};
pub use suite::{
    DatasetSpec, Items, Kind, Loaded, McFormat, Role, Scoring, Shift, Suite, load_dataset,
};
pub use table::{Cell, Column, Row, ShiftRow, Table, TruncationNote};
