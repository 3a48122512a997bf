//! Tokenizers: loading a Hugging Face `tokenizer.json` (+ `tokenizer_config.json` for the special
//! tokens and the chat template) and building the byte-level tokenizer of the embedded default model.

use std::path::Path;

use serde_json::Value;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

use crate::chat::ChatTemplate;
use crate::error::{DataError, Result};

/// A tokenizer with the special tokens preference tokenisation needs.
#[derive(Clone)]
pub struct Tok {
    /// The Hugging Face tokenizer.
    pub inner: Tokenizer,
    /// Beginning-of-sequence token id, if the tokenizer has one.
    pub bos: Option<u32>,
    /// End-of-sequence token id.
    pub eos: u32,
    /// End-of-sequence token text (TRL appends it as text in its current mode).
    pub eos_text: String,
    /// Beginning-of-sequence token text (chat templates render it as text).
    pub bos_text: Option<String>,
    /// Padding id: the pad token if there is one, else EOS (as TRL does).
    pub pad: u32,
    /// The chat template from `tokenizer_config.json`, if any.
    pub chat_template: Option<ChatTemplate>,
}

impl std::fmt::Debug for Tok {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tok")
            .field("vocab", &self.inner.get_vocab_size(true))
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("pad", &self.pad)
            .field("chat_template", &self.chat_template.is_some())
            .finish()
    }
}

fn tok_err(file: &Path, e: impl std::fmt::Display) -> DataError {
    DataError::Tokenizer(format!("{}: {e}", file.display()))
}

/// A special-token entry of `tokenizer_config.json`: a string or an `AddedToken` object.
fn special(config: &Value, key: &str) -> Option<String> {
    match config.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(m) => m.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

impl Tok {
    /// Load `dir/tokenizer.json` and, when present, `dir/tokenizer_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let cfg = dir.join("tokenizer_config.json");
        Self::from_files(
            &dir.join("tokenizer.json"),
            cfg.exists().then_some(cfg.as_path()),
        )
    }

    /// Load a `tokenizer.json` and an optional `tokenizer_config.json`.
    ///
    /// Special tokens come from the config (`bos_token`, `eos_token`, `pad_token`); without a
    /// config, the usual names (`<s>`, `</s>`, `<|endoftext|>`, `<|begin_of_text|>`, ...) are
    /// looked up in the vocabulary.
    pub fn from_files(tokenizer_json: &Path, config: Option<&Path>) -> Result<Self> {
        let inner = Tokenizer::from_file(tokenizer_json).map_err(|e| tok_err(tokenizer_json, e))?;
        let cfg: Value = match config {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| DataError::Io {
                    file: p.to_path_buf(),
                    source,
                })?;
                serde_json::from_str(&text).map_err(|e| DataError::Malformed {
                    file: p.to_path_buf(),
                    row: 0,
                    format: "JSON",
                    message: e.to_string(),
                })?
            }
            None => Value::Null,
        };
        let cfg_path = config.unwrap_or(tokenizer_json);
        let find = |key: &str, fallbacks: &[&str]| -> Option<String> {
            special(&cfg, key).or_else(|| {
                fallbacks
                    .iter()
                    .find(|t| inner.token_to_id(t).is_some())
                    .map(|t| t.to_string())
            })
        };
        let id_of = |key: &str, text: &str| -> Result<u32> {
            inner.token_to_id(text).ok_or_else(|| DataError::Config {
                file: cfg_path.to_path_buf(),
                key: key.into(),
                problem: format!("token {text:?} is not in the vocabulary"),
            })
        };
        let bos_text = find("bos_token", &["<s>", "<|begin_of_text|>", "<bos>"]);
        let eos_text = find(
            "eos_token",
            &["</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>"],
        )
        .ok_or_else(|| DataError::Config {
            file: cfg_path.to_path_buf(),
            key: "eos_token".into(),
            problem: "no end-of-sequence token configured or found".into(),
        })?;
        let bos = bos_text
            .as_deref()
            .map(|t| id_of("bos_token", t))
            .transpose()?;
        let eos = id_of("eos_token", &eos_text)?;
        let pad = match special(&cfg, "pad_token") {
            Some(t) => id_of("pad_token", &t)?,
            None => eos,
        };
        let chat_template = match cfg.get("chat_template") {
            Some(Value::String(src)) => Some(ChatTemplate::new(
                src.clone(),
                bos_text.clone().unwrap_or_default(),
                eos_text.clone(),
            )?),
            Some(Value::Null) | None => None,
            Some(_) => {
                return Err(DataError::Config {
                    file: cfg_path.to_path_buf(),
                    key: "chat_template".into(),
                    problem: "only a single template string is supported".into(),
                });
            }
        };
        Ok(Tok {
            inner,
            bos,
            eos,
            eos_text,
            bos_text,
            pad,
            chat_template,
        })
    }

    /// The byte-level tokenizer of the embedded default model, built in code: ids 0, 1, 2 are
    /// `<pad>`, `<s>`, `</s>`; ids 3..=258 are the 256 bytes (GPT-2 byte-to-unicode alphabet, no
    /// merges), so every byte of text is one token and any text round-trips. With special tokens,
    /// `<s>` is prepended.
    pub fn byte_level() -> Result<Self> {
        let chars = byte_chars();
        let vocab: [(String, u32); 259] = std::array::from_fn(|i| {
            let token = match i {
                0 => "<pad>".to_string(),
                1 => "<s>".to_string(),
                2 => "</s>".to_string(),
                _ => chars[i - 3].to_string(),
            };
            (token, i as u32)
        });
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, vec![])
            .build()
            .map_err(|e| DataError::Tokenizer(format!("byte-level BPE: {e}")))?;
        let mut inner = Tokenizer::new(bpe);
        let byte_level = ByteLevel::new(false, false, false);
        inner.with_pre_tokenizer(Some(byte_level));
        inner.with_decoder(Some(byte_level));
        inner
            .add_special_tokens(vec![
                AddedToken::from("<pad>", true),
                AddedToken::from("<s>", true),
                AddedToken::from("</s>", true),
            ])
            .map_err(|e| DataError::Tokenizer(format!("byte-level special tokens: {e}")))?;
        let post = TemplateProcessing::builder()
            .try_single("<s> $A")
            .and_then(|b| b.try_pair("<s> $A $B"))
            .map_err(|e| DataError::Tokenizer(format!("byte-level template: {e}")))?
            .special_tokens(vec![("<s>", 1)])
            .build()
            .map_err(|e| DataError::Tokenizer(format!("byte-level template: {e}")))?;
        inner.with_post_processor(Some(post));
        Ok(Tok {
            inner,
            bos: Some(1),
            eos: 2,
            eos_text: "</s>".into(),
            bos_text: Some("<s>".into()),
            pad: 0,
            chat_template: None,
        })
    }

    /// Token ids of `text`, with or without the post-processor's special tokens.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        self.inner
            .encode_fast(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| DataError::Tokenizer(e.to_string()))
    }

    /// Decode ids to text, skipping special tokens when asked.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| DataError::Tokenizer(e.to_string()))
    }

    /// Write `tokenizer.json` and a matching `tokenizer_config.json` into `dir`.
    pub fn save_dir(&self, dir: &Path) -> Result<()> {
        let write_err = |file: &Path, e: String| DataError::Write {
            file: file.to_path_buf(),
            source: std::io::Error::other(e),
        };
        let tj = dir.join("tokenizer.json");
        self.inner
            .save(&tj, true)
            .map_err(|e| write_err(&tj, e.to_string()))?;
        let pad_text = self
            .inner
            .id_to_token(self.pad)
            .unwrap_or_else(|| self.eos_text.clone());
        let cfg = serde_json::json!({
            "bos_token": self.bos_text,
            "eos_token": self.eos_text,
            "pad_token": pad_text,
            "add_bos_token": self.bos.is_some(),
            "add_eos_token": false,
            "tokenizer_class": "PreTrainedTokenizerFast",
            "chat_template": self.chat_template.as_ref().map(|c| c.source().to_string()),
        });
        let tc = dir.join("tokenizer_config.json");
        let text = serde_json::to_string_pretty(&cfg).map_err(|e| write_err(&tc, e.to_string()))?;
        std::fs::write(&tc, text).map_err(|source| DataError::Write { file: tc, source })
    }
}

/// GPT-2's reversible byte-to-unicode table: printable Latin-1 bytes map to themselves, the
/// others to code points from 256 up, in byte order.
pub(crate) fn byte_chars() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
        let cp = if printable {
            u32::from(b)
        } else {
            n += 1;
            255 + n
        };
        out[usize::from(b)] = char::from_u32(cp).unwrap_or('\u{FFFD}');
    }
    out
}
