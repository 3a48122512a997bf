//! `cargo xtask analyze` end to end (issue 20, hidden-state analysis): a run folder with the
//! train fixture's LoRA on its small Llama (3 blocks, hidden size 32), the default suite's pair
//! datasets. The summary has the base and the adapter side by side, the adapter is really
//! active for its subject and off for the base, the pictures are written, and bad keys are
//! errors that name the key and write nothing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::path::{Path, PathBuf};

use common::xtask_in;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/train")
}

/// `dir/model` (the fixture Llama) and `dir/run` (a run folder holding the fixture LoRA on it).
fn model_and_run(dir: &Path) -> (PathBuf, PathBuf) {
    let m = dir.join("model");
    std::fs::create_dir_all(&m).unwrap();
    for e in std::fs::read_dir(fixtures().join("model")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, m.join(p.file_name().unwrap())).unwrap();
    }
    let run = dir.join("run");
    std::fs::create_dir_all(run.join("adapter")).unwrap();
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        std::fs::copy(fixtures().join("lora").join(f), run.join("adapter").join(f)).unwrap();
    }
    let model = m.canonicalize().unwrap();
    std::fs::write(
        run.join("resolved_config.toml"),
        format!(
            "[model]\nname_or_path = {:?}\n",
            model.display().to_string()
        ),
    )
    .unwrap();
    (model, run)
}

fn analyze(cwd: &Path, args: &[&str]) -> (bool, String, String) {
    let mut all = vec!["analyze", "limit=8", "by_token_pairs=2"];
    all.extend_from_slice(args);
    xtask_in(cwd, &all, &[])
}

fn summary(out: &Path) -> Value {
    let text = std::fs::read_to_string(out.join("summary.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn png_size(path: &Path) -> (u32, u32) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{}", path.display());
    let be = |i: usize| u32::from_be_bytes(bytes[i..i + 4].try_into().unwrap());
    (be(16), be(20))
}

#[test]
fn base_and_adapter_side_by_side_with_pictures() {
    let dir = tempfile::tempdir().unwrap();
    let (model, run) = model_and_run(dir.path());
    let out = dir.path().join("out");
    let (ok, stdout, stderr) = analyze(
        dir.path(),
        &[
            "--adapter",
            run.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "layers=[1,-1]",
        ],
    );
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("default-mc: multiple choice"), "{stdout}");
    let s = summary(&out);
    assert_eq!(s["header"]["layers"], serde_json::json!([1, 3]));
    assert_eq!(
        s["header"]["datasets"],
        serde_json::json!(["default", "default-test", "default-ood"])
    );
    let subjects = s["subjects"].as_array().unwrap();
    assert_eq!(subjects.len(), 2);
    assert_eq!(subjects[0]["subject"], "base");
    for sub in subjects {
        for l in sub["layers"].as_array().unwrap() {
            assert_eq!(l["pairs"], 8);
            let probe = l["probe"].as_array().unwrap();
            let names: Vec<&str> = probe
                .iter()
                .map(|p| p["dataset"].as_str().unwrap())
                .collect();
            assert_eq!(names, ["default", "default-test", "default-ood"]);
            for p in probe {
                let acc = p["accuracy"].as_f64().unwrap();
                assert!((0.0..=1.0).contains(&acc), "{p}");
            }
            assert!(l["consistency"]["mean"].as_f64().unwrap().abs() <= 1.0);
        }
    }
    // The adapter is active for its subject: its log-prob margins differ from the base's.
    let margin = |i: usize| subjects[i]["datasets"][0]["mean_margin"].as_f64().unwrap();
    assert!(
        (margin(0) - margin(1)).abs() > 1e-6,
        "{} {}",
        margin(0),
        margin(1)
    );
    let md = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(md.contains("against base"), "{md}");
    let label = subjects[1]["subject"].as_str().unwrap();
    for f in [
        "by_h-base.png".to_string(),
        "by_token-base.png".to_string(),
        format!("by_h-{label}.png"),
        format!("by_token-{label}.png"),
        "consistency.png".into(),
        "pca.png".into(),
        "probe.png".into(),
        "margin.png".into(),
    ] {
        assert_eq!(png_size(&out.join(&f)), (1024, 640), "{f}");
    }

    // The base row is the model with no adapter: the same numbers as the model analysed alone.
    let alone = dir.path().join("alone");
    let name = format!("model.name_or_path={}", model.display());
    let (ok, stdout, stderr) = analyze(
        dir.path(),
        &[&name, "--out", alone.to_str().unwrap(), "layers=[1,-1]"],
    );
    assert!(ok, "{stdout}\n{stderr}");
    let a = summary(&alone);
    assert_eq!(a["subjects"].as_array().unwrap().len(), 1);
    assert_eq!(a["subjects"][0]["layers"], subjects[0]["layers"]);
}

#[test]
fn bad_keys_are_named_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = model_and_run(dir.path());
    let name = format!("model.name_or_path={}", model.display());
    let cases: [(&str, &str); 4] = [
        (
            "layers=[4]",
            "key `layers`: 4 is outside the model's hidden states 0..=3",
        ),
        ("probe_c=0", "key `probe_c`"),
        ("limit=1", "key `limit`"),
        ("top_kk=[1]", "top_kk"),
    ];
    for (kv, want) in cases {
        let out = dir.path().join("out");
        let (ok, stdout, stderr) =
            analyze(dir.path(), &[&name, "--out", out.to_str().unwrap(), kv]);
        assert!(!ok, "{kv}: {stdout}");
        assert!(stderr.contains(want), "{kv}: {stderr}");
        assert!(!out.exists(), "{kv}: {} was written", out.display());
    }
    // A suite without pairs.
    let out = dir.path().join("out");
    let mc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/reprpo-data/embedded/mc.jsonl");
    let data = format!("test={}", mc.display());
    let (ok, _, stderr) = analyze(
        dir.path(),
        &[&name, "--data", &data, "--out", out.to_str().unwrap()],
    );
    assert!(!ok);
    assert!(stderr.contains("has no pair dataset"), "{stderr}");
    assert!(!out.exists());
}
