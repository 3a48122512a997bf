//! The Rust side of tests/reference/bench_eval.py: score the first N TruthfulQA MC1 items
//! (`../shared/data`, the `truthfulqa-mc1` recipe) with a Llama from a Hugging Face folder and
//! the byte-level tokenizer, print items per second as JSON and write every choice's
//! log-probability to a JSON file for the comparison.
//!
//! `cargo run --release -p reprpo-eval --example bench_mc -- MODEL_DIR N MODE OUT.json`
//! (MODE: `prefix-cache`, `full` or `auto`; an optional sixth argument `qa-primer` puts
//! TruthfulQA's six-shot primer before every question).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device};
use reprpo_data::Tok;
use reprpo_data::tokenize::{Group, TokenizeConfig, tokenize_mc};
use reprpo_eval::scorer::{ScoreMode, ScoreOptions, score_groups};
use reprpo_eval::suite::{Items, Suite, load_dataset};
use reprpo_models::Llama;

/// The allocator of the xtask binary (bench_eval.sh also sets its purge delay as xtask does).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (model_dir, n, mode, out, format) = match args.as_slice() {
        [_, m, n, mode, out] => (m, n, mode, out, "plain"),
        [_, m, n, mode, out, f] => (m, n, mode, out, f.as_str()),
        _ => anyhow::bail!("usage: bench_mc MODEL_DIR N MODE OUT.json [plain|qa-primer]"),
    };
    let n: usize = n.parse()?;
    let mode = match mode.as_str() {
        "full" => ScoreMode::Full,
        "auto" => ScoreMode::Auto,
        "prefix-cache" => ScoreMode::PrefixCache,
        other => anyhow::bail!("unknown MODE {other}: full, auto or prefix-cache"),
    };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let suite = Suite::by_name(
        "truthfulqa",
        &root.join("datasets/suites"),
        &root.join("datasets"),
    )?;
    // The suite's first dataset is plain MC1, its fourth MC1 with the six-shot QA primer.
    let spec = match format {
        "plain" => &suite.datasets[0],
        "qa-primer" => &suite.datasets[3],
        other => anyhow::bail!("unknown format {other}: plain or qa-primer"),
    };
    anyhow::ensure!(
        spec.name.starts_with("truthfulqa-mc1"),
        "unexpected dataset {}",
        spec.name
    );
    let loaded = load_dataset(spec, &root, Some(n))?;
    let Items::Mc(items) = loaded.items else {
        anyhow::bail!("truthfulqa-mc1 is multiple choice");
    };
    let model = Llama::load(Path::new(model_dir), DType::F32, &Device::Cpu)?;
    let tok = Tok::byte_level()?;
    let cfg = TokenizeConfig {
        max_length: None,
        max_prompt_length: None,
        ..Default::default()
    };
    let t0 = Instant::now();
    let groups: Vec<Group> = tokenize_mc(&tok, &items, &cfg)?
        .into_iter()
        .flatten()
        .collect();
    let refs: Vec<&Group> = groups.iter().collect();
    let opts = ScoreOptions {
        mode,
        batch_tokens: 4096,
        pad: tok.pad,
    };
    // On candle's CPU pool, as `reprpo_eval::evaluate` (and so `cargo xtask eval`) scores.
    let lps = Device::Cpu.with_context(|| score_groups(&model, &refs, &opts, &mut |_| {}))?;
    let secs = t0.elapsed().as_secs_f64();
    let logps: Vec<Vec<f64>> = lps
        .iter()
        .map(|g| g.iter().map(|s| s.sum).collect())
        .collect();
    std::fs::write(out, serde_json::to_string(&logps)?)?;
    println!(
        "{}",
        serde_json::json!({"items": groups.len(), "seconds": secs, "items_per_s": groups.len() as f64 / secs, "mode": format!("{mode:?}"), "format": format})
    );
    Ok(())
}
