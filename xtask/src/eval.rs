//! `cargo xtask eval [--adapter RUN_DIR ...] [--suite NAME] [key=value ...]`: score the base
//! model and each run's adapter on a suite and write the table.
//!
//! A run folder is what `cargo xtask train` writes: `resolved_config.toml` (its `[model]` names
//! the base: `tiny`/`small` for the seeded random Llama with the byte-level tokenizer, or a
//! local Hugging Face folder / hub id; its `[data]` gives the tokenisation), the PEFT adapter in
//! `adapter/` (or the PEFT files at the top of the folder), and optionally `sft_adapter/`,
//! which is folded into the base first. Every run given must share the same base (model and
//! SFT stage), because one loaded model carries all adapters and the base row is that model
//! with no adapter active.
//!
//! With no `--adapter`: the newest run under `runs/` trained on the embedded default
//! (`data.datasets = ["default"]`, `model.name_or_path = "tiny"`) with an `adapter/`; if there
//! is none, the base alone (and it says so). The suite defaults to `default`.
//!
//! Outputs go to `--out DIR`, else `<run>/eval/<suite>/` for one run, else
//! `runs/eval/<suite>-<timestamp>/` (see `reprpo_eval::output` for the files).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use reprpo_eval::evaluate::{EvalOptions, Subject, evaluate};
use reprpo_eval::suite::{Suite, load_dataset};
use reprpo_models::peft;
use reprpo_train::TrainConfig;

/// Arguments of `eval`.
#[derive(Args)]
pub struct EvalArgs {
    /// A run folder (repeatable): `resolved_config.toml` + `adapter/`.
    #[arg(long = "adapter", value_name = "RUN_DIR")]
    pub adapters: Vec<PathBuf>,
    /// Suite name from `datasets/suites/`.
    #[arg(long, default_value = "default")]
    pub suite: String,
    /// Output folder.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
    /// Overrides of the evaluation options, e.g. `limit=100 beta=0.1 mc_mode=full
    /// generations=0 tokenize.max_length=1024`.
    #[arg(value_name = "key=value")]
    pub overrides: Vec<String>,
}

fn has_peft(dir: &Path) -> bool {
    dir.join("adapter_config.json").is_file() && dir.join("adapter_model.safetensors").is_file()
}

/// The PEFT folder of a run: `adapter/`, else the run folder itself.
fn adapter_dir(run: &Path) -> Result<PathBuf> {
    let sub = run.join("adapter");
    if has_peft(&sub) {
        return Ok(sub);
    }
    if has_peft(run) {
        return Ok(run.to_path_buf());
    }
    bail!(
        "{}: no PEFT adapter (adapter/adapter_config.json + adapter_model.safetensors)",
        run.display()
    )
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

/// What identifies a run's base model: the `[model]` table and the SFT adapter's bytes.
fn base_key(cfg: &TrainConfig, run: &Path) -> Result<(String, Option<Vec<u8>>)> {
    let model = toml::to_string(&cfg.model).context("serialising [model]")?;
    let sft = run.join("sft_adapter/adapter_model.safetensors");
    let bytes = if sft.is_file() {
        Some(std::fs::read(&sft).with_context(|| sft.display().to_string())?)
    } else {
        None
    };
    Ok((model, bytes))
}

/// Run the job.
pub fn run(a: EvalArgs, root: &Path) -> Result<()> {
    let mut runs = a.adapters.clone();
    let mut note = None;
    if runs.is_empty() {
        match newest_default_run(root) {
            Some(r) => runs.push(r),
            None => {
                note = Some(
                    "no run trained on the embedded default under runs/ (train one with `cargo xtask train`): scoring the base alone",
                );
            }
        }
    }
    let mut cfgs = Vec::with_capacity(runs.len());
    for r in &runs {
        let f = r.join("resolved_config.toml");
        let cfg = TrainConfig::from_toml_file(&f)
            .with_context(|| format!("run folder {}: reading {}", r.display(), f.display()))?;
        cfgs.push(cfg);
    }
    let base_cfg = match cfgs.first() {
        Some(c) => c.clone(),
        None => TrainConfig::resolve(&reprpo_train::Sources::default())?,
    };
    if let Some(first) = runs.first() {
        let key = base_key(&cfgs[0], first)?;
        for (r, c) in runs.iter().zip(&cfgs).skip(1) {
            if base_key(c, r)? != key {
                bail!(
                    "{} and {} have different base models ([model] or sft_adapter/): evaluate them separately",
                    first.display(),
                    r.display()
                );
            }
        }
    }

    let (mut model, tok, _device) = reprpo_train::trainer::load_model(&base_cfg)?;
    if let Some(first) = runs.first() {
        let sft = first.join("sft_adapter");
        if has_peft(&sft) {
            peft::bake_adapter(model.as_mut(), &sft)
                .with_context(|| format!("folding {} into the base", sft.display()))?;
        }
    }
    let mut subjects = vec![Subject {
        label: "base".into(),
        adapter: None,
    }];
    for r in &runs {
        let mut label = r
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| r.display().to_string());
        while subjects.iter().any(|s| s.label == label) {
            label.push('\'');
        }
        let dir = adapter_dir(r)?;
        let idx = peft::load_adapter(model.as_mut(), &dir, &label)
            .with_context(|| format!("loading the adapter in {}", dir.display()))?;
        subjects.push(Subject {
            label,
            adapter: Some(idx),
        });
    }

    let defaults = EvalOptions {
        tokenize: base_cfg.tokenize_config(),
        progress: !a.no_progress && std::io::IsTerminal::is_terminal(&std::io::stderr()),
        ..Default::default()
    };
    let opts: EvalOptions = crate::with_overrides(defaults, None, &a.overrides)?;
    let suite = Suite::by_name(
        &a.suite,
        &root.join("datasets/suites"),
        &root.join("datasets"),
    )?;
    let mut data = Vec::with_capacity(suite.datasets.len());
    for d in &suite.datasets {
        data.push(
            load_dataset(d, root, opts.limit)
                .with_context(|| format!("suite {}: dataset {}", suite.name, d.name))?,
        );
    }
    let report = evaluate(
        model.as_mut(),
        &tok,
        &subjects,
        &data,
        &suite.shifts,
        &suite.name,
        &opts,
    )?;
    let out = match (&a.out, runs.as_slice()) {
        (Some(o), _) => o.clone(),
        (None, [one]) => one.join("eval").join(&suite.name),
        (None, _) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            root.join("runs/eval").join(format!(
                "{}-{}",
                suite.name,
                reprpo_train::run::timestamp(now)
            ))
        }
    };
    let written = reprpo_eval::output::write_report(&out, &report)?;
    if let Some(n) = note {
        println!("{n}");
    }
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
    Ok(())
}
