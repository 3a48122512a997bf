//! The sweep file (TOML): what to train, crossed how, with which seeds, scored how.
//!
//! ```toml
//! name = "default-dpo-vs-reprpo"      # optional; default: the file's stem
//! base = "../configs/my.toml"         # a train config (relative to this file), or a table:
//! # [base]
//! # file = "../configs/my.toml"       #   optional config file, then inline keys
//! # "train.max_steps" = 20
//! seeds = 5                           # seeds 0..=4, or a list: [0, 7, 42]
//! seed_keys = ["train.seed", "adapter.seed"]   # the default: data order, SFT stage and adapter init
//! baseline = "dpo"                    # a configuration label, a variant name, `key=value`, or an axis value
//!
//! [axes]                              # any configuration key -> its values; crossed (cartesian product)
//! "train.lr" = [1e-3, 1e-2]
//!
//! [[variant]]                         # named bundles of keys, one more axis (optional)
//! name = "dpo"
//! loss = "dpo"
//!
//! [eval]                              # optional: `cargo xtask eval` suites scored after each run
//! suites = ["default"]                # names in datasets/suites/, or files relative to this file
//! options = { limit = 100 }           # eval options (keys of `cargo xtask eval --help`;
//!                                     # `generations = 0` unless given)
//!
//! [report]
//! metric = "acc"                      # `acc` (accuracy) or `prob` (mean probability of the preferred answer)
//!
//! [slurm]                             # resources of `sweep slurm` (see `slurm.rs`)
//!
//! [search]                            # optional random search (see `search.rs`)
//! budget = 8
//! space = { "train.lr" = { log_uniform = [1e-4, 1e-2] } }
//! ```
//!
//! Keys may be written dotted (`"train.lr" = 1e-4`) or nested (`[base.train] lr = 1e-4`): both
//! mean the configuration key `train.lr`. Axis keys are crossed in alphabetical order (the
//! file's order is not kept by every TOML map), each axis's values in the file's order.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, SweepError, io, key_err};

/// The default keys a seed sets: the data order (and SFT stage) and the adapter's init.
pub const DEFAULT_SEED_KEYS: [&str; 2] = ["train.seed", "adapter.seed"];

/// A parsed, checked sweep file (configuration keys are checked when the runs are planned).
#[derive(Debug, Clone, PartialEq)]
pub struct SweepSpec {
    /// The sweep file (absolute).
    pub file: PathBuf,
    /// Its name (`name`, else the file's stem).
    pub name: String,
    /// Free text.
    pub description: Option<String>,
    /// A train config file under the sweep's keys (absolute).
    pub base_file: Option<PathBuf>,
    /// Inline base keys, flattened to dotted keys.
    pub base_keys: Vec<(String, toml::Value)>,
    /// Named variants (one more axis, crossed with `axes`).
    pub variants: Vec<Variant>,
    /// Axes: key and values, keys in alphabetical order.
    pub axes: Vec<(String, Vec<toml::Value>)>,
    /// The seeds.
    pub seeds: Vec<u64>,
    /// The configuration keys each seed is written to.
    pub seed_keys: Vec<String>,
    /// The baseline of the paired differences.
    pub baseline: Option<String>,
    /// Evaluation after training.
    pub eval: EvalSpec,
    /// The reported metric.
    pub metric: Metric,
    /// `sweep slurm`'s resources.
    pub slurm: SlurmSpec,
    /// A random or TPE search over ranges (`[search]`, see `search.rs` and `tpe.rs`).
    pub search: Option<crate::search::Search>,
}

/// A named bundle of configuration keys.
#[derive(Debug, Clone, PartialEq)]
pub struct Variant {
    /// Its name (part of the labels).
    pub name: String,
    /// Its keys, flattened.
    pub keys: Vec<(String, toml::Value)>,
}

/// The suites scored after training, and the eval options.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct EvalSpec {
    /// The suites.
    pub suites: Vec<SuiteRef>,
    /// `key=value` eval options (`limit=100`), checked against `EvalOptions`.
    pub options: Vec<String>,
}

/// A suite: its name (the folder of its results) and what `--suite` gets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SuiteRef {
    /// The suite's name: a name in `datasets/suites/`, or the stem of a suite file.
    pub name: String,
    /// A name, or a suite file's absolute path.
    pub arg: String,
}

/// The metric a report compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    /// Accuracy (preference accuracy of pairs, argmax accuracy of multiple choice).
    #[default]
    Acc,
    /// Mean probability of the preferred completion (pairs: `sigmoid(delta)`; MC: the normalised
    /// probability of the correct answer).
    Prob,
}

impl Metric {
    /// `acc` / `prob`.
    pub fn name(self) -> &'static str {
        match self {
            Metric::Acc => "acc",
            Metric::Prob => "prob",
        }
    }
}

/// `[slurm]`: the resources of the array job `sweep slurm` writes.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SlurmSpec {
    /// `--job-name` (default: the sweep's name).
    pub job_name: Option<String>,
    /// `--partition`.
    pub partition: Option<String>,
    /// `--account`.
    pub account: Option<String>,
    /// `--time` (e.g. `02:00:00`).
    pub time: Option<String>,
    /// `--cpus-per-task` (also each task's `RAYON_NUM_THREADS`).
    pub cpus_per_task: Option<u32>,
    /// `--mem` (e.g. `32G`).
    pub mem: Option<String>,
    /// `--gres` (e.g. `gpu:1`).
    pub gres: Option<String>,
    /// At most this many array tasks at once (`--array=0-N%M`).
    pub parallel: Option<usize>,
    /// More `#SBATCH` options, each as given (`--qos=high`).
    pub extra: Vec<String>,
    /// Shell lines run before the task (`module load cuda/13.0`).
    pub setup: Vec<String>,
    /// The xtask binary the tasks run (default: the one writing the script).
    pub binary: Option<String>,
}

/// The file as written, before checks.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSweep {
    name: Option<String>,
    description: Option<String>,
    base: Option<toml::Value>,
    #[serde(default)]
    axes: toml::Table,
    #[serde(default)]
    variant: Vec<toml::Table>,
    seeds: Option<toml::Value>,
    seed_keys: Option<Vec<String>>,
    baseline: Option<String>,
    #[serde(default)]
    eval: RawEval,
    #[serde(default)]
    report: RawReport,
    #[serde(default)]
    slurm: SlurmSpec,
    search: Option<toml::Table>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEval {
    #[serde(default)]
    suites: Vec<String>,
    #[serde(default)]
    options: toml::Table,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReport {
    #[serde(default)]
    metric: Metric,
}

impl SweepSpec {
    /// Read and check the sweep file `file` (configuration keys are checked by
    /// [`crate::plan::plan`]).
    pub fn load(file: &Path) -> Result<SweepSpec> {
        let text = std::fs::read_to_string(file).map_err(io(file))?;
        let file = std::path::absolute(file).map_err(io(file))?;
        SweepSpec::parse(&file, &text)
    }

    /// Check the text of the sweep file `file` (absolute).
    pub fn parse(file: &Path, text: &str) -> Result<SweepSpec> {
        let raw: RawSweep = toml::from_str(text).map_err(|e| SweepError::Parse {
            file: file.to_path_buf(),
            problem: e.to_string().trim().to_string(),
        })?;
        let dir = file.parent().unwrap_or(Path::new("."));
        let (base_file, base_keys) = base(file, dir, raw.base)?;
        let name = match raw.name {
            Some(n) if n.trim().is_empty() => return Err(key_err(file, "name", "is empty")),
            Some(n) => n,
            None => file
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "sweep".into()),
        };
        let seed_keys = seed_keys(file, raw.seed_keys)?;
        let axes = axes(file, raw.axes, &seed_keys)?;
        let mut taken: Vec<String> = axes.iter().map(|(k, _)| k.clone()).collect();
        taken.extend(seed_keys.iter().cloned());
        let search = crate::search::parse(file, raw.search, &taken)?;
        Ok(SweepSpec {
            file: file.to_path_buf(),
            name,
            description: raw.description,
            base_file,
            base_keys,
            variants: variants(file, raw.variant)?,
            axes,
            seeds: seeds(file, raw.seeds)?,
            seed_keys,
            baseline: raw.baseline,
            eval: eval(file, dir, raw.eval)?,
            metric: raw.report.metric,
            slurm: raw.slurm,
            search,
        })
    }
}

/// Every leaf of `table` as `(dotted key, value)`, under `prefix`.
pub fn flatten(prefix: &str, table: &toml::Table, out: &mut Vec<(String, toml::Value)>) {
    for (k, v) in table {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(t) => flatten(&key, t, out),
            other => out.push((key, other.clone())),
        }
    }
}

/// Flattened configuration keys with their values.
type Keys = Vec<(String, toml::Value)>;

/// `base`: a file name, or a table of keys with an optional `file`.
fn base(file: &Path, dir: &Path, raw: Option<toml::Value>) -> Result<(Option<PathBuf>, Keys)> {
    let config_file = |p: &str, key: &str| -> Result<PathBuf> {
        let path = dir.join(p);
        if !path.is_file() {
            return Err(key_err(
                file,
                key,
                format!(
                    "{} is not a file (relative paths are relative to the sweep file's folder)",
                    path.display()
                ),
            ));
        }
        std::path::absolute(&path).map_err(io(&path))
    };
    match raw {
        None => Ok((None, Vec::new())),
        Some(toml::Value::String(p)) => Ok((Some(config_file(&p, "base")?), Vec::new())),
        Some(toml::Value::Table(mut t)) => {
            let path = match t.remove("file") {
                None => None,
                Some(toml::Value::String(p)) => Some(config_file(&p, "base.file")?),
                Some(_) => return Err(key_err(file, "base.file", "must be a string (a path)")),
            };
            let mut keys = Vec::new();
            flatten("", &t, &mut keys);
            Ok((path, keys))
        }
        Some(_) => Err(key_err(
            file,
            "base",
            "must be a config file name or a table of configuration keys",
        )),
    }
}

fn variants(file: &Path, raw: Vec<toml::Table>) -> Result<Vec<Variant>> {
    let mut out: Vec<Variant> = Vec::with_capacity(raw.len());
    for (i, mut t) in raw.into_iter().enumerate() {
        let at = format!("variant[{i}]");
        let name = match t.remove("name") {
            Some(toml::Value::String(n)) if !n.trim().is_empty() => n,
            _ => {
                return Err(key_err(
                    file,
                    format!("{at}.name"),
                    "a non-empty string is required",
                ));
            }
        };
        if out.iter().any(|v| v.name == name) {
            return Err(key_err(
                file,
                format!("{at}.name"),
                format!("`{name}` is used twice"),
            ));
        }
        let mut keys = Vec::new();
        flatten("", &t, &mut keys);
        out.push(Variant { name, keys });
    }
    Ok(out)
}

fn axes(
    file: &Path,
    raw: toml::Table,
    seed_keys: &[String],
) -> Result<Vec<(String, Vec<toml::Value>)>> {
    let mut flat = Vec::new();
    flatten("", &raw, &mut flat);
    let mut out = Vec::with_capacity(flat.len());
    for (key, v) in flat {
        let at = format!("axes.\"{key}\"");
        let toml::Value::Array(values) = v else {
            return Err(key_err(
                file,
                at,
                "must be a list of values, e.g. [1e-4, 3e-4]",
            ));
        };
        if values.is_empty() {
            return Err(key_err(file, at, "has no values"));
        }
        if seed_keys.contains(&key) {
            return Err(key_err(
                file,
                at,
                "is set by `seeds` (seed_keys); sweep seeds with `seeds = N` or a list",
            ));
        }
        for (i, a) in values.iter().enumerate() {
            if values[..i].contains(a) {
                return Err(key_err(file, at, format!("lists {a} twice")));
            }
        }
        out.push((key, values));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

fn seeds(file: &Path, raw: Option<toml::Value>) -> Result<Vec<u64>> {
    let bad = |p: &str| key_err(file, "seeds", p);
    let seed = |v: &toml::Value| match v {
        toml::Value::Integer(n) if *n >= 0 => Ok(*n as u64),
        _ => Err(bad("seeds are non-negative integers")),
    };
    let out: Vec<u64> = match raw {
        None => vec![0],
        Some(toml::Value::Integer(n)) if n >= 1 => (0..n as u64).collect(),
        Some(toml::Value::Integer(_)) => return Err(bad("must be at least 1")),
        Some(toml::Value::Array(a)) if !a.is_empty() => {
            a.iter().map(seed).collect::<Result<_>>()?
        }
        Some(_) => {
            return Err(bad(
                "must be a count (seeds = 5) or a non-empty list (seeds = [0, 7])",
            ));
        }
    };
    for (i, s) in out.iter().enumerate() {
        if out[..i].contains(s) {
            return Err(bad(&format!("lists {s} twice")));
        }
    }
    Ok(out)
}

fn seed_keys(file: &Path, raw: Option<Vec<String>>) -> Result<Vec<String>> {
    match raw {
        None => Ok(DEFAULT_SEED_KEYS.iter().map(|s| s.to_string()).collect()),
        Some(k) if k.is_empty() => Err(key_err(
            file,
            "seed_keys",
            "is empty: the seeds would change nothing",
        )),
        Some(k) => Ok(k),
    }
}

fn eval(file: &Path, dir: &Path, raw: RawEval) -> Result<EvalSpec> {
    let mut suites: Vec<SuiteRef> = Vec::with_capacity(raw.suites.len());
    for s in raw.suites {
        let is_path = s.ends_with(".toml") || s.contains('/') || s.contains('\\');
        let r = if is_path {
            let p = dir.join(&s);
            if !p.is_file() {
                return Err(key_err(
                    file,
                    "eval.suites",
                    format!(
                        "{} is not a file (relative to the sweep file's folder)",
                        p.display()
                    ),
                ));
            }
            let name = p
                .file_stem()
                .map(|x| x.to_string_lossy().into_owned())
                .unwrap_or_default();
            let abs = std::path::absolute(&p).map_err(io(&p))?;
            SuiteRef {
                name,
                arg: abs.display().to_string(),
            }
        } else {
            SuiteRef {
                name: s.clone(),
                arg: s,
            }
        };
        if suites.iter().any(|x| x.name == r.name) {
            return Err(key_err(
                file,
                "eval.suites",
                format!("suite `{}` is listed twice", r.name),
            ));
        }
        suites.push(r);
    }
    let mut flat = Vec::new();
    flatten("", &raw.options, &mut flat);
    let mut options: Vec<String> = Vec::with_capacity(flat.len() + 1);
    // Greedy generations are for reading, not for comparing: none unless asked for.
    if !flat.iter().any(|(k, _)| k == "generations") {
        options.push("generations=0".into());
    }
    options.extend(flat.into_iter().map(|(k, v)| format!("{k}={v}")));
    Ok(EvalSpec { suites, options })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<SweepSpec> {
        SweepSpec::parse(Path::new("/nowhere/s.toml"), text)
    }

    #[test]
    fn dotted_and_nested_keys_flatten_alike() {
        let s = parse("[axes]\n\"train.lr\" = [1, 2]\n[axes.adapter]\nr = [4]\n[[variant]]\nname = \"a\"\n[variant.train]\nlr = 3\n").unwrap();
        assert_eq!(s.axes[0].0, "adapter.r");
        assert_eq!(s.axes[1].0, "train.lr");
        assert_eq!(s.variants[0].keys[0].0, "train.lr");
        assert_eq!(s.seeds, vec![0]);
        assert_eq!(s.name, "s");
    }

    #[test]
    fn bad_values_name_the_file_and_key() {
        for (text, key) in [
            ("seeds = 0", "seeds"),
            ("seeds = [1, 1]", "seeds"),
            ("[axes]\n\"train.lr\" = 1", "axes.\"train.lr\""),
            ("[axes]\n\"train.lr\" = []", "axes.\"train.lr\""),
            ("[axes]\n\"train.seed\" = [1, 2]", "axes.\"train.seed\""),
            ("[[variant]]\nloss = \"dpo\"", "variant[0].name"),
            ("base = \"missing.toml\"", "base"),
            ("seed_keys = []", "seed_keys"),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("/nowhere/s.toml: `{key}`")),
                "{text}: {e}"
            );
        }
        let e = parse("axis = 1").unwrap_err().to_string();
        assert!(
            e.contains("/nowhere/s.toml") && e.contains("unknown field `axis`"),
            "{e}"
        );
    }
}
