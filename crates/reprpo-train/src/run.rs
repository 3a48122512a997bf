//! The run folder and what is written into it:
//!
//! ```text
//! runs/<name>-<YYYYmmdd-HHMMSS>/
//!   resolved_config.toml     the configuration after every layer, as used
//!   adapter/                 the trained adapter, PEFT format (written at the end)
//!   sft_adapter/             the SFT stage's adapter, when there was one (folded into the base)
//!   metrics.jsonl            one line per logged step (and per evaluation)
//!   resume_overrides.toml    the key=value arguments applied by each `--resume`, when any
//!   checkpoints/step-NNNNNNN/{adapter/, optimizer.safetensors, trainer_state.json,
//!                             metrics.jsonl (the log up to the step), manifest.json}
//!   plots/*.png              at the end
//!   summary.json             at the end
//! ```
//!
//! Every file is written to a temporary name and renamed into place; a checkpoint folder is
//! built under a temporary name and renamed as a whole, so a crash never leaves a half-written
//! checkpoint where `--resume` would look. A checkpoint's `manifest.json`, written last inside
//! the temporary folder, lists every other file with its size and SHA-256; `--resume` verifies
//! it ([`verify_checkpoint`]) and refuses a checkpoint whose files differ.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError, io};

/// Write `bytes` to `path` atomically (temporary file in the same folder, then rename; the
/// temporary file is removed on failure; [`reprpo_data::write::write_file_atomic`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    reprpo_data::write::write_file_atomic(path, bytes).map_err(|f| io(&f.path)(f.source))
}

/// `YYYYmmdd-HHMMSS` in UTC for a Unix time.
pub fn timestamp(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        secs / 3600,
        (secs % 3600) / 60,
        secs % 60
    )
}

/// Create a fresh run folder `<out_dir>/<name>-<timestamp>` (with a numeric suffix if taken).
pub(crate) fn new_run_dir(out_dir: &Path, name: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(out_dir).map_err(io(out_dir))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let base = format!("{name}-{}", timestamp(now));
    for i in 0..1000 {
        let dir = if i == 0 {
            out_dir.join(&base)
        } else {
            out_dir.join(format!("{base}-{i}"))
        };
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io(&dir)(e)),
        }
    }
    Err(TrainError::Io {
        path: out_dir.join(base),
        cause: std::io::Error::other("no free run folder name"),
    })
}

/// What a checkpoint records besides the adapter and the optimizer moments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: usize,
    /// Total optimizer steps of the run.
    pub total_steps: usize,
    /// bco_pair's running moments (mean, var, count) when used.
    pub running: Option<(f64, f64, f64)>,
    /// [`crate::resume::config_hash`] of the configuration the checkpoint was trained with
    /// (absent in checkpoints written before it existed: those resume with a warning).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_hash: Option<String>,
    /// The final evaluation's metrics with the adapter as it was before the first step (the
    /// summary's "before"; absent in checkpoints written before it existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_eval: Option<BTreeMap<String, f64>>,
}

/// The name of a checkpoint's manifest.
pub const MANIFEST: &str = "manifest.json";

/// One file of a checkpoint manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestEntry {
    /// Size in bytes.
    pub size: u64,
    /// SHA-256, lower-case hex.
    pub sha256: String,
}

/// A checkpoint's `manifest.json`: every other file of the folder (paths relative to it, `/`
/// separated) with its size and SHA-256.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// The files.
    pub files: BTreeMap<String, ManifestEntry>,
}

/// SHA-256 of a file, lower-case hex, and its size.
pub(crate) fn sha256_file(path: &Path) -> Result<ManifestEntry> {
    use sha2::Digest;
    let mut file = std::fs::File::open(path).map_err(io(path))?;
    let mut hasher = sha2::Sha256::new();
    let size = std::io::copy(&mut file, &mut hasher).map_err(io(path))?;
    let sha256 = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(ManifestEntry { size, sha256 })
}

/// Every file under `dir` except the manifest, as `/`-separated relative paths, sorted.
fn checkpoint_files(dir: &Path) -> Result<Vec<String>> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
        for e in std::fs::read_dir(dir).map_err(io(dir))? {
            let p = e.map_err(io(dir))?.path();
            if p.is_dir() {
                walk(root, &p, out)?;
            } else if let Ok(rel) = p.strip_prefix(root) {
                let rel: Vec<String> = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                out.push(rel.join("/"));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    out.retain(|f| f != MANIFEST);
    out.sort();
    Ok(out)
}

/// Write `dir/manifest.json` for every other file of `dir`.
pub fn write_manifest(dir: &Path) -> Result<()> {
    let mut files = BTreeMap::new();
    for f in checkpoint_files(dir)? {
        files.insert(f.clone(), sha256_file(&dir.join(&f))?);
    }
    let path = dir.join(MANIFEST);
    let json =
        serde_json::to_string_pretty(&Manifest { files }).map_err(|e| TrainError::Malformed {
            path: path.clone(),
            problem: e.to_string(),
        })?;
    std::fs::write(&path, json).map_err(io(&path))
}

/// A checkpoint that passed [`verify_checkpoint`].
#[derive(Debug, Clone)]
pub struct Verified {
    /// The checkpoint folder.
    pub dir: PathBuf,
    /// Its trainer state.
    pub state: TrainerState,
    /// False for a checkpoint written before manifests existed (nothing to verify against).
    pub has_manifest: bool,
}

/// Check a checkpoint against its manifest: no file missing, none extra, every size and SHA-256
/// as written; the trainer state parses and its step is the folder's. A checkpoint without a
/// manifest passes only if its trainer state also predates config hashes (an old checkpoint);
/// the caller warns about it.
pub fn verify_checkpoint(dir: &Path) -> Result<Verified> {
    let bad = |file: &str, problem: String| TrainError::CorruptCheckpoint {
        checkpoint: dir.to_path_buf(),
        file: PathBuf::from(file),
        problem,
    };
    let mp = dir.join(MANIFEST);
    let manifest: Option<Manifest> = match std::fs::read_to_string(&mp) {
        Ok(text) => Some(
            serde_json::from_str(&text)
                .map_err(|e| bad(MANIFEST, format!("unreadable manifest: {e}")))?,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io(&mp)(e)),
    };
    if let Some(m) = &manifest {
        let present = checkpoint_files(dir)?;
        if let Some(extra) = present.iter().find(|f| !m.files.contains_key(*f)) {
            return Err(bad(
                extra,
                "not in the manifest (a file added after the checkpoint was written)".into(),
            ));
        }
        for (f, want) in &m.files {
            if !present.contains(f) {
                return Err(bad(f, "missing (listed in the manifest)".into()));
            }
            let got = sha256_file(&dir.join(f))?;
            if got.size != want.size {
                return Err(bad(
                    f,
                    format!("{} bytes, the manifest says {}", got.size, want.size),
                ));
            }
            if got.sha256 != want.sha256 {
                return Err(bad(
                    f,
                    format!(
                        "SHA-256 {} differs from the manifest's {} (changed after it was written)",
                        got.sha256, want.sha256
                    ),
                ));
            }
        }
    }
    let sp = dir.join("trainer_state.json");
    let text =
        std::fs::read_to_string(&sp).map_err(|e| bad("trainer_state.json", e.to_string()))?;
    let state: TrainerState =
        serde_json::from_str(&text).map_err(|e| bad("trainer_state.json", e.to_string()))?;
    if manifest.is_none() && state.config_hash.is_some() {
        return Err(bad(
            MANIFEST,
            "missing (the trainer state says the checkpoint had one)".into(),
        ));
    }
    let named = dir
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("step-"))
        .and_then(|n| n.parse::<usize>().ok());
    if named.is_some_and(|n| n != state.step) {
        return Err(bad(
            "trainer_state.json",
            format!("step {} but the folder is {}", state.step, dir.display()),
        ));
    }
    Ok(Verified {
        dir: dir.to_path_buf(),
        state,
        has_manifest: manifest.is_some(),
    })
}

/// The checkpoint folders of a run (`checkpoints/step-N`), newest first.
pub fn checkpoints(run_dir: &Path) -> Result<Vec<PathBuf>> {
    let dir = run_dir.join("checkpoints");
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut found = Vec::new();
    for e in std::fs::read_dir(&dir).map_err(io(&dir))? {
        let e = e.map_err(io(&dir))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(n) = name
            .strip_prefix("step-")
            .and_then(|s| s.parse::<usize>().ok())
            && e.path().is_dir()
        {
            found.push((n, e.path()));
        }
    }
    found.sort();
    Ok(found.into_iter().rev().map(|(_, p)| p).collect())
}

/// The checkpoint folder of `step`.
pub fn checkpoint_dir(run_dir: &Path, step: usize) -> PathBuf {
    run_dir.join("checkpoints").join(format!("step-{step:07}"))
}

/// The folder of a checkpoint that keeps the frozen initial adapter (`adapter.reference =
/// "initial"`), beside `adapter/`; written by the `write_adapter` callback of [`save_checkpoint`].
pub const REFERENCE_DIR: &str = "reference_adapter";

/// Write a checkpoint atomically: `write_adapter` fills `<tmp>/adapter` (and may write sibling
/// folders such as [`REFERENCE_DIR`], which the manifest covers too), then the optimizer
/// state, the trainer state and `metrics` (the run's log up to this step, what
/// [`crate::metrics::MetricsLog::resume`] checks the log against) are written, then
/// `manifest.json` (sizes and SHA-256 of all of
/// them), then the folder is renamed into place; older
/// checkpoints beyond `keep` are removed.
///
/// Every error names the file at fault and the step; on any failure the temporary folder
/// (`checkpoints/.tmp-step-N`) is removed, so a failed save (a full disk) leaves nothing behind.
pub fn save_checkpoint(
    run_dir: &Path,
    state: &TrainerState,
    optimizer: &HashMap<String, Tensor>,
    keep: usize,
    metrics: &str,
    write_adapter: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let step = state.step;
    let parent = run_dir.join("checkpoints");
    std::fs::create_dir_all(&parent).map_err(|e| at_step(step, &parent, io(&parent)(e)))?;
    let tmp = parent.join(format!(".tmp-step-{step:07}"));
    let written =
        write_checkpoint_files(&tmp, state, optimizer, metrics, write_adapter).and_then(|()| {
            rename_into_place(&tmp, &checkpoint_dir(run_dir, step))
                .map_err(|e| at_step(step, &tmp, e))
        });
    match written {
        Ok(dir) => {
            crash_point(step, "rename");
            prune_checkpoints(run_dir, keep).map_err(|e| at_step(step, &parent, e))?;
            Ok(dir)
        }
        Err(e) => {
            // Best effort: the error at hand is the one to report.
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

/// The fault injection of the kill-and-resume soak (`tests/soak/kill_resume.sh`): with the
/// environment variable `REPRPO_CRASH_AT=STEP:PHASE`, the process aborts (as `kill -9` would:
/// no destructor, no cleanup) right after the checkpoint of step `STEP` finished `PHASE`:
/// `adapter`, `optimizer`, `state`, `metrics`, `manifest` (inside the temporary folder) or
/// `rename` (the folder in place, older ones not yet pruned).
fn crash_point(step: usize, phase: &str) {
    if let Some(v) = std::env::var_os("REPRPO_CRASH_AT")
        && v.to_string_lossy() == format!("{step}:{phase}")
    {
        eprintln!("REPRPO_CRASH_AT={step}:{phase}: aborting");
        std::process::abort();
    }
}

/// `e`, a failure to write `file` of the checkpoint of `step`, as an I/O error naming both.
fn at_step(step: usize, file: &Path, e: TrainError) -> TrainError {
    let (path, kind, text) = match e {
        TrainError::Io { path, cause } => (path, cause.kind(), cause.to_string()),
        other => (
            file.to_path_buf(),
            std::io::ErrorKind::Other,
            other.to_string(),
        ),
    };
    TrainError::Io {
        path,
        cause: std::io::Error::new(
            kind,
            format!("{text} (writing the checkpoint of step {step})"),
        ),
    }
}

/// Fill the temporary checkpoint folder `tmp`: adapter, optimizer, trainer state, metrics,
/// manifest.
fn write_checkpoint_files(
    tmp: &Path,
    state: &TrainerState,
    optimizer: &HashMap<String, Tensor>,
    metrics: &str,
    write_adapter: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let step = state.step;
    if tmp.exists() {
        std::fs::remove_dir_all(tmp).map_err(|e| at_step(step, tmp, io(tmp)(e)))?;
    }
    std::fs::create_dir_all(tmp).map_err(|e| at_step(step, tmp, io(tmp)(e)))?;
    let adapter = tmp.join("adapter");
    write_adapter(&adapter).map_err(|e| at_step(step, &adapter, e))?;
    crash_point(step, "adapter");
    let opt_path = tmp.join("optimizer.safetensors");
    let cpu: HashMap<String, Tensor> = optimizer
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_device(&Device::Cpu)?)))
        .collect::<Result<_>>()?;
    candle_core::safetensors::save(&cpu, &opt_path)
        .map_err(|e| at_step(step, &opt_path, save_error(&opt_path, e)))?;
    reprpo_models::files::follow_umask(&opt_path)
        .map_err(|e| at_step(step, &opt_path, io(&opt_path)(e)))?;
    crash_point(step, "optimizer");
    let state_path = tmp.join("trainer_state.json");
    let json = serde_json::to_string_pretty(state).map_err(|e| TrainError::Malformed {
        path: state_path.clone(),
        problem: e.to_string(),
    })?;
    std::fs::write(&state_path, json)
        .map_err(|e| at_step(step, &state_path, io(&state_path)(e)))?;
    crash_point(step, "state");
    let metrics_path = tmp.join(crate::metrics::METRICS);
    std::fs::write(&metrics_path, metrics)
        .map_err(|e| at_step(step, &metrics_path, io(&metrics_path)(e)))?;
    crash_point(step, "metrics");
    // Last: the manifest of everything above.
    write_manifest(tmp).map_err(|e| at_step(step, &tmp.join(MANIFEST), e))?;
    crash_point(step, "manifest");
    Ok(())
}

/// A safetensors write error as an I/O error on `path` when it is one (without the "I/O
/// error:" prefix safetensors adds).
fn save_error(path: &Path, e: candle_core::Error) -> TrainError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(c) = cause {
        if let Some(source) = c.downcast_ref::<std::io::Error>() {
            let source = std::io::Error::new(source.kind(), source.to_string());
            return io(path)(source);
        }
        cause = c.source();
    }
    e.into()
}

/// Rename the finished temporary folder `tmp` to `final_dir` (replacing an older one).
fn rename_into_place(tmp: &Path, final_dir: &Path) -> Result<PathBuf> {
    if final_dir.exists() {
        std::fs::remove_dir_all(final_dir).map_err(io(final_dir))?;
    }
    std::fs::rename(tmp, final_dir).map_err(io(final_dir))?;
    Ok(final_dir.to_path_buf())
}

/// Remove the oldest checkpoint folders of the run beyond `keep` ([`checkpoints`]; at least
/// one is kept).
fn prune_checkpoints(run_dir: &Path, keep: usize) -> Result<()> {
    for p in checkpoints(run_dir)?.into_iter().skip(keep.max(1)) {
        std::fs::remove_dir_all(&p).map_err(io(&p))?;
    }
    Ok(())
}

/// Read a checkpoint's trainer state and optimizer moments.
pub fn load_checkpoint(dir: &Path) -> Result<(TrainerState, HashMap<String, Tensor>)> {
    let sp = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&sp).map_err(io(&sp))?;
    let state: TrainerState = serde_json::from_str(&text).map_err(|e| TrainError::Malformed {
        path: sp.clone(),
        problem: e.to_string(),
    })?;
    let op = dir.join("optimizer.safetensors");
    let opt =
        candle_core::safetensors::load(&op, &Device::Cpu).map_err(|e| TrainError::Malformed {
            path: op.clone(),
            problem: e.to_string(),
        })?;
    Ok((state, opt))
}
