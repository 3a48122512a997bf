//! Full fine-tuning of linear layers as an adapter kind (`peft_type` `"FULL"`, a reprpo extension
//! that Python PEFT does not read): each targeted layer gets a dense trainable delta `Δ` `[out, in]`
//! (f32, zero at the start) and its weight becomes `W + Δ`.
//!
//! `∂L/∂Δ = ∂L/∂W'` for `W' = W + Δ`, so training `Δ` is training the layer's weight itself, while
//! the base weight stays in memory untouched: the reference model is the same model with the
//! adapter off (no second copy of the weights), merging writes `W + Δ` into the layer, and the saved
//! adapter holds only the deltas (`base_model.model.<module>.full_delta.weight`). Embeddings, norms
//! and `lm_head` are not linear layers of [`crate::adapter::AdapterHost`] and stay frozen.

use candle_core::{DType, Device, Tensor, Var};

use crate::adapter::WeightTransform;
use crate::checkpoint::param;
use crate::error::Result;

/// The key suffix of a delta in the saved adapter.
pub(crate) const DELTA_KEY: &str = "full_delta.weight";

/// `W' = W + Δ` for one layer.
#[derive(Debug)]
pub struct FullDelta {
    /// `Δ` `[out, in]`, f32.
    pub delta: Var,
}

impl FullDelta {
    /// A zero delta for an `[out, in]` layer.
    ///
    /// # Errors
    /// Candle errors.
    pub fn zeros(out: usize, inp: usize, dev: &Device) -> Result<Self> {
        Ok(FullDelta {
            delta: Var::zeros((out, inp), DType::F32, dev)?,
        })
    }
}

impl WeightTransform for FullDelta {
    fn weight(&self, w: &Tensor, _train: bool) -> Result<Tensor> {
        // In f32 (f64 for f64 bases), rounded once to the base dtype.
        let dt = if w.dtype() == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let d = param(&self.delta).to_dtype(dt)?;
        Ok(w.to_dtype(dt)?.add(&d)?.to_dtype(w.dtype())?)
    }

    fn params(&self) -> Vec<(String, Var)> {
        vec![(DELTA_KEY.to_string(), self.delta.clone())]
    }
}
