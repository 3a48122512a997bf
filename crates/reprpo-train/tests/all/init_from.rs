#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! `adapter.init_from=DIR` makes the resolved configuration tell the truth (issue 16): the
//! `[adapter]` table (written to `resolved_config.toml`, printed by `--print-config`, used for the
//! run name) is the loaded adapter's; an explicit key that contradicts it, or that does not apply
//! to its kind, is an error naming both.

use std::path::{Path, PathBuf};

use crate::common;

use common::{config, ctx};
use reprpo_train::config::Sources;
use reprpo_train::{TrainConfig, trainer};

/// A trained adapter folder of `kind` with `extra` settings.
fn adapter(out: &Path, extra: &[&str]) -> PathBuf {
    let mut all = vec!["loss=dpo", "train.max_steps=1"];
    all.extend_from_slice(extra);
    let run = trainer::train(&config(out, &all), &ctx(false), None).unwrap();
    run.run_dir.join("adapter")
}

fn resolve(args: &[String]) -> reprpo_train::Result<TrainConfig> {
    TrainConfig::resolve(&Sources {
        file: None,
        overrides: args.to_vec(),
        env: false,
    })
}

#[test]
fn the_adapter_table_is_the_loaded_one() {
    let tmp = tempfile::tempdir().unwrap();
    let boft = adapter(tmp.path(), &["adapter.kind=boft", "adapter.block_size=2"]);
    let lora = adapter(tmp.path(), &["adapter.r=4", "adapter.alpha=8"]);
    let from = |dir: &Path, extra: &[&str]| {
        let mut v = vec![format!("adapter.init_from={}", dir.display())];
        v.extend(extra.iter().map(|s| s.to_string()));
        resolve(&v)
    };
    // No kind given: the loaded BOFT, with its block size, in the table, the TOML and the name.
    let cfg = from(&boft, &[]).unwrap();
    assert_eq!(
        (cfg.adapter.kind.as_str(), cfg.adapter.block_size),
        ("boft", 2)
    );
    assert!(cfg.run_name().contains("boft"), "{}", cfg.run_name());
    assert!(cfg.to_toml().unwrap().contains("kind = \"boft\""));
    let cfg = from(&lora, &[]).unwrap();
    assert_eq!((cfg.adapter.r, cfg.adapter.alpha), (4, 8.0));
    // Explicit keys that agree are fine; those that contradict name both values and the file.
    assert!(from(&boft, &["adapter.kind=boft"]).is_ok());
    for (dir, bad, key) in [
        (&boft, "adapter.kind=lora", "adapter.kind"),
        (&lora, "adapter.r=16", "adapter.r"),
    ] {
        let msg = from(dir, &[bad]).unwrap_err().to_string();
        assert!(
            msg.contains(key) && msg.contains("adapter_config.json") && msg.contains("contradicts"),
            "{msg}"
        );
    }
    let msg = from(&boft, &["adapter.r=8"]).unwrap_err().to_string();
    assert!(
        msg.contains("adapter.r") && msg.contains("does not apply") && msg.contains("boft"),
        "{msg}"
    );
    // And a run from it trains and records the loaded table.
    let out = tmp.path().join("second");
    let cfg = config(
        &out,
        &[
            "loss=dpo",
            "train.max_steps=1",
            &format!("adapter.init_from={}", boft.display()),
        ],
    );
    let run = trainer::train(&cfg, &ctx(false), None).unwrap();
    let written = std::fs::read_to_string(run.run_dir.join("resolved_config.toml")).unwrap();
    assert!(
        written.contains("kind = \"boft\"") && written.contains("block_size = 2"),
        "{written}"
    );
}
