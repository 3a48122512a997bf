//! Shared by the end-to-end tests of the command line: run the debug binary.

#![allow(dead_code, clippy::expect_used)]

use std::process::Command;

/// Run `xtask ARGS` (no backtraces in its messages); (success, stdout, stderr).
pub fn xtask(args: &[&str]) -> (bool, String, String) {
    xtask_in(std::path::Path::new("."), args, &[])
}

/// Run `xtask ARGS` in the working directory `dir` with extra environment variables;
/// (success, stdout, stderr).
pub fn xtask_in(
    dir: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .current_dir(dir)
        .envs(env.iter().copied())
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run xtask");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
