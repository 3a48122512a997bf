//! The `open-pref-eval` scoring of a suite: preference pairs tokenised and scored as
//! open_pref_eval @ 0c7f3a3 does, the evaluation of the reference ReprPO project
//! (`reprpo/training.py` at bd9ae63 calls its `evaluate_model` with its defaults).
//!
//! # Tokenisation ([`tokenize_pairs`])
//! For a pair `(p, y_w, y_l)` and limits `max_prompt_length` (512) and `max_length` (1024):
//! 1. `P = enc(p)` without special tokens (no BOS, no chat template), **left**-truncated: its last
//!    `max_prompt_length` tokens;
//! 2. each completion encoded **on its own** (never `enc(p + y)`), without special tokens,
//!    **right**-truncated to its first `max_length - |P|` tokens;
//! 3. open_pref_eval then appends EOS to each completion and right-pads; the EOS is never counted
//!    (step 4), and a causal model's log-probabilities of the tokens before it do not depend on it,
//!    so it is left out here.
//!
//! # Score
//! 4. `s = (1/n) sum_t log p(y_t | P, y_<t)` over the completion's `n` tokens **without** the
//!    appended EOS. open_pref_eval's `score_ipo` (`score_log_prob_mean`) means the completion
//!    tokens, but at 0c7f3a3 `concatenated_forward` returns the completion mask rolled one position
//!    against the per-token log-probabilities, so the EOS position is masked out and the count is
//!    `n`. (A later commit, c5aaa23, changed these masks.)
//! 5. `prob = sigmoid(s_w - s_l)`, `correct = prob > 0.5`: [`crate::score::pref_score`] on the
//!    summed log-probabilities and the counts above.
//!
//! Checked against open_pref_eval's own code on a tiny Llama
//! (`tests/reference/gen_open_pref_eval_fixtures.py`, `tests/all/open_pref_eval.rs`).
//!
//! # Differences that remain
//! - open_pref_eval left-pads the prompts of a batch and transformers numbers positions from 0
//!   across the pads; here every sequence starts at position 0. With RoPE only relative positions
//!   enter attention, so the two differ by rounding.
//! - A completion that encodes to no token scores 0 in open_pref_eval (its mask sum is clamped);
//!   here it is an error naming the row (the GENIES and ETHICS data have none).

use reprpo_data::tokenize::{Group, Seq};
use reprpo_data::{PreferencePair, Tok};
use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};

/// The limits of open_pref_eval's tokenisation (`eval_dataset`'s keyword arguments).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenPrefEval {
    /// The prompt keeps its last this many tokens (`max_prompt_length`, 512).
    pub max_prompt_length: usize,
    /// A completion keeps its first `max_length - prompt tokens` tokens (`max_length`, 1024).
    pub max_length: usize,
}

impl Default for OpenPrefEval {
    fn default() -> Self {
        OpenPrefEval {
            max_prompt_length: 512,
            max_length: 1024,
        }
    }
}

impl OpenPrefEval {
    /// The rule in words, for the table's truncation note.
    pub fn rule(&self) -> String {
        format!(
            "open_pref_eval 0c7f3a3: the prompt keeps its last {} tokens, each completion its \
             first {} - prompt tokens (no BOS, no chat template)",
            self.max_prompt_length, self.max_length
        )
    }

    /// open_pref_eval asserts `max_length > max_prompt_length`; both must be positive.
    pub fn validate(&self) -> Result<()> {
        if self.max_prompt_length == 0 || self.max_length <= self.max_prompt_length {
            return Err(EvalError::Invalid(format!(
                "open-pref-eval scoring needs 0 < max_prompt_length < max_length, got {} and {}",
                self.max_prompt_length, self.max_length
            )));
        }
        Ok(())
    }
}

/// Tokenise pairs as open_pref_eval does (see the module docs): one [`Group`] per pair, its
/// sequences chosen then rejected, each with the (cut) prompt and the (cut) completion without
/// EOS; `truncated` when a cut removed a token.
pub fn tokenize_pairs(
    tok: &Tok,
    pairs: &[PreferencePair],
    cfg: &OpenPrefEval,
) -> Result<Vec<Group>> {
    cfg.validate()?;
    let texts: Vec<&str> = pairs
        .iter()
        .flat_map(|p| [p.prompt.as_str(), p.chosen.as_str(), p.rejected.as_str()])
        .collect();
    let ids: Vec<Vec<u32>> = tok
        .inner
        .encode_batch_fast(texts, false)
        .map_err(|e| reprpo_data::DataError::Tokenizer(e.to_string()))?
        .into_iter()
        .map(|e| e.get_ids().to_vec())
        .collect();
    Ok(ids
        .chunks_exact(3)
        .map(|c| {
            let (mut prompt, mut truncated) = (c[0].clone(), false);
            if prompt.len() > cfg.max_prompt_length {
                prompt.drain(..prompt.len() - cfg.max_prompt_length);
                truncated = true;
            }
            let room = cfg.max_length - prompt.len();
            let seqs = c[1..]
                .iter()
                .map(|comp| {
                    truncated |= comp.len() > room;
                    Seq {
                        prompt: prompt.clone(),
                        completion: comp[..comp.len().min(room)].to_vec(),
                    }
                })
                .collect();
            Group {
                prompt,
                seqs,
                truncated,
            }
        })
        .collect())
}
