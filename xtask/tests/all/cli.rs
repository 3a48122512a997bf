//! The command line end to end (debug binary): `data prepare` / `data stats` on the embedded
//! default recipes, and bad input: non-zero exit, a message naming the problem, no output file.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use common::xtask;

#[test]
fn prepare_default_recipe_to_jsonl_and_parquet_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let jsonl = dir.path().join("train.jsonl");
    let (ok, out, err) = xtask(&[
        "data",
        "prepare",
        "--recipe",
        "default",
        "--out",
        jsonl.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("wrote 500 pairs"), "{out}");
    assert_eq!(
        std::fs::read_to_string(&jsonl).unwrap().lines().count(),
        500
    );
    let pq = dir.path().join("train.parquet");
    let (ok, _, err) = xtask(&[
        "data",
        "prepare",
        "--input",
        jsonl.to_str().unwrap(),
        "--out",
        pq.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    // Parquet read back through the native converter gives the same pairs, in order.
    let a = reprpo_data::read_table(&jsonl).unwrap();
    let b = reprpo_data::read_table(&pq).unwrap();
    let opts = reprpo_data::ConvertOptions {
        dataset: "x".into(),
        seed: 0,
    };
    let pa = reprpo_data::convert(reprpo_data::Converter::Pairs, &a, &opts)
        .unwrap()
        .pairs;
    let pb = reprpo_data::convert(reprpo_data::Converter::Pairs, &b, &opts)
        .unwrap()
        .pairs;
    assert_eq!(pa.len(), 500);
    assert_eq!(pb.len(), pa.len(), "pairs read back from Parquet");
    for (x, y) in pa.iter().zip(&pb) {
        assert_eq!(
            (&x.id, &x.prompt, &x.chosen, &x.rejected),
            (&y.id, &y.prompt, &y.chosen, &y.rejected)
        );
    }
}

#[test]
fn stats_reports_every_field() {
    let (ok, out, err) = xtask(&["data", "stats", "--recipe", "default-test"]);
    assert!(ok, "{err}");
    for field in ["prompt", "chosen", "rejected", "longest"] {
        assert!(
            out.lines().any(|l| l.starts_with(field)),
            "{field} missing in\n{out}"
        );
    }
    assert!(out.contains("100 pairs"), "{out}");
    assert!(out.contains("rows truncated by the limits: 0"), "{out}");
}

#[test]
fn bad_inputs_fail_clearly_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let o = out.to_str().unwrap();
    // Unknown recipe: names it and lists the known ones.
    let (ok, _, err) = xtask(&["data", "prepare", "--recipe", "nope", "--out", o]);
    assert!(!ok);
    assert!(
        err.contains("unknown dataset recipe `nope`") && err.contains("default"),
        "{err}"
    );
    // A bad row deep in a file: file, row and field named; no partial output.
    let bad = dir.path().join("bad.jsonl");
    let mut text = String::new();
    for i in 0..5 {
        text.push_str(&format!(
            "{{\"prompt\":\"p{i}\",\"chosen\":\"c\",\"rejected\":\"r\"}}\n"
        ));
    }
    text.push_str("{\"prompt\":\"p\",\"chosen\":\"\",\"rejected\":\"r\"}\n");
    std::fs::write(&bad, text).unwrap();
    let (ok, _, err) = xtask(&[
        "data",
        "prepare",
        "--input",
        bad.to_str().unwrap(),
        "--out",
        o,
    ]);
    assert!(!ok);
    assert!(
        err.contains("bad.jsonl, row 6, field `chosen`: empty"),
        "{err}"
    );
    // Unknown config key in overrides.
    let (ok, _, err) = xtask(&["data", "stats", "--recipe", "default-test", "max_lenght=3"]);
    assert!(!ok);
    assert!(err.contains("config key `max_lenght`"), "{err}");
    assert!(!out.exists());
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "only the input file remains"
    );
}

#[test]
fn train_then_eval_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = format!("run.out_dir={}", tmp.path().display());
    let (ok, out, err) = xtask(&[
        "train",
        "loss=dpo",
        "sft.steps=0",
        "train.max_steps=2",
        "data.n_train=8",
        "data.eval_datasets=[default-test]",
        "data.ood_datasets=[]",
        "run.plots=false",
        &out_dir,
        "--no-progress",
    ]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("held-out preference accuracy"), "{out}");
    assert!(
        out.contains("what the adapter changed: in distribution: "),
        "{out}"
    );
    let run = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.join("adapter/adapter_config.json").is_file())
        .expect("a run folder with an adapter");
    assert!(run.join("resolved_config.toml").is_file());
    let (ok, out, err) = xtask(&[
        "eval",
        "--adapter",
        run.to_str().unwrap(),
        "--suite",
        "default",
        "limit=4",
        "generations=0",
        "--no-progress",
    ]);
    assert!(ok, "{out}{err}");
    assert!(run.join("eval/default/table.md").is_file(), "{out}");
    // A mistyped key fails before any work, naming it and the nearest key.
    let (ok, _, err) = xtask(&["train", "train.lrr=1e-3", &out_dir]);
    assert!(!ok);
    assert!(
        err.contains("train.lrr") && err.contains("did you mean `lr`"),
        "{err}"
    );
    let (ok, out, _) = xtask(&["train", "--print-config", "loss=ipo"]);
    assert!(ok);
    assert!(out.contains("loss = \"ipo\""), "{out}");
}

#[test]
fn convert_llama2c_writes_a_hugging_face_folder() {
    let src =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/stories260K");
    if !src.join("stories260K.bin").exists() {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "CI always has ../shared/data"
        );
        println!("skipped: ../shared/data not present");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("stories");
    let (ok, stdout, err) = xtask(&[
        "convert",
        "llama2c",
        "--checkpoint",
        src.join("stories260K.bin").to_str().unwrap(),
        "--tokenizer",
        src.join("tok512.bin").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(stdout.contains("layers 5"), "{stdout}");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(out.join(f).exists(), "{f}");
    }
}

/// `cargo xtask train` with no arguments (only where it writes): the embedded default's ReprPO
/// preset makes the run optimise its own objective. The reroute distance on the evaluation
/// pairs, which the coefficient schedule does not move, falls from its value before the first
/// step (docs/reprpo-default-sweep.md: -14%), and the summary says so.
#[test]
fn the_default_run_lowers_its_reroute_distance() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = format!("run.out_dir={}", tmp.path().display());
    let (ok, out, err) = xtask(&["train", "--no-progress", "run.plots=false", &out_dir]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("the objective on the evaluation pairs: loss_rr"),
        "{out}"
    );
    let run = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.join("summary.json").is_file())
        .unwrap();
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    let before = s["initial_eval/loss_rr"].as_f64().unwrap();
    let after = s["final_eval/loss_rr"].as_f64().unwrap();
    assert!(after < 0.95 * before, "loss_rr {before} -> {after}");
    // The retain term holds the chosen completions' hidden states.
    assert!(
        s["final_eval/cosine/chosen"].as_f64().unwrap() > 0.98,
        "{s}"
    );
}

/// Train a short run with `extra` keys, then `eval` its folder: the adapted model's held-out
/// scores in the eval table equal the training job's (`summary.json`) within 1e-6, so eval
/// rebuilt the very model the trainer scored. `marker`: a file the run folder must hold.
fn eval_reproduces_training_scores(extra: &[&str], marker: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = format!("run.out_dir={}", tmp.path().display());
    let mut args = vec![
        "train",
        "sft.steps=0",
        "train.max_steps=2",
        "train.lr=1e-2",
        "data.n_train=8",
        "run.plots=false",
        &out_dir,
        "--no-progress",
    ];
    args.extend_from_slice(extra);
    let (ok, out, err) = xtask(&args);
    assert!(ok, "{out}{err}");
    let run = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.join(marker).is_file())
        .unwrap_or_else(|| panic!("a run folder with {marker}"));
    let (ok, out, err) = xtask(&[
        "eval",
        "--adapter",
        run.to_str().unwrap(),
        "--suite",
        "default",
        "generations=0",
        "--no-progress",
    ]);
    assert!(ok, "{out}{err}");
    let read = |p: std::path::PathBuf| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    let summary = read(run.join("summary.json"));
    let table = read(run.join("eval/default/table.json"));
    let col = |name: &str| {
        table["columns"]
            .as_array()
            .unwrap()
            .iter()
            .position(|c| c["name"] == name)
            .unwrap()
    };
    let row = &table["rows"][1]["cells"];
    for (set, key) in [("default-test", "id"), ("default-ood", "ood")] {
        let cell = &row[col(set)];
        for stat in ["acc", "prob"] {
            let got = cell[stat].as_f64().unwrap();
            let skey = format!(
                "adapter/{key}/{}",
                if stat == "acc" { "accuracy" } else { "prob" }
            );
            let want = summary[&skey].as_f64().unwrap();
            assert!(
                (got - want).abs() < 1e-6,
                "{extra:?} {set} {stat}: eval {got}, training {want}"
            );
        }
    }
}

/// A run of a reference method with a trained transform (issue 17): `eval` on its folder scores
/// the adapted model and reproduces the training job's held-out scores (the transform acts on
/// activations inside the loss only; eval accepts the run's `transform.safetensors`).
#[test]
fn eval_of_a_transform_run_reproduces_its_training_scores() {
    eval_reproduces_training_scores(&["loss=hs-ether-prefvec"], "transform.safetensors");
}

/// A LoRA run on an NF4 base with double quantisation (issue 19): `eval` reads `model.quantize`
/// from the run's resolved configuration and quantises the base again, bit for bit as the
/// trainer did, so the held-out scores are the training job's.
#[test]
fn eval_of_a_quantised_run_reproduces_its_training_scores() {
    eval_reproduces_training_scores(
        &["model.quantize=nf4", "model.double_quant=true"],
        "summary.json",
    );
}

#[test]
fn print_config_estimates_memory_and_warns_when_it_cannot_fit() {
    let weights = |err: &str| -> f64 {
        let tail = err.split("(weights ").nth(1).unwrap();
        tail.split(',').next().unwrap().trim().parse().unwrap()
    };
    let (ok, _, err) = xtask(&["train", "--print-config", "model.name_or_path=small"]);
    assert!(ok, "{err}");
    assert!(err.contains("estimated memory:"), "{err}");
    assert!(!err.contains("warning"), "{err}");
    let dense = weights(&err);
    // NF4 keeps the projections at about 0.56 bytes per weight instead of 4; the embedding and
    // output head stay f32, so the whole is smaller but not eight times.
    let (ok, _, err) = xtask(&[
        "train",
        "--print-config",
        "model.name_or_path=small",
        "model.quantize=nf4",
        "sft.steps=0",
    ]);
    assert!(ok, "{err}");
    let nf4 = weights(&err);
    assert!(nf4 < dense && nf4 > dense / 8.0, "{nf4} vs {dense}");
    let (ok, _, err) = xtask(&[
        "train",
        "--print-config",
        "model.name_or_path=small",
        "train.batch_size=1000000",
        "data.max_length=4096",
    ]);
    assert!(ok, "{err}");
    assert!(
        err.contains("warning: that exceeds") && err.contains("train.grad_checkpointing"),
        "{err}"
    );
}

/// A reader that goes away (`cargo xtask ... | head`) ends the process quietly with SIGPIPE's
/// status, not a panic message.
#[test]
fn a_closed_stdout_is_not_a_panic() {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["train", "--list-presets"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .env("RUST_BACKTRACE", "0")
        .spawn()
        .unwrap();
    // Close the read end before the child writes: its first write fails with EPIPE.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(141), "{stderr}");
}
