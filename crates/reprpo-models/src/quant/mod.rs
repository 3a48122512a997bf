//! Frozen weights quantised the way bitsandbytes does it, bit for bit: 4-bit NF4 / FP4 with
//! blockwise absmax (optionally double-quantised) and LLM.int8 row-wise 8-bit, with the tensor
//! layout transformers saves (`bnb.rs`), so a pre-quantised Hugging Face folder loads without
//! re-quantisation and a quantised weight saves back byte for byte.
//!
//! # Formats
//!
//! A weight `W` of shape `[out, in]` is read in row-major order as a flat vector `x` of
//! `n = out * in` values.
//!
//! **4-bit (NF4, FP4), block size `B`** (bitsandbytes' default `B = 64`; it accepts 32, 64, ...,
//! 4096). Blocks are `B` consecutive elements of `x` (they may straddle rows, and the last may be
//! short). For block `b`:
//!
//! ```text
//! absmax[b] = max_i |x_i|
//! s_i       = clamp(x_i * (1 / absmax[b]), -1, 1)        (the last, partial block: x_i / absmax[b])
//! q_i       = index of the nearest code-book value to s_i (ties to the lower value)
//! byte k    = q_{2k} << 4 | q_{2k+1}                     (first element in the high nibble;
//!                                                         odd n: the pad nibble encodes 0.0)
//! W'_i      = code[q_i] * absmax[b]                      (in f32, then rounded to the dtype)
//! ```
//!
//! The NF4 code book is the 16 quantiles of N(0, 1) normalised to [-1, 1] (QLoRA): -1, -0.6962,
//! -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0, 0.0796, 0.1609, 0.2461, 0.3379, 0.4407,
//! 0.5626, 0.7230, 1. FP4 is 1 sign, 2 exponent and 1 mantissa bit with bitsandbytes' own bias,
//! divided by its largest magnitude 12: codes 0..7 are 0, 0.0625/12, 8/12, 1, 4/12, 6/12, 2/12,
//! 3/12, codes 8..15 their negatives (code 8 is +0.0, as bitsandbytes' PyTorch table has it).
//!
//! **Double quantisation** (`double_quant`, QLoRA's nested quantisation): the f32 absmax vector
//! `a` (one per block) is stored as 8 bits:
//!
//! ```text
//! offset  = mean(a)                          (PyTorch's CPU summation order, see `fourbit.rs`)
//! c       = a - offset
//! nested_absmax[g] = max_{j in group g} |c_j|   for groups of 256 blocks
//! absmax8[j] = nearest entry of the signed 8-bit dynamic map to c_j / nested_absmax[g]
//! a'_j    = dynamic[absmax8[j]] * nested_absmax[g] + offset
//! ```
//!
//! The dynamic map (Dettmers 2015) has 256 sorted values in [-1, 1] with a varying exponent and
//! fraction; the nearest entry is found with bitsandbytes' CPU rule (a 65536-entry look-up table).
//!
//! **LLM.int8 row-wise** (transformers' `load_in_8bit`): the weight is cast to float16 (as
//! `Int8Params` does), then per row `r`:
//!
//! ```text
//! SCB[r]  = max_i |W_ri|
//! q_ri    = round_half_even(W_ri * ((1 / SCB[r]) * 127))       (as int8; a zero row gives 0)
//! W'_ri   = (q_ri * SCB[r]) * f32(1 / 127)
//! ```

mod bnb;
mod fourbit;
mod int8;

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

pub use bnb::read_safetensors;
pub use fourbit::{DYNAMIC_MAP, FP4_CODE, NF4_CODE, torch_mean_f32};

/// The quantisation formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum QuantType {
    /// bitsandbytes 4-bit NormalFloat.
    Nf4,
    /// bitsandbytes 4-bit float (1 sign, 2 exponent, 1 mantissa bit).
    Fp4,
    /// LLM.int8 row-wise 8-bit.
    Int8,
}

impl QuantType {
    /// The name used in configs and in bitsandbytes' quant state (`"nf4"`, `"fp4"`, `"int8"`).
    pub fn as_str(self) -> &'static str {
        match self {
            QuantType::Nf4 => "nf4",
            QuantType::Fp4 => "fp4",
            QuantType::Int8 => "int8",
        }
    }

    /// Whether this is one of the 4-bit formats.
    pub fn is_four_bit(self) -> bool {
        matches!(self, QuantType::Nf4 | QuantType::Fp4)
    }
}

impl fmt::Display for QuantType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for QuantType {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "nf4" => Ok(QuantType::Nf4),
            "fp4" => Ok(QuantType::Fp4),
            "int8" => Ok(QuantType::Int8),
            other => Err(ModelError::Invalid(format!(
                "unknown quantisation type {other:?}; expected one of \"nf4\", \"fp4\", \"int8\""
            ))),
        }
    }
}

/// The block sizes bitsandbytes accepts for 4-bit quantisation.
pub const VALID_BLOCK_SIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/// How to quantise a weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuantConfig {
    /// The format.
    pub qtype: QuantType,
    /// Elements per absmax block (4-bit only; bitsandbytes' default 64).
    pub block_size: usize,
    /// Quantise the absmax too (4-bit only; QLoRA's double quantisation).
    pub double_quant: bool,
}

impl QuantConfig {
    /// `qtype` with bitsandbytes' defaults: block size 64, no double quantisation.
    pub fn new(qtype: QuantType) -> Self {
        Self {
            qtype,
            block_size: 64,
            double_quant: false,
        }
    }

    /// Checks the block size and that double quantisation is asked only of a 4-bit format.
    pub fn validate(&self) -> Result<()> {
        if self.qtype.is_four_bit() {
            if !VALID_BLOCK_SIZES.contains(&self.block_size) {
                return Err(ModelError::Invalid(format!(
                    "quantisation block size {} is not supported; bitsandbytes accepts {:?}",
                    self.block_size, VALID_BLOCK_SIZES
                )));
            }
        } else if self.double_quant {
            return Err(ModelError::Invalid(
                "double quantisation applies to the 4-bit formats (nf4, fp4), not int8".into(),
            ));
        }
        Ok(())
    }
}

#[derive(Clone, Debug)]
enum Repr {
    Four(fourbit::FourBit),
    Int8(int8::Int8Rows),
}

/// A frozen quantised 2-D weight `[out, in]`, held in bitsandbytes' layout.
#[derive(Clone, Debug)]
pub struct QuantTensor {
    shape: (usize, usize),
    repr: Repr,
}

/// The `[out, in]` of a 2-D tensor, or an error naming it.
fn weight_shape(w: &Tensor, name: &str) -> Result<(usize, usize)> {
    match w.dims() {
        [o, i] => Ok((*o, *i)),
        dims => Err(ModelError::Quant {
            name: name.to_string(),
            problem: format!("expected a 2-D weight [out, in] to quantise, got shape {dims:?}"),
        }),
    }
}

impl QuantTensor {
    /// Quantises `w` (`[out, in]`, any float dtype, any device; read on the CPU) as bitsandbytes
    /// does. `name` is used in errors.
    pub fn quantize(w: &Tensor, cfg: &QuantConfig, name: &str) -> Result<Self> {
        cfg.validate()?;
        let shape = weight_shape(w, name)?;
        if !w.dtype().is_float() {
            return Err(ModelError::Quant {
                name: name.to_string(),
                problem: format!(
                    "cannot quantise a {:?} tensor; expected a float dtype",
                    w.dtype()
                ),
            });
        }
        let values: Vec<f32> = w
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        if let Some(bad) = values.iter().position(|v| !v.is_finite()) {
            return Err(ModelError::Quant {
                name: name.to_string(),
                problem: format!(
                    "element {bad} is {}; only finite weights can be quantised",
                    values[bad]
                ),
            });
        }
        let repr = match cfg.qtype {
            QuantType::Int8 => Repr::Int8(int8::Int8Rows::quantize(&values, shape)),
            qt => {
                let dtype = match w.dtype() {
                    DType::BF16 => "bfloat16",
                    DType::F16 => "float16",
                    _ => "float32",
                };
                Repr::Four(fourbit::FourBit::quantize(
                    &values,
                    shape,
                    qt,
                    cfg.block_size,
                    cfg.double_quant,
                    dtype,
                ))
            }
        };
        Ok(Self { shape, repr })
    }

    /// The dequantised weight `[out, in]` in `dtype` (f32, bf16 or f16), computed on the CPU
    /// (rows in parallel) and placed on `device`. Equal, bit for bit, to bitsandbytes' own.
    pub fn dequantize(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        let (rows, cols) = self.shape;
        let t = match dtype {
            DType::F32 => {
                Tensor::from_vec(self.dequantize_with(|v| v), (rows, cols), &Device::Cpu)?
            }
            DType::BF16 => Tensor::from_vec(
                self.dequantize_with(half::bf16::from_f32),
                (rows, cols),
                &Device::Cpu,
            )?,
            DType::F16 => Tensor::from_vec(
                self.dequantize_with(half::f16::from_f32),
                (rows, cols),
                &Device::Cpu,
            )?,
            other => {
                return Err(ModelError::Invalid(format!(
                    "cannot dequantise to {other:?}; expected f32, bf16 or f16"
                )));
            }
        };
        if device.is_cpu() {
            Ok(t)
        } else {
            Ok(t.to_device(device)?)
        }
    }

    fn dequantize_with<T: Copy + Default + Send + Sync>(
        &self,
        conv: impl Fn(f32) -> T + Sync,
    ) -> Vec<T> {
        match &self.repr {
            Repr::Four(f) => f.dequantize(self.shape, conv),
            Repr::Int8(q) => q.dequantize(self.shape, conv),
        }
    }

    /// `(out, in)`.
    pub fn shape(&self) -> (usize, usize) {
        self.shape
    }

    /// The format.
    pub fn qtype(&self) -> QuantType {
        match &self.repr {
            Repr::Four(f) => f.qtype,
            Repr::Int8(_) => QuantType::Int8,
        }
    }

    /// Elements per absmax block (4-bit), or the row length (int8).
    pub fn block_size(&self) -> usize {
        match &self.repr {
            Repr::Four(f) => f.block_size,
            Repr::Int8(_) => self.shape.1,
        }
    }

    /// Whether the absmax is double-quantised.
    pub fn double_quant(&self) -> bool {
        matches!(&self.repr, Repr::Four(f) if f.is_nested())
    }

    /// Bytes held: packed data, absmax (and its f32 expansion when double-quantised), maps and
    /// the quant-state record.
    pub fn nbytes(&self) -> usize {
        match &self.repr {
            Repr::Four(f) => f.nbytes(),
            Repr::Int8(q) => q.nbytes(),
        }
    }

    /// Reads a weight saved by transformers / bitsandbytes: `{prefix}weight` plus, for 4-bit,
    /// `{prefix}weight.absmax`, `.quant_map`, optionally `.nested_absmax` / `.nested_quant_map`,
    /// and `.quant_state.bitsandbytes__nf4` (or `__fp4`); for int8 `{prefix}SCB` and optionally
    /// `{prefix}weight_format`. The int8 `weight` arrives as U8 holding the int8 bytes (candle
    /// has no i8; `read_safetensors` does this). Errors name the missing or malformed tensor or
    /// quant-state key.
    pub fn from_bnb(
        prefix: &str,
        get: &dyn Fn(&str) -> Option<Tensor>,
        shape: (usize, usize),
    ) -> Result<Self> {
        let repr = if get(&format!("{prefix}SCB")).is_some() {
            Repr::Int8(bnb::read_int8(prefix, get, shape)?)
        } else {
            Repr::Four(bnb::read_four_bit(prefix, get, shape)?)
        };
        Ok(Self { shape, repr })
    }

    /// The tensors `from_bnb` reads, named as transformers saves them, byte-identical to what was
    /// read (or to what bitsandbytes would have saved for a weight quantised here). The int8
    /// `weight` is U8 holding the int8 bytes: write it with the safetensors dtype I8.
    pub fn to_bnb(&self, prefix: &str) -> Result<Vec<(String, Tensor)>> {
        match &self.repr {
            Repr::Four(f) => bnb::write_four_bit(prefix, f),
            Repr::Int8(q) => bnb::write_int8(prefix, q, self.shape),
        }
    }
}
