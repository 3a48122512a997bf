//! `adapter.init_from=DIR`: the `[adapter]` table of a run that starts from an existing PEFT
//! adapter is the loaded one.
//!
//! The resolved configuration (written to `resolved_config.toml`, printed by `--print-config`,
//! used for the run name) describes the adapter the run trains: kind, rank, alpha, targets,
//! dropout, ... are read from `DIR/adapter_config.json`. A key the user set explicitly
//! (`adapter.kind=boft`, `adapter.r=8`, in a file or on the command line) that contradicts the
//! loaded adapter is an error naming both values; `adapter.seed`, `adapter.reference` and
//! `adapter.init_from` itself are the run's own.

use std::path::Path;

use reprpo_models::peft::{AdapterConfig, AdapterKind, LoraInit, Target};
use serde_json::{Map, Value};

use crate::config::AdapterOptions;
use crate::error::{Result, TrainError};

/// The adapter options that describe the PEFT adapter in `dir`; `seed`, `reference` and
/// `init_from` are taken from `base`.
pub(crate) fn loaded_options(dir: &Path, base: &AdapterOptions) -> Result<AdapterOptions> {
    let cfg = AdapterConfig::load(dir).map_err(|e| TrainError::Config {
        key: "adapter.init_from".into(),
        problem: e.to_string(),
    })?;
    let mut o = AdapterOptions {
        init_from: base.init_from.clone(),
        seed: base.seed,
        reference: base.reference.clone(),
        target_modules: match &cfg.target {
            Target::AllLinear => vec!["all-linear".into()],
            Target::Names(n) => n.clone(),
            Target::Regex(re) => vec![format!("re:{re}")],
        },
        layers_to_transform: cfg.layers_to_transform.clone(),
        ..AdapterOptions::default()
    };
    match &cfg.kind {
        AdapterKind::Lora {
            r,
            alpha,
            rslora,
            dora,
            dropout,
            init,
        } => {
            o.kind = if *dora { "dora" } else { "lora" }.into();
            (o.r, o.alpha, o.rslora, o.dropout) = (*r, *alpha, *rslora, *dropout);
            o.init = match init {
                LoraInit::Gaussian => "gaussian",
                LoraInit::Kaiming => "kaiming",
            }
            .into();
        }
        AdapterKind::Full => o.kind = "full".into(),
        AdapterKind::Orth(raw) => orth_options(&cfg.peft_type, raw, &mut o),
    }
    Ok(o)
}

/// BOFT, OFT and HRA settings from their PEFT keys.
fn orth_options(peft_type: &str, raw: &Map<String, Value>, o: &mut AdapterOptions) {
    let int = |k: &str| raw.get(k).and_then(Value::as_u64).unwrap_or(0) as usize;
    let float = |k: &str| raw.get(k).and_then(Value::as_f64).unwrap_or(0.0);
    match peft_type {
        "BOFT" => {
            o.kind = "boft".into();
            o.block_size = int("boft_block_size");
            o.block_num = int("boft_block_num");
            o.butterfly_factor = int("boft_n_butterfly_factor").max(1);
            o.dropout = float("boft_dropout");
        }
        "OFT" => {
            o.kind = "oft".into();
            o.r = int("r");
            o.block_size = int("oft_block_size");
            o.dropout = float("module_dropout");
        }
        _ => {
            o.kind = "hra".into();
            o.r = int("r");
            o.apply_gs = raw
                .get("apply_GS")
                .and_then(Value::as_bool)
                .unwrap_or(false);
        }
    }
}

/// Check that every `adapter.*` key in `explicit` (those the user set) agrees with `loaded`,
/// reading the user's value from `resolved` (the configuration before the loaded adapter
/// replaced its table).
pub(crate) fn check_explicit(
    explicit: &[String],
    resolved: &AdapterOptions,
    loaded: &AdapterOptions,
    dir: &Path,
) -> Result<()> {
    let to_map = |o: &AdapterOptions| match serde_json::to_value(o) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    };
    let (user, have) = (to_map(resolved), to_map(loaded));
    let used: &[&str] = match loaded.kind.as_str() {
        "lora" | "dora" => &["r", "alpha", "dropout", "rslora", "init"],
        "boft" => &["block_size", "block_num", "butterfly_factor", "dropout"],
        "oft" => &["r", "block_size", "dropout"],
        "hra" => &["r", "apply_gs"],
        _ => &[],
    };
    for key in explicit {
        if matches!(key.as_str(), "init_from" | "seed" | "reference") {
            continue;
        }
        let common = matches!(
            key.as_str(),
            "kind" | "target_modules" | "layers_to_transform"
        );
        if !common && !used.contains(&key.as_str()) {
            return Err(TrainError::Config {
                key: format!("adapter.{key}"),
                problem: format!(
                    "does not apply to the {} adapter loaded by adapter.init_from ({})",
                    loaded.kind,
                    dir.join("adapter_config.json").display()
                ),
            });
        }
        let (u, h) = (user.get(key), have.get(key));
        if u != h {
            let show = |v: Option<&Value>| v.map_or("(unset)".into(), Value::to_string);
            return Err(TrainError::Config {
                key: format!("adapter.{key}"),
                problem: format!(
                    "{} contradicts the adapter loaded by adapter.init_from ({} in {}); drop \
                     the key or start from a fresh adapter",
                    show(u),
                    show(h),
                    dir.join("adapter_config.json").display()
                ),
            });
        }
    }
    Ok(())
}
