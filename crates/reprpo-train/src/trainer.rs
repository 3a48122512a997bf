//! The training loop: model and data set-up, the optional SFT stage, the preference (or SFT)
//! stage with AdamW, schedules, accumulation and clipping, periodic evaluation, logging,
//! checkpoints, resume, Ctrl-C and the end-of-run summary.
//!
//! # Reproducibility
//! The data order of epoch `e` is a permutation drawn from `StdRng(train.seed + e)`; the adapter
//! init from `adapter.seed`; the random base models from `model.init_seed`. The optimizer state,
//! the step and the adapter are in every checkpoint, so a CPU run that is stopped and resumed
//! ends with the same adapter, bit for bit, as one that was never interrupted (with adapter
//! dropout 0: candle's CPU random numbers cannot be seeded).
//!
//! # Host reads
//! A training step reads nothing back from its device. The metrics are summed there in f64 and
//! read once per `logging_steps` (on the CPU the same bits as host sums); the gradient norm and
//! the clipping coefficient stay there; a non-finite loss or gradient norm is recorded there (the
//! first one: step, what, value) and closes the update gate, so neither the adapter nor the AdamW
//! moments change from that step on. That state is read with the logged metrics, before every
//! checkpoint and evaluation, and at the end: a non-finite value stops the run at the first of
//! these reads with [`TrainError::NonFinite`], naming the step it appeared at and the last
//! checkpoint, which was written before it. The read before a checkpoint also takes the largest
//! magnitude of every parameter and AdamW moment (one transfer): a value above [`EXPLODING`]
//! (1e15) or not finite refuses the checkpoint and stops the run the same way, so every
//! checkpoint named as the last good one holds finite, sane values. On such a stop the trainer
//! prints the usual causes and the ids of the pairs of the bad step (recomputed on the host from
//! the seed and the step: the data order is deterministic). The progress bar shows the last
//! logged loss.
//!
//! # Ctrl-C
//! The stop flag is read at every step boundary, in the SFT stage too. A stop in the main stage
//! saves a checkpoint first; a stop in the SFT stage caches nothing (a partial stage is never
//! reused) and ends the job interrupted at step 0, so `--resume` of that run runs the SFT stage
//! again from the start.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use reprpo_data::Tok;
use reprpo_data::tokenize::TokenizedPair;
use reprpo_losses::dpo::DpoState;
use reprpo_models::adapter::AdapterHost;
use reprpo_models::peft::{self, AdapterConfig};
use reprpo_models::{CausalLm, Llama, LlamaConfig, Phi3};
use serde_json::{Value, json};

use crate::config::{LossFamily, TrainConfig};
use crate::data::{self, DeviceBatch};
use crate::error::{Result, TrainError, io};
use crate::method::MethodSetup;
use crate::metrics::{LogCheck, METRICS, MetricsLog};
use crate::objective::batch_loss;
use crate::optim::{AdamW, AdamWConfig, OptimKind, Schedule, clip_grads_to, global_grad_norm};
use crate::resume::Resume;
use crate::run::{self, TrainerState};

/// A model the trainer can drive: a causal LM whose linear layers take adapters.
pub trait TrainModel: CausalLm + AdapterHost + Send {
    /// As a plain causal LM.
    fn lm(&self) -> &dyn CausalLm;
}

impl TrainModel for Llama {
    fn lm(&self) -> &dyn CausalLm {
        self
    }
}

impl TrainModel for Phi3 {
    fn lm(&self) -> &dyn CausalLm {
        self
    }
}

/// Where the job runs from.
#[derive(Debug, Clone)]
pub struct JobContext {
    /// The recipe folder (`datasets/`).
    pub datasets_dir: PathBuf,
    /// Set to stop at the next step boundary (Ctrl-C): a checkpoint is saved first.
    pub stop: Arc<AtomicBool>,
    /// Draw a progress bar.
    pub progress: bool,
}

/// How a job ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The run folder.
    pub run_dir: PathBuf,
    /// Optimizer steps done.
    pub steps: usize,
    /// Whether it stopped early (Ctrl-C) after saving a checkpoint.
    pub interrupted: bool,
    /// The end-of-run summary (`summary.json`).
    pub summary: BTreeMap<String, Value>,
}

/// Load the base model and its tokenizer (random `tiny`/`small` presets use the byte-level
/// tokenizer).
pub fn load_model(cfg: &TrainConfig) -> Result<(Box<dyn TrainModel>, Tok, Device)> {
    let m = &cfg.model;
    let dtype = match m.dtype.as_str() {
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        _ => DType::F32,
    };
    let device = match m.device.as_str() {
        "cpu" => Device::Cpu,
        d => {
            let n = d
                .strip_prefix("cuda")
                .map(|s| s.trim_start_matches(':'))
                .and_then(|s| {
                    if s.is_empty() {
                        Some(0)
                    } else {
                        s.parse().ok()
                    }
                })
                .ok_or_else(|| TrainError::Config {
                    key: "model.device".into(),
                    problem: format!("expected cpu, cuda or cuda:N, got {d:?}"),
                })?;
            Device::new_cuda(n).map_err(|e| TrainError::Config {
                key: "model.device".into(),
                problem: if cfg!(feature = "cuda") {
                    format!("cannot open CUDA device {n}: {e}")
                } else {
                    format!("{e} (this build has no CUDA: build with --features cuda)")
                },
            })?
        }
    };
    let opts = reprpo_models::LoadOptions {
        dtype,
        device: device.clone(),
        quantize: m.quant_config()?,
    };
    if let Some(preset) = LlamaConfig::preset(&m.name_or_path) {
        let model = Llama::random_with(preset, m.init_std, m.init_seed, &opts)?;
        return Ok((Box::new(model), Tok::byte_level()?, device));
    }
    let dir = reprpo_models::hub::model_dir(&m.name_or_path).map_err(|e| TrainError::Config {
        key: "model.name_or_path".into(),
        problem: format!("{:?}: {e}", m.name_or_path),
    })?;
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(io(&cfg_path))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| TrainError::Malformed {
        path: cfg_path.clone(),
        problem: e.to_string(),
    })?;
    let model_type = v
        .get("model_type")
        .and_then(Value::as_str)
        .unwrap_or("llama");
    // The tokenizer's ids must fit the embedding: checked before the weights load.
    let tok = Tok::from_dir(&dir)?;
    reprpo_models::model::check_vocab_dir(&tok, &dir)?;
    let model: Box<dyn TrainModel> = match model_type {
        "llama" => Box::new(Llama::load_with(&dir, &opts)?),
        "phi3" => Box::new(Phi3::load_with(&dir, &opts)?),
        other => {
            return Err(TrainError::Malformed {
                path: cfg_path,
                problem: format!("model_type {other:?} is not supported (llama, phi3)"),
            });
        }
    };
    Ok((model, tok, device))
}

/// Gradients of `loss`, including those that checkpointed blocks compute in their
/// recomputation ([`reprpo_models::checkpoint::backward`]).
pub fn backward(loss: &Tensor) -> Result<GradStore> {
    Ok(reprpo_models::checkpoint::backward(loss)?)
}

/// Clip `grads` to `max_norm` (0: off) and apply them, all on the device: their norm is
/// watched by `guard` as `what` of optimizer step `step`, and the update is gated by it (a step
/// with a non-finite loss or norm changes nothing). Returns the norm before clipping (an f64
/// scalar on the device; `None` without gradients).
fn clip_and_update(
    opt: &mut AdamW,
    grads: &mut [Option<Tensor>],
    max_norm: f64,
    lr: f64,
    step: usize,
    what: usize,
    guard: &mut NonFiniteGuard,
) -> Result<Option<Tensor>> {
    let norm = global_grad_norm(grads)?;
    if let Some(n) = &norm {
        guard.watch(n, step, what)?;
        clip_grads_to(grads, n, max_norm)?;
    }
    opt.update_gated(grads, lr, Some(guard.gate()))?;
    Ok(norm)
}

/// Add `new` gradients into the accumulated ones.
pub(crate) fn accumulate(grads: &mut [Option<Tensor>], new: Vec<Option<Tensor>>) -> Result<()> {
    for (acc, g) in grads.iter_mut().zip(new) {
        if let Some(g) = g {
            *acc = Some(match acc.take() {
                Some(prev) => (prev + g)?,
                None => g,
            });
        }
    }
    Ok(())
}

/// The dropout seed of global micro-batch `k` of a stage (SplitMix64 of the run seed, the stage
/// and `k`): the same in an interrupted and resumed run as in a straight one.
fn dropout_seed(seed: u64, stage: u64, k: usize) -> u64 {
    let mut z = seed
        .wrapping_add(stage.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .wrapping_add((k as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Metric sums kept on the device in f64 (one vector, in the order of `keys`), read to the
/// host once, when they are logged.
///
/// The host's sums started at `0.0`; these start at the first value, and the read turns a `-0.0`
/// sum into `0.0`: the same bits (the two can differ only in the sign of a zero sum). A key
/// missing from some batches counts 0 there and the mean still divides by every batch, as before.
#[derive(Debug, Default)]
struct DeviceMetrics {
    keys: Vec<String>,
    /// `[keys.len()]` f64.
    sum: Option<Tensor>,
    /// Batches added.
    n: usize,
}

impl DeviceMetrics {
    /// Add one batch's metrics (scalars of any float dtype, converted to f64 on the device).
    fn add(&mut self, m: &BTreeMap<String, Tensor>) -> Result<()> {
        let vals = m
            .values()
            .map(|t| Ok(t.to_dtype(DType::F64)?.reshape(1)?))
            .collect::<Result<Vec<_>>>()?;
        self.add_parts(m.keys().cloned().collect(), &vals)
    }

    /// Add the 1-D f64 `parts`, concatenated, under `keys` (one key per element).
    fn add_parts(&mut self, keys: Vec<String>, parts: &[Tensor]) -> Result<()> {
        self.n += 1;
        if parts.is_empty() {
            return Ok(());
        }
        let v = Tensor::cat(parts, 0)?;
        self.sum = Some(match self.sum.take() {
            None => {
                self.keys = keys;
                v
            }
            Some(s) if self.keys == keys => (s + v)?,
            Some(s) => {
                let mut all = self.keys.clone();
                all.extend(keys.iter().filter(|k| !self.keys.contains(k)).cloned());
                let sum = (align(&s, &self.keys, &all)? + align(&v, &keys, &all)?)?;
                self.keys = all;
                sum
            }
        });
        Ok(())
    }

    /// The means `sum / n` on the device (an f64 division, as the host's), in `keys` order.
    fn mean_on_device(&self) -> Result<Option<Tensor>> {
        let Some(s) = &self.sum else { return Ok(None) };
        Ok(Some(s.div(&s.ones_like()?.affine(self.n as f64, 0.0)?)?))
    }

    /// Read `head` (if any) and the sums in one transfer: `head`'s values and the means by key.
    fn read_back(&self, head: Option<&Tensor>) -> Result<(Vec<f64>, BTreeMap<String, f64>)> {
        let parts: Vec<&Tensor> = head.into_iter().chain(self.sum.as_ref()).collect();
        if parts.is_empty() {
            return Ok((Vec::new(), BTreeMap::new()));
        }
        let all = Tensor::cat(&parts, 0)?.to_vec1::<f64>()?;
        let h = head.map_or(0, Tensor::elem_count).min(all.len());
        let n = self.n.max(1) as f64;
        let means = self
            .keys
            .iter()
            .zip(&all[h..])
            .map(|(k, &s)| {
                let s = if s == 0.0 { 0.0 } else { s };
                (k.clone(), s / n)
            })
            .collect();
        Ok((all[..h].to_vec(), means))
    }
}

/// `v` (`[from.len()]`) in the order of `to` (a superset of `from`), 0 where a key is missing.
fn align(v: &Tensor, from: &[String], to: &[String]) -> Result<Tensor> {
    let zero = v.narrow(0, 0, 1)?.zeros_like()?;
    let parts = to
        .iter()
        .map(|k| match from.iter().position(|f| f == k) {
            Some(i) => v.narrow(0, i, 1),
            None => Ok(zero.clone()),
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::cat(&parts, 0)?)
}

/// Non-finite values of the training steps, watched on the device. The first bad one (its
/// optimizer step, what it was, its value) is kept there and closes the update gate from that
/// step on, so the parameters and the AdamW moments keep their last finite values. The host
/// reads the state only when it must know: with the metrics at each logged step, before a
/// checkpoint or an evaluation, and at the end; then it stops with [`TrainError::NonFinite`].
struct NonFiniteGuard {
    /// `[3]` f64: the first bad optimizer step (1-based; 0 while there is none), the index of
    /// what it was in `whats`, its value.
    first: Tensor,
    /// `[1]` u8: 1 while every watched value was finite (the update gate).
    ok: Tensor,
    /// `[1]` f64 1: constants are made from it with `affine` (no upload).
    one: Tensor,
    /// `[1]` f64 `f64::MAX`: `|x| <= MAX` is false exactly for NaN and the infinities.
    max: Tensor,
    /// The names of what is watched (`loss`, `gradient norm`).
    whats: &'static [&'static str],
    /// Whether anything was watched since the host last read the state.
    unread: bool,
}

impl NonFiniteGuard {
    fn new(device: &Device, whats: &'static [&'static str]) -> Result<Self> {
        let one = Tensor::ones(1, DType::F64, device)?;
        Ok(NonFiniteGuard {
            first: Tensor::zeros(3, DType::F64, device)?,
            ok: Tensor::ones(1, DType::U8, device)?,
            max: one.affine(f64::MAX, 0.0)?,
            one,
            whats,
            unread: false,
        })
    }

    /// `[1]` f64 `v` on the device (exact: `1 * v + 0`).
    fn constant(&self, v: f64) -> Result<Tensor> {
        Ok(self.one.affine(v, 0.0)?)
    }

    /// Watch `x` (a scalar of any float dtype) of optimizer step `step` (1-based) as
    /// `whats[what]`.
    fn watch(&mut self, x: &Tensor, step: usize, what: usize) -> Result<()> {
        let x = x.to_dtype(DType::F64)?.reshape(1)?;
        let finite = x.abs()?.le(&self.max)?;
        let seen = Tensor::cat(
            &[self.constant(step as f64)?, self.constant(what as f64)?, x],
            0,
        )?;
        // The first bad value: all finite so far (ok = 1) and this one not (finite = 0).
        let first_bad = self.ok.gt(&finite)?.broadcast_as(3)?;
        self.first = first_bad.where_cond(&seen, &self.first)?;
        self.ok = self.ok.minimum(&finite)?;
        self.unread = true;
        Ok(())
    }

    /// The update gate: a `[1]` u8, 1 while every watched value was finite.
    fn gate(&self) -> &Tensor {
        &self.ok
    }

    /// Judge the state as read by the host (`[step, what, value]`): the error naming the first
    /// non-finite value and `last_checkpoint` (written before it, since every checkpoint is
    /// preceded by a check), if there was one.
    fn judge(&mut self, state: &[f64], last_checkpoint: Option<&Path>) -> Result<()> {
        self.unread = false;
        match state {
            &[step, what, value] if step > 0.0 => Err(TrainError::NonFinite {
                step: step as usize,
                what: self.whats.get(what as usize).copied().unwrap_or("value"),
                value,
                last_checkpoint: last_checkpoint.map(Path::to_path_buf),
                hint: String::new(),
            }),
            _ => Ok(()),
        }
    }

    /// Read the state (only when something was watched since the last read) and judge it.
    fn check_finite(&mut self, last_checkpoint: Option<&Path>) -> Result<()> {
        if !self.unread {
            return Ok(());
        }
        let state = self.first.to_vec1::<f64>()?;
        self.judge(&state, last_checkpoint)
    }

    /// Before a checkpoint of `step`: read the state and the largest magnitude of every
    /// parameter and AdamW moment of `opt` in one transfer, and refuse (with
    /// [`TrainError::NonFinite`]) a non-finite state or any magnitude above [`EXPLODING`].
    fn check_before_save(
        &mut self,
        opt: &AdamW,
        step: usize,
        last_checkpoint: Option<&Path>,
    ) -> Result<()> {
        let Some((names, mags)) = opt.magnitudes()? else {
            return self.check_finite(last_checkpoint);
        };
        let all = Tensor::cat(&[&self.first, &mags], 0)?.to_vec1::<f64>()?;
        let (state, mags) = all.split_at(3.min(all.len()));
        self.judge(state, last_checkpoint)?;
        let bad = mags
            .iter()
            .zip(&names)
            .find(|(v, _)| !v.is_finite() || v.abs() > EXPLODING);
        match bad {
            Some((&value, name)) => Err(TrainError::NonFinite {
                step,
                what: "largest magnitude among the parameters and AdamW moments",
                value,
                last_checkpoint: last_checkpoint.map(Path::to_path_buf),
                hint: format!(" Its checkpoint was refused; the tensor: {name}."),
            }),
            None => Ok(()),
        }
    }

    /// The means of `metrics`, read with the state in one transfer, after judging the state.
    fn read_means(
        &mut self,
        metrics: &DeviceMetrics,
        last_checkpoint: Option<&Path>,
    ) -> Result<BTreeMap<String, f64>> {
        let (state, means) = metrics.read_back(Some(&self.first))?;
        self.judge(&state, last_checkpoint)?;
        Ok(means)
    }
}

/// What the main stage's guard watches, by index: the loss of each micro-batch, then the
/// gradient norm of the step.
const WATCHED: &[&str] = &["loss", "gradient norm"];
/// Index of the loss in [`WATCHED`].
const LOSS: usize = 0;
/// Index of the gradient norm in [`WATCHED`].
const GRAD_NORM: usize = 1;

/// One optimizer step's entry in the logging window: the means of its micro-batches' metrics,
/// its gradient norm (0 without gradients) and its learning rate, as one f64 vector.
fn add_step(
    window: &mut DeviceMetrics,
    micro: &DeviceMetrics,
    norm: Option<&Tensor>,
    lr: f64,
    guard: &NonFiniteGuard,
) -> Result<()> {
    let mut keys = micro.keys.clone();
    let mut parts: Vec<Tensor> = micro.mean_on_device()?.into_iter().collect();
    if parts.is_empty() {
        keys.clear();
    }
    keys.extend(["grad_norm".to_string(), "learning_rate".to_string()]);
    parts.push(match norm {
        Some(n) => n.reshape(1)?,
        None => guard.constant(0.0)?,
    });
    parts.push(guard.constant(lr)?);
    window.add_parts(keys, &parts)
}

/// The micro-batches of an epoch: a seeded permutation cut into `bs`-sized chunks.
fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut rand::rngs::StdRng::seed_from_u64(
        seed.wrapping_add(epoch as u64),
    ));
    idx
}

/// The pairs of global micro-batch `k`.
fn micro_batch<'a>(
    pairs: &'a [TokenizedPair],
    bs: usize,
    seed: u64,
    k: usize,
    cache: &mut Option<(usize, Vec<usize>)>,
) -> Vec<&'a TokenizedPair> {
    micro_batch_indices(pairs.len(), bs, seed, k, cache)
        .into_iter()
        .filter_map(|i| pairs.get(i))
        .collect()
}

/// The indices (into the `n` training pairs) of global micro-batch `k`: the data order is a
/// function of the seed and `k` only, so the host can name the pairs of any step afterwards.
fn micro_batch_indices(
    n: usize,
    bs: usize,
    seed: u64,
    k: usize,
    cache: &mut Option<(usize, Vec<usize>)>,
) -> Vec<usize> {
    let per_epoch = n.div_ceil(bs).max(1);
    let (epoch, j) = (k / per_epoch, k % per_epoch);
    if cache.as_ref().is_none_or(|(e, _)| *e != epoch) {
        *cache = Some((epoch, epoch_order(n, seed, epoch)));
    }
    let order = cache.as_ref().map(|(_, o)| o.as_slice()).unwrap_or(&[]);
    order
        .get(j * bs..((j + 1) * bs).min(order.len()))
        .unwrap_or(&[])
        .to_vec()
}

/// The largest magnitude a parameter or an AdamW moment may have when a checkpoint is saved:
/// above it (or non-finite) the values are "exploding", the checkpoint is refused and the run
/// stops with [`TrainError::NonFinite`] (no sane adapter weight or moment comes near 1e15,
/// while f32 arithmetic on such values overflows within a few steps).
pub const EXPLODING: f64 = 1e15;

/// The ids of the training pairs optimizer step `step` (1-based) took, in order.
fn step_pair_ids(
    ids: &[String],
    bs: usize,
    grad_accum: usize,
    seed: u64,
    step: usize,
) -> Vec<String> {
    let mut cache = None;
    (0..grad_accum)
        .flat_map(|a| {
            let k = step.saturating_sub(1) * grad_accum + a;
            micro_batch_indices(ids.len(), bs, seed, k, &mut cache)
        })
        .filter_map(|i| ids.get(i).cloned())
        .collect()
}

/// Add to a [`TrainError::NonFinite`] stop the usual causes and the pairs of its step.
fn explain_non_finite(mut e: TrainError, pair_ids: &dyn Fn(usize) -> Vec<String>) -> TrainError {
    if let TrainError::NonFinite { step, hint, .. } = &mut e {
        *hint = format!(
            "{hint} Usual causes: a learning rate too high (train.lr), bf16/f16 overflow (try \
             model.dtype=\"f32\"), or a bad batch: step {step} took the pairs [{}].",
            pair_ids(*step).join(", ")
        );
    }
    e
}

/// The ids of the pairs of `raw` that survived tokenisation (all but `dropped`), in order: the
/// ids of the tokenised pairs, index for index.
fn kept_ids(raw: &[reprpo_data::PreferencePair], dropped: &[String]) -> Vec<String> {
    let mut left: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for d in dropped {
        *left.entry(d.as_str()).or_default() += 1;
    }
    raw.iter()
        .filter(|p| match left.get_mut(p.id.as_str()) {
            Some(n) if *n > 0 => {
                *n -= 1;
                false
            }
            _ => true,
        })
        .map(|p| p.id.clone())
        .collect()
}

/// The learning-rate plan of the main stage.
struct Plan {
    lr: f64,
    batch_size: usize,
    total: usize,
    warmup: usize,
    schedule: Schedule,
}

/// Train, or resume the run in `resume`. Returns where the run is and how it ended.
///
/// The job runs on a thread of candle's CPU pool (`Device::with_context`; a no-op when the caller
/// is already there), so that the parallel parts of every op share that pool's threads instead of
/// the calling thread handing each one over and waiting (docs/perf.md: 1.5x on a tiny LoRA step).
///
/// With `resume`, `cfg` is not used: this is [`resume`] with no overrides.
pub fn train(cfg: &TrainConfig, ctx: &JobContext, resume: Option<&Path>) -> Result<Outcome> {
    match resume {
        Some(target) => self::resume(ctx, target, &[]),
        None => Device::Cpu.with_context(|| train_job(cfg, ctx, None)),
    }
}

/// Continue the run of `target` (`RUN` or `RUN/checkpoints/step-N`) with its own configuration
/// and the `key=value` `overrides` allowed on resume: see [`crate::resume`](mod@crate::resume) for the checks (the
/// checkpoint's manifest, the configuration's hash) and what may change.
pub fn resume(ctx: &JobContext, target: &Path, overrides: &[String]) -> Result<Outcome> {
    let r = crate::resume::prepare(target, overrides)?;
    Device::Cpu.with_context(|| train_job(&r.cfg, ctx, Some(&r)))
}

/// What a job trains and evaluates on, loaded and validated before its run folder exists.
struct Inputs {
    model: Box<dyn TrainModel>,
    tok: Tok,
    device: Device,
    train_pairs: Vec<TokenizedPair>,
    /// The id of each training pair (for naming the pairs of a bad step).
    train_ids: Vec<String>,
    eval_pairs: Vec<TokenizedPair>,
    ood_pairs: Vec<TokenizedPair>,
    /// The run's method (`LossFamily::Method`): collection, transform and loss, resolved and
    /// checked against the model before any data is read.
    method: Option<MethodSetup>,
}

/// Load the model and every dataset of `cfg`, and check them against each other.
fn load_inputs(cfg: &TrainConfig, ctx: &JobContext) -> Result<Inputs> {
    let (model, tok, device) = load_model(cfg)?;
    cfg.validate_for_model(model.num_layers())?;
    let method = match cfg.family()? {
        LossFamily::Method => Some(MethodSetup::new(cfg, model.as_ref())?),
        _ => None,
    };
    let tcfg = cfg.tokenize_config();
    let mut train_raw = data::load_pairs(&cfg.data.datasets, &ctx.datasets_dir, cfg.train.seed)?;
    let held_out = data::hold_out(&mut train_raw, cfg.data.eval_split, cfg.train.seed);
    if let Some(n) = cfg.data.n_train {
        train_raw.truncate(n);
    }
    let tokenized = reprpo_data::tokenize::tokenize_pairs(&tok, &train_raw, &tcfg)?;
    let train_ids = kept_ids(&train_raw, &tokenized.dropped);
    if tokenized.pairs.is_empty() {
        return Err(TrainError::Config {
            key: "data.datasets".into(),
            problem: "no training pair survived tokenisation".into(),
        });
    }
    let load_other = |names: &[String]| -> Result<Vec<TokenizedPair>> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let raw = data::load_pairs(names, &ctx.datasets_dir, cfg.train.seed)?;
        data::tokenize(&tok, &raw, &tcfg)
    };
    let eval_pairs = if held_out.is_empty() {
        load_other(&cfg.data.eval_datasets)?
    } else {
        data::tokenize(&tok, &held_out, &tcfg)?
    };
    let ood_pairs = load_other(&cfg.data.ood_datasets)?;
    Ok(Inputs {
        model,
        tok,
        device,
        train_pairs: tokenized.pairs,
        train_ids,
        eval_pairs,
        ood_pairs,
        method,
    })
}

/// A new run folder for `cfg`, holding its `resolved_config.toml`.
fn create_run_dir(cfg: &TrainConfig) -> Result<PathBuf> {
    let dir = run::new_run_dir(&cfg.run.out_dir, &cfg.run_name())?;
    run::write_atomic(&dir.join("resolved_config.toml"), cfg.to_toml()?.as_bytes())?;
    Ok(dir)
}

fn train_job(cfg: &TrainConfig, ctx: &JobContext, resume: Option<&Resume>) -> Result<Outcome> {
    let cfg = resume.map_or_else(|| cfg.clone(), |r| r.cfg.clone());
    let family = cfg.family()?;
    // Everything is loaded and checked before a new run folder is created: a job that fails
    // on its inputs leaves nothing behind.
    let mut inputs = load_inputs(&cfg, ctx)?;
    let run_dir = match resume {
        Some(r) => r.run_dir.clone(),
        None => create_run_dir(&cfg)?,
    };
    let Some(stage_scores) = sft_phase(&cfg, ctx, &run_dir, &mut inputs, family)? else {
        return Ok(stopped_in_sft_stage(run_dir));
    };
    // Base scores for the summary, before any adapter exists.
    let base_scores = inputs.scores(&cfg, true)?;
    let mut stage = Stage::start(&cfg, family, inputs, resume, run_dir, ctx.progress)?;
    let interrupted = stage.run(ctx)?;
    stage.finish(interrupted, stage_scores, base_scores)
}

/// The evaluation the summary reports, with the model as it is: the held-out pairs (the training
/// pairs when there are none) at progress 1. Run before the first step too, so that the summary
/// shows the objective before and after.
fn final_evaluation(
    cfg: &TrainConfig,
    family: LossFamily,
    inputs: &Inputs,
    dpo_state: &DpoState,
) -> Result<BTreeMap<String, f64>> {
    let pairs = if inputs.eval_pairs.is_empty() {
        &inputs.train_pairs
    } else {
        &inputs.eval_pairs
    };
    evaluate(
        inputs.model.lm(),
        cfg,
        family,
        pairs,
        &inputs.tok,
        &inputs.device,
        1.0,
        dpo_state,
        inputs.method.as_ref(),
    )
}

/// Scores of one stage for the summary: `(stage name, preference_scores)`.
type StageScores = Vec<(&'static str, BTreeMap<String, f64>)>;

impl Inputs {
    /// The held-out preference scores of the model as it is (`adapters_off`: of its base).
    fn scores(&self, cfg: &TrainConfig, adapters_off: bool) -> Result<BTreeMap<String, f64>> {
        preference_scores(
            self.model.lm(),
            &self.tok,
            &self.eval_pairs,
            &self.ood_pairs,
            cfg,
            &self.device,
            adapters_off,
        )
    }
}

/// The SFT stage when the configuration has one (cached by its settings), folded into the base,
/// with the random base's scores before it; `None` when Ctrl-C stopped it.
fn sft_phase(
    cfg: &TrainConfig,
    ctx: &JobContext,
    run_dir: &Path,
    inputs: &mut Inputs,
    family: LossFamily,
) -> Result<Option<StageScores>> {
    if cfg.sft_steps() == 0 || family == LossFamily::Sft {
        return Ok(Some(Vec::new()));
    }
    let random_base = inputs.scores(cfg, true)?;
    let Some(dir) = sft_stage(cfg, ctx, run_dir, inputs)? else {
        return Ok(None);
    };
    peft::bake_adapter(inputs.model.as_mut(), &dir)?;
    let dst = run_dir.join("sft_adapter");
    if !dst.join("adapter_model.safetensors").exists() {
        copy_adapter(&dir, &dst)?;
    }
    Ok(Some(vec![("random_base", random_base)]))
}

/// Add the trained adapter `policy` to `model` and make it active: the checkpoint's when
/// resuming, `adapter.init_from`'s, or a fresh one from the `[adapter]` table. With
/// `adapter.reference = "initial"` the reference model is a frozen copy of the adapter the run
/// started from (see [`attach_reference`]).
fn attach_adapter(
    cfg: &TrainConfig,
    model: &mut dyn TrainModel,
    checkpoint: Option<&Path>,
) -> Result<usize> {
    let idx = if let Some(ck) = checkpoint {
        peft::load_adapter(model, &ck.join("adapter"), "policy")?
    } else if let Some(dir) = &cfg.adapter.init_from {
        peft::load_adapter(model, dir, "policy")?
    } else {
        let config_err = |e: reprpo_models::ModelError| TrainError::Config {
            key: "adapter".into(),
            problem: e.to_string(),
        };
        let ac = AdapterConfig::from_json(cfg.adapter.peft_json(), Path::new("(config [adapter])"))
            .map_err(config_err)?;
        peft::add_adapter(model, "policy", ac, None, cfg.adapter.seed).map_err(config_err)?
    };
    model.adapter_set_mut().active = Some(idx);
    if cfg.adapter.reference_is_initial() && cfg.family()? != LossFamily::Sft {
        attach_reference(model, idx, checkpoint)?;
    }
    Ok(idx)
}

/// The frozen initial adapter (`REFERENCE`), the reference of `adapter.reference = "initial"`:
/// a copy of the policy as it starts (index `policy`), or, when resuming, the copy the checkpoint
/// keeps in `reference_adapter/` (the policy there has moved on).
fn attach_reference(
    model: &mut dyn TrainModel,
    policy: usize,
    checkpoint: Option<&Path>,
) -> Result<()> {
    match checkpoint {
        None => {
            peft::add_frozen_copy(model, policy, REFERENCE)?;
        }
        Some(ck) => {
            let dir = ck.join(run::REFERENCE_DIR);
            if !dir.join("adapter_config.json").is_file() {
                return Err(TrainError::Config {
                    key: "adapter.reference".into(),
                    problem: format!(
                        "is \"initial\" but checkpoint {} keeps no {}/ (written by a run \
                         whose reference was the base?)",
                        ck.display(),
                        run::REFERENCE_DIR
                    ),
                });
            }
            let idx = peft::load_adapter(model, &dir, REFERENCE)?;
            model.adapter_set_mut().reference = Some(idx);
        }
    }
    Ok(())
}

/// The name of the frozen initial adapter in the model's adapter set.
const REFERENCE: &str = "reference";

/// The stage's steps and learning-rate plan for `n_pairs` training pairs; also the optimizer
/// steps per epoch.
fn plan(cfg: &TrainConfig, n_pairs: usize) -> Result<(Plan, usize)> {
    let bs = cfg.train.batch_size;
    let steps_per_epoch = n_pairs.div_ceil(bs).div_ceil(cfg.train.grad_accum).max(1);
    let total = cfg
        .train
        .max_steps
        .unwrap_or(steps_per_epoch * cfg.train.epochs);
    let warmup = if cfg.train.warmup_steps > 0 {
        cfg.train.warmup_steps
    } else {
        (cfg.train.warmup_ratio * total as f64).ceil() as usize
    };
    let plan = Plan {
        lr: cfg.train.lr,
        batch_size: bs,
        total,
        warmup,
        schedule: Schedule::parse(&cfg.train.schedule)?,
    };
    Ok((plan, steps_per_epoch))
}

/// Restore the optimizer moments and bco_pair's running moments of checkpoint `ck`; returns its
/// state.
fn restore(
    ck: &Path,
    opt: &mut AdamW,
    dpo_state: &mut DpoState,
    device: &Device,
) -> Result<TrainerState> {
    let (state, moments) = run::load_checkpoint(ck)?;
    opt.load_state(
        &moments,
        state.step,
        &ck.join("optimizer.safetensors"),
        device,
    )?;
    if let Some((mean, var, count)) = state.running {
        dpo_state.running.mean = mean;
        dpo_state.running.var = var;
        dpo_state.running.std = var.sqrt();
        dpo_state.running.count = count;
    }
    Ok(state)
}

/// The run's metrics log: new, or checked against checkpoint `ck` (and rebuilt from it when
/// damaged) when resuming from step `start`; with its TensorBoard twin when asked for.
fn open_log(
    cfg: &TrainConfig,
    run_dir: &Path,
    ck: Option<&Path>,
    start: usize,
) -> Result<MetricsLog> {
    let log_path = run_dir.join(METRICS);
    let mut log = match ck {
        Some(ck) => {
            let (log, check) = MetricsLog::resume(&log_path, ck, start)?;
            if check != LogCheck::Intact {
                eprintln!("resume: {check}");
            }
            log
        }
        None => MetricsLog::create(&log_path)?,
    };
    if cfg.run.tensorboard {
        log.tensorboard(&run_dir.join(crate::tensorboard::TB_DIR), start)?;
    }
    Ok(log)
}

/// The preference (or SFT) stage of a job: the model with its adapter, the optimizer, and what
/// the loop carries from step to step.
struct Stage<'a> {
    cfg: &'a TrainConfig,
    family: LossFamily,
    inputs: Inputs,
    run_dir: PathBuf,
    config_hash: String,
    opt: AdamW,
    plan: Plan,
    steps_per_epoch: usize,
    dpo_state: DpoState,
    log: MetricsLog,
    bar: Option<indicatif::ProgressBar>,
    /// Device-side sums of the metrics since the last logged step.
    window: DeviceMetrics,
    /// The memory samples of the logged records.
    memory: crate::memory::MemoryLog,
    guard: NonFiniteGuard,
    order_cache: Option<(usize, Vec<usize>)>,
    last_ckpt: Option<PathBuf>,
    /// The final evaluation's metrics before the first step (kept in checkpoints).
    initial_eval: Option<BTreeMap<String, f64>>,
    /// Optimizer steps done.
    step: usize,
}

impl<'a> Stage<'a> {
    /// Attach the adapter, build the optimizer and the plan, and restore the checkpoint when
    /// resuming (after [`Resume::begin`] has checked the run's total against it).
    fn start(
        cfg: &'a TrainConfig,
        family: LossFamily,
        mut inputs: Inputs,
        resume: Option<&Resume>,
        run_dir: PathBuf,
        progress: bool,
    ) -> Result<Self> {
        let ck = resume.and_then(|r| r.checkpoint.as_ref().map(|c| c.dir.clone()));
        let idx = attach_adapter(cfg, inputs.model.as_mut(), ck.as_deref())?;
        let mut params = peft::adapter_params(inputs.model.as_ref(), idx);
        if let Some(m) = &inputs.method {
            if let Some(ck) = &ck {
                m.load(ck)?;
            }
            params.extend(m.params());
        }
        let mut opt = AdamW::with_kind(
            params,
            AdamWConfig {
                beta1: cfg.train.adam_beta1,
                beta2: cfg.train.adam_beta2,
                eps: cfg.train.adam_eps,
                weight_decay: cfg.train.weight_decay,
            },
            OptimKind::parse(&cfg.train.optim)?,
        )?;
        let (plan, steps_per_epoch) = plan(cfg, inputs.train_pairs.len())?;
        if let Some(r) = resume {
            r.begin(plan.total)?;
        }
        let mut dpo_state = DpoState::default();
        let (step, initial_eval) = match &ck {
            Some(ck) => {
                let state = restore(ck, &mut opt, &mut dpo_state, &inputs.device)?;
                (state.step, state.initial_eval)
            }
            None => (0, Some(final_evaluation(cfg, family, &inputs, &dpo_state)?)),
        };
        let log = open_log(cfg, &run_dir, ck.as_deref(), step)?;
        let guard = NonFiniteGuard::new(&inputs.device, WATCHED)?;
        Ok(Stage {
            cfg,
            family,
            bar: progress_bar(progress, plan.total as u64, step as u64),
            config_hash: crate::resume::config_hash(cfg)?,
            inputs,
            run_dir,
            opt,
            plan,
            steps_per_epoch,
            dpo_state,
            log,
            window: DeviceMetrics::default(),
            memory: Default::default(),
            guard,
            order_cache: None,
            last_ckpt: ck,
            initial_eval,
            step,
        })
    }

    /// A non-finite stop, with the ids of the pairs of the step it names.
    fn explain(&self, e: TrainError) -> TrainError {
        let t = &self.cfg.train;
        let ids = &self.inputs.train_ids;
        explain_non_finite(e, &|s| {
            step_pair_ids(ids, t.batch_size, t.grad_accum, t.seed, s)
        })
    }

    /// Print a line above the progress bar (or plainly without one).
    fn say(&self, line: String) {
        match &self.bar {
            Some(b) => b.println(line),
            None => println!("{line}"),
        }
    }

    /// Steps until the total or a stop; `Ok(true)` when Ctrl-C stopped the stage (after its
    /// checkpoint).
    fn run(&mut self, ctx: &JobContext) -> Result<bool> {
        let total = self.plan.total;
        let mut interrupted = false;
        while self.step < total {
            self.optimizer_step()?;
            let step = self.step;
            if step.is_multiple_of(self.cfg.train.logging_steps) || step == total {
                self.log_window()?;
            }
            if self.cfg.train.eval_every > 0
                && step.is_multiple_of(self.cfg.train.eval_every)
                && step < total
            {
                self.evaluate_now()?;
            }
            let stop = ctx.stop.load(Ordering::SeqCst);
            let save_steps = self.cfg.run.save_steps;
            if (save_steps > 0 && step.is_multiple_of(save_steps)) || step == total || stop {
                self.save()?;
            }
            if stop && step < total {
                interrupted = true;
                break;
            }
        }
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        let last = self.last_ckpt.clone();
        self.guard
            .check_finite(last.as_deref())
            .map_err(|e| self.explain(e))?;
        Ok(interrupted)
    }

    /// One optimizer step: `grad_accum` micro-batches, their gradients summed, clipped, applied.
    fn optimizer_step(&mut self) -> Result<()> {
        let (cfg, step) = (self.cfg, self.step);
        let plan = &self.plan;
        let lr = plan.schedule.lr(
            plan.lr,
            step,
            plan.total,
            plan.warmup,
            cfg.train.decay_ratio,
        );
        let progress = step as f64 / plan.total.max(1) as f64;
        let mut grads: Vec<Option<Tensor>> = vec![None; self.opt.params().len()];
        let mut micro = DeviceMetrics::default();
        let inputs = &self.inputs;
        for a in 0..cfg.train.grad_accum {
            let k = step * cfg.train.grad_accum + a;
            let chunk = micro_batch(
                &inputs.train_pairs,
                plan.batch_size,
                cfg.train.seed,
                k,
                &mut self.order_cache,
            );
            let batch = match self.family {
                LossFamily::Sft => data::chosen_batch(&chunk, inputs.tok.pad, &inputs.device)?,
                _ => data::pair_batch(&chunk, inputs.tok.pad, &inputs.device)?,
            };
            let out = batch_loss(
                inputs.model.lm(),
                cfg,
                self.family,
                &batch,
                progress,
                &mut self.dpo_state,
                true,
                Some(dropout_seed(cfg.train.seed, 1, k)),
                inputs.method.as_ref(),
            )?;
            self.guard.watch(&out.loss, step + 1, LOSS)?;
            let scaled = (out.loss / cfg.train.grad_accum as f64)?;
            let new = self.opt.gradients(&backward(&scaled)?);
            let mut metrics = out.metrics;
            let params = self.opt.params();
            crate::gradproj::accumulate(
                out.gradproj.as_ref(),
                &mut grads,
                new,
                params,
                &mut metrics,
            )?;
            micro.add(&metrics)?;
        }
        let norm = clip_and_update(
            &mut self.opt,
            &mut grads,
            cfg.train.max_grad_norm,
            lr,
            step + 1,
            GRAD_NORM,
            &mut self.guard,
        )?;
        self.step += 1;
        add_step(&mut self.window, &micro, norm.as_ref(), lr, &self.guard)?;
        if let Some(b) = &self.bar {
            b.set_position(self.step as u64);
        }
        Ok(())
    }

    /// Log the window's means (the one read of the window: its metrics and the non-finite
    /// state) and start a new window.
    fn log_window(&mut self) -> Result<()> {
        let step = self.step;
        let last = self.last_ckpt.clone();
        let mean = self
            .guard
            .read_means(&self.window, last.as_deref())
            .map_err(|e| self.explain(e))?;
        if let (Some(b), Some(l)) = (&self.bar, mean.get("loss")) {
            b.set_message(format!("loss {l:.4}"));
        }
        let mut rec: BTreeMap<String, Value> =
            mean.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
        rec.insert("step".into(), json!(step));
        rec.insert(
            "epoch".into(),
            json!(step as f64 / self.steps_per_epoch as f64),
        );
        let memory = self.memory.sample(&self.inputs.device);
        if self.cfg.run.log_memory {
            rec.extend(memory);
        }
        self.log.write(&rec)?;
        self.say(format_log(step, self.plan.total, &mean));
        self.window = DeviceMetrics::default();
        Ok(())
    }

    /// The periodic evaluation on the held-out pairs (and samples when asked for).
    fn evaluate_now(&mut self) -> Result<()> {
        let inputs = &self.inputs;
        if inputs.eval_pairs.is_empty() {
            return Ok(());
        }
        let step = self.step;
        let last = self.last_ckpt.clone();
        self.guard
            .check_finite(last.as_deref())
            .map_err(|e| self.explain(e))?;
        let progress = step as f64 / self.plan.total.max(1) as f64;
        let em = evaluate(
            inputs.model.lm(),
            self.cfg,
            self.family,
            &inputs.eval_pairs,
            &inputs.tok,
            &inputs.device,
            progress,
            &self.dpo_state,
            inputs.method.as_ref(),
        )?;
        let mut rec: BTreeMap<String, Value> = em
            .iter()
            .map(|(k, v)| (format!("eval_{k}"), json!(v)))
            .collect();
        rec.insert("step".into(), json!(step));
        self.log.write(&rec)?;
        let total = self.plan.total;
        self.say(format!("step {step}/{total} eval: {}", short_metrics(&em)));
        if self.cfg.train.n_samples > 0 {
            let n = self.cfg.train.n_samples;
            for s in samples(inputs.model.lm(), &inputs.tok, &inputs.eval_pairs, n)? {
                println!("  sample: {s}");
            }
        }
        Ok(())
    }

    /// A checkpoint of the current step (after checking that what it saves is finite and sane).
    fn save(&mut self) -> Result<()> {
        let step = self.step;
        let last = self.last_ckpt.clone();
        self.guard
            .check_before_save(&self.opt, step, last.as_deref())
            .map_err(|e| self.explain(e))?;
        let running = &self.dpo_state.running;
        let state = TrainerState {
            step,
            total_steps: self.plan.total,
            running: self.cfg.dpo.bco_running_mean.then_some((
                running.mean,
                running.var,
                running.count,
            )),
            config_hash: Some(self.config_hash.clone()),
            initial_eval: self.initial_eval.clone(),
        };
        let model_ref: &dyn AdapterHost = self.inputs.model.as_ref();
        let method = self.inputs.method.as_ref();
        self.last_ckpt = Some(run::save_checkpoint(
            &self.run_dir,
            &state,
            &self.opt.state(),
            self.cfg.run.save_total_limit,
            &self.log.upto(step),
            |dir| {
                save_adapters(model_ref, dir)?;
                match method {
                    Some(m) => m.save(dir.parent().unwrap_or(dir)),
                    None => Ok(()),
                }
            },
        )?);
        Ok(())
    }

    /// The end of the job: the summary (and, unless interrupted, the final adapter, the merged
    /// model of a full fine-tune, the final evaluation, the adapter's scores, summary.json and
    /// the plots).
    fn finish(
        mut self,
        interrupted: bool,
        stage_scores: StageScores,
        base_scores: BTreeMap<String, f64>,
    ) -> Result<Outcome> {
        let cfg = self.cfg;
        let mut summary = BTreeMap::new();
        summary.insert("run_dir".into(), json!(self.run_dir.display().to_string()));
        summary.insert("steps".into(), json!(self.step));
        summary.insert("total_steps".into(), json!(self.plan.total));
        summary.insert("interrupted".into(), json!(interrupted));
        summary.insert("reference".into(), json!(cfg.adapter.reference));
        summary.extend(self.memory.sample(&self.inputs.device));
        summary.insert("optimizer".into(), json!(cfg.train.optim));
        summary.insert(
            "optimizer_state_bytes".into(),
            json!(self.opt.state_bytes()),
        );
        let n_eval = self.inputs.eval_pairs.len();
        summary.insert("data/id".into(), json!(scored_sets(cfg, n_eval)));
        summary.insert("data/ood".into(), json!(cfg.data.ood_datasets.join(", ")));
        if !interrupted {
            self.write_results(&mut summary, stage_scores, base_scores)?;
        }
        Ok(Outcome {
            run_dir: self.run_dir,
            steps: self.step,
            interrupted,
            summary,
        })
    }

    /// The final adapter (and merged model), the final evaluation and scores into `summary`,
    /// then summary.json and the plots.
    fn write_results(
        &self,
        summary: &mut BTreeMap<String, Value>,
        stage_scores: StageScores,
        base_scores: BTreeMap<String, f64>,
    ) -> Result<()> {
        let (cfg, inputs, run_dir) = (self.cfg, &self.inputs, &self.run_dir);
        peft::save_adapter(inputs.model.as_ref(), "policy", &run_dir.join("adapter"))?;
        if let Some(m) = &inputs.method {
            m.save(run_dir)?;
        }
        // A full fine-tune of a model read from a folder also gets a plain Hugging Face folder
        // with the weights merged (the random presets have no base files to copy).
        if cfg.adapter.kind == "full" && LlamaConfig::preset(&cfg.model.name_or_path).is_none() {
            let base = reprpo_models::hub::model_dir(&cfg.model.name_or_path).map_err(|e| {
                TrainError::Config {
                    key: "model.name_or_path".into(),
                    problem: format!("{:?}: {e}", cfg.model.name_or_path),
                }
            })?;
            let merged = run_dir.join("merged");
            peft::export_merged(inputs.model.as_ref(), "policy", &base, &merged)?;
            summary.insert("merged_model".into(), json!(merged));
        }
        let fin = final_evaluation(cfg, self.family, inputs, &self.dpo_state)?;
        let initial = self.initial_eval.iter().flatten();
        for (prefix, (k, v)) in initial
            .map(|kv| ("initial_eval", kv))
            .chain(fin.iter().map(|kv| ("final_eval", kv)))
        {
            summary.insert(format!("{prefix}/{k}"), json!(v));
        }
        let trained = inputs.scores(cfg, false)?;
        let stages = stage_scores
            .into_iter()
            .chain([("base", base_scores), ("adapter", trained)]);
        for (stage, scores) in stages {
            for (k, v) in scores {
                summary.insert(format!("{stage}/{k}"), json!(v));
            }
        }
        let path = run_dir.join("summary.json");
        let text = serde_json::to_string_pretty(&summary).map_err(|e| TrainError::Malformed {
            path: path.clone(),
            problem: e.to_string(),
        })?;
        run::write_atomic(&path, text.as_bytes())?;
        if cfg.run.plots {
            crate::plots::write_plots(run_dir)?;
        }
        Ok(())
    }
}

/// A checkpoint's adapters: the policy in `dir` (`<checkpoint>/adapter`) and, when the reference
/// is the frozen initial adapter, that one beside it in `<checkpoint>/reference_adapter`.
fn save_adapters(model: &dyn AdapterHost, dir: &Path) -> Result<()> {
    peft::save_adapter(model, "policy", dir)?;
    if model.adapter_set().reference.is_some() {
        let parent = dir.parent().unwrap_or(dir);
        peft::save_adapter(model, REFERENCE, &parent.join(run::REFERENCE_DIR))?;
    }
    Ok(())
}

/// How a job stopped (Ctrl-C) during its SFT stage ends: interrupted at step 0, nothing saved.
fn stopped_in_sft_stage(run_dir: PathBuf) -> Outcome {
    let mut summary = BTreeMap::new();
    summary.insert("run_dir".into(), json!(run_dir.display().to_string()));
    summary.insert("steps".into(), json!(0));
    summary.insert("interrupted".into(), json!(true));
    summary.insert("stopped_in".into(), json!("sft stage"));
    Outcome {
        run_dir,
        steps: 0,
        interrupted: true,
        summary,
    }
}

fn progress_bar(on: bool, total: u64, pos: u64) -> Option<indicatif::ProgressBar> {
    if !on {
        return None;
    }
    let b = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{bar:30} {pos}/{len} steps  {per_sec}  eta {eta}  {msg}",
    ) {
        b.set_style(style);
    }
    b.set_position(pos);
    Some(b)
}

fn short_metrics(m: &BTreeMap<String, f64>) -> String {
    let keys = [
        "loss",
        "rewards/accuracies",
        "rewards/margins",
        "loss_rr",
        "loss_retain",
        "cosine/chosen",
        "cosine/rejected",
        "nll_loss",
        "grad_norm",
        "learning_rate",
    ];
    keys.iter()
        .filter_map(|k| m.get(*k).map(|v| format!("{k} {v:.4}")))
        .collect::<Vec<_>>()
        .join("  ")
}

fn format_log(step: usize, total: usize, m: &BTreeMap<String, f64>) -> String {
    format!("step {step}/{total}: {}", short_metrics(m))
}

/// Loss and metrics on (up to `train.n_eval_examples`) pairs at training progress `progress`,
/// without dropout; the model's active adapter is the policy. The metrics are summed on the
/// device and read once.
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    model: &dyn CausalLm,
    cfg: &TrainConfig,
    family: LossFamily,
    pairs: &[TokenizedPair],
    tok: &Tok,
    device: &Device,
    progress: f64,
    dpo_state: &DpoState,
    method: Option<&MethodSetup>,
) -> Result<BTreeMap<String, f64>> {
    let n = pairs.len().min(cfg.train.n_eval_examples.max(1));
    let mut acc = DeviceMetrics::default();
    let mut state = dpo_state.clone();
    for chunk in pairs[..n].chunks(cfg.train.eval_batch_size) {
        let refs: Vec<&TokenizedPair> = chunk.iter().collect();
        let batch = match family {
            LossFamily::Sft => data::chosen_batch(&refs, tok.pad, device)?,
            _ => data::pair_batch(&refs, tok.pad, device)?,
        };
        let out = batch_loss(
            model, cfg, family, &batch, progress, &mut state, false, None, method,
        )?;
        acc.add(&out.metrics)?;
    }
    Ok(acc.read_back(None)?.1)
}

/// Greedy continuations of the first `n` held-out prompts (with the adapter).
fn samples(
    model: &dyn CausalLm,
    tok: &Tok,
    pairs: &[TokenizedPair],
    n: usize,
) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for p in pairs.iter().take(n) {
        let ids = reprpo_models::generate::generate(
            model,
            &p.prompt,
            48,
            &reprpo_models::generate::Sampling::Greedy,
            &reprpo_models::generate::StopAt {
                tokens: vec![tok.eos],
            },
        )?;
        let prompt = tok.decode(&p.prompt, true)?;
        let text = tok.decode(&ids, true)?;
        out.push(format!("{prompt:?} -> {text:?}"));
    }
    Ok(out)
}

/// Preference accuracy (mean log-prob per completion token, chosen vs rejected) of the model
/// (adapter on, or off with `adapters_off`) on the held-out and OOD pairs: `id/accuracy`,
/// `id/prob`, `ood/accuracy`, `ood/prob`.
fn preference_scores(
    model: &dyn CausalLm,
    tok: &Tok,
    id: &[TokenizedPair],
    ood: &[TokenizedPair],
    cfg: &TrainConfig,
    device: &Device,
    adapters_off: bool,
) -> Result<BTreeMap<String, f64>> {
    let mut out = BTreeMap::new();
    for (name, pairs) in [("id", id), ("ood", ood)] {
        if pairs.is_empty() {
            continue;
        }
        let mut probs = Vec::new();
        for chunk in pairs.chunks(cfg.train.eval_batch_size) {
            let refs: Vec<&TokenizedPair> = chunk.iter().collect();
            let b: DeviceBatch = data::pair_batch(&refs, tok.pad, device)?;
            let o = model.forward(
                &b.ids,
                Some(&b.attention),
                None,
                &reprpo_models::ForwardSpec {
                    logits: true,
                    adapters_off,
                    ..Default::default()
                },
            )?;
            let logits = o.logits.ok_or_else(|| {
                TrainError::Model(reprpo_models::ModelError::Invalid("no logits".into()))
            })?;
            let lp = reprpo_models::logps::token_logps(&logits, &b.ids, &b.loss_mask)?;
            let sum: Vec<f64> = lp.sum.to_dtype(DType::F64)?.to_vec1()?;
            let count: Vec<f64> = lp.count.to_dtype(DType::F64)?.to_vec1()?;
            let n = refs.len();
            for i in 0..n {
                if count[i] == 0.0 || count[n + i] == 0.0 {
                    continue; // a completion truncated away: nothing to score (not counted in n)
                }
                // The same score as `cargo xtask eval` (reprpo-eval's `pref_score`).
                let s = reprpo_eval::pref_score(
                    sum[i],
                    count[i] as usize,
                    sum[n + i],
                    count[n + i] as usize,
                )?;
                probs.push(s.prob);
            }
        }
        if probs.is_empty() {
            continue;
        }
        let acc = probs.iter().filter(|&&p| p > 0.5).count() as f64 / probs.len() as f64;
        let prob = probs.iter().sum::<f64>() / probs.len() as f64;
        out.insert(format!("{name}/accuracy"), acc);
        out.insert(format!("{name}/prob"), prob);
        out.insert(format!("{name}/n"), probs.len() as f64);
    }
    Ok(out)
}

/// What the in-distribution scores of the summary are computed on: the named evaluation sets,
/// or the held-out slice of the training data (`n` pairs).
fn scored_sets(cfg: &TrainConfig, n: usize) -> String {
    if cfg.data.eval_split > 0.0 {
        format!(
            "{}% of the training data, held out ({n} pairs, seed {})",
            100.0 * cfg.data.eval_split,
            cfg.train.seed
        )
    } else {
        cfg.data.eval_datasets.join(", ")
    }
}

/// A small stable hash (FNV-1a, 64 bit) for cache keys.
fn fnv(s: &str) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn copy_adapter(src: &Path, dst: &Path) -> Result<()> {
    std::fs::create_dir_all(dst).map_err(io(dst))?;
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        let bytes = std::fs::read(src.join(f)).map_err(io(src.join(f)))?;
        run::write_atomic(&dst.join(f), &bytes)?;
    }
    Ok(())
}

/// Run (or reuse from the cache) the SFT stage: a LoRA adapter on every linear layer trained
/// with NLL on the chosen completions. Returns the adapter folder, or `None` when the stop flag
/// (Ctrl-C) was set during the stage: it stops before its next step, caches nothing (a partial
/// stage is never reused) and leaves the model without the SFT adapter.
fn sft_stage(
    cfg: &TrainConfig,
    ctx: &JobContext,
    run_dir: &Path,
    inputs: &mut Inputs,
) -> Result<Option<PathBuf>> {
    let dir = sft_cache_dir(cfg);
    // Held until this function returns: a second job with the same settings waits here, then
    // reuses this one's adapter.
    let Some(_lock) = lock_cache_entry(&dir, &ctx.stop)? else {
        println!(
            "SFT stage stopped while waiting for the cache entry {}",
            dir.display()
        );
        return Ok(None);
    };
    if is_cached_adapter(&dir) {
        println!("SFT stage: reusing {}", dir.display());
        return Ok(Some(dir));
    }
    println!(
        "SFT stage: {} steps of LoRA r={} on the {} completions (cached in {})",
        cfg.sft_steps(),
        cfg.sft.r,
        cfg.sft.on,
        dir.display()
    );
    if !train_sft(cfg, ctx, run_dir, inputs)? {
        return Ok(None);
    }
    let model = inputs.model.as_mut();
    store_cache_entry(model, &dir)?;
    // Remove the SFT adapter again: the caller folds it into the base.
    clear_adapters(model);
    Ok(Some(dir))
}

/// The SFT cache entry of `cfg`: `<out_dir>/<sft.cache_dir>/sft-<hash of everything the stage
/// depends on>`.
fn sft_cache_dir(cfg: &TrainConfig) -> PathBuf {
    let key = json!({
        "model": cfg.model, "datasets": cfg.data.datasets, "n_train": cfg.data.n_train,
        "tokenize": format!("{:?}", cfg.tokenize_config()), "sft": cfg.sft, "seed": cfg.train.seed,
        "version": 1,
    });
    cfg.run
        .out_dir
        .join(&cfg.sft.cache_dir)
        .join(format!("sft-{:016x}", fnv(&key.to_string())))
}

/// Add the SFT stage's LoRA adapter (`sft`, every linear layer, r = alpha = `sft.r`) to `model`,
/// active, and its optimizer.
fn sft_adapter(cfg: &TrainConfig, model: &mut dyn TrainModel) -> Result<AdamW> {
    let mut ac = crate::config::AdapterOptions {
        kind: "lora".into(),
        r: cfg.sft.r,
        alpha: cfg.sft.r as f64,
        ..Default::default()
    }
    .peft_json();
    ac.insert("target_modules".into(), json!("all-linear"));
    let ac = AdapterConfig::from_json(ac, Path::new("(sft stage)"))?;
    let idx = peft::add_adapter(model, "sft", ac, None, cfg.train.seed)?;
    model.adapter_set_mut().active = Some(idx);
    AdamW::new(
        peft::adapter_params(model, idx),
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        },
    )
}

/// Train the SFT stage's adapter for `sft.steps` steps; `false` when the stop flag (Ctrl-C) was
/// set (the model is then left without the adapter).
fn train_sft(
    cfg: &TrainConfig,
    ctx: &JobContext,
    run_dir: &Path,
    inputs: &mut Inputs,
) -> Result<bool> {
    let model = inputs.model.as_mut();
    let (tok, pairs, device) = (&inputs.tok, &inputs.train_pairs, &inputs.device);
    let mut opt = sft_adapter(cfg, model)?;
    let total = cfg.sft_steps();
    let bar = progress_bar(ctx.progress, total as u64, 0);
    let mut order_cache = None;
    let mut dpo_state = DpoState::default();
    let warmup = (total / 10).max(1);
    let mut acc = DeviceMetrics::default();
    let mut guard = NonFiniteGuard::new(device, &["gradient norm (SFT stage)"])?;
    for step in 0..total {
        if ctx.stop.load(Ordering::SeqCst) {
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
            println!(
                "SFT stage stopped after {step}/{total} steps: a partial stage is not cached; \
                 `--resume {}` runs the SFT stage again from the start",
                run_dir.display()
            );
            clear_adapters(model);
            return Ok(false);
        }
        let lr = Schedule::Cosine.lr(cfg.sft.lr, step, total, warmup, 0.0);
        let chunk = micro_batch(
            pairs,
            cfg.sft.batch_size,
            cfg.train.seed,
            step,
            &mut order_cache,
        );
        let batch = data::sft_batch(&chunk, cfg.sft.on == "both", tok.pad, device)?;
        let out = batch_loss(
            model.lm(),
            cfg,
            LossFamily::Sft,
            &batch,
            0.0,
            &mut dpo_state,
            true,
            Some(dropout_seed(cfg.train.seed, 0, step)),
            None,
        )?;
        let mut grads = opt.gradients(&backward(&out.loss)?);
        clip_and_update(&mut opt, &mut grads, 1.0, lr, step + 1, 0, &mut guard)?;
        acc.add(&out.metrics)?;
        if let Some(b) = &bar {
            b.set_position(step as u64 + 1);
        }
        if (step + 1) % 50 == 0 || step + 1 == total {
            let mean = guard.read_means(&acc, None)?;
            let line = format!(
                "SFT step {}/{total}: nll {:.4}",
                step + 1,
                mean.get("loss").copied().unwrap_or(f64::NAN)
            );
            match &bar {
                Some(b) => b.println(line),
                None => println!("{line}"),
            }
            acc = DeviceMetrics::default();
        }
    }
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    guard.check_finite(None)?;
    Ok(true)
}

/// Whether `dir` holds a complete cached adapter.
fn is_cached_adapter(dir: &Path) -> bool {
    dir.join("adapter_model.safetensors").is_file() && dir.join("adapter_config.json").is_file()
}

/// Take the exclusive lock of the SFT cache entry `dir` (the file `<dir>.lock`, kept: removing
/// it would let a third job lock a different file), waiting while another job holds it; `None`
/// when the stop flag is set while waiting. The lock is released when the file is dropped or
/// the process ends.
fn lock_cache_entry(dir: &Path, stop: &AtomicBool) -> Result<Option<std::fs::File>> {
    let path = dir.with_extension("lock");
    if let Some(p) = dir.parent() {
        std::fs::create_dir_all(p).map_err(io(p))?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io(&path))?;
    let mut said = false;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(Some(file)),
            Err(std::fs::TryLockError::WouldBlock) => {
                if stop.load(Ordering::SeqCst) {
                    return Ok(None);
                }
                if !said {
                    println!(
                        "SFT stage: waiting for another job writing {}",
                        dir.display()
                    );
                    said = true;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(&path)(e)),
        }
    }
}

/// Save the SFT adapter of `model` as the cache entry `dir`: written to a temporary folder of
/// this process, then renamed, so a crash leaves no half-written entry. Where locks do not work
/// (some network file systems) another job may have stored the same entry first: its copy is
/// kept and ours removed.
fn store_cache_entry(model: &dyn TrainModel, dir: &Path) -> Result<()> {
    static WRITES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = WRITES.fetch_add(1, Ordering::SeqCst);
    let tmp = dir.with_extension(format!("tmp-{}-{n}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    let stored = peft::save_adapter(model, "sft", &tmp)
        .map_err(TrainError::from)
        .and_then(|()| match std::fs::rename(&tmp, dir) {
            Ok(()) => Ok(()),
            Err(_) if is_cached_adapter(dir) => Ok(()),
            Err(e) => Err(io(dir)(e)),
        });
    // Best effort: after a successful rename there is nothing left to remove.
    let _ = std::fs::remove_dir_all(&tmp);
    stored
}

/// Remove every adapter from `model`.
fn clear_adapters(model: &mut dyn TrainModel) {
    for lin in model.linears_mut() {
        lin.adapters.clear();
    }
    *model.adapter_set_mut() = Default::default();
}
