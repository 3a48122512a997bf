//! Model configs: serde mirrors of Hugging Face `config.json` (both the transformers 4.x keys
//! `rope_theta` / `rope_scaling` and the 5.x `rope_parameters`), validated into runtime configs.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::error::{ModelError, Result};

/// The subset of a Llama `config.json` this crate reads. Unknown keys are ignored here on purpose
/// (HF configs carry many keys irrelevant to the forward pass); keys that change the maths and
/// that we do not support are rejected in [`HfLlamaConfig::validate`].
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
    /// The names [`LlamaConfig::preset`] knows.
    pub const PRESETS: &[&str] = &["tiny", "small", "1b", "8b"];

    /// Named shapes, exactly those `../shared/anchors/pytorch_anchor.py --preset NAME` builds
    /// (transformers' `LlamaConfig` with `max_position_embeddings=4096` and its defaults otherwise:
    /// `rms_norm_eps` 1e-6, no RoPE scaling, no biases):
    /// - `tiny`: vocab 512, hidden 128, intermediate 384, 4 layers, 4 heads / 2 KV heads;
    /// - `small`: vocab 32000, hidden 512, intermediate 1408, 8 layers, 8 / 4 heads;
    /// - `1b` (Llama-3.2-1B's shape): vocab 128256, hidden 2048, intermediate 8192, 16 layers,
    ///   32 / 8 heads, RoPE base 500000;
    /// - `8b` (Llama-3-8B's shape): vocab 128256, hidden 4096, intermediate 14336, 32 layers,
    ///   32 / 8 heads, RoPE base 500000, untied embeddings.
    ///
    /// `tiny` and `small` have RoPE base 10000; all but `8b` tie the embeddings.
    pub fn preset(name: &str) -> Option<Self> {
        let (vocab, h, inter, layers, heads, kv, theta, tied) = match name {
            "tiny" => (512, 128, 384, 4, 4, 2, 10_000.0, true),
            "small" => (32000, 512, 1408, 8, 8, 4, 10_000.0, true),
            "1b" => (128_256, 2048, 8192, 16, 32, 8, 500_000.0, true),
            "8b" => (128_256, 4096, 14_336, 32, 32, 8, 500_000.0, false),
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
            rope_theta: theta,
            rope_scaling: RopeScaling::None,
            max_position_embeddings: 4096,
            tie_word_embeddings: tied,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Parameters of the model a config describes (embedding, layers, final norm, lm_head).
    fn params(c: &LlamaConfig) -> usize {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let (q, kv) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let layer = h * q * 2 + h * kv * 2 + 3 * h * i + 2 * h;
        let embed = c.vocab_size * h;
        embed * if c.tie_word_embeddings { 1 } else { 2 } + c.num_layers * layer + h
    }

    #[test]
    fn large_presets_are_the_anchors_llama_shapes() {
        let names: Vec<_> = LlamaConfig::PRESETS
            .iter()
            .filter(|n| LlamaConfig::preset(n).is_some())
            .collect();
        assert_eq!(names.len(), LlamaConfig::PRESETS.len());
        let b1 = LlamaConfig::preset("1b");
        let b8 = LlamaConfig::preset("8b");
        let (Some(b1), Some(b8)) = (b1, b8) else {
            unreachable!("both presets exist (checked above)")
        };
        // The published parameter counts of Llama-3.2-1B and Llama-3-8B.
        assert_eq!(params(&b1), 1_235_814_400);
        assert_eq!(params(&b8), 8_030_261_248);
        for c in [&b1, &b8] {
            assert_eq!(
                (c.num_heads, c.num_kv_heads, c.vocab_size),
                (32, 8, 128_256)
            );
            assert_eq!(c.rope_theta, 500_000.0);
            assert_eq!(c.rms_norm_eps, 1e-6);
            assert_eq!(c.max_position_embeddings, 4096);
            assert_eq!(c.rope_scaling, RopeScaling::None);
        }
        assert_eq!((b1.head_dim, b8.head_dim), (64, 128));
        assert!(b1.tie_word_embeddings && !b8.tie_word_embeddings);
    }
}
