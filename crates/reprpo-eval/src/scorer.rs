//! Log-probabilities of completions given their prompts, computed by the model: the tensor side
//! of evaluation. [`crate::score`] turns them into scores.
//!
//! # What is computed
//! For a tokenised group (a prompt and several completions: the choices of a multiple-choice
//! item, or chosen and rejected of a pair), each completion's summed log-probability
//! `l = sum_t log softmax(logits_{t-1})[y_t]` over its completion tokens, and its token count,
//! exactly as [`reprpo_models::logps::token_logps`] defines it. The adapter that is active on
//! the model (`model.adapters.active`) is the one scored; `None` scores the base weights
//! (the same weights in memory, no second model).
//!
//! # Three ways ([`ScoreMode`])
//! - [`ScoreMode::PrefixCache`]: the shared prompt of a group is
//!   run **once** through [`CausalLm::forward_cached`], which leaves its keys and values in a
//!   [`KvCache`] and returns the logits of its last position; all completions of the group then
//!   run as one right-padded batch on top of that cache ([`CausalLm::forward_after`]), so the
//!   prompt is never re-run per choice. Where the sequences' own prompts extend the shared
//!   prompt (a merge at the boundary), the extra prompt tokens are fed but not counted.
//! - [`ScoreMode::Full`]: every sequence (prompt + completion) is a row of a right-padded batch
//!   run by [`CausalLm::forward`] with its attention mask; rows are sorted by length and cut
//!   into batches of at most `batch_tokens` padded tokens. This is what the usual Python
//!   scorers do (and each prompt is computed once per choice), except that only the positions a
//!   counted token is predicted from are projected onto the vocabulary
//!   ([`CausalLm::project`] on those rows of the final hidden states).
//! - [`ScoreMode::Auto`] (the default): per group, the prefix cache where it cuts the tokens
//!   run by at least a factor 1.5 (`3 (P + C W) <= 2 C (P + W)` for a prompt of P tokens and C
//!   continuations of at most W), full batches for the rest. The factor is measured
//!   (docs/perf.md, "Evaluation"): a group through the cache runs as small forwards of its own,
//!   which process tokens at a lower rate than full mode's large mixed batches. Factor 3 was
//!   slower than 2 on the six-shot QA primer; after jobs moved onto candle's rayon pool, 1.5
//!   beat 2 there (12.2 against 11.4 items/s, medians of 6 interleaved runs) and lost 2.5% on
//!   plain prompts (41.0 against 42.1).

use candle_core::{DType, Device, Tensor};
use reprpo_data::tokenize::{Batch, Group, Layout, Seq, collate};
use reprpo_models::logps::{CountedRows, row_logps, token_logps};
use reprpo_models::{CausalLm, ForwardSpec, KvCache};
use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};

/// How log-probabilities are computed (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum ScoreMode {
    /// The prompt once, its KV cache reused for every completion.
    PrefixCache,
    /// Padded batches of full sequences.
    Full,
    /// Per group, the prompt cache where it cuts the tokens run by 1.5x or more, else full batches
    /// (the rule in the module docs).
    #[default]
    Auto,
}

/// A completion's summed log-probability and its number of counted tokens.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SeqLogp {
    /// `sum_t log p(y_t | ...)` over the completion tokens.
    pub sum: f64,
    /// Completion tokens counted.
    pub tokens: usize,
}

/// Settings of the scorer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ScoreOptions {
    /// Prefix cache or full batches.
    pub mode: ScoreMode,
    /// [`ScoreMode::Full`]: at most this many padded tokens (rows x columns) per forward.
    pub batch_tokens: usize,
    /// The pad id used in [`ScoreMode::Full`] batches (masked out; any valid id).
    pub pad: u32,
}

impl Default for ScoreOptions {
    fn default() -> Self {
        ScoreOptions {
            mode: ScoreMode::Auto,
            batch_tokens: 4096,
            pad: 0,
        }
    }
}

/// Log-probabilities of every completion of every group: `out[g][k]` for `groups[g].seqs[k]`.
/// `progress(n)` is called after each group (prefix mode) or batch (full mode) with the number
/// of groups newly finished.
pub fn score_groups<M: CausalLm + ?Sized>(
    model: &M,
    groups: &[&Group],
    opts: &ScoreOptions,
    progress: &mut dyn FnMut(usize),
) -> Result<Vec<Vec<SeqLogp>>> {
    match opts.mode {
        ScoreMode::Full => {
            let out = score_full(model, groups, opts)?;
            progress(groups.len());
            Ok(out)
        }
        ScoreMode::PrefixCache => {
            let mut out = Vec::with_capacity(groups.len());
            for g in groups {
                out.push(score_prefix(model, g, opts)?);
                progress(1);
            }
            Ok(out)
        }
        ScoreMode::Auto => {
            let (cached, batched): (Vec<usize>, Vec<usize>) =
                (0..groups.len()).partition(|&i| prefix_pays(groups[i]));
            let mut out: Vec<Vec<SeqLogp>> = vec![Vec::new(); groups.len()];
            let full_groups: Vec<&Group> = batched.iter().map(|&i| groups[i]).collect();
            for (&i, lps) in batched.iter().zip(score_full(model, &full_groups, opts)?) {
                out[i] = lps;
            }
            progress(batched.len());
            for i in cached {
                out[i] = score_prefix(model, groups[i], opts)?;
                progress(1);
            }
            Ok(out)
        }
    }
}

/// [`ScoreMode::Auto`]'s rule: the prompt cache cuts the tokens run by at least a factor 1.5,
/// `3 (P + C W) <= 2 C (P + W)`, with W the longest continuation after the shared prompt.
fn prefix_pays(g: &Group) -> bool {
    let p = g.prompt.len();
    let c = g.seqs.len();
    let longest = g.seqs.iter().map(Seq::len).max().unwrap_or(0);
    let tail = longest.saturating_sub(p);
    p > 0 && c > 1 && 3 * (p + c * tail) <= 2 * c * longest
}

/// One group through the prompt's KV cache.
fn score_prefix<M: CausalLm + ?Sized>(
    model: &M,
    g: &Group,
    opts: &ScoreOptions,
) -> Result<Vec<SeqLogp>> {
    let dev = model.device();
    let p = g.prompt.len();
    let longest = g.seqs.iter().map(Seq::len).max().unwrap_or(0);
    let shared_ok = p > 0
        && g.seqs
            .iter()
            .all(|s| s.prompt.len() >= p && s.prompt[..p] == g.prompt[..])
        && !model.cache_needs_refill(&KvCache::default(), longest);
    if !shared_ok {
        // No usable shared prompt (or a model whose cache cannot be extended): full sequences.
        return Ok(score_full(model, &[g], opts)?
            .into_iter()
            .next()
            .unwrap_or_default());
    }
    let mut cache = KvCache::default();
    let ids = Tensor::new(g.prompt.as_slice(), dev)?.unsqueeze(0)?;
    // Logits of the prompt's last position: they predict each continuation's first token.
    let first = model.forward_cached(&ids, &mut cache)?;
    let tails: Vec<Vec<u32>> = g
        .seqs
        .iter()
        .map(|s| s.prompt[p..].iter().chain(&s.completion).copied().collect())
        .collect();
    let width = tails.iter().map(Vec::len).max().unwrap_or(0);
    let c = tails.len();
    if width == 0 {
        return Ok(g
            .seqs
            .iter()
            .map(|s| SeqLogp {
                sum: 0.0,
                tokens: s.completion.len(),
            })
            .collect());
    }
    // Every continuation as a row of one right-padded batch on the shared prompt cache. Column
    // 0 of `all_ids` stands for the prompt's last position (never counted), so that logits
    // [first, out] and ids [_, tail] line up as `token_logps` expects (logits t-1 predict id t).
    let mut tail_ids = vec![opts.pad; c * width];
    let mut tail_mask = vec![0u8; c * width];
    let mut all_ids = vec![opts.pad; c * (width + 1)];
    let mut count = vec![0u8; c * (width + 1)];
    for (r, (t, s)) in tails.iter().zip(&g.seqs).enumerate() {
        let skip = s.prompt.len() - p;
        for (j, &tok) in t.iter().enumerate() {
            tail_ids[r * width + j] = tok;
            tail_mask[r * width + j] = 1;
            all_ids[r * (width + 1) + 1 + j] = tok;
            count[r * (width + 1) + 1 + j] = u8::from(j >= skip);
        }
    }
    let tail_ids = Tensor::from_vec(tail_ids, (c, width), dev)?;
    let tail_mask = Tensor::from_vec(tail_mask, (c, width), dev)?;
    let out = model.forward_after(&tail_ids, Some(&tail_mask), &cache)?;
    let vocab = out.dim(2)?;
    let first = first
        .to_dtype(out.dtype())?
        .reshape((1, 1, vocab))?
        .broadcast_as((c, 1, vocab))?;
    let logits = Tensor::cat(&[&first, &out], 1)?;
    let all_ids = Tensor::from_vec(all_ids, (c, width + 1), dev)?;
    let count = Tensor::from_vec(count, (c, width + 1), dev)?;
    let sums = token_logps(&logits, &all_ids, &count)?
        .sum
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?;
    Ok(sums
        .into_iter()
        .zip(&g.seqs)
        .map(|(sum, s)| SeqLogp {
            sum,
            tokens: s.completion.len(),
        })
        .collect())
}

/// Every sequence of `groups` as rows of right-padded batches.
fn score_full<M: CausalLm + ?Sized>(
    model: &M,
    groups: &[&Group],
    opts: &ScoreOptions,
) -> Result<Vec<Vec<SeqLogp>>> {
    let dev = model.device();
    let mut rows: Vec<(usize, usize, &Seq)> = groups
        .iter()
        .enumerate()
        .flat_map(|(gi, g)| g.seqs.iter().enumerate().map(move |(k, s)| (gi, k, s)))
        .collect();
    rows.sort_by_key(|(_, _, s)| std::cmp::Reverse(s.len()));
    let mut out: Vec<Vec<SeqLogp>> = groups
        .iter()
        .map(|g| {
            vec![
                SeqLogp {
                    sum: 0.0,
                    tokens: 0
                };
                g.seqs.len()
            ]
        })
        .collect();
    let mut at = 0;
    while at < rows.len() {
        // Rows are sorted longest first, so the first row of a batch sets its width.
        let width = rows[at].2.len().max(1);
        let n = (opts.batch_tokens / width).max(1).min(rows.len() - at);
        let chunk = &rows[at..at + n];
        let seqs: Vec<&Seq> = chunk.iter().map(|(_, _, s)| *s).collect();
        let sums = run_batch(model, &seqs, opts.pad, dev)?;
        for ((gi, k, s), sum) in chunk.iter().zip(sums) {
            out[*gi][*k] = SeqLogp {
                sum,
                tokens: s.completion.len(),
            };
        }
        at += n;
    }
    Ok(out)
}

/// Summed completion log-probabilities of one right-padded batch.
fn run_batch<M: CausalLm + ?Sized>(
    model: &M,
    seqs: &[&Seq],
    pad: u32,
    dev: &Device,
) -> Result<Vec<f64>> {
    let b = collate(seqs, pad, Layout::Right);
    if b.seq_len < 2 {
        return Ok(vec![0.0; b.rows]);
    }
    let (rows, t) = (b.rows, b.seq_len);
    let shape = (rows, t);
    let ids = Tensor::from_vec(b.input_ids.clone(), shape, dev)?;
    let mask = Tensor::from_vec(b.attention_mask.clone(), shape, dev)?;
    let last = model.num_layers();
    let spec = ForwardSpec {
        hidden_layers: vec![last as isize],
        ..Default::default()
    };
    let out = model.forward(&ids, Some(&mask), None, &spec)?;
    let normed = out
        .hidden
        .into_iter()
        .find(|(i, _)| *i == last)
        .map(|(_, h)| h)
        .ok_or_else(|| EvalError::Invalid("the forward returned no final hidden state".into()))?;
    completion_sums(model, &normed, &b)
}

/// Each row's summed completion log-probability from the final hidden states `normed`
/// (`[rows, T, hidden]`, hidden state `L`) of the batch `b`. Only the positions whose logits are
/// needed (`t - 1` for every counted token `t`) are projected onto the vocabulary (the prompt's
/// other positions and the padding never are), which is most of the vocabulary projection's
/// work saved on short answers after longer prompts.
pub(crate) fn completion_sums<M: CausalLm + ?Sized>(
    model: &M,
    normed: &Tensor,
    b: &Batch,
) -> Result<Vec<f64>> {
    let (rows, t) = (b.rows, b.seq_len);
    let counted = CountedRows::new(&b.input_ids, rows, t, |i| b.loss_mask[i] > 0);
    let mut sums = vec![0.0; rows];
    if counted.pick.is_empty() {
        return Ok(sums);
    }
    let hdim = normed.dim(2)?;
    let n = counted.pick.len();
    let sel = normed
        .reshape((rows * t, hdim))?
        .index_select(&Tensor::from_slice(&counted.pick, n, model.device())?, 0)?;
    let logits = model.project(&sel)?;
    for (lp, &r) in row_logps(&logits, &counted.targets)?
        .into_iter()
        .zip(&counted.owner)
    {
        sums[r] += lp;
    }
    Ok(sums)
}
