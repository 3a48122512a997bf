//! `cargo xtask train --help` (issue 16): the configuration keys with their defaults, generated
//! from the config structs. The expected values come from `TrainConfig::default()` and the
//! resolved no-argument configuration, so this test cannot drift from the code.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use common::xtask;
use reprpo_train::TrainConfig;
use reprpo_train::config::{Sources, known_keys};
use serde_json::Value;

/// The value of a dotted key in a configuration's JSON form.
fn value(cfg: &TrainConfig, key: &str) -> Value {
    let mut v = serde_json::to_value(cfg).unwrap();
    for part in key.split('.') {
        v = v[part].clone();
    }
    v
}

#[test]
fn train_help_lists_every_key_with_its_default_and_doc() {
    let (ok, help, err) = xtask(&["train", "--help"]);
    assert!(ok, "{err}");
    let built_in = TrainConfig::default();
    for key in ["loss", "adapter.kind", "data.datasets", "run.tensorboard"] {
        let line = format!("  {key} = {}\n", value(&built_in, key));
        assert!(help.contains(&line), "no `{}` in:\n{help}", line.trim());
    }
    // `train.lr`, which the loss preset sets: the value of a plain run, then the built-in default
    // where they differ, then the doc line.
    let plain = TrainConfig::resolve(&Sources::default()).unwrap();
    let (p, b) = (value(&plain, "train.lr"), value(&built_in, "train.lr"));
    let note = if p == b {
        String::new()
    } else {
        format!("   (built-in: {b})")
    };
    let lr = format!("  train.lr = {p}{note}\n      Peak learning rate.\n");
    assert!(help.contains(&lr), "no `{lr}` in:\n{help}");
    for key in known_keys() {
        assert!(help.contains(&format!("  {key} = ")), "`{key}` missing");
    }
    for table in [
        "[run]",
        "[data]",
        "[adapter]",
        "[dpo]",
        "[reprpo]",
        "[train]",
        "[sft]",
    ] {
        assert!(help.contains(&format!("\n{table}\n")), "{table} missing");
    }
    // `-h` stays short.
    let (ok, short, _) = xtask(&["train", "-h"]);
    assert!(ok && !short.contains("train.lr = "), "{short}");
}
