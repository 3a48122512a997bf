//! Training data: dataset names to tokenised pairs and padded batches on a device.
//!
//! `default`, `default-test` and `default-ood` are the embedded default splits (no file is read);
//! any other name is a recipe from `datasets/*.toml`.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use reprpo_data::tokenize::{self, Layout, TokenizedPair};
use reprpo_data::{Batch, PreferencePair, Tok, TokenizeConfig, default_data, hub, recipe};
use reprpo_models::logps::CountedRows;

use crate::error::Result;

/// Load the preference pairs of `names` (mixed and shuffled with `seed` when there are several
/// recipes; the embedded splits in their own order).
pub fn load_pairs(names: &[String], datasets_dir: &Path, seed: u64) -> Result<Vec<PreferencePair>> {
    let mut out = Vec::new();
    let mut recipes = Vec::new();
    for n in names {
        match n.as_str() {
            "default" => out.extend(default_data::embedded()?.train),
            "default-test" => out.extend(default_data::embedded()?.test),
            "default-ood" => out.extend(default_data::embedded()?.ood),
            _ => recipes.push(n.clone()),
        }
    }
    if !recipes.is_empty() {
        let rs = recipe::resolve(&recipes, datasets_dir)?;
        let root = recipe::workspace_root(datasets_dir);
        let c = recipe::load_mixture_seeded(&rs, &root, &hub::dataset_files, seed)?;
        if c.pairs.is_empty() {
            return Err(reprpo_data::DataError::Invalid(format!(
                "datasets {recipes:?} give no preference pairs (multiple-choice sets are for eval)"
            ))
            .into());
        }
        out.extend(c.pairs);
    }
    Ok(out)
}

/// Move a seeded `fraction` of `pairs` out as a held-out set (`data.eval_split`): at least one
/// pair, and at least one left to train on; the draw is a permutation from
/// `StdRng(seed ^ 0x686f_6c64)` ("hold"), independent of the epoch orders, and both parts keep
/// their original order. Nothing moves for a fraction of 0 or fewer than two pairs.
pub(crate) fn hold_out(
    pairs: &mut Vec<PreferencePair>,
    fraction: f64,
    seed: u64,
) -> Vec<PreferencePair> {
    use rand::SeedableRng;
    use rand::seq::SliceRandom;
    let n = pairs.len();
    if fraction <= 0.0 || n < 2 {
        return Vec::new();
    }
    let k = ((fraction * n as f64).ceil() as usize).clamp(1, n - 1);
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed ^ 0x686f_6c64));
    let mut out_of = vec![false; n];
    for &i in &order[..k] {
        out_of[i] = true;
    }
    let (mut kept, mut held) = (Vec::with_capacity(n - k), Vec::with_capacity(k));
    for (p, out) in pairs.drain(..).zip(out_of) {
        if out { held.push(p) } else { kept.push(p) }
    }
    *pairs = kept;
    held
}

/// Tokenise pairs (dropping none: every pair is cut to the length limits).
pub fn tokenize(
    tok: &Tok,
    pairs: &[PreferencePair],
    cfg: &TokenizeConfig,
) -> Result<Vec<TokenizedPair>> {
    Ok(tokenize::tokenize_pairs(tok, pairs, cfg)?.pairs)
}

/// A batch on a device: ids `[R, T]` u32, attention and loss masks `[R, T]` f32, and (on the
/// host) the positions its counted tokens are predicted from.
///
/// Built with [`DeviceBatch::new`] from the collated host batch, so the counted positions
/// (which the likelihood losses gather on) never have to be read back from the device.
#[derive(Debug, Clone)]
pub struct DeviceBatch {
    /// Token ids.
    pub ids: Tensor,
    /// 1 on real tokens.
    pub attention: Tensor,
    /// 1 on completion tokens.
    pub loss_mask: Tensor,
    /// Pairs (rows `0..pairs` chosen, `pairs..2 pairs` rejected), or rows for SFT.
    pub pairs: usize,
    /// The counted tokens (loss mask 1, position >= 1) of the host batch.
    counted: CountedRows,
}

impl DeviceBatch {
    /// Move a collated batch to `device` (and find its counted positions on the host).
    pub fn new(b: &Batch, pairs: usize, device: &Device) -> Result<Self> {
        let shape = (b.rows, b.seq_len);
        let mask = |m: &[u8]| -> Result<Tensor> {
            Ok(Tensor::from_vec(m.to_vec(), shape, device)?.to_dtype(DType::F32)?)
        };
        Ok(DeviceBatch {
            ids: Tensor::from_vec(b.input_ids.clone(), shape, device)?,
            attention: mask(&b.attention_mask)?,
            loss_mask: mask(&b.loss_mask)?,
            pairs,
            counted: CountedRows::new(&b.input_ids, b.rows, b.seq_len, |i| b.loss_mask[i] > 0),
        })
    }

    /// The counted tokens of the batch: for every row `r` and position `t >= 1` whose loss
    /// mask is 1, the flat index `r T + t - 1` of the predicting position, the token and `r`.
    pub fn counted(&self) -> &CountedRows {
        &self.counted
    }
}

/// Collate pairs (prompt left-padded, completions right-padded) onto `device`.
pub fn pair_batch(pairs: &[&TokenizedPair], pad: u32, device: &Device) -> Result<DeviceBatch> {
    let b = tokenize::collate_pairs(pairs, pad, Layout::PromptLeft)?;
    DeviceBatch::new(&b, pairs.len(), device)
}

/// Collate the chosen sequences only (for SFT), right-padded.
pub fn chosen_batch(pairs: &[&TokenizedPair], pad: u32, device: &Device) -> Result<DeviceBatch> {
    sft_batch(pairs, false, pad, device)
}

/// Collate SFT sequences, right-padded: the chosen completions, or (`both`) the chosen and the
/// rejected ones (a domain language model that prefers neither).
pub(crate) fn sft_batch(
    pairs: &[&TokenizedPair],
    both: bool,
    pad: u32,
    device: &Device,
) -> Result<DeviceBatch> {
    let take = if both { 2 } else { 1 };
    let seqs: Vec<&reprpo_data::Seq> = pairs
        .iter()
        .flat_map(|p| p.seqs.iter().take(take))
        .collect();
    let b = tokenize::collate(&seqs, pad, Layout::Right);
    DeviceBatch::new(&b, seqs.len(), device)
}
