//! `sweep slurm`: an `sbatch` array script whose task `i` is `run-one DIR` with
//! `SLURM_ARRAY_TASK_ID = i` (one task per run, `--array=0-N%M`), resources from the sweep
//! file's `[slurm]` table. Resubmitting it is safe: done runs are skipped. Each task's threads
//! follow `--cpus-per-task`. Output goes to `<dir>/logs/slurm-<job>_<task>.out`.

use std::fmt::Write as _;
use std::path::Path;

use crate::error::{Result, key_err};
use crate::plan::Plan;

/// `s` quoted for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Check the `[slurm]` values: no line breaks (each becomes one `#SBATCH` line), `parallel` at
/// least 1.
fn check(plan: &Plan) -> Result<()> {
    let s = &plan.slurm;
    let file = &plan.sweep_file;
    let fields = [
        ("job_name", s.job_name.as_deref()),
        ("partition", s.partition.as_deref()),
        ("account", s.account.as_deref()),
        ("time", s.time.as_deref()),
        ("mem", s.mem.as_deref()),
        ("gres", s.gres.as_deref()),
        ("binary", s.binary.as_deref()),
    ];
    let extra = s.extra.iter().map(|e| ("extra", Some(e.as_str())));
    for (key, v) in fields.into_iter().chain(extra) {
        if v.is_some_and(|v| v.contains(['\n', '\r'])) {
            return Err(key_err(file, format!("slurm.{key}"), "must be one line"));
        }
    }
    if s.parallel == Some(0) {
        return Err(key_err(file, "slurm.parallel", "must be at least 1"));
    }
    Ok(())
}

/// The script for the plan of the sweep folder `dir` (absolute), run from `workdir` with the
/// xtask binary `binary` (unless `[slurm] binary` names one).
pub fn script(dir: &Path, plan: &Plan, binary: &Path, workdir: &Path) -> Result<String> {
    check(plan)?;
    let s = &plan.slurm;
    let n = plan.runs.len();
    let binary = s
        .binary
        .clone()
        .unwrap_or_else(|| binary.display().to_string());
    let mut out = String::from("#!/bin/bash\n");
    let _ = writeln!(
        out,
        "# Sweep `{}`: {n} runs, one array task each (written by `xtask sweep slurm`).\n\
         # Submit: sbatch {}\n\
         # Then:   xtask sweep report {}\n\
         # Task i runs run i of plan.json (`sweep run-one` reads SLURM_ARRAY_TASK_ID); a done run\n\
         # is skipped, so resubmitting continues where the array stopped.",
        plan.name,
        dir.join("sweep.sbatch").display(),
        dir.display()
    );
    let mut opt = |k: &str, v: &str| {
        let _ = writeln!(out, "#SBATCH --{k}={v}");
    };
    opt("job-name", s.job_name.as_deref().unwrap_or(&plan.name));
    let array = match s.parallel {
        Some(m) => format!("0-{}%{m}", n.saturating_sub(1)),
        None => format!("0-{}", n.saturating_sub(1)),
    };
    opt("array", &array);
    opt(
        "output",
        &dir.join("logs")
            .join("slurm-%A_%a.out")
            .display()
            .to_string(),
    );
    for (k, v) in [
        ("partition", &s.partition),
        ("account", &s.account),
        ("time", &s.time),
        ("mem", &s.mem),
        ("gres", &s.gres),
    ] {
        if let Some(v) = v {
            opt(k, v);
        }
    }
    if let Some(c) = s.cpus_per_task {
        opt("cpus-per-task", &c.to_string());
    }
    for e in &s.extra {
        let _ = writeln!(out, "#SBATCH {e}");
    }
    out.push_str("\nset -euo pipefail\n");
    let _ = writeln!(out, "cd {}", shell_quote(&workdir.display().to_string()));
    out.push_str("export RAYON_NUM_THREADS=\"${SLURM_CPUS_PER_TASK:-1}\"\n");
    out.push_str("export CANDLE_NUM_THREADS=\"$RAYON_NUM_THREADS\"\n");
    for line in &s.setup {
        let _ = writeln!(out, "{line}");
    }
    let _ = writeln!(
        out,
        "exec {} sweep run-one {}",
        shell_quote(&binary),
        shell_quote(&dir.display().to_string())
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::shell_quote;

    #[test]
    fn quotes_survive_the_shell() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
    }
}
