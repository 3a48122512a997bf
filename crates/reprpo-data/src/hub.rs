//! Hugging Face Hub datasets by id, config and split: the Parquet files of the hub's automatic
//! Parquet conversion (revision `refs/convert/parquet`), downloaded through `hf-hub` into the
//! standard cache (`HF_HOME`), or, with `HF_HUB_OFFLINE=1`, found in that cache only.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

use crate::error::{DataError, Result};
use crate::recipe::HubSource;

/// The revision under which the hub keeps its Parquet conversion of every dataset.
pub const PARQUET_REVISION: &str = "refs/convert/parquet";

/// The local path `s` names, when it looks like one rather than a hub id: it starts with `/`,
/// `./`, `../` or `~` (`~/` is the home folder), is `.` or `..`, or its parent folder exists.
/// `None` for a hub id such as `meta-llama/Llama-3.2-1B` (unless a folder `meta-llama` exists
/// here).
pub fn local_path(s: &str) -> Option<PathBuf> {
    if s == "~" || s.starts_with("~/") {
        let rest = s.strip_prefix('~').unwrap_or(s).trim_start_matches('/');
        return Some(match std::env::var_os("HOME") {
            Some(home) => PathBuf::from(home).join(rest),
            None => PathBuf::from(s),
        });
    }
    let p = Path::new(s);
    let looks_local = s.starts_with('/')
        || s.starts_with("./")
        || s.starts_with("../")
        || s.starts_with('~')
        || s == "."
        || s == ".."
        || p.is_absolute()
        || p.exists()
        || p.parent()
            .is_some_and(|d| !d.as_os_str().is_empty() && d.is_dir());
    looks_local.then(|| p.to_path_buf())
}

/// Whether `HF_HUB_OFFLINE` asks for offline mode ("1", "true", "yes", "on").
pub(crate) fn offline_from_env() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
        .unwrap_or(false)
}

/// Whether a repository file is a Parquet shard of `config`/`split`. Both layouts of the
/// conversion are recognised: `config/split/0000.parquet` and the older
/// `config/<name>-split[-00000-of-00001].parquet`.
pub(crate) fn is_split_file(file: &str, config: &str, split: &str) -> bool {
    if !file.ends_with(".parquet") {
        return false;
    }
    let Some(rest) = file.strip_prefix(config).and_then(|r| r.strip_prefix('/')) else {
        return false;
    };
    if let Some(name) = rest.strip_prefix(split).and_then(|r| r.strip_prefix('/')) {
        return !name.contains('/');
    }
    if rest.contains('/') {
        return false;
    }
    let stem = rest.trim_end_matches(".parquet");
    let stem = match stem.rfind("-of-") {
        // "<name>-train-00000-of-00002": drop the shard suffix.
        Some(i) => stem[..i].rsplit_once('-').map_or(stem, |(s, _)| s),
        None => stem,
    };
    stem == split || stem.ends_with(&format!("-{split}"))
}

fn hub_err(src: &HubSource, message: impl Into<String>) -> DataError {
    DataError::Hub {
        repo: src.to_string(),
        message: message.into(),
    }
}

/// Where and how to reach the hub.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// The cache folder (`$HF_HOME/hub` by default).
    pub cache: Cache,
    /// Never download; use only what the cache holds (`HF_HUB_OFFLINE=1`).
    pub offline: bool,
    /// The hub's address (`HF_ENDPOINT`; `None`: the public hub).
    pub endpoint: Option<String>,
}

impl HubOptions {
    /// From `HF_HOME`, `HF_HUB_OFFLINE` and `HF_ENDPOINT`, as the Python libraries read them.
    pub fn from_env() -> Self {
        HubOptions {
            cache: Cache::from_env(),
            offline: offline_from_env(),
            endpoint: std::env::var("HF_ENDPOINT").ok().filter(|e| !e.is_empty()),
        }
    }
}

/// The local paths of the Parquet files of `src`, downloading them unless `HF_HUB_OFFLINE` is set.
pub fn dataset_files(src: &HubSource) -> Result<Vec<PathBuf>> {
    dataset_files_with(src, &HubOptions::from_env())
}

/// [`dataset_files`] with explicit options (tests use a cache folder and a loopback endpoint).
/// Files already in the cache are not downloaded again.
pub fn dataset_files_with(src: &HubSource, opts: &HubOptions) -> Result<Vec<PathBuf>> {
    let repo = Repo::with_revision(src.repo.clone(), RepoType::Dataset, PARQUET_REVISION.into());
    if opts.offline {
        return cached_files(src, &opts.cache, &repo);
    }
    let mut builder = ApiBuilder::from_cache(opts.cache.clone()).with_progress(false);
    if let Some(e) = &opts.endpoint {
        builder = builder.with_endpoint(e.clone());
    }
    let api = builder.build().map_err(|e| hub_err(src, e.to_string()))?;
    let api_repo = api.repo(repo);
    let info = api_repo
        .info()
        .map_err(|e| hub_err(src, format!("cannot list the Parquet conversion: {e}")))?;
    let mut files: Vec<String> = info
        .siblings
        .into_iter()
        .map(|s| s.rfilename)
        .filter(|f| is_split_file(f, &src.config, &src.split))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(hub_err(
            src,
            "the Parquet conversion has no file for this config and split",
        ));
    }
    files
        .iter()
        .map(|f| {
            api_repo
                .get(f)
                .map_err(|e| hub_err(src, format!("cannot download {f}: {e}")))
        })
        .collect()
}

/// Files of `src` already in the cache, for offline mode.
fn cached_files(src: &HubSource, cache: &Cache, repo: &Repo) -> Result<Vec<PathBuf>> {
    let repo_dir = cache.path().join(repo.folder_name());
    let ref_file = repo_dir.join("refs").join(PARQUET_REVISION);
    let not_cached = |what: String| {
        hub_err(
            src,
            format!(
                "{what}, and HF_HUB_OFFLINE=1 forbids downloading it; run once with network access or unset HF_HUB_OFFLINE"
            ),
        )
    };
    let commit = std::fs::read_to_string(&ref_file)
        .map_err(|_| not_cached(format!("not cached ({} is missing)", ref_file.display())))?;
    let snapshot = repo_dir.join("snapshots").join(commit.trim());
    let mut files = Vec::new();
    collect_files(&snapshot, &snapshot, &mut files);
    let mut picked: Vec<PathBuf> = files
        .into_iter()
        .filter(|rel| is_split_file(rel, &src.config, &src.split))
        .map(|rel| snapshot.join(rel))
        .collect();
    picked.sort();
    if picked.is_empty() {
        return Err(not_cached(format!(
            "no cached Parquet file for this config and split under {}",
            snapshot.display()
        )));
    }
    Ok(picked)
}

/// Relative paths (with `/`) of the files under `dir`.
fn collect_files(root: &Path, dir: &Path, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            collect_files(root, &p, out);
        } else if let Ok(rel) = p.strip_prefix(root) {
            let parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            out.push(parts.join("/"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_split_file;

    #[test]
    fn split_file_layouts() {
        assert!(is_split_file(
            "default/train/0000.parquet",
            "default",
            "train"
        ));
        assert!(is_split_file(
            "multiple_choice/validation/0000.parquet",
            "multiple_choice",
            "validation"
        ));
        assert!(!is_split_file(
            "default/test/0000.parquet",
            "default",
            "train"
        ));
        assert!(!is_split_file(
            "other/train/0000.parquet",
            "default",
            "train"
        ));
        assert!(is_split_file(
            "default/hh-rlhf-train.parquet",
            "default",
            "train"
        ));
        assert!(is_split_file(
            "default/hh-rlhf-train-00001-of-00002.parquet",
            "default",
            "train"
        ));
        assert!(!is_split_file(
            "default/hh-rlhf-test.parquet",
            "default",
            "train"
        ));
        assert!(!is_split_file(
            "default/train/0000.json",
            "default",
            "train"
        ));
    }
}
