//! Phi-3 (`Phi3ForCausalLM`, transformers 5.23 `modeling_phi3.py`) on candle for training, with
//! the same interface as [`crate::llama::Llama`]: full-sequence logits, hidden states in the
//! `output_hidden_states` convention (`L + 1` states; index 0 the embeddings, index `i` the output
//! of layer `i`, index `L` the last layer's output after the final norm), padding-aware masks,
//! early exit, a KV cache for generation, and adapters on the linear layers.
//!
//! # Differences from Llama
//! - Fused projections: `self_attn.qkv_proj` (`[q; k; v]`, of `heads * hd`, `kv * hd`, `kv * hd`
//!   rows) and `mlp.gate_up_proj` (`[gate; up]`, `intermediate` rows each; the MLP computes
//!   `down(silu(gate) * up)`). Adapters attach to the fused modules, as PEFT does
//!   (`model.layers.{i}.self_attn.qkv_proj`, `model.layers.{i}.mlp.gate_up_proj`).
//! - RoPE may cover only the first `rotary_dim = int(head_dim * partial_rotary_factor)` features
//!   of each head; the rest pass through unrotated.
//! - LongRoPE (`rope_type` `longrope`; the old names `su` and `yarn` mean the same for Phi-3, as
//!   in transformers): `inv_freq[i] = 1 / (factor[i] * theta^(2i / rotary_dim))`, with
//!   `long_factor` for the whole batch when `max(position_ids) + 1 >
//!   original_max_position_embeddings`, else `short_factor`; `cos` and `sin` are both multiplied
//!   by the attention factor: the config's `attention_factor`, else `sqrt(1 + ln(s) / ln(orig))`
//!   with `s` the config's `factor` or else `max_position_embeddings / orig` (1 when `s <= 1`).
//!   As in transformers, `original_max_position_embeddings` is the top-level config key
//!   (default 4096), which takes priority over a value inside `rope_parameters`.
//! - An optional `sliding_window` `w`: query `i` sees key `j` only when `i - w < j <= i`
//!   (sequence indices, not position ids), as transformers' `sliding_window_overlay`.
//!
//! Only differentiable ops are used (see `../shared/docs/candle-notes.md`; the fused ones of
//! [`crate::ops`] have their own backward), and masks use the finite [`crate::llama::MASK_VALUE`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{D, DType, Device, Tensor};
use serde::Deserialize;
use serde_json::Value;

use crate::adapter::{AdapterHost, AdapterSet, Ctx, Linear};
use crate::decoder::{self, Decoder, KvSlot, Stack};
use crate::error::{ModelError, Result};
use crate::llama::{ForwardSpec, KvCache, Output, rms_norm};
use crate::weights::{LazyFiles, LoadOptions, Loader};

/// The subset of a Phi-3 `config.json` this crate reads, in both layouts (transformers 4.x
/// `rope_theta` / `rope_scaling`, 5.x `rope_parameters`). Keys irrelevant to the forward pass are
/// ignored; keys that change the maths and are not supported are rejected in
/// [`HfPhi3Config::validate`].
#[derive(Debug, Clone, Deserialize)]
pub struct HfPhi3Config {
    /// `phi3` (other Phi variants are different architectures).
    pub model_type: Option<String>,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width (each half of `gate_up_proj`).
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads; defaults to the query heads.
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
    /// Fraction of each head that is rotated (when not inside the RoPE dictionary).
    pub partial_rotary_factor: Option<f64>,
    /// Longest position (with LongRoPE: the extended context).
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// The context of pre-training, the LongRoPE switch point.
    #[serde(default = "default_max_pos")]
    pub original_max_position_embeddings: usize,
    /// Whether `lm_head` shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Activation (only "silu").
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Sliding-window attention width, if any.
    pub sliding_window: Option<usize>,
    /// Residual dropout (training only in transformers; only 0 is supported).
    #[serde(default)]
    pub resid_pdrop: f64,
    /// Attention-probability dropout (training only in transformers; only 0 is supported).
    #[serde(default)]
    pub attention_dropout: f64,
    /// Beginning-of-sequence id.
    pub bos_token_id: Option<Value>,
    /// End-of-sequence id(s).
    pub eos_token_id: Option<Value>,
}

fn default_eps() -> f64 {
    1e-5
}
fn default_max_pos() -> usize {
    4096
}
fn default_act() -> String {
    "silu".into()
}

/// How Phi-3's RoPE frequencies are computed.
#[derive(Debug, Clone, PartialEq)]
pub enum Phi3Rope {
    /// Plain RoPE.
    Default,
    /// LongRoPE (`longrope`, formerly `su`).
    LongRope {
        /// Per-frequency divisors for sequences up to `original_max_position_embeddings`.
        short_factor: Vec<f64>,
        /// Per-frequency divisors for longer sequences.
        long_factor: Vec<f64>,
        /// The switch point.
        original_max_position_embeddings: usize,
        /// The factor multiplying `cos` and `sin`.
        attention_factor: f64,
    },
}

/// A validated Phi-3 config.
#[derive(Debug, Clone, PartialEq)]
pub struct Phi3Config {
    /// Model width.
    pub hidden_size: usize,
    /// MLP width (each half of `gate_up_proj`).
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// Rotated features per head (`int(head_dim * partial_rotary_factor)`, even).
    pub rotary_dim: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE kind.
    pub rope: Phi3Rope,
    /// Longest position.
    pub max_position_embeddings: usize,
    /// Tied embeddings.
    pub tie_word_embeddings: bool,
    /// Sliding-window attention width.
    pub sliding_window: Option<usize>,
}

fn cfg_err(file: &Path, key: &str, problem: impl Into<String>) -> ModelError {
    ModelError::Config {
        file: file.to_path_buf(),
        key: key.into(),
        problem: problem.into(),
    }
}

/// The keys a Phi-3 RoPE dictionary may hold.
const ROPE_KEYS: [&str; 9] = [
    "rope_type",
    "type",
    "rope_theta",
    "partial_rotary_factor",
    "short_factor",
    "long_factor",
    "factor",
    "attention_factor",
    "original_max_position_embeddings",
];

impl HfPhi3Config {
    /// Read `config.json`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            file: path.to_path_buf(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|e| cfg_err(path, "(file)", e.to_string()))
    }

    /// Validate into a [`Phi3Config`]; `file` names the source in errors.
    pub fn validate(&self, file: &Path) -> Result<Phi3Config> {
        if let Some(t) = &self.model_type
            && t != "phi3"
        {
            return Err(cfg_err(
                file,
                "model_type",
                format!("{t:?} is not phi3 (a different architecture)"),
            ));
        }
        if self.hidden_act != "silu" {
            return Err(cfg_err(
                file,
                "hidden_act",
                format!("unsupported activation {:?}", self.hidden_act),
            ));
        }
        if self.resid_pdrop != 0.0 {
            return Err(cfg_err(
                file,
                "resid_pdrop",
                format!(
                    "residual dropout {} is not supported (only 0)",
                    self.resid_pdrop
                ),
            ));
        }
        if self.attention_dropout != 0.0 {
            return Err(cfg_err(
                file,
                "attention_dropout",
                format!(
                    "attention dropout {} is not supported (only 0)",
                    self.attention_dropout
                ),
            ));
        }
        if self.sliding_window == Some(0) {
            return Err(cfg_err(file, "sliding_window", "must be positive or null"));
        }
        if self.num_attention_heads == 0 {
            return Err(cfg_err(file, "num_attention_heads", "must be positive"));
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
            .unwrap_or(self.hidden_size / self.num_attention_heads);
        if head_dim == 0 {
            return Err(cfg_err(file, "head_dim", "must be positive"));
        }

        // transformers (Phi3Config.convert_rope_params_to_dict): `rope_scaling` if given, else
        // `rope_parameters`; theta and partial_rotary_factor from inside it, else top level.
        let (rope, container) = match (&self.rope_scaling, &self.rope_parameters) {
            (Some(s), _) if !s.is_null() && s.as_object().is_none_or(|m| !m.is_empty()) => {
                (s.clone(), "rope_scaling")
            }
            (_, Some(p)) if !p.is_null() => (p.clone(), "rope_parameters"),
            _ => (Value::Object(Default::default()), "rope_parameters"),
        };
        let map = rope
            .as_object()
            .ok_or_else(|| cfg_err(file, container, "must be an object"))?;
        if let Some(k) = map.keys().find(|k| !ROPE_KEYS.contains(&k.as_str())) {
            return Err(cfg_err(
                file,
                &format!("{container}.{k}"),
                "unknown RoPE key for Phi-3",
            ));
        }
        let number = |key: &str| -> Result<Option<f64>> {
            match map.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| cfg_err(file, &format!("{container}.{key}"), "not a number")),
            }
        };
        let theta = number("rope_theta")?
            .or(self.rope_theta)
            .unwrap_or(10_000.0);
        if theta <= 0.0 {
            return Err(cfg_err(file, "rope_theta", "must be positive"));
        }
        let prf = number("partial_rotary_factor")?
            .or(self.partial_rotary_factor)
            .unwrap_or(1.0);
        // Python's int() truncates.
        let rotary_dim = (head_dim as f64 * prf) as usize;
        if !(prf > 0.0 && prf <= 1.0) || rotary_dim == 0 || !rotary_dim.is_multiple_of(2) {
            return Err(cfg_err(
                file,
                "partial_rotary_factor",
                format!(
                    "{prf} gives {rotary_dim} rotary features of {head_dim}: must be in (0, 1] \
                     and give an even positive number"
                ),
            ));
        }
        // `rope_type`, else the old `type`; Phi-3 maps `su` and `yarn` to `longrope`.
        let (type_key, kind) = match (map.get("rope_type"), map.get("type")) {
            (Some(v), _) => ("rope_type", v),
            (None, Some(v)) => ("type", v),
            (None, None) => ("rope_type", &Value::Null),
        };
        let kind = match kind {
            Value::Null => "default",
            Value::String(s) => s.as_str(),
            _ => {
                return Err(cfg_err(
                    file,
                    &format!("{container}.{type_key}"),
                    "not a string",
                ));
            }
        };
        let rope = match kind {
            "default" => {
                for k in ["short_factor", "long_factor", "factor", "attention_factor"] {
                    if map.get(k).is_some_and(|v| !v.is_null()) {
                        return Err(cfg_err(
                            file,
                            &format!("{container}.{k}"),
                            "only meaningful with rope_type longrope",
                        ));
                    }
                }
                Phi3Rope::Default
            }
            "longrope" | "su" | "yarn" => {
                let n = rotary_dim / 2;
                let factors = |key: &str| -> Result<Vec<f64>> {
                    let k = format!("{container}.{key}");
                    let list = map
                        .get(key)
                        .and_then(Value::as_array)
                        .ok_or_else(|| cfg_err(file, &k, "missing or not a list"))?;
                    let v = list
                        .iter()
                        .map(|x| {
                            x.as_f64().filter(|f| *f > 0.0).ok_or_else(|| {
                                cfg_err(file, &k, "entries must be positive numbers")
                            })
                        })
                        .collect::<Result<Vec<f64>>>()?;
                    if v.len() != n {
                        return Err(cfg_err(
                            file,
                            &k,
                            format!("has {} entries, expected rotary_dim / 2 = {n}", v.len()),
                        ));
                    }
                    Ok(v)
                };
                let short_factor = factors("short_factor")?;
                let long_factor = factors("long_factor")?;
                let orig = self.original_max_position_embeddings;
                if orig == 0 {
                    return Err(cfg_err(
                        file,
                        "original_max_position_embeddings",
                        "must be positive",
                    ));
                }
                let scale = match number("factor")? {
                    Some(f) => f,
                    None => self.max_position_embeddings as f64 / orig as f64,
                };
                let attention_factor = match number("attention_factor")? {
                    Some(a) => a,
                    None if scale <= 1.0 => 1.0,
                    None => (1.0 + scale.ln() / (orig as f64).ln()).sqrt(),
                };
                Phi3Rope::LongRope {
                    short_factor,
                    long_factor,
                    original_max_position_embeddings: orig,
                    attention_factor,
                }
            }
            other => {
                return Err(cfg_err(
                    file,
                    &format!("{container}.{type_key}"),
                    format!(
                        "unsupported rope type {other:?} for Phi-3 (default, longrope, su, yarn)"
                    ),
                ));
            }
        };
        Ok(Phi3Config {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads,
            head_dim,
            rotary_dim,
            vocab_size: self.vocab_size,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: theta,
            rope,
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings,
            sliding_window: self.sliding_window,
        })
    }
}

impl Phi3Config {
    /// Load and validate `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path: PathBuf = dir.join("config.json");
        HfPhi3Config::load(&path)?.validate(&path)
    }

    /// Load and validate a config file at `path`.
    pub fn from_file(path: &Path) -> Result<Self> {
        HfPhi3Config::load(path)?.validate(path)
    }

    /// Whether a batch whose largest position id is `seq_len - 1` uses LongRoPE's long factors.
    pub fn uses_long_factors(&self, seq_len: usize) -> bool {
        match &self.rope {
            Phi3Rope::Default => false,
            Phi3Rope::LongRope {
                original_max_position_embeddings,
                ..
            } => seq_len > *original_max_position_embeddings,
        }
    }

    /// The factor multiplying `cos` and `sin` (1 without LongRoPE).
    pub fn attention_factor(&self) -> f64 {
        match &self.rope {
            Phi3Rope::Default => 1.0,
            Phi3Rope::LongRope {
                attention_factor, ..
            } => *attention_factor,
        }
    }

    /// RoPE inverse frequencies (length `rotary_dim / 2`), with the long or short factors. They
    /// are computed in f32 as transformers does: `1 / (factor * theta^(2i / rotary_dim))`.
    pub fn inv_freq(&self, long: bool) -> Vec<f32> {
        let d = self.rotary_dim as f32;
        let theta = self.rope_theta as f32;
        (0..self.rotary_dim / 2)
            .map(|i| {
                let base = theta.powf((2 * i) as f32 / d);
                let factor = match &self.rope {
                    Phi3Rope::Default => 1.0,
                    Phi3Rope::LongRope {
                        short_factor,
                        long_factor,
                        ..
                    } => {
                        let f = if long { long_factor } else { short_factor };
                        f.get(i).copied().unwrap_or(1.0) as f32
                    }
                };
                1.0 / (factor * base)
            })
            .collect()
    }
}

/// One Phi-3 decoder layer.
#[derive(Debug, Clone)]
struct Block {
    input_norm: Tensor,
    qkv: Linear,
    o: Linear,
    post_norm: Tensor,
    gate_up: Linear,
    down: Linear,
}

/// A Phi-3 model with frozen base weights.
#[derive(Debug, Clone)]
pub struct Phi3 {
    /// The validated config.
    pub config: Phi3Config,
    embed: Tensor,
    layers: Vec<Block>,
    norm: Tensor,
    lm_head: Tensor,
    short_inv_freq: Tensor,
    long_inv_freq: Tensor,
    dtype: DType,
    device: Device,
    /// Registered adapters.
    pub adapters: AdapterSet,
}

impl Phi3 {
    /// Load `dir/config.json` and the safetensors weights, cast to `dtype`, on `device`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_with(dir, &LoadOptions::dense(dtype, device))
    }

    /// Load `dir/config.json` and the safetensors weights tensor by tensor with `opts` (see
    /// [`crate::Llama::load_with`]).
    pub fn load_with(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let config = Phi3Config::from_dir(dir)?;
        let mut files = LazyFiles::open(dir)?;
        Self::from_source(config, &mut Loader::new(&mut files, dir, opts), opts)
    }

    /// Build from named tensors (HF names, `model.` prefix).
    pub fn from_tensors(
        config: Phi3Config,
        mut t: HashMap<String, Tensor>,
        file: &Path,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let opts = LoadOptions::dense(dtype, device);
        Self::from_source(config, &mut Loader::new(&mut t, file, &opts), &opts)
    }

    /// Build from the tensors a [`Loader`] gives.
    pub fn from_source(config: Phi3Config, t: &mut Loader<'_>, opts: &LoadOptions) -> Result<Self> {
        let (dtype, device) = (opts.dtype, &opts.device);
        let c = &config;
        let (h, i, hd) = (c.hidden_size, c.intermediate_size, c.head_dim);
        let embed = t.dense("model.embed_tokens.weight", &[c.vocab_size, h])?;
        let qkv_rows = (c.num_heads + 2 * c.num_kv_heads) * hd;
        let mut layers = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            let p = format!("model.layers.{l}");
            let mut lin = |name: &str, out: usize, inp: usize| -> Result<Linear> {
                t.linear(&format!("{p}.{name}"), out, inp)
            };
            let qkv = lin("self_attn.qkv_proj", qkv_rows, h)?;
            let o = lin("self_attn.o_proj", h, c.num_heads * hd)?;
            let gate_up = lin("mlp.gate_up_proj", 2 * i, h)?;
            let down = lin("mlp.down_proj", h, i)?;
            let input_norm = t.dense(&format!("{p}.input_layernorm.weight"), &[h])?;
            let post_norm = t.dense(&format!("{p}.post_attention_layernorm.weight"), &[h])?;
            layers.push(Block {
                input_norm,
                qkv,
                o,
                post_norm,
                gate_up,
                down,
            });
        }
        let norm = t.dense("model.norm.weight", &[h])?;
        let lm_head = if c.tie_word_embeddings {
            embed.clone()
        } else {
            t.dense("lm_head.weight", &[c.vocab_size, h])?
        };
        let freq = |long: bool| -> Result<Tensor> {
            let v = c.inv_freq(long);
            let n = v.len();
            Ok(Tensor::from_vec(v, (1, 1, n), device)?)
        };
        let short_inv_freq = freq(false)?;
        let long_inv_freq = freq(true)?;
        Ok(Phi3 {
            config,
            embed,
            layers,
            norm,
            lm_head,
            short_inv_freq,
            long_inv_freq,
            dtype,
            device: device.clone(),
            adapters: AdapterSet::default(),
        })
    }

    /// The weights' dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The vocabulary projection of final hidden states `[N, hidden]` -> logits `[N, vocab]`.
    pub fn project(&self, normed: &Tensor) -> Result<Tensor> {
        crate::frozen::frozen_matmul(normed, &self.lm_head)
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// `cos`, `sin` of shape `[B, 1, T, rotary_dim]` (layout `cat(freqs, freqs)`, attention factor
    /// included, in the model dtype) for positions `[B, T]`. With LongRoPE the factor set is
    /// chosen for the whole batch from `max(positions) + 1`.
    pub fn rope_tables(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        let pos = positions.to_dtype(DType::F32)?;
        // Only LongRoPE reads the largest position back (the default rope has one factor set).
        let seq_len = if pos.elem_count() == 0 || matches!(self.config.rope, Phi3Rope::Default) {
            0
        } else {
            pos.flatten_all()?.max(0)?.to_scalar::<f32>()? as usize + 1
        };
        self.rope_tables_for(&pos, self.config.uses_long_factors(seq_len))
    }

    fn rope_tables_for(&self, pos: &Tensor, long: bool) -> Result<(Tensor, Tensor)> {
        let inv = if long {
            &self.long_inv_freq
        } else {
            &self.short_inv_freq
        };
        let freqs = pos
            .to_dtype(DType::F32)?
            .unsqueeze(D::Minus1)?
            .broadcast_mul(inv)?;
        let emb = Tensor::cat(&[&freqs, &freqs], D::Minus1)?.unsqueeze(1)?;
        let a = self.config.attention_factor();
        let (cos, sin) = if a == 1.0 {
            (emb.cos()?, emb.sin()?)
        } else {
            (emb.cos()?.affine(a, 0.0)?, emb.sin()?.affine(a, 0.0)?)
        };
        Ok((cos.to_dtype(self.dtype)?, sin.to_dtype(self.dtype)?))
    }

    /// A forward over a padded batch.
    ///
    /// `input_ids`: `[B, T]` u32. `attention_mask`: `[B, T]`, 1 on real tokens (any numeric dtype;
    /// `None` = all real). `position_ids`: `[B, T]`; `None` = `0..T` for every row, which is what a
    /// plain `transformers` forward uses whatever the padding. With LongRoPE the positions also
    /// choose the factor set (see the module docs).
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: Option<&Tensor>,
        spec: &ForwardSpec,
    ) -> Result<Output> {
        decoder::forward(self, input_ids, attention_mask, position_ids, spec)
    }

    /// Whether feeding `new_tokens` more tokens after `cache` crosses LongRoPE's switch point:
    /// the cached keys were computed with the short factors, and the whole sequence must then be
    /// recomputed with the long ones (transformers' `prepare_inputs_for_generation` drops the
    /// cache at this point). The caller resets the cache and feeds every token again;
    /// [`Phi3::forward_cached`] refuses to continue without that.
    pub fn cache_needs_refill(&self, cache: &KvCache, new_tokens: usize) -> bool {
        cache.len > 0
            && !self.config.uses_long_factors(cache.len)
            && self.config.uses_long_factors(cache.len + new_tokens)
    }
    /// Logits `[C, n, vocab]` at every position of `C` right-padded continuations of the prefix
    /// in `cache`, in one batched forward; the cache is not changed. See
    /// [`crate::Llama::forward_after`]; here the sliding window applies too, and a continuation
    /// that would switch LongRoPE's factors is an error (see [`Phi3::cache_needs_refill`]).
    pub fn forward_after(
        &self,
        ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &KvCache,
    ) -> Result<Tensor> {
        decoder::forward_after(self, ids, attention_mask, cache)
    }

    /// Logits of the last position for new tokens `ids` (`[1, n]`) after the cached ones;
    /// updates the cache. No padding: for generation. With LongRoPE the factor set follows the
    /// total length, as in a full forward over the sequence so far; a step that crosses the
    /// switch point with a non-empty cache is an error (see [`Phi3::cache_needs_refill`]).
    pub fn forward_cached(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        decoder::forward_cached(self, ids, cache)
    }
}

impl Block {
    fn linears(&self) -> [&Linear; 4] {
        [&self.qkv, &self.o, &self.gate_up, &self.down]
    }

    fn linears_mut(&mut self) -> [&mut Linear; 4] {
        [
            &mut self.qkv,
            &mut self.o,
            &mut self.gate_up,
            &mut self.down,
        ]
    }
}

impl AdapterHost for Phi3 {
    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        self.layers
            .iter_mut()
            .flat_map(|b| b.linears_mut())
            .collect()
    }

    fn linears(&self) -> Vec<&Linear> {
        self.layers.iter().flat_map(|b| b.linears()).collect()
    }

    fn adapter_set(&self) -> &AdapterSet {
        &self.adapters
    }

    fn adapter_set_mut(&mut self) -> &mut AdapterSet {
        &mut self.adapters
    }
}

impl Decoder for Phi3 {
    fn stack(&self) -> Stack<'_> {
        Stack {
            embed: &self.embed,
            norm: &self.norm,
            eps: self.config.rms_norm_eps,
            lm_head: &self.lm_head,
            num_layers: self.config.num_layers,
            active: self.adapters.active,
            reference: self.adapters.reference,
            device: &self.device,
        }
    }

    /// With LongRoPE the factor set follows `total` (new tokens after a cache) or, in a full
    /// forward, `max(positions) + 1` for the whole batch.
    fn rope(&self, positions: &Tensor, total: Option<usize>) -> Result<(Tensor, Tensor)> {
        match total {
            Some(total) => self.rope_tables_for(positions, self.config.uses_long_factors(total)),
            None => self.rope_tables(positions),
        }
    }

    fn window(&self) -> Option<usize> {
        self.config.sliding_window
    }

    /// A continuation that would cross LongRoPE's switch point (see
    /// [`Phi3::cache_needs_refill`]) is an error.
    fn check_after(&self, cache: &KvCache, n: usize, remedy: &str) -> Result<()> {
        if self.cache_needs_refill(cache, n) {
            return Err(ModelError::Invalid(format!(
                "LongRoPE: {} cached tokens used the short factors and {} tokens need the long \
                 ones; {remedy}",
                cache.len,
                cache.len + n
            )));
        }
        Ok(())
    }

    fn block(
        &self,
        l: usize,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        ctx: &Ctx,
        cache: Option<&mut KvSlot>,
    ) -> Result<Tensor> {
        let blk = &self.layers[l];
        let c = &self.config;
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let h = rms_norm(x, &blk.input_norm, c.rms_norm_eps)?;
        let qkv = blk.qkv.forward(&h, ctx)?;
        let split = |start: usize, heads: usize| -> Result<Tensor> {
            Ok(qkv
                .narrow(D::Minus1, start, heads * hd)?
                .reshape((b, t, heads, hd))?
                .transpose(1, 2)?)
        };
        let q = crate::ops::rope(&split(0, nh)?, cos, sin)?;
        let mut k = crate::ops::rope(&split(nh * hd, nkv)?, cos, sin)?;
        let mut v = split((nh + nkv) * hd, nkv)?.contiguous()?;
        if let Some(slot) = cache {
            if let Some((pk, pv)) = slot.as_ref() {
                k = Tensor::cat(&[pk, &k], 2)?;
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            *slot = Some((k.clone(), v.clone()));
        }
        let attn = crate::ops::attention(&q, &k, &v, mask)?;
        let x = (x + blk.o.forward(&attn, ctx)?)?;
        let h = rms_norm(&x, &blk.post_norm, c.rms_norm_eps)?;
        let act = crate::ops::silu_mul_packed(&blk.gate_up.forward(&h, ctx)?)?;
        let mlp = blk.down.forward(&act, ctx)?;
        Ok((x + mlp)?)
    }

    fn layer_linears(&self, l: usize) -> Vec<&Linear> {
        self.layers[l].linears().to_vec()
    }
}
