#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Issue 15, point 9: what jobs leave in `run.out_dir`.
//!
//! - A job that fails on its inputs (a missing dataset, layers the model does not have) creates
//!   no run folder (they used to leave one holding only `resolved_config.toml`).
//! - Two jobs started together with the same SFT settings and an empty cache both succeed: one
//!   trains the SFT stage while the other waits for the cache entry's lock, then reuses it; no
//!   temporary folder is left behind (they used to race: `Directory not empty`, `sft-*.tmp` and
//!   an orphan run folder).
//! - Point 16: every file a run writes (adapter, optimizer moments, checkpoint files, logs)
//!   gets the mode of a plain new file (0666 masked by the umask), not a private 0600.

use std::path::Path;

use crate::common;

use common::{config, ctx};
use reprpo_train::trainer;

/// Every entry of `dir`, by name.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn a_job_failing_on_its_inputs_creates_no_run_folder() {
    for bad in [
        "data.datasets=[no_such_recipe]",
        "data.eval_datasets=[no_such_recipe]",
        "reprpo.layers=[40]",
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("runs");
        let cfg = config(&out, &["loss=reprpo", bad]);
        let err = trainer::train(&cfg, &ctx(false), None).unwrap_err();
        eprintln!("{bad}: {err}");
        assert!(names(&out).is_empty(), "{bad}: {:?}", names(&out));
    }
}

#[test]
fn concurrent_jobs_share_an_empty_sft_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("runs");
    let cfg = config(&out, &["loss=dpo", "sft.steps=30", "train.max_steps=1"]);
    let jobs: Vec<_> = (0..2)
        .map(|_| {
            let cfg = cfg.clone();
            std::thread::spawn(move || trainer::train(&cfg, &ctx(false), None))
        })
        .collect();
    let runs: Vec<_> = jobs
        .into_iter()
        .map(|j| j.join().unwrap().unwrap().run_dir)
        .collect();
    assert_ne!(runs[0], runs[1]);
    let cache = out.join(&cfg.sft.cache_dir);
    let entries = names(&cache);
    let dirs: Vec<&String> = entries.iter().filter(|n| !n.ends_with(".lock")).collect();
    assert_eq!(dirs.len(), 1, "{entries:?}");
    assert!(
        dirs[0].starts_with("sft-") && !dirs[0].contains("tmp"),
        "{entries:?}"
    );
    let sft =
        |run: &Path| std::fs::read(run.join("sft_adapter/adapter_model.safetensors")).unwrap();
    assert_eq!(sft(&runs[0]), sft(&runs[1]));
    // Only the two run folders (and the cache) under out_dir.
    assert_eq!(names(&out).len(), 3, "{:?}", names(&out));
}

#[cfg(unix)]
#[test]
fn every_file_of_a_run_follows_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let plain = tmp.path().join("plain.txt");
    std::fs::File::create(&plain).unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let want = mode(&plain);
    let cfg = config(
        &tmp.path().join("runs"),
        &["train.max_steps=2", "run.save_steps=1"],
    );
    let run = trainer::train(&cfg, &ctx(false), None).unwrap().run_dir;
    let mut stack = vec![run];
    let mut seen = 0;
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                assert_eq!(mode(&p), want, "{}: {:o}", p.display(), mode(&p));
                seen += 1;
            }
        }
    }
    // resolved_config, metrics, summary, final adapter (2) and 2 checkpoints of 6 files each.
    assert!(seen >= 15, "{seen} files");
}

/// `run.save_total_limit`: only the newest checkpoints are kept.
#[test]
fn older_checkpoints_beyond_the_limit_are_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(
        tmp.path(),
        &[
            "train.max_steps=5",
            "run.save_steps=1",
            "run.save_total_limit=2",
        ],
    );
    let run = trainer::train(&cfg, &ctx(false), None).unwrap().run_dir;
    assert_eq!(
        reprpo_train::run::checkpoints(&run).unwrap(),
        vec![
            reprpo_train::run::checkpoint_dir(&run, 5),
            reprpo_train::run::checkpoint_dir(&run, 4)
        ]
    );
}
