//! `cargo xtask eval` on what a user brings (issue 16, evaluation): plain PEFT folders (local
//! or by hub id, offline from a cache laid out as `hf-hub` writes it) with the base from
//! `base_model_name_or_path`, `model.*` overrides, a base model alone, suites by path, one
//! examples file per model, the messages for folders that are not adapters, and relative paths
//! resolved against what they were written for. Every file is written by the test: the train
//! fixture's small Llama (byte-level tokenizer) and its PEFT LoRA.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use common::xtask_in;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/train")
}

/// The default suite, given by path (which is itself point 3 of the issue).
fn suite() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../datasets/suites/default.toml")
        .display()
        .to_string()
}

/// `dir/model`: the train fixture's Llama folder.
fn model_folder(dir: &Path) -> PathBuf {
    let m = dir.join("model");
    std::fs::create_dir_all(&m).unwrap();
    for e in std::fs::read_dir(fixtures().join("model")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, m.join(p.file_name().unwrap())).unwrap();
    }
    m.canonicalize().unwrap()
}

/// A plain PEFT folder `dir` (the fixture LoRA) whose `base_model_name_or_path` is `base`
/// (`None`: the key removed).
fn peft_folder(dir: &Path, base: Option<&str>) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let src = fixtures().join("lora");
    std::fs::copy(
        src.join("adapter_model.safetensors"),
        dir.join("adapter_model.safetensors"),
    )
    .unwrap();
    let text = std::fs::read_to_string(src.join("adapter_config.json")).unwrap();
    let mut cfg: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text).unwrap();
    match base {
        Some(b) => cfg.insert("base_model_name_or_path".into(), b.into()),
        None => cfg.remove("base_model_name_or_path"),
    };
    std::fs::write(
        dir.join("adapter_config.json"),
        serde_json::to_string_pretty(&cfg).unwrap(),
    )
    .unwrap();
    dir.to_path_buf()
}

/// A run folder by hand: `resolved_config.toml` with only `[model] name_or_path` and the
/// fixture LoRA in `adapter/`.
fn run_folder(dir: &Path, name_or_path: &str) -> PathBuf {
    peft_folder(&dir.join("adapter"), None);
    std::fs::write(
        dir.join("resolved_config.toml"),
        format!("[model]\nname_or_path = {name_or_path:?}\n"),
    )
    .unwrap();
    dir.to_path_buf()
}

/// `eval` in `cwd` with a small, quick setting; `out` is the output folder.
fn eval(cwd: &Path, out: &Path, args: &[&str]) -> (bool, String, String) {
    eval_env(cwd, out, args, &[])
}

fn eval_env(cwd: &Path, out: &Path, args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let suite = suite();
    let out = out.display().to_string();
    let mut all = vec![
        "eval",
        "--suite",
        &suite,
        "--out",
        &out,
        "--no-progress",
        "limit=2",
        "generations=0",
    ];
    all.extend_from_slice(args);
    xtask_in(cwd, &all, env)
}

/// The `model` of every line of a JSONL file.
fn models(file: &Path) -> Vec<String> {
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["model"].as_str().unwrap().to_string()
        })
        .collect()
}

/// The distinct models of `examples.jsonl`.
fn scored(out: &Path) -> BTreeSet<String> {
    models(&out.join("examples.jsonl")).into_iter().collect()
}

/// Point 1 and 4: a plain PEFT folder (no resolved_config.toml) is scored against the base its
/// `base_model_name_or_path` names, a path relative to the adapter folder; `examples.jsonl` has
/// every (model, item) and `examples-<label>.jsonl` each model's own lines.
#[test]
fn plain_peft_folder_against_its_base_with_one_examples_file_per_model() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_folder(tmp.path());
    let peft = peft_folder(&tmp.path().join("peft"), Some("../model"));
    let cwd = tmp.path().join("elsewhere");
    std::fs::create_dir_all(&cwd).unwrap();
    let out = tmp.path().join("out");
    let (ok, stdout, err) = eval(&cwd, &out, &["--adapter", peft.to_str().unwrap()]);
    assert!(ok, "{stdout}{err}");
    assert!(
        stdout.contains(&format!("base model: {}", model.display()))
            && stdout.contains("adapter_config.json base_model_name_or_path"),
        "{stdout}"
    );
    assert_eq!(scored(&out), BTreeSet::from(["base".into(), "peft".into()]));
    let all = models(&out.join("examples.jsonl"));
    let base = models(&out.join("examples-base.jsonl"));
    let own = models(&out.join("examples-peft.jsonl"));
    assert!(base.iter().all(|m| m == "base") && own.iter().all(|m| m == "peft"));
    assert_eq!(base.len() + own.len(), all.len());
    assert!(!base.is_empty() && base.len() == own.len());
}

/// Point 1: `model.name_or_path` (relative to the working directory), `model.dtype` and
/// `model.device` override the adapter's base; a PEFT folder naming no base needs one.
#[test]
fn model_keys_override_the_base_and_a_peft_folder_without_base_asks_for_one() {
    let tmp = tempfile::tempdir().unwrap();
    model_folder(tmp.path());
    let none = peft_folder(&tmp.path().join("nobase"), None);
    let out = tmp.path().join("out");
    let adapter = none.to_str().unwrap();
    let (ok, _, err) = eval(tmp.path(), &out, &["--adapter", adapter]);
    assert!(!ok);
    assert!(
        err.contains("base_model_name_or_path") && err.contains("model.name_or_path="),
        "{err}"
    );
    let args = [
        "--adapter",
        adapter,
        "model.name_or_path=model",
        "model.dtype=f32",
    ];
    let (ok, stdout, err) = eval(tmp.path(), &out, &args);
    assert!(ok, "{stdout}{err}");
    assert!(
        stdout.contains("relative to the working directory"),
        "{stdout}"
    );
    assert_eq!(
        scored(&out),
        BTreeSet::from(["base".into(), "nobase".into()])
    );
    // A base named `tiny` (the random preset) is overridden, never loaded.
    let tiny = peft_folder(&tmp.path().join("tinybase"), Some("tiny"));
    let args = [
        "--adapter",
        tiny.to_str().unwrap(),
        "model.name_or_path=./model",
    ];
    let (ok, stdout, err) = eval(tmp.path(), &out, &args);
    assert!(ok, "{stdout}{err}");
    assert!(
        stdout.contains("model.name_or_path replaces the base") && stdout.contains("tiny"),
        "{stdout}"
    );
    // The overrides reach the loader: the device and dtype keys are checked and named.
    let (ok, _, err) = eval(
        tmp.path(),
        &out,
        &[&args[..], &["model.device=cuda:9"]].concat(),
    );
    assert!(!ok);
    assert!(err.contains("model.device"), "{err}");
    let (ok, _, err) = eval(
        tmp.path(),
        &out,
        &[&args[..], &["model.dtype=f64"]].concat(),
    );
    assert!(!ok);
    assert!(err.contains("model.dtype") && err.contains("f64"), "{err}");
    let (ok, _, err) = eval(tmp.path(), &out, &[&args[..], &["model.nme=x"]].concat());
    assert!(!ok);
    assert!(err.contains("nme") && err.contains("name_or_path"), "{err}");
}

/// Point 1: run folders and PEFT folders on one base are scored together (one row each); on
/// different bases the error names both folders and their bases.
#[test]
fn run_and_peft_folders_mix_on_one_base_and_differing_bases_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_folder(tmp.path());
    let run = run_folder(&tmp.path().join("run"), "../model");
    let peft = peft_folder(&tmp.path().join("peft"), Some(model.to_str().unwrap()));
    let out = tmp.path().join("out");
    let args = [
        "--adapter",
        run.to_str().unwrap(),
        "--adapter",
        peft.to_str().unwrap(),
    ];
    let (ok, stdout, err) = eval(tmp.path(), &out, &args);
    assert!(ok, "{stdout}{err}");
    let want: BTreeSet<String> = ["base", "run", "peft"].map(String::from).into();
    assert_eq!(scored(&out), want);
    let other = peft_folder(&tmp.path().join("other"), Some("tiny"));
    let args = [
        "--adapter",
        run.to_str().unwrap(),
        "--adapter",
        other.to_str().unwrap(),
    ];
    let (ok, _, err) = eval(tmp.path(), &out, &args);
    assert!(!ok);
    assert!(
        err.contains("different base models")
            && err.contains(run.to_str().unwrap())
            && err.contains(other.to_str().unwrap())
            && err.contains(model.to_str().unwrap())
            && err.contains("tiny"),
        "{err}"
    );
}

/// Point 1: a string that is not a local folder is a hub adapter id: found in the cache (offline)
/// with its label made safe for the examples file name, or a clear error when not cached; a
/// missing path is "no such folder", never a hub id.
#[test]
fn hub_adapter_ids_come_from_the_cache_and_missing_paths_are_not_sent_to_the_hub() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_folder(tmp.path());
    let snap = tmp.path().join("hf/hub/models--org--lora/snapshots/abc123");
    peft_folder(&snap, Some(model.to_str().unwrap()));
    let refs = tmp.path().join("hf/hub/models--org--lora/refs");
    std::fs::create_dir_all(&refs).unwrap();
    std::fs::write(refs.join("main"), "abc123").unwrap();
    let hf = tmp.path().join("hf").display().to_string();
    let env = [("HF_HOME", hf.as_str()), ("HF_HUB_OFFLINE", "1")];
    let out = tmp.path().join("out");
    let (ok, stdout, err) = eval_env(tmp.path(), &out, &["--adapter", "org/lora"], &env);
    assert!(ok, "{stdout}{err}");
    assert!(scored(&out).contains("org/lora"));
    assert!(out.join("examples-org_lora.jsonl").is_file());
    let (ok, _, err) = eval_env(tmp.path(), &out, &["--adapter", "org/absent"], &env);
    assert!(!ok);
    assert!(
        err.contains("hub adapter id") && err.contains("org/absent") && err.contains("not cached"),
        "{err}"
    );
    let (ok, _, err) = eval_env(tmp.path(), &out, &["--adapter", "./absent"], &env);
    assert!(!ok);
    assert!(
        err.contains("no such folder") && err.contains("relative to the working directory"),
        "{err}"
    );
}

/// Point 2: `model.name_or_path=DIR` with no adapter scores that base alone; with neither an
/// adapter nor a model, the random base alone is scored and the output says so.
#[test]
fn a_base_model_alone_and_the_no_argument_case_says_what_it_scores() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_folder(tmp.path());
    let out = tmp.path().join("out");
    let arg = format!("model.name_or_path={}", model.display());
    let (ok, stdout, err) = eval(tmp.path(), &out, &[&arg]);
    assert!(ok, "{stdout}{err}");
    assert_eq!(scored(&out), BTreeSet::from(["base".into()]));
    assert!(
        stdout.contains(&format!("base model: {}", model.display())),
        "{stdout}"
    );
    let root = tmp.path().display().to_string();
    let (ok, stdout, err) = eval_env(tmp.path(), &out, &[], &[("REPRPO_ROOT", &root)]);
    assert!(ok, "{stdout}{err}");
    assert!(
        stdout.contains("no --adapter, no model.name_or_path")
            && stdout.contains("random `tiny` base alone"),
        "{stdout}"
    );
    // With a run trained on the embedded default under `runs/`, that run, and it says so.
    let runs = format!("run.out_dir={}", tmp.path().join("runs").display());
    let train = [
        "train",
        "loss=dpo",
        "sft.steps=0",
        "train.max_steps=1",
        "data.n_train=4",
        "data.eval_datasets=[]",
        "data.ood_datasets=[]",
        "run.plots=false",
        "--no-progress",
        &runs,
    ];
    let (ok, stdout, err) = xtask_in(tmp.path(), &train, &[]);
    assert!(ok, "{stdout}{err}");
    let (ok, stdout, err) = eval_env(tmp.path(), &out, &[], &[("REPRPO_ROOT", &root)]);
    assert!(ok, "{stdout}{err}");
    assert!(
        stdout.contains("evaluating the newest run trained on the embedded default"),
        "{stdout}"
    );
    assert_eq!(scored(&out).len(), 2, "{stdout}");
}

/// Point 3: suites by path (relative to the working directory) and by name; a missing path
/// says against what it was resolved, and a name written with `.toml` has no doubled suffix.
#[test]
fn suites_by_path_and_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_folder(tmp.path());
    std::fs::write(
        tmp.path().join("my_suite.toml"),
        "[[dataset]]\nname = \"default-test\"\nrole = \"test\"\n",
    )
    .unwrap();
    let out = tmp.path().join("out");
    let m = format!("model.name_or_path={}", model.display());
    let o = out.display().to_string();
    let base = [
        "eval",
        "--out",
        &o,
        "--no-progress",
        "limit=2",
        "generations=0",
        &m,
    ];
    let run = |suite: &str| xtask_in(tmp.path(), &[&base[..], &["--suite", suite]].concat(), &[]);
    let (ok, stdout, err) = run("my_suite.toml");
    assert!(ok, "{stdout}{err}");
    assert!(
        stdout.contains("default-test") && !stdout.contains("default-ood"),
        "{stdout}"
    );
    let (ok, stdout, err) = run("default");
    assert!(ok, "{stdout}{err}");
    assert!(stdout.contains("default-ood"), "{stdout}");
    let (ok, _, err) = run("default.toml");
    assert!(!ok);
    assert!(
        err.contains("relative to the working directory")
            && err.contains("--suite default")
            && !err.contains(".toml.toml"),
        "{err}"
    );
    let (ok, _, err) = run("nope");
    assert!(!ok);
    assert!(
        err.contains("no suite `nope`") && !err.contains(".toml.toml"),
        "{err}"
    );
}

/// Point 5: a folder that is not an adapter, or a run config without `[model]`, is named once,
/// with what is needed and no empty config key.
#[test]
fn folders_without_a_run_config_say_what_is_needed() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let out = tmp.path().join("out");
    let (ok, _, err) = eval(tmp.path(), &out, &["--adapter", empty.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains("resolved_config.toml")
            && err.contains("[model]")
            && err.contains("base_model_name_or_path")
            && !err.contains("config key ``")
            && !err.contains("whole config"),
        "{err}"
    );
    assert_eq!(err.matches(empty.to_str().unwrap()).count(), 1, "{err}");
    let run = run_folder(&tmp.path().join("run"), "tiny");
    std::fs::write(run.join("resolved_config.toml"), "loss = \"dpo\"\n").unwrap();
    let (ok, _, err) = eval(tmp.path(), &out, &["--adapter", run.to_str().unwrap()]);
    assert!(!ok);
    let file = run.join("resolved_config.toml").display().to_string();
    assert!(err.contains("no [model] table"), "{err}");
    assert_eq!(err.matches(&file).count(), 1, "{err}");
}

/// Point 6: `model.name_or_path` in a run's resolved_config.toml is relative to the run folder,
/// whatever the working directory; a missing `./x` there names the folder it was resolved
/// against.
#[test]
fn paths_in_a_run_config_are_relative_to_the_run_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_folder(&tmp.path().join("a"));
    let run = run_folder(&tmp.path().join("a/run"), "../model");
    let cwd = tmp.path().join("b/c");
    std::fs::create_dir_all(&cwd).unwrap();
    let out = tmp.path().join("out");
    let (ok, stdout, err) = eval(&cwd, &out, &["--adapter", "../../a/run"]);
    assert!(ok, "{stdout}{err}");
    assert!(
        stdout.contains(&format!("base model: {}", model.display())),
        "{stdout}"
    );
    run_folder(&run, "./missing");
    let (ok, _, err) = eval(&cwd, &out, &["--adapter", run.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains("no such folder")
            && err.contains("relative to the folder holding that file")
            && err.contains(&run.canonicalize().unwrap().display().to_string()),
        "{err}"
    );
}
