//! `cargo xtask eval [--adapter DIR|HUB_ID ...] [--suite NAME|FILE] [model.KEY=V] [key=value ...]`:
//! score the base model and each adapter on a suite and write the table.
//!
//! An `--adapter` is a run folder (what `cargo xtask train` writes: `resolved_config.toml`, whose
//! `[model]` names the base and whose `[data]` gives the tokenisation, `adapter/` and optionally
//! `sft_adapter/`, folded into the base first), a plain PEFT folder (`adapter_config.json` +
//! `adapter_model.safetensors`, the base from its `base_model_name_or_path`), or a hub adapter id
//! (see `eval/source.rs`, also for how relative paths resolve). Every adapter given must share
//! the same base (model and SFT stage), because one loaded model carries all adapters and the
//! base row is that model with no adapter active; an error names two that differ.
//! `model.name_or_path=...` (and every other `[model]` key: `model.dtype`, `model.device`, ...)
//! overrides the base; with no adapter it scores that model alone.
//!
//! With neither an adapter nor `model.name_or_path`: the newest run under `runs/` trained on the
//! embedded default (`data.datasets = ["default"]`, `model.name_or_path = "tiny"`) with an
//! `adapter/`; if there is none, the random `tiny` base alone. Both are said before scoring.
//!
//! `--suite` is a suite name (`datasets/suites/<name>.toml`) or a suite file (a path ending in
//! `.toml` or containing `/`, relative to the working directory). It defaults to `default`, or,
//! with `--data`, to none: `--data [NAME:]ROLE=FILE[:CONVERTER]` (repeatable; ROLE is train, test,
//! ood or unrelated; FILE relative to the working directory, or a recipe name) adds a dataset
//! to the suite, or makes an ad-hoc suite `data` of them alone.
//!
//! Long items are cut as lm-evaluation-harness cuts them (`truncation = "context"`: the last
//! `max_length + 1` tokens of each choice's context + continuation), `max_length` defaulting to
//! the model's `max_position_embeddings` (2048, lm-eval's fallback, when `config.json` has
//! none); `truncation=training` applies the run's training limits (`tokenize.*`) instead. The
//! table's header says how many items were cut. `--help` lists every key with its default
//! (`eval/keys.rs`).
//!
//! Outputs go to `--out DIR`, else `<run>/eval/<suite>/` for one run folder, else
//! `runs/eval/<suite>-<timestamp>/` (see `reprpo_eval::output` for the files).

pub(crate) mod keys;
mod source;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use reprpo_data::Tok;
use reprpo_eval::evaluate::{EvalOptions, EvalTruncation, Subject, evaluate};
use reprpo_eval::suite::{DatasetSpec, Suite, load_dataset};
use reprpo_models::{LlamaConfig, hub, peft};
use reprpo_train::TrainConfig;
use reprpo_train::config::ModelConfig;
use reprpo_train::trainer::TrainModel;
use serde::{Deserialize, Serialize};
use source::{Source, cwd, has_peft};

/// Arguments of `eval`.
#[derive(Args)]
#[command(after_help = keys::help())]
pub struct EvalArgs {
    /// A run folder, a PEFT adapter folder or a hub adapter id (repeatable; all on one base).
    #[arg(long = "adapter", value_name = "DIR|HUB_ID")]
    pub adapters: Vec<String>,
    /// A suite name from `datasets/suites/`, or a suite file (`my_suite.toml`, `dir/suite.toml`);
    /// default: `default`, or none with --data.
    #[arg(long)]
    pub suite: Option<String>,
    /// A dataset from a file (or a recipe name), repeatable: `ROLE=FILE[:CONVERTER]` or
    /// `NAME:ROLE=FILE[:CONVERTER]` (ROLE: train, test, ood, unrelated; converter `auto` infers
    /// pairs / mc / chat / hh-rlhf from the columns; FILE relative to the working directory).
    #[arg(long = "data", value_name = "[NAME:]ROLE=FILE")]
    pub data: Vec<String>,
    /// Output folder.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
    /// Overrides of the base model (`model.name_or_path=DIR|HUB_ID model.dtype=bf16
    /// model.device=cuda:0`) and of the evaluation options (`limit=100 beta=0.1 mc_mode=full
    /// generations=0 max_length=1024 truncation=training`); every key is listed below.
    #[arg(value_name = "key=value")]
    pub overrides: Vec<String>,
}

/// The `[model]` keys on their own, so `model.*` overrides are checked against `ModelConfig`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelKeys {
    model: ModelConfig,
}

/// What will be scored: the adapters, the base and how it was chosen.
pub(crate) struct Plan {
    pub(crate) sources: Vec<Source>,
    pub(crate) model: ModelConfig,
    /// Where the base comes from, for the first line of output.
    pub(crate) base_from: String,
    pub(crate) notes: Vec<String>,
}

/// Whether an override sets a `[model]` key.
pub(crate) fn is_model_key(kv: &str) -> bool {
    let key = kv.split_once('=').map_or(kv, |(k, _)| k).trim();
    key == "model" || key.starts_with("model.")
}

/// Whether the overrides set `model.name_or_path`.
fn names_model(model_kvs: &[String]) -> bool {
    model_kvs.iter().any(|kv| {
        kv.split_once('=')
            .is_some_and(|(k, _)| k.trim() == "model.name_or_path")
    })
}

/// The newest run under `runs/` trained on the embedded default with the tiny model.
fn newest_default_run(root: &Path) -> Option<PathBuf> {
    let dir = root.join("runs");
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    for e in std::fs::read_dir(&dir).ok()?.flatten() {
        let p = e.path();
        let Ok(cfg) = TrainConfig::from_toml_file(&p.join("resolved_config.toml")) else {
            continue;
        };
        if cfg.data.datasets != ["default"]
            || cfg.model.name_or_path != "tiny"
            || !has_peft(&p.join("adapter"))
        {
            continue;
        }
        let t = std::fs::metadata(p.join("adapter/adapter_model.safetensors"))
            .and_then(|m| m.modified())
            .unwrap_or(std::time::UNIX_EPOCH);
        if best.as_ref().is_none_or(|(b, _)| t > *b) {
            best = Some((t, p));
        }
    }
    best.map(|(_, p)| p)
}

/// With neither `--adapter` nor `model.name_or_path`: the newest default run, else nothing (the
/// random `tiny` base alone); either way a note says so.
fn default_sources(root: &Path, notes: &mut Vec<String>) -> Result<Vec<Source>> {
    match newest_default_run(root) {
        Some(r) => {
            notes.push(format!(
                "no --adapter and no model.name_or_path: evaluating the newest run trained on \
                 the embedded default, {}",
                r.display()
            ));
            Ok(vec![source::open(&r.display().to_string())?])
        }
        None => {
            notes.push(
                "no --adapter, no model.name_or_path and no run trained on the embedded default \
                 under runs/: scoring the random `tiny` base alone, a smoke test rather than a \
                 measurement (give --adapter DIR or model.name_or_path=DIR, or train one with \
                 `cargo xtask train`)"
                    .into(),
            );
            Ok(Vec::new())
        }
    }
}

/// Every adapter must share the SFT stage and, unless `model.name_or_path` overrides it, the base
/// model; the error names the two that differ and their bases.
fn check_same_base(sources: &[Source], overridden: bool) -> Result<()> {
    let Some(first) = sources.first() else {
        return Ok(());
    };
    let sft = source::sft_bytes(first)?;
    for s in &sources[1..] {
        if source::sft_bytes(s)? != sft {
            bail!(
                "{} and {} have different SFT stages (sft_adapter/, part of a run's base): \
                 evaluate them separately",
                first.dir.display(),
                s.dir.display()
            );
        }
    }
    if overridden {
        return Ok(());
    }
    let named: Vec<&Source> = sources.iter().filter(|s| s.base.is_some()).collect();
    for pair in named.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        let (ba, bb) = (a.base.as_ref(), b.base.as_ref());
        let (Some(ba), Some(bb)) = (ba, bb) else {
            continue;
        };
        if source::identity(&ba.model) != source::identity(&bb.model) {
            bail!(
                "{} (base {}, from {}) and {} (base {}, from {}) have different base models: \
                 evaluate them separately, or give model.name_or_path=... to score both on one base",
                a.dir.display(),
                source::identity(&ba.model),
                ba.from,
                b.dir.display(),
                source::identity(&bb.model),
                bb.from
            );
        }
    }
    Ok(())
}

/// The base model: the adapters' own (or `tiny`), then the `model.*` overrides.
fn base_model(sources: &[Source], model_kvs: &[String]) -> Result<(ModelConfig, String)> {
    let named = sources.iter().find_map(|s| s.base.as_ref());
    let (model, mut from) = match named {
        Some(b) => (b.model.clone(), b.from.clone()),
        None => (TrainConfig::default().model, "the default".to_string()),
    };
    if names_model(model_kvs) {
        from = format!(
            "model.name_or_path (relative to the working directory {})",
            cwd()
        );
    } else if let Some(s) = sources.iter().find(|s| s.base.is_none())
        && named.is_none()
    {
        bail!(
            "--adapter {}: {} has no base_model_name_or_path and no resolved_config.toml \
             is there: give the base model with model.name_or_path=DIR_OR_HUB_ID",
            s.arg,
            s.dir.join("adapter_config.json").display()
        );
    }
    let keys = crate::with_overrides(ModelKeys { model }, None, model_kvs)
        .with_context(|| format!("the base model's keys ({})", model_kvs.join(" ")))?;
    let mut model = keys.model;
    // `load_model` reads any other dtype as f32: the `[model]` checks alone (the full
    // `validate` also checks training keys).
    model.validate()?;
    if names_model(model_kvs) {
        model.name_or_path = source::resolve_cli(&model.name_or_path);
    }
    Ok((model, from))
}

/// Adapters (`--adapter` arguments), base and notes.
pub(crate) fn plan(adapters: &[String], root: &Path, model_kvs: &[String]) -> Result<Plan> {
    let mut notes = Vec::new();
    let mut sources = Vec::with_capacity(adapters.len());
    for arg in adapters {
        sources.push(source::open(arg)?);
    }
    let overridden = names_model(model_kvs);
    if sources.is_empty() && !overridden {
        sources = default_sources(root, &mut notes)?;
    }
    check_same_base(&sources, overridden)?;
    let (model, base_from) = base_model(&sources, model_kvs)?;
    for s in &sources {
        let Some(b) = &s.base else { continue };
        if !overridden {
            notes.extend(b.note.clone());
        } else if source::identity(&b.model) != source::identity(&model) {
            notes.push(format!(
                "model.name_or_path replaces the base {} names ({}, from {})",
                s.arg, b.model.name_or_path, b.from
            ));
        }
    }
    Ok(Plan {
        sources,
        model,
        base_from,
        notes,
    })
}

/// The run configuration the model is loaded from: the first run's (its `[data]` gives the
/// tokenisation), else the defaults, with the chosen `[model]`.
pub(crate) fn load_config(p: &Plan) -> TrainConfig {
    let mut cfg = p
        .sources
        .iter()
        .find_map(|s| s.run.clone())
        .unwrap_or_default();
    cfg.model = p.model.clone();
    cfg
}

/// Load the base (with the SFT stage folded in) and every adapter; the subjects to score.
pub(crate) fn load(
    p: &Plan,
    cfg: &TrainConfig,
) -> Result<(Box<dyn TrainModel>, Tok, Vec<Subject>)> {
    let (mut model, tok, _device) = reprpo_train::trainer::load_model(cfg)
        .with_context(|| format!("loading the base model (from {})", p.base_from))?;
    if let Some(sft) = p.sources.first().and_then(|s| s.sft.as_ref()) {
        peft::bake_adapter(model.as_mut(), sft)
            .with_context(|| format!("folding {} into the base", sft.display()))?;
    }
    let mut subjects = vec![Subject {
        label: "base".into(),
        adapter: None,
    }];
    for s in &p.sources {
        let mut label = s.label.clone();
        while subjects.iter().any(|x| x.label == label) {
            label.push('\'');
        }
        let idx = peft::load_adapter(model.as_mut(), &s.peft, &label)
            .with_context(|| format!("loading the adapter in {}", s.peft.display()))?;
        subjects.push(Subject {
            label,
            adapter: Some(idx),
        });
    }
    Ok((model, tok, subjects))
}

/// The suite to score: `--suite` (or `default` without `--data`) with the `--data` datasets
/// added, or those alone.
pub(crate) fn suite_with_data(suite: Option<&str>, data: &[String], root: &Path) -> Result<Suite> {
    let cwd = std::env::current_dir().context("the working directory")?;
    let datasets = root.join("datasets");
    let mut extra = Vec::with_capacity(data.len());
    for d in data {
        extra.push(DatasetSpec::from_arg(d, &cwd, &datasets)?);
    }
    let mut suite = match (suite, extra.is_empty()) {
        (None, false) => return Ok(Suite::adhoc(extra)?),
        (Some(s), _) => load_suite(s, root)?,
        (None, true) => load_suite("default", root)?,
    };
    for d in extra {
        suite.add(d)?;
    }
    Ok(suite)
}

/// `--suite`: a path (ends in `.toml` or has a `/`; relative to the working directory) or a name.
fn load_suite(arg: &str, root: &Path) -> Result<Suite> {
    let suites = root.join("datasets/suites");
    let datasets = root.join("datasets");
    let is_path = arg.ends_with(".toml") || arg.contains('/') || arg.contains('\\');
    if !is_path {
        return Ok(Suite::by_name(arg, &suites, &datasets)?);
    }
    let file = Path::new(arg);
    if file.is_file() {
        return Ok(Suite::load(file, &datasets)?);
    }
    let stem = file.file_stem().map(|s| s.to_string_lossy().into_owned());
    let hint = match stem {
        Some(n) if suites.join(format!("{n}.toml")).is_file() => {
            format!(
                "; the suite named `{n}` is {}: give --suite {n}",
                suites.join(format!("{n}.toml")).display()
            )
        }
        _ => String::new(),
    };
    bail!(
        "--suite {arg}: no such file (a suite given as a path is relative to the working \
         directory {}){hint}",
        cwd()
    )
}

/// Where the outputs of `job` (`eval`, `analyze`) go: `--out`, else the one run folder's
/// `<job>/<suite>/`, else `runs/<job>/<suite>-<timestamp>/`.
pub(crate) fn out_dir(
    out: Option<&Path>,
    p: &Plan,
    root: &Path,
    job: &str,
    suite: &str,
) -> PathBuf {
    if let Some(o) = out {
        return o.to_path_buf();
    }
    if let [one] = p.sources.as_slice()
        && one.run.is_some()
    {
        return one.dir.join(job).join(suite);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    root.join("runs")
        .join(job)
        .join(format!("{suite}-{}", reprpo_train::run::timestamp(now)))
}

/// The evaluation options: defaults (the run's tokenisation) under the non-model overrides.
fn eval_options(a: &EvalArgs, cfg: &TrainConfig, kvs: &[String]) -> Result<EvalOptions> {
    let defaults = EvalOptions {
        tokenize: cfg.tokenize_config(),
        progress: !a.no_progress && std::io::IsTerminal::is_terminal(&std::io::stderr()),
        ..Default::default()
    };
    crate::with_overrides(defaults, None, kvs).map_err(|e| {
        anyhow::anyhow!(
            "{e:#} (the base model's keys are model.name_or_path, model.dtype, model.device, \
             model.init_std and model.init_seed)"
        )
    })
}

/// The model's context in tokens (lm-evaluation-harness' `max_length` for a Hugging Face model):
/// `max_position_embeddings` of the preset or of `config.json`, else 2048 (lm-eval's default),
/// and where it came from.
fn context_length(model: &ModelConfig) -> Result<(usize, String)> {
    if let Some(c) = LlamaConfig::preset(&model.name_or_path) {
        let from = format!(
            "the `{}` preset's max_position_embeddings",
            model.name_or_path
        );
        return Ok((c.max_position_embeddings, from));
    }
    let file = hub::model_dir(&model.name_or_path)?.join("config.json");
    let text = std::fs::read_to_string(&file).with_context(|| file.display().to_string())?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| file.display().to_string())?;
    let n = v.get("max_position_embeddings").and_then(|x| x.as_u64());
    Ok(
        match n.and_then(|n| usize::try_from(n).ok()).filter(|&n| n > 0) {
            Some(n) => (n, format!("max_position_embeddings of {}", file.display())),
            None => (
                2048,
                format!(
                    "{} has no max_position_embeddings: lm-evaluation-harness' default",
                    file.display()
                ),
            ),
        },
    )
}

/// `max_length`, unless given, is the model's context (with `truncation = "context"`); says so.
fn fill_max_length(opts: &mut EvalOptions, model: &ModelConfig) -> Result<()> {
    if opts.truncation != EvalTruncation::Context || opts.max_length.is_some() {
        return Ok(());
    }
    let (n, from) = context_length(model)?;
    opts.max_length = Some(n);
    println!("max_length = {n} ({from}); give max_length=N to change it");
    Ok(())
}

/// Run the job.
pub fn run(a: EvalArgs, root: &Path) -> Result<()> {
    let (model_kvs, eval_kvs): (Vec<String>, Vec<String>) =
        a.overrides.iter().cloned().partition(|kv| is_model_key(kv));
    let p = plan(&a.adapters, root, &model_kvs)?;
    let cfg = load_config(&p);
    let mut opts = eval_options(&a, &cfg, &eval_kvs)?;
    let suite = suite_with_data(a.suite.as_deref(), &a.data, root)?;
    println!(
        "base model: {} (from {})",
        p.model.name_or_path, p.base_from
    );
    for n in &p.notes {
        println!("{n}");
    }
    let mut data = Vec::with_capacity(suite.datasets.len());
    for d in &suite.datasets {
        data.push(
            load_dataset(d, root, opts.limit)
                .with_context(|| format!("suite {}: dataset {}", suite.name, d.name))?,
        );
    }
    let (mut model, tok, subjects) = load(&p, &cfg)?;
    fill_max_length(&mut opts, &p.model)?;
    let report = evaluate(
        model.as_mut(),
        &tok,
        &subjects,
        &data,
        &suite.shifts,
        &suite.name,
        &opts,
    )?;
    let out = out_dir(a.out.as_deref(), &p, root, "eval", &suite.name);
    let written = reprpo_eval::output::write_report(&out, &report)?;
    print_report(&report, &out, &written);
    Ok(())
}

/// The table and the files written.
fn print_report(report: &reprpo_eval::Report, out: &Path, written: &[PathBuf]) {
    for (d, n) in &report.dropped {
        println!("{d}: {n} items dropped by tokenisation (drop_too_long)");
    }
    print!("{}", report.table.to_terminal());
    println!("\nwritten to {}:", out.display());
    for w in written {
        println!(
            "  {}",
            w.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default()
        );
    }
}
