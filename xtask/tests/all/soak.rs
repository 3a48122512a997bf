//! `tests/soak/kill_resume.sh` with N = 3 (issue 15): three runs of a short default, each
//! interrupted (SIGKILL, SIGINT, SIGTERM or an abort injected inside a checkpoint write) and
//! resumed, must end with the adapter and `metrics.jsonl` of the uninterrupted run, byte for byte.
//! The record run (N = 50) and its table are in docs/reliability.md.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[cfg(unix)]
#[test]
fn three_interrupted_and_resumed_runs_end_identical() {
    use std::path::Path;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/soak/kill_resume.sh");
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("results.tsv");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .arg(env!("CARGO_BIN_EXE_xtask"))
        .args(["3", "1"])
        .arg(&table)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{:?}", out.status);
    let rows: Vec<String> = std::fs::read_to_string(&table)
        .unwrap()
        .lines()
        .skip(1)
        .map(str::to_string)
        .collect();
    assert_eq!(rows.len(), 3, "{rows:?}");
    for r in &rows {
        assert!(r.ends_with("identical\tidentical"), "{r}");
    }
}
