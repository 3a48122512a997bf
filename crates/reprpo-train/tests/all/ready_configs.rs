//! The ready training configurations under `datasets/configs/` resolve and validate offline (no
//! model download: the checks that need the model's depth take the depth of the model they name),
//! and say what they claim to: `reprpo-ref.toml`, the training side of the reference ReprPO
//! project's protocol (datasets/README.md), and `seed-{llama3,phi3}-helpsteer2.toml`, the
//! original experiments' setting (evaluated with the `seed` suite).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use reprpo_train::TrainConfig;
use reprpo_train::config::Sources;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn resolve(file: &str, overrides: &[&str]) -> TrainConfig {
    let cfg = TrainConfig::resolve(&Sources {
        file: Some(root().join("datasets/configs").join(file)),
        overrides: overrides.iter().map(|s| s.to_string()).collect(),
        env: false,
    })
    .unwrap();
    cfg.validate().unwrap();
    // Every dataset is a committed recipe.
    for list in [
        &cfg.data.datasets,
        &cfg.data.eval_datasets,
        &cfg.data.ood_datasets,
    ] {
        reprpo_data::recipe::resolve(list, &root().join("datasets")).unwrap();
    }
    cfg
}

#[test]
fn every_ready_config_resolves() {
    let mut n = 0;
    for e in std::fs::read_dir(root().join("datasets/configs")).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_some_and(|x| x == "toml") {
            resolve(path.file_name().unwrap().to_str().unwrap(), &[]);
            n += 1;
        }
    }
    assert!(n >= 1);
}

#[test]
fn reprpo_ref_is_the_reference_training_protocol() {
    let cfg = resolve("reprpo-ref.toml", &[]);
    // wassname/llama-3-2-1b-sft is Llama-3.2-1B: 16 layers.
    cfg.validate_for_model(16).unwrap();
    assert_eq!(cfg.loss, "hs-ether-prefvec");
    assert_eq!(
        (
            cfg.method.collect_hs,
            cfg.method.transform.as_str(),
            cfg.method.loss.as_str()
        ),
        (true, "ether", "prefvec")
    );
    assert_eq!(cfg.train.lr, 7e-5, "the method preset's learning rate");
    assert_eq!(cfg.model.name_or_path, "wassname/llama-3-2-1b-sft");
    assert_eq!(cfg.model.dtype, "bf16");
    assert_eq!(cfg.data.datasets, ["genies-unhelpful-alpaca-train"]);
    assert_eq!(cfg.data.eval_datasets, ["genies-unhelpful-alpaca-test"]);
    assert_eq!(cfg.data.ood_datasets, ["genies-illegal-dont-help-test"]);
    assert_eq!(cfg.data.eval_split, 0.0);
    assert_eq!(
        (cfg.data.max_length, cfg.data.max_prompt_length),
        (Some(256), Some(128))
    );
    assert!(!cfg.data.chat_template);
    let a = &cfg.adapter;
    assert_eq!(
        (a.kind.as_str(), a.r, a.alpha, a.rslora, a.dropout),
        ("lora", 64, 16.0, true, 0.0)
    );
    assert_eq!(a.target_modules, ["q_proj", "v_proj"]);
    assert_eq!(
        a.reference, "base",
        "the reference model is the adapter switched off"
    );
    let t = &cfg.train;
    assert_eq!(
        (t.batch_size, t.grad_accum, t.max_steps),
        (10, 2, Some(500))
    );
    assert_eq!(t.schedule, "wsd");
    assert_eq!((t.warmup_ratio, t.decay_ratio), (0.15, 0.15));
    assert_eq!((t.max_grad_norm, t.weight_decay), (0.3, 0.0));
    assert_eq!((t.adam_beta1, t.adam_beta2, t.adam_eps), (0.9, 0.999, 1e-8));
    // A real model: no SFT stage.
    assert_eq!(cfg.sft.steps, Some(0));

    // The DPO row of the reference's table: the same file with `loss=dpo` and its learning rate.
    let dpo = resolve("reprpo-ref.toml", &["loss=dpo", "train.lr=6e-5"]);
    dpo.validate_for_model(16).unwrap();
    assert_eq!(dpo.train.lr, 6e-5);
    assert_eq!(dpo.adapter.r, 64);
}

/// `seed-llama3-helpsteer2.toml` and `seed-phi3-helpsteer2.toml`: the original experiments'
/// setting (HelpSteer2 with ReprPO, `loss=dpo` for the DPO row; the toxic set as OOD pairs; a
/// 4-bit base, 8-bit AdamW, gradient checkpointing). Both models have 32 layers.
#[test]
fn seed_configs_are_the_original_setting() {
    for (file, model) in [
        (
            "seed-llama3-helpsteer2.toml",
            "meta-llama/Meta-Llama-3-8B-Instruct",
        ),
        (
            "seed-phi3-helpsteer2.toml",
            "microsoft/Phi-3-mini-4k-instruct",
        ),
    ] {
        for extra in [&[][..], &["loss=dpo"][..]] {
            let cfg = resolve(file, extra);
            cfg.validate_for_model(32).unwrap();
            assert_eq!(cfg.loss, if extra.is_empty() { "reprpo" } else { "dpo" });
            assert_eq!(cfg.model.name_or_path, model);
            assert_eq!(
                (cfg.model.quantize.as_str(), cfg.model.double_quant),
                ("nf4", true)
            );
            assert_eq!(cfg.data.datasets, ["helpsteer2"]);
            assert_eq!(cfg.data.ood_datasets, ["toxic-dpo"]);
            assert_eq!(cfg.train.optim, "adamw_8bit");
            assert!(cfg.train.grad_checkpointing);
            assert_eq!(cfg.adapter.kind, "lora");
            assert_eq!(cfg.sft.steps, Some(0), "a real model: no SFT stage");
        }
    }
}
