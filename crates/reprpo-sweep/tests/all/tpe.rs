//! TPE sweeps planned in rounds, with a fake training job whose held-out accuracy is a function
//! of the learning rate (peak at 1e-3): planning before any result gives the startup trials only
//! and plans the same runs again; once every run of a round has finished, planning adds
//! `batch` proposals (the earlier runs keep their ids and indices) until the budget; a trial
//! whose runs all failed is told as the worst value seen, so the search leaves the region where
//! training fails; the proposals concentrate near the peak; and an objective that names no measured dataset is an error naming the key.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use reprpo_sweep::run_one::JobError;
use reprpo_sweep::spec::SuiteRef;
use reprpo_sweep::{Jobs, Plan, PlanContext, SweepSpec, Trained, plan, run_one, write_plan};
use reprpo_train::TrainConfig;

/// Accuracy `1 - (log10(lr) + 3)^2 / 4` on the held-out split `shifted`; learning rates above
/// 5e-3 fail.
struct Fake;

fn acc(lr: f64) -> f64 {
    1.0 - (lr.log10() + 3.0).powi(2) / 4.0
}

impl Jobs for Fake {
    fn train(&self, cfg: &TrainConfig) -> Result<Trained, JobError> {
        let dir = cfg.run.out_dir.join(cfg.run_name());
        std::fs::create_dir_all(&dir)?;
        if cfg.train.lr > 5e-3 {
            return Err("diverged".into());
        }
        let summary = serde_json::json!({
            "adapter/ood/accuracy": acc(cfg.train.lr),
            "data/ood": "shifted",
        });
        std::fs::write(dir.join("summary.json"), summary.to_string())?;
        Ok(Trained::Finished(dir))
    }

    fn eval(&self, _: &Path, _: &SuiteRef, _: &[String], _: &Path) -> Result<(), JobError> {
        Ok(())
    }
}

const SWEEP: &str = r#"
seeds = [0]
[search]
method = "tpe"
budget = 12
startup = 4
batch = 3
seed = 5
objective = { suite = "train-job", dataset = "shifted" }
[search.space]
"train.lr" = { log_uniform = [1e-5, 1e-2] }
"#;

fn replan(file: &Path, out: &Path) -> Plan {
    let spec = SweepSpec::load(file).unwrap();
    let ctx = PlanContext {
        datasets_dir: Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets"),
        sweep_dir: Some(out.to_path_buf()),
    };
    let planned = plan(&spec, &ctx).unwrap();
    write_plan(out, &planned).unwrap();
    planned.plan
}

fn ids(p: &Plan) -> Vec<String> {
    p.runs.iter().map(|r| r.id.clone()).collect()
}

fn lr_of(dir: &Path, id: &str) -> f64 {
    let cfg = TrainConfig::from_toml_file(&dir.join("configs").join(format!("{id}.toml"))).unwrap();
    cfg.train.lr
}

fn sweep(text: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("s.toml");
    std::fs::write(&file, text).unwrap();
    let out = dir.path().join("sweep");
    (dir, file, out)
}

#[test]
fn rounds_grow_the_plan_until_the_budget_and_approach_the_peak() {
    let (_tmp, file, out) = sweep(SWEEP);
    let first = replan(&file, &out);
    assert_eq!(first.runs.len(), 4, "{:?}", ids(&first));
    // Nothing finished: planning again plans the same runs.
    assert_eq!(ids(&replan(&file, &out)), ids(&first));
    let mut rounds = vec![first.runs.len()];
    let mut last = first;
    loop {
        for r in &last.runs {
            run_one(&out, r.index, &Fake, false).unwrap();
        }
        let next = replan(&file, &out);
        // Earlier runs keep their ids and indices; the same results plan the same runs.
        assert_eq!(ids(&next)[..last.runs.len()], ids(&last)[..]);
        assert_eq!(ids(&replan(&file, &out)), ids(&next));
        if next.runs.len() == last.runs.len() {
            break;
        }
        rounds.push(next.runs.len());
        last = next;
    }
    assert_eq!(rounds, [4, 7, 10, 12]);
    let lrs: Vec<f64> = ids(&last).iter().map(|id| lr_of(&out, id)).collect();
    assert!(lrs.iter().all(|lr| (1e-5..=1e-2).contains(lr)), "{lrs:?}");
    // TPE's first round (4..7) proposed learning rates that fail; told as the worst value, they
    // steer every later proposal (7..) away from that region, and the best trial TPE proposes is
    // closer to the peak (in log10) than the best random one, by more than 10x.
    assert!(lrs[4..7].iter().any(|lr| *lr > 5e-3), "{lrs:?}");
    assert!(lrs[7..].iter().all(|lr| *lr <= 5e-3), "{lrs:?}");
    let best = |v: &[f64]| {
        v.iter()
            .map(|lr| (lr.log10() + 3.0).abs())
            .fold(f64::INFINITY, f64::min)
    };
    assert!(best(&lrs[4..]) < best(&lrs[..4]) / 10.0, "{lrs:?}");
}

#[test]
fn an_objective_without_its_dataset_names_the_key() {
    let (_tmp, file, out) = sweep(&SWEEP.replace("dataset = \"shifted\"", "dataset = \"nope\""));
    let p = replan(&file, &out);
    for r in &p.runs {
        run_one(&out, r.index, &Fake, false).unwrap();
    }
    let spec = SweepSpec::load(&file).unwrap();
    let ctx = PlanContext {
        datasets_dir: Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets"),
        sweep_dir: Some(out.clone()),
    };
    let e = plan(&spec, &ctx).unwrap_err().to_string();
    assert!(
        e.contains("search.objective.dataset")
            && e.contains("has no dataset `nope`")
            && e.contains("shifted"),
        "{e}"
    );
    let bad = SWEEP.replace("suite = \"train-job\"", "suite = \"default\"");
    let (_tmp2, file2, _) = sweep(&bad);
    let e = plan(&SweepSpec::load(&file2).unwrap(), &ctx)
        .unwrap_err()
        .to_string();
    assert!(e.contains("search.objective.suite"), "{e}");
}

#[test]
fn failed_trials_are_not_told_and_the_search_goes_on() {
    // Startup draws from a range where most learning rates fail (above 5e-3).
    let text = SWEEP.replace("[1e-5, 1e-2]", "[1e-3, 1e-1]");
    let (_tmp, file, out) = sweep(&text);
    let first = replan(&file, &out);
    for r in &first.runs {
        run_one(&out, r.index, &Fake, false).unwrap();
    }
    let failed = first
        .runs
        .iter()
        .filter(|r| lr_of(&out, &r.id) > 5e-3)
        .count();
    assert!(
        failed >= 1,
        "the startup should hold a failing learning rate"
    );
    let next = replan(&file, &out);
    assert_eq!(next.runs.len(), 7);
}
