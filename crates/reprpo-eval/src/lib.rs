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
//!   generations, written atomically; [`plot`]: PNG charts.

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
