#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, unsafe_code)]
//! The environment layer of the configuration (`REPRPO_` prefix, `__` between levels): above a
//! TOML file, below `key=value` overrides. Its own test binary with one test, because it sets
//! process environment variables (`set_var` is `unsafe` where other threads read the
//! environment; nothing else runs in this process).

use reprpo_train::{Sources, TrainConfig, TrainError};

#[test]
fn env_sits_between_file_and_overrides() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("run.toml");
    std::fs::write(&file, "[train]\nlr = 0.5\nbatch_size = 3\nseed = 7\n").unwrap();
    // SAFETY: single-threaded test binary; no other code reads the environment concurrently.
    unsafe {
        std::env::set_var("REPRPO_TRAIN__LR", "0.25");
        std::env::set_var("REPRPO_TRAIN__BATCH_SIZE", "5");
        std::env::set_var("REPRPO_ROOT", "/somewhere");
    }
    let cfg = TrainConfig::resolve(&Sources {
        file: Some(file.clone()),
        overrides: vec!["train.batch_size=6".into()],
        env: true,
    })
    .unwrap();
    // file < env < overrides; REPRPO_ROOT is not a config key.
    assert_eq!(cfg.train.lr, 0.25);
    assert_eq!(cfg.train.batch_size, 6);
    assert_eq!(cfg.train.seed, 7);
    // Without the env layer the file's value stands.
    let no_env = TrainConfig::resolve(&Sources {
        file: Some(file),
        overrides: vec![],
        env: false,
    })
    .unwrap();
    assert_eq!(no_env.train.lr, 0.5);
    // A mistyped environment key is an error naming it.
    unsafe {
        std::env::set_var("REPRPO_TRAIN__LRR", "1");
    }
    let err = TrainConfig::resolve(&Sources {
        env: true,
        ..Default::default()
    })
    .unwrap_err();
    assert!(
        matches!(&err, TrainError::Config { key, problem } if key == "train.lrr" && problem.contains("did you mean `lr`")),
        "{err}"
    );
    unsafe {
        std::env::remove_var("REPRPO_TRAIN__LRR");
    }
}
