//! Converter `hh-rlhf`: Anthropic HH-RLHF full transcripts split into prompt and completions.

use super::{ConvertOptions, Converted, id_and_meta};
use crate::error::Result;
use crate::read::Table;
use crate::types::PreferencePair;

/// The marker that opens the assistant's turn; the prompt ends right after the last one shared.
pub(crate) const ASSISTANT: &str = "\n\nAssistant:";

/// Converter `hh-rlhf`: Anthropic/hh-rlhf rows.
///
/// Source schema, one row per pair: `{chosen: string, rejected: string}`, each a full transcript
/// `"\n\nHuman: ...\n\nAssistant: ...[\n\nHuman: ...\n\nAssistant: ...]"`.
///
/// Mapping (TRL's `extract_prompt` logic for HH): take the longest common prefix of `chosen` and
/// `rejected` and cut it back to end right after the last `"\n\nAssistant:"` inside it; that is
/// the prompt. `chosen` / `rejected` are the rest of each transcript, so they start with the
/// space after `"Assistant:"`. Id `<dataset>/<row>`, no scores, no MC items.
///
/// Errors: either transcript empty, or no `"\n\nAssistant:"` in the shared prefix (the error
/// names `chosen`). A row whose chosen or rejected *completion* is empty or only white space
/// (the real test split has 4 rows where the preferred answer is the empty reply
/// `"\n\nAssistant: "`) gives no pair and counts in `skipped`, since a pair needs two non-empty
/// completions while the row itself is well-formed.
pub fn hh_rlhf(table: &Table, opts: &ConvertOptions) -> Result<Converted> {
    let mut out = Converted::default();
    for r in table.rows() {
        let chosen = r.text("chosen")?;
        let rejected = r.text("rejected")?;
        let Some(cut) = prompt_end(chosen, rejected) else {
            return Err(r.err(
                "chosen",
                "no \"\\n\\nAssistant:\" in the prefix it shares with `rejected`",
            ));
        };
        // `cut` ends right after an ASCII marker both strings share, so it is a char boundary
        // of both.
        let (prompt, chosen_rest) = chosen.split_at(cut);
        let rejected_rest = &rejected[cut..];
        if chosen_rest.trim().is_empty() || rejected_rest.trim().is_empty() {
            out.skipped += 1;
            continue;
        }
        let (id, source) = id_and_meta(opts, r.row());
        out.pairs.push(PreferencePair {
            id,
            prompt: prompt.to_string(),
            chosen: chosen_rest.to_string(),
            rejected: rejected_rest.to_string(),
            source,
        });
    }
    Ok(out)
}

/// Byte offset right after the last [`ASSISTANT`] within the longest common prefix of `a` and
/// `b`, or `None` when the shared prefix holds no such marker.
pub(crate) fn prompt_end(a: &str, b: &str) -> Option<usize> {
    let common = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
    let marker = ASSISTANT.as_bytes();
    a.as_bytes()[..common]
        .windows(marker.len())
        .rposition(|w| w == marker)
        .map(|start| start + marker.len())
}
