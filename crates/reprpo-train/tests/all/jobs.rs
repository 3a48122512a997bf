#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! End-to-end training jobs on the embedded default data and the tiny random model:
//!
//! - every loss family x every adapter kind (and full fine-tuning): a short run lowers the loss on
//!   its training pairs
//!   (evaluated at the same progress before and after, so ReprPO's coefficient schedule cannot
//!   fake a fall), and the saved PEFT adapter, reloaded into a fresh base, reproduces the run's
//!   own final evaluation exactly;
//! - Ctrl-C (the stop flag) then `--resume` ends with the same adapter, bit for bit, as a run
//!   that was never interrupted;
//! - a non-finite loss stops the run naming the step and leaves the last checkpoint intact;
//! - configuration errors name the key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use crate::common;

use common::{config, ctx, datasets_dir, exploding, non_finite_stop};
use reprpo_models::peft;
use reprpo_train::config::Sources;
use reprpo_train::trainer::{self, JobContext};
use reprpo_train::{TrainConfig, TrainError, data};

/// The loss of `cfg`'s training pairs at `progress`, with the adapter in `adapter` (or none).
fn loss_on_train_pairs(
    cfg: &TrainConfig,
    adapter: Option<&Path>,
    progress: f64,
) -> BTreeMap<String, f64> {
    let (mut model, tok, dev) = trainer::load_model(cfg).unwrap();
    if let Some(dir) = adapter {
        let idx = peft::load_adapter(model.as_mut(), dir, "policy").unwrap();
        model.adapter_set_mut().active = Some(idx);
    }
    let mut raw = data::load_pairs(&cfg.data.datasets, &datasets_dir(), cfg.train.seed).unwrap();
    raw.truncate(cfg.data.n_train.unwrap());
    let pairs = data::tokenize(&tok, &raw, &cfg.tokenize_config()).unwrap();
    trainer::evaluate(
        model.lm(),
        cfg,
        cfg.family().unwrap(),
        &pairs,
        &tok,
        &dev,
        progress,
        &Default::default(),
        None,
    )
    .unwrap()
}

fn check_family_kind(loss: &str, kind: &str, lr: &str, steps: &str) {
    check_family_kind_with(loss, kind, lr, steps, &[]);
}

fn check_family_kind_with(loss: &str, kind: &str, lr: &str, steps: &str, extra: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let mut args = vec![
        format!("loss={loss}"),
        format!("adapter.kind={kind}"),
        format!("train.lr={lr}"),
        format!("train.max_steps={steps}"),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let cfg = config(tmp.path(), &args);
    let out = trainer::train(&cfg, &ctx(false), None).unwrap();
    assert!(!out.interrupted);
    let adapter = out.run_dir.join("adapter");
    // Progress 0 for both, so ReprPO's schedule is the same before and after.
    let before = loss_on_train_pairs(&cfg, None, 0.0)["loss"];
    let after = loss_on_train_pairs(&cfg, Some(&adapter), 0.0)["loss"];
    assert!(
        after < before,
        "{loss}/{kind}: loss on the training pairs did not fall: {before} -> {after}"
    );
    // The reloaded adapter reproduces the run's own final evaluation (progress 1) exactly.
    let reloaded = loss_on_train_pairs(&cfg, Some(&adapter), 1.0);
    for (k, v) in &reloaded {
        let logged = out.summary[&format!("final_eval/{k}")].as_f64().unwrap();
        assert!(
            (logged - v).abs() <= 1e-6 * v.abs().max(1e-3),
            "{loss}/{kind}: {k}: in-run {logged} vs reloaded {v}"
        );
    }
    for f in [
        "resolved_config.toml",
        "metrics.jsonl",
        "summary.json",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
    ] {
        assert!(out.run_dir.join(f).is_file(), "{loss}/{kind}: {f} missing");
    }
}

#[test]
fn dpo_every_adapter_kind() {
    for kind in ["lora", "dora", "boft", "oft", "hra"] {
        check_family_kind("dpo", kind, "5e-3", "6");
    }
}

#[test]
fn reprpo_every_adapter_kind() {
    for kind in ["lora", "dora", "boft", "oft", "hra"] {
        check_family_kind_with(
            "reprpo",
            kind,
            "1e-3",
            "12",
            &["train.hidden_mask=completion"],
        );
    }
}

#[test]
fn sft_every_adapter_kind() {
    for kind in ["lora", "dora", "boft", "oft", "hra"] {
        check_family_kind("sft", kind, "5e-3", "6");
    }
}

/// Full fine-tuning (`adapter.kind=full`: a dense delta on every linear layer) with each loss
/// family, at a tenth of the adapters' learning rates (every weight moves).
#[test]
fn every_family_full_fine_tuning() {
    check_family_kind("sft", "full", "5e-4", "6");
    check_family_kind("dpo", "full", "5e-4", "6");
    check_family_kind_with(
        "reprpo",
        "full",
        "1e-4",
        "12",
        &["train.hidden_mask=completion"],
    );
}

fn load_adapter_tensors(dir: &Path) -> BTreeMap<String, Vec<f32>> {
    let t = candle_core::safetensors::load(
        dir.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    t.into_iter()
        .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

#[test]
fn interrupted_and_resumed_run_is_bit_identical() {
    // The 8-bit optimizer's case: LoRA r = 32 gives q_proj's A and B 32 x 128 = 4096 elements
    // (8-bit moments) and k_proj's B 64 x 32 (f32 moments), so both kinds of state resume.
    let cases: [(&str, &[&str]); 3] = [
        ("reprpo", &[]),
        ("dpo", &[]),
        ("dpo", &["train.optim=adamw_8bit", "adapter.r=32"]),
    ];
    for (loss, more) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let loss_kv = format!("loss={loss}");
        let mut extra = vec![
            loss_kv.as_str(),
            "train.max_steps=5",
            "train.grad_accum=2",
            "train.lr=3e-3",
            "train.schedule=cosine",
            "train.warmup_ratio=0.2",
            "train.weight_decay=0.01",
            "run.save_steps=2",
            // Seeded dropout masks: resume is exact with dropout too.
            "adapter.dropout=0.1",
        ];
        extra.extend_from_slice(more);
        let cfg = config(tmp.path(), &extra);
        let straight = trainer::train(&cfg, &ctx(false), None).unwrap();
        // Stop flag set from the start: the run stops after its first step with a checkpoint.
        let stopped = trainer::train(&cfg, &ctx(true), None).unwrap();
        assert!(stopped.interrupted);
        assert_eq!(stopped.steps, 1);
        assert!(!stopped.run_dir.join("adapter").exists());
        if !more.is_empty() {
            // The 8-bit path is really taken: u8 codes with their absmax, f32 moments below
            // the threshold, and the kind's marker in the checkpoint.
            let ck = checkpoint_steps(&stopped.run_dir);
            assert_eq!(ck, vec![1]);
            let opt = candle_core::safetensors::load(
                stopped
                    .run_dir
                    .join("checkpoints")
                    .join(format!("step-{:07}", ck[0]))
                    .join("optimizer.safetensors"),
                &candle_core::Device::Cpu,
            )
            .unwrap();
            let dtypes: Vec<_> = opt.values().map(|t| t.dtype()).collect();
            assert!(dtypes.contains(&candle_core::DType::U8), "{:?}", opt.keys());
            assert!(dtypes.contains(&candle_core::DType::F32));
            assert!(opt.contains_key(reprpo_train::optim::KIND_8BIT_KEY));
            assert!(opt.keys().any(|k| k.starts_with("absmax_m.")));
        }
        let resumed = trainer::train(&cfg, &ctx(false), Some(&stopped.run_dir)).unwrap();
        assert!(!resumed.interrupted);
        assert_eq!(resumed.steps, 5);
        let a = load_adapter_tensors(&straight.run_dir.join("adapter"));
        let b = load_adapter_tensors(&resumed.run_dir.join("adapter"));
        assert_eq!(a.len(), b.len());
        for (k, va) in &a {
            let vb = &b[k];
            assert!(
                va.iter().zip(vb).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{loss} {more:?}: {k} differs after resume"
            );
        }
        // The B matrices moved (the comparison is not between two untrained adapters).
        assert!(
            a.iter()
                .filter(|(k, _)| k.contains("lora_B"))
                .any(|(_, v)| v.iter().any(|x| *x != 0.0))
        );
        // The resumed run's log has each step once.
        assert_eq!(
            common::logged_steps(&resumed.run_dir),
            vec![1, 2, 3, 4, 5],
            "{loss}"
        );
    }
}

#[test]
fn non_finite_loss_stops_and_keeps_the_last_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    // lr 0 at step 1, so its checkpoint is finite; step 2's update explodes.
    let cfg = exploding(tmp.path(), &["train.warmup_steps=2", "train.max_steps=4"]);
    let (step, last_checkpoint, err) = non_finite_stop(&cfg);
    let msg = err.to_string();
    assert!(msg.contains(&format!("step {step}")), "{msg}");
    let ck = last_checkpoint.expect("a checkpoint before the bad step");
    assert!(ck.join("trainer_state.json").is_file());
    assert!(ck.join("adapter/adapter_model.safetensors").is_file());
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ck.join("trainer_state.json")).unwrap())
            .unwrap();
    assert_eq!(state["step"].as_u64().unwrap() as usize, step - 1);
    // The saved adapter of the last good step is finite.
    for (k, v) in load_adapter_tensors(&ck.join("adapter")) {
        assert!(v.iter().all(|x| x.is_finite()), "{k} not finite");
    }
}

fn config_error(overrides: &[&str]) -> (String, String) {
    let err = TrainConfig::resolve(&Sources {
        file: None,
        overrides: overrides.iter().map(|s| s.to_string()).collect(),
        env: false,
    })
    .unwrap_err();
    match err {
        TrainError::Config { key, problem } => (key, problem),
        other => panic!("expected a config error, got {other}"),
    }
}

#[test]
fn config_errors_name_the_key() {
    let (k, p) = config_error(&["train.lrr=1e-3"]);
    assert_eq!(k, "train.lrr");
    assert!(p.contains("did you mean `lr`"), "{p}");
    let (k, p) = config_error(&["train.batch_size=four"]);
    assert_eq!(k, "train.batch_size", "{p}");
    let (k, _) = config_error(&["train.warmup_ratio=2"]);
    assert_eq!(k, "train.warmup_ratio");
    let (k, p) = config_error(&["loss=dop"]);
    assert_eq!(k, "loss");
    assert!(p.contains("did you mean `dpo`"), "{p}");
    let (k, p) = config_error(&["adapter.kind=bofft"]);
    assert_eq!(k, "adapter.kind");
    assert!(p.contains("did you mean `boft`"), "{p}");
    let (k, _) = config_error(&["train.schedule=cosin"]);
    assert_eq!(k, "train.schedule");
    let (k, _) = config_error(&["adapter.init_from=/nonexistent/adapter"]);
    assert_eq!(k, "adapter.init_from");
}

#[test]
fn model_dependent_config_errors_name_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    // The tiny model has 4 layers: hidden-state index 9 does not exist.
    let cfg = config(tmp.path(), &["reprpo.layers=[9]", "train.max_steps=1"]);
    let err = trainer::train(&cfg, &ctx(false), None).unwrap_err();
    assert!(
        matches!(&err, TrainError::Config { key, .. } if key == "reprpo.layers"),
        "{err}"
    );
    // A BOFT block size that does not divide the layer width (128).
    let cfg = config(
        tmp.path(),
        &[
            "adapter.kind=boft",
            "adapter.block_size=5",
            "train.max_steps=1",
        ],
    );
    let err = trainer::train(&cfg, &ctx(false), None).unwrap_err();
    assert!(
        matches!(&err, TrainError::Config { key, .. } if key.starts_with("adapter")),
        "{err}"
    );
}

#[test]
fn device_errors_name_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let device_error = |d: &str| {
        let cfg = config(tmp.path(), &[&format!("model.device={d}")]);
        match trainer::load_model(&cfg).map(|_| ()).unwrap_err() {
            TrainError::Config { key, problem } => (key, problem),
            other => panic!("expected a config error, got {other}"),
        }
    };
    let (k, p) = device_error("gpu");
    assert_eq!(k, "model.device");
    assert!(p.contains("expected cpu, cuda or cuda:N"), "{p}");
    let (k, p) = device_error("cuda:x");
    assert_eq!(k, "model.device");
    assert!(p.contains("expected cpu, cuda or cuda:N"), "{p}");
    if !cfg!(feature = "cuda") {
        // CI builds without CUDA: asking for it says how to get it.
        let (k, p) = device_error("cuda:0");
        assert_eq!(k, "model.device");
        assert!(p.contains("build with --features cuda"), "{p}");
    }
}

#[test]
fn presets_layer_under_overrides() {
    let tmp = tempfile::tempdir().unwrap();
    // The dpo preset sets its own lr; an override wins over it.
    let a = config(tmp.path(), &["loss=dpo"]);
    let b = config(tmp.path(), &["loss=dpo", "train.lr=0.123"]);
    assert_ne!(a.train.lr, 0.123);
    assert_eq!(b.train.lr, 0.123);
    let c = config(tmp.path(), &["loss=ipo"]);
    assert_eq!(
        serde_json::to_value(&c.dpo.loss_type).unwrap(),
        serde_json::json!(["ipo"])
    );
    let d = config(tmp.path(), &["loss=reprpo-topk"]);
    assert_eq!(d.reprpo.variant.name(), "topk");
    // The resolved config round-trips through the run folder's TOML.
    let path = tmp.path().join("c.toml");
    std::fs::write(&path, d.to_toml().unwrap()).unwrap();
    assert_eq!(TrainConfig::from_toml_file(&path).unwrap(), d);
    // A TOML file sits under the overrides.
    std::fs::write(
        tmp.path().join("f.toml"),
        "loss = \"dpo\"\n[train]\nlr = 0.5\nbatch_size = 2\n",
    )
    .unwrap();
    let e = TrainConfig::resolve(&Sources {
        file: Some(tmp.path().join("f.toml")),
        overrides: vec!["train.lr=0.25".into()],
        env: false,
    })
    .unwrap();
    assert_eq!(
        (e.train.lr, e.train.batch_size, e.loss.as_str()),
        (0.25, 2, "dpo")
    );
}

fn first_logged(out: &trainer::Outcome) -> serde_json::Value {
    let text = std::fs::read_to_string(out.run_dir.join("metrics.jsonl")).unwrap();
    serde_json::from_str(text.lines().next().unwrap()).unwrap()
}

#[test]
fn bf16_compute_agrees_with_f32() {
    // Same weights (the random base is drawn in f32, then cast), learning rate 0: the first
    // step's metrics in bf16 must match f32 within bf16's precision (8 bits of mantissa, errors
    // of a few 1e-3 relative per op; 3e-2 leaves room for the 4-layer forward).
    for loss in ["reprpo", "dpo"] {
        let tmp = tempfile::tempdir().unwrap();
        let run = |dtype: &str| {
            let cfg = config(
                tmp.path(),
                &[
                    &format!("loss={loss}"),
                    &format!("model.dtype={dtype}"),
                    "train.lr=0",
                    "train.max_steps=1",
                    "adapter.init=gaussian",
                ],
            );
            first_logged(&trainer::train(&cfg, &ctx(false), None).unwrap())
        };
        let (a, b) = (run("f32"), run("bf16"));
        for key in [
            "loss",
            "loss_rr",
            "cosine/rejected",
            "logps/chosen",
            "logps/rejected",
        ] {
            let (Some(x), Some(y)) = (
                a.get(key).and_then(|v| v.as_f64()),
                b.get(key).and_then(|v| v.as_f64()),
            ) else {
                continue;
            };
            assert!(
                (x - y).abs() <= 3e-2 * x.abs().max(1e-2),
                "{loss}: {key}: f32 {x} vs bf16 {y}"
            );
        }
    }
}

#[test]
fn periodic_eval_is_logged_with_trl_names() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(
        tmp.path(),
        &[
            "loss=dpo",
            "train.max_steps=4",
            "train.eval_every=2",
            "train.logging_steps=2",
            "train.n_samples=1",
            "data.eval_datasets=[default-test]",
        ],
    );
    let out = trainer::train(&cfg, &ctx(false), None).unwrap();
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(out.run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // Logged every 2 steps (not every step), plus one evaluation at step 2.
    let train_steps: Vec<u64> = lines
        .iter()
        .filter(|l| l.get("loss").is_some())
        .map(|l| l["step"].as_u64().unwrap())
        .collect();
    assert_eq!(train_steps, vec![2, 4]);
    let evals: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l.get("eval_loss").is_some())
        .collect();
    assert_eq!(evals.len(), 1);
    assert_eq!(evals[0]["step"].as_u64(), Some(2));
    for k in [
        "eval_rewards/accuracies",
        "eval_rewards/margins",
        "eval_logps/chosen",
    ] {
        assert!(evals[0][k].as_f64().unwrap().is_finite(), "{k}");
    }
    for k in [
        "learning_rate",
        "grad_norm",
        "rewards/chosen",
        "logits/chosen",
        "epoch",
    ] {
        assert!(lines[0][k].as_f64().is_some(), "{k} missing from the log");
    }
}

#[test]
fn gradient_checkpointing_trains_the_same_adapter() {
    // Same run with and without recomputation (dropout on, so the replayed masks matter):
    // the adapters agree to float rounding of the recomputed reductions.
    for loss in ["reprpo", "dpo"] {
        let tmp = tempfile::tempdir().unwrap();
        let run = |ckpt: bool| {
            let cfg = config(
                tmp.path(),
                &[
                    &format!("loss={loss}"),
                    &format!("train.grad_checkpointing={ckpt}"),
                    "train.max_steps=3",
                    "train.lr=3e-3",
                    "adapter.dropout=0.1",
                ],
            );
            let out = trainer::train(&cfg, &ctx(false), None).unwrap();
            load_adapter_tensors(&out.run_dir.join("adapter"))
        };
        let (a, b) = (run(false), run(true));
        let mut moved = false;
        for (k, va) in &a {
            let vb = &b[k];
            for (x, y) in va.iter().zip(vb) {
                assert!(
                    (x - y).abs() <= 1e-5 * x.abs().max(1e-3),
                    "{loss}: {k}: {x} vs {y}"
                );
            }
            moved |= k.contains("lora_B") && va.iter().any(|x| *x != 0.0);
        }
        assert!(moved, "{loss}: the adapter did not train");
    }
}

/// A full fine-tune of a model read from a folder (the train fixture's small Llama) also writes
/// `merged/`, a plain Hugging Face folder that loads without adapters and gives the logits of the
/// base with the run's adapter (1e-5 relative), tokenizer and config copied.
#[test]
fn full_fine_tune_of_a_folder_model_exports_the_merged_model() {
    use candle_core::{DType, Device, Tensor};
    use reprpo_models::{ForwardSpec, Llama};
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/train");
    let tmp = tempfile::tempdir().unwrap();
    let overrides: Vec<String> = vec![
        format!("model.name_or_path={}", fx.join("model").display()),
        "data.datasets=[train-fixture]".into(),
        "data.eval_datasets=[]".into(),
        "data.ood_datasets=[]".into(),
        "loss=sft".into(),
        "adapter=full".into(),
        "train.lr=1e-3".into(),
        "train.max_steps=3".into(),
        "train.batch_size=4".into(),
        "train.warmup_ratio=0".into(),
        format!("run.out_dir={}", tmp.path().display()),
        "run.plots=false".into(),
    ];
    let cfg = TrainConfig::resolve(&Sources {
        file: None,
        overrides,
        env: false,
    })
    .unwrap();
    let c = JobContext {
        datasets_dir: fx.join("datasets"),
        stop: Arc::new(AtomicBool::new(false)),
        progress: false,
    };
    let out = trainer::train(&cfg, &c, None).unwrap();
    let merged_dir = out.run_dir.join("merged");
    for f in ["model.safetensors", "config.json", "tokenizer.json"] {
        assert!(merged_dir.join(f).is_file(), "merged/{f} missing");
    }
    let dev = Device::Cpu;
    let mut adapted = Llama::load(&fx.join("model"), DType::F32, &dev).unwrap();
    let idx = peft::load_adapter(&mut adapted, &out.run_dir.join("adapter"), "policy").unwrap();
    adapted.adapters.active = Some(idx);
    let merged = Llama::load(&merged_dir, DType::F32, &dev).unwrap();
    let base = Llama::load(&fx.join("model"), DType::F32, &dev).unwrap();
    let ids = Tensor::new(&[[1u32, 5, 9, 14, 3, 7, 2, 11]], &dev).unwrap();
    let logits = |m: &Llama| {
        m.forward(&ids, None, None, &ForwardSpec::logits())
            .unwrap()
            .logits
            .unwrap()
    };
    let (a, m, b) = (logits(&adapted), logits(&merged), logits(&base));
    let max = |t: Tensor| -> f32 {
        t.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    let scale = max(a.clone());
    let e = max((&a - &m).unwrap()) / scale;
    assert!(e < 1e-5, "merged vs base + adapter: {e:e}");
    assert!(
        max((&a - &b).unwrap()) > 1e-4 * scale,
        "three steps of full fine-tuning changed nothing"
    );
}

/// The checkpoint steps of a run, sorted.
fn checkpoint_steps(run_dir: &Path) -> Vec<usize> {
    let mut steps: Vec<usize> = std::fs::read_dir(run_dir.join("checkpoints"))
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            name.strip_prefix("step-")?.parse().ok()
        })
        .collect();
    steps.sort();
    steps
}

/// The only run folder under `out`.
fn only_run_dir(out: &Path) -> PathBuf {
    let dirs: Vec<PathBuf> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("resolved_config.toml").is_file())
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    dirs[0].clone()
}

#[test]
fn non_finite_value_inside_a_logging_window_is_reported_at_its_step() {
    // Learning rate 0 for the first step, then 5e29: the third step's loss overflows (NaN). The
    // non-finite state stays on the device until the next read (no checkpoint is due: a save
    // would be refused anyway, the step-2 adapter already holds ~5e29 values, see stops.rs).
    let run = |logging: &str| {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = config(
            tmp.path(),
            &[
                "loss=dpo",
                "train.lr=1e30",
                "train.max_grad_norm=0",
                "train.warmup_steps=2",
                "train.max_steps=8",
                "run.save_steps=100",
                logging,
            ],
        );
        let err = trainer::train(&cfg, &ctx(false), None).unwrap_err();
        let TrainError::NonFinite {
            step,
            what,
            last_checkpoint,
            ..
        } = &err
        else {
            panic!("expected a non-finite error, got {err}");
        };
        assert!(err.to_string().contains("step 3:"), "{err}");
        assert!(last_checkpoint.is_none(), "{logging}: {last_checkpoint:?}");
        let dir = only_run_dir(tmp.path());
        assert!(
            !dir.join("checkpoints").exists() || checkpoint_steps(&dir).is_empty(),
            "{logging}"
        );
        let logged: Vec<u64> = std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        ((*step, *what), logged)
    };
    // Read every step (as before the state stayed on the device): the reference.
    assert_eq!(run("train.logging_steps=1"), ((3, "loss"), vec![1, 2]));
    // Found at the logging read of step 4 or 5 (mid-window NaN at step 3): the same step, and
    // nothing logged from the window that held it.
    for logging in ["train.logging_steps=4", "train.logging_steps=5"] {
        assert_eq!(run(logging), ((3, "loss"), vec![]), "{logging}");
    }
}
