//! Hidden-state analysis (`cargo xtask analyze`): how chosen and rejected completions differ inside
//! the model, layer by layer, for the base and for each adapter side by side.
//!
//! For each subject (the base, then each adapter) and each pair dataset, [`collect()`] runs the
//! pairs through the model once (chosen and rejected rows of one padded batch, hidden states at
//! the chosen layers and the final one, projected onto the vocabulary at the completion
//! positions only) and keeps, per layer, every pair's chosen and rejected hidden
//! states averaged over the completion tokens (the tokens ReprPO trains on), the DPO
//! log-probability margin `log pi(y_c|x) - log pi(y_r|x)` of the analysed model, and the
//! per-token states of the first few pairs. [`layer_stats`] turns one layer of that into the
//! numbers of the summary (see [`stats`] and [`probe`] for the definitions):
//!
//! - whether the preference direction is consistent across pairs (cosines of `c_i - r_i` with
//!   `c_j - r_j`) against the same for unrelated samples (`c_i - c_{i+h}`);
//! - how much of the variance of `c_i - r_i` the top-k principal directions explain;
//! - a linear probe (chosen vs rejected) trained on the first pair dataset and scored on it and on
//!   every other one (the transfer test);
//! - how each per-pair quantity correlates with the DPO margin.
//!
//! [`pictures`] draws them; [`report`] writes the JSON / Markdown summary.

pub mod pictures;
pub mod probe;
pub mod report;
pub mod stats;

use candle_core::{D, DType, IndexOp, Tensor};
use reprpo_data::tokenize::{self, Layout, TokenizeConfig, TokenizedPair};
use reprpo_data::{PreferencePair, Tok};
use reprpo_models::CausalLm;
use reprpo_models::adapter::AdapterHost;
use reprpo_models::llama::ForwardSpec;
use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};
use crate::evaluate::Subject;
use stats::Spread;

/// Settings of an analysis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AnalyzeOptions {
    /// Hidden-state indices (0 is the embedding output, `L` the last block's, negative counts
    /// from `L + 1`); empty: every one of `1..=L` when `L <= 12`, else 12 evenly spaced.
    pub layers: Vec<isize>,
    /// Pairs per dataset (the first ones).
    pub limit: Option<usize>,
    /// The `k` of "variance explained by the top-k principal directions".
    pub top_k: Vec<usize>,
    /// Inverse L2 strength of the probe (scikit-learn's `C`).
    pub probe_c: f64,
    /// Pairs whose per-token hidden states are drawn ("by_token").
    pub by_token_pairs: usize,
    /// Padded tokens per forward.
    pub batch_tokens: usize,
    /// Tokenisation (by default the run's own).
    pub tokenize: TokenizeConfig,
}

impl Default for AnalyzeOptions {
    fn default() -> Self {
        AnalyzeOptions {
            layers: Vec::new(),
            limit: Some(200),
            top_k: vec![1, 2, 5, 10],
            probe_c: 1.0,
            by_token_pairs: 3,
            batch_tokens: 4096,
            tokenize: TokenizeConfig::default(),
        }
    }
}

/// The hidden-state indices to analyse for a model of `num_layers` blocks, checked.
pub fn resolve_layers(spec: &[isize], num_layers: usize) -> Result<Vec<usize>> {
    if spec.is_empty() {
        let n = num_layers.min(12);
        let mut out: Vec<usize> = (1..=n).map(|k| (k * num_layers).div_ceil(n)).collect();
        out.dedup();
        return Ok(out);
    }
    let top = num_layers as isize;
    let mut out = Vec::with_capacity(spec.len());
    for &l in spec {
        let i = if l < 0 { top + 1 + l } else { l };
        if !(0..=top).contains(&i) {
            return Err(EvalError::Config {
                file: "(overrides)".into(),
                key: "layers".into(),
                problem: format!(
                    "{l} is outside the model's hidden states 0..={top} (negative counts from \
                     the end: -1 is {top})"
                ),
            });
        }
        if !out.contains(&(i as usize)) {
            out.push(i as usize);
        }
    }
    Ok(out)
}

/// One layer of one dataset: mean-pooled states, a row per pair.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Pooled {
    /// Chosen completions' states.
    pub chosen: Vec<Vec<f64>>,
    /// Rejected completions' states.
    pub rejected: Vec<Vec<f64>>,
}

/// Per-token hidden states of one pair's completions, `[layer][token][hidden]`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PairTokens {
    /// The pair's id.
    pub id: String,
    /// The chosen completion's tokens.
    pub chosen: Vec<Vec<Vec<f64>>>,
    /// The rejected completion's tokens.
    pub rejected: Vec<Vec<Vec<f64>>>,
}

/// What one subject's forward passes over one dataset give.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Collected {
    /// The dataset's name.
    pub dataset: String,
    /// Hidden-state indices, in order.
    pub layers: Vec<usize>,
    /// Per layer.
    pub pooled: Vec<Pooled>,
    /// Per pair, `log pi(y_c|x) - log pi(y_r|x)` summed over completion tokens.
    pub margin: Vec<f64>,
    /// The first pairs' per-token states.
    pub tokens: Vec<PairTokens>,
}

/// Variance explained by the top `k` principal directions.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TopK {
    /// How many directions.
    pub k: usize,
    /// The fraction of the centred variance they explain.
    pub fraction: f64,
}

/// The probe's scores on one dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeScore {
    /// The dataset.
    pub dataset: String,
    /// Rows classified right (chosen and rejected rows alike).
    pub accuracy: f64,
    /// Pairs whose chosen row gets the larger logit.
    pub pair_accuracy: f64,
}

/// The numbers of one layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerStats {
    /// Hidden-state index.
    pub layer: usize,
    /// Pairs.
    pub pairs: usize,
    /// `cos(c_i - r_i, c_j - r_j)` over `i < j`.
    pub consistency: Option<Spread>,
    /// `cos(s_i, s_j)` over `i < j` for the sample directions `s_i = c_i - c_{i+h}`.
    pub sample_consistency: Option<Spread>,
    /// `cos(c_i - r_i, sum_{j != i} (c_j - r_j))` per pair.
    pub alignment: Option<Spread>,
    /// Variance of `c_i - r_i` explained by the top-k principal directions.
    pub pca: Vec<TopK>,
    /// The same for the sample directions.
    pub sample_pca: Vec<TopK>,
    /// `mean |c_i - r_i| / mean |c_i - c_{i+h}|`: how large the preference difference is against
    /// the difference between unrelated samples.
    pub separation: f64,
    /// The probe on its training dataset first, then on every other dataset.
    pub probe: Vec<ProbeScore>,
    /// Pearson correlation of the per-pair alignment with the DPO margin.
    pub alignment_vs_margin: Option<f64>,
    /// Pearson correlation of the probe's per-pair logit margin with the DPO margin.
    pub probe_vs_margin: Option<f64>,
}

fn mean_norm(rows: &[Vec<f64>]) -> f64 {
    let n = rows.len().max(1) as f64;
    rows.iter()
        .map(|r| r.iter().map(|x| x * x).sum::<f64>().sqrt())
        .sum::<f64>()
        / n
}

fn top(rows: &[Vec<f64>], ks: &[usize]) -> Result<Vec<TopK>> {
    let ratios = stats::explained_variance(rows)?;
    Ok(stats::top_k(&ratios, ks)
        .into_iter()
        .map(|(k, fraction)| TopK { k, fraction })
        .collect())
}

/// The numbers of one layer: `train` (with its pairs' DPO `margin`) gives every statistic and
/// trains the probe, which is also scored on each of `others` (name, states).
pub fn layer_stats(
    layer: usize,
    train: (&str, &Pooled),
    margin: &[f64],
    others: &[(&str, &Pooled)],
    opts: &AnalyzeOptions,
) -> Result<LayerStats> {
    let (name, p) = train;
    let pref = stats::differences(&p.chosen, &p.rejected);
    let sample = stats::sample_differences(&p.chosen);
    let align = stats::alignment(&pref);
    let probe = probe::fit(&p.chosen, &p.rejected, opts.probe_c)?;
    let score = |dataset: &str, q: &Pooled, m: &[f64]| ProbeScore {
        dataset: dataset.to_string(),
        accuracy: probe.accuracy(&q.chosen, &q.rejected),
        pair_accuracy: m.iter().filter(|x| **x > 0.0).count() as f64 / m.len().max(1) as f64,
    };
    let train_margins = probe.pair_margins(&p.chosen, &p.rejected);
    let mut scores = vec![score(name, p, &train_margins)];
    scores.extend(
        others
            .iter()
            .map(|(n, q)| score(n, q, &probe.pair_margins(&q.chosen, &q.rejected))),
    );
    Ok(LayerStats {
        layer,
        pairs: pref.len(),
        consistency: stats::spread(&stats::pairwise_cosines(&pref)),
        sample_consistency: stats::spread(&stats::pairwise_cosines(&sample)),
        alignment: stats::spread(&align),
        pca: top(&pref, &opts.top_k)?,
        sample_pca: top(&sample, &opts.top_k)?,
        separation: mean_norm(&pref) / mean_norm(&sample),
        probe: scores,
        alignment_vs_margin: stats::pearson(&align, margin),
        probe_vs_margin: stats::pearson(&train_margins, margin),
    })
}

/// Rows of `h` (`[rows, T, hidden]`) averaged over the positions where the mask is 1: `m` the mask
/// as f32 `[rows, T, 1]`, `count` its row sums (at least 1) `[rows, 1]`.
fn masked_mean(h: &Tensor, m: &Tensor, count: &Tensor) -> Result<Vec<Vec<f64>>> {
    let sum = h.to_dtype(DType::F32)?.broadcast_mul(m)?.sum(1)?;
    let mean = sum.broadcast_div(count)?.to_dtype(DType::F64)?;
    Ok(mean.to_vec2::<f64>()?)
}

/// The completion tokens' states of row `row` of `h`: `[token][hidden]`.
fn completion_states(h: &Tensor, row: usize, loss_mask: &[u8]) -> Result<Vec<Vec<f64>>> {
    let all = h.i(row)?.to_dtype(DType::F64)?.to_vec2::<f64>()?;
    Ok(all
        .into_iter()
        .zip(loss_mask)
        .filter(|(_, m)| **m == 1)
        .map(|(v, _)| v)
        .collect())
}

/// One padded batch of pairs: per layer the pooled states, the margins, and per-token states of
/// the pairs `keep_tokens` selects (by position in `pairs`).
fn run_pairs<M: CausalLm + ?Sized>(
    model: &M,
    pairs: &[&TokenizedPair],
    layers: &[usize],
    keep_tokens: usize,
    out: &mut Collected,
    ids_of: &[&str],
) -> Result<()> {
    let b = tokenize::collate_pairs(pairs, 0, Layout::Right)?;
    let dev = model.device();
    let (rows, t) = (b.rows, b.seq_len);
    let ids = Tensor::from_vec(b.input_ids.clone(), (rows, t), dev)?;
    let att = Tensor::from_vec(b.attention_mask.clone(), (rows, t), dev)?;
    // The completion mask as f32 and its row sums, once for every layer's pooling.
    let m = Tensor::from_vec(b.loss_mask.clone(), (rows, t), dev)?.to_dtype(DType::F32)?;
    let count = m.sum_keepdim(1)?.clamp(1f32, f32::MAX)?;
    let m = m.unsqueeze(D::Minus1)?;
    // The chosen layers, then the final hidden state (for the log-probabilities) if not among them.
    let last = model.num_layers();
    let mut asked: Vec<isize> = layers.iter().map(|&l| l as isize).collect();
    if !layers.contains(&last) {
        asked.push(last as isize);
    }
    let spec = ForwardSpec {
        hidden_layers: asked,
        ..Default::default()
    };
    let o = model.forward(&ids, Some(&att), None, &spec)?;
    let normed = o
        .hidden
        .iter()
        .find(|(i, _)| *i == last)
        .map(|(_, h)| h)
        .ok_or_else(|| EvalError::Invalid("the forward returned no final hidden state".into()))?;
    let sums = crate::scorer::completion_sums(model, normed, &b)?;
    let n = pairs.len();
    out.margin.extend((0..n).map(|i| sums[i] - sums[n + i]));
    let first_new = out.tokens.len();
    for id in ids_of.iter().take(keep_tokens) {
        out.tokens.push(PairTokens {
            id: id.to_string(),
            ..Default::default()
        });
    }
    for (li, (_, h)) in o.hidden.iter().take(layers.len()).enumerate() {
        let pooled = masked_mean(h, &m, &count)?;
        out.pooled[li].chosen.extend_from_slice(&pooled[..n]);
        out.pooled[li].rejected.extend_from_slice(&pooled[n..]);
        for (k, pt) in out.tokens[first_new..].iter_mut().enumerate() {
            let mask = |r: usize| &b.loss_mask[r * t..(r + 1) * t];
            pt.chosen.push(completion_states(h, k, mask(k))?);
            pt.rejected.push(completion_states(h, n + k, mask(n + k))?);
        }
    }
    Ok(())
}

/// Run `pairs` (of dataset `name`) through the model as it is (its active adapter) and collect
/// the states of `layers`.
pub fn collect<M: CausalLm + ?Sized>(
    model: &M,
    tok: &Tok,
    name: &str,
    pairs: &[PreferencePair],
    layers: &[usize],
    opts: &AnalyzeOptions,
) -> Result<Collected> {
    let t = tokenize::tokenize_pairs(tok, pairs, &opts.tokenize)?;
    let kept: Vec<&str> = pairs
        .iter()
        .map(|p| p.id.as_str())
        .filter(|id| !t.dropped.iter().any(|d| d == id))
        .collect();
    let mut out = Collected {
        dataset: name.to_string(),
        layers: layers.to_vec(),
        pooled: vec![Pooled::default(); layers.len()],
        ..Default::default()
    };
    let mut at = 0;
    while at < t.pairs.len() {
        let width = t.pairs[at].seqs.iter().map(|s| s.len()).max().unwrap_or(1);
        let n = (opts.batch_tokens / (2 * width.max(1)))
            .max(1)
            .min(t.pairs.len() - at);
        let chunk: Vec<&TokenizedPair> = t.pairs[at..at + n].iter().collect();
        let keep = opts.by_token_pairs.saturating_sub(at).min(n);
        run_pairs(model, &chunk, layers, keep, &mut out, &kept[at..at + n])?;
        at += n;
    }
    if out.margin.len() < 2 {
        return Err(EvalError::Invalid(format!(
            "dataset {name}: {} pairs left after tokenisation ({} dropped as too long); the \
             analysis needs at least 2",
            out.margin.len(),
            t.dropped.len()
        )));
    }
    Ok(out)
}

/// One subject's analysis: per layer the statistics (first dataset trains the probe).
#[derive(Debug, Clone, PartialEq)]
pub struct Analysis {
    /// The subject's label (`base` or the adapter's).
    pub subject: String,
    /// The collected states, the first dataset's first.
    pub data: Vec<Collected>,
    /// Per layer.
    pub layers: Vec<LayerStats>,
}

/// Analyse each subject (its adapter made active in turn) on `datasets` (name and pairs; the
/// first trains the probe) at `layers`.
pub fn analyze<M: CausalLm + AdapterHost + ?Sized>(
    model: &mut M,
    tok: &Tok,
    subjects: &[Subject],
    datasets: &[(String, Vec<PreferencePair>)],
    layers: &[usize],
    opts: &AnalyzeOptions,
) -> Result<Vec<Analysis>> {
    if datasets.is_empty() {
        return Err(EvalError::Invalid(
            "analyze needs at least one pair dataset".into(),
        ));
    }
    let mut out = Vec::with_capacity(subjects.len());
    for s in subjects {
        model.adapter_set_mut().active = s.adapter;
        let mut data = Vec::with_capacity(datasets.len());
        for (name, pairs) in datasets {
            data.push(collect(&*model, tok, name, pairs, layers, opts)?);
        }
        let mut per_layer = Vec::with_capacity(layers.len());
        for (li, &layer) in layers.iter().enumerate() {
            let train = &data[0];
            let others: Vec<(&str, &Pooled)> = data[1..]
                .iter()
                .map(|c| (c.dataset.as_str(), &c.pooled[li]))
                .collect();
            per_layer.push(layer_stats(
                layer,
                (&train.dataset, &train.pooled[li]),
                &train.margin,
                &others,
                opts,
            )?);
        }
        out.push(Analysis {
            subject: s.label.clone(),
            data,
            layers: per_layer,
        });
    }
    model.adapter_set_mut().active = None;
    Ok(out)
}
