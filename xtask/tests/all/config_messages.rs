//! The command line's configuration messages name the argument, the file, the line and the key
//! (issue 15, point 15): never "config key ``", never a TOML error without its file.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;
use common::xtask;

#[test]
fn empty_override_keys_name_the_argument() {
    let (ok, _, err) = xtask(&["train", "--print-config", "=5"]);
    assert!(!ok);
    assert!(
        err.contains(
            "argument `=5`: the key before `=` is empty; expected key=value, e.g. train.lr=1e-4"
        ),
        "{err}"
    );
    let (ok, _, err) = xtask(&["train", "--print-config", "train.=1"]);
    assert!(!ok);
    assert!(
        err.contains("argument `train.=1`: key `train.` has an empty part"),
        "{err}"
    );
    let (ok, _, err) = xtask(&["data", "stats", "--recipe", "default-test", "=3"]);
    assert!(!ok);
    assert!(
        err.contains("argument `=3`: the key before `=` is empty; expected key=value"),
        "{err}"
    );
    let (ok, _, err) = xtask(&["data", "stats", "--recipe", "default-test", ".max_length=3"]);
    assert!(!ok);
    assert!(
        err.contains("argument `.max_length=3`: key `.max_length` has an empty part"),
        "{err}"
    );
    for (_, _, err) in [
        xtask(&["train", "--print-config", "=5"]),
        xtask(&["data", "stats", "--recipe", "default-test", "=3"]),
    ] {
        assert!(!err.contains("``"), "{err}");
    }
}

#[test]
fn toml_file_errors_name_the_file_and_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("dup.toml");
    std::fs::write(&file, "[train]\nlr = 1\nlr = 2\n").expect("write");
    let f = file.to_str().expect("utf-8 path");
    let (ok, _, err) = xtask(&["train", "--print-config", f]);
    assert!(!ok);
    assert!(
        err.contains(&format!("{f}:3:1: duplicate key `lr`")),
        "{err}"
    );
    std::fs::write(&file, "[train]\n\nlr = \"fast\"\n").expect("write");
    let (ok, _, err) = xtask(&["train", "--print-config", f]);
    assert!(!ok);
    assert!(
        err.contains(&format!(
            "config key `train.lr`: invalid type: found string \"fast\", expected f64 (in {f}, line 3)"
        )),
        "{err}"
    );
}
