//! Seeded inputs for the doctor's checks: numbers drawn on the host from a fixed seed, then put
//! on the device, so every device sees the same values; the small models the checks run (a
//! Llama with llama3 RoPE scaling, a Phi-3 with LongRoPE, partial rotary and a sliding window),
//! their adapters with randomised parameters, and padded batches.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reprpo_models::config::RopeScaling;
use reprpo_models::peft::{self, AdapterConfig};
use reprpo_models::phi3::{Phi3Config, Phi3Rope};
use reprpo_models::{Llama, LlamaConfig, Phi3};

/// A seeded source of host numbers.
pub(crate) struct Seeded(StdRng);

impl Seeded {
    pub(crate) fn new(seed: u64) -> Self {
        Seeded(StdRng::seed_from_u64(seed))
    }

    /// `n` draws from N(0, std^2) (Box-Muller).
    pub(crate) fn normal_vec(&mut self, n: usize, std: f64) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let u1: f64 = self.0.random::<f64>().max(1e-300);
                let u2: f64 = self.0.random();
                (std * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
            })
            .collect()
    }

    /// A `shape` tensor of N(0, std^2) draws on `dev` in `dtype`.
    pub(crate) fn normal(
        &mut self,
        shape: &[usize],
        std: f64,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        let n = shape.iter().product();
        Ok(Tensor::from_vec(self.normal_vec(n, std), shape, dev)?.to_dtype(dtype)?)
    }

    /// `n` token ids below `vocab`.
    pub(crate) fn ids(&mut self, n: usize, vocab: usize) -> Vec<u32> {
        (0..n)
            .map(|_| self.0.random_range(0..vocab as u32))
            .collect()
    }
}

/// A padded batch: ids `[B, T]` u32, mask `[B, T]` f32 (1 = real), positions `[B, T]` u32.
pub(crate) struct Batch {
    pub ids: Tensor,
    pub mask: Tensor,
    pub positions: Tensor,
}

/// Real lengths of the rows of [`batch`].
pub(crate) const LENGTHS: [usize; 3] = [12, 9, 5];
/// Width of [`batch`].
pub(crate) const T: usize = 12;

/// Three rows of real lengths [`LENGTHS`], padded to [`T`] on the left or the right, with
/// positions counting the real tokens from 0 (as `transformers` does for left padding).
pub(crate) fn batch(vocab: usize, left: bool, seed: u64, dev: &Device) -> Result<Batch> {
    let mut rng = Seeded::new(seed);
    let (mut ids, mut mask, mut pos) = (Vec::new(), Vec::new(), Vec::new());
    for &len in &LENGTHS {
        let real = rng.ids(len, vocab);
        let pad = T - len;
        for t in 0..T {
            let i = if left {
                t.checked_sub(pad)
            } else {
                (t < len).then_some(t)
            };
            ids.push(i.map_or(0, |i| real[i]));
            mask.push(if i.is_some() { 1f32 } else { 0.0 });
            pos.push(i.unwrap_or(0) as u32);
        }
    }
    let rows = LENGTHS.len();
    Ok(Batch {
        ids: Tensor::from_vec(ids, (rows, T), dev)?,
        mask: Tensor::from_vec(mask, (rows, T), dev)?,
        positions: Tensor::from_vec(pos, (rows, T), dev)?,
    })
}

/// The doctor's Llama: 3 layers, GQA (4 heads, 2 KV heads, head dim 16), llama3 RoPE scaling.
pub(crate) fn llama_config() -> LlamaConfig {
    LlamaConfig {
        hidden_size: 64,
        intermediate_size: 96,
        num_layers: 3,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        vocab_size: 97,
        rms_norm_eps: 1e-5,
        rope_theta: 500_000.0,
        rope_scaling: RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8,
        },
        max_position_embeddings: 128,
        tie_word_embeddings: false,
    }
}

/// The doctor's Phi-3: 2 layers, head dim 16 with 12 rotated features (partial rotary),
/// LongRoPE, a sliding window shorter than the batch.
pub(crate) fn phi3_config() -> Phi3Config {
    let half = 6;
    Phi3Config {
        hidden_size: 64,
        intermediate_size: 80,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        rotary_dim: 2 * half,
        vocab_size: 89,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope: Phi3Rope::LongRope {
            short_factor: (0..half).map(|i| 1.0 + 0.1 * i as f64).collect(),
            long_factor: (0..half).map(|i| 1.5 + 0.3 * i as f64).collect(),
            original_max_position_embeddings: 32,
            attention_factor: 1.1,
        },
        max_position_embeddings: 128,
        tie_word_embeddings: true,
        sliding_window: Some(7),
    }
}

/// Named weight tensors drawn from N(0, 0.15^2) (norm weights around 1), in sorted name order so
/// the draws do not depend on a hash map's order.
fn weights(shapes: Vec<(String, Vec<usize>)>, seed: u64) -> Result<HashMap<String, Tensor>> {
    let mut shapes = shapes;
    shapes.sort();
    let mut rng = Seeded::new(seed);
    let mut out = HashMap::new();
    for (name, shape) in shapes {
        let t = if name.ends_with("norm.weight") {
            (rng.normal(&shape, 0.1, DType::F32, &Device::Cpu)? + 1.0)?
        } else {
            rng.normal(&shape, 0.15, DType::F32, &Device::Cpu)?
        };
        out.insert(name, t);
    }
    Ok(out)
}

fn to_device(t: HashMap<String, Tensor>, dev: &Device) -> Result<HashMap<String, Tensor>> {
    t.into_iter()
        .map(|(k, v)| Ok((k, v.to_device(dev)?)))
        .collect()
}

/// The doctor's Llama in `dtype` on `dev`, the same weights on every device.
pub(crate) fn llama(dtype: DType, dev: &Device) -> Result<Llama> {
    let c = llama_config();
    let (h, i, hd) = (c.hidden_size, c.intermediate_size, c.head_dim);
    let mut shapes = vec![
        (
            "model.embed_tokens.weight".to_string(),
            vec![c.vocab_size, h],
        ),
        ("model.norm.weight".to_string(), vec![h]),
        ("lm_head.weight".to_string(), vec![c.vocab_size, h]),
    ];
    for l in 0..c.num_layers {
        let p = format!("model.layers.{l}");
        for (n, s) in [
            ("self_attn.q_proj", vec![c.num_heads * hd, h]),
            ("self_attn.k_proj", vec![c.num_kv_heads * hd, h]),
            ("self_attn.v_proj", vec![c.num_kv_heads * hd, h]),
            ("self_attn.o_proj", vec![h, c.num_heads * hd]),
            ("mlp.gate_proj", vec![i, h]),
            ("mlp.up_proj", vec![i, h]),
            ("mlp.down_proj", vec![h, i]),
            ("input_layernorm", vec![h]),
            ("post_attention_layernorm", vec![h]),
        ] {
            shapes.push((format!("{p}.{n}.weight"), s));
        }
    }
    let t = to_device(weights(shapes, 11)?, dev)?;
    Ok(Llama::from_tensors(
        c,
        t,
        Path::new("(doctor llama)"),
        dtype,
        dev,
    )?)
}

/// The doctor's Phi-3 in `dtype` on `dev`.
pub(crate) fn phi3(dtype: DType, dev: &Device) -> Result<Phi3> {
    let c = phi3_config();
    let (h, i, hd) = (c.hidden_size, c.intermediate_size, c.head_dim);
    let mut shapes = vec![
        (
            "model.embed_tokens.weight".to_string(),
            vec![c.vocab_size, h],
        ),
        ("model.norm.weight".to_string(), vec![h]),
    ];
    for l in 0..c.num_layers {
        let p = format!("model.layers.{l}");
        for (n, s) in [
            (
                "self_attn.qkv_proj",
                vec![(c.num_heads + 2 * c.num_kv_heads) * hd, h],
            ),
            ("self_attn.o_proj", vec![h, c.num_heads * hd]),
            ("mlp.gate_up_proj", vec![2 * i, h]),
            ("mlp.down_proj", vec![h, i]),
            ("input_layernorm", vec![h]),
            ("post_attention_layernorm", vec![h]),
        ] {
            shapes.push((format!("{p}.{n}.weight"), s));
        }
    }
    let t = to_device(weights(shapes, 12)?, dev)?;
    Ok(Phi3::from_tensors(
        c,
        t,
        Path::new("(doctor phi3)"),
        dtype,
        dev,
    )?)
}

/// The PEFT config of adapter `kind` (lora, dora, boft, oft, hra, full) as the trainer builds it
/// from `adapter.kind=KIND` (its presets), targeting `targets`.
pub(crate) fn adapter_config(kind: &str, targets: &[&str]) -> Result<AdapterConfig> {
    let quoted: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
    let mut overrides = vec![
        format!("adapter.kind={kind}"),
        format!("adapter.target_modules=[{}]", quoted.join(",")),
        "adapter.dropout=0.0".to_string(),
    ];
    // The presets' block sizes fit real models; these widths (64, 80, 96) need small divisors.
    // BOFT with two butterfly factors exercises the butterfly permutations.
    match kind {
        "boft" => overrides.extend(
            [
                "adapter.block_size=4",
                "adapter.block_num=0",
                "adapter.butterfly_factor=2",
            ]
            .map(String::from),
        ),
        "oft" => overrides.extend(["adapter.r=0", "adapter.block_size=8"].map(String::from)),
        "hra" => overrides.push("adapter.r=4".to_string()),
        _ => {}
    }
    let cfg = reprpo_train::TrainConfig::resolve(&reprpo_train::Sources {
        overrides,
        ..Default::default()
    })?;
    Ok(AdapterConfig::from_json(
        cfg.adapter.peft_json(),
        Path::new("(doctor adapter)"),
    )?)
}

/// Add adapter `kind` to `host` and make it active; every parameter is then moved off its
/// initial value by seeded N(0, 0.05^2) noise (LoRA's B starts at zero, the orthogonal kinds at
/// the identity, which would leave half of the gradients zero). Returns the parameters.
pub(crate) fn add_random_adapter(
    host: &mut dyn reprpo_models::adapter::AdapterHost,
    kind: &str,
    targets: &[&str],
    seed: u64,
) -> Result<Vec<(String, Var)>> {
    let cfg = adapter_config(kind, targets)?;
    let idx = peft::add_adapter(host, "doctor", cfg, None, seed)?;
    host.adapter_set_mut().active = Some(idx);
    let params = peft::adapter_params(host, idx);
    let mut rng = Seeded::new(seed + 1);
    for (_, v) in &params {
        let t = v.as_tensor();
        let noise = rng.normal(t.dims(), 0.05, t.dtype(), t.device())?;
        v.set(&(t + noise)?)?;
    }
    Ok(params)
}

/// `t` with the padded positions of `mask` (`[B, T]`) set to zero (`t` is `[B, T, ...]`), so a
/// comparison reads only real positions.
pub(crate) fn real_only(t: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let mut m = mask.to_dtype(t.dtype())?;
    while m.rank() < t.rank() {
        m = m.unsqueeze(m.rank())?;
    }
    Ok(t.broadcast_mul(&m)?)
}
