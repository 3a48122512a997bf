//! `cargo xtask bench step | train | tokenize`: the Rust side of the side-by-side measurements
//! (docs/perf.md, tests/reference/, tests/gpu/).
//!
//! `bench train` times one preference-training step exactly as
//! `../shared/anchors/pytorch_anchor.py` does it (random Llama of the anchor's shapes, LoRA r=16
//! alpha=16 on the seven projections, reference forward with adapters off, policy forward, DPO
//! sigmoid or ReprPO on hidden states `L/2` and `3L/4`, backward, AdamW lr 1e-4), through the
//! trainer's own objective ([`reprpo_train::objective::batch_loss`]); `--loss` may also name a
//! method preset of the reference ReprPO project (`hs-ether-prefvec`, `side-none-prefvec`, ...:
//! its collection, transform and loss through [`reprpo_train::method::MethodSetup`], the
//! transform's parameters in the optimizer beside the adapter's, as the trainer does; the Rust
//! side of `tests/reference/bench_methods.sh`) or `projgrad` / `projbp` (projgrad's rewrite of
//! the gradients after the backward, through [`reprpo_train::gradproj::accumulate`] as the
//! trainer applies it). On CUDA each step is timed
//! between two device synchronisations and the peak device memory is the high watermark of the
//! memory pool candle allocates from (see [`DeviceMem`]).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use candle_core::{DType, Device, Tensor};
use clap::{Args, Subcommand};
use reprpo_data::tokenize::{self, TokenizeConfig};
use reprpo_models::{Llama, LlamaConfig, peft};
use serde_json::{Value, json};

/// The seven projections the anchor puts LoRA on.
const TARGETS: [&str; 7] = reprpo_models::llama::PROJECTIONS;

/// `cargo xtask bench ...`.
#[derive(Subcommand)]
pub(crate) enum BenchCmd {
    /// Time a forward + backward (LoRA gradients) of a randomly initialised Llama
    /// (the Rust side of tests/reference/bench_step.py).
    Step {
        /// Shape: `tiny`, `small`, `1b` or `8b`, as in ../shared/anchors/pytorch_anchor.py.
        #[arg(long, default_value = "tiny")]
        preset: String,
        /// Sequences (2 x pairs).
        #[arg(long, default_value_t = 4)]
        batch: usize,
        /// Tokens per sequence.
        #[arg(long, default_value_t = 64)]
        seq: usize,
        /// Timed steps (median reported, after 2 warm-up steps).
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// `cpu`, `cuda` or `cuda:N`.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// `f32`, `bf16` or `f16` (default: bf16 on CUDA, f32 on the CPU).
        #[arg(long)]
        dtype: Option<String>,
    },
    /// Time one preference-training step (reference forward, policy forward, loss, backward,
    /// AdamW) with LoRA r=16 on a random Llama: the Rust side of
    /// ../shared/anchors/pytorch_anchor.py. Prints one JSON line.
    Train(TrainBench),
    /// The old name of `train` (docs/perf.md, tests/reference/bench_train.sh), with its old
    /// defaults: `small`, 2 pairs x 128, 5 steps after 2 warm-ups, CPU.
    #[command(hide = true)]
    TrainStep {
        /// `tiny` or `small`.
        #[arg(long, default_value = "small")]
        preset: String,
        /// Preference pairs (2 x pairs sequences).
        #[arg(long, default_value_t = 2)]
        pairs: usize,
        /// Tokens per sequence (the first half is prompt).
        #[arg(long, default_value_t = 128)]
        seq: usize,
        /// A DPO `loss_type`, a ReprPO variant or a method preset.
        #[arg(long, default_value = "dpo")]
        loss: String,
        /// Timed steps (after 2 warm-up steps).
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// Recompute activations in backward.
        #[arg(long)]
        grad_checkpointing: bool,
    },
    /// Time tokenising + collating pairs (the Rust side of tests/reference/bench_tokenize.py).
    Tokenize {
        #[command(flatten)]
        input: crate::InputArgs,
        /// Tokenizer folder.
        #[arg(long)]
        tokenizer: PathBuf,
        /// Pairs per batch for collation.
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        /// Timed repetitions (the best is reported, after one warm-up).
        #[arg(long, default_value_t = 5)]
        repeat: usize,
        /// Tokenisation overrides.
        #[arg(value_name = "key=value")]
        overrides: Vec<String>,
    },
}

/// Arguments of `bench train`; the defaults are the anchor's.
#[derive(Args, Clone, Debug)]
pub(crate) struct TrainBench {
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Model shape: `tiny`, `small`, `1b` (Llama-3.2-1B) or `8b` (Llama-3-8B), randomly
    /// initialised on the device.
    #[arg(long, default_value = "tiny")]
    pub shape: String,
    /// Preference pairs (2 x pairs sequences).
    #[arg(long, default_value_t = 4)]
    pub pairs: usize,
    /// Tokens per sequence (the first half is prompt, the second the completion).
    #[arg(long, default_value_t = 512)]
    pub seq: usize,
    /// A DPO `loss_type` (`dpo` = sigmoid, beta 0.1), a ReprPO variant (`reprpo`) or a method
    /// preset of the reference ReprPO project (`hs-ether-prefvec`, `side-none-prefvec`, ...).
    #[arg(long, default_value = "dpo")]
    pub loss: String,
    /// Gradient checkpointing (blocks recomputed in backward).
    #[arg(long, alias = "grad-checkpointing")]
    pub grad_ckpt: bool,
    /// Timed steps (median, min and max reported).
    #[arg(long, default_value_t = 8)]
    pub steps: usize,
    /// Untimed warm-up steps before them.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// `f32`, `bf16` or `f16` (default: bf16 on CUDA, f32 on the CPU, as the anchor).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Also write the JSON (pretty) to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// CUDA: leave the memory pool's release threshold at the driver's default (0: freed memory
    /// goes back to the driver at every synchronisation) instead of keeping it for reuse.
    #[arg(long)]
    pub release_pool_memory: bool,
    /// Also report `median_s` (the old `train-step` field name).
    #[arg(skip)]
    pub legacy_fields: bool,
    /// Quantise the base's linear layers as each is drawn: `none`, `nf4`, `fp4` or `int8`
    /// (`model.quantize`).
    #[arg(long, default_value = "none")]
    pub quantize: String,
    /// Double quantisation of the 4-bit absmax (`model.double_quant`).
    #[arg(long)]
    pub double_quant: bool,
    /// `adamw` or `adamw_8bit` (`train.optim`).
    #[arg(long, default_value = "adamw")]
    pub optim: String,
}

/// Run a `bench` subcommand.
pub(crate) fn run(cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Step {
            preset,
            batch,
            seq,
            steps,
            device,
            dtype,
        } => bench_step(&preset, batch, seq, steps, &device, dtype.as_deref()),
        BenchCmd::Train(a) => bench_train(&a).map(|_| ()),
        BenchCmd::TrainStep {
            preset,
            pairs,
            seq,
            loss,
            steps,
            grad_checkpointing,
        } => bench_train(&TrainBench {
            device: "cpu".into(),
            shape: preset,
            pairs,
            seq,
            loss,
            grad_ckpt: grad_checkpointing,
            steps,
            warmup: 2,
            dtype: None,
            json: None,
            release_pool_memory: false,
            legacy_fields: true,
            quantize: "none".into(),
            double_quant: false,
            optim: "adamw".into(),
        })
        .map(|_| ()),
        BenchCmd::Tokenize {
            input,
            tokenizer: tok_dir,
            batch_size,
            repeat,
            overrides,
        } => bench_tokenize(&input, &tok_dir, batch_size, repeat, &overrides),
    }
}

/// `cpu`, `cuda`, `cuda:N` -> a device (opened), with errors that say what is accepted and what a
/// CPU-only build lacks.
pub(crate) fn parse_device(s: &str) -> Result<Device> {
    if s == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = s.strip_prefix("cuda").and_then(|rest| {
        if rest.is_empty() {
            Some(0)
        } else {
            rest.strip_prefix(':')?.parse::<usize>().ok()
        }
    });
    let Some(n) = ordinal else {
        bail!("--device {s:?}: expected cpu, cuda or cuda:N (N = 0, 1, ...)");
    };
    if !cfg!(feature = "cuda") {
        bail!("--device {s}: this build has no CUDA (build xtask with --features cuda)");
    }
    Device::new_cuda(n).with_context(|| format!("--device {s}: cannot open CUDA device {n}"))
}

/// `f32` / `bf16` / `f16`; `None`: bf16 on CUDA, f32 elsewhere (the anchor's choice).
fn parse_dtype(s: Option<&str>, dev: &Device) -> Result<DType> {
    Ok(match s {
        None if dev.is_cuda() => DType::BF16,
        None => DType::F32,
        Some("f32" | "float32") => DType::F32,
        Some("bf16" | "bfloat16") => DType::BF16,
        Some("f16" | "float16") => DType::F16,
        Some(o) => bail!("--dtype {o:?}: expected f32, bf16 or f16"),
    })
}

fn preset(name: &str) -> Result<LlamaConfig> {
    LlamaConfig::preset(name).with_context(|| {
        format!(
            "unknown shape `{name}` (expected one of {})",
            LlamaConfig::PRESETS.join(", ")
        )
    })
}

/// Peak resident memory of this process (VmHWM), in MiB, where /proc has it.
fn peak_rss_mib() -> Option<f64> {
    reprpo_train::memory::peak_rss_bytes().map(|b| b as f64 / (1u64 << 20) as f64)
}

/// The device as words: the card's name on CUDA, the CPU model and thread count on the CPU.
fn device_name(dev: &Device) -> String {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = dev {
        return d
            .cuda_stream()
            .context()
            .name()
            .unwrap_or_else(|e| format!("CUDA device ({e})"));
    }
    let _ = dev;
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "CPU".into());
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    format!("{model} ({threads} threads)")
}

fn device_kind(dev: &Device) -> &'static str {
    match dev {
        Device::Cpu => "cpu",
        Device::Cuda(_) => "cuda",
        Device::Metal(_) => "metal",
    }
}

/// Wait for the device's queued work (a no-op on the CPU), so the clock reads finished work.
fn sync(dev: &Device) -> Result<()> {
    Ok(dev.synchronize()?)
}

/// Median, min and max of `times` (non-empty).
fn stats(times: &[f64]) -> (f64, f64, f64) {
    let mut t = times.to_vec();
    t.sort_by(f64::total_cmp);
    (t[t.len() / 2], t[0], t[t.len() - 1])
}

/// `n` token ids in `0..vocab`, drawn on the host (SplitMix64, fixed seed).
fn random_ids(n: usize, vocab: usize) -> Vec<u32> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z % vocab as u64) as u32
        })
        .collect()
}

/// Device memory during a benchmark.
///
/// candle 0.11 allocates every CUDA buffer through cudarc's `CudaStream::alloc`, which calls
/// `cuMemAllocAsync` on the stream whenever the device supports memory pools (every card since
/// CUDA 11.2; cudarc 0.19 `driver/safe/core.rs`, `alloc` and `CudaContext::new`'s
/// `has_async_alloc`), and neither crate sets a pool of its own (`cuDeviceSetMemPool`), so
/// buffers come from the device's default pool. The pool's `CU_MEMPOOL_ATTR_USED_MEM_HIGH`
/// (bytes handed out and not yet freed, high watermark, reset to the current use before
/// timing) is then the analogue of `torch.cuda.max_memory_allocated()` after
/// `reset_peak_memory_stats()`; `CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH` that of
/// `max_memory_reserved()`. Without pool support cudarc falls back to `cuMemAlloc`; then the
/// device's used memory (`cuMemGetInfo`: total - free, every process on the card included) is
/// sampled after each phase and reported as `device_used_gib_sampled`, not as a peak.
enum DeviceMem {
    /// CPU: peak RSS only.
    Host,
    /// CUDA with the default pool.
    #[cfg(feature = "cuda")]
    Pool(cuda::Pool),
    /// CUDA with `cuMemAlloc`: the largest sampled `total - free`.
    #[cfg(feature = "cuda")]
    Sampled {
        ctx: std::sync::Arc<cuda::Context>,
        max: u64,
    },
}

#[cfg(feature = "cuda")]
const GIB: f64 = (1u64 << 30) as f64;

impl DeviceMem {
    /// The measure for `dev`; on CUDA with a pool, `keep_freed` raises the pool's release
    /// threshold so that freed memory stays in the pool (as PyTorch's caching allocator keeps it)
    /// instead of going back to the driver at every synchronisation.
    fn new(dev: &Device, keep_freed: bool) -> Result<Self> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(d) = dev {
            let ctx = d.cuda_stream().context().clone();
            return Ok(match cuda::Pool::current(ctx.clone())? {
                Some(pool) => {
                    if keep_freed {
                        pool.keep_freed()?;
                    }
                    DeviceMem::Pool(pool)
                }
                None => DeviceMem::Sampled { ctx, max: 0 },
            });
        }
        let _ = (dev, keep_freed);
        Ok(DeviceMem::Host)
    }

    /// Start a new peak from the memory in use now.
    fn reset(&mut self) -> Result<()> {
        match self {
            DeviceMem::Host => {}
            #[cfg(feature = "cuda")]
            DeviceMem::Pool(p) => p.reset_peaks()?,
            #[cfg(feature = "cuda")]
            DeviceMem::Sampled { ctx, max } => *max = cuda::used_now(ctx)?,
        }
        Ok(())
    }

    /// Record the memory in use now (only the `cuMemAlloc` fallback needs samples).
    fn sample(&mut self) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let DeviceMem::Sampled { ctx, max } = self {
            *max = (*max).max(cuda::used_now(ctx)?);
        }
        Ok(())
    }

    /// The JSON fields: `peak_mem_gib` (null on the CPU and with the fallback), the measure's
    /// name, and what else it knows.
    fn report(&self) -> Result<serde_json::Map<String, Value>> {
        let mut m = serde_json::Map::new();
        match self {
            DeviceMem::Host => {
                m.insert("peak_mem_gib".into(), Value::Null);
                m.insert("peak_mem_measure".into(), Value::Null);
            }
            #[cfg(feature = "cuda")]
            DeviceMem::Pool(p) => {
                let (used, reserved, threshold) = p.highs()?;
                m.insert("peak_mem_gib".into(), json!(used as f64 / GIB));
                m.insert(
                    "peak_mem_measure".into(),
                    json!("CUDA default mempool CU_MEMPOOL_ATTR_USED_MEM_HIGH"),
                );
                m.insert("peak_reserved_gib".into(), json!(reserved as f64 / GIB));
                m.insert(
                    "mempool_release_threshold".into(),
                    if threshold == u64::MAX {
                        json!("max")
                    } else {
                        json!(threshold)
                    },
                );
            }
            #[cfg(feature = "cuda")]
            DeviceMem::Sampled { max, .. } => {
                m.insert("peak_mem_gib".into(), Value::Null);
                m.insert(
                    "peak_mem_measure".into(),
                    json!("cuMemGetInfo total-free, sampled after each phase"),
                );
                m.insert("device_used_gib_sampled".into(), json!(*max as f64 / GIB));
            }
        }
        Ok(m)
    }
}

/// The CUDA driver calls behind [`DeviceMem`] (cudarc 0.19 through candle's re-export).
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
mod cuda {
    use std::sync::Arc;

    use anyhow::Result;
    use candle_core::cuda_backend::cudarc::driver::{result, sys};

    pub use candle_core::cuda_backend::cudarc::driver::CudaContext as Context;

    type Attr = sys::CUmemPool_attribute;

    /// The device's current memory pool (the one `cuMemAllocAsync` draws from).
    pub struct Pool {
        /// Keeps the context, hence the pool, alive.
        ctx: Arc<Context>,
        pool: sys::CUmemoryPool,
    }

    impl Pool {
        /// `None` when the device has no memory pools (cudarc then uses `cuMemAlloc`).
        pub fn current(ctx: Arc<Context>) -> Result<Option<Self>> {
            if !ctx.has_async_alloc() {
                return Ok(None);
            }
            ctx.bind_to_thread()?;
            // SAFETY: `cu_device` is the handle `cuDeviceGet` returned when the context was
            // created (cudarc `CudaContext::new`), valid while `ctx` lives; the call writes one
            // pool handle and takes no other pointer.
            let pool = unsafe { result::device::get_mem_pool(ctx.cu_device()) }?;
            Ok(Some(Pool { ctx, pool }))
        }

        fn get(&self, attr: Attr) -> Result<u64> {
            self.ctx.bind_to_thread()?;
            let mut v: u64 = 0;
            // SAFETY: `pool` is the device's current pool, alive with `ctx` (held by `self`);
            // every attribute read here is a `cuuint64_t` (CUDA driver API,
            // cuMemPoolGetAttribute), and `v` is a live, aligned u64 the call writes once.
            unsafe { result::mem_pool::get_attribute(self.pool, attr, (&raw mut v).cast()) }?;
            Ok(v)
        }

        fn set(&self, attr: Attr, mut v: u64) -> Result<()> {
            self.ctx.bind_to_thread()?;
            // SAFETY: as in `get`; the call reads one `cuuint64_t` from `v` (the two high
            // watermarks accept only 0, which resets them to the current value).
            unsafe { result::mem_pool::set_attribute(self.pool, attr, (&raw mut v).cast()) }?;
            Ok(())
        }

        /// Reset the used and reserved high watermarks to the current values.
        pub fn reset_peaks(&self) -> Result<()> {
            self.set(Attr::CU_MEMPOOL_ATTR_USED_MEM_HIGH, 0)?;
            self.set(Attr::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH, 0)
        }

        /// Keep freed memory in the pool (release threshold: unlimited).
        pub fn keep_freed(&self) -> Result<()> {
            self.set(Attr::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, u64::MAX)
        }

        /// (used high watermark, reserved high watermark, release threshold), bytes.
        pub fn highs(&self) -> Result<(u64, u64, u64)> {
            Ok((
                self.get(Attr::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?,
                self.get(Attr::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)?,
                self.get(Attr::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD)?,
            ))
        }
    }

    /// Device memory in use now, every process included (`cuMemGetInfo`: total - free).
    pub fn used_now(ctx: &Context) -> Result<u64> {
        let (free, total) = ctx.mem_get_info()?;
        Ok(total.saturating_sub(free) as u64)
    }
}

/// `bench train`: build, run `warmup + steps` steps, print (and optionally write) the JSON.
pub(crate) fn bench_train(a: &TrainBench) -> Result<Value> {
    use reprpo_train::config::LossFamily;
    use reprpo_train::optim::{AdamW, AdamWConfig, OptimKind};
    use reprpo_train::{Sources, TrainConfig};
    ensure!(a.steps >= 1, "--steps must be at least 1");
    ensure!(
        a.pairs >= 1 && a.seq >= 2,
        "--pairs must be at least 1 and --seq at least 2"
    );
    let lc = preset(&a.shape)?;
    let dev = parse_device(&a.device)?;
    let dtype = parse_dtype(a.dtype.as_deref(), &dev)?;
    let (vocab, layers) = (lc.vocab_size, lc.num_layers);
    let overrides = vec![
        format!("loss={}", a.loss),
        format!("reprpo.layers=[{}, {}]", layers / 2, 3 * layers / 4),
        format!("train.grad_checkpointing={}", a.grad_ckpt),
        "sft.steps=0".to_string(),
        format!("model.quantize={}", a.quantize),
        format!("model.double_quant={}", a.double_quant),
        format!("train.optim={}", a.optim),
    ];
    let cfg = TrainConfig::resolve(&Sources {
        overrides,
        ..Default::default()
    })?;
    let family = cfg.family()?;
    ensure!(
        matches!(
            family,
            LossFamily::Dpo | LossFamily::ReprPo | LossFamily::Method | LossFamily::GradProj
        ),
        "--loss must be a DPO type, a ReprPO variant, a method preset (hs-ether-prefvec, ...) \
         or projgrad / projbp"
    );
    let name = device_name(&dev);
    eprintln!(
        "bench train: {} on {} ({name}), {dtype:?}, {} pairs x {}, {}{}",
        a.shape,
        a.device,
        a.pairs,
        a.seq,
        a.loss,
        if a.grad_ckpt {
            " + grad. checkpointing"
        } else {
            ""
        }
    );
    let mut mem = DeviceMem::new(&dev, !a.release_pool_memory)?;

    let t_build = Instant::now();
    let opts = reprpo_models::LoadOptions {
        dtype,
        device: dev.clone(),
        quantize: cfg.model.quant_config()?,
    };
    let mut model = Llama::random_with(lc, 0.02, 0, &opts)?;
    peft::add_adapter(
        &mut model,
        "policy",
        peft::AdapterConfig::lora(16, 16.0, &TARGETS),
        None,
        0,
    )?;
    // The anchor's batch: random ids, every token attended, the second half of each row is the
    // completion (loss mask 1), moved to the device as the trainer moves a collated batch.
    let rows = 2 * a.pairs;
    let host = reprpo_data::tokenize::Batch {
        rows,
        seq_len: a.seq,
        input_ids: random_ids(rows * a.seq, vocab),
        attention_mask: vec![1; rows * a.seq],
        loss_mask: (0..rows * a.seq)
            .map(|i| u8::from(i % a.seq >= a.seq / 2))
            .collect(),
        prompt_cols: a.seq / 2,
    };
    let batch = reprpo_train::data::DeviceBatch::new(&host, a.pairs, &dev)?;
    let mut params = peft::adapter_params(&model, 0);
    // A method preset (`hs-ether-prefvec`, ...): what is collected and the transform, resolved
    // against the model as the trainer does; the transform's parameters train with the adapter.
    let method = match family {
        LossFamily::Method => {
            let setup = reprpo_train::method::MethodSetup::new(&cfg, &model)?;
            params.extend(setup.params());
            Some(setup)
        }
        _ => None,
    };
    let trainable: usize = params.iter().map(|(_, v)| v.elem_count()).sum();
    let mut opt = AdamW::with_kind(
        params,
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        },
        OptimKind::parse(&a.optim)?,
    )?;
    sync(&dev)?;
    let build_s = t_build.elapsed().as_secs_f64();
    let build_rss_mib = peak_rss_mib();
    eprintln!("model built in {build_s:.1} s");

    let mut state = Default::default();
    let mut times = Vec::with_capacity(a.steps);
    // The last step's loss as a number: keeping its tensor would keep that step's whole graph
    // alive into the next forward (and inflate the peak memory measured).
    let mut loss = f64::NAN;
    mem.reset()?;
    let total = a.warmup + a.steps;
    for i in 0..total {
        sync(&dev)?;
        let t0 = Instant::now();
        let out = reprpo_train::objective::batch_loss(
            &model,
            &cfg,
            family,
            &batch,
            0.0,
            &mut state,
            true,
            None,
            method.as_ref(),
        )?;
        mem.sample()?;
        let new = opt.gradients(&reprpo_train::trainer::backward(&out.loss)?);
        // projgrad rewrites the gradients after the backward, as the trainer does.
        let mut g = vec![None; new.len()];
        reprpo_train::gradproj::accumulate(
            out.gradproj.as_ref(),
            &mut g,
            new,
            opt.params(),
            &mut Default::default(),
        )?;
        mem.sample()?;
        // Hidden-state losses stop at their deepest layer: adapters above it get no gradient.
        ensure!(
            g.iter().any(Option::is_some),
            "no adapter parameter got a gradient"
        );
        opt.update(&g, 1e-4)?;
        sync(&dev)?;
        let dt = t0.elapsed().as_secs_f64();
        mem.sample()?;
        eprintln!(
            "step {}/{total}{}: {dt:.3} s",
            i + 1,
            if i < a.warmup { " (warm-up)" } else { "" }
        );
        if i >= a.warmup {
            times.push(dt);
        }
        loss = f64::from(out.loss.to_dtype(DType::F32)?.to_scalar::<f32>()?);
    }
    let (median, min, max) = stats(&times);
    let tokens = (rows * a.seq) as f64;
    let mut out = json!({
        "bench": "train",
        "device": a.device,
        "device_kind": device_kind(&dev),
        "device_name": name,
        "dtype": format!("{dtype:?}").to_lowercase(),
        "shape": a.shape,
        "pairs": a.pairs,
        "seq": a.seq,
        "loss_type": a.loss,
        "grad_checkpointing": a.grad_ckpt,
        "steps": a.steps,
        "warmup": a.warmup,
        "step_s_median": median,
        "step_s_min": min,
        "step_s_max": max,
        "tokens_per_s": tokens / median,
    });
    if let Value::Object(o) = &mut out {
        o.extend(mem.report()?);
        o.insert("peak_rss_mib".into(), json!(peak_rss_mib()));
        o.insert("loss".into(), json!(loss));
        o.insert("trainable_params".into(), json!(trainable));
        o.insert("quantize".into(), json!(a.quantize));
        o.insert("double_quant".into(), json!(a.double_quant));
        o.insert("optim".into(), json!(a.optim));
        o.insert("optimizer_state_bytes".into(), json!(opt.state_bytes()));
        o.insert("peak_rss_after_build_mib".into(), json!(build_rss_mib));
        o.insert("model_build_s".into(), json!(build_s));
        if a.legacy_fields {
            o.insert("preset".into(), json!(a.shape));
            o.insert("median_s".into(), json!(median));
        }
    }
    println!("{out}");
    if let Some(path) = &a.json {
        reprpo_train::run::write_atomic(path, serde_json::to_string_pretty(&out)?.as_bytes())?;
    }
    Ok(out)
}

/// `bench step`: forward + backward of `sum(logits * w)` (LoRA gradients only).
fn bench_step(
    preset_name: &str,
    batch: usize,
    seq: usize,
    steps: usize,
    device: &str,
    dtype: Option<&str>,
) -> Result<()> {
    use reprpo_models::ForwardSpec;
    ensure!(steps >= 1, "--steps must be at least 1");
    let cfg = preset(preset_name)?;
    let vocab = cfg.vocab_size;
    let dev = parse_device(device)?;
    let dtype = parse_dtype(dtype, &dev)?;
    let mut mem = DeviceMem::new(&dev, true)?;
    let mut model = Llama::random(cfg, 0.02, 0, dtype, &dev)?;
    peft::add_adapter(
        &mut model,
        "default",
        peft::AdapterConfig::lora(16, 16.0, &TARGETS),
        None,
        0,
    )?;
    let params = peft::adapter_params(&model, 0);
    let ids = if dev.is_cpu() {
        // The draw the committed CPU measurements used.
        Tensor::rand(0f32, vocab as f32, (batch, seq), &dev)?.to_dtype(DType::U32)?
    } else {
        Tensor::from_vec(random_ids(batch * seq, vocab), (batch, seq), &dev)?
    };
    let weight = Tensor::randn(0f32, 1.0, (batch, seq, vocab), &dev)?.to_dtype(dtype)?;
    let mut times = Vec::new();
    let mut fwd_times = Vec::new();
    mem.reset()?;
    for i in 0..steps + 2 {
        sync(&dev)?;
        let t0 = Instant::now();
        let out = model.forward(&ids, None, None, &ForwardSpec::logits())?;
        let logits = out.logits.context("no logits")?;
        let s = (logits * &weight)?.sum_all()?;
        sync(&dev)?;
        let t_fwd = t0.elapsed().as_secs_f64();
        mem.sample()?;
        let grads = s.backward()?;
        let n = params
            .iter()
            .filter(|(_, v)| grads.get(v.as_tensor()).is_some())
            .count();
        ensure!(
            n == params.len(),
            "only {n} of {} adapter parameters got a gradient",
            params.len()
        );
        sync(&dev)?;
        mem.sample()?;
        if i >= 2 {
            times.push(t0.elapsed().as_secs_f64());
            fwd_times.push(t_fwd);
        }
    }
    let (median, _, _) = stats(&times);
    let (fwd_median, _, _) = stats(&fwd_times);
    let mut out = json!({"preset": preset_name, "batch": batch, "seq": seq, "median_s": median,
        "forward_median_s": fwd_median,
        "tokens_per_s": (batch * seq) as f64 / median, "peak_rss_mib": peak_rss_mib(),
        "adapter_params": params.len(), "device": device,
        "dtype": format!("{dtype:?}").to_lowercase()});
    if let Value::Object(o) = &mut out {
        o.extend(mem.report()?);
    }
    println!("{out}");
    Ok(())
}

/// `bench tokenize`: the best of `repeat` tokenise + collate passes.
fn bench_tokenize(
    input: &crate::InputArgs,
    tok_dir: &Path,
    batch_size: usize,
    repeat: usize,
    overrides: &[String],
) -> Result<()> {
    let cfg: TokenizeConfig = crate::with_overrides(TokenizeConfig::default(), None, overrides)?;
    let pairs = crate::load_input(input)?.pairs;
    let tok = crate::tokenizer(Some(tok_dir))?;
    let mut best = f64::INFINITY;
    let mut checksum = 0u64;
    for i in 0..=repeat {
        let t0 = Instant::now();
        let tp = tokenize::tokenize_pairs(&tok, &pairs, &cfg)?;
        checksum = 0;
        for chunk in tp.pairs.chunks(batch_size.max(1)) {
            let refs: Vec<_> = chunk.iter().collect();
            let b = tokenize::collate_pairs(&refs, tok.pad, tokenize::Layout::Right)?;
            checksum += b.input_ids.iter().map(|&x| u64::from(x)).sum::<u64>();
        }
        let dt = t0.elapsed().as_secs_f64();
        if i > 0 {
            best = best.min(dt);
        }
    }
    println!(
        "{}",
        json!({"pairs": pairs.len(), "seconds": best, "pairs_per_second": pairs.len() as f64 / best, "checksum": checksum})
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_with_clear_errors() {
        assert!(parse_device("cpu").is_ok());
        for bad in ["gpu", "cuda:", "cuda:x", "cuda0", "CPU"] {
            let e = parse_device(bad).err().map(|e| e.to_string());
            assert!(
                e.as_deref()
                    .is_some_and(|e| e.contains("expected cpu, cuda or cuda:N")),
                "{bad}: {e:?}"
            );
        }
        if !cfg!(feature = "cuda") {
            let e = parse_device("cuda:1").err().map(|e| e.to_string());
            assert!(e.as_deref().is_some_and(|e| e.contains("no CUDA")), "{e:?}");
        }
    }

    #[test]
    fn dtypes_default_as_the_anchor() {
        assert_eq!(parse_dtype(None, &Device::Cpu).ok(), Some(DType::F32));
        assert_eq!(
            parse_dtype(Some("bf16"), &Device::Cpu).ok(),
            Some(DType::BF16)
        );
        assert!(parse_dtype(Some("int8"), &Device::Cpu).is_err());
    }

    #[test]
    fn ids_are_in_the_vocabulary() {
        let ids = random_ids(150, 7);
        assert_eq!(ids.len(), 150);
        assert!(ids.iter().all(|&i| i < 7));
        assert!((0..7).all(|v| ids.contains(&v)));
    }
}
