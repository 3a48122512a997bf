//! `model.name_or_path` that looks like a local path is never sent to the hub: a missing one is
//! "no such folder". A tokenizer whose ids pass the model's `vocab_size` fails at load time,
//! naming both files. No network: the endpoint is a closed loopback port.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use hf_hub::Cache;
use reprpo_data::Tok;
use reprpo_models::hub::{HubOptions, local_path, model_dir_with};
use reprpo_models::model::{check_vocab, check_vocab_dir};

fn online(cache: &Path) -> HubOptions {
    HubOptions {
        cache: Cache::new(cache.to_path_buf()),
        offline: false,
        // Nothing listens on the discard port: a hub request fails with a connection error.
        endpoint: Some("http://127.0.0.1:9".into()),
    }
}

#[test]
fn missing_local_paths_are_no_such_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = online(&tmp.path().join("hub"));
    let absent_abs = tmp.path().join("no-such-model");
    let home_rel = "~/reprpo-no-such-model-5b1d";
    for p in [
        absent_abs.to_str().unwrap(),
        "./no-such-model",
        "../no-such-model",
        home_rel,
        // A relative path whose parent exists here (the test runs in the crate folder).
        "tests/no-such-model",
    ] {
        let err = model_dir_with(p, &opts).unwrap_err().to_string();
        assert!(err.ends_with(": no such folder"), "{p}: {err}");
        assert!(!err.contains("hub:"), "{p} was sent to the hub: {err}");
        assert!(
            err.contains("no-such-model"),
            "{p}: the message names the path: {err}"
        );
    }
    // `~/` is the home folder.
    if let Some(home) = std::env::var_os("HOME") {
        assert_eq!(
            local_path(home_rel),
            Some(PathBuf::from(home).join("reprpo-no-such-model-5b1d"))
        );
    }
    // A file is not a model folder.
    let file = tmp.path().join("config.json");
    std::fs::write(&file, "{}").unwrap();
    let err = model_dir_with(file.to_str().unwrap(), &opts)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a model folder"), "{err}");
    // An existing folder is used as it is.
    assert_eq!(
        model_dir_with(tmp.path().to_str().unwrap(), &opts).unwrap(),
        tmp.path()
    );
    // Hub ids still go to the hub.
    assert_eq!(local_path("meta-llama/Llama-3.2-1B"), None);
    assert_eq!(local_path("org/absent@main"), None);
    let err = model_dir_with("org/absent", &opts).unwrap_err().to_string();
    assert!(err.contains("hub:org/absent"), "{err}");
}

#[test]
fn tokenizer_past_vocab_size_fails_naming_both_files() {
    let tok = Tok::byte_level().unwrap();
    let max_id = tok.inner.get_vocab(true).into_values().max().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("config.json");
    std::fs::write(&config, r#"{"vocab_size": 128}"#).unwrap();
    let err = check_vocab_dir(&tok, tmp.path()).unwrap_err().to_string();
    assert!(err.contains(&config.display().to_string()), "{err}");
    assert!(
        err.contains(&tmp.path().join("tokenizer.json").display().to_string()),
        "{err}"
    );
    assert!(err.contains("`vocab_size`") && err.contains("128"), "{err}");
    assert!(err.contains(&max_id.to_string()), "{err}");
    // Ids 0..vocab_size fit; one id past it does not.
    let (t, c) = (Path::new("t/tokenizer.json"), Path::new("t/config.json"));
    check_vocab(&tok, max_id as usize + 1, t, c).unwrap();
    check_vocab(&tok, max_id as usize, t, c).unwrap_err();
    std::fs::write(&config, format!(r#"{{"vocab_size": {}}}"#, max_id + 1)).unwrap();
    check_vocab_dir(&tok, tmp.path()).unwrap();
    // No vocab_size: the key is named.
    std::fs::write(&config, "{}").unwrap();
    let err = check_vocab_dir(&tok, tmp.path()).unwrap_err().to_string();
    assert!(err.contains("`vocab_size`"), "{err}");
}
