#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! `--resume` refuses what is not the run it claims to continue (issue 15):
//!
//! - an empty, cut or edited `resolved_config.toml` (strict parse, config hash in the checkpoint,
//!   total steps against the checkpoint's);
//! - `key=value` overrides other than the length and cadences, which are applied and recorded;
//! - a checkpoint whose files differ from its manifest (a flipped bit, an edited step, an extra
//!   file), falling back to the newest one that verifies, or taking one given explicitly.

use std::path::{Path, PathBuf};

use crate::common;

use common::{ctx, logged_steps};
use reprpo_train::trainer;
use reprpo_train::{TrainConfig, TrainError};

/// A 4-step DPO run on 8 pairs, logging every step, a checkpoint every step (all kept).
fn config(out: &Path, extra: &[&str]) -> TrainConfig {
    let mut all = vec![
        "run.save_steps=1",
        "run.save_total_limit=10",
        "loss=dpo",
        "train.lr=3e-3",
        "train.max_steps=4",
    ];
    all.extend_from_slice(extra);
    common::config(out, &all)
}

/// A run stopped (Ctrl-C) after its first step, with one checkpoint.
fn stopped_run(out: &Path, extra: &[&str]) -> PathBuf {
    let out = trainer::train(&config(out, extra), &ctx(true), None).unwrap();
    assert!(out.interrupted);
    out.run_dir
}

fn ckpt(run: &Path, step: usize) -> PathBuf {
    run.join("checkpoints").join(format!("step-{step:07}"))
}

fn flip_last_byte(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(path, bytes).unwrap();
}

fn resume_err(run: &Path) -> String {
    let cfg = config(Path::new("unused"), &[]);
    let err = trainer::train(&cfg, &ctx(false), Some(run)).unwrap_err();
    err.to_string()
}

#[test]
fn empty_cut_or_edited_config_is_refused_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let run = stopped_run(tmp.path(), &[]);
    let path = run.join("resolved_config.toml");
    let good = std::fs::read_to_string(&path).unwrap();
    let edited_lr = good.replace("lr = 0.003", "lr = 0.004");
    assert_ne!(edited_lr, good);
    let edited_total = good.replace("max_steps = 4", "max_steps = 5");
    assert_ne!(edited_total, good);
    for (what, text, expect) in [
        ("empty", String::new(), "incomplete"),
        (
            "cut",
            good[..good.len() / 2].to_string(),
            "resolved_config.toml",
        ),
        ("edited lr", edited_lr, "does not match checkpoint"),
        ("edited total", edited_total, "gives 5 total steps"),
    ] {
        std::fs::write(&path, &text).unwrap();
        let msg = resume_err(&run);
        eprintln!("{what}: {msg}");
        assert!(msg.contains("resolved_config.toml"), "{what}: {msg}");
        assert!(msg.contains(expect), "{what}: {msg}");
        assert_eq!(logged_steps(&run), vec![1], "{what}: nothing ran");
        assert!(!ckpt(&run, 2).exists(), "{what}");
    }
    // Restored, it resumes to the configured 4 steps.
    std::fs::write(&path, &good).unwrap();
    let out = trainer::train(&config(tmp.path(), &[]), &ctx(false), Some(&run)).unwrap();
    assert_eq!(out.steps, 4);
    assert_eq!(logged_steps(&run), vec![1, 2, 3, 4]);
}

#[test]
fn resume_applies_length_and_cadence_overrides_and_records_them() {
    let tmp = tempfile::tempdir().unwrap();
    // With a constant schedule, a run stopped at step 1 of 4 and resumed to 6 steps is the same
    // run as one configured for 6 steps from the start.
    let straight = trainer::train(
        &config(tmp.path(), &["train.max_steps=6"]),
        &ctx(false),
        None,
    )
    .unwrap();
    let run = stopped_run(tmp.path(), &[]);
    let over = ["train.max_steps=6".to_string(), "run.save_steps=3".into()];
    let out = trainer::resume(&ctx(false), &run, &over).unwrap();
    assert_eq!(out.steps, 6);
    assert_eq!(logged_steps(&run), vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(
        common::adapter_bits(&run.join("adapter")),
        common::adapter_bits(&straight.run_dir.join("adapter"))
    );
    // Checkpoints at the new cadence (3 and the end), the new total in them.
    assert!(ckpt(&run, 3).exists() && ckpt(&run, 6).exists() && !ckpt(&run, 2).exists());
    let state = std::fs::read_to_string(ckpt(&run, 6).join("trainer_state.json")).unwrap();
    assert!(state.contains("\"total_steps\": 6"), "{state}");
    let cfg = std::fs::read_to_string(run.join("resolved_config.toml")).unwrap();
    assert!(cfg.contains("max_steps = 6") && cfg.contains("save_steps = 3"));
    let history = std::fs::read_to_string(run.join("resume_overrides.toml")).unwrap();
    let h: toml::Table = history.parse().unwrap();
    let first = &h["resume"].as_array().unwrap()[0];
    assert_eq!(first["from_step"].as_integer(), Some(1));
    assert_eq!(first["overrides"]["train.max_steps"].as_integer(), Some(6));
    assert_eq!(first["overrides"]["run.save_steps"].as_integer(), Some(3));
}

#[test]
fn resume_refuses_other_overrides_naming_them() {
    let tmp = tempfile::tempdir().unwrap();
    let run = stopped_run(tmp.path(), &[]);
    let over = [
        "train.lr=1e-4".to_string(),
        "loss=ipo".into(),
        "train.logging_steps=2".into(),
    ];
    let err = trainer::resume(&ctx(false), &run, &over).unwrap_err();
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(matches!(err, TrainError::ResumeOverride { .. }), "{msg}");
    assert!(msg.contains("train.lr") && msg.contains("loss"), "{msg}");
    assert_eq!(logged_steps(&run), vec![1]);
    assert!(!run.join("resume_overrides.toml").exists());
    // A total before the checkpoint is refused too.
    let tmp2 = tempfile::tempdir().unwrap();
    let done = trainer::train(&config(tmp2.path(), &[]), &ctx(false), None).unwrap();
    let back = trainer::resume(&ctx(false), &done.run_dir, &["train.max_steps=2".into()]);
    assert!(back.unwrap_err().to_string().contains("train.max_steps"));
    let cfg = std::fs::read_to_string(done.run_dir.join("resolved_config.toml")).unwrap();
    assert!(cfg.contains("max_steps = 4"), "nothing recorded");
    assert!(!done.run_dir.join("resume_overrides.toml").exists());
}

/// Damage done to a checkpoint folder.
type Damage = fn(&Path);

#[test]
fn a_changed_checkpoint_file_is_refused_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let run = stopped_run(tmp.path(), &[]);
    let ck = ckpt(&run, 1);
    let cases: [(&str, Damage); 4] = [
        ("optimizer.safetensors", |ck| {
            flip_last_byte(&ck.join("optimizer.safetensors"))
        }),
        ("adapter/adapter_model.safetensors", |ck| {
            flip_last_byte(&ck.join("adapter/adapter_model.safetensors"))
        }),
        ("trainer_state.json", |ck| {
            let p = ck.join("trainer_state.json");
            let s = std::fs::read_to_string(&p).unwrap();
            let edited = s.replace("\"step\": 1", "\"step\": 2");
            assert_ne!(s, edited);
            std::fs::write(&p, edited).unwrap();
        }),
        ("adapter/extra.safetensors", |ck| {
            std::fs::write(ck.join("adapter/extra.safetensors"), b"x").unwrap()
        }),
    ];
    let pristine = tmp.path().join("pristine");
    copy_dir(&ck, &pristine);
    for (file, damage) in cases {
        damage(&ck);
        let msg = resume_err(&run);
        assert!(msg.contains(file), "{file}: {msg}");
        assert!(msg.contains("step-0000001"), "{file}: {msg}");
        assert!(msg.contains("no intact checkpoint"), "{file}: {msg}");
        assert_eq!(logged_steps(&run), vec![1], "{file}: nothing ran");
        std::fs::remove_dir_all(&ck).unwrap();
        copy_dir(&pristine, &ck);
    }
    // An old checkpoint (no manifest, no config hash) resumes, with a warning.
    std::fs::remove_file(ck.join("manifest.json")).unwrap();
    let p = ck.join("trainer_state.json");
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    state
        .as_object_mut()
        .unwrap()
        .remove("config_hash")
        .unwrap();
    std::fs::write(&p, state.to_string()).unwrap();
    let out = trainer::train(&config(tmp.path(), &[]), &ctx(false), Some(&run)).unwrap();
    assert_eq!(out.steps, 4);
}

#[test]
fn corrupt_latest_checkpoint_falls_back_to_the_newest_intact_one() {
    let tmp = tempfile::tempdir().unwrap();
    let done = trainer::train(&config(tmp.path(), &[]), &ctx(false), None).unwrap();
    let run = done.run_dir;
    let want = common::adapter_bits(&run.join("adapter"));
    std::fs::remove_dir_all(run.join("adapter")).unwrap();
    flip_last_byte(&ckpt(&run, 4).join("optimizer.safetensors"));
    let out = trainer::train(&config(tmp.path(), &[]), &ctx(false), Some(&run)).unwrap();
    assert_eq!(out.steps, 4);
    // Step 4 was redone from step 3: the same adapter, each step logged once.
    assert_eq!(common::adapter_bits(&run.join("adapter")), want);
    assert_eq!(logged_steps(&run), vec![1, 2, 3, 4]);
    assert!(run.join("checkpoints/skipped-step-0000004").is_dir());
    // An explicit checkpoint: that one, and the newer ones moved aside.
    let out = trainer::train(&config(tmp.path(), &[]), &ctx(false), Some(&ckpt(&run, 2))).unwrap();
    assert_eq!(out.steps, 4);
    assert_eq!(common::adapter_bits(&run.join("adapter")), want);
    assert_eq!(logged_steps(&run), vec![1, 2, 3, 4]);
    assert!(run.join("checkpoints/skipped-step-0000004-1").is_dir());
    assert!(run.join("checkpoints/skipped-step-0000003").is_dir());
    // An explicit corrupt checkpoint is refused, with no fallback.
    flip_last_byte(&ckpt(&run, 4).join("adapter/adapter_model.safetensors"));
    let msg = resume_err(&ckpt(&run, 4));
    eprintln!("{msg}");
    assert!(
        msg.starts_with(&format!("checkpoint {}", ckpt(&run, 4).display())),
        "{msg}"
    );
    assert!(msg.contains("adapter/adapter_model.safetensors"), "{msg}");
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        let to = dst.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &to);
        } else {
            std::fs::copy(&p, &to).unwrap();
        }
    }
}

/// Point 5: a deleted, cut, edited or garbled `metrics.jsonl` is noticed on resume, kept aside as
/// `metrics.jsonl.damaged` and rebuilt from the checkpoint's copy; the resumed run's log is then
/// the uninterrupted run's, byte for byte.
#[test]
fn damaged_metrics_log_is_kept_aside_and_rebuilt_from_the_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let straight = trainer::train(&config(tmp.path(), &[]), &ctx(false), None).unwrap();
    let want = std::fs::read_to_string(straight.run_dir.join("metrics.jsonl")).unwrap();
    type Damage = fn(&str) -> Option<String>;
    let damages: [(&str, Damage); 4] = [
        ("deleted", |_| None),
        ("cut", |t| Some(t[..t.len() / 2].to_string())),
        ("edited", |t| Some(t.replacen("\"loss\":", "\"loss\":1", 1))),
        ("garbled", |t| Some(format!("garbage\n{t}"))),
    ];
    for (what, damage) in damages {
        let run = stopped_run(tmp.path(), &[]);
        let log = run.join("metrics.jsonl");
        let before = std::fs::read_to_string(&log).unwrap();
        // The checkpoint holds the log up to its step.
        let stored = std::fs::read_to_string(ckpt(&run, 1).join("metrics.jsonl")).unwrap();
        assert_eq!(stored, before, "{what}");
        let damaged = damage(&before);
        match &damaged {
            None => std::fs::remove_file(&log).unwrap(),
            Some(t) => std::fs::write(&log, t).unwrap(),
        }
        trainer::train(&config(Path::new("unused"), &[]), &ctx(false), Some(&run)).unwrap();
        assert_eq!(std::fs::read_to_string(&log).unwrap(), want, "{what}");
        let aside = run.join("metrics.jsonl.damaged");
        match damaged {
            None => assert!(!aside.exists(), "{what}"),
            Some(t) => assert_eq!(std::fs::read_to_string(&aside).unwrap(), t, "{what}"),
        }
    }
}

/// Point 5, the other side: an intact log is kept as it is (no `.damaged` file), a torn last line
/// (a kill during a write) is not damage, and records after the checkpoint are dropped.
#[test]
fn intact_metrics_log_is_kept_and_a_torn_last_line_is_not_damage() {
    let tmp = tempfile::tempdir().unwrap();
    let straight = trainer::train(&config(tmp.path(), &[]), &ctx(false), None).unwrap();
    let want = std::fs::read_to_string(straight.run_dir.join("metrics.jsonl")).unwrap();
    let run = stopped_run(tmp.path(), &[]);
    let log = run.join("metrics.jsonl");
    let mut text = std::fs::read_to_string(&log).unwrap();
    // A record of a later step (lost with the kill) and half of the next one.
    text.push_str("{\"loss\":0.5,\"step\":2}\n{\"loss\":0.");
    std::fs::write(&log, text).unwrap();
    trainer::train(&config(Path::new("unused"), &[]), &ctx(false), Some(&run)).unwrap();
    assert_eq!(std::fs::read_to_string(&log).unwrap(), want);
    assert!(!run.join("metrics.jsonl.damaged").exists());
}

/// A run written by an earlier version, before a key existed: its `resolved_config.toml` lacks
/// the key and its checkpoint's hash was taken without it. It resumes, the key at its default
/// (said on the terminal), ends as the uninterrupted run, and the file is written out whole. The
/// same missing key in a current run (hash over every key) is still an incomplete file.
#[test]
fn a_run_from_before_a_key_existed_resumes_with_its_default() {
    let tmp = tempfile::tempdir().unwrap();
    let straight = trainer::train(&config(tmp.path(), &[]), &ctx(false), None).unwrap();
    for older in [true, false] {
        let run = stopped_run(tmp.path(), &[]);
        let cfg_path = run.join("resolved_config.toml");
        let text = std::fs::read_to_string(&cfg_path).unwrap();
        assert!(text.contains("eval_split = 0.0\n"));
        std::fs::write(&cfg_path, text.replace("eval_split = 0.0\n", "")).unwrap();
        if older {
            let cfg = TrainConfig::from_toml_file(&cfg_path).unwrap();
            let hash =
                reprpo_train::resume::config_hash_without(&cfg, &["data.eval_split".to_string()])
                    .unwrap();
            let ck = ckpt(&run, 1);
            let state_path = ck.join("trainer_state.json");
            let mut state: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&state_path).unwrap()).unwrap();
            state["config_hash"] = serde_json::json!(hash);
            std::fs::write(&state_path, serde_json::to_string_pretty(&state).unwrap()).unwrap();
            reprpo_train::run::write_manifest(&ck).unwrap();
            trainer::train(&config(Path::new("unused"), &[]), &ctx(false), Some(&run)).unwrap();
            assert_eq!(
                common::adapter_bits(&run.join("adapter")),
                common::adapter_bits(&straight.run_dir.join("adapter"))
            );
            let rewritten = std::fs::read_to_string(&cfg_path).unwrap();
            assert!(rewritten.contains("eval_split = 0.0"), "{rewritten}");
        } else {
            let msg = resume_err(&run);
            assert!(
                msg.contains("resolved_config.toml") && msg.contains("data.eval_split"),
                "{msg}"
            );
        }
    }
}
