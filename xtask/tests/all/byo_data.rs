//! Bring your own data (issue 16): `cargo xtask train` and `data stats` take a data file where a
//! recipe name is accepted (`data.datasets=path.jsonl`, a single name without brackets), infer
//! the converter from its columns, and store the path absolute in the run's
//! `resolved_config.toml`, so the run means the same from any working directory.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

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
    let (dir, _, data) = train_on_file(&[
        "train.max_steps=2",
        "data.eval_datasets=./pairs.jsonl:chat",
        "data.ood_datasets=[]",
    ]);
    let abs = dir.path().canonicalize().unwrap().join("pairs.jsonl");
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

/// Run `xtask train` in a fresh folder holding `pairs.jsonl` ([`chat_rows`]), with
/// `data.datasets=pairs.jsonl` (relative, no brackets) and `extra`; (the folder, stdout, the
/// run's resolved `[data]` table).
fn train_on_file(extra: &[&str]) -> (tempfile::TempDir, String, toml::Table) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pairs.jsonl"), chat_rows()).unwrap();
    let mut args = vec![
        "train",
        "--no-progress",
        "run.out_dir=runs",
        "run.plots=false",
        "sft.steps=0",
        "loss=dpo",
        "train.max_steps=1",
        "data.datasets=pairs.jsonl",
    ];
    args.extend_from_slice(extra);
    let (ok, stdout, stderr) = common::xtask_in(dir.path(), &args, &[]);
    assert!(ok, "{stderr}");
    let run = std::fs::read_dir(dir.path().join("runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.join("resolved_config.toml").is_file())
        .unwrap();
    let cfg: toml::Table = std::fs::read_to_string(run.join("resolved_config.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let data = cfg["data"].as_table().unwrap().clone();
    (dir, stdout, data)
}

#[test]
fn held_out_data_follows_the_training_data() {
    // No evaluation keys: 10% of the file held out, no embedded default split anywhere.
    let (_dir, stdout, data) = train_on_file(&[]);
    assert_eq!(data["eval_split"].as_float(), Some(0.1));
    assert!(data["eval_datasets"].as_array().unwrap().is_empty());
    assert!(data["ood_datasets"].as_array().unwrap().is_empty());
    assert!(
        stdout.contains("10% of the training data, held out (1 pairs, seed"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("default-") && !stdout.contains("shifted (OOD)"),
        "{stdout}"
    );
    // Nothing to score: said once, no table of dashes.
    let (_dir, stdout, _) = train_on_file(&["data.eval_split=0"]);
    assert!(stdout.contains("nothing to score"), "{stdout}");
    assert!(!stdout.contains(" -"), "{stdout}");
    // Both an evaluation set and a split: refused, naming the key.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.jsonl"), chat_rows()).unwrap();
    let file = dir.path().join("p.jsonl");
    let (ok, _, stderr) = common::xtask(&[
        "train",
        &format!("data.datasets={}", file.display()),
        &format!("data.eval_datasets={}", file.display()),
        "data.eval_split=0.2",
    ]);
    assert!(!ok && stderr.contains("data.eval_split"), "{stderr}");
}
