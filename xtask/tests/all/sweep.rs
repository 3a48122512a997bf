//! `cargo xtask sweep` end to end on the embedded default: a 2 configurations x 2 seeds sweep at
//! a handful of steps run through the Slurm contract (array tasks out of order, one twice) and a
//! resumed `sweep run --jobs 2`, then reported; a failing sweep; bad sweep files; the ready
//! sweeps of datasets/sweeps/ plan and validate offline.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::path::{Path, PathBuf};

use common::xtask_in;
use reprpo_train::TrainConfig;
use serde_json::Value;

/// The first `n` lines of the embedded default's `recipe` as a JSONL file in `dir`.
fn small_set(dir: &Path, recipe: &str, n: usize) -> PathBuf {
    let full = dir.join(format!("{recipe}-all.jsonl"));
    let (ok, _, err) = xtask_in(
        dir,
        &[
            "data",
            "prepare",
            "--recipe",
            recipe,
            "--out",
            &full.display().to_string(),
        ],
        &[],
    );
    assert!(ok, "{err}");
    let text = std::fs::read_to_string(&full).unwrap();
    let lines: Vec<&str> = text.lines().take(n).collect();
    let out = dir.join(format!("{recipe}-{n}.jsonl"));
    std::fs::write(&out, lines.join("\n") + "\n").unwrap();
    out
}

/// A sweep of DPO and ReprPO, 2 seeds, 2 steps after a 1-step SFT stage, 16 training pairs, 8
/// held-out pairs per split, scored on the `default` suite at 4 items per dataset.
fn tiny_sweep(dir: &Path) -> PathBuf {
    let id = small_set(dir, "default-test", 8);
    let ood = small_set(dir, "default-ood", 8);
    let text = format!(
        r#"name = "tiny"
seeds = 2
baseline = "dpo"

[base]
"train.max_steps" = 2
"sft.steps" = 1
"train.n_eval_examples" = 8
"data.n_train" = 16
"data.eval_datasets" = "{}"
"data.ood_datasets" = "{}"
"run.plots" = false

[axes]
loss = ["dpo", "reprpo"]

[eval]
suites = ["default"]
options = {{ limit = 4 }}

[slurm]
parallel = 2
time = "00:10:00"
"#,
        id.display(),
        ood.display()
    );
    let file = dir.join("tiny.toml");
    std::fs::write(&file, text).unwrap();
    file
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn a_small_sweep_runs_as_array_tasks_resumes_and_reports() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let file = tiny_sweep(t);
    let dir = t.join("sweep");
    let d = dir.display().to_string();
    // The Slurm script: one task per run, at most 2 at once.
    let (ok, out, err) = xtask_in(t, &["sweep", "slurm", "tiny.toml", "--out", &d], &[]);
    assert!(ok, "{out}{err}");
    let script = std::fs::read_to_string(dir.join("sweep.sbatch")).unwrap();
    assert!(script.contains("#SBATCH --array=0-3%2\n"), "{script}");
    assert!(
        script.contains(&format!("sweep run-one '{d}'\n")),
        "{script}"
    );
    let plan = json(&dir.join("plan.json"));
    let ids: Vec<&str> = plan["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            "loss-dpo-s0",
            "loss-reprpo-s0",
            "loss-dpo-s1",
            "loss-reprpo-s1"
        ]
    );
    // Array tasks, out of order, one of them twice.
    for (task, again) in [("3", false), ("1", false), ("1", true)] {
        let env = [("SLURM_ARRAY_TASK_ID", task)];
        let (ok, out, err) = xtask_in(t, &["sweep", "run-one", &d], &env);
        assert!(ok, "task {task}: {out}{err}");
        assert_eq!(out.contains("already done"), again, "task {task}: {out}");
    }
    // A run killed earlier left its work folder: the next start of that run removes it.
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    gone.wait().unwrap();
    let host = reprpo_sweep::fsx::hostname();
    let stale = dir.join(format!("runs/.work-loss-dpo-s0.{host}.{}", gone.id()));
    std::fs::create_dir_all(stale.join("out")).unwrap();
    // The sweep continues with the runs not done, 2 at a time, 4 / 2 threads each.
    let env = [("RAYON_NUM_THREADS", "4")];
    let (ok, out, err) = xtask_in(t, &["sweep", "run", &d, "--jobs", "2"], &env);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("4 runs: 2 done, 2 to run, 2 at a time with 2 threads each"),
        "{out}"
    );
    assert!(out.contains("2 ok, 0 failed, 2 skipped"), "{out}");
    let log = std::fs::read_to_string(dir.join("logs/loss-dpo-s0.log")).unwrap();
    assert!(log.contains("threads 2"), "{log}");
    assert!(!stale.exists(), "the stale work folder is still there");
    check_runs(&dir);
    check_report(t, &dir, &file);
}

/// Each run folder is complete and trained its planned configuration.
fn check_runs(dir: &Path) {
    for (id, loss, seed) in [
        ("loss-dpo-s0", "dpo", 0),
        ("loss-reprpo-s0", "reprpo", 0),
        ("loss-dpo-s1", "dpo", 1),
        ("loss-reprpo-s1", "reprpo", 1),
    ] {
        let run = dir.join("runs").join(id);
        assert_eq!(json(&run.join("status.json"))["status"], "ok", "{id}");
        let cfg = TrainConfig::from_toml_file(&run.join("train/resolved_config.toml")).unwrap();
        assert_eq!(
            (cfg.loss.as_str(), cfg.train.seed, cfg.adapter.seed),
            (loss, seed, seed)
        );
        assert!(run.join("train/summary.json").is_file(), "{id}");
        // The training job's summary names the run folder where it ended up, not the work folder.
        let named = json(&run.join("train/summary.json"))["run_dir"].clone();
        assert_eq!(
            Path::new(named.as_str().unwrap()),
            run.join("train"),
            "{id}"
        );
        assert!(run.join("eval/default/table.json").is_file(), "{id}");
    }
    let left: Vec<_> = std::fs::read_dir(dir.join("runs"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// The report's numbers are the runs' numbers, aggregated per configuration.
fn check_report(t: &Path, dir: &Path, file: &Path) {
    let d = dir.display().to_string();
    let (ok, out, err) = xtask_in(t, &["sweep", "report", &d], &[]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("4 runs planned (2 seeds): 4 ok, 0 failed, 0 not run."),
        "{out}"
    );
    assert!(out.contains("| loss=reprpo - loss=dpo |"), "{out}");
    let r = json(&dir.join("report/report.json"));
    let suites: Vec<&str> = r["suites"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["suite"].as_str().unwrap())
        .collect();
    assert_eq!(suites, ["train-job", "default"]);
    let roles: Vec<&str> = r["suites"][1]["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["train", "ID", "OOD", "ID"]);
    // DPO's in-distribution mean of the training job: the mean of its two summaries.
    let acc = |id: &str| {
        json(&dir.join("runs").join(id).join("train/summary.json"))["adapter/id/accuracy"]
            .as_f64()
            .unwrap()
    };
    let want = (acc("loss-dpo-s0") + acc("loss-dpo-s1")) / 2.0;
    let cell = &r["suites"][0]["rows"][0]["cells"][0];
    assert_eq!(cell["status"], "ok");
    assert!((cell["summary"]["mean"].as_f64().unwrap() - want).abs() < 1e-12);
    let diff = &r["suites"][0]["rows"][1]["cells"][0]["vs_baseline"];
    let want = (acc("loss-reprpo-s0") - acc("loss-dpo-s0") + acc("loss-reprpo-s1")
        - acc("loss-dpo-s1"))
        / 2.0;
    assert!(
        (diff["mean"].as_f64().unwrap() - want).abs() < 1e-12,
        "{diff}"
    );
    assert_eq!(diff["n"], 2);
    for f in ["report.md", "report.csv", "train-job.png", "default.png"] {
        assert!(dir.join("report").join(f).is_file(), "{f}");
    }
    // Planning the same file again keeps the runs: nothing to do.
    let (ok, out, err) = xtask_in(
        t,
        &["sweep", "run", &file.display().to_string(), "--out", &d],
        &[],
    );
    assert!(ok && out.contains("4 runs: 4 done, 0 to run"), "{out}{err}");
}

#[test]
fn failed_runs_are_recorded_and_reported_as_failed() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    // Valid when planned, fails when the run loads its data.
    let text = "seeds = 2\n[base]\n\"data.eval_datasets\" = \"/nonexistent/held-out.jsonl\"\n";
    std::fs::write(t.join("fails.toml"), text).unwrap();
    let d = t.join("sweep").display().to_string();
    let (ok, out, err) = xtask_in(t, &["sweep", "run", "fails.toml", "--out", &d], &[]);
    assert!(!ok, "{out}");
    assert!(err.contains("2 runs failed"), "{err}");
    assert!(
        out.contains("| base | FAILED: seeds 0, 1 (0 of 2 ok) |"),
        "{out}"
    );
    assert!(out.contains("/nonexistent/held-out.jsonl"), "{out}");
    let status = json(&t.join("sweep/runs/base-s0/status.json"));
    assert_eq!(status["status"], "failed");
    // A failed run is done: run-one skips it (exit 0), unless asked to retry (exit 1: it fails).
    let (ok, out, _) = xtask_in(t, &["sweep", "run-one", &d, "0"], &[]);
    assert!(ok && out.contains("already done"), "{out}");
    let (ok, _, err) = xtask_in(t, &["sweep", "run-one", &d, "0", "--retry-failed"], &[]);
    assert!(!ok && err.contains("base-s0: failed"), "{err}");
}

#[test]
fn bad_sweep_files_name_the_file_and_key_and_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let out_dir = t.join("sweep");
    let d = out_dir.display().to_string();
    for (text, want) in [
        (
            "[axes]\n\"train.lrr\" = [1e-3]\n",
            "`axes.\"train.lrr\"`: config key `train.lrr`: unknown key; did you mean `lr`?",
        ),
        (
            "[axes]\nloss = [\"dpo\", \"nope\"]\n",
            "`axes.\"loss\"`: config key `loss`: unknown loss \"nope\"",
        ),
        (
            "baseline = \"kto\"\n[axes]\nloss = [\"dpo\"]\n",
            "`baseline`: `kto` is no configuration label",
        ),
        ("seeds = 0\n", "`seeds`: must be at least 1"),
    ] {
        std::fs::write(t.join("bad.toml"), text).unwrap();
        let (ok, out, err) = xtask_in(t, &["sweep", "plan", "bad.toml", "--out", &d], &[]);
        assert!(!ok, "{text}: {out}");
        let file = t.join("bad.toml").display().to_string();
        assert!(
            err.contains(&format!("error: {file}: {want}")),
            "{text}: {err}"
        );
        assert!(!out_dir.exists(), "{text}: something was written");
    }
    let (ok, _, err) = xtask_in(t, &["sweep", "run-one", &d], &[]);
    assert!(!ok && err.contains("set SLURM_ARRAY_TASK_ID"), "{err}");
    let (ok, _, err) = xtask_in(t, &["sweep", "report", &d], &[]);
    assert!(!ok && err.contains("plan.json: no plan here"), "{err}");
}

#[test]
fn the_ready_sweeps_plan_and_validate_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let sweeps = Path::new(env!("CARGO_MANIFEST_DIR")).join("../datasets/sweeps");
    let env = [("HF_HUB_OFFLINE", "1")];
    for (name, configs, suite) in [
        ("default-dpo-vs-reprpo", 5, "default"),
        ("genies-unhelpful-alpaca", 4, "reprpo-ref"),
    ] {
        let file = sweeps.join(format!("{name}.toml")).display().to_string();
        let d = t.join(name).display().to_string();
        let (ok, out, err) = xtask_in(t, &["sweep", "slurm", &file, "--out", &d], &env);
        assert!(ok, "{name}: {out}{err}");
        let plan = json(&t.join(name).join("plan.json"));
        assert_eq!(plan["seeds"].as_array().unwrap().len(), 5, "{name}");
        assert_eq!(plan["configs"].as_array().unwrap().len(), configs, "{name}");
        assert_eq!(plan["eval"]["suites"][0]["name"], suite, "{name}");
        // Every configuration but the baseline (DPO) is compared with it.
        for c in &plan["configs"].as_array().unwrap()[1..] {
            assert_eq!(c["baseline"], 0, "{name}: {c}");
        }
        assert!(t.join(name).join("sweep.sbatch").is_file());
    }
    let genies =
        TrainConfig::from_toml_file(&t.join("genies-unhelpful-alpaca/configs/dpo-s0.toml"))
            .unwrap();
    assert_eq!(genies.data.datasets, ["genies-unhelpful-alpaca-train"]);
    assert_eq!(genies.data.ood_datasets, ["genies-illegal-dont-help-test"]);
    assert_eq!((genies.loss.as_str(), genies.train.lr), ("dpo", 6e-5));
    let script = std::fs::read_to_string(t.join("genies-unhelpful-alpaca/sweep.sbatch")).unwrap();
    assert!(script.contains("#SBATCH --gres=gpu:1\n") && script.contains("--array=0-19%8\n"));
    // The TPE sweep plans its 8 random startup trials at 2 seeds (TPE's rounds need results).
    let file = sweeps.join("default-reprpo-tpe.toml").display().to_string();
    let d = t.join("tpe").display().to_string();
    let (ok, out, err) = xtask_in(t, &["sweep", "plan", &file, "--out", &d], &env);
    assert!(ok, "{out}{err}");
    let plan = json(&t.join("tpe/plan.json"));
    assert_eq!(plan["configs"].as_array().unwrap().len(), 8);
    assert_eq!(plan["runs"].as_array().unwrap().len(), 16);
    let first = TrainConfig::from_toml_file(
        &t.join("tpe/configs")
            .join(format!("{}.toml", plan["runs"][0]["id"].as_str().unwrap())),
    )
    .unwrap();
    assert_eq!(first.loss, "reprpo");
    assert!(
        (1e-4..=3e-2).contains(&first.train.lr),
        "{}",
        first.train.lr
    );
}

/// `[search] method = "tpe"`: one `sweep run` runs the random startup, plans TPE's round from
/// the results, runs it, and stops at the budget; the report has every trial.
#[test]
fn a_tpe_sweep_runs_its_rounds_in_one_command() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let file = tiny_sweep(t);
    let text = std::fs::read_to_string(&file)
        .unwrap()
        .replace("seeds = 2\nbaseline = \"dpo\"", "seeds = 1")
        .replace("[axes]\nloss = [\"dpo\", \"reprpo\"]\n", "")
        .replace(
            "[eval]",
            "[search]\nmethod = \"tpe\"\nbudget = 3\nstartup = 2\nbatch = 1\n\
             objective = { suite = \"default\", dataset = \"default-test\" }\n\
             [search.space]\n\"train.lr\" = { log_uniform = [1e-5, 1e-3] }\n\n[eval]",
        );
    std::fs::write(&file, text).unwrap();
    let dir = t.join("sweep");
    let (ok, out, err) = xtask_in(
        t,
        &[
            "sweep",
            "run",
            &file.display().to_string(),
            "--out",
            &dir.display().to_string(),
        ],
        &[],
    );
    assert!(ok, "{out}\n{err}");
    let plan = json(&dir.join("plan.json"));
    let ids: Vec<&str> = plan["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 3, "{ids:?}");
    assert!(ids[2].starts_with("trial-02"), "{ids:?}");
    for id in &ids {
        assert_eq!(
            json(&dir.join("runs").join(id).join("status.json"))["status"],
            "ok"
        );
    }
    let report = std::fs::read_to_string(dir.join("report/report.md")).unwrap();
    assert!(report.contains("trial-02"), "{report}");
}
