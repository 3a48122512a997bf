//! `cargo xtask train [CONFIG.toml] [key=value ...] [--resume RUN_DIR]`: the training job.
//!
//! With no arguments it trains the embedded default (the tiny model and the project's own data,
//! with a short cached SFT stage first, then ReprPO with LoRA) and prints the held-out preference
//! accuracy of the trained adapter against the base, in distribution and on the shifted split.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use clap::Args;
use reprpo_train::{JobContext, Sources, TrainConfig};

/// A run stopped by Ctrl-C after saving its checkpoint: `main` exits with 130 (128 + SIGINT),
/// as a shell does for a command killed by SIGINT. SIGTERM and SIGHUP (a batch scheduler's
/// time limit, a closed terminal) stop it the same way, with the same status: the handler cannot
/// tell them apart.
#[derive(Debug)]
pub struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted by Ctrl-C (checkpoint saved)")
    }
}

impl std::error::Error for Interrupted {}

/// Arguments of `train`. `--help` ends with every configuration key, its default and its doc
/// line, generated from the config structs (`reprpo_train::config::keys_help`).
#[derive(Args)]
#[command(after_long_help = reprpo_train::config::keys_help())]
pub struct TrainArgs {
    /// A TOML config file and/or `key=value` overrides (e.g. `loss=dpo train.lr=1e-4`).
    #[arg(value_name = "CONFIG | key=value")]
    pub args: Vec<String>,
    /// Continue the run in this folder from its newest intact checkpoint (or from the checkpoint
    /// `RUN_DIR/checkpoints/step-N`); key=value arguments may then change only the length, the
    /// logging, checkpoint and evaluation cadence and `run.tensorboard` (see
    /// `reprpo_train::resume`).
    #[arg(long, value_name = "RUN_DIR")]
    pub resume: Option<PathBuf>,
    /// Print the resolved configuration and exit.
    #[arg(long)]
    pub print_config: bool,
    /// List every `loss` preset (the DPO and ReprPO families, and the reference ReprPO project's
    /// experiment names with the `[method]` keys each sets, its gradient interventions with
    /// theirs) and exit.
    #[arg(long)]
    pub list_presets: bool,
    /// No progress bar (log lines only).
    #[arg(long)]
    pub no_progress: bool,
}

/// The text of `--list-presets`.
pub fn presets_text() -> String {
    let method: Vec<(String, serde_json::Value)> = reprpo_train::method::presets();
    let mut out = String::from("Loss presets (`loss=NAME`):\n\n");
    let names = reprpo_train::config::loss_names();
    // 0: SFT, 1: this project's ReprPO family, 2: the DPO family; method and gradient
    // intervention presets are listed below.
    let family = |n: &str| -> Option<usize> {
        if n == "sft" {
            Some(0)
        } else if n.starts_with("reprpo") {
            Some(1)
        } else if method.iter().any(|(m, _)| m == n) || reprpo_train::gradproj::preset(n).is_some()
        {
            None
        } else {
            Some(2)
        }
    };
    let titles = [
        "SFT",
        "ReprPO family (this project's reroute/retain losses, `[reprpo]`)",
        "DPO family (TRL's loss types, `[dpo]`)",
    ];
    for (i, title) in titles.iter().enumerate() {
        out.push_str(&format!("{title}:\n"));
        for n in names.iter().filter(|n| family(n) == Some(i)) {
            out.push_str(&format!("  {n}\n"));
        }
        out.push('\n');
    }
    out.push_str(
        "Methods of the reference ReprPO project (its experiments.py names; `[method]`):\n",
    );
    for (name, v) in &method {
        let mut set: Vec<String> = Vec::new();
        flatten("method", &v["method"], &mut set);
        flatten("train", &v["train"], &mut set);
        out.push_str(&format!("  {name:<44} {}\n", set.join(" ")));
    }
    for name in ["projgrad", "projbp"] {
        let mut set: Vec<String> = Vec::new();
        if let Some(v) = reprpo_train::gradproj::preset(name) {
            flatten("train", &v["train"], &mut set);
        }
        let note = format!("(gradient intervention, `[{name}]`)");
        out.push_str(&format!("  {name:<44} {} {note}\n", set.join(" ")));
    }
    out
}

/// `key=value` lines of a nested JSON object under `prefix`.
fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Vec<String>) {
    match v.as_object() {
        Some(obj) => {
            for (k, val) in obj {
                flatten(&format!("{prefix}.{k}"), val, out);
            }
        }
        None => out.push(format!("{prefix}={v}")),
    }
}

/// Run the job.
pub fn run(a: TrainArgs, root: &Path) -> Result<()> {
    if a.list_presets {
        print!("{}", presets_text());
        return Ok(());
    }
    let mut src = Sources {
        env: true,
        ..Default::default()
    };
    for arg in &a.args {
        if arg.contains('=') {
            src.overrides.push(arg.clone());
        } else if src.file.is_none() {
            src.file = Some(PathBuf::from(arg));
        } else {
            anyhow::bail!("`{arg}`: only one config file can be given (then key=value overrides)");
        }
    }
    if let Some(file) = src.file.as_ref().filter(|_| a.resume.is_some()) {
        anyhow::bail!(
            "`{}`: a config file cannot be given with --resume (the run's own resolved_config.toml \
             is used; key=value arguments may change {})",
            file.display(),
            reprpo_train::resume::RESUME_KEYS.join(", ")
        );
    }
    // With --resume, the run's own configuration; the overrides are checked against it there.
    let cfg = match &a.resume {
        Some(_) => None,
        None => Some(TrainConfig::resolve(&src)?),
    };
    if a.print_config {
        let Some(cfg) = &cfg else {
            anyhow::bail!(
                "--print-config: with --resume the configuration is the run's resolved_config.toml"
            );
        };
        print!("{}", cfg.to_toml()?);
        match reprpo_train::memory::note(cfg, &note_device(&cfg.model.device)) {
            Some(n) => eprintln!("{n}"),
            None => {
                eprintln!("estimated memory: unknown (the model's config.json could not be read)")
            }
        }
        return Ok(());
    }
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                eprintln!("second Ctrl-C: exiting without a checkpoint");
                std::process::exit(130);
            }
            eprintln!(
                "Ctrl-C (or SIGTERM/SIGHUP): saving a checkpoint after this step (Ctrl-C again \
                 to abort)"
            );
        })
        .context("installing the Ctrl-C handler")?;
    }
    let ctx = JobContext {
        datasets_dir: root.join("datasets"),
        stop,
        progress: !a.no_progress && std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let out = match (&a.resume, &cfg) {
        (Some(target), _) => reprpo_train::resume(&ctx, target, &src.overrides)?,
        (None, Some(cfg)) => reprpo_train::train(cfg, &ctx, None)?,
        (None, None) => anyhow::bail!("no configuration resolved"),
    };
    if out.interrupted {
        println!(
            "stopped at step {}; resume with: cargo xtask train --resume {}",
            out.steps,
            out.run_dir.display()
        );
        // Not a success: `train && eval` must not go on with a half-trained adapter.
        return Err(Interrupted.into());
    }
    print_summary(&out.summary);
    println!("run folder: {}", out.run_dir.display());
    Ok(())
}

/// The end-of-run table: held-out preference accuracy per stage, in distribution and shifted,
/// naming the datasets each column scored; a column with nothing scored is left out, and with
/// nothing to score at all it says so instead of printing a table of dashes.
/// The device `--print-config` compares the estimate with: CUDA when `model.device` names one
/// that opens, the CPU otherwise (then the machine's available memory is the limit).
fn note_device(name: &str) -> candle_core::Device {
    let n = name
        .strip_prefix("cuda")
        .map(|s| s.trim_start_matches(':').parse::<usize>().unwrap_or(0));
    match n {
        Some(n) => candle_core::Device::new_cuda(n).unwrap_or(candle_core::Device::Cpu),
        None => candle_core::Device::Cpu,
    }
}

fn print_summary(s: &std::collections::BTreeMap<String, serde_json::Value>) {
    let get = |k: &str| s.get(k).and_then(serde_json::Value::as_f64);
    let text = |k: &str| s.get(k).and_then(serde_json::Value::as_str).unwrap_or("");
    if let Some(m) = get("memory/peak_rss_mib") {
        println!("peak memory: {m:.0} MiB (process resident set)");
    }
    if let Some(m) = get("memory/device_used_mib") {
        println!("device memory: {m:.0} MiB used at most (sampled at logging steps)");
    }
    match text("reference") {
        "initial" => println!("reference model: the initial adapter (a frozen copy)"),
        "base" => println!("reference model: the base (adapter off)"),
        _ => {}
    }
    let has = |split: &str| s.keys().any(|k| k.ends_with(&format!("/{split}/n")));
    let (id, ood) = (has("id"), has("ood"));
    if !id && !ood {
        println!("held-out preference accuracy: nothing to score (no evaluation or shifted data)");
        return;
    }
    println!("held-out preference accuracy (mean log-prob per token, chosen > rejected):");
    if id {
        println!("  in-distribution: {}", text("data/id"));
    }
    if ood {
        println!("  shifted (OOD):   {}", text("data/ood"));
    }
    let head = |split: bool, name: &str| {
        if split {
            format!(" {name:>16}")
        } else {
            String::new()
        }
    };
    println!(
        "{:<12}{}{}",
        "",
        head(id, "in-distribution"),
        head(ood, "shifted (OOD)")
    );
    let staged = s.keys().any(|k| k.starts_with("random_base/"));
    for (who, label) in [
        ("random_base", "random base"),
        ("base", if staged { "after SFT" } else { "base" }),
        ("adapter", "+ adapter"),
    ] {
        if who == "random_base" && !staged {
            continue;
        }
        let cell = |split: &str| match (
            get(&format!("{who}/{split}/accuracy")),
            get(&format!("{who}/{split}/n")),
        ) {
            (Some(a), Some(n)) => format!("{:.1}% (n={n})", 100.0 * a),
            _ => "-".into(),
        };
        let col = |split: bool, name: &str| {
            if split {
                format!(" {:>16}", cell(name))
            } else {
                String::new()
            }
        };
        println!("{label:<12}{}{}", col(id, "id"), col(ood, "ood"));
    }
    println!("{}", adapter_effect(s));
    if let Some(line) = objective_change(s) {
        println!("{line}");
    }
}

/// The trained objective before the first step and at the end, on the final evaluation's pairs:
/// for the ReprPO family the reroute distance `loss_rr` (which the coefficient schedule does not
/// move), otherwise the loss. `None` when the run has no "before" (resumed from a checkpoint
/// written before it was kept).
fn objective_change(s: &std::collections::BTreeMap<String, serde_json::Value>) -> Option<String> {
    let get = |k: &str| s.get(k).and_then(serde_json::Value::as_f64);
    let key = if s.contains_key("initial_eval/loss_rr") {
        "loss_rr"
    } else {
        "loss"
    };
    let before = get(&format!("initial_eval/{key}"))?;
    let after = get(&format!("final_eval/{key}"))?;
    let change = if before != 0.0 {
        format!(" ({:+.0}%)", 100.0 * (after / before - 1.0))
    } else {
        String::new()
    };
    Some(format!(
        "the objective on the evaluation pairs: {key} {before:.4} before training -> {after:.4}{change}"
    ))
}

/// One plain sentence on what the adapter changed against the base it was trained on (after the
/// SFT stage where there was one), per scored column, with the sampling noise of an accuracy
/// over that many items (95%, normal approximation), so that "no change" and "within noise" are
/// said as such.
fn adapter_effect(s: &std::collections::BTreeMap<String, serde_json::Value>) -> String {
    let get = |k: &str| s.get(k).and_then(serde_json::Value::as_f64);
    let mut parts = Vec::new();
    for (split, name) in [("id", "in distribution"), ("ood", "shifted")] {
        let (Some(b), Some(a), Some(n)) = (
            get(&format!("base/{split}/accuracy")),
            get(&format!("adapter/{split}/accuracy")),
            get(&format!("adapter/{split}/n")),
        ) else {
            continue;
        };
        let delta = 100.0 * (a - b);
        let noise = 100.0 * 1.96 * (b * (1.0 - b) / n.max(1.0)).sqrt();
        let verdict = if delta.abs() < 0.05 {
            "no change".to_string()
        } else if delta.abs() <= noise {
            format!("{delta:+.1} points, within the noise of n={n} (about ±{noise:.1})")
        } else {
            format!("{delta:+.1} points (noise of n={n}: about ±{noise:.1})")
        };
        parts.push(format!("{name}: {verdict}"));
    }
    if parts.is_empty() {
        return "the adapter's effect: nothing scored".into();
    }
    format!("what the adapter changed: {}", parts.join("; "))
}

#[cfg(test)]
mod tests {
    use super::adapter_effect;
    use serde_json::json;

    fn summary(
        base: f64,
        adapter: f64,
        n: f64,
    ) -> std::collections::BTreeMap<String, serde_json::Value> {
        [
            ("base/id/accuracy", json!(base)),
            ("adapter/id/accuracy", json!(adapter)),
            ("adapter/id/n", json!(n)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    #[test]
    fn the_objective_line_shows_before_and_after() {
        let mut s = summary(0.5, 0.5, 10.0);
        assert_eq!(super::objective_change(&s), None);
        s.insert("initial_eval/loss_rr".into(), json!(1.4));
        s.insert("final_eval/loss_rr".into(), json!(1.19));
        s.insert("initial_eval/loss".into(), json!(0.0));
        s.insert("final_eval/loss".into(), json!(0.7));
        assert_eq!(
            super::objective_change(&s).unwrap(),
            "the objective on the evaluation pairs: loss_rr 1.4000 before training -> 1.1900 (-15%)"
        );
    }

    #[test]
    fn the_adapter_effect_says_no_change_noise_or_a_change() {
        assert_eq!(
            adapter_effect(&summary(0.65, 0.65, 100.0)),
            "what the adapter changed: in distribution: no change"
        );
        // sqrt(0.65 * 0.35 / 100) * 1.96 = 9.35 points.
        let s = adapter_effect(&summary(0.65, 0.70, 100.0));
        assert!(
            s.contains("+5.0 points, within the noise of n=100 (about ±9.3)"),
            "{s}"
        );
        let s = adapter_effect(&summary(0.65, 0.80, 100.0));
        assert!(
            s.contains("+15.0 points (noise of n=100: about ±9.3)"),
            "{s}"
        );
        assert!(!s.contains("shifted"), "{s}");
        assert_eq!(
            adapter_effect(&Default::default()),
            "the adapter's effect: nothing scored"
        );
    }
}
