//! Memory of a training run: what the process held at its peak (the summary and, with
//! `run.log_memory`, every `metrics.jsonl` record), and an estimate of what a configuration will
//! need, which `--print-config` compares with the device.
//!
//! Measured:
//! - `memory/peak_rss_mib`: the process's peak resident set (`VmHWM` of `/proc/self/status`;
//!   absent where there is no procfs). On the CPU this is the run's memory; on a GPU the host side.
//! - `memory/device_used_mib` (CUDA): the device's used memory (`cuMemGetInfo`, total - free,
//!   every process on the card included), the largest of the values sampled at each logging step,
//!   not a true peak between samples.
//!
//! Estimated ([`estimate`], bytes; a rough budget, not a promise): for `L` layers, hidden `h`,
//! intermediate `i`, vocabulary `V`, `n_q` / `n_kv` heads of size `d`, `R` rows per micro-batch
//! (`2 × train.batch_size`: chosen and rejected) of `T = data.max_length` tokens, `b` bytes per
//! element of `model.dtype`:
//! - weights: `P_lin · q + V h b (× 2 untied)` with `P_lin = L (2 h n_q d + 2 h n_kv d + 3 h i)`
//!   and `q` bytes per linear weight: `b` dense, `0.5 + 4/64` for NF4/FP4 (`0.5 + 1/64 + 4/16384`
//!   with double quantisation), `1 + 4/in` for int8;
//! - trainable: `A` adapter parameters (LoRA `r (in + out)` per targeted layer, f32): `4A`
//!   weights + `4A` gradients + AdamW's `8A` (`2A` + an f32 absmax per 256 with `adamw_8bit`);
//! - activations kept for the backward: `R T b (L (10 h + 4 i) + 3 V) + R L n_q T² b` (per layer
//!   the block inputs, q, k, v, attention output, norms and the MLP's three `i`-wide tensors, the
//!   attention probabilities; the logits with their log-softmax and gradient); with gradient
//!   checkpointing `L h` per token plus one layer's full set.

use std::path::Path;

use candle_core::Device;
use serde_json::{Value, json};

use crate::config::TrainConfig;

const MIB: f64 = (1u64 << 20) as f64;

/// The process's peak resident set in bytes (Linux `VmHWM`); `None` without procfs.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    kib_field(&status, "VmHWM:")
}

/// `name  <n> kB` of a procfs text, in bytes.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(name))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The device's `(used, total)` memory in bytes (CUDA: `cuMemGetInfo`); `None` on the CPU.
pub(crate) fn device_memory(dev: &Device) -> Option<(u64, u64)> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = dev {
        let (free, total) = d.cuda_stream().context().mem_get_info().ok()?;
        return Some((total.saturating_sub(free) as u64, total as u64));
    }
    let _ = dev;
    None
}

/// What can hold the run: the device's total memory on a GPU, the machine's available memory
/// (`MemAvailable` of `/proc/meminfo`) on the CPU.
pub(crate) fn capacity_bytes(dev: &Device) -> Option<u64> {
    if let Some((_, total)) = device_memory(dev) {
        return Some(total);
    }
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    kib_field(&info, "MemAvailable:")
}

/// The largest device memory seen at the samples so far, and the JSON fields of the memory now.
#[derive(Debug, Default)]
pub(crate) struct MemoryLog {
    device_max: Option<u64>,
}

impl MemoryLog {
    /// Sample the device and return the record's fields (module docs).
    pub fn sample(&mut self, dev: &Device) -> Vec<(String, Value)> {
        let mut out = Vec::new();
        if let Some(b) = peak_rss_bytes() {
            out.push(("memory/peak_rss_mib".into(), json!(b as f64 / MIB)));
        }
        if let Some((used, _)) = device_memory(dev) {
            let m = self.device_max.map_or(used, |m| m.max(used));
            self.device_max = Some(m);
            out.push(("memory/device_used_mib".into(), json!(m as f64 / MIB)));
        }
        out
    }
}

/// The parts of [`estimate`], in bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    /// Frozen base weights (quantised where asked).
    pub weights: f64,
    /// Trainable parameters, their gradients and the optimizer state.
    pub trainable: f64,
    /// Activations kept for the backward of one micro-batch.
    pub activations: f64,
}

impl Estimate {
    /// The sum.
    pub fn total(&self) -> f64 {
        self.weights + self.trainable + self.activations
    }
}

/// The shape [`estimate`] needs.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Decoder layers.
    pub layers: usize,
    /// Hidden size.
    pub hidden: usize,
    /// MLP width.
    pub intermediate: usize,
    /// Vocabulary.
    pub vocab: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Head size.
    pub head_dim: usize,
    /// Separate output head.
    pub untied: bool,
}

/// The shape of `cfg.model`: a random preset, or a folder's `config.json` (Llama or Phi-3
/// keys); `None` when the folder cannot be found or read (a hub id not in the cache).
pub fn shape_of(cfg: &TrainConfig) -> Option<Shape> {
    let c = match reprpo_models::LlamaConfig::preset(&cfg.model.name_or_path) {
        Some(c) => c,
        None => {
            let dir = reprpo_models::hub::model_dir(&cfg.model.name_or_path).ok()?;
            reprpo_models::LlamaConfig::from_dir(Path::new(&dir)).ok()?
        }
    };
    Some(Shape {
        layers: c.num_layers,
        hidden: c.hidden_size,
        intermediate: c.intermediate_size,
        vocab: c.vocab_size,
        heads: c.num_heads,
        kv_heads: c.num_kv_heads,
        head_dim: c.head_dim,
        untied: !c.tie_word_embeddings,
    })
}

/// The estimate of the module docs for `cfg` on a model of shape `s`.
pub fn estimate(cfg: &TrainConfig, s: &Shape) -> Estimate {
    let f = |x: usize| x as f64;
    let b = match cfg.model.dtype.as_str() {
        "bf16" | "f16" => 2.0,
        _ => 4.0,
    };
    let (h, i, l) = (f(s.hidden), f(s.intermediate), f(s.layers));
    let (q_out, kv_out) = (f(s.heads * s.head_dim), f(s.kv_heads * s.head_dim));
    // (in, out) of the seven projections of one layer.
    let lins = [
        (h, q_out),
        (h, kv_out),
        (h, kv_out),
        (q_out, h),
        (h, i),
        (h, i),
        (i, h),
    ];
    let per_weight = |inp: f64| match (cfg.model.quantize.as_str(), cfg.model.double_quant) {
        ("nf4" | "fp4", false) => 0.5 + 4.0 / 64.0,
        ("nf4" | "fp4", true) => 0.5 + 1.0 / 64.0 + 4.0 / 16384.0,
        ("int8", _) => 1.0 + 4.0 / inp,
        _ => b,
    };
    let lin_bytes: f64 = lins
        .iter()
        .map(|&(inp, out)| inp * out * per_weight(inp))
        .sum();
    let embed = f(s.vocab) * h * b * if s.untied { 2.0 } else { 1.0 };
    let weights = l * lin_bytes + embed;
    let r = f(cfg.adapter.r);
    let adapter: f64 = match cfg.adapter.kind.as_str() {
        "full" => lins.iter().map(|&(a, o)| a * o).sum::<f64>() * l,
        _ => lins.iter().map(|&(a, o)| r * (a + o)).sum::<f64>() * l,
    };
    let moments = if cfg.train.optim == "adamw_8bit" {
        2.0 * adapter + 8.0 * adapter / 256.0
    } else {
        8.0 * adapter
    };
    let trainable = 8.0 * adapter + moments;
    let rows = f(2 * cfg.train.batch_size);
    let t = f(cfg.data.max_length.unwrap_or(512));
    let per_layer_token = 10.0 * h + 4.0 * i;
    let attn = rows * l * f(s.heads) * t * t * b;
    let layers_kept = if cfg.train.grad_checkpointing {
        rows * t * b * (l * h + per_layer_token) + attn / l
    } else {
        rows * t * b * l * per_layer_token + attn
    };
    let activations = layers_kept + rows * t * b * 3.0 * f(s.vocab);
    Estimate {
        weights,
        trainable,
        activations,
    }
}

/// The `--print-config` note: the estimate, and a warning when it exceeds what the device (or
/// the machine, on the CPU) has. `None` when the model's shape is unknown.
pub fn note(cfg: &TrainConfig, dev: &Device) -> Option<String> {
    let s = shape_of(cfg)?;
    let e = estimate(cfg, &s);
    let gib = |x: f64| x / (1u64 << 30) as f64;
    let mut text = format!(
        "estimated memory: {:.2} GiB (weights {:.2}, adapter + gradients + optimizer {:.2}, \
         activations of one micro-batch {:.2}; a rough budget, see reprpo_train::memory)",
        gib(e.total()),
        gib(e.weights),
        gib(e.trainable),
        gib(e.activations)
    );
    if let Some(cap) = capacity_bytes(dev)
        && e.total() > cap as f64
    {
        text.push_str(&format!(
            "\nwarning: that exceeds the {:.2} GiB {} has: consider model.quantize, \
             train.optim = \"adamw_8bit\", train.grad_checkpointing, a smaller train.batch_size \
             or data.max_length",
            gib(cap as f64),
            if dev.is_cpu() {
                "this machine"
            } else {
                "the device"
            }
        ));
    }
    Some(text)
}
