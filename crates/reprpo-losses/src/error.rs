//! The one error type of this crate.

use thiserror::Error;

/// Everything a loss can fail with.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum LossError {
    /// A tensor operation failed (shape, dtype or device mismatch, or a backend error).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A `loss_type` name that TRL's DPO trainer does not know.
    #[error(
        "unknown DPO loss type {0:?}; expected one of sigmoid, hinge, ipo, exo_pair, nca_pair, robust, \
         bco_pair, sppo_hard, aot, aot_unpaired (or aot_pair), apo_zero, apo_down, discopop, sft, sigmoid_norm"
    )]
    UnknownLossType(String),
    /// An `f_divergence_type` name that TRL does not know.
    #[error(
        "unknown f_divergence_type {0:?}; expected one of reverse_kl, forward_kl, js_divergence, alpha_divergence"
    )]
    UnknownFDivergence(String),
    /// A configuration that TRL rejects or that has no defined value.
    #[error("invalid loss configuration: {0}")]
    InvalidConfig(String),
    /// Inputs of the wrong shape, or an input the configuration needs that was not given.
    #[error("invalid loss inputs: {0}")]
    InvalidInput(String),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, LossError>;
