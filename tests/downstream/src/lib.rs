//! What a project outside the reprpo workspace does with its library crates, on stock
//! candle-core: read and tokenise preference pairs (reprpo-data), load a tiny Llama and a PEFT
//! LoRA adapter (reprpo-models), and run one DPO and one ReprPO step with backward
//! (reprpo-losses). The values are checked in `tests/steps.rs` against the fixtures that the
//! workspace's own trainer test (`crates/reprpo-train/tests/all/train_reference.rs`) compares with
//! TRL and PyTorch: `tests/fixtures/train/`, written by `tests/reference/gen_train_fixtures.py`.
//!
//! `src/main.rs` times the same two steps (`docs/perf.md`: stock against patched candle-core).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use candle_core::{DType, Device, IndexOp, Tensor};
use reprpo_data::tokenize::{self, Layout};
use reprpo_data::{Batch, DataError, PreferencePair, Recipe, Tok, TokenizeConfig};
use reprpo_losses::{
    DpoConfig, DpoInputs, DpoState, HiddenPairs, LossOut, ReprPoConfig, dpo_loss, reprpo_loss,
    stack_layers,
};
use reprpo_models::logps::token_logps;
use reprpo_models::{CausalLm, ForwardSpec, Llama, peft};

/// `tests/fixtures/train` of the reprpo repository.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/train")
}

/// The fixture's four pairs (`pairs.jsonl`, the `pairs` converter).
pub fn read_pairs(dir: &Path) -> Result<Vec<PreferencePair>> {
    let recipe = Recipe::from_file(&dir.join("pairs.jsonl"), "pairs")?;
    let no_hub = |_: &reprpo_data::HubSource| -> reprpo_data::Result<Vec<PathBuf>> {
        Err(DataError::Invalid("no hub access here".into()))
    };
    Ok(reprpo_data::recipe::load_recipe(&recipe, dir, &no_hub)?.pairs)
}

/// The pairs tokenised as the trainer does (classic TRL 0.9 tokenisation, EOS appended) with the
/// model folder's tokenizer, collated chosen rows first, prompts left-padded.
pub fn pair_batch(dir: &Path) -> Result<Batch> {
    let tok = Tok::from_dir(&dir.join("model"))?;
    let pairs = read_pairs(dir)?;
    let tokenized = tokenize::tokenize_pairs(&tok, &pairs, &TokenizeConfig::default())?;
    ensure!(
        tokenized.dropped.is_empty(),
        "dropped {:?}",
        tokenized.dropped
    );
    let refs: Vec<_> = tokenized.pairs.iter().collect();
    Ok(tokenize::collate_pairs(&refs, tok.pad, Layout::PromptLeft)?)
}

/// A batch on the CPU: ids `[2B, T]` u32, attention and completion masks `[2B, T]` f32.
pub struct Tensors {
    /// Pairs in the batch (rows `0..B` chosen, `B..2B` rejected).
    pub pairs: usize,
    /// Token ids.
    pub ids: Tensor,
    /// 1 on real tokens.
    pub attention: Tensor,
    /// 1 on completion tokens.
    pub completion: Tensor,
}

impl Tensors {
    /// The tensors of a collated batch.
    pub fn new(b: &Batch) -> Result<Self> {
        let shape = (b.rows, b.seq_len);
        let mask = |m: &[u8]| -> Result<Tensor> {
            Ok(Tensor::from_vec(m.to_vec(), shape, &Device::Cpu)?.to_dtype(DType::F32)?)
        };
        Ok(Tensors {
            pairs: b.rows / 2,
            ids: Tensor::from_vec(b.input_ids.clone(), shape, &Device::Cpu)?,
            attention: mask(&b.attention_mask)?,
            completion: mask(&b.loss_mask)?,
        })
    }
}

/// The fixture's tiny Llama (f32) with its PEFT LoRA adapter (`lora/`) active.
pub fn policy(dir: &Path) -> Result<Llama> {
    let mut model = Llama::load(&dir.join("model"), DType::F32, &Device::Cpu)?;
    let idx = peft::load_adapter(&mut model, &dir.join("lora"), "policy")?;
    model.adapters.active = Some(idx);
    Ok(model)
}

/// One step's loss, the norm of the adapter gradient, and the loss's scalar metrics.
pub struct Step {
    /// The loss.
    pub loss: f64,
    /// `sqrt(sum of squared gradients)` over every adapter parameter.
    pub grad_norm: f64,
    /// The loss function's metrics, by name.
    pub metrics: BTreeMap<String, f64>,
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(f64::from(t.to_dtype(DType::F32)?.to_scalar::<f32>()?))
}

fn halves(t: &Tensor, b: usize) -> Result<(Tensor, Tensor)> {
    Ok((t.i(..b)?, t.i(b..2 * b)?))
}

/// The loss's backward and the adapter gradient norm.
fn finish(model: &Llama, out: LossOut) -> Result<Step> {
    let grads = out.loss.backward()?;
    // Parameters above the deepest layer a hidden-state loss reads get no gradient (zero).
    let mut sq = 0f64;
    let mut reached = 0;
    for (_, var) in &peft::adapter_params(model, 0) {
        if let Some(g) = grads.get(var.as_tensor()) {
            sq += scalar(&g.sqr()?.sum_all()?)?;
            reached += 1;
        }
    }
    ensure!(reached > 0, "no adapter parameter got a gradient");
    let mut metrics = BTreeMap::new();
    for (k, v) in &out.metrics {
        metrics.insert(k.clone(), scalar(v)?);
    }
    Ok(Step {
        loss: scalar(&out.loss)?,
        grad_norm: sq.sqrt(),
        metrics,
    })
}

/// DPO (sigmoid, beta 0.1, TRL's defaults): policy forward with the adapter, reference forward
/// with adapters off, summed completion log-probabilities, the loss and its backward.
pub fn dpo_step(model: &Llama, t: &Tensors) -> Result<Step> {
    let forward = |adapters_off: bool| -> Result<Tensor> {
        let spec = ForwardSpec {
            logits: true,
            adapters_off,
            train: !adapters_off,
            ..Default::default()
        };
        let out = model.forward(&t.ids, Some(&t.attention), None, &spec)?;
        out.logits.context("no logits")
    };
    let p = token_logps(&forward(false)?, &t.ids, &t.completion)?;
    let r = token_logps(&forward(true)?.detach(), &t.ids, &t.completion)?;
    let b = t.pairs;
    let (pc, pr) = halves(&p.sum, b)?;
    let (rc, rr) = halves(&r.sum.detach(), b)?;
    let (nc, nr) = halves(&p.count, b)?;
    let inputs = DpoInputs::new(pc, pr, rc, rr, nc, nr);
    let out = dpo_loss(&inputs, &DpoConfig::default(), &mut DpoState::default())?;
    finish(model, out)
}

/// ReprPO with the default configuration at progress 0: hidden states of the default layers for
/// the policy and the reference (adapters off), the attention masks, the loss and its backward.
pub fn reprpo_step(model: &Llama, t: &Tensors) -> Result<Step> {
    let cfg = ReprPoConfig::default();
    let layers = cfg.hidden_state_indices(model.num_layers())?;
    let forward = |adapters_off: bool| -> Result<Tensor> {
        let spec = ForwardSpec {
            hidden_layers: layers.iter().map(|&l| l as isize).collect(),
            adapters_off,
            train: !adapters_off,
            ..Default::default()
        };
        let out = model.forward(&t.ids, Some(&t.attention), None, &spec)?;
        let hs: Vec<Tensor> = out.hidden.into_iter().map(|(_, h)| h).collect();
        let idx: Vec<usize> = (0..hs.len()).collect();
        Ok(stack_layers(&hs, &idx)?.to_dtype(DType::F32)?)
    };
    // [layers, 2B, T, hidden]: chosen rows first.
    let rows = |all: &Tensor| -> Result<(Tensor, Tensor)> {
        let b = t.pairs;
        Ok((all.i((.., ..b))?, all.i((.., b..2 * b))?))
    };
    let (pc, pr) = rows(&forward(false)?)?;
    let (rc, rr) = rows(&forward(true)?.detach())?;
    let (mc, mr) = halves(&t.attention, t.pairs)?;
    let inputs = HiddenPairs::new(pc, pr, rc, rr, mc, mr);
    let out = reprpo_loss(&inputs, &cfg, 0.0)?;
    finish(model, out)
}

/// A random `preset` Llama (`LlamaConfig::preset`: tiny, small, ...) with a LoRA (r 16, alpha
/// 16, the seven projections, B random so that the policy differs from the reference) and a
/// batch of `pairs` random pairs of `seq` tokens, the second half of each row the completion:
/// the timing shape of `src/main.rs --preset`.
pub fn random_setup(preset: &str, pairs: usize, seq: usize) -> Result<(Llama, Tensors)> {
    let cfg = reprpo_models::LlamaConfig::preset(preset).context("unknown preset")?;
    let vocab = cfg.vocab_size;
    let mut model = Llama::random(cfg, 0.02, 0, DType::F32, &Device::Cpu)?;
    let lora = peft::AdapterConfig::lora(16, 16.0, &reprpo_models::llama::PROJECTIONS);
    let idx = peft::add_adapter(&mut model, "policy", lora, None, 0)?;
    for (name, v) in peft::adapter_params(&model, idx) {
        if name.contains("lora_B") {
            v.set(&Tensor::randn(
                0f32,
                0.02,
                v.as_tensor().shape(),
                &Device::Cpu,
            )?)?;
        }
    }
    model.adapters.active = Some(idx);
    let rows = 2 * pairs;
    let ids: Vec<u32> = (0..rows * seq)
        .map(|i| ((i as u64 * 2_654_435_761) % vocab as u64) as u32)
        .collect();
    let completion: Vec<u8> = (0..rows * seq)
        .map(|i| u8::from(i % seq >= seq / 2))
        .collect();
    let batch = Batch {
        rows,
        seq_len: seq,
        input_ids: ids,
        attention_mask: vec![1; rows * seq],
        loss_mask: completion,
        prompt_cols: seq / 2,
    };
    Ok((model, Tensors::new(&batch)?))
}

/// Peak resident memory of this process (VmHWM, MiB; Linux), if readable.
pub fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}
