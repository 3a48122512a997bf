//! The decoder stack shared by Llama and Phi-3: the forward over a padded batch (embedding,
//! blocks up to the deepest one a [`ForwardSpec`] needs, checkpointed or not, final norm, output
//! head, hidden states, side activations of `crate::collect`), the cached forward over new
//! tokens (generation and prompt-cache scoring), and the additive attention masks. An
//! architecture supplies what differs through [`Decoder`]: its block, its RoPE tables and the
//! parts of the stack around the blocks.
//!
//! # Hidden-state convention (as `transformers`' `output_hidden_states`)
//! There are `L + 1` states: index 0 is the token embeddings, index `i` (1..L-1) the output of
//! layer `i`, and index `L` the output of the last layer after the final norm.

use std::collections::HashMap;

use candle_core::{DType, Device, IndexOp, Tensor, Var};

use crate::adapter::{Ctx, Linear};
use crate::collect::{Tap, TapRecorder};
use crate::error::{ModelError, Result};
use crate::llama::{ForwardSpec, KvCache, MASK_VALUE, Output};
use crate::ops::rms_norm;

/// The per-layer key/value slot a block attends to and extends (`None`: empty).
pub(crate) type KvSlot = Option<(Tensor, Tensor)>;

/// The weights around the blocks, borrowed from a model.
pub(crate) struct Stack<'a> {
    /// Token embeddings `[vocab, hidden]`.
    pub embed: &'a Tensor,
    /// Final RMSNorm weight and epsilon.
    pub norm: &'a Tensor,
    pub eps: f64,
    /// Output head `[vocab, hidden]` (never adapted).
    pub lm_head: &'a Tensor,
    pub num_layers: usize,
    /// The adapter that is active when a forward does not turn adapters off.
    pub active: Option<usize>,
    /// The adapter a reference forward ([`ForwardSpec::reference`]) runs with; `None`: the base.
    pub reference: Option<usize>,
    pub device: &'a Device,
}

/// What an architecture gives the shared stack.
pub(crate) trait Decoder: Clone + Send + Sync + 'static {
    fn stack(&self) -> Stack<'_>;
    /// `cos`, `sin` (`[B, 1, T, rotary dim]`, model dtype) for `positions` (`[B, T]`). `total`:
    /// the sequence length when the caller knows it (new tokens after a cache); `None` in a full
    /// forward, where an architecture that depends on it derives it from the positions.
    fn rope(&self, positions: &Tensor, total: Option<usize>) -> Result<(Tensor, Tensor)>;
    /// The sliding attention window, if any (see [`causal_mask`]).
    fn window(&self) -> Option<usize> {
        None
    }
    /// An error when `n` new tokens cannot follow `cache` in a cached forward; `remedy` says
    /// what the caller should do instead.
    fn check_after(&self, _cache: &KvCache, _n: usize, _remedy: &str) -> Result<()> {
        Ok(())
    }
    /// Layer `l` on `x` (`[B, T, hidden]`), attending to and extending `cache` when given.
    #[allow(clippy::too_many_arguments)]
    fn block(
        &self,
        l: usize,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        ctx: &Ctx,
        cache: Option<&mut KvSlot>,
    ) -> Result<Tensor>;
    /// Layer `l`'s linear layers.
    fn layer_linears(&self, l: usize) -> Vec<&Linear>;
    /// The adapter parameters layer `l` reads under `ctx`.
    fn layer_params(&self, l: usize, ctx: &Ctx) -> Vec<Var> {
        self.layer_linears(l)
            .iter()
            .flat_map(|lin| lin.active_params(ctx))
            .collect()
    }
}

/// A forward over a padded batch (see `Llama::forward`): `positions` default to `0..T` for every
/// row, as in a plain `transformers` forward.
pub(crate) fn forward<M: Decoder>(
    m: &M,
    input_ids: &Tensor,
    attention_mask: Option<&Tensor>,
    position_ids: Option<&Tensor>,
    spec: &ForwardSpec,
) -> Result<Output> {
    let stack = m.stack();
    let (b, t) = input_ids.dims2()?;
    let positions = match position_ids {
        Some(p) => p.clone(),
        None => Tensor::arange(0u32, t as u32, stack.device)?
            .unsqueeze(0)?
            .broadcast_as((b, t))?
            .contiguous()?,
    };
    let (cos, sin) = m.rope(&positions, None)?;
    let mask = causal_mask(b, t, 0, m.window(), attention_mask, stack.device)?;
    let num_layers = stack.num_layers;
    let tapped = tapped_blocks(m, &spec.taps, num_layers)?;
    let recorder = TapRecorder::new(&spec.taps);
    // `plain` records nothing: the checkpointed blocks (which hold no tap) run with it.
    let plain = spec.ctx(stack.active, stack.reference);
    let ctx = Ctx {
        taps: (!spec.taps.is_empty()).then_some(&recorder),
        grad_hooks: spec.grad_hooks.as_deref(),
        ..plain
    };
    let seed = match spec.dropout_seed {
        Some(s) => Some(s),
        None if spec.checkpoint && spec.train => Some(crate::checkpoint::fresh_seed()),
        None => None,
    };
    // Checkpointed blocks need an owned closure (recomputed in the backward); built once.
    let mut shared: Option<crate::checkpoint::BlockFn> = None;
    let mut block = |l: usize, x: &Tensor| -> Result<Tensor> {
        let block_seed = seed.map(|s| crate::checkpoint::block_seed(s, l));
        let run = |x: &Tensor| m.block(l, x, &cos, &sin, &mask, &ctx, None);
        if spec.reference {
            // The reference model is frozen: its adapter is read detached, no graph recorded.
            return crate::checkpoint::scoped(true, block_seed, || run(x));
        }
        // A checkpointed block keeps no inner activation in the graph: blocks with taps run
        // plainly.
        if !spec.checkpoint || tapped[l] {
            return match block_seed {
                None => run(x),
                Some(_) => crate::checkpoint::scoped(false, block_seed, || run(x)),
            };
        }
        let owned = shared.get_or_insert_with(|| {
            let m = std::sync::Arc::new(m.clone());
            let (cos, sin, mask) = (cos.clone(), sin.clone(), mask.clone());
            // projbp's hooks go with the block into its recomputation (where the graph is).
            let hooks = spec.grad_hooks.clone();
            std::sync::Arc::new(move |l: usize, x: &Tensor| {
                let ctx = Ctx {
                    grad_hooks: hooks.as_deref(),
                    ..plain
                };
                m.block(l, x, &cos, &sin, &mask, &ctx, None)
            })
        });
        crate::checkpoint::checkpointed(owned, l, x, m.layer_params(l, &ctx), block_seed)
    };
    let wanted = resolve_layers(spec, num_layers)?;
    // Blocks to run: all with logits; else up to the deepest hidden state (index L needs every
    // layer plus the final norm) or block holding a tap.
    let deepest = if spec.logits {
        num_layers
    } else {
        let last_tap = tapped.iter().rposition(|&t| t).map_or(0, |l| l + 1);
        wanted.iter().copied().max().unwrap_or(0).max(last_tap)
    };
    let mut x = embed(&stack, input_ids)?;
    let mut states: Vec<Option<Tensor>> = vec![None; num_layers + 1];
    if wanted.contains(&0) {
        states[0] = Some(x.clone());
    }
    for l in 0..deepest {
        x = block(l, &x)?;
        let idx = l + 1;
        if idx < num_layers && wanted.contains(&idx) {
            states[idx] = Some(x.clone());
        }
    }
    let mut logits = None;
    if deepest == num_layers {
        let normed = rms_norm(&x, stack.norm, stack.eps)?;
        if wanted.contains(&num_layers) {
            states[num_layers] = Some(normed.clone());
        }
        if spec.logits {
            logits = Some(head(&normed, stack.lm_head)?);
        }
    }
    let hidden = wanted
        .iter()
        .map(|&i| {
            states[i]
                .clone()
                .map(|s| (i, s))
                .ok_or_else(|| ModelError::Invalid(format!("hidden state {i} was not computed")))
        })
        .collect::<Result<Vec<_>>>()?;
    let taps = recorder.finish(&spec.taps)?;
    Ok(Output {
        logits,
        hidden,
        taps,
    })
}

/// Per block, whether it holds a module of `taps`; an error names a tap of no linear layer.
fn tapped_blocks<M: Decoder>(m: &M, taps: &[Tap], num_layers: usize) -> Result<Vec<bool>> {
    let mut tapped = vec![false; num_layers];
    if taps.is_empty() {
        return Ok(tapped);
    }
    let block_of: HashMap<&str, usize> = (0..num_layers)
        .flat_map(|l| m.layer_linears(l).into_iter().map(move |lin| (lin, l)))
        .map(|(lin, l)| (lin.name.as_str(), l))
        .collect();
    for t in taps {
        let l = block_of.get(t.module.as_str()).ok_or_else(|| {
            ModelError::Invalid(format!(
                "tap `{}`: the model has no linear layer of that name (module paths look \
                 like `model.layers.0.self_attn.o_proj`)",
                t.module
            ))
        })?;
        tapped[*l] = true;
    }
    Ok(tapped)
}

/// Token embeddings `[B, T, hidden]` of `ids` (`[B, T]`).
fn embed(stack: &Stack<'_>, ids: &Tensor) -> Result<Tensor> {
    let (b, t) = ids.dims2()?;
    Ok(stack
        .embed
        .index_select(&ids.flatten_all()?, 0)?
        .reshape((b, t, stack.embed.dim(1)?))?)
}

/// Logits `[C, n, vocab]` at every position of `C` right-padded continuations `ids` (`[C, n]`,
/// `attention_mask` 1 = real token) of the prefix in `cache`, in one batched forward; the cache
/// is not changed (see `Llama::forward_after`).
pub(crate) fn forward_after<M: Decoder>(
    m: &M,
    ids: &Tensor,
    attention_mask: Option<&Tensor>,
    cache: &KvCache,
) -> Result<Tensor> {
    let stack = m.stack();
    let (c, n) = ids.dims2()?;
    if n == 0 {
        return Err(ModelError::Invalid(
            "forward_after needs at least one token per row".into(),
        ));
    }
    let mut kv = prefix_for_rows(cache, stack.num_layers, c)?;
    m.check_after(cache, n, "score the whole sequences instead")?;
    let mask = mask_after(c, n, cache.len, m.window(), attention_mask, stack.device)?;
    let x = blocks_after(m, ids, cache.len, &mask, &mut kv)?;
    logits(m, &x)
}

/// Logits `[b, vocab]` of the last position for new tokens `ids` (`[b, n]`, no padding) after
/// the cached ones; updates the cache (see `Llama::forward_cached`).
pub(crate) fn forward_cached<M: Decoder>(
    m: &M,
    ids: &Tensor,
    cache: &mut KvCache,
) -> Result<Tensor> {
    let stack = m.stack();
    let (b, n) = ids.dims2()?;
    if n == 0 {
        return Err(ModelError::Invalid(
            "forward_cached needs at least one token".into(),
        ));
    }
    if cache.kv.len() != stack.num_layers {
        cache.kv = vec![None; stack.num_layers];
        cache.len = 0;
    }
    m.check_after(cache, n, "reset the cache and feed the whole sequence")?;
    // Query i (absolute first + i) sees keys 0..=first + i.
    let first = cache.len;
    let mask = mask_after(b, n, first, m.window(), None, stack.device)?;
    let x = blocks_after(m, ids, first, &mask, &mut cache.kv)?;
    cache.len = first + n;
    let last = x.i((.., n - 1..n, ..))?;
    Ok(logits(m, &last)?.squeeze(1)?)
}

/// The blocks over new tokens `ids` (`[b, n]`) at positions `first..first + n` with the
/// additive `mask`, each block attending to and extending its slot of `kv`, the active adapter
/// on, no dropout; returns the hidden states after the last block (before the final norm).
fn blocks_after<M: Decoder>(
    m: &M,
    ids: &Tensor,
    first: usize,
    mask: &Tensor,
    kv: &mut [KvSlot],
) -> Result<Tensor> {
    let stack = m.stack();
    let (b, n) = ids.dims2()?;
    let positions = Tensor::arange(first as u32, (first + n) as u32, stack.device)?
        .unsqueeze(0)?
        .broadcast_as((b, n))?
        .contiguous()?;
    let (cos, sin) = m.rope(&positions, Some(first + n))?;
    let mut x = embed(&stack, ids)?;
    let ctx = Ctx {
        adapter: stack.active,
        train: false,
        taps: None,
        grad_hooks: None,
    };
    for (l, slot) in kv.iter_mut().enumerate() {
        x = m.block(l, &x, &cos, &sin, mask, &ctx, Some(slot))?;
    }
    Ok(x)
}

/// Logits `[b, n, vocab]` of hidden states after the last block (final norm, then the head).
fn logits<M: Decoder>(m: &M, x: &Tensor) -> Result<Tensor> {
    let stack = m.stack();
    head(&rms_norm(x, stack.norm, stack.eps)?, stack.lm_head)
}

/// Resolve requested hidden indices (negative from the end) into `0..=num_layers`.
fn resolve_layers(spec: &ForwardSpec, num_layers: usize) -> Result<Vec<usize>> {
    let n = num_layers as isize + 1;
    spec.hidden_layers
        .iter()
        .map(|&i| {
            let j = if i < 0 { n + i } else { i };
            if (0..n).contains(&j) {
                Ok(j as usize)
            } else {
                Err(ModelError::Invalid(format!(
                    "hidden layer {i} out of range for {n} states"
                )))
            }
        })
        .collect()
}

/// The output head `x W^T` (never adapted).
fn head(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (b, t, h) = x.dims3()?;
    Ok(crate::frozen::frozen_matmul(&x.reshape((b * t, h))?, w)?.reshape((b, t, w.dim(0)?))?)
}

/// Additive mask `[b, 1, n, first + n]` (`[1, 1, n, first + n]` without `attention_mask`) in f32
/// for `n` queries at sequence indices `first..first + n`: 0 where query `i` (absolute `q`) may
/// attend key `j` (`j <= q`, `j > q - window` when there is a window, key real in
/// `attention_mask`, `[b, first + n]`, 1 = real), [`MASK_VALUE`] elsewhere.
fn causal_mask(
    b: usize,
    n: usize,
    first: usize,
    window: Option<usize>,
    attention_mask: Option<&Tensor>,
    device: &Device,
) -> Result<Tensor> {
    let total = first + n;
    let allowed: Vec<f32> = (0..n)
        .flat_map(|i| {
            let q = first + i;
            (0..total).map(move |j| {
                let causal = j <= q;
                let in_window = window.is_none_or(|w| j + w > q);
                if causal && in_window { 1.0 } else { 0.0 }
            })
        })
        .collect();
    let allowed = Tensor::from_vec(allowed, (1, n, total), device)?;
    let allowed = match attention_mask {
        Some(am) => allowed.broadcast_mul(&am.to_dtype(DType::F32)?.reshape((b, 1, total))?)?,
        None => allowed,
    };
    Ok(((allowed - 1.0)? * f64::from(-MASK_VALUE))?.unsqueeze(1)?)
}

/// [`causal_mask`] for `n` new tokens after `first` cached ones, `attention_mask` (`[b, n]`)
/// covering the new tokens only (the cached ones are real), and `[b, 1, n, first + n]` in every
/// case. No query row is all masked: every query sees its own key (and the cached ones).
fn mask_after(
    b: usize,
    n: usize,
    first: usize,
    window: Option<usize>,
    attention_mask: Option<&Tensor>,
    device: &Device,
) -> Result<Tensor> {
    match attention_mask {
        Some(am) => {
            let ones = Tensor::ones((b, first), DType::F32, device)?;
            let full = Tensor::cat(&[&ones, &am.to_dtype(DType::F32)?], 1)?;
            causal_mask(b, n, first, window, Some(&full), device)
        }
        None => Ok(causal_mask(b, n, first, window, None, device)?
            .broadcast_as((b, 1, n, first + n))?
            .contiguous()?),
    }
}

/// The prefix cache of `forward_after`, per layer, with its batch made `rows` (a batch-1 prefix
/// is broadcast to every row and copied; a prefix with `rows` rows is used as it is).
fn prefix_for_rows(cache: &KvCache, layers: usize, rows: usize) -> Result<Vec<KvSlot>> {
    if cache.len == 0 || cache.kv.len() != layers {
        return Err(ModelError::Invalid(
            "forward_after needs a filled cache: run forward_cached on the prefix first".into(),
        ));
    }
    cache
        .kv
        .iter()
        .map(|slot| {
            let Some((k, v)) = slot else {
                return Err(ModelError::Invalid(
                    "forward_after: a layer of the cache is empty".into(),
                ));
            };
            let widen = |t: &Tensor| -> Result<Tensor> {
                let (b, h, len, d) = t.dims4()?;
                match b {
                    _ if b == rows => Ok(t.clone()),
                    1 => Ok(t.broadcast_as((rows, h, len, d))?.contiguous()?),
                    _ => Err(ModelError::Invalid(format!(
                        "forward_after: the cache has batch {b}, the continuations {rows} rows"
                    ))),
                }
            };
            Ok(Some((widen(k)?, widen(v)?)))
        })
        .collect()
}
