//! `cargo xtask doctor --device cpu` end to end: every check passes, the JSON report lists each
//! one, the fused kernels and the written-out ops really are different paths (non-zero errors
//! where a fused kernel runs in f32), and bad devices fail with a message naming `--device`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use common::xtask;

#[test]
fn doctor_on_the_cpu_passes_every_check_and_reports_them() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("doctor.json");
    let (ok, out, err) = xtask(&[
        "doctor",
        "--device",
        "cpu",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(ok, "doctor failed:\n{out}\n{err}");
    assert!(
        out.contains("all") && out.contains("checks passed"),
        "{out}"
    );
    let (ok, list, _) = xtask(&["doctor", "--list"]);
    assert!(ok);
    let names: Vec<&str> = list.lines().collect();
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rows = doc["rows"].as_array().unwrap();
    assert_eq!(rows.len(), names.len(), "one row per listed check");
    let row = |name: &str| {
        rows.iter()
            .find(|r| r["check"] == name)
            .unwrap_or_else(|| panic!("no row {name}"))
    };
    for r in rows {
        let (e, b) = (
            r["max_error"].as_f64().unwrap(),
            r["bound"].as_f64().unwrap(),
        );
        assert!(r["ok"].as_bool().unwrap() && e <= b, "{r}");
    }
    // What the issue lists is there: every adapter kind, both models, every DPO type and the
    // f-divergences, the ReprPO variants, AdamW, the inverse, checkpointing and generation.
    for kind in ["lora", "dora", "boft", "oft", "hra", "full"] {
        for dt in ["f32", "bf16"] {
            row(&format!("models.llama.backward.{kind}.{dt}"));
        }
    }
    let count = |prefix: &str| names.iter().filter(|n| n.starts_with(prefix)).count();
    assert_eq!(count("losses.dpo."), 15 + 3);
    assert!(
        count("losses.reprpo.") >= 2 * 17,
        "{}",
        count("losses.reprpo.")
    );
    for name in [
        "models.phi3.forward.left-pad.f32",
        "models.llama.forward.early-exit.bf16",
        "models.phi3.backward.lora.checkpointed.f32",
        "models.llama.generate.greedy-kv-cache.f32",
        "logps.row_token_logps.f32",
        "optim.adamw.clipped.f32",
        "linalg.inverse.cayley.f32",
        "losses.methods.rank.f32",
        "losses.methods.reduce-log-softmax.bf16",
    ] {
        row(name);
    }
    // Where a fused kernel runs (f32 on the CPU), the two sides are different code: a zero
    // error would mean the switch to the written-out ops did nothing.
    for name in [
        "models.llama.forward.right-pad.f32",
        "models.llama.backward.boft.f32",
        "logps.token_logps.f32",
        "losses.reprpo.original.per-position.f32",
        "losses.methods.reduce-log-softmax.f32",
        "linalg.inverse.cayley.f32",
    ] {
        assert!(row(name)["max_error"].as_f64().unwrap() > 0.0, "{name}");
    }
}

#[test]
fn doctor_names_a_bad_device() {
    let (ok, _, err) = xtask(&["doctor", "--device", "gpu"]);
    assert!(!ok);
    assert!(
        err.contains("--device \"gpu\": expected cpu, cuda or cuda:N"),
        "{err}"
    );
    #[cfg(not(feature = "cuda"))]
    {
        let (ok, _, err) = xtask(&["doctor", "--device", "cuda:0"]);
        assert!(!ok);
        assert!(err.contains("this build has no CUDA"), "{err}");
    }
    let (ok, _, err) = xtask(&["doctor", "--only", "no-such-check"]);
    assert!(!ok);
    assert!(err.contains("no check matches"), "{err}");
}
