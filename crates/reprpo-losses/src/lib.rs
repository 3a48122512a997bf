//! Preference-optimisation losses as pure functions of tensors: they never see tokens.
//!
//! - [`dpo`]: the DPO family of TRL's `DPOTrainer` (every `loss_type` of TRL 1.16, weighted mixtures,
//!   LD-DPO's `ld_alpha`, the f-divergences, WPO weighting, and the pre-1.x extras `rpo_alpha`, cDPO
//!   label smoothing and `bco_pair`'s running reward mean), checked against TRL's own code.
//! - [`reprpo`]: the ReprPO family (hidden-state reroute/retain losses and their variants); every
//!   per-position variant runs through the fused CPU kernel of [`fused`] (one pass, its own
//!   backward).
//! - [`methods`]: the reference ReprPO project's method losses (`mse`, `prefvec`, `rank`) on
//!   collected, transformed activations, with its sink-filtered token reduction.

mod cka;
pub mod dpo;
pub mod error;
pub mod fused;
pub mod methods;
mod pool;
pub mod reprpo;

pub use dpo::{
    DpoConfig, DpoInputs, DpoState, FDivergenceType, LdTails, LossOut, LossType, RunningMoments,
    WpoLogWeights, dpo_loss,
};
pub use error::{LossError, Result};
pub use reprpo::{
    HiddenPairs, ReprPoConfig, ReprPoVariant, Schedule, TokenReduction, default_layers,
    reprpo_loss, reprpo_loss_unfused, resolve_layers, stack_layers, uses_fused_kernel,
};
