//! Means with Student-t confidence intervals over seeds, and paired differences.
//!
//! For `n` values `x_i` (one per seed): `mean = (1/n) sum x_i`, the sample standard deviation
//! `sd = sqrt(sum (x_i - mean)^2 / (n - 1))`, and the two-sided interval at level `L`
//! `mean ± t_{(1+L)/2, n-1} sd / sqrt(n)` (as `scipy.stats.ttest_1samp(x).confidence_interval(L)`).
//! A paired difference against a baseline is the same interval over `d_i = x_i - b_i`, seed by
//! seed (as `scipy.stats.ttest_rel(x, b).confidence_interval(L)`): the seed fixes the data order,
//! the SFT stage and the adapter's init, so the pairs share their noise. With one value there is
//! no interval. Checked against SciPy in `tests/all/stats_reference.rs`.

use serde::{Deserialize, Serialize};
use statrs::distribution::{ContinuousCDF, StudentsT};

/// The confidence level of every interval in a report.
pub const LEVEL: f64 = 0.95;

/// A mean and its confidence interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    /// Values.
    pub n: usize,
    /// Their mean.
    pub mean: f64,
    /// Sample standard deviation (`n - 1`); none for one value.
    pub sd: Option<f64>,
    /// Half the interval's width; none for one value.
    pub half_width: Option<f64>,
    /// Lower end; none for one value.
    pub lo: Option<f64>,
    /// Upper end; none for one value.
    pub hi: Option<f64>,
}

/// The `p` quantile of Student's t with `df` degrees of freedom (NaN for `df <= 0` or `p`
/// outside `(0, 1)`).
pub fn t_quantile(p: f64, df: f64) -> f64 {
    if !(p > 0.0 && p < 1.0) {
        return f64::NAN;
    }
    match StudentsT::new(0.0, 1.0, df) {
        Ok(t) => t.inverse_cdf(p),
        Err(_) => f64::NAN,
    }
}

/// The mean of `xs` with its two-sided interval at `level`; `None` for no values.
pub fn mean_ci(xs: &[f64], level: f64) -> Option<Interval> {
    let n = xs.len();
    if n == 0 {
        return None;
    }
    let mean = xs.iter().sum::<f64>() / n as f64;
    if n == 1 {
        return Some(Interval {
            n,
            mean,
            sd: None,
            half_width: None,
            lo: None,
            hi: None,
        });
    }
    let ss: f64 = xs.iter().map(|x| (x - mean) * (x - mean)).sum();
    let sd = (ss / (n - 1) as f64).sqrt();
    let half = t_quantile(0.5 + level / 2.0, (n - 1) as f64) * sd / (n as f64).sqrt();
    Some(Interval {
        n,
        mean,
        sd: Some(sd),
        half_width: Some(half),
        lo: Some(mean - half),
        hi: Some(mean + half),
    })
}

/// The mean of `a_i - b_i` with its interval at `level`; `None` for no pairs. `a` and `b` are
/// matched by position and must have the same length (extra values are ignored).
pub fn paired_ci(a: &[f64], b: &[f64], level: f64) -> Option<Interval> {
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    mean_ci(&d, level)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_value_has_no_interval_and_none_has_no_mean() {
        let one = mean_ci(&[0.5], LEVEL).unwrap();
        assert_eq!((one.mean, one.half_width), (0.5, None));
        assert!(mean_ci(&[], LEVEL).is_none());
        assert!(t_quantile(0.975, 0.0).is_nan());
        assert!(t_quantile(1.0, 3.0).is_nan());
    }
}
