//! Llama (2, 3, 3.1, 3.2) on candle for training: one forward gives logits for every position
//! and the hidden states of the layers asked for, honours left and right padding, and can stop
//! after the deepest layer a hidden-state loss needs.
//!
//! Only differentiable ops are used (see `../shared/docs/candle-notes.md`): RMSNorm, softmax,
//! RoPE and SwiGLU are the fused ops of [`crate::ops`] with their own backward (written out on
//! other devices), and masks use a large finite negative value (never `-inf`, which turns fully
//! masked rows into NaN).
//!
//! # Hidden-state convention (as `transformers`' `output_hidden_states`)
//! There are `L + 1` states: index 0 is the token embeddings, index `i` (1..L-1) the output of
//! layer `i`, and index `L` the output of the last layer after the final norm.
//!
//! This file has Llama's weights, block and RoPE tables; the stack around the blocks (full and
//! cached forwards, masks, hidden states, checkpointing) is `crate::decoder`, shared with Phi-3.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{D, DType, Device, Tensor};

use crate::adapter::{AdapterHost, AdapterSet, Ctx, Linear};
use crate::config::LlamaConfig;
use crate::decoder::{self, Decoder, KvSlot, Stack};
use crate::error::{ModelError, Result};
use crate::weights::{LazyFiles, LoadOptions, Loader};

/// The additive mask value for disallowed attention: finite, so fully masked rows stay finite.
pub const MASK_VALUE: f32 = -1e30;

/// The seven linear projections of a Llama block (the module names PEFT's `target_modules`
/// match): attention `q/k/v/o_proj`, MLP `gate/up/down_proj`.
pub const PROJECTIONS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

pub use crate::ops::{rms_norm, rotate_half};

/// One decoder layer.
#[derive(Debug, Clone)]
pub struct Block {
    input_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    post_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// What a forward should return.
#[derive(Debug, Clone, Default)]
pub struct ForwardSpec {
    /// Hidden-state indices to return (0..=L, see the module docs); negative counts from L+1.
    pub hidden_layers: Vec<isize>,
    /// Whether to compute logits (false: stop after the deepest requested layer).
    pub logits: bool,
    /// Run with adapters off (the base model), whatever adapter is active.
    pub adapters_off: bool,
    /// Run as the reference model: with the adapter set's `reference` adapter (a frozen copy of
    /// the initial adapter, read detached) when it has one, else with adapters off.
    /// `adapters_off` wins over it.
    pub reference: bool,
    /// Training mode (adapter dropout).
    pub train: bool,
    /// Gradient checkpointing: keep only each decoder block's input for the backward pass and
    /// recompute the block there (see [`crate::checkpoint`]; read the gradients with
    /// [`crate::checkpoint::backward`]).
    pub checkpoint: bool,
    /// Draw adapter dropout masks from generators seeded with this value (per block, see
    /// `checkpoint::block_seed`) instead of candle's; a checkpointed forward without it
    /// draws a fresh seed.
    pub dropout_seed: Option<u64>,
    /// Side activations to return: inputs or outputs of linear modules (see
    /// [`crate::collect`]). Without logits the forward stops after the deepest block holding a
    /// tap or a requested hidden state; with `checkpoint`, blocks holding a tap are not
    /// checkpointed.
    pub taps: Vec<crate::collect::Tap>,
    /// projbp's hooks: the outputs of the modules they name are wrapped in an identity whose
    /// backward rewrites their gradient (see [`crate::gradproj`]); ignored by reference
    /// forwards, which keep no graph. Checkpointed blocks take them into their recomputation.
    pub grad_hooks: Option<std::sync::Arc<crate::gradproj::GradHooks>>,
}

impl ForwardSpec {
    /// Logits only.
    pub fn logits() -> Self {
        ForwardSpec {
            logits: true,
            ..Default::default()
        }
    }
}

/// What a forward returned.
#[derive(Debug, Clone)]
pub struct Output {
    /// `[B, T, vocab]` when asked for.
    pub logits: Option<Tensor>,
    /// `(index, [B, T, hidden])` in the order asked for.
    pub hidden: Vec<(usize, Tensor)>,
    /// `(module, [B, T, in or out])` for each of [`ForwardSpec::taps`], in the order asked for.
    pub taps: Vec<(String, Tensor)>,
}

/// Per-layer key/value cache for generation.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    pub(crate) kv: Vec<Option<(Tensor, Tensor)>>,
    /// Tokens already in the cache.
    pub len: usize,
}

/// A Llama model with frozen base weights.
#[derive(Debug, Clone)]
pub struct Llama {
    /// The validated config.
    pub config: LlamaConfig,
    embed: Tensor,
    layers: Vec<Block>,
    norm: Tensor,
    lm_head: Tensor,
    inv_freq: Tensor,
    dtype: DType,
    device: Device,
    /// Registered adapters.
    pub adapters: AdapterSet,
}

/// Read every tensor of a model folder: `model.safetensors`, or the shards listed in
/// `model.safetensors.index.json`.
pub fn load_safetensors(dir: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let files = crate::weights::model_files(dir)?;
    let mut out = HashMap::new();
    for f in files {
        let part = candle_core::safetensors::load(&f, device).map_err(|e| ModelError::Format {
            file: f.clone(),
            problem: e.to_string(),
        })?;
        out.extend(part);
    }
    Ok(out)
}

impl Llama {
    /// Load `dir/config.json` and the safetensors weights, cast to `dtype`, on `device`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_with(dir, &LoadOptions::dense(dtype, device))
    }

    /// Load `dir/config.json` and the safetensors weights tensor by tensor with `opts` (the
    /// linear weights quantised on the way in when `opts.quantize` says so, or read
    /// pre-quantised from a bitsandbytes checkpoint).
    pub fn load_with(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let config = LlamaConfig::from_dir(dir)?;
        let mut files = LazyFiles::open(dir)?;
        Self::from_source(config, &mut Loader::new(&mut files, dir, opts), opts)
    }

    /// Build from named tensors (HF names, `model.` prefix).
    pub fn from_tensors(
        config: LlamaConfig,
        mut t: HashMap<String, Tensor>,
        file: &Path,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let opts = LoadOptions::dense(dtype, device);
        Self::from_source(config, &mut Loader::new(&mut t, file, &opts), &opts)
    }

    /// Build from the tensors a [`Loader`] gives.
    pub fn from_source(
        config: LlamaConfig,
        t: &mut Loader<'_>,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let (dtype, device) = (opts.dtype, &opts.device);
        let c = &config;
        let (h, i, hd) = (c.hidden_size, c.intermediate_size, c.head_dim);
        let embed = t.dense("model.embed_tokens.weight", &[c.vocab_size, h])?;
        let mut layers = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            let p = format!("model.layers.{l}");
            let mut lin = |name: &str, out: usize, inp: usize| -> Result<Linear> {
                t.linear(&format!("{p}.{name}"), out, inp)
            };
            let q = lin("self_attn.q_proj", c.num_heads * hd, h)?;
            let k = lin("self_attn.k_proj", c.num_kv_heads * hd, h)?;
            let v = lin("self_attn.v_proj", c.num_kv_heads * hd, h)?;
            let o = lin("self_attn.o_proj", h, c.num_heads * hd)?;
            let gate = lin("mlp.gate_proj", i, h)?;
            let up = lin("mlp.up_proj", i, h)?;
            let down = lin("mlp.down_proj", h, i)?;
            layers.push(Block {
                input_norm: t.dense(&format!("{p}.input_layernorm.weight"), &[h])?,
                post_norm: t.dense(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                q,
                k,
                v,
                o,
                gate,
                up,
                down,
            });
        }
        let norm = t.dense("model.norm.weight", &[h])?;
        let lm_head = if c.tie_word_embeddings {
            embed.clone()
        } else {
            t.dense("lm_head.weight", &[c.vocab_size, h])?
        };
        let inv: Vec<f32> = c.inv_freq().into_iter().map(|x| x as f32).collect();
        let n = inv.len();
        let inv_freq = Tensor::from_vec(inv, (1, 1, n), device)?;
        Ok(Llama {
            config,
            embed,
            layers,
            norm,
            lm_head,
            inv_freq,
            dtype,
            device: device.clone(),
            adapters: AdapterSet::default(),
        })
    }

    /// A randomly initialised model: every projection and the embedding drawn from N(0, std^2),
    /// norms 1, each tensor made in `dtype` on `device` one at a time (the model is never whole in
    /// f32 anywhere unless `dtype` is f32).
    ///
    /// On the CPU the draws come from a seeded generator on the host: the same seed gives the same
    /// weights on every machine. On other devices each tensor is drawn on the device by its own
    /// generator (curand on CUDA, reseeded with `seed` first, in f32 since curand has no bf16)
    /// and then cast: seeded and repeatable on that device, but not the CPU's numbers. Drawing an
    /// 8B-parameter model on the host would take minutes and a 32 GB f32 copy.
    pub fn random(
        config: LlamaConfig,
        std: f64,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::random_with(config, std, seed, &LoadOptions::dense(dtype, device))
    }

    /// [`Llama::random`] loaded with `opts`: with `opts.quantize` each projection is quantised
    /// as soon as it is drawn, so the model is never whole in full precision.
    pub fn random_with(
        config: LlamaConfig,
        std: f64,
        seed: u64,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let mut src = RandomSource::new(&config, std, seed, opts.dtype, &opts.device)?;
        let origin = Path::new("(random)");
        Self::from_source(config, &mut Loader::new(&mut src, origin, opts), opts)
    }

    /// The weights' dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The vocabulary projection of final hidden states `[N, hidden]` -> logits `[N, vocab]`.
    pub fn project(&self, normed: &Tensor) -> Result<Tensor> {
        crate::frozen::frozen_matmul(normed, &self.lm_head)
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// `cos`, `sin` of shape `[B, 1, T, head_dim]` for positions `[B, T]`.
    fn rope_tables(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        let pos = positions.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?;
        let freqs = pos.broadcast_mul(&self.inv_freq)?;
        let emb = Tensor::cat(&[&freqs, &freqs], D::Minus1)?.unsqueeze(1)?;
        Ok((
            emb.cos()?.to_dtype(self.dtype)?,
            emb.sin()?.to_dtype(self.dtype)?,
        ))
    }

    /// A forward over a padded batch.
    ///
    /// `input_ids`: `[B, T]` u32. `attention_mask`: `[B, T]`, 1 on real tokens (any numeric dtype;
    /// `None` = all real). `position_ids`: `[B, T]`; `None` = `0..T` for every row, which is what a
    /// plain `transformers` forward uses whatever the padding.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: Option<&Tensor>,
        spec: &ForwardSpec,
    ) -> Result<Output> {
        decoder::forward(self, input_ids, attention_mask, position_ids, spec)
    }

    /// Logits `[C, n, vocab]` at every position of `C` right-padded continuations `ids`
    /// (`[C, n]`, `attention_mask` 1 = real token) of the prefix in `cache` (filled by
    /// [`Llama::forward_cached`], batch 1 or `C`), in one batched forward: row `c` attends to the
    /// whole prefix and to its own earlier real tokens, at positions `cache.len + i`. Logits at
    /// position `i` predict token `i + 1`; the prefix's last logits (from `forward_cached`)
    /// predict token 0. The cache is not changed, so every continuation of one prompt reuses the
    /// prompt's keys and values instead of recomputing them (multiple-choice scoring).
    pub fn forward_after(
        &self,
        ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &KvCache,
    ) -> Result<Tensor> {
        decoder::forward_after(self, ids, attention_mask, cache)
    }

    /// Logits of the last position for new tokens `ids` (`[1, n]`) after the cached ones;
    /// updates the cache. No padding: for generation.
    pub fn forward_cached(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        decoder::forward_cached(self, ids, cache)
    }
}

impl Block {
    fn linears(&self) -> [&Linear; 7] {
        [
            &self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down,
        ]
    }

    fn linears_mut(&mut self) -> [&mut Linear; 7] {
        [
            &mut self.q,
            &mut self.k,
            &mut self.v,
            &mut self.o,
            &mut self.gate,
            &mut self.up,
            &mut self.down,
        ]
    }
}

impl AdapterHost for Llama {
    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        self.layers
            .iter_mut()
            .flat_map(|b| b.linears_mut())
            .collect()
    }

    fn linears(&self) -> Vec<&Linear> {
        self.layers.iter().flat_map(|b| b.linears()).collect()
    }

    fn adapter_set(&self) -> &AdapterSet {
        &self.adapters
    }

    fn adapter_set_mut(&mut self) -> &mut AdapterSet {
        &mut self.adapters
    }
}

impl ForwardSpec {
    /// The adapter state of a forward: `active`, `reference` for a reference forward, none when
    /// this spec turns adapters off.
    pub fn ctx(&self, active: Option<usize>, reference: Option<usize>) -> Ctx<'static> {
        let adapter = if self.adapters_off {
            None
        } else if self.reference {
            reference
        } else {
            active
        };
        Ctx {
            adapter,
            train: self.train,
            taps: None,
            grad_hooks: None,
        }
    }
}

impl Decoder for Llama {
    fn stack(&self) -> Stack<'_> {
        Stack {
            embed: &self.embed,
            norm: &self.norm,
            eps: self.config.rms_norm_eps,
            lm_head: &self.lm_head,
            num_layers: self.config.num_layers,
            active: self.adapters.active,
            reference: self.adapters.reference,
            device: &self.device,
        }
    }

    fn rope(&self, positions: &Tensor, _total: Option<usize>) -> Result<(Tensor, Tensor)> {
        self.rope_tables(positions)
    }

    fn block(
        &self,
        l: usize,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        ctx: &Ctx,
        cache: Option<&mut KvSlot>,
    ) -> Result<Tensor> {
        let blk = &self.layers[l];
        let c = &self.config;
        let (b, t, _) = x.dims3()?;
        let h = rms_norm(x, &blk.input_norm, c.rms_norm_eps)?;
        let proj = |lin: &Linear, heads: usize| -> Result<Tensor> {
            Ok(lin
                .forward(&h, ctx)?
                .reshape((b, t, heads, c.head_dim))?
                .transpose(1, 2)?)
        };
        let q = crate::ops::rope(&proj(&blk.q, c.num_heads)?, cos, sin)?;
        let mut k = crate::ops::rope(&proj(&blk.k, c.num_kv_heads)?, cos, sin)?;
        let mut v = proj(&blk.v, c.num_kv_heads)?.contiguous()?;
        if let Some(slot) = cache {
            if let Some((pk, pv)) = slot.as_ref() {
                k = Tensor::cat(&[pk, &k], 2)?;
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            *slot = Some((k.clone(), v.clone()));
        }
        let attn = crate::ops::attention(&q, &k, &v, mask)?;
        let x = (x + blk.o.forward(&attn, ctx)?)?;
        let h = rms_norm(&x, &blk.post_norm, c.rms_norm_eps)?;
        let act = crate::ops::silu_mul(&blk.gate.forward(&h, ctx)?, &blk.up.forward(&h, ctx)?)?;
        let mlp = blk.down.forward(&act, ctx)?;
        Ok((x + mlp)?)
    }

    fn layer_linears(&self, l: usize) -> Vec<&Linear> {
        self.layers[l].linears().to_vec()
    }
}

/// The tensors of [`Llama::random`], drawn on request in one fixed order (embedding, final norm,
/// output head, then each layer's projections and norms) from one generator, whatever order the
/// loader asks in: a tensor asked for before its turn draws the ones before it, which wait in
/// `ready` (only the output head, since the loader asks for it last).
struct RandomSource {
    /// `(name, shape, drawn: N(0, std^2), else ones)` in drawing order.
    plan: Vec<(String, Vec<usize>, bool)>,
    next: usize,
    ready: HashMap<String, Tensor>,
    rng: rand::rngs::StdRng,
    std: f64,
    dtype: DType,
    device: Device,
}

impl RandomSource {
    fn new(c: &LlamaConfig, std: f64, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        use rand::SeedableRng;
        if !device.is_cpu() {
            device.set_seed(seed)?;
        }
        let (h, i, hd) = (c.hidden_size, c.intermediate_size, c.head_dim);
        let mut plan = vec![
            (
                "model.embed_tokens.weight".to_string(),
                vec![c.vocab_size, h],
                true,
            ),
            ("model.norm.weight".to_string(), vec![h], false),
        ];
        if !c.tie_word_embeddings {
            plan.push(("lm_head.weight".to_string(), vec![c.vocab_size, h], true));
        }
        for l in 0..c.num_layers {
            let p = format!("model.layers.{l}");
            for (n, o, inp) in [
                ("self_attn.q_proj", c.num_heads * hd, h),
                ("self_attn.k_proj", c.num_kv_heads * hd, h),
                ("self_attn.v_proj", c.num_kv_heads * hd, h),
                ("self_attn.o_proj", h, c.num_heads * hd),
                ("mlp.gate_proj", i, h),
                ("mlp.up_proj", i, h),
                ("mlp.down_proj", h, i),
            ] {
                plan.push((format!("{p}.{n}.weight"), vec![o, inp], true));
            }
            plan.push((format!("{p}.input_layernorm.weight"), vec![h], false));
            plan.push((
                format!("{p}.post_attention_layernorm.weight"),
                vec![h],
                false,
            ));
        }
        Ok(RandomSource {
            plan,
            next: 0,
            ready: HashMap::new(),
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            std,
            dtype,
            device: device.clone(),
        })
    }

    /// Draw `shape` from N(0, std^2): Box-Muller on the seeded host generator on the CPU,
    /// the device's generator elsewhere.
    fn normal(&mut self, shape: &[usize]) -> Result<Tensor> {
        use rand::Rng;
        let t = if self.device.is_cpu() {
            let n: usize = shape.iter().product();
            let std = self.std;
            let rng = &mut self.rng;
            let mut draw = move || -> f32 {
                let u1: f64 = rng.random::<f64>().max(1e-300);
                let u2: f64 = rng.random();
                (std * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
            };
            // Half precision is rounded as drawn (as `to_dtype` rounds), so an 8B model's
            // 2 GiB f32 head is never held beside its bf16 copy.
            let dev = &self.device;
            match self.dtype {
                DType::BF16 => {
                    let v: Vec<half::bf16> = (0..n).map(|_| half::bf16::from_f32(draw())).collect();
                    Tensor::from_vec(v, shape, dev)?
                }
                DType::F16 => {
                    let v: Vec<half::f16> = (0..n).map(|_| half::f16::from_f32(draw())).collect();
                    Tensor::from_vec(v, shape, dev)?
                }
                _ => Tensor::from_vec((0..n).map(|_| draw()).collect::<Vec<f32>>(), shape, dev)?,
            }
        } else {
            Tensor::randn(0f32, self.std as f32, shape, &self.device)?
        };
        Ok(t.to_dtype(self.dtype)?)
    }
}

impl crate::weights::TensorSource for RandomSource {
    fn take_raw(&mut self, name: &str, device: &Device) -> Result<Option<Tensor>> {
        while !self.ready.contains_key(name) && self.next < self.plan.len() {
            let (n, shape, drawn) = self.plan[self.next].clone();
            self.next += 1;
            let t = if drawn {
                self.normal(&shape)?
            } else {
                Tensor::ones(shape, self.dtype, &self.device)?
            };
            self.ready.insert(n, t);
        }
        match self.ready.remove(name) {
            Some(t) => Ok(Some(t.to_device(device)?)),
            None => Ok(None),
        }
    }

    fn names(&self) -> Vec<String> {
        let pending = self.plan[self.next..].iter().map(|(n, _, _)| n.clone());
        self.ready.keys().cloned().chain(pending).collect()
    }
}
