//! Fuzz harnesses for every reader a user's file reaches (issue 15): one `pub fn <target>(data:
//! &[u8])` per target, called by the `cargo fuzz` targets of `fuzz/fuzz_targets/` (libFuzzer) and
//! by `tests/regressions.rs`, which replays the committed inputs of `regressions/<target>/` under
//! plain `cargo test`.
//!
//! Each harness hands the bytes to the real reader, through a file in a temporary folder where
//! the reader takes a path. A reader must return `Err` for bad input: the only panics allowed
//! here are harness bugs (no temporary folder, say) and the few properties a harness checks
//! itself (a resolved training config must read back as itself).
//!
//! Targets whose reader takes several files read their input as parts separated by
//! [`PART_SEPARATOR`] (missing parts are empty; see [`parts`]).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use reprpo_data::chat::{ChatTemplate, Message};
use reprpo_data::convert::{ConvertOptions, Converter, convert};
use reprpo_data::recipe::Recipe;
use reprpo_models::llama2c;
use reprpo_models::peft;
use reprpo_models::phi3::{HfPhi3Config, Phi3, Phi3Config};
use reprpo_models::{ForwardSpec, Llama, LlamaConfig};
use reprpo_train::config::{Sources, TrainConfig};
use reprpo_train::{resume, run};

#[cfg(feature = "libfuzzer")]
mod budget;

/// The most heap one input may add to what was live before it: `64 MiB + 1000 x input length`
/// (the reasons are in `tests/regressions.rs`, which checks it on the committed inputs; under
/// libFuzzer the `libfuzzer` feature's global allocator checks it on every input).
pub fn allowed_bytes(input_len: usize) -> usize {
    (64usize << 20).saturating_add(input_len.saturating_mul(1000))
}

/// What target `target` may allocate beyond [`allowed_bytes`]: a chat template is a program, and
/// minijinja lets one expression build a string of up to 100 MB (`"x" * n` is refused above
/// that); 256 MiB covers one such string and its copy into the output. More is possible (several
/// such strings, within the render's fuel) and is not bounded: see docs/reliability.md.
pub fn extra_bytes(target: &str) -> usize {
    match target {
        "chat_template" => 256 << 20,
        _ => 0,
    }
}

/// Run one input of `target` under the allocation budget (a no-op without the `libfuzzer`
/// feature).
fn budgeted(target: &str, data: &[u8], f: impl FnOnce(&[u8])) {
    #[cfg(feature = "libfuzzer")]
    let _guard = budget::Guard::start(allowed_bytes(data.len()) + extra_bytes(target));
    #[cfg(not(feature = "libfuzzer"))]
    let _ = target;
    f(data);
}

/// Separates the files of a multi-file input (adapter config and weights, checkpoint files,
/// training config and overrides).
pub const PART_SEPARATOR: &[u8] = b"\n--reprpo-fuzz-part--\n";

/// Every target, by the name of its harness function, its `fuzz/fuzz_targets/<name>.rs` and its
/// `regressions/<name>/` folder.
pub const TARGETS: &[&str] = &[
    "table_jsonl",
    "table_json",
    "table_csv",
    "table_parquet",
    "table_gzip",
    "recipe",
    "chat_template",
    "adapter",
    "model_config",
    "train_config",
    "llama2c_checkpoint",
    "llama2c_tokenizer",
    "checkpoint",
    "metrics",
];

/// Run the harness called `target` on `data`; false when there is no such target.
pub fn run_target(target: &str, data: &[u8]) -> bool {
    let f: fn(&[u8]) = match target {
        "table_jsonl" => table_jsonl,
        "table_json" => table_json,
        "table_csv" => table_csv,
        "table_parquet" => table_parquet,
        "table_gzip" => table_gzip,
        "recipe" => recipe,
        "chat_template" => chat_template,
        "adapter" => adapter,
        "model_config" => model_config,
        "train_config" => train_config,
        "llama2c_checkpoint" => llama2c_checkpoint,
        "llama2c_tokenizer" => llama2c_tokenizer,
        "checkpoint" => checkpoint,
        "metrics" => metrics,
        _ => return false,
    };
    f(data);
    true
}

/// The first `N` parts of `data` split at [`PART_SEPARATOR`]; the last part keeps any further
/// separators, missing parts are empty.
pub fn parts<const N: usize>(data: &[u8]) -> [&[u8]; N] {
    let mut out: [&[u8]; N] = [&[]; N];
    let mut rest = data;
    for (i, slot) in out.iter_mut().enumerate() {
        if i + 1 == N {
            *slot = rest;
            break;
        }
        match find(rest, PART_SEPARATOR) {
            Some(at) => {
                *slot = &rest[..at];
                rest = &rest[at + PART_SEPARATOR.len()..];
            }
            None => {
                *slot = rest;
                rest = &[];
            }
        }
    }
    out
}

/// Join files into one input for [`parts`] (for building seeds).
pub fn join_parts(files: &[&[u8]]) -> Vec<u8> {
    files.join(PART_SEPARATOR)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A fresh temporary folder. Failing to make one is a harness (machine) problem, not a finding.
#[allow(clippy::expect_used)]
fn scratch() -> tempfile::TempDir {
    tempfile::tempdir().expect("harness: cannot create a temporary folder")
}

/// Write `bytes` to `dir/name` and return the path. A failed write is a harness problem.
#[allow(clippy::expect_used)]
fn put(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).expect("harness: cannot create a folder");
    }
    std::fs::write(&path, bytes).expect("harness: cannot write the input file");
    path
}

// ---------------------------------------------------------------------------------------------
// Data files: `read_table` and every converter.

/// Read `data` as a file named `input.<ext>` and, when it reads, run every converter on it.
fn table(ext: &str, data: &[u8]) {
    let dir = scratch();
    let path = put(dir.path(), &format!("input.{ext}"), data);
    let Ok(table) = reprpo_data::read_table(&path) else {
        return;
    };
    let opts = ConvertOptions {
        dataset: "fuzz".into(),
        seed: 0,
    };
    for name in Converter::NAMES {
        if let Ok(c) = name.parse::<Converter>() {
            let _ = convert(c, &table, &opts);
        }
    }
}

/// JSONL data file (`read_table` on `.jsonl`), then every converter.
pub fn table_jsonl(data: &[u8]) {
    budgeted("table_jsonl", data, table_jsonl_inner);
}

fn table_jsonl_inner(data: &[u8]) {
    table("jsonl", data);
}

/// JSON data file (an array of rows or an object of rows), then every converter.
pub fn table_json(data: &[u8]) {
    budgeted("table_json", data, table_json_inner);
}

fn table_json_inner(data: &[u8]) {
    table("json", data);
}

/// CSV data file, then every converter.
pub fn table_csv(data: &[u8]) {
    budgeted("table_csv", data, table_csv_inner);
}

fn table_csv_inner(data: &[u8]) {
    table("csv", data);
}

/// Parquet data file (the `parquet`/`arrow` reader and the Arrow-to-JSON cell conversion), then
/// every converter.
pub fn table_parquet(data: &[u8]) {
    budgeted("table_parquet", data, table_parquet_inner);
}

fn table_parquet_inner(data: &[u8]) {
    #[cfg(feature = "libfuzzer")]
    let_parquet_panics_unwind();
    table("parquet", data);
}

/// `read_table` turns a panic inside the `parquet` crate (a known class of its bugs on malformed
/// files) into a `Malformed` error, and the regression test checks that it does; but libFuzzer's
/// panic hook aborts on every panic, caught or not. Under libFuzzer, this hook lets panics raised
/// in the `parquet` crate's own code unwind to that `catch_unwind`, and hands every other panic
/// to libFuzzer's hook, so the fuzzer keeps looking past the known one.
#[cfg(feature = "libfuzzer")]
fn let_parquet_panics_unwind() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let next = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let in_parquet = info
                .location()
                .is_some_and(|l| l.file().contains("/parquet-"));
            if !in_parquet {
                next(info);
            }
        }));
    });
}

/// A gzip-compressed data file: the first byte picks the inner format (JSONL, JSON, CSV by its
/// value mod 3), the rest is the `.gz` file.
pub fn table_gzip(data: &[u8]) {
    budgeted("table_gzip", data, table_gzip_inner);
}

fn table_gzip_inner(data: &[u8]) {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let ext = ["jsonl.gz", "json.gz", "csv.gz"][usize::from(pick) % 3];
    table(ext, rest);
}

/// A dataset recipe (`datasets/<name>.toml`): `Recipe::load`.
pub fn recipe(data: &[u8]) {
    budgeted("recipe", data, recipe_inner);
}

fn recipe_inner(data: &[u8]) {
    let dir = scratch();
    let path = put(dir.path(), "fuzz.toml", data);
    let _ = Recipe::load(&path);
}

// ---------------------------------------------------------------------------------------------
// Chat templates.

/// A chat template (the `chat_template` of a `tokenizer_config.json`): compiled, rendered with
/// and without the generation prompt, and split into prompt and completion as TRL does.
pub fn chat_template(data: &[u8]) {
    budgeted("chat_template", data, chat_template_inner);
}

fn chat_template_inner(data: &[u8]) {
    let Ok(source) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(t) = ChatTemplate::new(source.to_string(), "<s>".into(), "</s>".into()) else {
        return;
    };
    let messages = [
        Message::new("system", "Be brief."),
        Message::new("user", "What is 2 + 2?"),
        Message::new("assistant", "4"),
    ];
    let _ = t.render(&messages, false);
    let _ = t.render(&messages[1..2], true);
    let _ = t.split_prompt_completion("What is 2 + 2?", "4");
}

// ---------------------------------------------------------------------------------------------
// Models: config.json, PEFT adapters.

/// The base model adapters are loaded onto: a random Llama of the shape of
/// `tests/fixtures/models/llama_gqa_rope3` (so the fixture adapters are valid seeds).
fn adapter_base() -> &'static Option<Llama> {
    static BASE: std::sync::OnceLock<Option<Llama>> = std::sync::OnceLock::new();
    BASE.get_or_init(|| {
        let text = include_str!("../../../tests/fixtures/models/llama_gqa_rope3/config.json");
        let hf: reprpo_models::config::HfLlamaConfig = serde_json::from_str(text).ok()?;
        let config = hf.validate(Path::new("config.json")).ok()?;
        Llama::random(config, 0.1, 0, DType::F32, &Device::Cpu).ok()
    })
}

/// Token ids `[0, 1, .., n-1]` (mod `vocab`) as a `[1, n]` batch.
fn ids(n: usize, vocab: usize) -> Option<Tensor> {
    let v: Vec<u32> = (0..n)
        .map(|i| u32::try_from(i % vocab.max(1)).unwrap_or(0))
        .collect();
    Tensor::from_vec(v, (1, n), &Device::Cpu).ok()
}

/// A PEFT adapter folder: `adapter_config.json`, then `adapter_model.safetensors` (two parts),
/// loaded with `peft::load_adapter` onto a small Llama; when it loads, one forward with it.
pub fn adapter(data: &[u8]) {
    budgeted("adapter", data, adapter_inner);
}

#[allow(clippy::panic)]
fn adapter_inner(data: &[u8]) {
    let [config, weights] = parts::<2>(data);
    let dir = scratch();
    put(dir.path(), "adapter_config.json", config);
    put(dir.path(), "adapter_model.safetensors", weights);
    let Some(base) = adapter_base() else {
        panic!("harness: the base model of the adapter target does not build");
    };
    let mut model = base.clone();
    if peft::load_adapter(&mut model, dir.path(), "fuzz").is_ok()
        && let Some(x) = ids(5, 96)
    {
        let _ = model.forward(&x, None, None, &ForwardSpec::logits());
    }
}

/// Parameters of a model of these sizes, or `None` past `limit` (or on overflow).
fn small_model(dims: &[&[usize]], limit: usize) -> Option<usize> {
    let mut total = 0usize;
    for shape in dims {
        let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
        total = total.checked_add(n)?;
    }
    (total <= limit).then_some(total)
}

/// The largest model (in parameters) the config target builds and runs.
const MAX_PARAMS: usize = 1 << 16;

/// A model `config.json`, validated as Llama (`LlamaConfig::from_dir`) and as Phi-3
/// (`HfPhi3Config::validate`). When a config validates and describes a small model, that model is
/// built (random Llama; zero Phi-3 weights through `Phi3::from_tensors`, i.e. what a matching
/// `model.safetensors` gives) and runs one forward over a few tokens.
pub fn model_config(data: &[u8]) {
    budgeted("model_config", data, model_config_inner);
}

fn model_config_inner(data: &[u8]) {
    let dir = scratch();
    let path = put(dir.path(), "config.json", data);
    if let Ok(c) = LlamaConfig::from_dir(dir.path()) {
        llama_forward(c);
    }
    if let Ok(hf) = HfPhi3Config::load(&path)
        && let Ok(c) = hf.validate(&path)
    {
        let _ = Phi3Config::from_file(&path);
        phi3_forward(c, &path);
    }
}

fn llama_forward(c: LlamaConfig) {
    let (h, q, kv) = (
        c.hidden_size,
        c.num_heads.checked_mul(c.head_dim),
        c.num_kv_heads.checked_mul(c.head_dim),
    );
    let (Some(q), Some(kv)) = (q, kv) else { return };
    let i = c.intermediate_size;
    let layer: [&[usize]; 7] = [
        &[q, h],
        &[kv, h],
        &[kv, h],
        &[h, q],
        &[i, h],
        &[i, h],
        &[h, i],
    ];
    let embed = [c.vocab_size, h];
    let mut dims: Vec<&[usize]> = vec![&embed, &embed];
    for _ in 0..c.num_layers.min(64) {
        dims.extend_from_slice(&layer);
    }
    if c.num_layers > 64 || small_model(&dims, MAX_PARAMS).is_none() {
        return;
    }
    let vocab = c.vocab_size;
    if let Ok(m) = Llama::random(c, 0.1, 0, DType::F32, &Device::Cpu)
        && let Some(x) = ids(3, vocab)
    {
        let _ = m.forward(&x, None, None, &ForwardSpec::logits());
    }
}

fn phi3_forward(c: Phi3Config, file: &Path) {
    let (h, i, hd) = (c.hidden_size, c.intermediate_size, c.head_dim);
    let Some(qkv) = c
        .num_kv_heads
        .checked_mul(2)
        .and_then(|k| k.checked_add(c.num_heads))
        .and_then(|r| r.checked_mul(hd))
    else {
        return;
    };
    let Some(q) = c.num_heads.checked_mul(hd) else {
        return;
    };
    let Some(i2) = i.checked_mul(2) else { return };
    let shapes: Vec<(String, Vec<usize>)> = {
        let mut s = vec![
            (
                "model.embed_tokens.weight".to_string(),
                vec![c.vocab_size, h],
            ),
            ("model.norm.weight".to_string(), vec![h]),
        ];
        if !c.tie_word_embeddings {
            s.push(("lm_head.weight".to_string(), vec![c.vocab_size, h]));
        }
        for l in 0..c.num_layers.min(65) {
            let p = format!("model.layers.{l}");
            s.push((format!("{p}.self_attn.qkv_proj.weight"), vec![qkv, h]));
            s.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
            s.push((format!("{p}.mlp.gate_up_proj.weight"), vec![i2, h]));
            s.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
            s.push((format!("{p}.input_layernorm.weight"), vec![h]));
            s.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        }
        s
    };
    let dims: Vec<&[usize]> = shapes.iter().map(|(_, s)| s.as_slice()).collect();
    if c.num_layers > 64 || small_model(&dims, MAX_PARAMS).is_none() {
        return;
    }
    let mut tensors = std::collections::HashMap::new();
    for (name, shape) in shapes {
        let Ok(t) = Tensor::full(0.01f32, shape, &Device::Cpu) else {
            return;
        };
        tensors.insert(name, t);
    }
    let vocab = c.vocab_size;
    if let Ok(m) = Phi3::from_tensors(c, tensors, file, DType::F32, &Device::Cpu)
        && let Some(x) = ids(3, vocab)
    {
        let _ = m.forward(&x, None, None, &ForwardSpec::logits());
    }
}

// ---------------------------------------------------------------------------------------------
// Training configuration.

/// The training configuration layer: a TOML file (`--config`) and `key=value` overrides, one
/// per line (two parts), resolved by `TrainConfig::resolve` (which runs `check_toml_file` and
/// `parse_override`). A config that resolves must write out as TOML and read back, strictly
/// (`resume::read_run_config`, as `--resume` reads `resolved_config.toml`), as itself, and hash.
pub fn train_config(data: &[u8]) {
    budgeted("train_config", data, train_config_inner);
}

#[allow(clippy::panic)]
fn train_config_inner(data: &[u8]) {
    let [file, overrides] = parts::<2>(data);
    let dir = scratch();
    let path = put(dir.path(), "config.toml", file);
    let overrides: Vec<String> = String::from_utf8_lossy(overrides)
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    for o in &overrides {
        let _ = reprpo_train::config::parse_override(o);
    }
    let src = Sources {
        file: Some(path),
        overrides,
        env: false,
    };
    let Ok(cfg) = TrainConfig::resolve(&src) else {
        return;
    };
    let toml = match cfg.to_toml() {
        Ok(t) => t,
        Err(e) => panic!("a resolved config does not write as TOML: {e}"),
    };
    let resolved = put(dir.path(), "resolved_config.toml", toml.as_bytes());
    match resume::read_run_config(&resolved) {
        Ok(back) if back == cfg => {}
        Ok(back) => panic!("a resolved config reads back different:\n{cfg:?}\n{back:?}"),
        Err(e) => panic!("a resolved config does not read back: {e}\n{toml}"),
    }
    let _ = resume::config_hash(&cfg);
    let _ =
        peft::AdapterConfig::from_json(cfg.adapter.peft_json(), Path::new("adapter_config.json"));
}

// ---------------------------------------------------------------------------------------------
// llama2.c.

/// The smallest vocabulary a llama2.c tokenizer has (3 special and 256 byte tokens).
const LLAMA2C_MIN_VOCAB: usize = 259;
/// The largest vocabulary for which a harness makes the matching other file and converts.
const LLAMA2C_MAX_VOCAB: usize = 4096;

/// A valid llama2.c `tokenizer.bin` of `n` tokens (`n >= 259`).
fn llama2c_tokenizer_bytes(n: usize) -> Vec<u8> {
    let mut out = 16i32.to_le_bytes().to_vec();
    for id in 0..n {
        let piece = match id {
            0 => "<unk>".to_string(),
            1 => "\n<s>\n".to_string(),
            2 => "\n</s>\n".to_string(),
            3..LLAMA2C_MIN_VOCAB => format!("<0x{:02X}>", id - 3),
            _ => format!("t{id}"),
        };
        out.extend_from_slice(&(-(id as f32)).to_le_bytes());
        out.extend_from_slice(&(piece.len() as i32).to_le_bytes());
        out.extend_from_slice(piece.as_bytes());
    }
    out
}

/// A valid legacy llama2.c checkpoint with dim 2, one layer, one head, context 1 and `vocab`
/// tokens (shared classifier), all weights 0.01.
fn llama2c_checkpoint_bytes(vocab: usize) -> Vec<u8> {
    let header = [2i32, 2, 1, 1, 1, vocab as i32, 1];
    let mut out: Vec<u8> = header.iter().flat_map(|v| v.to_le_bytes()).collect();
    // embedding, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final, freq_cis_real/imag
    let floats = vocab * 2 + 2 + 4 * 4 + 2 + 3 * 4 + 2 + 2;
    for _ in 0..floats {
        out.extend_from_slice(&0.01f32.to_le_bytes());
    }
    out
}

/// A llama2.c checkpoint (`llama2c::read_checkpoint`); when it reads and its vocabulary is small,
/// the whole conversion (`llama2c::convert`) with a matching generated tokenizer.
pub fn llama2c_checkpoint(data: &[u8]) {
    budgeted("llama2c_checkpoint", data, llama2c_checkpoint_inner);
}

fn llama2c_checkpoint_inner(data: &[u8]) {
    let dir = scratch();
    let ckpt = put(dir.path(), "model.bin", data);
    let Ok(c) = llama2c::read_checkpoint(&ckpt) else {
        return;
    };
    let v = c.header.vocab_size;
    if (LLAMA2C_MIN_VOCAB..=LLAMA2C_MAX_VOCAB).contains(&v) {
        let tok = put(dir.path(), "tokenizer.bin", &llama2c_tokenizer_bytes(v));
        let _ = llama2c::convert(&ckpt, &tok, &dir.path().join("out"));
    }
}

/// A llama2.c `tokenizer.bin` (`llama2c::read_tokenizer`); when it reads and is small, the whole
/// conversion (`llama2c::convert`: vocabulary checks, merges from scores, the HF tokenizer) with
/// a matching generated checkpoint.
pub fn llama2c_tokenizer(data: &[u8]) {
    budgeted("llama2c_tokenizer", data, llama2c_tokenizer_inner);
}

fn llama2c_tokenizer_inner(data: &[u8]) {
    let dir = scratch();
    let tok = put(dir.path(), "tokenizer.bin", data);
    let Ok(tokens) = llama2c::read_tokenizer(&tok) else {
        return;
    };
    let v = tokens.len();
    if (LLAMA2C_MIN_VOCAB..=LLAMA2C_MAX_VOCAB).contains(&v) {
        let ckpt = put(dir.path(), "model.bin", &llama2c_checkpoint_bytes(v));
        let _ = llama2c::convert(&ckpt, &tok, &dir.path().join("out"));
    }
}

// ---------------------------------------------------------------------------------------------
// Run folders: checkpoints and metrics.

/// A checkpoint folder `step-7/`: `manifest.json`, `trainer_state.json` and
/// `optimizer.safetensors` (three parts). An empty manifest part is replaced by a correct
/// manifest of the other files (`run::write_manifest`), so the verification gets past the
/// digests. Then `run::verify_checkpoint` (what `--resume` runs) and `run::load_checkpoint`.
pub fn checkpoint(data: &[u8]) {
    budgeted("checkpoint", data, checkpoint_inner);
}

fn checkpoint_inner(data: &[u8]) {
    let [manifest, state, optimizer] = parts::<3>(data);
    let root = scratch();
    let dir = root.path().join("step-7");
    put(&dir, "trainer_state.json", state);
    put(&dir, "optimizer.safetensors", optimizer);
    if manifest.is_empty() {
        if run::write_manifest(&dir).is_err() {
            return;
        }
    } else {
        put(&dir, run::MANIFEST, manifest);
    }
    let _ = run::verify_checkpoint(&dir);
    let _ = run::load_checkpoint(&dir);
}

/// A run's `metrics.jsonl` (`metrics::read_metrics`, which `--resume` also runs on the
/// checkpoint's copy).
pub fn metrics(data: &[u8]) {
    budgeted("metrics", data, metrics_inner);
}

fn metrics_inner(data: &[u8]) {
    let dir = scratch();
    let path = put(dir.path(), "metrics.jsonl", data);
    let _ = reprpo_train::metrics::read_metrics(&path);
}
