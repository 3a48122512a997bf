//! `run_one` and the report with fake jobs (no model): runs are atomic and idempotent, failures,
//! panics, interruptions and lost races end as they should, and the report aggregates per
//! configuration and seed, pairs with the baseline by seed, and shows failed and non-finite runs
//! as failed without dropping their configuration.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::cell::Cell;
use std::path::{Path, PathBuf};

use reprpo_eval::suite::Role;
use reprpo_eval::table::{self, Column, Row, Table};
use reprpo_sweep::run_one::{JobError, State};
use reprpo_sweep::spec::SuiteRef;
use reprpo_sweep::{Jobs, PlanContext, RunOne, SweepSpec, Trained, plan, run_one, write_plan};
use reprpo_train::TrainConfig;

/// What the fake training does for a run.
#[derive(Clone, Copy, PartialEq)]
enum Act {
    Ok,
    Fail,
    Panic,
    Interrupt,
    /// Finishes, but another process's result appears first.
    Race,
}

/// What the fake does for a (loss, seed).
type Policy = dyn Fn(&str, u64) -> Act;

struct Fake {
    act: Box<Policy>,
    trained: Cell<usize>,
}

impl Fake {
    fn new(act: impl Fn(&str, u64) -> Act + 'static) -> Fake {
        Fake {
            act: Box::new(act),
            trained: Cell::new(0),
        }
    }
}

/// The fake's accuracies: in distribution 0.60 + 0.01 seed (DPO) or 0.70 + 0.02 seed (others);
/// shifted 0.5 + 0.1 seed.
fn id_acc(loss: &str, seed: u64) -> f64 {
    if loss == "dpo" {
        0.60 + 0.01 * seed as f64
    } else {
        0.70 + 0.02 * seed as f64
    }
}

impl Jobs for Fake {
    fn train(&self, cfg: &TrainConfig) -> Result<Trained, JobError> {
        self.trained.set(self.trained.get() + 1);
        let seed = cfg.train.seed;
        let dir = cfg
            .run
            .out_dir
            .join(format!("{}-20260101-000000", cfg.run_name()));
        std::fs::create_dir_all(&dir)?;
        match (self.act)(&cfg.loss, seed) {
            Act::Fail => return Err("boom: the loss is not finite".into()),
            Act::Panic => panic!("the fake panicked"),
            Act::Interrupt => return Ok(Trained::Interrupted),
            Act::Race => {
                // The sweep folder is four levels up: <dir>/runs/.work-*/out/<run>.
                let runs = dir.ancestors().nth(3).expect("runs/");
                let id = runs
                    .read_dir()?
                    .flatten()
                    .find_map(|e| {
                        let n = e.file_name().to_string_lossy().into_owned();
                        n.strip_prefix(".work-")
                            .and_then(|r| r.split('.').next())
                            .map(str::to_string)
                    })
                    .expect("a work folder");
                let other = runs.join(&id);
                std::fs::create_dir_all(&other)?;
                std::fs::write(other.join("status.json"), "{}")?;
            }
            Act::Ok => {}
        }
        // The shifted accuracy of ReprPO at seed 2 is not finite (serde_json writes null).
        let ood = if cfg.loss == "reprpo" && seed == 2 {
            f64::NAN
        } else {
            0.5 + 0.1 * seed as f64
        };
        let summary = serde_json::json!({
            "adapter/id/accuracy": id_acc(&cfg.loss, seed),
            "adapter/ood/accuracy": ood,
            "data/id": "held-out", "data/ood": "shifted",
        });
        std::fs::write(dir.join("summary.json"), summary.to_string())?;
        Ok(Trained::Finished(dir))
    }

    fn eval(&self, run: &Path, _: &SuiteRef, _: &[String], out: &Path) -> Result<(), JobError> {
        let s: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(run.join("summary.json"))?)?;
        let id = s["adapter/id/accuracy"].as_f64().unwrap_or(f64::NAN);
        let cell = |acc: f64| {
            Some(table::Cell {
                n: 10,
                acc,
                prob: 0.5,
                acc_norm: None,
                prob_norm: None,
                reward_acc: None,
                margin: None,
            })
        };
        let col = |name: &str, role| Column {
            name: name.into(),
            role,
            kind: "pairs".into(),
        };
        let t = Table {
            suite: "default".into(),
            columns: vec![
                col("default", Role::Train),
                col("default-test", Role::Test),
                col("rnd", Role::Unrelated),
            ],
            rows: vec![
                Row {
                    model: "base".into(),
                    cells: vec![cell(0.0), cell(0.0), cell(0.0)],
                },
                Row {
                    model: "train".into(),
                    cells: vec![cell(1.0), cell(id), cell(0.25)],
                },
            ],
            shifts: Vec::new(),
            truncation: Default::default(),
        };
        std::fs::create_dir_all(out)?;
        std::fs::write(out.join("table.json"), t.to_json()?)?;
        Ok(())
    }
}

fn planned(dir: &Path, text: &str) -> PathBuf {
    let file = dir.join("s.toml");
    std::fs::write(&file, text).unwrap();
    let spec = SweepSpec::load(&file).unwrap();
    let ctx = PlanContext {
        datasets_dir: Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets"),
        sweep_dir: None,
    };
    let out = dir.join("sweep");
    write_plan(&out, &plan(&spec, &ctx).unwrap()).unwrap();
    out
}

/// Entries of `runs/` whose names start with `.`.
fn hidden(sweep: &Path) -> Vec<String> {
    std::fs::read_dir(sweep.join("runs"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default()
}

const THREE_LOSSES: &str = r#"
seeds = 3
baseline = "dpo"
[axes]
loss = ["dpo", "reprpo", "ipo"]
[eval]
suites = ["default"]
"#;

#[test]
fn the_report_pairs_by_seed_and_shows_failed_and_non_finite_runs_as_failed() {
    let tmp = tempfile::tempdir().unwrap();
    let sweep = planned(tmp.path(), THREE_LOSSES);
    let fake = Fake::new(|loss, seed| {
        if loss == "ipo" && seed == 1 {
            Act::Fail
        } else {
            Act::Ok
        }
    });
    // The last seed's runs are not run yet: the report says so.
    for i in 0..6 {
        run_one(&sweep, i, &fake, false).unwrap();
    }
    let r = reprpo_sweep::report::build(&sweep).unwrap();
    let tj = &r.suites[0];
    assert_eq!(tj.suite, "train-job");
    assert_eq!(tj.rows.len(), 3, "every configuration has a row");
    assert_eq!(tj.rows[0].cells[0].status, "incomplete");
    assert!(reprpo_sweep::report::to_markdown(&r).contains("[2 of 3 seeds]"));
    for i in 6..9 {
        run_one(&sweep, i, &fake, false).unwrap();
    }
    let r = reprpo_sweep::report::build(&sweep).unwrap();
    assert_eq!(r.runs.iter().filter(|x| x.state == "failed").count(), 1);
    let tj = &r.suites[0];
    let cols: Vec<(&str, &str)> = tj
        .columns
        .iter()
        .map(|c| (c.dataset.as_str(), c.role.as_str()))
        .collect();
    assert_eq!(cols, [("held-out", "ID"), ("shifted", "OOD")]);
    let labels: Vec<&str> = tj.rows.iter().map(|x| x.label.as_str()).collect();
    assert_eq!(labels, ["loss=dpo", "loss=reprpo", "loss=ipo"]);
    // DPO in distribution: 0.60, 0.61, 0.62.
    let dpo = tj.rows[0].cells[0].summary.as_ref().unwrap();
    assert!((dpo.mean - 0.61).abs() < 1e-12 && dpo.n == 3);
    // ReprPO - DPO by seed: 0.10, 0.11, 0.12: mean 0.11, sd 0.01, half-width
    // t(0.975, 2) * 0.01 / sqrt(3) with SciPy's t(0.975, 2) = 4.302652729696142.
    let d = tj.rows[1].cells[0].vs_baseline.as_ref().unwrap();
    let half = 4.302652729696142 * 0.01 / 3f64.sqrt();
    assert!((d.mean - 0.11).abs() < 1e-12, "{d:?}");
    assert!((d.half_width.unwrap() - half).abs() < 1e-9, "{d:?}");
    assert!(!tj.rows[1].is_baseline && tj.rows[0].is_baseline);
    // ReprPO's shifted value at seed 2 is not finite: that cell is failed, the other is not.
    let ood = &tj.rows[1].cells[1];
    assert_eq!(
        (ood.status.as_str(), ood.failed_seeds.as_slice()),
        ("failed", &[2][..])
    );
    assert_eq!(ood.vs_status.as_deref(), Some("failed"));
    assert!(ood.summary.is_none());
    // IPO's seed 1 failed: every cell of IPO is failed, in every suite.
    for t in &r.suites {
        for c in &t.rows[2].cells {
            assert_eq!(
                (c.status.as_str(), c.failed_seeds.as_slice()),
                ("failed", &[1][..])
            );
        }
    }
    // The eval suite's columns and roles come from its table.
    let def = &r.suites[1];
    let roles: Vec<&str> = def.columns.iter().map(|c| c.role.as_str()).collect();
    assert_eq!(roles, ["train", "ID", "unrelated"]);
    let written = reprpo_sweep::report::write(&sweep, &r).unwrap();
    assert_eq!(written.len(), 5);
    let md = std::fs::read_to_string(sweep.join("report/report.md")).unwrap();
    for want in [
        "| loss=dpo (baseline) | 3 of 3 ok | 0.610 ± 0.025 (n=3) |",
        "| loss=reprpo - loss=dpo | +0.110 ± 0.025 (n=3) | FAILED |",
        "| loss=ipo | FAILED: seed 1 (2 of 3 ok) | FAILED (seed 1) | FAILED (seed 1) |",
        "## Failed runs",
        "boom: the loss is not finite",
    ] {
        assert!(md.contains(want), "`{want}` not in:\n{md}");
    }
    let csv = std::fs::read_to_string(sweep.join("report/report.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 3 * (2 + 3));
    for png in ["train-job.png", "default.png"] {
        let bytes = std::fs::read(sweep.join("report").join(png)).unwrap();
        assert!(
            bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 10_000,
            "{png}"
        );
    }
    assert!(hidden(&sweep).is_empty(), "{:?}", hidden(&sweep));
}

const ONE_RUN: &str = "[base]\nloss = \"dpo\"\n";

#[test]
fn a_run_is_done_once_and_a_failed_one_only_again_when_asked() {
    let tmp = tempfile::tempdir().unwrap();
    let sweep = planned(tmp.path(), ONE_RUN);
    let first = Cell::new(true);
    let fake = Fake::new(move |_, _| {
        if first.replace(false) {
            Act::Fail
        } else {
            Act::Ok
        }
    });
    let RunOne::Ran(s) = run_one(&sweep, 0, &fake, false).unwrap() else {
        panic!("ran")
    };
    assert_eq!(s.status, State::Failed);
    assert!(s.error.unwrap().contains("boom"));
    assert!(
        matches!(run_one(&sweep, 0, &fake, false).unwrap(), RunOne::Skipped(s) if s.status == State::Failed)
    );
    assert_eq!(fake.trained.get(), 1);
    assert!(
        matches!(run_one(&sweep, 0, &fake, true).unwrap(), RunOne::Ran(s) if s.status == State::Ok)
    );
    assert!(
        matches!(run_one(&sweep, 0, &fake, true).unwrap(), RunOne::Skipped(s) if s.status == State::Ok)
    );
    assert_eq!(fake.trained.get(), 2);
    let run = sweep.join("runs/base-s0");
    assert!(run.join("train/summary.json").is_file() && run.join("status.json").is_file());
    assert!(hidden(&sweep).is_empty(), "{:?}", hidden(&sweep));
    let e = run_one(&sweep, 1, &fake, false).unwrap_err().to_string();
    assert!(
        e.contains("run index 1 is out of range (the plan has 1 runs: 0..=0)"),
        "{e}"
    );
}

#[test]
fn panics_fail_the_run_and_interruptions_leave_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let sweep = planned(tmp.path(), ONE_RUN);
    // A work folder of a process of this host that is gone: removed when the run starts.
    let host = reprpo_sweep::fsx::hostname();
    let stale = sweep.join(format!("runs/.work-base-s0.{host}.4294967295"));
    std::fs::create_dir_all(&stale).unwrap();
    let interrupted = Fake::new(|_, _| Act::Interrupt);
    assert_eq!(
        run_one(&sweep, 0, &interrupted, false).unwrap(),
        RunOne::Interrupted
    );
    assert!(!sweep.join("runs/base-s0").exists());
    assert!(hidden(&sweep).is_empty(), "{:?}", hidden(&sweep));
    let panics = Fake::new(|_, _| Act::Panic);
    let RunOne::Ran(s) = run_one(&sweep, 0, &panics, false).unwrap() else {
        panic!("ran")
    };
    assert_eq!(s.status, State::Failed);
    assert_eq!(s.error.as_deref(), Some("panicked: the fake panicked"));
}

#[test]
fn the_first_of_two_processes_to_finish_a_run_keeps_it() {
    let tmp = tempfile::tempdir().unwrap();
    let sweep = planned(tmp.path(), ONE_RUN);
    let racing = Fake::new(|_, _| Act::Race);
    assert_eq!(
        run_one(&sweep, 0, &racing, false).unwrap(),
        RunOne::LostRace
    );
    assert_eq!(
        std::fs::read_to_string(sweep.join("runs/base-s0/status.json")).unwrap(),
        "{}"
    );
    assert!(hidden(&sweep).is_empty(), "{:?}", hidden(&sweep));
}

#[test]
fn a_configuration_edited_after_planning_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let sweep = planned(tmp.path(), ONE_RUN);
    let cfg = sweep.join("configs/base-s0.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("lr = ", "lr = 9")).unwrap();
    let e = run_one(&sweep, 0, &Fake::new(|_, _| Act::Ok), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("base-s0.toml: edited since planning"), "{e}");
    assert!(!sweep.join("runs/base-s0").exists());
}
