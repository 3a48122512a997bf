//! Learning-rate schedules with warm-up (as `transformers`' schedulers).
//!
//! Warm-up `w` steps: `lr_t = lr t / w` for `t < w`; then, with `q = (t - w) / (T - w)`:
//! constant `lr`; linear `lr (1 - q)`; cosine `lr (1 + cos(pi q)) / 2`; warmup-stable-decay
//! `lr` until the last `d T` steps, then linear to 0 over them.

use crate::error::{Result, TrainError};

/// A learning-rate schedule.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum Schedule {
    /// Constant after warm-up.
    Constant,
    /// Linear decay to 0.
    Linear,
    /// Cosine decay to 0.
    Cosine,
    /// Warmup, stable, then linear decay over the last `decay_ratio` of the steps.
    Wsd,
}

impl Schedule {
    /// Parse a schedule name (the `train.schedule` key).
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "constant" => Schedule::Constant,
            "linear" => Schedule::Linear,
            "cosine" => Schedule::Cosine,
            "wsd" | "warmup-stable-decay" => Schedule::Wsd,
            other => {
                return Err(TrainError::Config {
                    key: "train.schedule".into(),
                    problem: format!(
                        "unknown schedule {other:?}{}; known: constant, linear, cosine, wsd",
                        crate::config::suggest(
                            other,
                            &[
                                "constant".into(),
                                "linear".into(),
                                "cosine".into(),
                                "wsd".into()
                            ]
                        )
                    ),
                });
            }
        })
    }

    /// The learning rate for 0-based optimizer step `step` of `total`, `warmup` warm-up steps.
    pub fn lr(self, peak: f64, step: usize, total: usize, warmup: usize, decay_ratio: f64) -> f64 {
        if step < warmup {
            return peak * step as f64 / warmup.max(1) as f64;
        }
        let span = total.saturating_sub(warmup).max(1) as f64;
        let q = ((step - warmup) as f64 / span).clamp(0.0, 1.0);
        match self {
            Schedule::Constant => peak,
            Schedule::Linear => peak * (1.0 - q),
            Schedule::Cosine => peak * 0.5 * (1.0 + (std::f64::consts::PI * q).cos()),
            Schedule::Wsd => {
                let decay = ((total as f64) * decay_ratio).round().max(1.0);
                let start = total as f64 - decay;
                if (step as f64) < start {
                    peak
                } else {
                    peak * ((total as f64 - step as f64) / decay).clamp(0.0, 1.0)
                }
            }
        }
    }
}
