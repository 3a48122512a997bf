//! The reprpo command line: `cargo xtask train | eval | data | bench | doctor | sweep`.
//!
//! A thin layer over the library crates: it parses arguments, resolves paths against the workspace
//! root, and prints results. `key=value` overrides are merged over the defaults (and over a config
//! file where one is given) with figment, so an unknown or mistyped key is an error that names it.

mod analyze;
mod bench;
mod doctor;
mod eval;
mod sweep;
mod train;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use figment::Figment;
use figment::providers::{Format as _, Serialized, Toml};
use reprpo_data::recipe::{self, Recipe};
use reprpo_data::tokenize::TokenizeConfig;
use reprpo_data::{ConvertOptions, Converted, Converter, Tok, default_data, hub, stats, write};

/// mimalloc: tokenisation is dominated by small allocations inside `tokenizers`, where glibc's
/// malloc costs about half the time (perf); see docs/perf.md.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay`. The sys crate exports no constant for it; mimalloc's header
/// (v2 and v3 alike) declares it directly before `mi_option_use_numa_nodes`. A test checks that
/// the option this names reads mimalloc v3's default purge delay (1000 ms).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t =
    libmimalloc_sys::mi_option_use_numa_nodes - 1;

/// Tells mimalloc to keep freed memory for reuse instead of returning it to the OS
/// after its purge delay (-1: never), unless the user set `MIMALLOC_PURGE_DELAY` (or its old name
/// `MIMALLOC_RESET_DELAY`). A training or scoring step frees and reallocates the same
/// vocabulary-sized buffers every step; returned to the OS, each comes back as fresh pages the
/// kernel must zero (24444 page faults against 1286 over 12 `bench step` steps of the `small`
/// shape, docs/perf.md). The process does not shrink between steps, and the memory it keeps
/// counts in its peak RSS (`small` model step: 789 -> 845 MiB, docs/perf.md).
#[allow(unsafe_code)]
fn keep_freed_memory() {
    if purge_delay_set_by_user() {
        return;
    }
    // SAFETY: `mi_option_set` stores an integer in mimalloc's option table for a valid option
    // index (checked by a test, and mimalloc ignores out-of-range indices); it takes no pointers
    // and may be called at any time.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

/// Whether the environment sets mimalloc's purge delay (new or old name).
fn purge_delay_set_by_user() -> bool {
    std::env::var_os("MIMALLOC_PURGE_DELAY").is_some()
        || std::env::var_os("MIMALLOC_RESET_DELAY").is_some()
}

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "reprpo: preference fine-tuning with ReprPO and the DPO family"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train an adapter (embedded default without arguments).
    Train(train::TrainArgs),
    /// Evaluate base and adapters on the eval suite (embedded default without arguments).
    Eval(eval::EvalArgs),
    /// Convert, binarise, inspect and generate data.
    #[command(subcommand)]
    Data(DataCmd),
    /// Side-by-side measurements (see docs/perf.md).
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// Convert other model formats into a Hugging Face folder.
    #[command(subcommand)]
    Convert(ConvertCmd),
    /// Self-check: every computation of a training / eval step on the device against the CPU
    /// (on the CPU: the fused kernels against the written-out ops). Exits 1 on any failure.
    Doctor(doctor::DoctorArgs),
    /// Hidden-state analysis: how chosen and rejected differ, layer by layer, base against
    /// adapters (pictures, probe, principal directions).
    Analyze(analyze::AnalyzeArgs),
    /// Seeded sweeps: plan, run (locally or as a Slurm array), report with confidence intervals.
    #[command(subcommand)]
    Sweep(sweep::SweepCmd),
}

#[derive(Subcommand)]
enum ConvertCmd {
    /// A llama2.c checkpoint and tokenizer (e.g. stories260K) into config.json,
    /// model.safetensors and tokenizer.json.
    Llama2c {
        /// The llama2.c checkpoint (`.bin`, version 0 format).
        #[arg(long)]
        checkpoint: PathBuf,
        /// The llama2.c tokenizer (`tokenizer.bin` / `tok512.bin`).
        #[arg(long)]
        tokenizer: PathBuf,
        /// Output folder (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
}

/// Where the rows come from: named recipes, or one file with a converter.
#[derive(Args, Clone)]
struct InputArgs {
    /// Recipe names from `datasets/*.toml` or data files (`FILE[:CONVERTER]`), comma-separated
    /// (e.g. `hh,shp`, `pairs.jsonl`).
    #[arg(long, value_delimiter = ',', conflicts_with = "input")]
    recipe: Vec<String>,
    /// An input file (.jsonl, .json, .csv, .parquet, optionally .gz).
    #[arg(long)]
    input: Option<PathBuf>,
    /// The converter for `--input` (see `Converter::NAMES`; `auto` infers it from the columns).
    #[arg(long, default_value = "auto")]
    converter: String,
    /// Seed for converters that draw at random and for mixing recipes.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

#[derive(Subcommand)]
enum DataCmd {
    /// Convert / binarise into our JSONL or Parquet format (written atomically).
    Prepare {
        #[command(flatten)]
        input: InputArgs,
        /// Output file for the pairs (.jsonl or .parquet).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Output file for the multiple-choice items (.jsonl or .parquet).
        #[arg(long)]
        out_mc: Option<PathBuf>,
    },
    /// Token-length distribution per field and how many rows the limits truncate.
    Stats {
        #[command(flatten)]
        input: InputArgs,
        /// Tokenizer folder (tokenizer.json [+ tokenizer_config.json]); default: the built-in byte-level one.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Tokenisation overrides, e.g. `tokenization=trl-current max_length=1024`.
        #[arg(value_name = "key=value")]
        overrides: Vec<String>,
    },
    /// Regenerate the embedded default data in `crates/reprpo-data/embedded/`.
    GenDefault {
        /// Seed (the committed files use the default).
        #[arg(long, default_value_t = default_data::DEFAULT_SEED)]
        seed: u64,
    },
}

/// The workspace root: `REPRPO_ROOT`, else the folder this binary was built from.
fn root() -> PathBuf {
    std::env::var_os("REPRPO_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
}

/// Merge `key=value` overrides (values parsed as TOML, else taken as strings) over `base`.
fn with_overrides<T>(base: T, file: Option<&Path>, overrides: &[String]) -> Result<T>
where
    T: serde::Serialize + serde::de::DeserializeOwned,
{
    let mut fig = Figment::from(Serialized::defaults(base));
    if let Some(f) = file {
        reprpo_train::config::check_toml_file(f)?;
        fig = fig.merge(Toml::file_exact(f));
    }
    for kv in overrides {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("argument `{kv}`: expected key=value"))?;
        if k.trim().is_empty() {
            bail!(
                "argument `{kv}`: the key before `=` is empty; expected key=value, e.g. max_length=512"
            );
        }
        if k.split('.').any(|part| part.trim().is_empty()) {
            bail!(
                "argument `{kv}`: key `{}` has an empty part; keys are dotted names",
                k.trim()
            );
        }
        let value: toml::Value = format!("x = {v}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("x"))
            .unwrap_or_else(|| toml::Value::String(v.to_string()));
        fig = fig.merge(Serialized::global(k.trim(), value));
    }
    fig.extract().map_err(|e| {
        let msgs: Vec<String> = e
            .into_iter()
            .map(|e| {
                let key = match &e.kind {
                    figment::error::Kind::UnknownField(k, _) => k.clone(),
                    _ => e.path.join("."),
                };
                let from = match e.metadata.as_ref().and_then(|m| m.source.as_ref()) {
                    Some(figment::Source::File(p)) => format!(" (in {})", p.display()),
                    _ => String::new(),
                };
                if key.is_empty() {
                    format!("the whole configuration: {}{from}", e.kind)
                } else {
                    format!("config key `{key}`: {}{from}", e.kind)
                }
            })
            .collect();
        anyhow::anyhow!("invalid configuration: {}", msgs.join("; "))
    })
}

fn load_input(input: &InputArgs) -> Result<Converted> {
    let root = root();
    if !input.recipe.is_empty() {
        let recipes: Vec<Recipe> = recipe::resolve(&input.recipe, &root.join("datasets"))?;
        return Ok(recipe::load_mixture_seeded(
            &recipes,
            &root,
            &hub::dataset_files,
            input.seed,
        )?);
    }
    let Some(path) = &input.input else {
        bail!("give --recipe NAME[,NAME...] or --input FILE [--converter NAME]");
    };
    let converter: Converter = input.converter.parse()?;
    let table = reprpo_data::read_table(path)?;
    let dataset = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(reprpo_data::convert(
        converter,
        &table,
        &ConvertOptions {
            dataset,
            seed: input.seed,
        },
    )?)
}

fn print_stats(s: &stats::PairStats) {
    println!(
        "{:<10} {:>6} {:>9} {:>9} {:>6} {:>8} {:>8} {:>8} {:>6}",
        "field", "count", "mean", "std", "min", "q1", "median", "q3", "max"
    );
    for (name, v) in [
        ("prompt", &s.prompt),
        ("chosen", &s.chosen),
        ("rejected", &s.rejected),
        ("longest", &s.total),
    ] {
        println!(
            "{:<10} {:>6} {:>9.1} {:>9.1} {:>6} {:>8.1} {:>8.1} {:>8.1} {:>6}",
            name, v.count, v.mean, v.std, v.min, v.q1, v.median, v.q3, v.max
        );
    }
    println!(
        "rows truncated by the limits: {}; rows dropped (prompt fills max_length): {}",
        s.truncated, s.dropped
    );
}

fn tokenizer(dir: Option<&Path>) -> Result<Tok> {
    Ok(match dir {
        Some(d) => Tok::from_dir(d)?,
        None => Tok::byte_level()?,
    })
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Train(a) => train::run(a, &root()),
        Cmd::Eval(a) => eval::run(a, &root()),
        Cmd::Analyze(a) => analyze::run(a, &root()),
        Cmd::Doctor(a) => doctor::run(a),
        Cmd::Sweep(c) => sweep::run(c, &root()),
        Cmd::Data(DataCmd::Prepare { input, out, out_mc }) => {
            if out.is_none() && out_mc.is_none() {
                bail!("give --out FILE (pairs) and/or --out-mc FILE (multiple-choice items)");
            }
            let c = load_input(&input)?;
            if let Some(out) = &out {
                if c.pairs.is_empty() {
                    bail!(
                        "the input gives no preference pairs (use --out-mc for multiple-choice sources)"
                    );
                }
                write::write_pairs(out, &c.pairs)?;
                println!("wrote {} pairs to {}", c.pairs.len(), out.display());
            }
            if let Some(out) = &out_mc {
                if c.mc.is_empty() {
                    bail!("the input gives no multiple-choice items");
                }
                write::write_mc(out, &c.mc)?;
                println!(
                    "wrote {} multiple-choice items to {}",
                    c.mc.len(),
                    out.display()
                );
            }
            if c.skipped > 0 {
                println!(
                    "skipped {} groups (e.g. HelpSteer prompts whose responses all tie)",
                    c.skipped
                );
            }
            Ok(())
        }
        Cmd::Data(DataCmd::Stats {
            input,
            tokenizer: tok_dir,
            json,
            overrides,
        }) => {
            let cfg: TokenizeConfig = with_overrides(TokenizeConfig::default(), None, &overrides)?;
            let c = load_input(&input)?;
            let mut pairs = c.pairs;
            if pairs.is_empty() {
                pairs = c.mc.iter().flat_map(|m| m.to_pairs()).collect();
            }
            if pairs.is_empty() {
                let source = match &input.input {
                    Some(p) => p.display().to_string(),
                    None => format!("recipe {}", input.recipe.join(",")),
                };
                bail!(
                    "{source}: no preference pairs or multiple-choice items; nothing to summarise"
                );
            }
            let tok = tokenizer(tok_dir.as_deref())?;
            let s = stats::pair_stats(&tok, &pairs, &cfg)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!(
                    "{} pairs; tokenization = {:?}, max_length = {:?}, max_prompt_length = {:?}",
                    pairs.len(),
                    cfg.tokenization,
                    cfg.max_length,
                    cfg.max_prompt_length
                );
                print_stats(&s);
            }
            Ok(())
        }
        Cmd::Data(DataCmd::GenDefault { seed }) => {
            let dir = root().join("crates/reprpo-data/embedded");
            default_data::write_all(&dir, seed)?;
            println!("wrote {}", dir.display());
            Ok(())
        }
        Cmd::Convert(ConvertCmd::Llama2c {
            checkpoint,
            tokenizer,
            out,
        }) => {
            let report = reprpo_models::llama2c::convert(&checkpoint, &tokenizer, &out)?;
            println!("{report}");
            Ok(())
        }
        Cmd::Bench(c) => bench::run(c),
    }
}

/// A closed stdout (`cargo xtask ... | head`) ends the process quietly with the status a shell
/// reports for SIGPIPE (128 + 13), as other command-line tools end, where Rust's `println!` would
/// panic; every other panic goes to the default hook.
fn quiet_broken_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if payload.starts_with("failed printing to stdout") && payload.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}

fn main() {
    keep_freed_memory();
    quiet_broken_pipe();
    let cli = Cli::parse();
    // Every job runs on a thread of candle's CPU pool (`Device::with_context`): the parallel parts
    // of each op (GEMM, the fused row ops, candle's elementwise ops through the vendored patch)
    // then share that pool's threads by work stealing, where the main thread would hand each of
    // them to sleeping workers and wait (futex round trips), and candle's spinning barrier pool
    // would compete with rayon for the cores. A tiny LoRA step: 72 -> 47 ms on 2 cores
    // (docs/perf.md). Harmless for CUDA runs: only CPU work uses the pool.
    let res = candle_core::Device::Cpu.with_context(|| run(cli));
    if let Err(e) = res {
        if e.downcast_ref::<train::Interrupted>().is_some() {
            std::process::exit(130);
        }
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(unsafe_code)]
    fn purge_delay_option_index_names_the_purge_delay() {
        if purge_delay_set_by_user() {
            eprintln!("skipped: MIMALLOC_PURGE_DELAY / MIMALLOC_RESET_DELAY is set");
            return;
        }
        // SAFETY: `mi_option_get` reads an integer from mimalloc's option table.
        let get = |o| unsafe { libmimalloc_sys::mi_option_get(o) };
        // mimalloc v3's default purge delay is 1000 ms (options.c); its neighbours default to
        // 1 (the deprecated eager-commit delay) and 0 (use_numa_nodes), so 1000 pins the index.
        assert_eq!(get(MI_OPTION_PURGE_DELAY), 1000);
        assert_ne!(get(MI_OPTION_PURGE_DELAY + 1), 1000);
        keep_freed_memory();
        assert_eq!(get(MI_OPTION_PURGE_DELAY), -1);
        // SAFETY: as above; restores the default for other tests in this process.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 1000) };
    }
}
