//! reprpo-models: Llama and Phi-3 on candle, written for training: full-sequence logits, hidden
//! states of chosen layers in `transformers`' `output_hidden_states` convention, inputs or outputs
//! of chosen linear modules (`collect`), gradient rewrites at module outputs (`gradproj`),
//! padding-aware attention masks, early exit, and adapters (LoRA, DoRA, BOFT, OFT, HRA, and full
//! fine-tuning of linear layers) whose weights alone are trainable, on a dense or quantised
//! (NF4, FP4, int8; bitsandbytes' formats) frozen base.

pub mod error;

pub use error::{ModelError, Result};
pub mod config;
pub(crate) mod decoder;
pub mod llama;
pub use config::LlamaConfig;
pub use llama::{ForwardSpec, KvCache, Llama, Output};
pub mod adapter;
pub mod checkpoint;
pub mod collect;
pub use collect::{Tap, TapSide, parse_layers, select_modules, side_taps};
pub mod files;
pub mod full;
pub mod generate;
pub mod gradproj;
pub mod hub;
pub mod llama2c;
pub mod orth;
pub mod peft;
pub mod phi3;
pub use phi3::{Phi3, Phi3Config};
pub mod frozen;
pub mod linalg;
pub mod logps;
pub mod model;
pub(crate) mod num;
pub mod ops;
pub mod quant;
pub mod transform;
pub mod weights;
pub use model::CausalLm;
pub use weights::LoadOptions;
