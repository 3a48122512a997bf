//! `--resume`: which checkpoint, the run's configuration checked against it, and the few
//! settings that may change on resume.
//!
//! - `--resume RUN` takes the newest checkpoint of `RUN/checkpoints/` that verifies against its
//!   manifest ([`run::verify_checkpoint`]), printing each newer one it skips and why;
//!   `--resume RUN/checkpoints/step-N` takes that one (verified; no fallback). Checkpoints newer
//!   than the one taken are moved aside to `checkpoints/skipped-step-N[-i]` (they belong to the
//!   abandoned continuation, and pruning must not keep them over the new ones).
//! - `RUN/resolved_config.toml` must list every key (an empty or cut file is refused, never read
//!   as defaults) and hash ([`config_hash`]) to the hash stored in the checkpoint.
//! - `key=value` arguments may change only [`RESUME_KEYS`]; any other key is refused, naming it.
//!   Applied ones are written into `resolved_config.toml` (so it stays the configuration in use)
//!   and appended to `RUN/resume_overrides.toml` (`[[resume]]` with the checkpoint's step and the
//!   values), and printed.
//!
//! A new `train.max_steps` (or `train.epochs`) changes the run's total: from the resume on, the
//! learning-rate schedule (and a warm-up given by `train.warmup_ratio`, and ReprPO's coefficient
//! schedule) follow the new total, i.e. the remaining steps are those of a run configured with
//! the new total from the start; the steps before the resume followed the old one. With a
//! constant schedule the result is the same, bit for bit, as a straight run to the new total.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::{TrainConfig, parse_override};
use crate::error::{Result, TrainError, io};
use crate::run::{self, Verified};

/// The keys that `key=value` arguments may change on resume: the length of the run, the
/// cadence of logging, checkpoints and evaluation, and the TensorBoard copy of the log (turned on
/// at resume, its new file starts with the records logged so far).
pub const RESUME_KEYS: &[&str] = &[
    "train.max_steps",
    "train.epochs",
    "train.logging_steps",
    "run.save_steps",
    "train.eval_every",
    "run.tensorboard",
];

/// The keys of [`RESUME_KEYS`] that change the total number of steps.
const TOTAL_KEYS: &[&str] = &["train.max_steps", "train.epochs"];

/// Every leaf of a TOML table as `dotted.key -> value` (arrays are leaves).
fn flatten(table: &toml::Table) -> BTreeMap<String, String> {
    fn walk(prefix: &str, t: &toml::Table, out: &mut BTreeMap<String, String>) {
        for (k, v) in t {
            let key = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match v {
                toml::Value::Table(inner) => walk(&key, inner, out),
                other => {
                    out.insert(key, other.to_string());
                }
            }
        }
    }
    let mut out = BTreeMap::new();
    walk("", table, &mut out);
    out
}

fn canonical(cfg: &TrainConfig) -> Result<toml::Table> {
    cfg.to_toml()?
        .parse::<toml::Table>()
        .map_err(|e| TrainError::Config {
            key: "(whole config)".into(),
            problem: format!("its TOML does not read back: {e}"),
        })
}

/// SHA-256 (hex) of the configuration without [`RESUME_KEYS`]: one sorted `key = value` line per
/// leaf of its canonical TOML ([`TrainConfig::to_toml`]). Stored in every checkpoint.
pub fn config_hash(cfg: &TrainConfig) -> Result<String> {
    config_hash_without(cfg, &[])
}

/// [`config_hash`] leaving out the keys `absent` too (keys added to the configuration after a
/// run was written: its checkpoint's hash was taken without them).
pub fn config_hash_without(cfg: &TrainConfig, absent: &[String]) -> Result<String> {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    for (k, v) in flatten(&canonical(cfg)?) {
        if !RESUME_KEYS.contains(&k.as_str()) && !absent.contains(&k) {
            hasher.update(format!("{k} = {v}\n").as_bytes());
        }
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Read a run's `resolved_config.toml` strictly: it must parse and list every key that
/// [`TrainConfig::to_toml`] writes (an empty or cut file is an error naming the file and the
/// first missing keys, never the defaults).
pub fn read_run_config(path: &Path) -> Result<TrainConfig> {
    let (cfg, missing) = read_with_missing(path)?;
    if !missing.is_empty() {
        return Err(incomplete(path, &missing));
    }
    Ok(cfg)
}

/// A run's `resolved_config.toml` (keys it lacks at their defaults) and the keys it lacks.
fn read_with_missing(path: &Path) -> Result<(TrainConfig, Vec<String>)> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let table: toml::Table = text.parse().map_err(|e| TrainError::Malformed {
        path: path.to_path_buf(),
        problem: format!("not valid TOML (cut or damaged?): {e}"),
    })?;
    let cfg = TrainConfig::from_toml_file(path)?;
    let present = flatten(&table);
    let missing: Vec<String> = flatten(&canonical(&cfg)?)
        .into_keys()
        .filter(|k| !present.contains_key(k))
        .collect();
    Ok((cfg, missing))
}

/// The error for a `resolved_config.toml` that lacks `missing` keys.
fn incomplete(path: &Path, missing: &[String]) -> TrainError {
    let shown: Vec<&str> = missing.iter().take(5).map(String::as_str).collect();
    TrainError::Malformed {
        path: path.to_path_buf(),
        problem: format!(
            "incomplete: {} keys missing ({}{}); a resolved config lists every key, so the file \
             is empty or cut, and resuming would train with defaults",
            missing.len(),
            shown.join(", "),
            if missing.len() > shown.len() {
                ", ..."
            } else {
                ""
            }
        ),
    }
}

/// The configuration of a run to resume. A file that lacks keys is accepted only when the
/// checkpoint's hash, taken over the keys the file has, matches: the run was written by an
/// earlier version, before those keys existed, and they take their built-in defaults (which keep
/// that version's behaviour); said on the terminal. Otherwise (an empty or cut file, or no
/// checkpoint hash to check against) it is refused as incomplete.
fn run_config_for(path: &Path, ck: Option<&Verified>) -> Result<(TrainConfig, Vec<String>)> {
    let (cfg, missing) = read_with_missing(path)?;
    if missing.is_empty() {
        return Ok((cfg, missing));
    }
    let stored = ck.and_then(|c| c.state.config_hash.as_ref());
    match stored {
        Some(h) if *h == config_hash_without(&cfg, &missing)? => {
            let values = flatten(&canonical(&cfg)?);
            let shown: Vec<String> = missing
                .iter()
                .map(|k| format!("{k} = {}", values.get(k).map_or("?", String::as_str)))
                .collect();
            println!(
                "resume: {} predates {} key(s), which take their defaults: {}",
                path.display(),
                missing.len(),
                shown.join(", ")
            );
            Ok((cfg, missing))
        }
        _ => Err(incomplete(path, &missing)),
    }
}

/// A checked resume: where, from which checkpoint, with which configuration.
#[derive(Debug, Clone)]
pub struct Resume {
    /// The run folder.
    pub run_dir: PathBuf,
    /// The verified checkpoint (`None`: the run has none yet and starts over at step 0).
    pub checkpoint: Option<Verified>,
    /// The run's configuration with the applied overrides.
    pub cfg: TrainConfig,
    /// The `key=value` arguments applied (all in [`RESUME_KEYS`]).
    pub applied: Vec<(String, toml::Value)>,
    /// Keys the run's `resolved_config.toml` lacked because an earlier version wrote it; they
    /// took their defaults, and [`Resume::begin`] writes the file out whole.
    pub defaulted: Vec<String>,
}

/// Locate, verify and check everything `--resume TARGET key=value...` needs (see the module
/// docs); writes nothing: [`Resume::begin`] does, once the run's total is known.
pub fn prepare(target: &Path, overrides: &[String]) -> Result<Resume> {
    let (run_dir, explicit) = locate(target);
    let applied = parse_overrides(overrides)?;
    let checkpoint = match explicit {
        Some(dir) => Some(run::verify_checkpoint(&dir)?),
        None => newest_verified(&run_dir)?,
    };
    let cfg_path = run_dir.join("resolved_config.toml");
    let (cfg, defaulted) = run_config_for(&cfg_path, checkpoint.as_ref())?;
    match &checkpoint {
        Some(ck) => {
            check_hash(&cfg, &defaulted, &cfg_path, ck)?;
            println!("resume: from {}", ck.dir.display());
        }
        None => println!(
            "resume: {} has no checkpoint yet: starting the run over from step 0",
            run_dir.display()
        ),
    }
    let cfg = apply(cfg, &applied)?;
    Ok(Resume {
        run_dir,
        checkpoint,
        cfg,
        applied,
        defaulted,
    })
}

impl Resume {
    /// Check the run's total steps (computed from the configuration and the data) against the
    /// checkpoint's, then commit to this resume: move newer checkpoints aside, record and print
    /// the applied overrides and write them into `resolved_config.toml`. The totals differ only
    /// when an override changed the length of the run, and then the new total must not be before
    /// the checkpoint.
    pub fn begin(&self, total: usize) -> Result<()> {
        let Some(ck) = &self.checkpoint else {
            return self.record_overrides(0);
        };
        let total_changed = self
            .applied
            .iter()
            .any(|(k, _)| TOTAL_KEYS.contains(&k.as_str()));
        if total_changed && total < ck.state.step {
            return Err(TrainError::Config {
                key: "train.max_steps".into(),
                problem: format!(
                    "the new total of {total} steps is before checkpoint {}'s step {}",
                    ck.dir.display(),
                    ck.state.step
                ),
            });
        }
        if !total_changed && total != ck.state.total_steps {
            return Err(TrainError::Malformed {
                path: self.run_dir.join("resolved_config.toml"),
                problem: format!(
                    "gives {total} total steps but checkpoint {} was written for {} (the data \
                     or train.max_steps/train.epochs changed); pass train.max_steps=N to \
                     continue to N steps",
                    ck.dir.display(),
                    ck.state.total_steps
                ),
            });
        }
        set_aside_newer(&self.run_dir, ck)?;
        self.record_overrides(ck.state.step)
    }

    fn record_overrides(&self, from_step: usize) -> Result<()> {
        if self.applied.is_empty() && self.defaulted.is_empty() {
            return Ok(());
        }
        if !self.applied.is_empty() {
            record(&self.run_dir, from_step, &self.applied)?;
        }
        run::write_atomic(
            &self.run_dir.join("resolved_config.toml"),
            self.cfg.to_toml()?.as_bytes(),
        )
    }
}

/// `(run folder, explicit checkpoint)` of a `--resume` target: `RUN` or
/// `RUN/checkpoints/step-N`.
fn locate(target: &Path) -> (PathBuf, Option<PathBuf>) {
    let parent = target.parent();
    let in_checkpoints = parent
        .and_then(Path::file_name)
        .is_some_and(|n| n == "checkpoints");
    match parent.and_then(Path::parent) {
        Some(run_dir) if in_checkpoints => (run_dir.to_path_buf(), Some(target.to_path_buf())),
        _ => (target.to_path_buf(), None),
    }
}

/// The newest checkpoint that verifies, printing the newer ones skipped; `None` when the run has
/// no checkpoint at all; an error when it has some and none verifies.
fn newest_verified(run_dir: &Path) -> Result<Option<Verified>> {
    let all = run::checkpoints(run_dir)?;
    if all.is_empty() {
        return Ok(None);
    }
    let mut skipped = Vec::new();
    for dir in all {
        match run::verify_checkpoint(&dir) {
            Ok(v) => {
                return Ok(Some(v));
            }
            Err(e) => {
                eprintln!("resume: skipping {e}");
                skipped.push(e.to_string());
            }
        }
    }
    Err(TrainError::NoCheckpoint {
        run_dir: run_dir.to_path_buf(),
        skipped,
    })
}

fn check_hash(
    cfg: &TrainConfig,
    defaulted: &[String],
    cfg_path: &Path,
    ck: &Verified,
) -> Result<()> {
    if !ck.has_manifest {
        eprintln!(
            "warning: checkpoint {} was written before manifests: its files are not verified",
            ck.dir.display()
        );
    }
    let found = config_hash_without(cfg, defaulted)?;
    match &ck.state.config_hash {
        Some(stored) if *stored != found => Err(TrainError::ConfigMismatch {
            path: cfg_path.to_path_buf(),
            checkpoint: ck.dir.clone(),
            stored: stored.clone(),
            found,
        }),
        Some(_) => Ok(()),
        None => {
            eprintln!(
                "warning: checkpoint {} was written before config hashes: {} is not checked \
                 against it",
                ck.dir.display(),
                cfg_path.display()
            );
            Ok(())
        }
    }
}

/// Parse `key=value` arguments, refusing every key outside [`RESUME_KEYS`] (all named at once).
fn parse_overrides(overrides: &[String]) -> Result<Vec<(String, toml::Value)>> {
    let parsed = overrides
        .iter()
        .map(|kv| parse_override(kv))
        .collect::<Result<Vec<_>>>()?;
    let mut refused: Vec<String> = Vec::new();
    for (k, _) in &parsed {
        if !RESUME_KEYS.contains(&k.as_str()) && !refused.contains(k) {
            refused.push(k.clone());
        }
    }
    if !refused.is_empty() {
        return Err(TrainError::ResumeOverride { keys: refused });
    }
    Ok(parsed)
}

/// `cfg` with `applied` set, validated.
fn apply(cfg: TrainConfig, applied: &[(String, toml::Value)]) -> Result<TrainConfig> {
    if applied.is_empty() {
        return Ok(cfg);
    }
    let mut table = canonical(&cfg)?;
    for (key, value) in applied {
        let (section, leaf) = key.split_once('.').unwrap_or(("", key));
        let slot = table
            .entry(section.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let toml::Value::Table(t) = slot {
            t.insert(leaf.to_string(), value.clone());
        }
    }
    let cfg: TrainConfig = toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| TrainError::Config {
            key: applied
                .iter()
                .map(|(k, _)| k.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            problem: e.message().to_string(),
        })?;
    cfg.validate()?;
    Ok(cfg)
}

/// Move the checkpoints newer than `ck` to `checkpoints/skipped-step-N` (`-1`, `-2`, ... when
/// taken).
fn set_aside_newer(run_dir: &Path, ck: &Verified) -> Result<()> {
    for dir in run::checkpoints(run_dir)? {
        if dir == ck.dir {
            break;
        }
        let Some(name) = dir.file_name().map(|n| n.to_string_lossy().into_owned()) else {
            continue;
        };
        // A free name: an earlier resume may have set the same step aside.
        let aside = (0..)
            .map(|i| match i {
                0 => dir.with_file_name(format!("skipped-{name}")),
                i => dir.with_file_name(format!("skipped-{name}-{i}")),
            })
            .find(|p| !p.exists())
            .unwrap_or_else(|| dir.with_file_name(format!("skipped-{name}")));
        std::fs::rename(&dir, &aside).map_err(io(&aside))?;
        println!(
            "resume: moved {} aside to {} (newer than the checkpoint resumed from)",
            dir.display(),
            aside.display()
        );
    }
    Ok(())
}

#[derive(Serialize)]
struct Entry {
    from_step: usize,
    overrides: toml::Table,
}

#[derive(Serialize)]
struct History {
    resume: Vec<Entry>,
}

/// Append the applied overrides to `resume_overrides.toml` and print them.
fn record(run_dir: &Path, from_step: usize, applied: &[(String, toml::Value)]) -> Result<()> {
    let overrides: toml::Table = applied.iter().cloned().collect();
    let shown: Vec<String> = applied.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!(
        "resume: from step {from_step} with {} (recorded in resume_overrides.toml)",
        shown.join(" ")
    );
    let path = run_dir.join("resume_overrides.toml");
    let entry = toml::to_string(&History {
        resume: vec![Entry {
            from_step,
            overrides,
        }],
    })
    .map_err(|e| TrainError::Malformed {
        path: path.clone(),
        problem: e.to_string(),
    })?;
    let mut text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io(&path)(e)),
    };
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&entry);
    run::write_atomic(&path, text.as_bytes())
}
