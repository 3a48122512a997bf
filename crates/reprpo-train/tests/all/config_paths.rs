#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Paths given relative to the working directory are stored absolute in the resolved
//! configuration (issue 16), so a run folder's `resolved_config.toml` means the same from
//! anywhere: a local model folder, a data file, `adapter.init_from`; presets, recipe names and
//! hub ids stay as written.

use reprpo_train::TrainConfig;
use reprpo_train::config::Sources;

fn resolve(args: &[&str]) -> TrainConfig {
    TrainConfig::resolve(&Sources {
        file: None,
        overrides: args.iter().map(|s| s.to_string()).collect(),
        env: false,
    })
    .unwrap()
}

#[test]
fn relative_paths_are_stored_absolute() {
    // `cargo test` runs in the crate folder: `./src` exists.
    let cwd = std::env::current_dir().unwrap();
    let cfg = resolve(&[
        "model.name_or_path=./src",
        "data.datasets=[default, tests/x.jsonl]",
    ]);
    assert_eq!(
        cfg.model.name_or_path,
        cwd.join("src").display().to_string()
    );
    assert_eq!(cfg.data.datasets[0], "default");
    assert_eq!(
        cfg.data.datasets[1],
        cwd.join("tests/x.jsonl").display().to_string()
    );
    for kept in ["tiny", "meta-llama/Llama-3.2-1B"] {
        assert_eq!(
            resolve(&[&format!("model.name_or_path={kept}")])
                .model
                .name_or_path,
            kept
        );
    }
}
