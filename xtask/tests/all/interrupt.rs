//! Ctrl-C ends `cargo xtask train` with exit status 130 after saving a checkpoint, so
//! `train && eval` does not go on with a half-trained adapter (issue 15, point 7).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[cfg(unix)]
#[test]
fn sigint_saves_a_checkpoint_and_exits_130() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args([
            "train",
            "--no-progress",
            &format!("run.out_dir={out}"),
            "run.plots=false",
            "sft.steps=0",
            "train.max_steps=100000",
            "train.logging_steps=1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait for the first logged step, so the handler is installed and training is under way.
    let t0 = Instant::now();
    let logged = loop {
        let found = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.path().join("metrics.jsonl"))
            .find(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > 0));
        if let Some(p) = found {
            break p;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "no step logged");
        assert!(child.try_wait().unwrap().is_none(), "train exited early");
        std::thread::sleep(Duration::from_millis(100));
    };
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{status:?}");
    let run = logged.parent().unwrap();
    let ckpts: Vec<_> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("step-"))
        .collect();
    assert!(
        !ckpts.is_empty(),
        "no checkpoint saved in {}",
        run.display()
    );
}
