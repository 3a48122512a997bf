//! Planning: the order and ids of runs, labels, baselines, every key checked through the
//! training configuration's own resolution (errors name the sweep file and where the key is),
//! and the Slurm script of a plan.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use reprpo_sweep::{PlanContext, Planned, SweepSpec, plan, write_plan};

fn ctx() -> PlanContext {
    PlanContext {
        datasets_dir: Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets"),
        sweep_dir: None,
    }
}

/// Write `text` as `dir/name` and plan it.
fn plan_text(dir: &Path, name: &str, text: &str) -> reprpo_sweep::Result<Planned> {
    let file = dir.join(name);
    std::fs::write(&file, text).expect("write the sweep file");
    let spec = SweepSpec::load(&file)?;
    plan(&spec, &ctx())
}

const SWEEP: &str = r#"
seeds = [3, 7]
baseline = "dpo"

[base]
"train.max_steps" = 2

[axes]
"train.lr" = [1e-3, 1e-2]

[[variant]]
name = "dpo"
loss = "dpo"

[[variant]]
name = "reprpo"
loss = "reprpo"
reprpo.alpha = 1.0
"#;

#[test]
fn runs_are_ordered_seeds_outermost_with_stable_ids_and_paired_baselines() {
    let dir = tempfile::tempdir().unwrap();
    let p = plan_text(dir.path(), "s.toml", SWEEP).unwrap();
    let labels: Vec<&str> = p.plan.configs.iter().map(|c| c.label.as_str()).collect();
    assert_eq!(
        labels,
        [
            "dpo train.lr=0.001",
            "dpo train.lr=0.01",
            "reprpo train.lr=0.001",
            "reprpo train.lr=0.01"
        ]
    );
    // Each ReprPO configuration is compared with DPO at its own learning rate.
    let base: Vec<Option<usize>> = p.plan.configs.iter().map(|c| c.baseline).collect();
    assert_eq!(base, [None, None, Some(0), Some(1)]);
    let ids: Vec<&str> = p.plan.runs.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids[0], "dpo_train.lr-0.001-s3");
    assert_eq!(ids[4], "dpo_train.lr-0.001-s7");
    assert_eq!(p.plan.runs.len(), 8);
    let seeds: Vec<u64> = p.plan.runs.iter().map(|r| r.seed).collect();
    assert_eq!(seeds, [3, 3, 3, 3, 7, 7, 7, 7]);
    // Seeds go to both seed keys, last; the resolved configuration has them.
    let last = &p.plan.runs[7];
    assert!(
        last.overrides
            .ends_with(&["train.seed=7".into(), "adapter.seed=7".into()])
    );
    assert!(p.configs[7].contains("seed = 7"), "{}", p.configs[7]);
    assert!(p.configs[7].contains("lr = 0.01"));
    // The same file plans the same runs, byte for byte.
    let again = plan_text(dir.path(), "s.toml", SWEEP).unwrap();
    assert_eq!(again.plan, p.plan);
    assert_eq!(again.configs, p.configs);
}

#[test]
fn extending_an_axis_keeps_the_ids_of_the_runs_that_were_there() {
    let dir = tempfile::tempdir().unwrap();
    let p = plan_text(dir.path(), "s.toml", SWEEP).unwrap();
    let wider = SWEEP.replace("[1e-3, 1e-2]", "[1e-3, 1e-2, 3e-2]");
    let q = plan_text(dir.path(), "s.toml", &wider).unwrap();
    for r in &p.plan.runs {
        let same = q.plan.runs.iter().find(|x| x.id == r.id).expect("kept");
        assert_eq!(same.config_hash, r.config_hash, "{}", r.id);
    }
    assert_eq!(q.plan.runs.len(), 12);
}

#[test]
fn a_baseline_may_be_a_label_an_axis_value_or_key_value() {
    let dir = tempfile::tempdir().unwrap();
    let two_axes = "[axes]\nloss = [\"dpo\", \"ipo\"]\n\"train.lr\" = [1e-3, 1e-2]\n";
    // Configurations: 0 dpo 1e-3, 1 dpo 1e-2, 2 ipo 1e-3, 3 ipo 1e-2 (axes alphabetical, the
    // first slowest).
    for (baseline, want) in [
        // A bare value of one axis: paired within the same learning rate.
        ("dpo", [None, None, Some(0), Some(1)]),
        // key=value: paired within the same loss.
        ("train.lr=0.01", [Some(1), None, Some(3), None]),
        // A whole label: one baseline for all.
        ("loss=dpo train.lr=0.001", [None, Some(0), Some(0), Some(0)]),
    ] {
        let text = format!("baseline = \"{baseline}\"\n{two_axes}");
        let p = plan_text(dir.path(), "b.toml", &text).unwrap();
        let labels: Vec<&str> = p.plan.configs.iter().map(|c| c.label.as_str()).collect();
        assert_eq!(labels[1], "loss=dpo train.lr=0.01");
        let got: Vec<Option<usize>> = p.plan.configs.iter().map(|c| c.baseline).collect();
        assert_eq!(got, want, "{baseline}");
    }
    let e = plan_text(
        dir.path(),
        "b.toml",
        &format!("baseline = \"kto\"\n{two_axes}"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("b.toml: `baseline`: `kto` is no configuration label"),
        "{e}"
    );
}

#[test]
fn unknown_keys_and_bad_values_name_the_sweep_file_and_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for (text, want) in [
        (
            "[axes]\n\"train.lrr\" = [1e-3]\n",
            vec!["`axes.\"train.lrr\"`", "unknown key", "did you mean `lr`"],
        ),
        (
            "[axes]\n\"train.lr\" = [\"fast\"]\n",
            vec!["`axes.\"train.lr\"`", "config key `train.lr`"],
        ),
        (
            "[base]\nadapter.rr = 4\n",
            vec!["`base.\"adapter.rr\"`", "unknown key"],
        ),
        (
            "[[variant]]\nname = \"v\"\nloss = \"nope\"\n",
            vec!["`variant \"v\": \"loss\"`", "unknown loss"],
        ),
        (
            "seed_keys = [\"train.sed\"]\n",
            vec!["`seed_keys`", "train.sed"],
        ),
        (
            "[eval]\nsuites = [\"nope\"]\n",
            vec!["`eval.suites`", "no suite `nope`"],
        ),
        (
            "[eval]\nsuites = [\"default\"]\noptions = { limt = 3 }\n",
            vec!["`eval.options`", "unknown field `limt`"],
        ),
        ("[axis]\n", vec!["unknown field `axis`"]),
    ] {
        let e = plan_text(dir.path(), "bad.toml", text)
            .unwrap_err()
            .to_string();
        let file = dir.path().join("bad.toml").display().to_string();
        assert!(e.starts_with(&file), "{text}: {e}");
        for w in want {
            assert!(e.contains(w), "{text}: `{w}` not in: {e}");
        }
    }
}

#[test]
fn writing_a_plan_refuses_to_reuse_a_run_trained_with_another_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sweep");
    let p = plan_text(dir.path(), "s.toml", SWEEP).unwrap();
    write_plan(&out, &p).unwrap();
    assert!(out.join("plan.json").is_file());
    assert!(
        out.join("configs")
            .join(format!("{}.toml", p.plan.runs[0].id))
            .is_file()
    );
    // A finished run of the first id, trained with another configuration.
    let run = out.join("runs").join(&p.plan.runs[0].id);
    std::fs::create_dir_all(&run).unwrap();
    let status = serde_json::json!({
        "status": "ok", "error": null, "index": 0, "id": p.plan.runs[0].id, "label": "x",
        "seed": 3, "config_hash": "0000000000000000", "host": "h", "started": 0, "seconds": 1.0
    });
    std::fs::write(run.join("status.json"), status.to_string()).unwrap();
    let e = write_plan(&out, &p).unwrap_err().to_string();
    assert!(e.contains("was trained with another configuration"), "{e}");
}

#[test]
fn the_slurm_script_runs_one_task_per_run_with_the_sweep_files_resources() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{SWEEP}\n[slurm]\npartition = \"gpu\"\ntime = \"01:00:00\"\ncpus_per_task = 8\nmem = \"32G\"\n\
         gres = \"gpu:1\"\nparallel = 3\nextra = [\"--qos=high\"]\nsetup = [\"module load cuda\"]\n"
    );
    let p = plan_text(dir.path(), "s.toml", &text).unwrap();
    let sweep_dir = PathBuf::from("/data/sweeps/s");
    let script = reprpo_sweep::slurm::script(
        &sweep_dir,
        &p.plan,
        Path::new("/opt/xtask"),
        Path::new("/src/reprpo"),
    )
    .unwrap();
    for line in [
        "#SBATCH --array=0-7%3",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=01:00:00",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=32G",
        "#SBATCH --gres=gpu:1",
        "#SBATCH --qos=high",
        "#SBATCH --output=/data/sweeps/s/logs/slurm-%A_%a.out",
        "module load cuda",
        "cd '/src/reprpo'",
        "export RAYON_NUM_THREADS=\"${SLURM_CPUS_PER_TASK:-1}\"",
        "exec '/opt/xtask' sweep run-one '/data/sweeps/s'",
    ] {
        assert!(
            script.lines().any(|l| l == line),
            "`{line}` not in:\n{script}"
        );
    }
    let bad = text.replace("parallel = 3", "parallel = 0");
    let p = plan_text(dir.path(), "s.toml", &bad).unwrap();
    let e = reprpo_sweep::slurm::script(&sweep_dir, &p.plan, Path::new("x"), Path::new("y"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("`slurm.parallel`"), "{e}");
}

#[test]
fn a_random_search_draws_the_same_points_per_seed_and_pairs_them_with_the_baseline() {
    let dir = tempfile::tempdir().unwrap();
    let text = r#"
seeds = 2
baseline = "dpo"
[[variant]]
name = "dpo"
loss = "dpo"
[[variant]]
name = "reprpo"
loss = "reprpo"
[search]
budget = 3
seed = 11
[search.space]
"train.lr" = { log_uniform = [1e-4, 1e-2] }
"train.epochs" = { int = [1, 2] }
"#;
    let p = plan_text(dir.path(), "s.toml", text).unwrap();
    assert_eq!((p.plan.configs.len(), p.plan.runs.len()), (6, 12));
    // Each variant gets the same three points; ReprPO's point k is compared with DPO's point k.
    for k in 0..3 {
        let (dpo, reprpo) = (&p.plan.configs[k], &p.plan.configs[3 + k]);
        assert!(
            dpo.label
                .starts_with(&format!("dpo trial-0{k} train.epochs=")),
            "{}",
            dpo.label
        );
        assert_eq!(dpo.label.replacen("dpo", "reprpo", 1), reprpo.label);
        assert_eq!(reprpo.baseline, Some(k));
        let lr: f64 = dpo
            .settings
            .iter()
            .find(|(k, _)| k == "train.lr")
            .unwrap()
            .1
            .parse()
            .unwrap();
        assert!((1e-4..1e-2).contains(&lr), "{lr}");
        // The drawn value is the one the run trains with.
        let cfg = &p.configs[k];
        assert!(
            cfg.contains(&format!("lr = {}", toml::Value::Float(lr))),
            "{lr}: {cfg}"
        );
        let epochs = &dpo
            .settings
            .iter()
            .find(|(k, _)| k == "train.epochs")
            .unwrap()
            .1;
        assert!(
            cfg.contains(&format!("\nepochs = {epochs}\n")),
            "{epochs}: {cfg}"
        );
    }
    assert_eq!(plan_text(dir.path(), "s.toml", text).unwrap().plan, p.plan);
    for (bad, key) in [
        ("{ log_uniform = [0.0, 1e-2] }", "search.space.\"train.lr\""),
        ("{ normal = [0.0, 1.0] }", "search.space.\"train.lr\""),
        ("[1e-4, 1e-2]", "search.space.\"train.lr\""),
    ] {
        let t = text.replace("{ log_uniform = [1e-4, 1e-2] }", bad);
        let e = plan_text(dir.path(), "s.toml", &t).unwrap_err().to_string();
        assert!(e.contains(&format!("`{key}`")), "{bad}: {e}");
    }
    let t = text.replace("seed = 11", "seed = 11\nbudgets = 2");
    let e = plan_text(dir.path(), "s.toml", &t).unwrap_err().to_string();
    assert!(e.contains("`search.budgets`"), "{e}");
}
