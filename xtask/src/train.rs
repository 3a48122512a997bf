//! `cargo xtask train [CONFIG.toml] [key=value ...] [--resume RUN_DIR]`: the training job.
//!
//! With no arguments it trains the embedded default (the tiny model and the project's own data,
//! with a short cached SFT stage first, then ReprPO with LoRA) and prints the held-out preference
//! accuracy of the trained adapter against the base, in distribution and on the shifted split.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use clap::Args;
use reprpo_train::{JobContext, Sources, TrainConfig};

/// Arguments of `train`.
#[derive(Args)]
pub struct TrainArgs {
    /// A TOML config file and/or `key=value` overrides (e.g. `loss=dpo train.lr=1e-4`).
    #[arg(value_name = "CONFIG | key=value")]
    pub args: Vec<String>,
    /// Continue the run in this folder from its last checkpoint.
    #[arg(long, value_name = "RUN_DIR")]
    pub resume: Option<PathBuf>,
    /// Print the resolved configuration and exit.
    #[arg(long)]
    pub print_config: bool,
    /// No progress bar (log lines only).
    #[arg(long)]
    pub no_progress: bool,
}

/// Run the job.
pub fn run(a: TrainArgs, root: &Path) -> Result<()> {
    let mut src = Sources {
        env: true,
        ..Default::default()
    };
    for arg in &a.args {
        if arg.contains('=') {
            src.overrides.push(arg.clone());
        } else if src.file.is_none() {
            src.file = Some(PathBuf::from(arg));
        } else {
            anyhow::bail!("`{arg}`: only one config file can be given (then key=value overrides)");
        }
    }
    let cfg = TrainConfig::resolve(&src)?;
    if a.print_config {
        print!("{}", cfg.to_toml()?);
        return Ok(());
    }
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                eprintln!("second Ctrl-C: exiting without a checkpoint");
                std::process::exit(130);
            }
            eprintln!("Ctrl-C: saving a checkpoint after this step (Ctrl-C again to abort)");
        })
        .context("installing the Ctrl-C handler")?;
    }
    let ctx = JobContext {
        datasets_dir: root.join("datasets"),
        stop,
        progress: !a.no_progress && std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let out = reprpo_train::train(&cfg, &ctx, a.resume.as_deref())?;
    if out.interrupted {
        println!(
            "stopped at step {}; resume with: cargo xtask train --resume {}",
            out.steps,
            out.run_dir.display()
        );
        return Ok(());
    }
    print_summary(&out.summary);
    println!("run folder: {}", out.run_dir.display());
    Ok(())
}

fn print_summary(s: &std::collections::BTreeMap<String, serde_json::Value>) {
    let get = |k: &str| s.get(k).and_then(serde_json::Value::as_f64);
    println!("held-out preference accuracy (mean log-prob per token, chosen > rejected):");
    println!(
        "{:<10} {:>16} {:>16}",
        "", "in-distribution", "shifted (OOD)"
    );
    let staged = s.contains_key("random_base/id/accuracy");
    for (who, label) in [
        ("random_base", "random base"),
        ("base", if staged { "after SFT" } else { "base" }),
        ("adapter", "+ adapter"),
    ] {
        if who == "random_base" && !staged {
            continue;
        }
        let cell = |split: &str| match (
            get(&format!("{who}/{split}/accuracy")),
            get(&format!("{who}/{split}/n")),
        ) {
            (Some(a), Some(n)) => format!("{:.1}% (n={n})", 100.0 * a),
            _ => "-".into(),
        };
        println!("{:<12} {:>16} {:>16}", label, cell("id"), cell("ood"));
    }
}

/// `cargo xtask bench train-step`: the anchor's step (random ids, all tokens attended, the second
/// half of each sequence is the completion; ReprPO reads hidden states `L/2` and `3L/4`), timed.
pub fn bench_train_step(
    preset: &str,
    pairs: usize,
    seq: usize,
    loss: &str,
    steps: usize,
    grad_checkpointing: bool,
) -> Result<()> {
    use candle_core::{DType, Device, Tensor};
    use reprpo_models::{Llama, LlamaConfig, peft};
    use reprpo_train::config::LossFamily;
    use reprpo_train::data::DeviceBatch;
    use reprpo_train::optim::{AdamW, AdamWConfig};
    let lc = LlamaConfig::preset(preset).with_context(|| format!("unknown preset `{preset}`"))?;
    let (vocab, layers) = (lc.vocab_size, lc.num_layers);
    let dev = Device::Cpu;
    let mut model = Llama::random(lc, 0.02, 0, DType::F32, &dev)?;
    let targets = [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ];
    peft::add_adapter(
        &mut model,
        "policy",
        peft::AdapterConfig::lora(16, 16.0, &targets),
        None,
        0,
    )?;
    let overrides = vec![
        format!("loss={loss}"),
        format!("reprpo.layers=[{}, {}]", layers / 2, 3 * layers / 4),
        format!("train.grad_checkpointing={grad_checkpointing}"),
        "sft.steps=0".to_string(),
    ];
    let cfg = TrainConfig::resolve(&Sources {
        overrides,
        ..Default::default()
    })?;
    let family = cfg.family()?;
    anyhow::ensure!(
        matches!(family, LossFamily::Dpo | LossFamily::ReprPo),
        "--loss must be a DPO type or a ReprPO variant"
    );
    let rows = 2 * pairs;
    let ids = Tensor::rand(0f32, vocab as f32, (rows, seq), &dev)?.to_dtype(DType::U32)?;
    let half: Vec<f32> = (0..rows * seq)
        .map(|i| if i % seq >= seq / 2 { 1.0 } else { 0.0 })
        .collect();
    let batch = DeviceBatch {
        ids,
        attention: Tensor::ones((rows, seq), DType::F32, &dev)?,
        loss_mask: Tensor::from_vec(half, (rows, seq), &dev)?,
        pairs,
    };
    let params = peft::adapter_params(&model, 0);
    let mut opt = AdamW::new(
        params,
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        },
    )?;
    let mut state = Default::default();
    let mut times = Vec::new();
    for i in 0..steps + 2 {
        let t0 = std::time::Instant::now();
        let out = reprpo_train::objective::batch_loss(
            &model, &cfg, family, &batch, 0.0, &mut state, true, None,
        )?;
        let g = opt.gradients(&reprpo_train::trainer::backward(&out.loss)?);
        // Hidden-state losses stop at their deepest layer: adapters above it get no gradient.
        anyhow::ensure!(
            g.iter().any(Option::is_some),
            "no adapter parameter got a gradient"
        );
        opt.update(&g, 1e-4)?;
        if i >= 2 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!(
        "{}",
        serde_json::json!({"preset": preset, "pairs": pairs, "seq": seq, "loss": loss,
            "grad_checkpointing": grad_checkpointing, "median_s": median,
            "tokens_per_s": (rows * seq) as f64 / median, "peak_rss_mib": crate::peak_rss_mib()})
    );
    Ok(())
}
