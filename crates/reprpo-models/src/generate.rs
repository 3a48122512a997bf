//! Generation with a KV cache: greedy (first maximum on ties, as llama2.c) and sampled
//! (temperature, nucleus top-p, seeded).

use candle_core::{DType, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::Result;
use crate::llama::KvCache;
use crate::model::CausalLm;

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq)]
pub enum Sampling {
    /// The most likely token (the first one on ties).
    Greedy,
    /// Sample from softmax(logits / temperature), restricted to the smallest set of most likely
    /// tokens whose probability reaches `top_p` (1.0: no restriction).
    Sample {
        /// Softmax temperature (> 0).
        temperature: f64,
        /// Nucleus mass in (0, 1].
        top_p: f64,
        /// RNG seed.
        seed: u64,
    },
}

/// When to stop.
#[derive(Debug, Clone, Default)]
pub struct StopAt {
    /// Stop before emitting any of these ids.
    pub tokens: Vec<u32>,
}

/// Generate up to `max_new` tokens after `prompt` (batch of one). Returns the new tokens only.
pub fn generate<M: CausalLm + ?Sized>(
    model: &M,
    prompt: &[u32],
    max_new: usize,
    sampling: &Sampling,
    stop: &StopAt,
) -> Result<Vec<u32>> {
    let mut cache = KvCache::default();
    let mut rng = match sampling {
        Sampling::Sample { seed, .. } => Some(StdRng::seed_from_u64(*seed)),
        Sampling::Greedy => None,
    };
    let mut out = Vec::with_capacity(max_new);
    let mut input = prompt.to_vec();
    let mut all = prompt.to_vec();
    for _ in 0..max_new {
        if model.cache_needs_refill(&cache, input.len()) {
            cache = KvCache::default();
            input = all.clone();
        }
        let ids = Tensor::new(input.as_slice(), model.device())?.unsqueeze(0)?;
        let logits = model.forward_cached(&ids, &mut cache)?;
        let logits: Vec<f32> = logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let next = match (sampling, rng.as_mut()) {
            (
                Sampling::Sample {
                    temperature, top_p, ..
                },
                Some(rng),
            ) => sample(&logits, *temperature, *top_p, rng),
            _ => argmax(&logits),
        };
        if stop.tokens.contains(&next) {
            break;
        }
        out.push(next);
        all.push(next);
        input = vec![next];
    }
    Ok(out)
}

/// Index of the first maximum.
pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

/// One draw from softmax(logits / temperature) restricted to the top-p nucleus.
pub fn sample(logits: &[f32], temperature: f64, top_p: f64, rng: &mut StdRng) -> u32 {
    if temperature <= 0.0 {
        return argmax(logits);
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i, ((f64::from(l) - f64::from(max)) / temperature).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut kept = 0;
    let mut mass = 0.0;
    for (_, p) in &probs {
        mass += p / total;
        kept += 1;
        if mass >= top_p {
            break;
        }
    }
    let nucleus = &probs[..kept];
    let z: f64 = nucleus.iter().map(|p| p.1).sum();
    let mut u = rng.random::<f64>() * z;
    for &(i, p) in nucleus {
        if u < p {
            return i as u32;
        }
        u -= p;
    }
    nucleus.last().map_or(0, |p| p.0 as u32)
}
