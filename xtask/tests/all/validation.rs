//! Bad configurations and inputs fail before any work, naming the file or key: an empty data
//! file, `reprpo.layers = []`, a missing local model folder, a tokenizer larger than the model's
//! vocabulary.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;
use common::xtask;

#[test]
fn data_stats_on_an_empty_file_fails_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let (ok, out, err) = xtask(&["data", "stats", "--input", empty.to_str().unwrap()]);
    assert!(!ok, "{out}");
    assert!(!out.contains("NaN"), "{out}");
    assert!(
        err.contains(&empty.display().to_string()) && err.contains("no rows"),
        "{err}"
    );
}

fn train(tmp: &std::path::Path, extra: &[&str]) -> (bool, String, String) {
    let out_dir = format!("run.out_dir={}", tmp.display());
    let mut args = vec![
        "train",
        "sft.steps=0",
        "train.max_steps=1",
        "data.n_train=4",
        "data.eval_datasets=[]",
        "data.ood_datasets=[]",
        "run.plots=false",
        "--no-progress",
    ];
    args.push(&out_dir);
    args.extend_from_slice(extra);
    xtask(&args)
}

#[test]
fn empty_reprpo_layers_fail_before_work_naming_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let (ok, out, err) = train(tmp.path(), &["loss=reprpo", "reprpo.layers=[]"]);
    assert!(!ok, "{out}");
    assert!(
        err.contains("`reprpo.layers`") && err.contains("is empty"),
        "{err}"
    );
}

#[test]
fn missing_local_model_folder_is_no_such_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let absent = tmp.path().join("no-such-model");
    for p in [
        absent.to_str().unwrap(),
        "./no-such-model",
        "../no-such-model",
    ] {
        let (ok, out, err) = train(tmp.path(), &[&format!("model.name_or_path={p}")]);
        assert!(!ok, "{out}");
        assert!(
            err.contains("model.name_or_path") && err.contains("no such folder"),
            "{p}: {err}"
        );
    }
}

#[test]
fn tokenizer_past_vocab_size_fails_at_load_naming_both_files() {
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/models/llama_tied");
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture.join(f), model.join(f)).unwrap();
    }
    // 259 byte-level ids against the fixture's 96 embedding rows.
    reprpo_data::Tok::byte_level()
        .unwrap()
        .inner
        .save(model.join("tokenizer.json"), false)
        .unwrap();
    let (ok, out, err) = train(
        tmp.path(),
        &[&format!("model.name_or_path={}", model.display())],
    );
    assert!(!ok, "{out}");
    assert!(
        err.contains(&model.join("config.json").display().to_string())
            && err.contains(&model.join("tokenizer.json").display().to_string())
            && err.contains("`vocab_size`"),
        "{err}"
    );
    assert!(!err.contains("index-select"), "{err}");
}
