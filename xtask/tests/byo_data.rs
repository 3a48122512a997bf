//! Bring your own data (issue 16): `cargo xtask train` and `data stats` take a data file where a
//! recipe name is accepted (`data.datasets=path.jsonl`, a single name without brackets), infer
//! the converter from its columns, and store the path absolute in the run's
//! `resolved_config.toml`, so the run means the same from any working directory.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

mod common;

/// Eight TRL conversational rows (implicit prompt).
fn chat_rows() -> String {
    (0..8)
        .map(|i| {
            format!(
                "{{\"chosen\":[{{\"role\":\"user\",\"content\":\"Say {i}.\"}},{{\"role\":\"assistant\",\"content\":\"{i}\"}}],\
                 \"rejected\":[{{\"role\":\"user\",\"content\":\"Say {i}.\"}},{{\"role\":\"assistant\",\"content\":\"no\"}}]}}\n"
            )
        })
        .collect()
}

#[test]
fn train_on_a_relative_data_file_without_brackets() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pairs.jsonl"), chat_rows()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .current_dir(dir.path())
        .args([
            "train",
            "--no-progress",
            "run.out_dir=runs",
            "run.plots=false",
            "sft.steps=0",
            "loss=dpo",
            "train.max_steps=2",
            "data.datasets=pairs.jsonl",
            "data.eval_datasets=./pairs.jsonl:chat",
            "data.ood_datasets=[]",
        ])
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let run = std::fs::read_dir(dir.path().join("runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.join("resolved_config.toml").is_file())
        .unwrap();
    let cfg: toml::Table = std::fs::read_to_string(run.join("resolved_config.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let abs = dir.path().canonicalize().unwrap().join("pairs.jsonl");
    let data = cfg["data"].as_table().unwrap();
    assert_eq!(
        data["datasets"].as_array().unwrap()[0].as_str().unwrap(),
        abs.display().to_string()
    );
    assert_eq!(
        data["eval_datasets"].as_array().unwrap()[0]
            .as_str()
            .unwrap(),
        format!("{}:chat", abs.display())
    );
}

#[test]
fn data_stats_on_a_file_and_a_missing_one() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("pairs.jsonl");
    std::fs::write(&p, chat_rows()).unwrap();
    for flag in ["--recipe", "--input"] {
        let (ok, stdout, stderr) =
            common::xtask(&["data", "stats", "--json", flag, p.to_str().unwrap()]);
        assert!(ok, "{flag}: {stderr}");
        let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(v["prompt"]["count"], 8, "{flag}: {v}");
        assert_eq!(
            v["prompt"]["mean"], 7.0,
            "{flag}: the user turn \"Say i.\" plus BOS: {v}"
        );
    }
    let (ok, _, stderr) = common::xtask(&["data", "stats", "--recipe", "./no/such.jsonl"]);
    assert!(!ok);
    assert!(
        stderr.contains("no/such.jsonl") && stderr.contains("working directory"),
        "{stderr}"
    );
}
