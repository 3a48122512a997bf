//! PEFT interoperability: `adapter_config.json` + `adapter_model.safetensors` both ways, with
//! PEFT's module-matching rules (`target_modules` names or a regex, `"all-linear"`,
//! `layers_to_transform` / `layers_pattern`) and its key names
//! (`base_model.model.<module>.lora_A.weight`, ...).
//!
//! Every key of a PEFT config is either understood, or known to be irrelevant at its value, or an
//! error naming it: nothing is silently ignored.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand::rngs::StdRng;
use regex::Regex;
use serde_json::{Map, Value};

use crate::adapter::{AdapterHost, AdapterSet, LoraModule, ModuleAdapter, WeightTransform};
use crate::error::{ModelError, Result};

/// The prefix PEFT puts before module paths in saved state dicts.
pub const KEY_PREFIX: &str = "base_model.model.";

/// Which modules an adapter targets.
#[derive(Debug, Clone)]
pub enum Target {
    /// Module names: a module matches when its path equals a name or ends with `.name`.
    Names(Vec<String>),
    /// A regular expression that must match the whole module path.
    Regex(String),
    /// Every linear layer except the output head.
    AllLinear,
}

/// LoRA initialisation of new adapters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LoraInit {
    /// PEFT's default: A kaiming-uniform (a = sqrt(5)), B zero.
    Kaiming,
    /// PEFT's "gaussian": A normal with std 1/r, B zero.
    Gaussian,
}

/// The adapter-kind-specific settings.
#[derive(Debug, Clone)]
pub enum AdapterKind {
    /// LoRA (and DoRA with `dora`).
    Lora {
        /// Rank.
        r: usize,
        /// Alpha.
        alpha: f64,
        /// alpha / sqrt(r) instead of alpha / r.
        rslora: bool,
        /// Weight-decomposed LoRA.
        dora: bool,
        /// Dropout on the adapter input.
        dropout: f64,
        /// Initialisation of new weights.
        init: LoraInit,
    },
    /// Orthogonal kinds, configured by their own module (`orth.rs`).
    Orth(Map<String, Value>),
    /// Full fine-tuning of the targeted layers (`peft_type` `"FULL"`, a reprpo extension; see
    /// `full.rs`).
    Full,
}

/// A validated adapter config.
#[derive(Debug, Clone)]
pub struct AdapterConfig {
    /// `LORA`, `BOFT`, `OFT`, `HRA`, or `FULL` (full fine-tuning, a reprpo extension).
    pub peft_type: String,
    /// Kind-specific settings.
    pub kind: AdapterKind,
    /// Targeted modules.
    pub target: Target,
    /// Only these layer indices, if given.
    pub layers_to_transform: Option<Vec<usize>>,
    /// The name of the layer list in module paths (default: PEFT's usual names).
    pub layers_pattern: Option<Vec<String>>,
    /// The config as read (written back on save, so PEFT sees its own keys).
    pub raw: Map<String, Value>,
}

fn cfg_err(file: &Path, key: &str, problem: impl Into<String>) -> ModelError {
    ModelError::Config {
        file: file.to_path_buf(),
        key: key.into(),
        problem: problem.into(),
    }
}

/// Keys PEFT writes that do not change the maths at the given "neutral" values: accepted only at
/// those values (`None`: any value).
fn neutral(key: &str, v: &Value) -> Option<bool> {
    let is_null_or_empty = v.is_null()
        || v.as_object().is_some_and(Map::is_empty)
        || v.as_array().is_some_and(Vec::is_empty);
    Some(match key {
        "auto_mapping"
        | "base_model_name_or_path"
        | "revision"
        | "inference_mode"
        | "task_type"
        | "peft_version"
        | "megatron_core"
        | "qalora_group_size" => true,
        "bias" => v == "none",
        "fan_in_fan_out" | "use_qalora" | "ensure_weight_tying" | "lora_bias" => v == false,
        "modules_to_save"
        | "exclude_modules"
        | "layer_replication"
        | "megatron_config"
        | "alpha_pattern"
        | "rank_pattern"
        | "loftq_config"
        | "eva_config"
        | "corda_config"
        | "alora_invocation_tokens"
        | "arrow_config"
        | "kasa_config"
        | "lora_ga_config"
        | "monteclora_config"
        | "target_parameters"
        | "trainable_token_indices"
        | "use_bdlora"
        | "velora_config" => is_null_or_empty,
        _ => return None,
    })
}

impl AdapterConfig {
    /// Parse a PEFT `adapter_config.json` value; `file` names it in errors.
    pub fn from_json(raw: Map<String, Value>, file: &Path) -> Result<Self> {
        let peft_type = raw
            .get("peft_type")
            .and_then(Value::as_str)
            .ok_or_else(|| cfg_err(file, "peft_type", "missing"))?
            .to_string();
        let get = |k: &str| raw.get(k).filter(|v| !v.is_null());
        let target = match get("target_modules") {
            Some(Value::String(s)) if s == "all-linear" => Target::AllLinear,
            Some(Value::String(s)) => {
                Regex::new(&format!("^(?:{s})$"))
                    .map_err(|e| cfg_err(file, "target_modules", format!("invalid regex: {e}")))?;
                Target::Regex(s.clone())
            }
            Some(Value::Array(a)) => Target::Names(
                a.iter()
                    .map(|v| {
                        v.as_str()
                            .map(str::to_string)
                            .ok_or_else(|| cfg_err(file, "target_modules", "names must be strings"))
                    })
                    .collect::<Result<_>>()?,
            ),
            _ => {
                return Err(cfg_err(
                    file,
                    "target_modules",
                    "missing (a list of names, a regex or \"all-linear\")",
                ));
            }
        };
        let layers_to_transform = match get("layers_to_transform") {
            None => None,
            Some(Value::Number(n)) => Some(vec![
                n.as_u64()
                    .ok_or_else(|| cfg_err(file, "layers_to_transform", "not a layer index"))?
                    as usize,
            ]),
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(|v| {
                        v.as_u64().map(|x| x as usize).ok_or_else(|| {
                            cfg_err(file, "layers_to_transform", "not a layer index")
                        })
                    })
                    .collect::<Result<_>>()?,
            ),
            Some(_) => {
                return Err(cfg_err(
                    file,
                    "layers_to_transform",
                    "expected an index or a list",
                ));
            }
        };
        if layers_to_transform.is_some() && matches!(target, Target::Regex(_)) {
            return Err(cfg_err(
                file,
                "layers_to_transform",
                "cannot be combined with a regex target_modules (as in PEFT)",
            ));
        }
        let layers_pattern = match get("layers_pattern") {
            None => None,
            Some(Value::String(s)) => Some(vec![s.clone()]),
            Some(Value::Array(a)) => Some(
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect(),
            ),
            Some(_) => {
                return Err(cfg_err(
                    file,
                    "layers_pattern",
                    "expected a string or a list",
                ));
            }
        };
        let mut known: Vec<&str> = vec![
            "peft_type",
            "target_modules",
            "layers_to_transform",
            "layers_pattern",
        ];
        let kind = match peft_type.as_str() {
            "LORA" => {
                known.extend([
                    "r",
                    "lora_alpha",
                    "use_rslora",
                    "use_dora",
                    "lora_dropout",
                    "init_lora_weights",
                ]);
                let r = get("r")
                    .and_then(Value::as_u64)
                    .ok_or_else(|| cfg_err(file, "r", "missing or not a positive integer"))?
                    as usize;
                if r == 0 {
                    return Err(cfg_err(file, "r", "must be positive"));
                }
                let init = match get("init_lora_weights") {
                    None | Some(Value::Bool(true)) => LoraInit::Kaiming,
                    Some(Value::String(s)) if s == "gaussian" => LoraInit::Gaussian,
                    Some(other) => {
                        return Err(cfg_err(
                            file,
                            "init_lora_weights",
                            format!("unsupported value {other}"),
                        ));
                    }
                };
                AdapterKind::Lora {
                    r,
                    alpha: get("lora_alpha").and_then(Value::as_f64).unwrap_or(8.0),
                    rslora: get("use_rslora").and_then(Value::as_bool).unwrap_or(false),
                    dora: get("use_dora").and_then(Value::as_bool).unwrap_or(false),
                    dropout: get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0),
                    init,
                }
            }
            "BOFT" | "OFT" | "HRA" => {
                known.extend(crate::orth::config_keys(&peft_type));
                AdapterKind::Orth(raw.clone())
            }
            "FULL" => AdapterKind::Full,
            other => {
                return Err(cfg_err(
                    file,
                    "peft_type",
                    format!("unsupported adapter type {other:?}"),
                ));
            }
        };
        for (k, v) in &raw {
            if known.contains(&k.as_str()) {
                continue;
            }
            match neutral(k, v) {
                Some(true) => {}
                Some(false) => return Err(cfg_err(file, k, format!("value {v} is not supported"))),
                None => return Err(cfg_err(file, k, "unknown key")),
            }
        }
        let config = AdapterConfig {
            peft_type,
            kind,
            target,
            layers_to_transform,
            layers_pattern,
            raw,
        };
        if matches!(config.kind, AdapterKind::Orth(_)) {
            crate::orth::validate(&config, file)?;
        }
        Ok(config)
    }

    /// Read `dir/adapter_config.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| ModelError::Io {
            file: path.clone(),
            source,
        })?;
        let v: Value =
            serde_json::from_str(&text).map_err(|e| cfg_err(&path, "(file)", e.to_string()))?;
        match v {
            Value::Object(m) => Self::from_json(m, &path),
            _ => Err(cfg_err(&path, "(file)", "expected a JSON object")),
        }
    }

    /// A LoRA config built in code (PEFT key names in `raw`, so it saves as PEFT writes it).
    pub fn lora(r: usize, alpha: f64, target: &[&str]) -> Self {
        let raw: Map<String, Value> = serde_json::json!({
            "peft_type": "LORA", "r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
            "target_modules": target, "bias": "none", "use_rslora": false, "use_dora": false,
            "init_lora_weights": true, "task_type": "CAUSAL_LM", "fan_in_fan_out": false,
            "inference_mode": true, "modules_to_save": null, "layers_to_transform": null,
            "layers_pattern": null,
        })
        .as_object()
        .cloned()
        .unwrap_or_default();
        AdapterConfig {
            peft_type: "LORA".into(),
            kind: AdapterKind::Lora {
                r,
                alpha,
                rslora: false,
                dora: false,
                dropout: 0.0,
                init: LoraInit::Kaiming,
            },
            target: Target::Names(target.iter().map(|s| s.to_string()).collect()),
            layers_to_transform: None,
            layers_pattern: None,
            raw,
        }
    }

    /// Whether module `path` is targeted (PEFT's `check_target_module_exists`).
    pub fn matches(&self, path: &str) -> bool {
        let hit = match &self.target {
            Target::AllLinear => true,
            Target::Regex(re) => Regex::new(&format!("^(?:{re})$")).is_ok_and(|r| r.is_match(path)),
            Target::Names(names) => names
                .iter()
                .any(|n| path == n || path.ends_with(&format!(".{n}"))),
        };
        if !hit {
            return false;
        }
        match &self.layers_to_transform {
            None => true,
            Some(layers) => {
                let patterns: Vec<String> = self.layers_pattern.clone().unwrap_or_else(|| {
                    ["layers", "h", "block", "blocks", "layer"]
                        .map(String::from)
                        .to_vec()
                });
                patterns.iter().any(|p| {
                    Regex::new(&format!(r".*\.{}\.(\d+)\.", regex::escape(p)))
                        .ok()
                        .and_then(|re| {
                            re.captures(path)
                                .and_then(|c| c.get(1)?.as_str().parse::<usize>().ok())
                        })
                        .is_some_and(|i| layers.contains(&i))
                })
            }
        }
    }
}

/// A fresh LoRA module for a `[out, in]` layer (PEFT's initialisation: B = 0).
fn init_lora(
    kind: &AdapterKind,
    out: usize,
    inp: usize,
    w: &Tensor,
    rng: &mut StdRng,
    dev: &Device,
) -> Result<LoraModule> {
    let AdapterKind::Lora {
        r,
        alpha,
        rslora,
        dora,
        dropout,
        init,
    } = kind
    else {
        return Err(ModelError::Invalid("not a LoRA config".into()));
    };
    use rand::Rng;
    let a: Vec<f32> = match init {
        // kaiming_uniform_(a=sqrt(5)) on [r, in]: bound = 1 / sqrt(in).
        LoraInit::Kaiming => {
            let bound = 1.0 / (inp as f64).sqrt();
            (0..r * inp)
                .map(|_| rng.random_range(-bound..bound) as f32)
                .collect()
        }
        LoraInit::Gaussian => {
            let std = 1.0 / *r as f64;
            (0..r * inp)
                .map(|_| {
                    // Box-Muller.
                    let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random());
                    (std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
                })
                .collect()
        }
    };
    let a = Var::from_tensor(&Tensor::from_vec(a, (*r, inp), dev)?)?;
    let b = Var::zeros((out, *r), DType::F32, dev)?;
    let magnitude = if *dora {
        Some(Var::from_tensor(
            &w.to_dtype(DType::F32)?.sqr()?.sum(1)?.sqrt()?,
        )?)
    } else {
        None
    };
    Ok(LoraModule {
        a,
        b,
        magnitude,
        scale: lora_scale(*alpha, *r, *rslora),
        dropout: *dropout,
    })
}

/// alpha / r, or alpha / sqrt(r) with rsLoRA.
pub(crate) fn lora_scale(alpha: f64, r: usize, rslora: bool) -> f64 {
    if rslora {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    }
}

/// Register adapter `name` on `host`: new weights (`weights = None`, seeded) or the given PEFT
/// state dict. Returns its index. Every tensor of `weights` must be used, and every targeted
/// module must find its tensors.
pub fn add_adapter(
    host: &mut dyn AdapterHost,
    name: &str,
    config: AdapterConfig,
    weights: Option<(&HashMap<String, Tensor>, &Path)>,
    seed: u64,
) -> Result<usize> {
    if host.adapter_set().index(name).is_some() {
        return Err(ModelError::Invalid(format!(
            "an adapter named {name:?} exists already"
        )));
    }
    if let Some((w, file)) = weights {
        check_finite(w, file)?;
    }
    let idx = host.adapter_set().names.len();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut used = 0usize;
    let mut n_targets = 0usize;
    for lin in host.linears_mut() {
        if lin.adapters.len() <= idx {
            lin.adapters.resize(idx + 1, None);
        }
        if !config.matches(&lin.name) {
            continue;
        }
        n_targets += 1;
        let dev = lin.device().clone();
        let (out, inp) = (lin.out_dim(), lin.in_dim());
        let key = |suffix: &str| format!("{KEY_PREFIX}{}.{suffix}", lin.name);
        let module = match (&config.kind, weights) {
            (AdapterKind::Lora { .. }, None) => ModuleAdapter::Lora(init_lora(
                &config.kind,
                out,
                inp,
                &lin.base_weight()?,
                &mut rng,
                &dev,
            )?),
            (
                AdapterKind::Lora {
                    r,
                    alpha,
                    rslora,
                    dora,
                    dropout,
                    ..
                },
                Some((w, file)),
            ) => {
                let mut fetch = |suffix: &str, shape: &[usize]| -> Result<Var> {
                    let v = trainable_from(w, file, &key(suffix), shape, &dev)?;
                    used += 1;
                    Ok(v)
                };
                let a = fetch("lora_A.weight", &[*r, inp])?;
                let b = fetch("lora_B.weight", &[out, *r])?;
                let magnitude = if *dora {
                    Some(fetch("lora_magnitude_vector", &[out])?)
                } else {
                    None
                };
                ModuleAdapter::Lora(LoraModule {
                    a,
                    b,
                    magnitude,
                    scale: lora_scale(*alpha, *r, *rslora),
                    dropout: *dropout,
                })
            }
            (AdapterKind::Full, None) => {
                ModuleAdapter::Transform(Arc::new(crate::full::FullDelta::zeros(out, inp, &dev)?))
            }
            (AdapterKind::Full, Some((w, file))) => {
                let delta =
                    trainable_from(w, file, &key(crate::full::DELTA_KEY), &[out, inp], &dev)?;
                used += 1;
                ModuleAdapter::Transform(Arc::new(crate::full::FullDelta { delta }))
            }
            (AdapterKind::Orth(_), w) => {
                let t: Arc<dyn WeightTransform> =
                    crate::orth::build(&config, &lin.name, out, inp, w, &mut rng, &dev, &mut used)?;
                ModuleAdapter::Transform(t)
            }
        };
        lin.adapters[idx] = Some(module);
    }
    if n_targets == 0 {
        return Err(ModelError::Invalid(format!(
            "adapter {name:?}: target_modules match no linear layer of this model"
        )));
    }
    if let Some((w, file)) = weights
        && used != w.len()
    {
        {
            let mut extra: Vec<&String> = w
                .keys()
                .filter(|k| {
                    !host
                        .linears()
                        .iter()
                        .any(|l| k.starts_with(&format!("{KEY_PREFIX}{}.", l.name)))
                })
                .collect();
            extra.sort();
            return Err(ModelError::Weight {
                file: file.to_path_buf(),
                name: extra
                    .first()
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "(some)".into()),
                problem: format!(
                    "{} of {} tensors were not used by any targeted module",
                    w.len() - used,
                    w.len()
                ),
            });
        }
    }
    let set = host.adapter_set_mut();
    set.names.push(name.to_string());
    set.configs.push(config);
    if set.active.is_none() {
        set.active = Some(idx);
    }
    Ok(idx)
}

/// Load a PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`) as `name`.
pub fn load_adapter(host: &mut dyn AdapterHost, dir: &Path, name: &str) -> Result<usize> {
    let config = AdapterConfig::load(dir)?;
    let file: PathBuf = dir.join("adapter_model.safetensors");
    let dev = host
        .linears()
        .first()
        .map(|l| l.device().clone())
        .unwrap_or(Device::Cpu);
    let weights = candle_core::safetensors::load(&file, &dev).map_err(|e| ModelError::Format {
        file: file.clone(),
        problem: e.to_string(),
    })?;
    add_adapter(host, name, config, Some((&weights, &file)), 0)
}

/// Register a frozen copy of adapter `from` as `name` and make it the set's reference adapter
/// (`AdapterSet::reference`): same config, its tensors copied (so training `from` leaves the
/// copy as it was). Its parameters are not returned for `from` by [`adapter_params`], so they never
/// reach an optimizer, and a reference forward reads them detached. Returns its index.
pub fn add_frozen_copy(host: &mut dyn AdapterHost, from: usize, name: &str) -> Result<usize> {
    let config = host
        .adapter_set()
        .configs
        .get(from)
        .cloned()
        .ok_or_else(|| ModelError::Invalid(format!("no adapter with index {from}")))?;
    let weights: HashMap<String, Tensor> = adapter_params(host, from)
        .into_iter()
        .map(|(k, v)| Ok((k, v.as_tensor().detach().copy()?)))
        .collect::<Result<_>>()?;
    let source = PathBuf::from(format!("(copy of adapter {from})"));
    let idx = add_adapter(host, name, config, Some((&weights, &source)), 0)?;
    host.adapter_set_mut().reference = Some(idx);
    Ok(idx)
}

/// The trainable parameters of adapter `idx` under their PEFT state-dict names.
pub fn adapter_params(host: &dyn AdapterHost, idx: usize) -> Vec<(String, Var)> {
    let mut out = Vec::new();
    for lin in host.linears() {
        if let Some(Some(m)) = lin.adapters.get(idx) {
            for (suffix, v) in m.params() {
                out.push((format!("{KEY_PREFIX}{}.{suffix}", lin.name), v));
            }
        }
    }
    out
}

/// Save adapter `name` as PEFT does: `adapter_config.json` and `adapter_model.safetensors` in
/// `dir`, each written to a temporary file and renamed into place.
pub fn save_adapter(host: &dyn AdapterHost, name: &str, dir: &Path) -> Result<()> {
    let set = host.adapter_set();
    let idx = set
        .index(name)
        .ok_or_else(|| ModelError::Invalid(format!("no adapter named {name:?}")))?;
    std::fs::create_dir_all(dir).map_err(|source| ModelError::Write {
        file: dir.to_path_buf(),
        source,
    })?;
    let tensors: Vec<(String, Tensor)> = adapter_params(host, idx)
        .into_iter()
        .map(|(k, v)| {
            Ok((
                k,
                v.as_tensor()
                    .to_dtype(DType::F32)?
                    .to_device(&Device::Cpu)?,
            ))
        })
        .collect::<Result<_>>()?;
    let st = dir.join("adapter_model.safetensors");
    let tmp = dir.join(".adapter_model.safetensors.tmp");
    candle_core::safetensors::save(&tensors.into_iter().collect::<HashMap<_, _>>(), &tmp).map_err(
        |e| ModelError::Write {
            file: st.clone(),
            source: std::io::Error::other(e.to_string()),
        },
    )?;
    crate::files::follow_umask(&tmp).map_err(|source| ModelError::Write {
        file: st.clone(),
        source,
    })?;
    let cfg = dir.join("adapter_config.json");
    let cfg_tmp = dir.join(".adapter_config.json.tmp");
    let text = serde_json::to_string_pretty(&Value::Object(set.configs[idx].raw.clone())).map_err(
        |e| ModelError::Write {
            file: cfg.clone(),
            source: std::io::Error::other(e.to_string()),
        },
    )?;
    std::fs::write(&cfg_tmp, text).map_err(|source| ModelError::Write {
        file: cfg.clone(),
        source,
    })?;
    std::fs::rename(&tmp, &st).map_err(|source| ModelError::Write { file: st, source })?;
    std::fs::rename(&cfg_tmp, &cfg).map_err(|source| ModelError::Write { file: cfg, source })?;
    Ok(())
}

/// Check that every tensor of the state dict `w` (read from `file`) is finite: one device-side
/// count of NaN/infinite values per tensor, all read back with a single transfer. The error names
/// the first offending tensor (in name order) and the file.
pub fn check_finite(w: &HashMap<String, Tensor>, file: &Path) -> Result<()> {
    let mut names: Vec<&String> = w.keys().collect();
    names.sort();
    let mut counts = Vec::with_capacity(names.len());
    for name in &names {
        let t = w[*name].to_dtype(DType::F32)?.flatten_all()?;
        // x - x is 0 for a finite x and NaN for NaN or ±inf; NaN != 0 holds.
        counts.push(t.sub(&t)?.ne(0f32)?.to_dtype(DType::F32)?.sum_all()?);
    }
    if counts.is_empty() {
        return Ok(());
    }
    let counts = Tensor::stack(&counts, 0)?.to_vec1::<f32>()?;
    match names.iter().zip(&counts).find(|&(_, &c)| c != 0.0) {
        None => Ok(()),
        Some((name, &count)) => Err(ModelError::NonFinite {
            file: file.to_path_buf(),
            name: (*name).clone(),
            count: count as u64,
            numel: w[*name].elem_count(),
        }),
    }
}

/// Tensor `key` of a PEFT state dict `w` (read from `file`) as an f32 `Var` on `dev`, after
/// checking it exists and has `shape`; errors name the file and the tensor.
pub(crate) fn trainable_from(
    w: &HashMap<String, Tensor>,
    file: &Path,
    key: &str,
    shape: &[usize],
    dev: &Device,
) -> Result<Var> {
    let t = w.get(key).ok_or_else(|| ModelError::Weight {
        file: file.to_path_buf(),
        name: key.to_string(),
        problem: "missing".into(),
    })?;
    if t.dims() != shape {
        return Err(ModelError::Weight {
            file: file.to_path_buf(),
            name: key.to_string(),
            problem: format!("shape {:?}, expected {shape:?}", t.dims()),
        });
    }
    Ok(Var::from_tensor(&t.to_dtype(DType::F32)?.to_device(dev)?)?)
}

/// Load the PEFT adapter in `dir` and fold it into the base weights for good: afterwards the
/// model behaves as base + adapter with every adapter off, and no adapter is registered (the
/// original base weights are not kept). For a stage that becomes the next stage's base, e.g. an
/// SFT adapter under a preference adapter; fails if adapters are already registered.
pub fn bake_adapter(host: &mut dyn AdapterHost, dir: &Path) -> Result<()> {
    if !host.adapter_set().names.is_empty() {
        return Err(ModelError::Invalid(
            "bake_adapter needs a model without registered adapters".into(),
        ));
    }
    let idx = load_adapter(host, dir, "baked")?;
    for lin in host.linears_mut() {
        lin.merge(idx)?;
        lin.merged = None;
        lin.adapters.clear();
    }
    *host.adapter_set_mut() = AdapterSet::default();
    Ok(())
}

/// Write a Hugging Face model folder with adapter `name` merged into the weights, for a full
/// fine-tune (or any adapter) to be used without this crate: `out_dir/model.safetensors` holds
/// every tensor of the base folder's safetensors (one file, even from a sharded base), with each
/// linear layer's weight replaced by the model's effective weight (the adapted weight where the
/// adapter targets the layer, the current base weight elsewhere, so an SFT stage folded in with
/// [`bake_adapter`] is kept), cast to the dtype of the base file's tensor; `config.json`,
/// `generation_config.json` and the tokenizer files of the base folder are copied when present.
/// Each file is written to a temporary name and renamed into place.
///
/// # Errors
/// [`ModelError::Invalid`] for an unknown adapter or a quantised base, [`ModelError::Weight`]
/// when a linear layer has no `<module>.weight` in the base files, I/O and format errors naming
/// the file.
pub fn export_merged(
    host: &dyn AdapterHost,
    name: &str,
    base_dir: &Path,
    out_dir: &Path,
) -> Result<()> {
    let idx = host
        .adapter_set()
        .index(name)
        .ok_or_else(|| ModelError::Invalid(format!("no adapter named {name:?}")))?;
    if let Some(lin) = host
        .linears()
        .into_iter()
        .find(|l| l.weight.quantized().is_some())
    {
        return Err(ModelError::Invalid(format!(
            "{}: the base weight is quantised (model.quantize); a merged export needs the \
             unquantised base",
            lin.name
        )));
    }
    let mut tensors = crate::llama::load_safetensors(base_dir, &Device::Cpu)?;
    for lin in host.linears() {
        let key = format!("{}.weight", lin.name);
        let Some(old) = tensors.get(&key) else {
            return Err(ModelError::Weight {
                file: base_dir.to_path_buf(),
                name: key,
                problem: "missing from the base model's safetensors".into(),
            });
        };
        let w = match &lin.merged {
            Some((j, _)) if *j == idx => lin.weight.dense()?,
            _ => lin.adapted_weight(idx)?,
        };
        if w.dims() != old.dims() {
            return Err(ModelError::Weight {
                file: base_dir.to_path_buf(),
                name: key,
                problem: format!(
                    "shape {:?} in the file, {:?} in the model",
                    old.dims(),
                    w.dims()
                ),
            });
        }
        let w = w.to_device(&Device::Cpu)?.to_dtype(old.dtype())?;
        tensors.insert(key, w);
    }
    std::fs::create_dir_all(out_dir).map_err(|source| ModelError::Write {
        file: out_dir.to_path_buf(),
        source,
    })?;
    let dst = out_dir.join("model.safetensors");
    let tmp = out_dir.join("model.safetensors.tmp");
    candle_core::safetensors::save(&tensors, &tmp).map_err(|e| ModelError::Format {
        file: tmp.clone(),
        problem: e.to_string(),
    })?;
    crate::files::follow_umask(&tmp).map_err(|source| ModelError::Write {
        file: dst.clone(),
        source,
    })?;
    std::fs::rename(&tmp, &dst).map_err(|source| ModelError::Write { file: dst, source })?;
    for f in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "tokenizer.model",
    ] {
        let src = base_dir.join(f);
        if src.is_file() {
            let tmp = out_dir.join(format!("{f}.tmp"));
            std::fs::copy(&src, &tmp).map_err(|source| ModelError::Write {
                file: tmp.clone(),
                source,
            })?;
            let d = out_dir.join(f);
            std::fs::rename(&tmp, &d).map_err(|source| ModelError::Write { file: d, source })?;
        }
    }
    Ok(())
}
