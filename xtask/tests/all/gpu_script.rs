//! `tests/gpu/run.sh BINARY OUT_DIR --cpu`, the dry run of the GPU benchmark script, end to end
//! with this crate's binary: the table and JSON files exist and parse, every case row has our
//! numbers, a PyTorch side that fails is a row saying so (and the exit status says it), and a
//! broken binary path stops the script with a clear message.
//!
//! Needs bash, python3 (stdlib only) and coreutils' `timeout`; where python3 is missing the tests
//! print `skipped` (and fail when `CI=true`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/gpu/run.sh")
}

fn have_python() -> bool {
    let ok = Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "python3 is missing on CI"
        );
        eprintln!("skipped: python3 not found");
    }
    ok
}

fn run(bin: &str, out: &Path, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new("bash");
    cmd.arg(script()).arg(bin).arg(out).arg("--cpu");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run bash")
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The table's case rows, as cells.
fn rows(table: &str) -> Vec<Vec<String>> {
    table
        .lines()
        .filter(|l| l.starts_with("| tiny"))
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_string())
                .collect()
        })
        .collect()
}

/// Checks shared by both runs: files, rows with our numbers, results.json's cases.
fn check_common(out: &Path) -> (String, serde_json::Value) {
    for f in [
        "table.md",
        "results.json",
        "doctor.json",
        "logs.txt",
        "raw.tar.gz",
    ] {
        assert!(out.join(f).is_file(), "{f} missing in {}", out.display());
    }
    let table = std::fs::read_to_string(out.join("table.md")).unwrap();
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let _: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("doctor.json")).unwrap()).unwrap();
    assert!(table.contains("- doctor (`--device cpu`): pass"), "{table}");
    let rows = rows(&table);
    let labels: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(
        labels,
        [
            "tiny 2x64 dpo",
            "tiny 2x64 reprpo",
            "tiny 2x64 dpo + grad. ckpt",
            "tiny 2x64 reprpo + grad. ckpt",
            "tiny 1x32 dpo",
            "tiny 1x32 reprpo",
        ],
        "{table}"
    );
    for r in &rows {
        assert_eq!(r.len(), 8, "{r:?}");
        let ours: f64 = r[2]
            .parse()
            .unwrap_or_else(|_| panic!("our step s in {r:?}"));
        assert!(ours > 0.0, "{r:?}");
        let tps: f64 = r[7]
            .replace(',', "")
            .parse()
            .unwrap_or_else(|_| panic!("our tokens/s in {r:?}"));
        assert!(tps > 0.0, "{r:?}");
        assert!(r[5].starts_with("RSS "), "{r:?}");
    }
    let cases = results["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 6);
    for c in cases {
        let ours = &c["ours"];
        assert_eq!(ours["device_kind"], "cpu", "{c}");
        assert!(ours["step_s_median"].as_f64().unwrap() > 0.0, "{c}");
        assert!(ours["peak_mem_gib"].is_null(), "{c}");
        assert_eq!(ours["steps"], 2, "{c}");
        assert_eq!(
            ours["grad_checkpointing"].as_bool().unwrap(),
            c["case"].as_str().unwrap().ends_with("_gc"),
            "{c}"
        );
    }
    (table, results)
}

#[test]
fn dry_run_writes_the_table_and_the_raw_json() {
    if !have_python() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let o = run(env!("CARGO_BIN_EXE_xtask"), &out, &[]);
    assert!(o.status.success(), "{}", text(&o));
    let (table, results) = check_common(&out);
    // Without torch (CI) the PyTorch columns say why; with it, they hold numbers.
    if results["torch_reason"].is_null() {
        for r in rows(&table) {
            assert!(r[1].parse::<f64>().is_ok(), "{r:?}");
        }
    } else {
        for r in rows(&table) {
            assert!(r[1].starts_with("not run: "), "{r:?}");
            assert_eq!(r[3], "-", "{r:?}");
        }
    }
}

/// A stand-in for torch + transformers + peft and the anchor: the first block's anchor writes the
/// anchor's JSON (every step 0.5 s), the second block's fails. Our rows all have numbers; the
/// first block's have ratios; the second block's PyTorch cells say it failed; the exit status is 1.
#[test]
fn pytorch_side_numbers_and_failures_are_rows() {
    if !have_python() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("site");
    for m in ["torch", "transformers", "peft"] {
        std::fs::create_dir_all(fake.join(m)).unwrap();
        std::fs::write(fake.join(m).join("__init__.py"), "").unwrap();
    }
    let anchor = dir.path().join("anchor.py");
    std::fs::write(
        &anchor,
        r#"import json, sys
a = sys.argv[1:]
arg = lambda k: a[a.index(k) + 1]
if arg("--pairs") == "1":
    sys.exit("fake anchor: failing on purpose")
step = {"step_s_median": 0.5, "step_s_min": 0.5, "step_s_max": 0.5, "tokens_per_s": 512.0,
        "peak_mem_gib": None, "loss": 0.69}
d = {"preset": arg("--preset"), "torch": "9.9-fake", "transformers": "8.8", "peft": "7.7",
     "dpo": step, "reprpo": step, "dpo_gc": step, "reprpo_gc": step}
json.dump(d, open(arg("--json"), "w"))
"#,
    )
    .unwrap();
    let out = dir.path().join("out");
    let o = run(
        env!("CARGO_BIN_EXE_xtask"),
        &out,
        &[
            ("PYTHONPATH", fake.to_str().unwrap()),
            ("REPRPO_ANCHOR", anchor.to_str().unwrap()),
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let (table, results) = check_common(&out);
    assert!(
        table.contains("torch 9.9-fake, transformers 8.8, peft 7.7"),
        "{table}"
    );
    let rows = rows(&table);
    let cases = results["cases"].as_array().unwrap();
    for (r, c) in rows[..4].iter().zip(cases) {
        assert_eq!(r[1], "0.5000", "{r:?}");
        let ours = c["ours"]["step_s_median"].as_f64().unwrap();
        let ratio = c["speed_ratio"].as_f64().unwrap();
        assert!((ratio - 0.5 / ours).abs() < 1e-9, "{c}");
        assert_eq!(r[3], format!("{ratio:.2}x"), "{r:?}");
        assert_eq!(r[6], "512", "{r:?}");
    }
    for r in &rows[4..] {
        assert!(r[1].starts_with("failed (exit 1"), "{r:?}");
        assert_eq!(r[3], "-", "{r:?}");
    }
    assert_eq!(results["ok"], false);
    assert!(
        std::fs::read_to_string(out.join("logs.txt"))
            .unwrap()
            .contains("failing on purpose")
    );
}

#[test]
fn a_broken_binary_stops_the_script_with_a_clear_message() {
    if !have_python() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let missing = dir.path().join("no-such-xtask");
    let o = run(missing.to_str().unwrap(), &out, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no-such-xtask': no such file"), "{}", text(&o));
    let junk = dir.path().join("xtask.gz");
    std::fs::write(&junk, "not gzip").unwrap();
    let o = run(junk.to_str().unwrap(), &out, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("cannot gunzip"),
        "{}",
        text(&o)
    );
    let not_a_program = dir.path().join("xtask");
    std::fs::write(&not_a_program, "plain text").unwrap();
    let o = run(not_a_program.to_str().unwrap(), &out, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("does not run"),
        "{}",
        text(&o)
    );
    assert!(!out.join("table.md").exists());
}
