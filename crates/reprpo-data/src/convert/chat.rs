//! Converter `chat`: TRL's conversational preference rows (lists of `{role, content}` messages),
//! with an explicit `prompt` or the implicit one TRL extracts.

use serde_json::Value;

use super::{ConvertOptions, Converted, id_and_meta};
use crate::error::Result;
use crate::read::{RowRef, Table, kind};
use crate::types::PreferencePair;

/// One `{role, content}` message of `field[i]`.
fn message<'a>(r: &RowRef<'a>, field: &str, i: usize, v: &'a Value) -> Result<(&'a str, &'a str)> {
    let at = format!("{field}[{i}]");
    let obj = v.as_object().ok_or_else(|| {
        r.err(
            &at,
            format!("expected a {{role, content}} object, got {}", kind(v)),
        )
    })?;
    let get = |k: &str| {
        obj.get(k)
            .and_then(Value::as_str)
            .ok_or_else(|| r.err(&format!("{at}.{k}"), "missing or not a string"))
    };
    Ok((get("role")?, get("content")?))
}

/// The messages of the list `field`.
fn messages<'a>(r: &RowRef<'a>, field: &str) -> Result<Vec<(&'a str, &'a str)>> {
    r.array(field)?
        .iter()
        .enumerate()
        .map(|(i, v)| message(r, field, i, v))
        .collect()
}

/// The single assistant reply of a completion list.
fn reply<'a>(r: &RowRef<'a>, field: &str, msgs: &[(&'a str, &'a str)]) -> Result<&'a str> {
    match msgs {
        [("assistant", content)] => Ok(content),
        _ => Err(r.err(
            field,
            format!(
                "the completion must be one assistant message, got roles {:?}",
                msgs.iter().map(|m| m.0).collect::<Vec<_>>()
            ),
        )),
    }
}

/// Converter `chat`: TRL's conversational preference format.
///
/// Source schema, one row per pair: `{prompt?: [message], chosen: [message], rejected:
/// [message]}` with `message = {role: string, content: string}`. Without `prompt` (TRL's
/// "implicit prompt"), the prompt is the longest run of leading messages `chosen` and `rejected`
/// share, as TRL's `extract_prompt` takes it, and the rest of each list is its completion.
///
/// Mapping: the prompt must be one `user` message and each completion one `assistant` message
/// (the pair type holds one user turn: a system message or several turns are an error naming the
/// row and field, not silently flattened); `prompt`, `chosen`, `rejected` become their contents.
/// Rendered as TRL renders them with `data.chat_template = true`, which applies the tokenizer's
/// template to the user turn. Id `<dataset>/<row>`, no scores, no MC items.
pub fn chat(table: &Table, opts: &ConvertOptions) -> Result<Converted> {
    let mut out = Converted::default();
    for r in table.rows() {
        let mut chosen = messages(&r, "chosen")?;
        let mut rejected = messages(&r, "rejected")?;
        let prompt = match r.record.fields.get("prompt") {
            Some(Value::Null) | None => {
                let shared = chosen
                    .iter()
                    .zip(&rejected)
                    .take_while(|(a, b)| a == b)
                    .count();
                rejected.drain(..shared);
                chosen.drain(..shared).collect()
            }
            Some(_) => messages(&r, "prompt")?,
        };
        let user = match prompt.as_slice() {
            [("user", content)] if !content.trim().is_empty() => *content,
            _ => {
                return Err(r.err(
                    "prompt",
                    format!(
                        "the prompt must be one non-empty user message, got roles {:?} (system \
                         messages and several turns are not supported)",
                        prompt.iter().map(|m| m.0).collect::<Vec<_>>()
                    ),
                ));
            }
        };
        let (c, j) = (
            reply(&r, "chosen", &chosen)?,
            reply(&r, "rejected", &rejected)?,
        );
        if c.trim().is_empty() || j.trim().is_empty() {
            out.skipped += 1;
            continue;
        }
        let (id, source) = id_and_meta(opts, r.row());
        out.pairs.push(PreferencePair {
            id,
            prompt: user.to_string(),
            chosen: c.to_string(),
            rejected: j.to_string(),
            source,
        });
    }
    Ok(out)
}
