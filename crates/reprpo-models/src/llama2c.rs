//! Converter from Andrej Karpathy's llama2.c format (a legacy "version 0" checkpoint such as
//! `stories260K.bin` plus its `tokenizer.bin`) to a Hugging Face Llama folder: `config.json`,
//! `model.safetensors`, `tokenizer.json` and `tokenizer_config.json`.
//!
//! Two conventions differ between llama2.c and Hugging Face Llama and are bridged here:
//!
//! - **Rotary embeddings.** llama2.c rotates interleaved pairs `(q[2i], q[2i+1])` of each head,
//!   Hugging Face rotates halves `(q[i], q[i + head_dim/2])`. As in `transformers`'
//!   `convert_llama_weights_to_hf.py`, the rows of `wq` and `wk` are permuted per head (row
//!   `2i + t` of a head becomes row `t * head_dim/2 + i`), which makes a standard HF forward
//!   compute exactly what llama2.c computes (queries and keys are permuted alike, so every
//!   attention score is unchanged).
//! - **Tokenizer.** llama2.c stores SentencePiece pieces with real spaces and scores; the HF
//!   fast tokenizer wants `▁` pieces and an ordered merge list. Merges are derived from the
//!   scores as `transformers`' `LlamaConverter` does.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, View};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{ModelError, Result};

/// Bytes in a legacy llama2.c header: seven little-endian `i32`.
const HEADER_BYTES: u64 = 7 * 4;
/// The magic number (`"ak42"`) that starts llama2.c's newer (version >= 1) exports.
const VERSIONED_MAGIC: u32 = 0x616b_3432;
/// The SentencePiece word-boundary marker.
const SPIECE_UNDERLINE: char = '\u{2581}';
/// Beginning-of-sequence id of every llama2.c tokenizer (`<unk>` is 0).
const BOS_ID: u32 = 1;
/// End-of-sequence id.
const EOS_ID: u32 = 2;
/// First id after the special tokens and the 256 byte-fallback tokens.
const FIRST_PIECE_ID: usize = 3 + 256;

/// The header of a legacy llama2.c checkpoint (all values as positive counts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Llama2cHeader {
    /// Model width (`hidden_size`).
    pub dim: usize,
    /// Width of the feed-forward layer (`intermediate_size`).
    pub hidden_dim: usize,
    /// Number of transformer blocks.
    pub n_layers: usize,
    /// Number of query heads.
    pub n_heads: usize,
    /// Number of key/value heads (grouped-query attention when below `n_heads`).
    pub n_kv_heads: usize,
    /// Vocabulary size (the absolute value of the stored one).
    pub vocab_size: usize,
    /// Maximum sequence length the model was trained for.
    pub seq_len: usize,
    /// Whether the classifier shares the token-embedding matrix (stored vocab size positive).
    pub shared_classifier: bool,
}

impl Llama2cHeader {
    /// Width of one attention head (`dim / n_heads`).
    pub fn head_dim(&self) -> usize {
        self.dim / self.n_heads
    }
}

/// One weight array of a llama2.c checkpoint, stacked over layers where llama2.c stacks it.
#[derive(Debug, Clone, PartialEq)]
pub struct Llama2cTensor {
    /// llama2.c's name (`token_embedding_table`, `rms_att_weight`, `wq`, ..., `wcls`).
    pub name: String,
    /// Row-major shape, e.g. `[n_layers, dim, dim]` for `wq`.
    pub shape: Vec<usize>,
    /// The values, row-major.
    pub data: Vec<f32>,
}

/// A legacy llama2.c checkpoint read into memory. The RoPE tables (`freq_cis_real`,
/// `freq_cis_imag`) are skipped, since both conventions recompute them.
#[derive(Debug, Clone, PartialEq)]
pub struct Llama2c {
    /// The header values.
    pub header: Llama2cHeader,
    /// The weights in file order: `token_embedding_table` `[vocab, dim]`, `rms_att_weight`
    /// `[layers, dim]`, `wq` `[layers, dim, dim]`, `wk` and `wv` `[layers, kv_dim, dim]`, `wo`
    /// `[layers, dim, dim]`, `rms_ffn_weight` `[layers, dim]`, `w1` and `w3`
    /// `[layers, hidden, dim]`, `w2` `[layers, dim, hidden]`, `rms_final_weight` `[dim]`, and
    /// `wcls` `[vocab, dim]` only when the classifier is not shared.
    pub weights: Vec<Llama2cTensor>,
}

impl Llama2c {
    /// The weight called `name` (llama2.c's name), if present.
    pub fn tensor(&self, name: &str) -> Option<&Llama2cTensor> {
        self.weights.iter().find(|t| t.name == name)
    }
}

/// What [`convert`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvertReport {
    /// The output folder.
    pub out_dir: PathBuf,
    /// `hidden_size` written to `config.json`.
    pub hidden_size: usize,
    /// `intermediate_size`.
    pub intermediate_size: usize,
    /// `num_hidden_layers`.
    pub num_hidden_layers: usize,
    /// `num_attention_heads`.
    pub num_attention_heads: usize,
    /// `num_key_value_heads`.
    pub num_key_value_heads: usize,
    /// `vocab_size`.
    pub vocab_size: usize,
    /// `max_position_embeddings` (llama2.c's `seq_len`).
    pub max_position_embeddings: usize,
    /// `tie_word_embeddings` (true when no separate `lm_head.weight` was written).
    pub tie_word_embeddings: bool,
    /// Number of tensors in `model.safetensors`.
    pub n_tensors: usize,
    /// Number of BPE merges in `tokenizer.json`.
    pub n_merges: usize,
    /// The files written, in the order they were put in place.
    pub files: Vec<PathBuf>,
}

impl std::fmt::Display for ConvertReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: llama hidden {} ffn {} layers {} heads {}/{} kv vocab {} ctx {} tied {}; \
             {} tensors, {} merges",
            self.out_dir.display(),
            self.hidden_size,
            self.intermediate_size,
            self.num_hidden_layers,
            self.num_attention_heads,
            self.num_key_value_heads,
            self.vocab_size,
            self.max_position_embeddings,
            self.tie_word_embeddings,
            self.n_tensors,
            self.n_merges
        )
    }
}

fn format_err(file: &Path, problem: impl Into<String>) -> ModelError {
    ModelError::Format {
        file: file.to_path_buf(),
        problem: problem.into(),
    }
}

fn io_err(file: &Path, source: std::io::Error) -> ModelError {
    ModelError::Io {
        file: file.to_path_buf(),
        source,
    }
}

fn write_err(file: &Path, source: std::io::Error) -> ModelError {
    ModelError::Write {
        file: file.to_path_buf(),
        source,
    }
}

/// Reads and validates a legacy (version 0) llama2.c checkpoint.
///
/// The file must hold exactly the header plus every weight the header implies (including
/// the RoPE tables, which are skipped, and `wcls` when the stored vocab size is negative);
/// a short file gives a [`ModelError::Format`] that names the tensor and offset that are
/// missing.
pub fn read_checkpoint(path: &Path) -> Result<Llama2c> {
    let file = File::open(path).map_err(|e| io_err(path, e))?;
    let file_len = file.metadata().map_err(|e| io_err(path, e))?.len();
    if file_len < HEADER_BYTES {
        return Err(format_err(
            path,
            format!(
                "truncated llama2.c checkpoint: expected a {HEADER_BYTES}-byte header (7 \
                 little-endian i32) at offset 0, the file has {file_len} bytes"
            ),
        ));
    }
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut raw = [0u8; HEADER_BYTES as usize];
    reader.read_exact(&mut raw).map_err(|e| io_err(path, e))?;
    if u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]) == VERSIONED_MAGIC {
        return Err(format_err(
            path,
            "this is a versioned llama2.c export (magic \"ak42\"); only the legacy (version 0) \
             float32 format is supported (export with `--version 0`)",
        ));
    }
    let field =
        |i: usize| i32::from_le_bytes([raw[4 * i], raw[4 * i + 1], raw[4 * i + 2], raw[4 * i + 3]]);
    let names = [
        "dim",
        "hidden_dim",
        "n_layers",
        "n_heads",
        "n_kv_heads",
        "vocab_size",
        "seq_len",
    ];
    let mut values = [0usize; 7];
    for (i, name) in names.iter().enumerate() {
        let v = field(i);
        let abs = if i == 5 {
            v.unsigned_abs()
        } else {
            u32::try_from(v).unwrap_or(0)
        };
        if abs == 0 {
            return Err(format_err(
                path,
                format!(
                    "header field `{name}` (offset {}) is {v}; expected a positive value",
                    4 * i
                ),
            ));
        }
        values[i] = abs as usize;
    }
    let header = Llama2cHeader {
        dim: values[0],
        hidden_dim: values[1],
        n_layers: values[2],
        n_heads: values[3],
        n_kv_heads: values[4],
        vocab_size: values[5],
        seq_len: values[6],
        shared_classifier: field(5) > 0,
    };
    check_header(path, &header)?;

    let layout = tensor_layout(path, &header)?;
    let Some(&(_, _, _, end)) = layout.last() else {
        return Err(format_err(path, "empty tensor layout"));
    };
    if file_len < end {
        // Name the first tensor that does not fit.
        let (name, shape, start, stop) = layout
            .iter()
            .find(|(_, _, _, stop)| *stop > file_len)
            .cloned()
            .unwrap_or_else(|| ("?".to_string(), Vec::new(), 0, end));
        return Err(format_err(
            path,
            format!(
                "truncated llama2.c checkpoint: expected tensor `{name}` {shape:?} ({} bytes \
                 of f32) at offset {start}, but the file ends at {file_len} (the header \
                 promises {end} bytes in all)",
                stop - start
            ),
        ));
    }
    if file_len > end {
        return Err(format_err(
            path,
            format!(
                "{} unexpected trailing bytes: the header promises exactly {end} bytes, the file \
                 has {file_len} (is this a legacy version-0 llama2.c export with this header?)",
                file_len - end
            ),
        ));
    }

    let mut weights = Vec::new();
    let mut buf = Vec::new();
    for (name, shape, start, stop) in layout {
        let n_bytes = usize::try_from(stop - start)
            .map_err(|_| format_err(path, format!("tensor `{name}` too large for memory")))?;
        buf.resize(n_bytes, 0);
        reader.read_exact(&mut buf).map_err(|e| io_err(path, e))?;
        if name.starts_with("freq_cis") {
            continue;
        }
        let data = buf
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        weights.push(Llama2cTensor { name, shape, data });
    }
    Ok(Llama2c { header, weights })
}

fn check_header(path: &Path, h: &Llama2cHeader) -> Result<()> {
    let problem = if !h.dim.is_multiple_of(h.n_heads) {
        Some(format!(
            "dim {} is not a multiple of n_heads {}",
            h.dim, h.n_heads
        ))
    } else if !h.head_dim().is_multiple_of(2) {
        Some(format!(
            "head size {} is odd; rotary embeddings need it even",
            h.head_dim()
        ))
    } else if h.n_kv_heads > h.n_heads || !h.n_heads.is_multiple_of(h.n_kv_heads) {
        Some(format!(
            "n_heads {} is not a multiple of n_kv_heads {}",
            h.n_heads, h.n_kv_heads
        ))
    } else {
        None
    };
    match problem {
        Some(p) => Err(format_err(path, format!("inconsistent header: {p}"))),
        None => Ok(()),
    }
}

/// `(name, shape, start byte, end byte)` of every array after the header, in file order.
type Layout = Vec<(String, Vec<usize>, u64, u64)>;

fn tensor_layout(path: &Path, h: &Llama2cHeader) -> Result<Layout> {
    let kv_dim = h.head_dim() * h.n_kv_heads;
    let (l, d, f, v) = (h.n_layers, h.dim, h.hidden_dim, h.vocab_size);
    let half = h.head_dim() / 2;
    let mut arrays: Vec<(&str, Vec<usize>)> = vec![
        ("token_embedding_table", vec![v, d]),
        ("rms_att_weight", vec![l, d]),
        ("wq", vec![l, d, d]),
        ("wk", vec![l, kv_dim, d]),
        ("wv", vec![l, kv_dim, d]),
        ("wo", vec![l, d, d]),
        ("rms_ffn_weight", vec![l, d]),
        ("w1", vec![l, f, d]),
        ("w2", vec![l, d, f]),
        ("w3", vec![l, f, d]),
        ("rms_final_weight", vec![d]),
        ("freq_cis_real", vec![h.seq_len, half]),
        ("freq_cis_imag", vec![h.seq_len, half]),
    ];
    if !h.shared_classifier {
        arrays.push(("wcls", vec![v, d]));
    }
    let mut offset = HEADER_BYTES;
    let mut out = Vec::with_capacity(arrays.len());
    for (name, shape) in arrays {
        let bytes = shape
            .iter()
            .try_fold(4u64, |acc, &n| acc.checked_mul(n as u64))
            .and_then(|b| offset.checked_add(b).map(|end| (b, end)));
        let Some((_, end)) = bytes else {
            return Err(format_err(
                path,
                format!("header implies an impossibly large tensor `{name}` {shape:?}"),
            ));
        };
        out.push((name.to_string(), shape, offset, end));
        offset = end;
    }
    Ok(out)
}

/// Reads a llama2.c `tokenizer.bin`: an `i32` max token length, then per token an `f32`
/// score, an `i32` byte length and the UTF-8 bytes. Returns `(piece as stored, score)` in id
/// order; the file has no count, so every token up to the end of the file is read (the
/// converter checks the count against the checkpoint's vocab size).
pub fn read_tokenizer(path: &Path) -> Result<Vec<(String, f32)>> {
    let bytes = std::fs::read(path).map_err(|e| io_err(path, e))?;
    let len = bytes.len();
    if len < 4 {
        return Err(format_err(
            path,
            format!(
                "truncated llama2.c tokenizer: expected a 4-byte max token length (i32) at \
                 offset 0, the file has {len} bytes"
            ),
        ));
    }
    let mut pos = 4usize;
    let mut tokens = Vec::new();
    while pos < len {
        let id = tokens.len();
        if len - pos < 8 {
            return Err(format_err(
                path,
                format!(
                    "truncated llama2.c tokenizer: token {id}: expected 8 bytes (f32 score, i32 \
                     length) at offset {pos}, the file ends at {len}"
                ),
            ));
        }
        let score =
            f32::from_le_bytes([bytes[pos], bytes[pos + 1], bytes[pos + 2], bytes[pos + 3]]);
        let n = i32::from_le_bytes([
            bytes[pos + 4],
            bytes[pos + 5],
            bytes[pos + 6],
            bytes[pos + 7],
        ]);
        let text_at = pos + 8;
        let n = usize::try_from(n).map_err(|_| {
            format_err(
                path,
                format!("token {id}: negative length {n} at offset {}", pos + 4),
            )
        })?;
        if len - text_at < n {
            return Err(format_err(
                path,
                format!(
                    "truncated llama2.c tokenizer: token {id}: expected {n} bytes of text at \
                     offset {text_at}, the file ends at {len}"
                ),
            ));
        }
        let text = std::str::from_utf8(&bytes[text_at..text_at + n]).map_err(|e| {
            format_err(
                path,
                format!("token {id} at offset {text_at} is not valid UTF-8: {e}"),
            )
        })?;
        tokens.push((text.to_string(), score));
        pos = text_at + n;
    }
    Ok(tokens)
}

/// Permutes the rows of a `[n_heads * head_dim, cols]` projection from llama2.c's interleaved
/// rotary layout to Hugging Face's half-split layout: within each head, row `2i + t` moves
/// to row `t * head_dim/2 + i` (`w.view(n_heads, head_dim/2, 2, cols).transpose(1, 2)`).
fn permute_rotary(w: &[f32], n_heads: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    let half = head_dim / 2;
    let mut out = vec![0f32; w.len()];
    for h in 0..n_heads {
        for i in 0..half {
            for t in 0..2 {
                let src = (h * head_dim + 2 * i + t) * cols;
                let dst = (h * head_dim + t * half + i) * cols;
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    out
}

/// A float32 tensor handed to `safetensors`; the little-endian bytes are made when written.
struct F32View<'a> {
    shape: Vec<usize>,
    data: Cow<'a, [f32]>,
}

impl View for F32View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.data.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
    fn data_len(&self) -> usize {
        self.data.len() * 4
    }
}

/// The Hugging Face tensors of a checkpoint, by HF name.
fn hf_tensors<'a>(ckpt: &'a Llama2c, path: &Path) -> Result<Vec<(String, F32View<'a>)>> {
    let h = &ckpt.header;
    let get = |name: &str| {
        ckpt.tensor(name).ok_or_else(|| ModelError::Weight {
            file: path.to_path_buf(),
            name: name.to_string(),
            problem: "missing".to_string(),
        })
    };
    // Layer `i`'s slice of a stacked `[n_layers, rows, cols]` array.
    let layer = |t: &'a Llama2cTensor, i: usize| -> (Vec<usize>, &'a [f32]) {
        let shape = t.shape[1..].to_vec();
        let n: usize = shape.iter().product();
        (shape, &t.data[i * n..(i + 1) * n])
    };
    let view = |shape: Vec<usize>, data: Cow<'a, [f32]>| F32View { shape, data };
    let mut out = Vec::new();
    let emb = get("token_embedding_table")?;
    out.push((
        "model.embed_tokens.weight".to_string(),
        view(emb.shape.clone(), Cow::Borrowed(&emb.data)),
    ));
    let head_dim = h.head_dim();
    for i in 0..h.n_layers {
        let p = format!("model.layers.{i}");
        let (s, d) = layer(get("rms_att_weight")?, i);
        out.push((
            format!("{p}.input_layernorm.weight"),
            view(s, Cow::Borrowed(d)),
        ));
        let (s, d) = layer(get("wq")?, i);
        let q = permute_rotary(d, h.n_heads, head_dim, h.dim);
        out.push((
            format!("{p}.self_attn.q_proj.weight"),
            view(s, Cow::Owned(q)),
        ));
        let (s, d) = layer(get("wk")?, i);
        let k = permute_rotary(d, h.n_kv_heads, head_dim, h.dim);
        out.push((
            format!("{p}.self_attn.k_proj.weight"),
            view(s, Cow::Owned(k)),
        ));
        for (llama2c, hf) in [
            ("wv", "self_attn.v_proj"),
            ("wo", "self_attn.o_proj"),
            ("rms_ffn_weight", "post_attention_layernorm"),
            ("w1", "mlp.gate_proj"),
            ("w2", "mlp.down_proj"),
            ("w3", "mlp.up_proj"),
        ] {
            let (s, d) = layer(get(llama2c)?, i);
            out.push((format!("{p}.{hf}.weight"), view(s, Cow::Borrowed(d))));
        }
    }
    let norm = get("rms_final_weight")?;
    out.push((
        "model.norm.weight".to_string(),
        view(norm.shape.clone(), Cow::Borrowed(&norm.data)),
    ));
    if !h.shared_classifier {
        let cls = get("wcls")?;
        out.push((
            "lm_head.weight".to_string(),
            view(cls.shape.clone(), Cow::Borrowed(&cls.data)),
        ));
    }
    Ok(out)
}

/// The HF vocabulary (pieces with `▁`, specials renamed) of a llama2.c tokenizer, checked.
fn hf_vocab(path: &Path, tokens: &[(String, f32)]) -> Result<Vec<String>> {
    if tokens.len() < FIRST_PIECE_ID {
        return Err(format_err(
            path,
            format!(
                "has {} tokens; a llama2.c SentencePiece tokenizer has at least {FIRST_PIECE_ID} \
                 (3 special + 256 byte tokens)",
                tokens.len()
            ),
        ));
    }
    let mut pieces = Vec::with_capacity(tokens.len());
    for (id, (stored, _)) in tokens.iter().enumerate() {
        let piece = match id {
            0..=2 => {
                let name = ["<unk>", "<s>", "</s>"][id];
                if stored.trim() != name {
                    return Err(format_err(
                        path,
                        format!(
                            "token {id} is {stored:?}; expected {name:?} (possibly within newlines)"
                        ),
                    ));
                }
                name.to_string()
            }
            3..FIRST_PIECE_ID => {
                let expected = format!("<0x{:02X}>", id - 3);
                if *stored != expected {
                    return Err(format_err(
                        path,
                        format!("token {id} is {stored:?}; expected the byte token {expected:?}"),
                    ));
                }
                expected
            }
            _ => stored.replace(' ', &SPIECE_UNDERLINE.to_string()),
        };
        pieces.push(piece);
    }
    let mut seen: HashMap<&str, usize> = HashMap::with_capacity(pieces.len());
    for (id, p) in pieces.iter().enumerate() {
        if let Some(first) = seen.insert(p, id) {
            return Err(format_err(
                path,
                format!("tokens {first} and {id} are the same piece {p:?}"),
            ));
        }
    }
    Ok(pieces)
}

/// Ordered BPE merges from SentencePiece scores, as `transformers`' `LlamaConverter` derives
/// them: every split of a piece into two pieces of the vocabulary is a merge; merges are
/// ordered by the merged piece's score (descending), then its id, then the ids of the two
/// halves. Special and byte tokens take no part (SentencePiece never merges into or from them).
fn merges_from_scores(pieces: &[String], scores: &[f32]) -> Vec<(String, String)> {
    let ids: HashMap<&str, usize> = pieces
        .iter()
        .enumerate()
        .skip(FIRST_PIECE_ID)
        .map(|(i, p)| (p.as_str(), i))
        .collect();
    // (merged id, left id, right id)
    let mut found: Vec<(usize, usize, usize)> = Vec::new();
    for (id, piece) in pieces.iter().enumerate().skip(FIRST_PIECE_ID) {
        let mut local = Vec::new();
        for (at, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(at);
            if let (Some(&li), Some(&ri)) = (ids.get(l), ids.get(r)) {
                local.push((id, li, ri));
            }
        }
        local.sort_by_key(|&(_, l, r)| (l, r));
        found.extend(local);
    }
    // Stable sort: ties keep id order, then (left, right) order.
    found.sort_by(|a, b| scores[b.0].total_cmp(&scores[a.0]));
    found
        .into_iter()
        .map(|(_, l, r)| (pieces[l].clone(), pieces[r].clone()))
        .collect()
}

fn tok_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(e.to_string())
}

/// Builds the Llama-2-style HF fast tokenizer; returns it with its merge count.
fn build_tokenizer(path: &Path, tokens: &[(String, f32)]) -> Result<(Tokenizer, usize)> {
    let pieces = hf_vocab(path, tokens)?;
    let scores: Vec<f32> = tokens.iter().map(|(_, s)| *s).collect();
    let merges = merges_from_scores(&pieces, &scores);
    let n_merges = merges.len();
    let vocab: tokenizers::models::bpe::Vocab = pieces
        .iter()
        .enumerate()
        .map(|(i, p)| u32::try_from(i).map(|i| (p.clone(), i)))
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| format_err(path, "more than 2^32 tokens"))?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .unk_token("<unk>".to_string())
        .fuse_unk(true)
        .byte_fallback(true)
        .build()
        .map_err(tok_err)?;
    let mut tokenizer = Tokenizer::new(bpe);
    let space = SPIECE_UNDERLINE.to_string();
    let normalizer = NormalizerSequence::new(vec![
        Prepend::new(space.clone()).into(),
        Replace::new(" ", space.clone()).map_err(tok_err)?.into(),
    ]);
    tokenizer
        .with_normalizer(Some(normalizer))
        .map_err(tok_err)?;
    let decoder = DecoderSequence::new(vec![
        Replace::new(space, " ").map_err(tok_err)?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
        Strip::new(' ', 1, 0).into(),
    ]);
    tokenizer.with_decoder(Some(decoder));
    let post = TemplateProcessing::builder()
        .try_single("<s>:0 $A:0")
        .map_err(tok_err)?
        .try_pair("<s>:0 $A:0 <s>:1 $B:1")
        .map_err(tok_err)?
        .special_tokens(vec![("<s>", BOS_ID)])
        .build()
        .map_err(tok_err)?;
    tokenizer.with_post_processor(Some(post));
    tokenizer
        .add_special_tokens(
            ["<unk>", "<s>", "</s>"]
                .into_iter()
                .map(|t| AddedToken::from(t, true).normalized(false)),
        )
        .map_err(tok_err)?;
    Ok((tokenizer, n_merges))
}

fn config_json(h: &Llama2cHeader) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": h.dim,
        "intermediate_size": h.hidden_dim,
        "num_hidden_layers": h.n_layers,
        "num_attention_heads": h.n_heads,
        "num_key_value_heads": h.n_kv_heads,
        "vocab_size": h.vocab_size,
        "max_position_embeddings": h.seq_len,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": h.shared_classifier,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    })
}

fn tokenizer_config_json(h: &Llama2cHeader) -> serde_json::Value {
    serde_json::json!({
        "tokenizer_class": "LlamaTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": true,
        "add_eos_token": false,
        "clean_up_tokenization_spaces": false,
        "model_max_length": h.seq_len,
    })
}

/// Temporary files in the output folder, removed on drop unless put in place.
struct Staging {
    pending: Vec<(PathBuf, PathBuf)>,
}

impl Staging {
    fn tmp_path(out_dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        (out_dir.join(format!(".{name}.tmp")), out_dir.join(name))
    }

    /// Writes `bytes` to the temporary twin of `out_dir/name`.
    fn write(&mut self, out_dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
        let (tmp, dst) = Self::tmp_path(out_dir, name);
        self.pending.push((tmp.clone(), dst));
        let mut f = File::create(&tmp).map_err(|e| write_err(&tmp, e))?;
        f.write_all(bytes).map_err(|e| write_err(&tmp, e))?;
        f.sync_all().map_err(|e| write_err(&tmp, e))
    }

    /// Writes the safetensors file to its temporary twin.
    fn write_safetensors(
        &mut self,
        out_dir: &Path,
        name: &str,
        tensors: Vec<(String, F32View<'_>)>,
    ) -> Result<()> {
        let (tmp, dst) = Self::tmp_path(out_dir, name);
        self.pending.push((tmp.clone(), dst));
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::serialize_to_file(tensors, Some(meta), &tmp).map_err(|e| {
            let source = match e {
                safetensors::SafeTensorError::IoError(io) => io,
                other => std::io::Error::other(other.to_string()),
            };
            write_err(&tmp, source)
        })?;
        File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| write_err(&tmp, e))
    }

    /// Renames every temporary file onto its final name.
    fn commit(mut self) -> Result<Vec<PathBuf>> {
        let mut done = Vec::new();
        while !self.pending.is_empty() {
            let (tmp, dst) = self.pending.remove(0);
            if let Err(e) = std::fs::rename(&tmp, &dst) {
                let _ = std::fs::remove_file(&tmp);
                return Err(write_err(&dst, e));
            }
            done.push(dst);
        }
        Ok(done)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        for (tmp, _) in &self.pending {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// Converts a legacy llama2.c checkpoint and its `tokenizer.bin` into a Hugging Face Llama
/// folder `out_dir` (created if missing): `config.json`, `model.safetensors` (float32, HF
/// names, `wq`/`wk` rows permuted to the half-split rotary layout, `lm_head.weight` only when
/// the classifier is not shared), `tokenizer.json` (Llama-2-style BPE with byte fallback) and
/// `tokenizer_config.json`.
///
/// Both inputs are read and checked before anything is written; each file is written under a
/// temporary name and renamed when complete, and on error no temporary file is left behind.
pub fn convert(checkpoint: &Path, tokenizer_bin: &Path, out_dir: &Path) -> Result<ConvertReport> {
    let ckpt = read_checkpoint(checkpoint)?;
    let tokens = read_tokenizer(tokenizer_bin)?;
    let h = ckpt.header;
    if tokens.len() != h.vocab_size {
        return Err(format_err(
            tokenizer_bin,
            format!(
                "has {} tokens but the checkpoint {} has vocab_size {} (truncated or mismatched \
                 tokenizer?)",
                tokens.len(),
                checkpoint.display(),
                h.vocab_size
            ),
        ));
    }
    let (tokenizer, n_merges) = build_tokenizer(tokenizer_bin, &tokens)?;
    let tokenizer_json = tokenizer.to_string(true).map_err(tok_err)?;
    let config = serde_json::to_vec_pretty(&config_json(&h))
        .map_err(|e| write_err(&out_dir.join("config.json"), std::io::Error::other(e)))?;
    let tok_config = serde_json::to_vec_pretty(&tokenizer_config_json(&h)).map_err(|e| {
        write_err(
            &out_dir.join("tokenizer_config.json"),
            std::io::Error::other(e),
        )
    })?;
    let tensors = hf_tensors(&ckpt, checkpoint)?;
    let n_tensors = tensors.len();

    std::fs::create_dir_all(out_dir).map_err(|e| write_err(out_dir, e))?;
    let mut staging = Staging {
        pending: Vec::new(),
    };
    staging.write(out_dir, "config.json", &config)?;
    staging.write_safetensors(out_dir, "model.safetensors", tensors)?;
    staging.write(out_dir, "tokenizer.json", tokenizer_json.as_bytes())?;
    staging.write(out_dir, "tokenizer_config.json", &tok_config)?;
    let files = staging.commit()?;

    Ok(ConvertReport {
        out_dir: out_dir.to_path_buf(),
        hidden_size: h.dim,
        intermediate_size: h.hidden_dim,
        num_hidden_layers: h.n_layers,
        num_attention_heads: h.n_heads,
        num_key_value_heads: h.n_kv_heads,
        vocab_size: h.vocab_size,
        max_position_embeddings: h.seq_len,
        tie_word_embeddings: h.shared_classifier,
        n_tensors,
        n_merges,
        files,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_moves_interleaved_pairs_to_halves() {
        // One head of width 4, one column: rows [a0, b0, a1, b1] -> [a0, a1, b0, b1].
        let w = [10.0, 11.0, 20.0, 21.0];
        assert_eq!(permute_rotary(&w, 1, 4, 1), vec![10.0, 20.0, 11.0, 21.0]);
    }

    #[test]
    fn merges_follow_scores_then_ids() {
        let mut pieces: Vec<String> = (0..FIRST_PIECE_ID).map(|i| format!("#{i}")).collect();
        let mut scores = vec![0.0; FIRST_PIECE_ID];
        for (p, s) in [
            ("ab", -2.0),
            ("abc", -1.0),
            ("a", -5.0),
            ("b", -6.0),
            ("c", -7.0),
            ("bc", -3.0),
        ] {
            pieces.push(p.to_string());
            scores.push(s);
        }
        let merges = merges_from_scores(&pieces, &scores);
        let pairs: Vec<(&str, &str)> = merges
            .iter()
            .map(|(l, r)| (l.as_str(), r.as_str()))
            .collect();
        // "abc" (-1) first: its splits "ab"+"c" and "a"+"bc", ordered by left id ("ab" is 259).
        assert_eq!(
            pairs,
            vec![("ab", "c"), ("a", "bc"), ("a", "b"), ("b", "c")]
        );
    }
}
