//! Tokenisation of preference pairs, multiple-choice items and SFT text into padded batches, with
//! the semantics of TRL's DPO trainer in two named modes.
//!
//! # `classic` (TRL 0.9, the semantics of the original ReprPO experiments; the default)
//! For a prompt `p` and completions `a_1..a_n` (n = 2 for a pair: chosen, rejected):
//! 1. `enc(p)` and `enc(p + a_i)` without special tokens. The completion of `a_i` starts at
//!    `len(enc(p))`, or one token earlier when the last prompt token merged with the completion
//!    (`enc(p)` is not a prefix of `enc(p + a_i)`); each sequence keeps its own prompt tokens
//!    (`enc(p + a_i)` up to that point), and the shared prompt is cut to the shortest of them.
//!    The prompts of two completions may differ in their last token only (else an error).
//! 2. BOS is prepended to each prompt unless it is already the first token; EOS is appended to each
//!    completion unless it is already the last token.
//! 3. With `longest` = the longest completion (after EOS): a prompt with
//!    `len(prompt) + longest > max_length` is cut to `max_prompt_length` tokens, keeping its end
//!    (`keep_end`, default) or its start (`keep_start`); then a sequence still over
//!    `max_length` has its completion cut to its first `max_length - max_prompt_length` tokens.
//!
//! # `trl-current` (TRL 1.x)
//! 1. EOS text is appended to each completion unless it already ends with it (plain text only).
//! 2. `enc(p)`, `enc(p + a_i)` with the tokenizer's special tokens (BOS); the completion starts
//!    where `enc(p)` and the `enc(p + a_i)` first diverge (common prefix, minimum over the
//!    completions); the shared prompt is `enc(p)` up to there.
//! 3. Each sequence `prompt + completion` is cut to `max_length` keeping its start (`keep_start`,
//!    the default there) or its end (`keep_end`). With `keep_start`, a prompt of `max_length`
//!    tokens or more leaves no completion: TRL drops such examples; here it is an error naming the
//!    row ([`DataError::TooLong`]) unless `drop_too_long` is set. `max_prompt_length` is not used.
//!
//! # Chat template
//! With `chat_template = true`, the prompt is rendered as one user message with the generation
//! prompt and each completion as the rest of the rendered conversation
//! ([`crate::chat::ChatTemplate::split_prompt_completion`]); the rendered text carries its own special tokens,
//! so classic mode adds BOS only if the template did not, and trl-current mode encodes without
//! special tokens and appends no EOS text (TRL's conversational path).
//!
//! # Batches
//! The rows of a pair batch are the B chosen sequences, then the B rejected ones (`[2B, T]`).
//! [`Layout::PromptLeft`] left-pads the prompts to the longest prompt and right-pads the
//! completions to the longest completion, so completion token `k` of every row sits in the same
//! column; [`Layout::Right`] puts each sequence at column 0 and right-pads it (TRL's model input).
//! `attention_mask` is 1 on real tokens; `loss_mask` is 1 on completion tokens only.

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::tokenizer::Tok;
use crate::types::{McItem, PreferencePair};

/// Which TRL version's tokenisation to reproduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum TokenizationMode {
    /// TRL 0.9 (`tokenize_row` + `build_tokenized_answer`), as in the original ReprPO experiments.
    #[default]
    Classic,
    /// TRL 1.x (common-prefix split, whole-sequence truncation).
    TrlCurrent,
}

/// Which end of a sequence truncation keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Truncation {
    /// Keep the last tokens.
    KeepEnd,
    /// Keep the first tokens.
    KeepStart,
}

/// How a batch is padded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// Prompts left-padded, completions right-padded: completion tokens aligned across rows.
    #[default]
    PromptLeft,
    /// Every sequence from column 0, right-padded.
    Right,
}

/// Tokenisation settings. Defaults: classic, `max_length` 512, `max_prompt_length` 256, keep_end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenizeConfig {
    /// Which TRL semantics.
    pub tokenization: TokenizationMode,
    /// Maximum tokens of prompt + completion (`None`: no limit).
    pub max_length: Option<usize>,
    /// Classic mode: prompt length after truncation (`None`: no prompt truncation).
    pub max_prompt_length: Option<usize>,
    /// Which end truncation keeps (classic: of the prompt; trl-current: of the whole sequence).
    pub truncation_mode: Truncation,
    /// Render prompts and completions through the tokenizer's chat template.
    pub chat_template: bool,
    /// trl-current with keep_start: drop pairs whose prompt fills `max_length` instead of failing.
    pub drop_too_long: bool,
    /// Append EOS to multiple-choice completions (pairs always get EOS).
    pub mc_eos: bool,
}

impl Default for TokenizeConfig {
    fn default() -> Self {
        TokenizeConfig {
            tokenization: TokenizationMode::Classic,
            max_length: Some(512),
            max_prompt_length: Some(256),
            truncation_mode: Truncation::KeepEnd,
            chat_template: false,
            drop_too_long: false,
            mc_eos: false,
        }
    }
}

impl TokenizeConfig {
    /// TRL 1.x defaults: trl-current, `max_length` 1024, keep_start.
    pub fn trl_current() -> Self {
        TokenizeConfig {
            tokenization: TokenizationMode::TrlCurrent,
            max_length: Some(1024),
            max_prompt_length: None,
            truncation_mode: Truncation::KeepStart,
            ..Default::default()
        }
    }

    /// Check the limits make sense together.
    pub fn validate(&self) -> Result<()> {
        if self.max_length == Some(0) {
            return Err(DataError::Invalid("max_length must be positive".into()));
        }
        if self.tokenization == TokenizationMode::Classic {
            if let (Some(l), Some(p)) = (self.max_length, self.max_prompt_length)
                && p >= l
            {
                return Err(DataError::Invalid(format!(
                    "max_prompt_length ({p}) must be smaller than max_length ({l})"
                )));
            }
            if self.max_length.is_some() && self.max_prompt_length.is_none() {
                return Err(DataError::Invalid(
                    "classic tokenization with max_length needs max_prompt_length".into(),
                ));
            }
        }
        Ok(())
    }
}

/// One tokenised sequence: its prompt tokens and its completion tokens.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Seq {
    /// Prompt tokens (loss-masked out).
    pub prompt: Vec<u32>,
    /// Completion tokens (trained on).
    pub completion: Vec<u32>,
}

impl Seq {
    /// Total length.
    pub fn len(&self) -> usize {
        self.prompt.len() + self.completion.len()
    }

    /// Whether the sequence has no token.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A prompt with several tokenised completions (2 for a pair: chosen then rejected).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Group {
    /// The shared prompt (for generation): the shortest of the sequences' prompts.
    pub prompt: Vec<u32>,
    /// One sequence per completion, in input order.
    pub seqs: Vec<Seq>,
    /// Whether any truncation changed a sequence.
    pub truncated: bool,
}

/// Where a tokenised item came from, for error messages.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    /// Dataset or file.
    pub dataset: &'a str,
    /// 1-based row.
    pub row: usize,
}

/// Texts to encode for one group, after the chat template and EOS rules.
struct Texts {
    prompt: String,
    fulls: Vec<String>,
}

fn prepare_texts(
    tok: &Tok,
    prompt: &str,
    completions: &[&str],
    cfg: &TokenizeConfig,
) -> Result<Texts> {
    if cfg.chat_template {
        let tmpl = tok.chat_template.as_ref().ok_or_else(|| {
            DataError::Template(
                "chat_template = true but the tokenizer has no chat template".into(),
            )
        })?;
        let mut p = String::new();
        let mut fulls = Vec::with_capacity(completions.len());
        for c in completions {
            let (pt, ct) = tmpl.split_prompt_completion(prompt, c)?;
            fulls.push(format!("{pt}{ct}"));
            p = pt;
        }
        return Ok(Texts { prompt: p, fulls });
    }
    let fulls = completions
        .iter()
        .map(|c| match cfg.tokenization {
            TokenizationMode::Classic => format!("{prompt}{c}"),
            TokenizationMode::TrlCurrent => {
                if c.ends_with(tok.eos_text.as_str()) {
                    format!("{prompt}{c}")
                } else {
                    format!("{prompt}{c}{}", tok.eos_text)
                }
            }
        })
        .collect();
    Ok(Texts {
        prompt: prompt.to_string(),
        fulls,
    })
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Classic (TRL 0.9) rules on already-encoded ids (no special tokens).
fn classic_group(
    tok: &Tok,
    prompt_ids: &[u32],
    full_ids: &[Vec<u32>],
    add_eos: bool,
    cfg: &TokenizeConfig,
) -> Result<Group> {
    let mut seqs: Vec<Seq> = full_ids
        .iter()
        .map(|full| {
            let mut start = prompt_ids.len().min(full.len());
            if full.get(..prompt_ids.len()) != Some(prompt_ids) {
                start = start.saturating_sub(1);
            }
            Seq {
                prompt: full[..start].to_vec(),
                completion: full[start..].to_vec(),
            }
        })
        .collect();
    let shared_len = seqs.iter().map(|s| s.prompt.len()).min().unwrap_or(0);
    let mut prompt = prompt_ids[..shared_len.min(prompt_ids.len())].to_vec();
    if let Some(first) = seqs.first() {
        for s in &seqs[1..] {
            let diff = first
                .prompt
                .iter()
                .zip(&s.prompt)
                .filter(|(a, b)| a != b)
                .count();
            if diff > 1 || first.prompt.len().abs_diff(s.prompt.len()) > 1 {
                return Err(DataError::Invalid(
                    "prompts of the completions differ by more than their last token".into(),
                ));
            }
        }
    }
    if let Some(bos) = tok.bos {
        for p in std::iter::once(&mut prompt).chain(seqs.iter_mut().map(|s| &mut s.prompt)) {
            if p.first() != Some(&bos) {
                p.insert(0, bos);
            }
        }
    }
    if add_eos {
        for s in &mut seqs {
            if s.completion.last() != Some(&tok.eos) {
                s.completion.push(tok.eos);
            }
        }
    }
    let mut truncated = false;
    if let (Some(max_len), Some(max_prompt)) = (cfg.max_length, cfg.max_prompt_length) {
        let longest = seqs.iter().map(|s| s.completion.len()).max().unwrap_or(0);
        let cut_prompt = |p: &mut Vec<u32>, truncated: &mut bool| {
            if p.len() + longest > max_len && p.len() > max_prompt {
                *truncated = true;
                match cfg.truncation_mode {
                    Truncation::KeepStart => p.truncate(max_prompt),
                    Truncation::KeepEnd => {
                        p.drain(..p.len() - max_prompt);
                    }
                }
            }
        };
        for s in &mut seqs {
            cut_prompt(&mut s.prompt, &mut truncated);
        }
        cut_prompt(&mut prompt, &mut truncated);
        for s in &mut seqs {
            if s.prompt.len() + longest > max_len {
                let keep = max_len - max_prompt;
                if s.completion.len() > keep {
                    truncated = true;
                    s.completion.truncate(keep);
                }
            }
        }
    }
    Ok(Group {
        prompt,
        seqs,
        truncated,
    })
}

/// trl-current (TRL 1.x) rules on already-encoded ids (with special tokens).
fn current_group(
    prompt_ids: &[u32],
    full_ids: &[Vec<u32>],
    cfg: &TokenizeConfig,
    origin: Origin<'_>,
) -> Result<Option<Group>> {
    let plen = full_ids
        .iter()
        .map(|f| common_prefix(prompt_ids, f))
        .min()
        .unwrap_or(prompt_ids.len());
    let prompt = prompt_ids[..plen].to_vec();
    let mut seqs: Vec<Seq> = full_ids
        .iter()
        .map(|f| Seq {
            prompt: prompt.clone(),
            completion: f[plen..].to_vec(),
        })
        .collect();
    let mut truncated = false;
    if let Some(max_len) = cfg.max_length {
        if cfg.truncation_mode == Truncation::KeepStart && prompt.len() >= max_len {
            if cfg.drop_too_long {
                return Ok(None);
            }
            return Err(DataError::TooLong {
                dataset: origin.dataset.to_string(),
                row: origin.row,
                tokens: prompt.len(),
                max_length: max_len,
            });
        }
        for s in &mut seqs {
            if s.len() > max_len {
                truncated = true;
                match cfg.truncation_mode {
                    Truncation::KeepStart => s.completion.truncate(max_len - s.prompt.len()),
                    Truncation::KeepEnd => {
                        let mut drop = s.len() - max_len;
                        let from_prompt = drop.min(s.prompt.len());
                        s.prompt.drain(..from_prompt);
                        drop -= from_prompt;
                        s.completion.drain(..drop);
                    }
                }
            }
        }
    }
    Ok(Some(Group {
        prompt,
        seqs,
        truncated,
    }))
}

/// Encode many texts at once (in parallel inside `tokenizers`).
fn encode_many(tok: &Tok, texts: Vec<String>, special: bool) -> Result<Vec<Vec<u32>>> {
    tok.inner
        .encode_batch_fast(texts, special)
        .map(|encs| encs.into_iter().map(|e| e.get_ids().to_vec()).collect())
        .map_err(|e| DataError::Tokenizer(e.to_string()))
}

/// Tokenise many groups (prompt + completions) at once. `None` marks a group dropped by
/// `drop_too_long`.
pub fn tokenize_groups(
    tok: &Tok,
    items: &[(Origin<'_>, &str, Vec<&str>)],
    add_eos: bool,
    cfg: &TokenizeConfig,
) -> Result<Vec<Option<Group>>> {
    cfg.validate()?;
    let mut texts = Vec::new();
    let mut shapes = Vec::with_capacity(items.len());
    for (_, prompt, completions) in items {
        let t = prepare_texts(tok, prompt, completions, cfg)?;
        shapes.push(t.fulls.len());
        texts.push(t.prompt);
        texts.extend(t.fulls);
    }
    let special = cfg.tokenization == TokenizationMode::TrlCurrent && !cfg.chat_template;
    let ids = encode_many(tok, texts, special)?;
    let mut out = Vec::with_capacity(items.len());
    let mut at = 0;
    for ((origin, _, _), n) in items.iter().zip(shapes) {
        let prompt_ids = &ids[at];
        let fulls = &ids[at + 1..at + 1 + n];
        at += 1 + n;
        out.push(match cfg.tokenization {
            TokenizationMode::Classic => Some(
                classic_group(tok, prompt_ids, fulls, add_eos, cfg).map_err(|e| match e {
                    DataError::Invalid(m) => {
                        DataError::field(origin.dataset, origin.row, "prompt", m)
                    }
                    other => other,
                })?,
            ),
            TokenizationMode::TrlCurrent => current_group(prompt_ids, fulls, cfg, *origin)?,
        });
    }
    Ok(out)
}

/// A tokenised preference pair: `seqs[0]` is chosen, `seqs[1]` rejected.
pub type TokenizedPair = Group;

/// Tokenised pairs and the ids of pairs dropped by `drop_too_long`.
#[derive(Debug, Clone, Default)]
pub struct TokenizedPairs {
    /// The kept pairs, in input order.
    pub pairs: Vec<TokenizedPair>,
    /// Ids of the dropped pairs.
    pub dropped: Vec<String>,
}

/// Tokenise preference pairs (chosen, rejected) with EOS appended to both.
pub fn tokenize_pairs(
    tok: &Tok,
    pairs: &[PreferencePair],
    cfg: &TokenizeConfig,
) -> Result<TokenizedPairs> {
    let items: Vec<_> = pairs
        .iter()
        .map(|p| {
            (
                Origin {
                    dataset: &p.source.dataset,
                    row: p.source.row,
                },
                p.prompt.as_str(),
                vec![p.chosen.as_str(), p.rejected.as_str()],
            )
        })
        .collect();
    let groups = tokenize_groups(tok, &items, true, cfg)?;
    let mut out = TokenizedPairs::default();
    for (g, p) in groups.into_iter().zip(pairs) {
        match g {
            Some(g) => out.pairs.push(g),
            None => out.dropped.push(p.id.clone()),
        }
    }
    Ok(out)
}

/// Tokenise multiple-choice items: one group per item, one sequence per choice (EOS only with
/// `cfg.mc_eos`).
pub fn tokenize_mc(
    tok: &Tok,
    items: &[McItem],
    cfg: &TokenizeConfig,
) -> Result<Vec<Option<Group>>> {
    let groups: Vec<_> = items
        .iter()
        .map(|it| {
            (
                Origin {
                    dataset: &it.source.dataset,
                    row: it.source.row,
                },
                it.prompt.as_str(),
                it.choices.iter().map(String::as_str).collect(),
            )
        })
        .collect();
    tokenize_groups(tok, &groups, cfg.mc_eos, cfg)
}

/// Tokenise plain SFT text: BOS (if any) as the only prompt token, the text and EOS as the
/// completion, cut to `max_length` keeping the start.
pub fn tokenize_sft(tok: &Tok, texts: &[&str], cfg: &TokenizeConfig) -> Result<Vec<Seq>> {
    let ids = encode_many(tok, texts.iter().map(|t| t.to_string()).collect(), false)?;
    Ok(ids
        .into_iter()
        .map(|mut completion| {
            completion.push(tok.eos);
            let prompt: Vec<u32> = tok.bos.into_iter().collect();
            if let Some(max) = cfg.max_length {
                completion.truncate(max.saturating_sub(prompt.len()).max(1));
            }
            Seq { prompt, completion }
        })
        .collect())
}

/// A padded batch of sequences, row-major `[rows, seq_len]`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Batch {
    /// Number of rows.
    pub rows: usize,
    /// Columns.
    pub seq_len: usize,
    /// Token ids, pad where the attention mask is 0.
    pub input_ids: Vec<u32>,
    /// 1 on real tokens.
    pub attention_mask: Vec<u8>,
    /// 1 on completion tokens.
    pub loss_mask: Vec<u8>,
    /// Prompt columns in [`Layout::PromptLeft`] (completions start there); 0 for [`Layout::Right`].
    pub prompt_cols: usize,
}

impl Batch {
    /// The ids of row `r`.
    pub fn row_ids(&self, r: usize) -> &[u32] {
        &self.input_ids[r * self.seq_len..(r + 1) * self.seq_len]
    }
}

/// Pad sequences into one batch.
pub fn collate(seqs: &[&Seq], pad: u32, layout: Layout) -> Batch {
    let rows = seqs.len();
    let (prompt_cols, seq_len) = match layout {
        Layout::PromptLeft => {
            let p = seqs.iter().map(|s| s.prompt.len()).max().unwrap_or(0);
            let c = seqs.iter().map(|s| s.completion.len()).max().unwrap_or(0);
            (p, p + c)
        }
        Layout::Right => (0, seqs.iter().map(|s| s.len()).max().unwrap_or(0)),
    };
    let mut input_ids = vec![pad; rows * seq_len];
    let mut attention_mask = vec![0u8; rows * seq_len];
    let mut loss_mask = vec![0u8; rows * seq_len];
    for (r, s) in seqs.iter().enumerate() {
        let base = r * seq_len;
        let start = match layout {
            Layout::PromptLeft => prompt_cols - s.prompt.len(),
            Layout::Right => 0,
        };
        let p_end = start + s.prompt.len();
        let end = p_end + s.completion.len();
        input_ids[base + start..base + p_end].copy_from_slice(&s.prompt);
        input_ids[base + p_end..base + end].copy_from_slice(&s.completion);
        attention_mask[base + start..base + end].fill(1);
        loss_mask[base + p_end..base + end].fill(1);
    }
    Batch {
        rows,
        seq_len,
        input_ids,
        attention_mask,
        loss_mask,
        prompt_cols,
    }
}

/// Collate pairs: rows `0..B` are the chosen sequences, rows `B..2B` the rejected ones.
pub fn collate_pairs(pairs: &[&TokenizedPair], pad: u32, layout: Layout) -> Result<Batch> {
    let mut seqs = Vec::with_capacity(2 * pairs.len());
    for k in 0..2 {
        for p in pairs {
            seqs.push(p.seqs.get(k).ok_or_else(|| {
                DataError::Invalid("a tokenized pair must have two sequences".into())
            })?);
        }
    }
    if seqs.is_empty() {
        return Err(DataError::Invalid("cannot collate an empty batch".into()));
    }
    Ok(collate(&seqs, pad, layout))
}

/// Collate multiple-choice groups: every choice of every item is a row, item by item; returns the
/// batch and, per row, `(item index, choice index)`.
pub fn collate_mc(groups: &[&Group], pad: u32, layout: Layout) -> (Batch, Vec<(usize, usize)>) {
    let mut seqs = Vec::new();
    let mut index = Vec::new();
    for (i, g) in groups.iter().enumerate() {
        for (c, s) in g.seqs.iter().enumerate() {
            seqs.push(s);
            index.push((i, c));
        }
    }
    (collate(&seqs, pad, layout), index)
}
