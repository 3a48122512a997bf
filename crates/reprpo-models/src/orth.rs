//! Orthogonal adapters (BOFT, OFT, HRA): not written yet; configs of these kinds are rejected
//! with a clear error until they are.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;

use crate::adapter::WeightTransform;
use crate::error::{ModelError, Result};
use crate::peft::AdapterConfig;

/// The config keys the orthogonal kind `peft_type` understands.
pub fn config_keys(peft_type: &str) -> Vec<&'static str> {
    let _ = peft_type;
    vec![]
}

/// Build the module adapter for one linear layer.
#[allow(clippy::too_many_arguments)]
pub fn build(
    config: &AdapterConfig,
    module: &str,
    out: usize,
    inp: usize,
    weights: Option<(&HashMap<String, Tensor>, &Path)>,
    rng: &mut StdRng,
    dev: &Device,
    used: &mut usize,
) -> Result<Arc<dyn WeightTransform>> {
    let _ = (module, out, inp, weights, rng, dev, used);
    Err(ModelError::Invalid(format!(
        "{} adapters are not supported yet",
        config.peft_type
    )))
}
