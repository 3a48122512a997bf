//! Model configs: serde mirrors of Hugging Face `config.json` (both the transformers 4.x keys
//! `rope_theta` / `rope_scaling` and the 5.x `rope_parameters`), validated into runtime configs.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::error::{ModelError, Result};

/// The subset of a Llama `config.json` this crate reads. Unknown keys are ignored here on purpose
/// (HF configs carry many keys irrelevant to the forward pass); keys that change the maths and
/// that we do not support are rejected in [`LlamaConfig::validate`].
#[derive(Debug, Clone, Deserialize)]
pub struct HfLlamaConfig {
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention); defaults to the query heads.
    pub num_key_value_heads: Option<usize>,
    /// Per-head width; defaults to hidden_size / heads.
    pub head_dim: Option<usize>,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// transformers 4.x: RoPE base.
    pub rope_theta: Option<f64>,
    /// transformers 4.x: RoPE scaling.
    pub rope_scaling: Option<Value>,
    /// transformers 5.x: RoPE base and scaling together.
    pub rope_parameters: Option<Value>,
    /// Longest position the model was trained for.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// Whether `lm_head` shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Bias on the attention projections (unsupported when true).
    #[serde(default)]
    pub attention_bias: bool,
    /// Bias on the MLP projections (unsupported when true).
    #[serde(default)]
    pub mlp_bias: bool,
    /// Activation (only "silu").
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Beginning-of-sequence id.
    pub bos_token_id: Option<Value>,
    /// End-of-sequence id(s).
    pub eos_token_id: Option<Value>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    2048
}
fn default_act() -> String {
    "silu".into()
}

/// How RoPE frequencies are computed.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        /// Overall factor.
        factor: f64,
        /// Low-frequency factor.
        low_freq_factor: f64,
        /// High-frequency factor.
        high_freq_factor: f64,
        /// The context the base model was trained with.
        original_max_position_embeddings: usize,
    },
}

/// A validated Llama config.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// Longest position.
    pub max_position_embeddings: usize,
    /// Tied embeddings.
    pub tie_word_embeddings: bool,
}

fn cfg_err(file: &Path, key: &str, problem: impl Into<String>) -> ModelError {
    ModelError::Config {
        file: file.to_path_buf(),
        key: key.into(),
        problem: problem.into(),
    }
}

fn num(v: &Value, file: &Path, key: &str) -> Result<f64> {
    v.get(key)
        .and_then(Value::as_f64)
        .ok_or_else(|| cfg_err(file, key, "missing or not a number"))
}

impl HfLlamaConfig {
    /// Read `config.json`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            file: path.to_path_buf(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|e| cfg_err(path, "(file)", e.to_string()))
    }

    /// Validate into a [`LlamaConfig`]; `file` names the source in errors.
    pub fn validate(&self, file: &Path) -> Result<LlamaConfig> {
        if self.hidden_act != "silu" {
            return Err(cfg_err(
                file,
                "hidden_act",
                format!("unsupported activation {:?}", self.hidden_act),
            ));
        }
        if self.attention_bias {
            return Err(cfg_err(
                file,
                "attention_bias",
                "bias on attention projections is not supported",
            ));
        }
        if self.mlp_bias {
            return Err(cfg_err(
                file,
                "mlp_bias",
                "bias on MLP projections is not supported",
            ));
        }
        let num_kv_heads = self.num_key_value_heads.unwrap_or(self.num_attention_heads);
        if num_kv_heads == 0 || !self.num_attention_heads.is_multiple_of(num_kv_heads) {
            return Err(cfg_err(
                file,
                "num_key_value_heads",
                "must divide num_attention_heads",
            ));
        }
        let head_dim = self
            .head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1));
        if !head_dim.is_multiple_of(2) {
            return Err(cfg_err(file, "head_dim", "must be even for RoPE"));
        }
        // transformers 5.x keeps theta and scaling in `rope_parameters`; 4.x in two keys.
        let (theta, scaling, key) = match &self.rope_parameters {
            Some(p) => (
                p.get("rope_theta")
                    .and_then(Value::as_f64)
                    .or(self.rope_theta),
                Some(p.clone()),
                "rope_parameters",
            ),
            None => (self.rope_theta, self.rope_scaling.clone(), "rope_scaling"),
        };
        let rope_scaling = match scaling.filter(|v| !v.is_null()) {
            None => RopeScaling::None,
            Some(s) => {
                let kind = s
                    .get("rope_type")
                    .or_else(|| s.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("default");
                match kind {
                    "default" => RopeScaling::None,
                    "llama3" => RopeScaling::Llama3 {
                        factor: num(&s, file, "factor")?,
                        low_freq_factor: num(&s, file, "low_freq_factor")?,
                        high_freq_factor: num(&s, file, "high_freq_factor")?,
                        original_max_position_embeddings: num(
                            &s,
                            file,
                            "original_max_position_embeddings",
                        )? as usize,
                    },
                    other => {
                        return Err(cfg_err(
                            file,
                            key,
                            format!("unsupported rope type {other:?} for Llama"),
                        ));
                    }
                }
            }
        };
        Ok(LlamaConfig {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads,
            head_dim,
            vocab_size: self.vocab_size,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: theta.unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings,
        })
    }
}

impl LlamaConfig {
    /// Named shapes: `tiny` (vocab 512, hidden 128, 4 layers, 4 heads / 2 KV heads) and `small`
    /// (vocab 32000, hidden 512, 8 layers, 8 / 4 heads), as in `../shared/anchors/pytorch_anchor.py`;
    /// tied embeddings, RoPE base 10000.
    pub fn preset(name: &str) -> Option<Self> {
        let (vocab, h, inter, layers, heads, kv) = match name {
            "tiny" => (512, 128, 384, 4, 4, 2),
            "small" => (32000, 512, 1408, 8, 8, 4),
            _ => return None,
        };
        Some(LlamaConfig {
            hidden_size: h,
            intermediate_size: inter,
            num_layers: layers,
            num_heads: heads,
            num_kv_heads: kv,
            head_dim: h / heads,
            vocab_size: vocab,
            rms_norm_eps: 1e-6,
            rope_theta: 10_000.0,
            rope_scaling: RopeScaling::None,
            max_position_embeddings: 4096,
            tie_word_embeddings: true,
        })
    }

    /// Load and validate `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path: PathBuf = dir.join("config.json");
        HfLlamaConfig::load(&path)?.validate(&path)
    }

    /// RoPE inverse frequencies (length head_dim / 2), scaled as the config says.
    pub fn inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim as f64;
        let base: Vec<f64> = (0..self.head_dim / 2)
            .map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f64 / d))
            .collect();
        match &self.rope_scaling {
            RopeScaling::None => base,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = *original_max_position_embeddings as f64;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        let scaled = if wavelen > low_wavelen { f / factor } else { f };
                        // transformers: is_medium = ~(wavelen < high) & ~(wavelen > low)
                        let medium = (high_wavelen..=low_wavelen).contains(&wavelen);
                        if medium {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * scaled / factor + smooth * scaled
                        } else {
                            scaled
                        }
                    })
                    .collect()
            }
        }
    }
}
