//! The doctor's model checks: Llama and Phi-3 forwards (logits and every hidden state, left and
//! right padding, early exit), the backward into every adapter kind, gradient checkpointing, the
//! token log-probabilities and greedy generation with the KV cache.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use reprpo_models::adapter::AdapterHost;
use reprpo_models::generate::{Sampling, StopAt, generate};
use reprpo_models::{CausalLm, ForwardSpec, checkpoint, logps};

use super::inputs::{self, Seeded};
use super::{Check, Outputs};

/// What the doctor needs of a model: the forward and its adapters.
trait Model: CausalLm + AdapterHost {}
impl<M: CausalLm + AdapterHost> Model for M {}

/// A model with its adapter's parameters (name, variable).
type WithParams = (Box<dyn Model>, Vec<(String, Var)>);

#[derive(Clone, Copy)]
enum Arch {
    Llama,
    Phi3,
}

impl Arch {
    fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Phi3 => "phi3",
        }
    }

    fn build(self, dtype: DType, dev: &Device) -> Result<Box<dyn Model>> {
        Ok(match self {
            Arch::Llama => Box::new(inputs::llama(dtype, dev)?),
            Arch::Phi3 => Box::new(inputs::phi3(dtype, dev)?),
        })
    }

    fn vocab(self) -> usize {
        match self {
            Arch::Llama => inputs::llama_config().vocab_size,
            Arch::Phi3 => inputs::phi3_config().vocab_size,
        }
    }

    fn layers(self) -> usize {
        match self {
            Arch::Llama => inputs::llama_config().num_layers,
            Arch::Phi3 => inputs::phi3_config().num_layers,
        }
    }

    /// Every adaptable projection.
    fn targets(self) -> &'static [&'static str] {
        match self {
            Arch::Llama => &reprpo_models::llama::PROJECTIONS,
            Arch::Phi3 => &["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
        }
    }

    /// The model with a LoRA adapter (randomised, active) on every projection.
    fn with_lora(self, dtype: DType, dev: &Device) -> Result<WithParams> {
        self.with_adapter("lora", dtype, dev)
    }

    fn with_adapter(self, kind: &str, dtype: DType, dev: &Device) -> Result<WithParams> {
        let mut m = self.build(dtype, dev)?;
        let host: &mut dyn AdapterHost = m.as_mut();
        let params = inputs::add_random_adapter(host, kind, self.targets(), 21)?;
        Ok((m, params))
    }
}

const DTYPES: [DType; 2] = [DType::F32, DType::BF16];
const ADAPTERS: [&str; 6] = ["lora", "dora", "boft", "oft", "hra", "full"];

fn dt_name(dt: DType) -> &'static str {
    match dt {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        DType::F64 => "f64",
        _ => "f32",
    }
}

/// Every model check.
pub(crate) fn checks() -> Vec<Check> {
    let mut v = Vec::new();
    for dt in DTYPES {
        let d = dt_name(dt);
        for arch in [Arch::Llama, Arch::Phi3] {
            let a = arch.name();
            for left in [false, true] {
                let pad = if left { "left" } else { "right" };
                v.push(Check::new(
                    format!("models.{a}.forward.{pad}-pad.{d}"),
                    dt,
                    move |dev| forward(arch, dt, left, dev),
                ));
            }
            v.push(Check::new(
                format!("models.{a}.forward.early-exit.{d}"),
                dt,
                move |dev| early_exit(arch, dt, dev),
            ));
        }
        for kind in ADAPTERS {
            v.push(Check::new(
                format!("models.llama.backward.{kind}.{d}"),
                dt,
                move |dev| backward(Arch::Llama, kind, dt, false, dev),
            ));
        }
        v.push(Check::new(
            format!("models.phi3.backward.lora.{d}"),
            dt,
            move |dev| backward(Arch::Phi3, "lora", dt, false, dev),
        ));
        for arch in [Arch::Llama, Arch::Phi3] {
            v.push(Check::new(
                format!("models.{}.backward.lora.checkpointed.{d}", arch.name()),
                dt,
                move |dev| backward(arch, "lora", dt, true, dev),
            ));
        }
        for arch in [Arch::Llama, Arch::Phi3] {
            let a = arch.name();
            v.push(Check::new(
                format!("models.{a}.kv-cache.logits.{d}"),
                dt,
                move |dev| cached(arch, dt, dev),
            ));
            v.push(Check::new(
                format!("models.{a}.forward-after.{d}"),
                dt,
                move |dev| after(arch, dt, dev),
            ));
        }
        v.push(Check::new(
            format!("logps.token_logps.{d}"),
            dt,
            move |dev| token_logps(dt, dev),
        ));
        v.push(Check::new(
            format!("logps.row_token_logps.{d}"),
            dt,
            move |dev| row_token_logps(dt, dev),
        ));
    }
    for arch in [Arch::Llama, Arch::Phi3] {
        v.push(
            Check::new(
                format!("models.{}.generate.greedy-kv-cache.f32", arch.name()),
                DType::F32,
                move |dev| greedy(arch, dev),
            )
            .exact(),
        );
    }
    v
}

/// Logits and every hidden state (real positions only) of the model with LoRA active.
fn forward(arch: Arch, dt: DType, left: bool, dev: &Device) -> Result<Outputs> {
    let (m, _) = arch.with_lora(dt, dev)?;
    let b = inputs::batch(arch.vocab(), left, 31, dev)?;
    let spec = ForwardSpec {
        hidden_layers: (0..=arch.layers() as isize).collect(),
        logits: true,
        ..Default::default()
    };
    let pos = left.then_some(&b.positions);
    let out = m.forward(&b.ids, Some(&b.mask), pos, &spec)?;
    let mut o = vec![(
        "logits".to_string(),
        inputs::real_only(&out.logits.context("no logits")?, &b.mask)?,
    )];
    for (i, h) in &out.hidden {
        o.push((format!("hidden.{i}"), inputs::real_only(h, &b.mask)?));
    }
    let base = m.forward(
        &b.ids,
        Some(&b.mask),
        pos,
        &ForwardSpec {
            adapters_off: true,
            ..ForwardSpec::logits()
        },
    )?;
    o.push((
        "logits.adapters-off".to_string(),
        inputs::real_only(&base.logits.context("no logits")?, &b.mask)?,
    ));
    Ok(o)
}

/// The first hidden state of a forward that stops after layer 1 (no logits).
fn early_exit(arch: Arch, dt: DType, dev: &Device) -> Result<Outputs> {
    let (m, _) = arch.with_lora(dt, dev)?;
    let b = inputs::batch(arch.vocab(), true, 32, dev)?;
    let spec = ForwardSpec {
        hidden_layers: vec![1],
        logits: false,
        ..Default::default()
    };
    let out = m.forward(&b.ids, Some(&b.mask), Some(&b.positions), &spec)?;
    anyhow::ensure!(out.logits.is_none(), "an early exit returned logits");
    out.hidden
        .iter()
        .map(|(i, h)| Ok((format!("hidden.{i}"), inputs::real_only(h, &b.mask)?)))
        .collect()
}

/// The objective `sum(logits * W)` over real positions and its gradient in every parameter of
/// adapter `kind`.
fn backward(arch: Arch, kind: &str, dt: DType, ckpt: bool, dev: &Device) -> Result<Outputs> {
    let (m, params) = arch.with_adapter(kind, dt, dev)?;
    let b = inputs::batch(arch.vocab(), false, 33, dev)?;
    let spec = ForwardSpec {
        logits: true,
        train: true,
        checkpoint: ckpt,
        dropout_seed: Some(5),
        ..Default::default()
    };
    let out = m.forward(&b.ids, Some(&b.mask), None, &spec)?;
    let logits = out.logits.context("no logits")?.to_dtype(DType::F32)?;
    let w = Seeded::new(34).normal(logits.dims(), 1.0, DType::F32, dev)?;
    let loss = inputs::real_only(&(logits * w)?, &b.mask)?.sum_all()?;
    let grads = checkpoint::backward(&loss)?;
    let mut o = vec![("loss".to_string(), loss)];
    for (name, p) in &params {
        let g = grads
            .get(p.as_tensor())
            .with_context(|| format!("no gradient reached {name}"))?;
        o.push((format!("grad.{name}"), g.clone()));
    }
    Ok(o)
}

/// Random logits `[3, T, V]` (the given dtype) as a variable, ids and the batch's mask.
fn logits_inputs(dt: DType, dev: &Device) -> Result<(Var, Tensor, Tensor)> {
    let v = 257;
    let b = inputs::batch(v, false, 35, dev)?;
    let (rows, t) = b.ids.dims2()?;
    let logits = Seeded::new(36).normal(&[rows, t, v], 3.0, dt, dev)?;
    Ok((Var::from_tensor(&logits)?, b.ids, b.mask))
}

/// `token_logps` (sums, per token) and the gradient of `sum(per_token * W)` in the logits.
fn token_logps(dt: DType, dev: &Device) -> Result<Outputs> {
    let (x, ids, mask) = logits_inputs(dt, dev)?;
    let lp = logps::token_logps(x.as_tensor(), &ids, &mask)?;
    let w = Seeded::new(37).normal(lp.per_token.dims(), 1.0, DType::F32, dev)?;
    let s = (&lp.per_token * w)?.sum_all()?;
    let g = s.backward()?;
    let gx = g
        .get(x.as_tensor())
        .context("no gradient reached the logits")?;
    Ok(vec![
        ("sum".into(), lp.sum),
        ("per_token".into(), lp.per_token),
        ("grad.logits".into(), gx.clone()),
    ])
}

/// `row_token_logps` on the rows of the counted positions and its gradient in the logits.
fn row_token_logps(dt: DType, dev: &Device) -> Result<Outputs> {
    let (x, ids, _) = logits_inputs(dt, dev)?;
    let (rows, t, v) = x.dims3()?;
    let flat = x.as_tensor().reshape((rows * t, v))?;
    let host_ids: Vec<u32> = ids.flatten_all()?.to_vec1()?;
    // Row r predicts token r + 1 of its sequence; take every position but the last.
    let picks: Vec<u32> = (0..rows * t)
        .filter(|i| i % t != t - 1)
        .map(|i| i as u32)
        .collect();
    let targets: Vec<u32> = picks.iter().map(|&i| host_ids[i as usize + 1]).collect();
    let idx = Tensor::from_vec(picks.clone(), picks.len(), dev)?;
    let sel = flat.index_select(&idx, 0)?;
    let lp = logps::row_token_logps(&sel, &targets)?;
    let w = Seeded::new(38).normal(lp.dims(), 1.0, DType::F32, dev)?;
    let s = (&lp * w)?.sum_all()?;
    let g = s.backward()?;
    let gx = g
        .get(x.as_tensor())
        .context("no gradient reached the logits")?;
    Ok(vec![
        ("logps".into(), lp),
        ("grad.logits".into(), gx.clone()),
    ])
}

/// 12 greedy tokens after a prompt, with the KV cache, LoRA active.
fn greedy(arch: Arch, dev: &Device) -> Result<Outputs> {
    let (m, _) = arch.with_lora(DType::F32, dev)?;
    let prompt = Seeded::new(39).ids(6, arch.vocab());
    let toks = generate(
        m.as_ref(),
        &prompt,
        12,
        &Sampling::Greedy,
        &StopAt::default(),
    )?;
    let n = toks.len();
    Ok(vec![(
        "tokens".into(),
        Tensor::from_vec(toks, n, &Device::Cpu)?.to_dtype(DType::F32)?,
    )])
}

/// The last-position logits of `forward_cached` over a 6-token prompt, then over 8 more tokens fed
/// one at a time (teacher-forced: the same tokens on every device, so a near tie cannot change
/// what is compared), past Phi-3's sliding window.
fn cached(arch: Arch, dt: DType, dev: &Device) -> Result<Outputs> {
    let (m, _) = arch.with_lora(dt, dev)?;
    let toks = Seeded::new(40).ids(14, arch.vocab());
    let mut cache = reprpo_models::KvCache::default();
    let mut o = Vec::new();
    let prompt = Tensor::new(&toks[..6], dev)?.unsqueeze(0)?;
    o.push((
        "logits.prompt".to_string(),
        m.forward_cached(&prompt, &mut cache)?,
    ));
    for (i, &t) in toks[6..].iter().enumerate() {
        let step = Tensor::new(&[t], dev)?.unsqueeze(0)?;
        o.push((
            format!("logits.step{i}"),
            m.forward_cached(&step, &mut cache)?,
        ));
    }
    Ok(o)
}

/// `forward_after`: three right-padded continuations (lengths 5, 2, 4) of a cached 5-token
/// prefix in one batch, as prefix-cache scoring runs them; logits at real positions.
fn after(arch: Arch, dt: DType, dev: &Device) -> Result<Outputs> {
    let (m, _) = arch.with_lora(dt, dev)?;
    let mut rng = Seeded::new(43);
    let prefix = Tensor::new(rng.ids(5, arch.vocab()).as_slice(), dev)?.unsqueeze(0)?;
    let mut cache = reprpo_models::KvCache::default();
    m.forward_cached(&prefix, &mut cache)?;
    let (lens, width) = ([5usize, 2, 4], 5);
    let ids = rng.ids(lens.len() * width, arch.vocab());
    let mask: Vec<f32> = lens
        .iter()
        .flat_map(|&n| (0..width).map(move |j| if j < n { 1.0 } else { 0.0 }))
        .collect();
    let ids = Tensor::from_vec(ids, (lens.len(), width), dev)?;
    let mask = Tensor::from_vec(mask, (lens.len(), width), dev)?;
    let logits = m.forward_after(&ids, Some(&mask), &cache)?;
    Ok(vec![("logits".into(), inputs::real_only(&logits, &mask)?)])
}
