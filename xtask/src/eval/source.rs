//! What one `--adapter` names for `cargo xtask eval`: a run folder (`resolved_config.toml` with a
//! `[model]` table, `adapter/`, optionally `sft_adapter/`) or a plain PEFT folder
//! (`adapter_config.json` + `adapter_model.safetensors`, local or by hub id), and the base model
//! it was trained on.
//!
//! Relative paths resolve against what they were written for: the argument itself against the
//! working directory; `model.name_or_path` in a run's `resolved_config.toml` and
//! `base_model_name_or_path` in an `adapter_config.json` against the folder holding that file (a
//! relative path that does not exist there but does in the working directory is used from there,
//! with a note, as Python PEFT and older run folders mean it). A string that is neither is a hub
//! id.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use reprpo_models::{LlamaConfig, hub, peft};
use reprpo_train::TrainConfig;
use reprpo_train::config::ModelConfig;

/// The base model a source names.
#[derive(Debug, Clone)]
pub struct Base {
    /// `[model]`, with `name_or_path` resolved (absolute path, preset name or hub id).
    pub model: ModelConfig,
    /// Where it was read, for messages (`RUN/resolved_config.toml [model]`, ...).
    pub from: String,
    /// Said once before scoring (how a relative path was resolved).
    pub note: Option<String>,
}

/// One `--adapter`.
#[derive(Debug, Clone)]
pub struct Source {
    /// The argument as given.
    pub arg: String,
    /// The local folder (for a hub id: its snapshot in the cache).
    pub dir: PathBuf,
    /// The folder holding the PEFT files to load.
    pub peft: PathBuf,
    /// Row label: the folder's name, or the hub id.
    pub label: String,
    /// The run's configuration, for a run folder.
    pub run: Option<TrainConfig>,
    /// The base it names (`None`: a PEFT folder without `base_model_name_or_path`).
    pub base: Option<Base>,
    /// `sft_adapter/` of a run, folded into the base before any adapter.
    pub sft: Option<PathBuf>,
}

/// Whether `dir` holds a PEFT adapter's two files.
pub fn has_peft(dir: &Path) -> bool {
    dir.join("adapter_config.json").is_file() && dir.join("adapter_model.safetensors").is_file()
}

/// The working directory, for messages.
pub fn cwd() -> String {
    std::env::current_dir()
        .map(|d| d.display().to_string())
        .unwrap_or_else(|_| "(unknown)".into())
}

/// An absolute form of an existing `p` (unchanged if that fails).
fn absolute(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Read `--adapter ARG`: a local folder (relative to the working directory) or a hub adapter id.
pub fn open(arg: &str) -> Result<Source> {
    let looks_local = Path::new(arg).is_dir() || hub::local_path(arg).is_some();
    let dir = hub::adapter_dir(arg).with_context(|| {
        if looks_local {
            format!("--adapter {arg} (a path, relative to the working directory {})", cwd())
        } else {
            format!(
                "--adapter {arg}: no folder of that name in the working directory {}, so it was taken as a hub adapter id",
                cwd()
            )
        }
    })?;
    let (dir, label) = if looks_local {
        let dir = absolute(&dir);
        let label = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| arg.to_string());
        (dir, label)
    } else {
        (dir, arg.to_string())
    };
    classify(arg, dir, label)
}

/// A run folder or a PEFT folder; anything else is an error saying what is needed.
fn classify(arg: &str, dir: PathBuf, label: String) -> Result<Source> {
    let cfg_file = dir.join("resolved_config.toml");
    if cfg_file.is_file() {
        return run_source(arg, dir, label, &cfg_file);
    }
    if has_peft(&dir) {
        return peft_source(arg, dir, label);
    }
    let named = if absolute(Path::new(arg)) == dir {
        arg.to_string()
    } else {
        format!("{arg} ({})", dir.display())
    };
    bail!(
        "--adapter {named}: neither a run folder nor a PEFT adapter: a run folder has \
         resolved_config.toml with a [model] table (as `cargo xtask train` writes it) and \
         adapter/; a PEFT folder has adapter_config.json + adapter_model.safetensors, with \
         base_model_name_or_path naming the base (or give model.name_or_path=...)"
    )
}

/// A run folder: its config (which must have `[model]`), `adapter/` and `sft_adapter/`.
fn run_source(arg: &str, dir: PathBuf, label: String, file: &Path) -> Result<Source> {
    let text = std::fs::read_to_string(file).with_context(|| file.display().to_string())?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("{}: not valid TOML", file.display()))?;
    if !table.get("model").is_some_and(toml::Value::is_table) {
        bail!(
            "{}: no [model] table: a run folder's resolved_config.toml names its base model \
             there (name_or_path = \"...\"); for a plain PEFT folder, remove this file and keep \
             adapter_config.json with base_model_name_or_path",
            file.display()
        );
    }
    let cfg = TrainConfig::from_toml_file(file)?;
    let origin = format!("{} [model] name_or_path", file.display());
    let (name, note) = resolve_in(&cfg.model.name_or_path, &dir, &origin)?;
    let model = ModelConfig {
        name_or_path: name,
        ..cfg.model.clone()
    };
    let sft = dir.join("sft_adapter");
    Ok(Source {
        arg: arg.to_string(),
        peft: run_adapter_dir(&dir)?,
        sft: has_peft(&sft).then_some(sft),
        base: Some(Base {
            model,
            from: format!("{} [model]", file.display()),
            note,
        }),
        run: Some(cfg),
        label,
        dir,
    })
}

/// The PEFT folder of a run: `adapter/`, else the run folder itself.
fn run_adapter_dir(run: &Path) -> Result<PathBuf> {
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

/// A plain PEFT folder: the base from `base_model_name_or_path`, when it names one.
fn peft_source(arg: &str, dir: PathBuf, label: String) -> Result<Source> {
    let cfg = peft::AdapterConfig::load(&dir)?;
    let file = dir.join("adapter_config.json");
    let named = cfg
        .raw
        .get("base_model_name_or_path")
        .and_then(serde_json::Value::as_str)
        .filter(|s| !s.trim().is_empty());
    let base = match named {
        Some(s) => {
            let origin = format!("{} base_model_name_or_path", file.display());
            let (name, note) = resolve_in(s, &dir, &origin)?;
            Some(Base {
                model: ModelConfig {
                    name_or_path: name,
                    ..TrainConfig::default().model
                },
                from: origin,
                note,
            })
        }
        None => None,
    };
    Ok(Source {
        arg: arg.to_string(),
        peft: dir.clone(),
        label,
        run: None,
        base,
        sft: None,
        dir,
    })
}

/// Resolve a model reference `s` read from `origin` (a file in `dir`): a preset name and an
/// absolute path stay; a relative path is taken against `dir`, else (with a note) against the
/// working directory; anything else is a hub id. `./x` or `../x` missing in `dir` is an error.
pub fn resolve_in(s: &str, dir: &Path, origin: &str) -> Result<(String, Option<String>)> {
    if LlamaConfig::preset(s).is_some() || Path::new(s).is_absolute() || s.starts_with('~') {
        return Ok((s.to_string(), None));
    }
    let here = dir.join(s);
    if here.exists() {
        return Ok((absolute(&here).display().to_string(), None));
    }
    let explicit = s == "." || s == ".." || s.starts_with("./") || s.starts_with("../");
    if Path::new(s).exists() {
        let cwd_path = absolute(Path::new(s));
        let note = format!(
            "{origin} = {s:?}: not found relative to {}, the folder holding that file; using {} \
             (relative to the working directory)",
            dir.display(),
            cwd_path.display()
        );
        return Ok((cwd_path.display().to_string(), Some(note)));
    }
    if explicit {
        bail!(
            "{origin} = {s:?}: no such folder {} (relative paths there are relative to the folder \
             holding that file, {}; nor is it in the working directory {})",
            here.display(),
            dir.display(),
            cwd()
        );
    }
    Ok((s.to_string(), None))
}

/// `model.name_or_path` given on the command line: relative to the working directory.
pub fn resolve_cli(s: &str) -> String {
    let p = Path::new(s);
    if LlamaConfig::preset(s).is_none() && !p.is_absolute() && p.exists() {
        absolute(p).display().to_string()
    } else {
        s.to_string()
    }
}

/// What makes two bases the same model: the folder (canonical), the hub id, or a preset with its
/// seed and init scale.
pub fn identity(m: &ModelConfig) -> String {
    if LlamaConfig::preset(&m.name_or_path).is_some() {
        return format!(
            "{} (random, init_std {}, init_seed {})",
            m.name_or_path, m.init_std, m.init_seed
        );
    }
    absolute(Path::new(&m.name_or_path)).display().to_string()
}

/// The SFT stage's weights, which are part of a run's base.
pub fn sft_bytes(s: &Source) -> Result<Option<Vec<u8>>> {
    match &s.sft {
        Some(d) => {
            let f = d.join("adapter_model.safetensors");
            Ok(Some(
                std::fs::read(&f).with_context(|| f.display().to_string())?,
            ))
        }
        None => Ok(None),
    }
}
