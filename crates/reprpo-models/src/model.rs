//! `CausalLm`: what every architecture offers to training, evaluation and generation, so that
//! code above the models crate is written once (Llama and Phi-3 implement it).

use std::path::Path;

use candle_core::{Device, Tensor};
use reprpo_data::Tok;

use crate::error::{ModelError, Result};
use crate::llama::{ForwardSpec, KvCache, Llama, Output};
use crate::phi3::Phi3;

/// A causal language model with the forward this project needs.
pub trait CausalLm {
    /// Full-sequence forward over a padded batch (see [`Llama::forward`]).
    fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: Option<&Tensor>,
        spec: &ForwardSpec,
    ) -> Result<Output>;
    /// Last-position logits `[1, vocab]` for `ids` after the cached tokens; updates the cache.
    fn forward_cached(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor>;
    /// Logits `[C, n, vocab]` of `C` right-padded continuations of the cached prefix, in one
    /// batched forward; the cache is not changed (see [`Llama::forward_after`]).
    fn forward_after(
        &self,
        ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &KvCache,
    ) -> Result<Tensor>;
    /// The device.
    fn device(&self) -> &Device;
    /// Decoder layers (hidden states are indexed 0..=layers).
    fn num_layers(&self) -> usize;
    /// The vocabulary projection of final hidden states (hidden state `L`, after the final norm):
    /// `[N, hidden]` -> `[N, vocab]` logits, the rows of what a forward with `logits` returns
    /// (for callers that need the logits of a few positions only).
    fn project(&self, normed: &Tensor) -> Result<Tensor>;
    /// Whether feeding `new_tokens` more tokens needs the cache rebuilt from the whole sequence
    /// (Phi-3 LongRoPE switches RoPE factors when the sequence passes its original context).
    fn cache_needs_refill(&self, cache: &KvCache, new_tokens: usize) -> bool {
        let _ = (cache, new_tokens);
        false
    }
    /// The input embedding and the output head, both `[vocab, hidden]` (the same tensor when
    /// tied), as the `svd` and `supr` activation transforms read them.
    fn vocab_matrices(&self) -> (Tensor, Tensor);
    /// The module paths of the linear layers whose active adapter has trainable parameters, in
    /// model order (what the gradient interventions hook, [`crate::gradproj::hooked_modules`]).
    fn trained_modules(&self) -> Vec<String>;
}

impl CausalLm for Llama {
    fn forward(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        pos: Option<&Tensor>,
        spec: &ForwardSpec,
    ) -> Result<Output> {
        Llama::forward(self, ids, mask, pos, spec)
    }
    fn forward_cached(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        Llama::forward_cached(self, ids, cache)
    }
    fn forward_after(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        cache: &KvCache,
    ) -> Result<Tensor> {
        Llama::forward_after(self, ids, mask, cache)
    }
    fn device(&self) -> &Device {
        Llama::device(self)
    }
    fn num_layers(&self) -> usize {
        self.config.num_layers
    }
    fn project(&self, normed: &Tensor) -> Result<Tensor> {
        Llama::project(self, normed)
    }
    fn vocab_matrices(&self) -> (Tensor, Tensor) {
        let s = crate::decoder::Decoder::stack(self);
        (s.embed.clone(), s.lm_head.clone())
    }
    fn trained_modules(&self) -> Vec<String> {
        crate::gradproj::hooked_modules(self)
    }
}

impl CausalLm for Phi3 {
    fn forward(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        pos: Option<&Tensor>,
        spec: &ForwardSpec,
    ) -> Result<Output> {
        Phi3::forward(self, ids, mask, pos, spec)
    }
    fn forward_cached(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        Phi3::forward_cached(self, ids, cache)
    }
    fn forward_after(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        cache: &KvCache,
    ) -> Result<Tensor> {
        Phi3::forward_after(self, ids, mask, cache)
    }
    fn device(&self) -> &Device {
        Phi3::device(self)
    }
    fn num_layers(&self) -> usize {
        self.config.num_layers
    }
    fn cache_needs_refill(&self, cache: &KvCache, new_tokens: usize) -> bool {
        Phi3::cache_needs_refill(self, cache, new_tokens)
    }
    fn project(&self, normed: &Tensor) -> Result<Tensor> {
        Phi3::project(self, normed)
    }
    fn vocab_matrices(&self) -> (Tensor, Tensor) {
        let s = crate::decoder::Decoder::stack(self);
        (s.embed.clone(), s.lm_head.clone())
    }
    fn trained_modules(&self) -> Vec<String> {
        crate::gradproj::hooked_modules(self)
    }
}

/// Check that every id of `tok` (added tokens included) indexes a row of the model's embedding of
/// `vocab_size` rows, so that a mismatched tokenizer fails at load time naming both files rather
/// than at the first forward with an index-select error.
///
/// # Errors
/// [`ModelError::Config`] on `config_file`'s `vocab_size`, naming `tokenizer_file`.
pub fn check_vocab(
    tok: &Tok,
    vocab_size: usize,
    tokenizer_file: &Path,
    config_file: &Path,
) -> Result<()> {
    let Some(max_id) = tok.inner.get_vocab(true).into_values().max() else {
        return Ok(());
    };
    if (max_id as usize) < vocab_size {
        return Ok(());
    }
    Err(ModelError::Config {
        file: config_file.to_path_buf(),
        key: "vocab_size".into(),
        problem: format!(
            "the model's embedding has {vocab_size} rows but the tokenizer {} has token ids up to \
             {max_id}; use the tokenizer that belongs to this model",
            tokenizer_file.display()
        ),
    })
}

/// [`check_vocab`] for a model folder: `vocab_size` from `dir/config.json` against the tokenizer
/// loaded from `dir/tokenizer.json`.
///
/// # Errors
/// [`ModelError::Io`] / [`ModelError::Format`] when `config.json` cannot be read or parsed,
/// [`ModelError::Config`] when it has no integer `vocab_size` or the tokenizer exceeds it.
pub fn check_vocab_dir(tok: &Tok, dir: &Path) -> Result<()> {
    let config_file = dir.join("config.json");
    let text = std::fs::read_to_string(&config_file).map_err(|source| ModelError::Io {
        file: config_file.clone(),
        source,
    })?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::Format {
        file: config_file.clone(),
        problem: e.to_string(),
    })?;
    let vocab_size = v
        .get("vocab_size")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| ModelError::Config {
            file: config_file.clone(),
            key: "vocab_size".into(),
            problem: "missing or not a non-negative integer".into(),
        })?;
    check_vocab(
        tok,
        usize::try_from(vocab_size).unwrap_or(usize::MAX),
        &dir.join("tokenizer.json"),
        &config_file,
    )
}
