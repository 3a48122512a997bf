#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! How a run stops: a non-finite or exploding run names a checkpoint that is really finite,
//! Ctrl-C during the SFT stage stops within a step, and a failed checkpoint write names the file
//! and the step and leaves no temporary files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::common;

use candle_core::{Device, Tensor};
use common::{config, ctx, exploding, non_finite_stop};
use reprpo_train::TrainError;
use reprpo_train::run::{self, TrainerState};
use reprpo_train::trainer::{self, EXPLODING};

fn largest(path: &Path) -> f64 {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap()
        .values()
        .flat_map(|t| {
            t.to_dtype(candle_core::DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
        })
        .fold(0.0, |m, x| {
            if x.is_finite() {
                m.max(x.abs())
            } else {
                f64::INFINITY
            }
        })
}

#[test]
fn an_exploding_run_names_a_finite_checkpoint() {
    // lr 0 for step 1, then 5e29: step 2's update puts ~1e29 values in the adapter (finite, but
    // exploding); step 3's loss is NaN. Step 2's checkpoint must be refused.
    let tmp = tempfile::tempdir().unwrap();
    let cfg = exploding(tmp.path(), &["train.warmup_steps=2", "train.max_steps=8"]);
    let (step, last_checkpoint, err) = non_finite_stop(&cfg);
    eprintln!("{err}");
    assert_eq!(step, 2, "{err}");
    let ck = last_checkpoint.expect("step 1's checkpoint");
    assert!(ck.ends_with("step-0000001"), "{}", ck.display());
    assert!(largest(&ck.join("adapter/adapter_model.safetensors")) <= EXPLODING);
    assert!(largest(&ck.join("optimizer.safetensors")) <= EXPLODING);
    // No checkpoint of an exploded step was written.
    let run_dir = ck.parent().unwrap().parent().unwrap();
    assert_eq!(run::checkpoints(run_dir).unwrap(), vec![ck.clone()]);
}

#[test]
fn an_exploding_first_step_names_no_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = exploding(tmp.path(), &["train.max_steps=4"]);
    let (step, last_checkpoint, err) = non_finite_stop(&cfg);
    eprintln!("{err}");
    assert_eq!(step, 1, "{err}");
    assert!(last_checkpoint.is_none(), "{err}");
}

#[test]
fn stop_flag_during_the_sft_stage_stops_it_within_a_step() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), &["loss=dpo", "sft.steps=100000"]);
    let started = std::time::Instant::now();
    let out = trainer::train(&cfg, &ctx(true), None).unwrap();
    assert!(out.interrupted);
    assert_eq!(out.steps, 0);
    assert!(started.elapsed().as_secs() < 60, "{:?}", started.elapsed());
    // Nothing cached for the partial stage, no adapter, no checkpoint.
    let cached: Vec<PathBuf> = walk(tmp.path())
        .into_iter()
        .filter(|p| p.ends_with("adapter_model.safetensors"))
        .collect();
    assert!(cached.is_empty(), "{cached:?}");
    assert!(run::checkpoints(&out.run_dir).unwrap().is_empty());
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn state(step: usize) -> TrainerState {
    TrainerState {
        step,
        total_steps: 10,
        running: None,
        config_hash: None,
        initial_eval: None,
    }
}

fn moments() -> HashMap<String, Tensor> {
    let t = Tensor::zeros(4, candle_core::DType::F32, &Device::Cpu).unwrap();
    HashMap::from([("m.a".to_string(), t.clone()), ("v.a".to_string(), t)])
}

fn no_temporaries(run_dir: &Path) {
    let left: Vec<PathBuf> = walk(run_dir)
        .into_iter()
        .chain(
            std::fs::read_dir(run_dir.join("checkpoints"))
                .unwrap()
                .map(|e| e.unwrap().path()),
        )
        .filter(|p| p.to_string_lossy().contains(".tmp"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_failed_adapter_write_names_the_file_and_step_and_cleans_up() {
    let tmp = tempfile::tempdir().unwrap();
    let err = run::save_checkpoint(tmp.path(), &state(7), &moments(), 2, "", |dir| {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("adapter_config.json"), "{}").unwrap();
        Err(TrainError::Io {
            path: dir.join("adapter_model.safetensors"),
            cause: std::io::Error::other("No space left on device (os error 28)"),
        })
    })
    .unwrap_err();
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(msg.contains("adapter_model.safetensors"), "{msg}");
    assert!(msg.contains("step 7"), "{msg}");
    no_temporaries(tmp.path());
}

#[test]
fn a_failed_optimizer_write_names_the_file_and_step_and_cleans_up() {
    let tmp = tempfile::tempdir().unwrap();
    let err = run::save_checkpoint(tmp.path(), &state(3), &moments(), 2, "", |dir| {
        // A folder where the optimizer file goes: its write fails.
        let parent = dir.parent().unwrap();
        std::fs::create_dir_all(parent.join("optimizer.safetensors")).unwrap();
        std::fs::create_dir_all(dir).unwrap();
        Ok(())
    })
    .unwrap_err();
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(msg.contains("optimizer.safetensors"), "{msg}");
    assert!(msg.contains("step 3"), "{msg}");
    no_temporaries(tmp.path());
}

#[test]
fn a_failed_atomic_write_leaves_no_temporary_file() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("summary.json");
    std::fs::create_dir_all(target.join("occupied")).unwrap();
    assert!(run::write_atomic(&target, b"{}").is_err());
    no_temporaries_in(tmp.path());
}

fn no_temporaries_in(dir: &Path) {
    let left: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
