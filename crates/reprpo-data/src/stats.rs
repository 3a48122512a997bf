//! Token-length statistics per field (`cargo xtask data stats`): count, mean, standard deviation,
//! min, quartiles, max, and how many rows the configured limits truncate or drop.

use serde::Serialize;

use crate::error::{DataError, Result};
use crate::tokenize::{self, TokenizeConfig};
use crate::tokenizer::Tok;
use crate::types::PreferencePair;

/// Summary of a list of lengths. Quartiles interpolate linearly between order statistics
/// (numpy's default `percentile`); `std` is the population standard deviation (ddof = 0).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// Number of values.
    pub count: usize,
    /// Mean.
    pub mean: f64,
    /// Population standard deviation.
    pub std: f64,
    /// Minimum.
    pub min: f64,
    /// 25th percentile.
    pub q1: f64,
    /// Median.
    pub median: f64,
    /// 75th percentile.
    pub q3: f64,
    /// Maximum.
    pub max: f64,
}

/// Percentile `q` in [0, 100] of sorted values, linear interpolation.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q / 100.0 * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

impl Summary {
    /// Summarise `values` (NaN fields for an empty list).
    pub fn of(values: &[usize]) -> Summary {
        let mut v: Vec<f64> = values.iter().map(|&x| x as f64).collect();
        v.sort_by(f64::total_cmp);
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        Summary {
            count: v.len(),
            mean,
            std: var.sqrt(),
            min: v.first().copied().unwrap_or(f64::NAN),
            q1: percentile(&v, 25.0),
            median: percentile(&v, 50.0),
            q3: percentile(&v, 75.0),
            max: v.last().copied().unwrap_or(f64::NAN),
        }
    }
}

/// Length statistics of a set of pairs under one tokenisation config.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PairStats {
    /// Prompt tokens before truncation (with BOS where the mode adds it).
    pub prompt: Summary,
    /// Chosen completion tokens before truncation (with EOS).
    pub chosen: Summary,
    /// Rejected completion tokens before truncation (with EOS).
    pub rejected: Summary,
    /// Longest full sequence (prompt + completion) per pair before truncation.
    pub total: Summary,
    /// Pairs the limits truncate.
    pub truncated: usize,
    /// Pairs the limits drop (trl-current with `drop_too_long`) or would reject.
    pub dropped: usize,
}

/// Token-length statistics of `pairs`: lengths without limits, then the count of pairs that the
/// limits of `cfg` truncate or drop.
///
/// # Errors
/// [`DataError::Invalid`] for no pairs (every summary would be NaN), besides tokenisation errors.
pub fn pair_stats(tok: &Tok, pairs: &[PreferencePair], cfg: &TokenizeConfig) -> Result<PairStats> {
    if pairs.is_empty() {
        return Err(DataError::Invalid(
            "no preference pairs to summarise".into(),
        ));
    }
    let unlimited = TokenizeConfig {
        max_length: None,
        max_prompt_length: None,
        ..cfg.clone()
    };
    let raw = tokenize::tokenize_pairs(tok, pairs, &unlimited)?;
    let field =
        |f: &dyn Fn(&tokenize::Group) -> usize| -> Vec<usize> { raw.pairs.iter().map(f).collect() };
    let prompt = field(&|g| g.prompt.len());
    let chosen = field(&|g| g.seqs[0].completion.len());
    let rejected = field(&|g| g.seqs[1].completion.len());
    let total = field(&|g| g.seqs.iter().map(|s| s.len()).max().unwrap_or(0));
    let limited = tokenize::tokenize_pairs(
        tok,
        pairs,
        &TokenizeConfig {
            drop_too_long: true,
            ..cfg.clone()
        },
    )?;
    Ok(PairStats {
        prompt: Summary::of(&prompt),
        chosen: Summary::of(&chosen),
        rejected: Summary::of(&rejected),
        total: Summary::of(&total),
        truncated: limited.pairs.iter().filter(|g| g.truncated).count(),
        dropped: limited.dropped.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::Summary;

    #[test]
    fn summary_matches_numpy() {
        // numpy: np.percentile([1,2,3,4,10], [25,50,75]) = [2., 3., 4.]; np.std = 3.1622776601683795
        let s = Summary::of(&[4, 1, 10, 3, 2]);
        assert_eq!((s.count, s.min, s.max, s.mean), (5, 1.0, 10.0, 4.0));
        assert_eq!((s.q1, s.median, s.q3), (2.0, 3.0, 4.0));
        assert!((s.std - 3.162_277_660_168_379_5).abs() < 1e-12);
        // np.percentile([1,2,3,4], [25,50,75]) = [1.75, 2.5, 3.25]
        let s = Summary::of(&[1, 2, 3, 4]);
        assert_eq!((s.q1, s.median, s.q3), (1.75, 2.5, 3.25));
    }
}
