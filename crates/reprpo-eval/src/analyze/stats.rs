//! The statistics of the hidden-state analysis, in f64 on mean-pooled hidden states (one row per
//! pair, one column per neuron), each written so that NumPy / scikit-learn give the same number
//! (`tests/reference/gen_analyze_fixtures.py`, checked in `tests/all/analyze_reference.rs`).
//!
//! With `c_i`, `r_i` the chosen and rejected states of pair `i` (of `n`):
//! - preference directions `p_i = c_i - r_i` ("A1-B1"); sample directions
//!   `s_i = c_i - c_{i+h}`, `i < h = n / 2` ("A1-A2", the chosen states of two unrelated pairs,
//!   each pair used once) and their rejected counterpart `r_i - r_{i+h}` ("B1-B2"). There are
//!   half as many sample directions, so their top-k variance fractions are if anything larger
//!   by chance: the baseline errs on the generous side;
//! - [`cosine`]`(a, b) = a.b / (|a| |b|)`, 0 when either norm is 0;
//! - consistency: the [`Spread`] of `cos(p_i, p_j)` over all `i < j`, against the same for the `s_i`;
//! - alignment: `cos(p_i, sum_{j != i} p_j)` per pair (leave-one-out), whose correlation with the
//!   DPO log-probability margin says whether pairs that point along the common direction are the
//!   ones the model already prefers;
//! - [`explained_variance`]: the fraction of the (centred) variance of the `p_i` along each
//!   principal direction, largest first (scikit-learn's `PCA().explained_variance_ratio_`);
//! - [`pearson`]: NumPy's `corrcoef`.

use crate::error::{EvalError, Result};

/// Summary of a distribution of values.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Spread {
    /// How many values.
    pub count: usize,
    /// Their mean.
    pub mean: f64,
    /// Their standard deviation (population, `ddof = 0`).
    pub sd: f64,
    /// 10% quantile (NumPy's default linear interpolation).
    pub q10: f64,
    /// Median.
    pub q50: f64,
    /// 90% quantile.
    pub q90: f64,
}

/// `a.b / (|a| |b|)`, 0 when either vector is zero.
pub fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 || bb == 0.0 {
        return 0.0;
    }
    ab / (aa.sqrt() * bb.sqrt())
}

/// `a_i - b_i` row by row.
pub fn differences(a: &[Vec<f64>], b: &[Vec<f64>]) -> Vec<Vec<f64>> {
    a.iter()
        .zip(b)
        .map(|(x, y)| x.iter().zip(y).map(|(u, v)| u - v).collect())
        .collect()
}

/// `a_i - a_{i+h}` for `i < h = n / 2`: differences of unrelated rows, each row used once (so the
/// directions are independent; differences of a cycle `a_i - a_{i+1}` would sum to zero and have
/// a mean pairwise cosine near `-1 / (n - 1)` whatever the data).
pub fn sample_differences(a: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let h = a.len() / 2;
    (0..h)
        .map(|i| a[i].iter().zip(&a[i + h]).map(|(u, v)| u - v).collect())
        .collect()
}

/// The cosines of every two rows `i < j`.
pub fn pairwise_cosines(rows: &[Vec<f64>]) -> Vec<f64> {
    let mut out = Vec::with_capacity(rows.len() * rows.len().saturating_sub(1) / 2);
    for i in 0..rows.len() {
        for j in i + 1..rows.len() {
            out.push(cosine(&rows[i], &rows[j]));
        }
    }
    out
}

/// `cos(p_i, sum_{j != i} p_j)` for each row.
pub fn alignment(rows: &[Vec<f64>]) -> Vec<f64> {
    let d = rows.first().map_or(0, Vec::len);
    let mut total = vec![0.0; d];
    for r in rows {
        for (t, x) in total.iter_mut().zip(r) {
            *t += x;
        }
    }
    rows.iter()
        .map(|r| {
            let others: Vec<f64> = total.iter().zip(r).map(|(t, x)| t - x).collect();
            cosine(r, &others)
        })
        .collect()
}

/// The mean over rows of each column's absolute value (the "by_h" profile of differences).
pub fn mean_abs(rows: &[Vec<f64>]) -> Vec<f64> {
    let d = rows.first().map_or(0, Vec::len);
    let mut out = vec![0.0; d];
    for r in rows {
        for (o, x) in out.iter_mut().zip(r) {
            *o += x.abs();
        }
    }
    let n = rows.len().max(1) as f64;
    out.iter_mut().for_each(|o| *o /= n);
    out
}

/// Quantile `q` of sorted values with NumPy's default (linear) interpolation.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = (lo + 1).min(sorted.len() - 1);
    sorted[lo] + (pos - lo as f64) * (sorted[hi] - sorted[lo])
}

/// Mean, standard deviation and quantiles; `None` for no values or a non-finite one.
pub fn spread(xs: &[f64]) -> Option<Spread> {
    if xs.is_empty() || xs.iter().any(|x| !x.is_finite()) {
        return None;
    }
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
    let mut sorted = xs.to_vec();
    sorted.sort_by(f64::total_cmp);
    Some(Spread {
        count: xs.len(),
        mean,
        sd: var.sqrt(),
        q10: quantile(&sorted, 0.1),
        q50: quantile(&sorted, 0.5),
        q90: quantile(&sorted, 0.9),
    })
}

/// Pearson's correlation of `x` and `y`; `None` with fewer than 3 values, different lengths or a
/// constant (or non-finite) input.
pub fn pearson(x: &[f64], y: &[f64]) -> Option<f64> {
    if x.len() != y.len() || x.len() < 3 {
        return None;
    }
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
        syy += (b - my) * (b - my);
    }
    let r = sxy / (sxx.sqrt() * syy.sqrt());
    r.is_finite().then_some(r)
}

/// Rows as a faer matrix.
pub(crate) fn to_mat(rows: &[Vec<f64>]) -> faer::Mat<f64> {
    let d = rows.first().map_or(0, Vec::len);
    faer::Mat::from_fn(rows.len(), d, |i, j| rows[i][j])
}

/// The fraction of the centred variance of the rows along each principal direction, largest
/// first (`min(n, d)` values summing to 1; all zero when the rows are all equal).
pub fn explained_variance(rows: &[Vec<f64>]) -> Result<Vec<f64>> {
    let n = rows.len();
    if n == 0 {
        return Ok(Vec::new());
    }
    let d = rows[0].len();
    let mut mean = vec![0.0; d];
    for r in rows {
        mean.iter_mut().zip(r).for_each(|(m, x)| *m += x / n as f64);
    }
    let centred = faer::Mat::from_fn(n, d, |i, j| rows[i][j] - mean[j]);
    let s = centred
        .singular_values()
        .map_err(|e| EvalError::Invalid(format!("SVD of the preference directions: {e:?}")))?;
    let total: f64 = s.iter().map(|x| x * x).sum();
    Ok(s.iter()
        .map(|x| if total > 0.0 { x * x / total } else { 0.0 })
        .collect())
}

/// `(k, sum of the k largest fractions)` for each `k` of `ks` that is at most `ratios.len()`.
pub fn top_k(ratios: &[f64], ks: &[usize]) -> Vec<(usize, f64)> {
    ks.iter()
        .filter(|&&k| k >= 1 && k <= ratios.len())
        .map(|&k| (k, ratios[..k].iter().sum()))
        .collect()
}
