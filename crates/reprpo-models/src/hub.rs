//! Model folders from the Hugging Face Hub by id (`meta-llama/Llama-3.2-1B`): `config.json`,
//! the tokenizer files when present, and `model.safetensors` or the shards of
//! `model.safetensors.index.json`, downloaded through `hf-hub` into the usual cache
//! (`HF_HOME`), or found there only with `HF_HUB_OFFLINE=1`.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Repo, RepoType};

use crate::error::{ModelError, Result};

fn hub_err(repo: &str, problem: impl Into<String>) -> ModelError {
    ModelError::Format {
        file: PathBuf::from(format!("hub:{repo}")),
        problem: problem.into(),
    }
}

pub use reprpo_data::hub::HubOptions;

/// [`model_dir_with`] with options from the environment.
pub fn model_dir(id_or_dir: &str) -> Result<PathBuf> {
    model_dir_with(id_or_dir, &HubOptions::from_env())
}

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

/// A local folder for `id_or_dir`: the path itself when it is a folder or looks like a path (see
/// [`local_path`]; a missing one is "no such folder"), else the snapshot folder of the hub model
/// `id_or_dir` (revision `main` unless `id@revision`), fetched as needed.
pub fn model_dir_with(id_or_dir: &str, opts: &HubOptions) -> Result<PathBuf> {
    let p = Path::new(id_or_dir);
    if p.is_dir() {
        return Ok(p.to_path_buf());
    }
    if let Some(local) = local_path(id_or_dir) {
        return if local.is_dir() {
            Ok(local)
        } else if local.exists() {
            Err(ModelError::Format {
                file: local,
                problem: "is a file, not a model folder (give the folder holding config.json)"
                    .into(),
            })
        } else {
            Err(ModelError::Format {
                file: local,
                problem: "no such folder".into(),
            })
        };
    }
    let (id, rev) = id_or_dir.split_once('@').unwrap_or((id_or_dir, "main"));
    let repo = Repo::with_revision(id.to_string(), RepoType::Model, rev.to_string());
    let offline = opts.offline;
    let cache = opts.cache.clone();
    let get = |name: &str| -> Result<Option<PathBuf>> {
        if let Some(p) = cache.repo(repo.clone()).get(name) {
            return Ok(Some(p));
        }
        if offline {
            return Ok(None);
        }
        let mut b = ApiBuilder::from_cache(cache.clone()).with_progress(true);
        if let Some(e) = &opts.endpoint {
            b = b.with_endpoint(e.clone());
        }
        let api = b.build().map_err(|e| hub_err(id, e.to_string()))?;
        match api.repo(repo.clone()).get(name) {
            Ok(p) => Ok(Some(p)),
            Err(hf_hub::api::sync::ApiError::RequestError(e))
                if e.to_string().contains("status code 404") =>
            {
                Ok(None)
            }
            Err(e) => Err(hub_err(id, format!("{name}: {e}"))),
        }
    };
    let config = get("config.json")?.ok_or_else(|| {
        hub_err(
            id,
            if offline {
                "config.json is not cached and HF_HUB_OFFLINE=1 forbids downloading it"
            } else {
                "no config.json in this repository"
            },
        )
    })?;
    let dir = config
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| hub_err(id, "cache path has no parent"))?;
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        get(f)?;
    }
    if get("model.safetensors")?.is_none() {
        let index = get("model.safetensors.index.json")?.ok_or_else(|| {
            hub_err(
                id,
                "neither model.safetensors nor model.safetensors.index.json (cached)",
            )
        })?;
        let text = std::fs::read_to_string(&index).map_err(|source| ModelError::Io {
            file: index.clone(),
            source,
        })?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::Format {
            file: index.clone(),
            problem: e.to_string(),
        })?;
        let mut shards: Vec<String> = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .map(|m| {
                m.values()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        shards.sort();
        shards.dedup();
        for s in shards {
            get(&s)?.ok_or_else(|| hub_err(id, format!("shard {s} is not available")))?;
        }
    }
    Ok(dir)
}
