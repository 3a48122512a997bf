//! Models by hub id, offline: a cache folder laid out as `hf-hub` writes it
//! (`models--org--name/refs/main`, `snapshots/<commit>/...`) is found and loads; a model that is not
//! cached gives an error that says so. No network.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use candle_core::{DType, Device};
use hf_hub::Cache;
use reprpo_models::Llama;
use reprpo_models::hub::{HubOptions, model_dir_with};

#[test]
fn offline_model_from_cache_by_id() {
    let fixture =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/llama_tied");
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("hub/models--org--tiny");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "abc123").unwrap();
    let snap = repo.join("snapshots/abc123");
    std::fs::create_dir_all(&snap).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture.join(f), snap.join(f)).unwrap();
    }
    let opts = HubOptions {
        cache: Cache::new(dir.path().join("hub")),
        offline: true,
        endpoint: None,
    };
    let got = model_dir_with("org/tiny", &opts).unwrap();
    assert_eq!(got, snap);
    let model = Llama::load(&got, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(model.config.num_layers, 2);
    // A local folder is used as it is.
    assert_eq!(
        model_dir_with(fixture.to_str().unwrap(), &opts).unwrap(),
        fixture
    );
    // Not cached: a clear error.
    let err = model_dir_with("org/absent", &opts).unwrap_err().to_string();
    assert!(
        err.contains("org/absent") && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );
}

/// A PEFT adapter by hub id, offline: the cached snapshot folder holding `adapter_config.json`
/// and `adapter_model.safetensors`; an adapter that is not cached, or a path that does not exist,
/// gives an error that says which.
#[test]
fn offline_adapter_from_cache_by_id() {
    use reprpo_models::hub::adapter_dir_with;
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/train/lora");
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("hub/models--org--lora");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "def456").unwrap();
    let snap = repo.join("snapshots/def456");
    std::fs::create_dir_all(&snap).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(fixture.join(f), snap.join(f)).unwrap();
    }
    let opts = HubOptions {
        cache: Cache::new(dir.path().join("hub")),
        offline: true,
        endpoint: None,
    };
    assert_eq!(adapter_dir_with("org/lora", &opts).unwrap(), snap);
    assert_eq!(
        adapter_dir_with(fixture.to_str().unwrap(), &opts).unwrap(),
        fixture
    );
    let err = adapter_dir_with("org/absent", &opts)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("hub:org/absent")
            && err.contains("adapter_config.json")
            && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );
    let missing = dir.path().join("nope");
    let err = adapter_dir_with(missing.to_str().unwrap(), &opts)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no such folder"), "{err}");
}
