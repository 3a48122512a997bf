//! Model folders from the Hugging Face Hub by id (`meta-llama/Llama-3.2-1B`): `config.json`,
//! the tokenizer files when present, and `model.safetensors` or the shards of
//! `model.safetensors.index.json`, downloaded through `hf-hub` into the usual cache
//! (`HF_HOME`), or found there only with `HF_HUB_OFFLINE=1`; PEFT adapters by hub id the same way
//! (`adapter_config.json` and `adapter_model.safetensors`).

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

pub use reprpo_data::hub::{HubOptions, local_path};

/// [`model_dir_with`] with options from the environment.
pub fn model_dir(id_or_dir: &str) -> Result<PathBuf> {
    model_dir_with(id_or_dir, &HubOptions::from_env())
}

/// The local folder `id_or_dir` names, when it is one or looks like a path (see [`local_path`]):
/// `Some(Ok(dir))`, or `Some(Err(..))` for a path that is missing ("no such folder") or a file;
/// `None` for a hub id. `if_file` is the problem reported for a file.
fn local_dir(id_or_dir: &str, if_file: &str) -> Option<Result<PathBuf>> {
    let p = Path::new(id_or_dir);
    if p.is_dir() {
        return Some(Ok(p.to_path_buf()));
    }
    let local = local_path(id_or_dir)?;
    Some(if local.is_dir() {
        Ok(local)
    } else if local.exists() {
        Err(ModelError::Format {
            file: local,
            problem: if_file.into(),
        })
    } else {
        Err(ModelError::Format {
            file: local,
            problem: "no such folder".into(),
        })
    })
}

/// One file of hub repository `id` at `rev`: from the cache, else downloaded (unless offline);
/// `None` when the repository has no such file (or, offline, it is not cached).
fn hub_file(id: &str, rev: &str, name: &str, opts: &HubOptions) -> Result<Option<PathBuf>> {
    let repo = Repo::with_revision(id.to_string(), RepoType::Model, rev.to_string());
    if let Some(p) = opts.cache.repo(repo.clone()).get(name) {
        return Ok(Some(p));
    }
    if opts.offline {
        return Ok(None);
    }
    let mut b = ApiBuilder::from_cache(opts.cache.clone()).with_progress(true);
    if let Some(e) = &opts.endpoint {
        b = b.with_endpoint(e.clone());
    }
    let api = b.build().map_err(|e| hub_err(id, e.to_string()))?;
    match api.repo(repo).get(name) {
        Ok(p) => Ok(Some(p)),
        Err(hf_hub::api::sync::ApiError::RequestError(e))
            if e.to_string().contains("status code 404") =>
        {
            Ok(None)
        }
        Err(e) => Err(hub_err(id, format!("{name}: {e}"))),
    }
}

/// The error for a file the hub repository `id` lacks (or that is not cached, offline).
fn missing(id: &str, name: &str, offline: bool) -> ModelError {
    hub_err(
        id,
        if offline {
            format!("{name} is not cached and HF_HUB_OFFLINE=1 forbids downloading it")
        } else {
            format!("no {name} in this repository")
        },
    )
}

/// [`adapter_dir_with`] with options from the environment.
pub fn adapter_dir(id_or_dir: &str) -> Result<PathBuf> {
    adapter_dir_with(id_or_dir, &HubOptions::from_env())
}

/// A local folder for the PEFT adapter `id_or_dir`: the path itself when it is a folder or looks
/// like a path (see [`local_path`]; a missing one is "no such folder"), else the snapshot folder
/// of the hub repository `id_or_dir` (revision `main` unless `id@revision`) holding its
/// `adapter_config.json` and `adapter_model.safetensors`, fetched as needed.
pub fn adapter_dir_with(id_or_dir: &str, opts: &HubOptions) -> Result<PathBuf> {
    if let Some(local) = local_dir(
        id_or_dir,
        "is a file, not a PEFT adapter folder (give the folder holding adapter_config.json)",
    ) {
        return local;
    }
    let (id, rev) = id_or_dir.split_once('@').unwrap_or((id_or_dir, "main"));
    let mut dir = None;
    for name in ["adapter_config.json", "adapter_model.safetensors"] {
        let f = hub_file(id, rev, name, opts)?.ok_or_else(|| missing(id, name, opts.offline))?;
        dir = f.parent().map(Path::to_path_buf);
    }
    dir.ok_or_else(|| hub_err(id, "cache path has no parent"))
}

/// A local folder for `id_or_dir`: the path itself when it is a folder or looks like a path (see
/// [`local_path`]; a missing one is "no such folder"), else the snapshot folder of the hub model
/// `id_or_dir` (revision `main` unless `id@revision`), fetched as needed.
pub fn model_dir_with(id_or_dir: &str, opts: &HubOptions) -> Result<PathBuf> {
    if let Some(local) = local_dir(
        id_or_dir,
        "is a file, not a model folder (give the folder holding config.json)",
    ) {
        return local;
    }
    let (id, rev) = id_or_dir.split_once('@').unwrap_or((id_or_dir, "main"));
    let get = |name: &str| hub_file(id, rev, name, opts);
    let config = get("config.json")?.ok_or_else(|| missing(id, "config.json", opts.offline))?;
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
