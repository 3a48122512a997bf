//! `cargo xtask analyze [--adapter DIR|HUB_ID ...] [--suite NAME|FILE] [--data ...] [--out DIR]
//! [model.KEY=V] [key=value ...]`: how chosen and rejected completions differ in the hidden states,
//! layer by layer, for the base and each adapter (before / after training), with pictures.
//!
//! The model and adapters are chosen exactly as `cargo xtask eval` chooses them (see `eval.rs`:
//! run folders, PEFT folders, hub ids, `model.name_or_path=...`, and with neither the newest run
//! trained on the embedded default). The datasets are the suite's pair datasets (multiple-choice
//! ones are skipped, with a note): the first `train`-role one (else the first) gives every
//! statistic and trains the linear probe, which is then scored on each of the others (the
//! transfer test). The statistics and pictures are those of `reprpo_eval::analyze`.
//!
//! Outputs go to `--out DIR`, else `<run>/analyze/<suite>/` for one run folder, else
//! `runs/analyze/<suite>-<timestamp>/`: `summary.json`, `summary.md` and the PNGs.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use reprpo_data::PreferencePair;
use reprpo_eval::analyze::{self, AnalyzeOptions, report};
use reprpo_eval::suite::{Items, Role, Suite, load_dataset};
use reprpo_train::TrainConfig;
use serde_json::json;

use crate::eval;

/// Arguments of `analyze`.
#[derive(Args)]
#[command(after_help = eval::keys::analyze_help())]
pub struct AnalyzeArgs {
    /// A run folder, a PEFT adapter folder or a hub adapter id (repeatable; all on one base).
    #[arg(long = "adapter", value_name = "DIR|HUB_ID")]
    pub adapters: Vec<String>,
    /// A suite name from `datasets/suites/` or a suite file; default: `default`, or none with
    /// --data. Its pair datasets are analysed.
    #[arg(long)]
    pub suite: Option<String>,
    /// A dataset from a file (or a recipe name), repeatable, as for `eval`:
    /// `[NAME:]ROLE=FILE[:CONVERTER]`.
    #[arg(long = "data", value_name = "[NAME:]ROLE=FILE")]
    pub data: Vec<String>,
    /// Output folder.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Overrides of the base model (`model.name_or_path=DIR`) and of the analysis (`layers=[2,4]
    /// limit=100 probe_c=0.1`); every key is listed below.
    #[arg(value_name = "key=value")]
    pub overrides: Vec<String>,
}

/// Named pair datasets.
type Datasets = Vec<(String, Vec<PreferencePair>)>;

/// The suite's pair datasets, the first `train`-role one first; notes for what is skipped.
fn pair_datasets(
    suite: &Suite,
    root: &Path,
    limit: Option<usize>,
) -> Result<(Datasets, Vec<String>)> {
    let mut out = Vec::new();
    let mut notes = Vec::new();
    let mut train_at = None;
    for d in &suite.datasets {
        let loaded = load_dataset(d, root, limit)
            .with_context(|| format!("suite {}: dataset {}", suite.name, d.name))?;
        match loaded.items {
            Items::Pairs(p) => {
                if train_at.is_none() && d.role == Role::Train {
                    train_at = Some(out.len());
                }
                out.push((d.name.clone(), p));
            }
            Items::Mc(_) => notes.push(format!(
                "{}: multiple choice, not pairs: skipped (analyze reads chosen / rejected pairs)",
                d.name
            )),
        }
    }
    if out.is_empty() {
        bail!(
            "suite {} has no pair dataset to analyse (give --data train=FILE or a suite with \
             chosen / rejected pairs)",
            suite.name
        );
    }
    let first = out.remove(train_at.unwrap_or(0));
    out.insert(0, first);
    Ok((out, notes))
}

/// The analysis options: defaults (the run's tokenisation) under the non-model overrides.
fn options(cfg: &TrainConfig, kvs: &[String]) -> Result<AnalyzeOptions> {
    let defaults = AnalyzeOptions {
        tokenize: cfg.tokenize_config(),
        ..Default::default()
    };
    let opts: AnalyzeOptions = crate::with_overrides(defaults, None, kvs).map_err(|e| {
        anyhow::anyhow!(
            "{e:#} (the base model's keys are model.name_or_path, model.dtype, model.device, \
             model.init_std and model.init_seed; `cargo xtask analyze --help` lists the others)"
        )
    })?;
    if !(opts.probe_c > 0.0 && opts.probe_c.is_finite()) {
        bail!(
            "key `probe_c`: must be a positive number, not {}",
            opts.probe_c
        );
    }
    if opts.limit == Some(0) || opts.limit == Some(1) {
        bail!("key `limit`: the analysis needs at least 2 pairs per dataset");
    }
    Ok(opts)
}

/// Run the job.
pub fn run(a: AnalyzeArgs, root: &Path) -> Result<()> {
    let (model_kvs, kvs): (Vec<String>, Vec<String>) = a
        .overrides
        .iter()
        .cloned()
        .partition(|kv| eval::is_model_key(kv));
    let p = eval::plan(&a.adapters, root, &model_kvs)?;
    let cfg = eval::load_config(&p);
    let opts = options(&cfg, &kvs)?;
    let suite = eval::suite_with_data(a.suite.as_deref(), &a.data, root)?;
    println!(
        "base model: {} (from {})",
        p.model.name_or_path, p.base_from
    );
    for n in &p.notes {
        println!("{n}");
    }
    let (datasets, notes) = pair_datasets(&suite, root, opts.limit)?;
    for n in &notes {
        println!("{n}");
    }
    let (mut model, tok, subjects) = eval::load(&p, &cfg)?;
    let layers = analyze::resolve_layers(&opts.layers, model.num_layers())?;
    println!(
        "analysing {} on {} (probe trained on {}) at hidden states {:?}",
        subjects
            .iter()
            .map(|s| s.label.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        datasets
            .iter()
            .map(|(n, d)| format!("{n} ({} pairs)", d.len()))
            .collect::<Vec<_>>()
            .join(", "),
        datasets[0].0,
        layers
    );
    let analyses = analyze::analyze(model.as_mut(), &tok, &subjects, &datasets, &layers, &opts)?;
    let out = eval::out_dir(a.out.as_deref(), &p, root, "analyze", &suite.name);
    let header = json!({
        "model": p.model.name_or_path,
        "suite": suite.name,
        "datasets": datasets.iter().map(|(n, _)| n).collect::<Vec<_>>(),
        "subjects": subjects.iter().map(|s| &s.label).collect::<Vec<_>>(),
        "layers": layers,
        "options": opts,
    });
    let title = format!(
        "Hidden-state analysis: {} on {}",
        p.model.name_or_path, suite.name
    );
    let written = report::write(&out, &title, &header, &analyses)?;
    print!("{}", report::summary_markdown(&title, &analyses));
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
