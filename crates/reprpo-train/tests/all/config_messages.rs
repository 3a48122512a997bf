//! Configuration errors name what the user wrote (issue 15, point 15): an empty or half-empty key
//! of a `key=value` argument is named as the argument (never "config key ``"), a TOML file with a
//! duplicate key, a bad header or bytes that are not UTF-8 is named with the line and column, and
//! a wrong value in a file names the file and the key's line.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use reprpo_train::config::{Sources, parse_override};
use reprpo_train::{TrainConfig, TrainError};

fn resolve_overrides(args: &[&str]) -> TrainError {
    TrainConfig::resolve(&Sources {
        file: None,
        overrides: args.iter().map(|s| s.to_string()).collect(),
        env: false,
    })
    .unwrap_err()
}

fn resolve_file(dir: &Path, name: &str, text: &[u8]) -> (PathBuf, String) {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    let err = TrainConfig::resolve(&Sources {
        file: Some(path.clone()),
        overrides: Vec::new(),
        env: false,
    })
    .unwrap_err();
    (path, err.to_string())
}

#[test]
fn empty_keys_name_the_argument() {
    for (arg, expect) in [
        (
            "=5",
            "argument `=5`: the key before `=` is empty; expected key=value, e.g. train.lr=1e-4",
        ),
        (
            " =5",
            "argument ` =5`: the key before `=` is empty; expected key=value, e.g. train.lr=1e-4",
        ),
        (
            ".=1",
            "argument `.=1`: key `.` has an empty part; keys are dotted names such as train.lr",
        ),
        (
            "train.=1",
            "argument `train.=1`: key `train.` has an empty part; keys are dotted names such as \
             train.lr",
        ),
        (
            "train..lr=1",
            "argument `train..lr=1`: key `train..lr` has an empty part; keys are dotted names \
             such as train.lr",
        ),
        (
            "lr",
            "argument `lr`: expected key=value, e.g. train.lr=1e-4",
        ),
    ] {
        let err = resolve_overrides(&[arg]);
        assert!(matches!(err, TrainError::Override { .. }), "{arg}: {err:?}");
        assert_eq!(err.to_string(), expect);
        assert!(!err.to_string().contains("``"), "{err}");
        assert!(parse_override(arg).is_err(), "{arg}");
    }
    // Well-formed keys still work.
    let cfg = TrainConfig::resolve(&Sources {
        file: None,
        overrides: vec!["train.lr=0.5".into(), " lr = 0.25 ".into()],
        env: false,
    })
    .unwrap();
    assert_eq!(cfg.train.lr, 0.25);
}

#[test]
fn toml_syntax_errors_name_file_line_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    let (path, msg) = resolve_file(tmp.path(), "dup.toml", b"[train]\nlr = 1\nlr = 2\n");
    assert_eq!(msg, format!("{}:3:1: duplicate key `lr`", path.display()));
    let (path, msg) = resolve_file(tmp.path(), "header.toml", b"loss = \"dpo\"\n[train\n");
    assert!(
        msg.starts_with(&format!("{}:2:7: ", path.display())),
        "{msg}"
    );
    let (path, msg) = resolve_file(
        tmp.path(),
        "bytes.toml",
        b"loss = \"dpo\"\nx = \"a\xffb\"\n",
    );
    assert_eq!(msg, format!("{}:2:7: not valid UTF-8", path.display()));
}

#[test]
fn wrong_values_in_a_file_name_the_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let (path, msg) = resolve_file(
        tmp.path(),
        "lr.toml",
        b"loss = \"dpo\"\n\n[train]\nlr = \"x\"\n",
    );
    assert_eq!(
        msg,
        format!(
            "config key `train.lr`: invalid type: found string \"x\", expected f64 (in {}, line 4)",
            path.display()
        )
    );
    let (path, msg) = resolve_file(tmp.path(), "top.toml", b"# a comment\ntrain = 5\n");
    assert!(msg.starts_with("config key `train`: invalid type"), "{msg}");
    assert!(
        msg.ends_with(&format!("(in {}, line 2)", path.display())),
        "{msg}"
    );
    let (path, msg) = resolve_file(tmp.path(), "unknown.toml", b"[train]\nlrr = 1.0\n");
    assert!(
        msg.starts_with("config key `train.lrr`: unknown key; did you mean `lr`?"),
        "{msg}"
    );
    assert!(
        msg.ends_with(&format!("(in {}, line 2)", path.display())),
        "{msg}"
    );
}

#[test]
fn non_utf8_metrics_name_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("metrics.jsonl");
    std::fs::write(&path, b"{\"step\": 1}\n{\"step\": 2, \"x\": \"\xff\"}\n").unwrap();
    let err = reprpo_train::metrics::read_metrics(&path)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("metrics.jsonl: line 2: not valid UTF-8"),
        "{err}"
    );
}
