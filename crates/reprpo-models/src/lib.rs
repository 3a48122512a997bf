//! reprpo-models: Llama and Phi-3 on candle, written for training: full-sequence logits, hidden
//! states of chosen layers in `transformers`' `output_hidden_states` convention, inputs or outputs
//! of chosen linear modules (`collect`), gradient rewrites at module outputs (`gradproj`),
//! padding-aware attention masks, early exit, and adapters (LoRA, DoRA, BOFT, OFT, HRA, and full
//! fine-tuning of linear layers) whose weights alone are trainable, on a dense or quantised
//! (NF4, FP4, int8; bitsandbytes' formats) frozen base.
//!
//! # Example: a model, an adapter and hidden states
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use reprpo_models::{ForwardSpec, Llama, LlamaConfig, llama, peft};
//!
//! // A random tiny Llama (`Llama::load` reads a Hugging Face folder instead).
//! let cfg = LlamaConfig::preset("tiny").ok_or("no such preset")?;
//! let mut model = Llama::random(cfg, 0.02, 0, DType::F32, &Device::Cpu)?;
//! // A PEFT LoRA on the seven projections (`peft::load_adapter` reads a PEFT folder).
//! let lora = peft::AdapterConfig::lora(8, 16.0, &llama::PROJECTIONS);
//! let idx = peft::add_adapter(&mut model, "default", lora, None, 0)?;
//! model.adapters.active = Some(idx);
//! let ids = Tensor::new(&[[1u32, 72, 105, 33, 2]], &Device::Cpu)?;
//! // Hidden states of layer 2 and the last one, as transformers' `output_hidden_states`.
//! let spec = ForwardSpec {
//!     hidden_layers: vec![2, -1],
//!     logits: true,
//!     ..Default::default()
//! };
//! let out = model.forward(&ids, None, None, &spec)?;
//! assert_eq!(out.hidden.len(), 2);
//! assert_eq!(out.hidden[0].1.dims(), &[1, 5, 128]);
//! assert_eq!(out.logits.ok_or("no logits")?.dims(), &[1, 5, 512]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

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
