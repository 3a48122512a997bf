#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! What a training job would run on a GPU, asserted on the CPU: a whole job (training steps,
//! periodic and final evaluation, the summary's scoring) under `reprpo_kernels::written_out`
//! takes the path every non-CPU device takes, and the only custom op whose CPU forward runs is
//! one that also has a CUDA forward. Every other op of that path is a stock candle op, which
//! candle implements on CUDA. Without the switch the same job runs the fused CPU kernels (the
//! positive control, so the trace is known to see them).

use std::path::Path;

#[path = "all/common/mod.rs"]
mod common;

use candle_core::Device;
use reprpo_train::TrainConfig;
use reprpo_train::trainer;

/// Custom ops that have a `cuda_fwd` (and a backward that works on any device).
const HAS_CUDA_FORWARD: [&str; 2] = ["checkpoint", "projbp-hook"];

fn config(out: &Path, extra: &[&str]) -> TrainConfig {
    let mut all = vec!["train.max_steps=2", "train.eval_every=1"];
    all.extend_from_slice(extra);
    common::config(out, &all)
}

/// The custom ops whose CPU forward ran during a 2-step job, with or without the written-out
/// path. The job runs on a thread of candle's pool, as in `xtask`, so `train`'s own
/// `with_context` stays on this thread and the thread-local switch and trace cover it.
fn traced_job(extra: &[&str], written_out: bool) -> Vec<&'static str> {
    // One job at a time: a pool thread that waits inside a job may run another test's queued job
    // (rayon's work stealing), which would then see this job's thread-local switch and trace.
    static ONE_JOB: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE_JOB
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), extra);
    let ctx = common::ctx(false);
    let job = || trainer::train(&cfg, &ctx, None).unwrap();
    let (out, seen) = Device::Cpu.with_context(|| {
        reprpo_kernels::trace_cpu_kernels(|| {
            if written_out {
                reprpo_kernels::written_out(job)
            } else {
                job()
            }
        })
    });
    assert!(!out.interrupted);
    seen
}

#[test]
fn a_written_out_job_runs_only_ops_that_exist_on_cuda() {
    for extra in [
        &["loss=dpo", "adapter.kind=lora"][..],
        &["loss=reprpo", "adapter.kind=boft"],
        &[
            "loss=reprpo",
            "reprpo.token_reduction=mean",
            "adapter.kind=oft",
        ],
        &["loss=reprpo-cka", "adapter.kind=hra"],
        &[
            "loss=sft",
            "adapter.kind=dora",
            "train.grad_checkpointing=true",
        ],
        &[
            "loss=ipo",
            "adapter.kind=full",
            "train.grad_checkpointing=true",
        ],
        &["loss=projbp", "train.grad_checkpointing=true"],
        &["loss=projgrad", "projgrad.weight_dim=2"],
    ] {
        let seen = traced_job(extra, true);
        let cpu_only: Vec<_> = seen
            .iter()
            .filter(|op| !HAS_CUDA_FORWARD.contains(op))
            .collect();
        assert!(
            cpu_only.is_empty(),
            "{extra:?}: CPU-only custom ops on the device path: {cpu_only:?}"
        );
    }
}

#[test]
fn the_trace_sees_the_fused_kernels_of_a_cpu_job() {
    let seen = traced_job(&["loss=reprpo", "adapter.kind=lora"], false);
    for op in [
        "fused-rms-norm",
        "fused-rope",
        "fused-masked-softmax",
        "lora-matmul",
        "fused-reprpo-reroute-retain",
    ] {
        assert!(seen.contains(&op), "{op} not traced; seen {seen:?}");
    }
}
