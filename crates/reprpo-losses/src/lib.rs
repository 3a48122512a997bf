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
//!
//! # Example: a DPO and a ReprPO loss from tensors
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use reprpo_losses::{
//!     DpoConfig, DpoInputs, DpoState, HiddenPairs, ReprPoConfig, dpo_loss, reprpo_loss,
//! };
//!
//! let dev = Device::Cpu;
//! let t = |v: &[f32]| Tensor::new(v, &dev);
//! // Summed log-probabilities of the chosen / rejected completions (policy, then reference)
//! // and their token counts, one pair.
//! let inputs = DpoInputs::new(
//!     t(&[-10.0])?, t(&[-12.0])?, t(&[-11.0])?, t(&[-11.0])?, t(&[5.0])?, t(&[6.0])?,
//! );
//! let out = dpo_loss(&inputs, &DpoConfig::default(), &mut DpoState::default())?;
//! // sigmoid DPO, beta 0.1: -ln sigmoid(0.1 ((-10 + 12) - (-11 + 11))) = ln(1 + e^-0.2)
//! let want = (1.0 + (-0.2f32).exp()).ln();
//! assert!((out.loss.to_scalar::<f32>()? - want).abs() < 1e-6);
//!
//! // ReprPO on hidden states [layers, pairs, tokens, hidden] with [pairs, tokens] masks.
//! let h = |seed: f32| (Tensor::arange(0f32, 48.0, &dev)? * f64::from(seed))?
//!     .sin()?
//!     .reshape((2, 1, 4, 6));
//! let mask = Tensor::ones((1, 4), candle_core::DType::F32, &dev)?;
//! let pairs = HiddenPairs::new(h(1.0)?, h(2.0)?, h(1.1)?, h(2.1)?, mask.clone(), mask);
//! let out = reprpo_loss(&pairs, &ReprPoConfig::default(), 0.0)?;
//! assert!(out.loss.to_scalar::<f32>()?.is_finite());
//! assert!(out.metrics.contains_key("loss_rr"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

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
