//! A linear probe: L2-regularised logistic regression, chosen (label 1) against rejected
//! (label 0), on standardised mean-pooled hidden states — scikit-learn's
//! `make_pipeline(StandardScaler(), LogisticRegression(C=c))`, solved to its exact optimum.
//!
//! Features are standardised with the training rows' mean and population standard deviation (a
//! constant column keeps scale 1). The fit minimises, over the weights `w` and the intercept `b`
//! (not penalised, as scikit-learn's `lbfgs` / `newton-cholesky` solvers do),
//!
//! `f(w, b) = |w|^2 / 2 + C * sum_i log(1 + exp(-y_i (w.x_i + b)))`,  `y_i` in {-1, +1},
//!
//! by Newton's method with a backtracking line search (the problem is strictly convex). With more
//! features than rows, the optimum lies in the span of the rows (the penalty's gradient is `w`, the
//! loss's a combination of rows), so the problem is solved exactly in the coordinates of an
//! orthonormal basis of that span (from a thin SVD) and mapped back: hidden sizes in the
//! thousands cost a few hundred-dimensional Newton steps.

use faer::linalg::solvers::Solve;

use super::stats::to_mat;
use crate::error::{EvalError, Result};

/// A fitted probe.
#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    /// The training features' means.
    pub mean: Vec<f64>,
    /// Their population standard deviations (1 for a constant feature).
    pub scale: Vec<f64>,
    /// Weights on the standardised features.
    pub coef: Vec<f64>,
    /// The intercept.
    pub intercept: f64,
    /// Newton iterations taken.
    pub iterations: usize,
}

/// Newton stops when the squared Newton decrement (twice the predicted decrease of the
/// objective) is below this times the objective: about where f64 rounding of the objective's
/// sums takes over (two or three steps after the quadratic phase starts).
const DECREMENT_TOL: f64 = 1e-15;
const MAX_ITER: usize = 200;

/// `log(1 + exp(x))` without overflow.
fn softplus(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// The logistic problem in some coordinates: rows `z`, labels +-1, strength `c`.
struct Problem {
    z: faer::Mat<f64>,
    y: Vec<f64>,
    c: f64,
}

impl Problem {
    fn margins(&self, v: &[f64], b: f64) -> Vec<f64> {
        (0..self.z.nrows())
            .map(|i| (0..v.len()).map(|j| self.z[(i, j)] * v[j]).sum::<f64>() + b)
            .collect()
    }

    fn objective(&self, v: &[f64], b: f64) -> f64 {
        let reg = 0.5 * v.iter().map(|x| x * x).sum::<f64>();
        let m = self.margins(v, b);
        reg + self.c
            * m.iter()
                .zip(&self.y)
                .map(|(z, y)| softplus(-y * z))
                .sum::<f64>()
    }

    /// Gradient (`r + 1` values, the intercept's last) and Hessian at `(v, b)`.
    fn newton_system(&self, v: &[f64], b: f64) -> (Vec<f64>, faer::Mat<f64>) {
        let (n, r) = (self.z.nrows(), v.len());
        let m = self.margins(v, b);
        let mut g = vec![0.0; r + 1];
        g[..r].copy_from_slice(v);
        // Rows of [z, 1] scaled by sqrt(c p (1 - p)) give the loss's Hessian as a Gram matrix.
        let mut zw = faer::Mat::<f64>::zeros(n, r + 1);
        for i in 0..n {
            let p = sigmoid(m[i]);
            let resid = self.c * (p - (self.y[i] + 1.0) / 2.0);
            let w = (self.c * p * (1.0 - p)).sqrt();
            for j in 0..r {
                g[j] += resid * self.z[(i, j)];
                zw[(i, j)] = w * self.z[(i, j)];
            }
            g[r] += resid;
            zw[(i, r)] = w;
        }
        let mut h = zw.transpose() * &zw;
        for j in 0..r {
            h[(j, j)] += 1.0;
        }
        (g, h)
    }

    /// Newton's method from zero; `(v, b, iterations)`.
    fn solve(&self) -> Result<(Vec<f64>, f64, usize)> {
        let r = self.z.ncols();
        let (mut v, mut b) = (vec![0.0; r], 0.0);
        for it in 0..MAX_ITER {
            let (g, h) = self.newton_system(&v, b);
            let llt = h.llt(faer::Side::Lower).map_err(|e| {
                EvalError::Invalid(format!(
                    "probe: the Hessian is not positive definite: {e:?}"
                ))
            })?;
            let rhs = faer::Mat::from_fn(r + 1, 1, |i, _| -g[i]);
            let step = llt.solve(&rhs);
            let dec: f64 = -(0..=r).map(|i| g[i] * step[(i, 0)]).sum::<f64>();
            let f0 = self.objective(&v, b);
            if dec < DECREMENT_TOL * f0.max(1.0) {
                return Ok((v, b, it));
            }
            let mut t = 1.0;
            loop {
                let nv: Vec<f64> = (0..r).map(|j| v[j] + t * step[(j, 0)]).collect();
                let nb = b + t * step[(r, 0)];
                if self.objective(&nv, nb) <= f0 - 1e-4 * t * dec || t < 1e-12 {
                    (v, b) = (nv, nb);
                    break;
                }
                t *= 0.5;
            }
        }
        Err(EvalError::Invalid(format!(
            "probe: Newton's method did not converge in {MAX_ITER} iterations"
        )))
    }
}

/// Column means and population standard deviations (1 where a column is constant).
fn standardiser(rows: &[Vec<f64>]) -> (Vec<f64>, Vec<f64>) {
    let (n, d) = (rows.len() as f64, rows[0].len());
    let mut mean = vec![0.0; d];
    for r in rows {
        mean.iter_mut().zip(r).for_each(|(m, x)| *m += x / n);
    }
    let mut var = vec![0.0; d];
    for r in rows {
        for j in 0..d {
            var[j] += (r[j] - mean[j]) * (r[j] - mean[j]) / n;
        }
    }
    let scale = var
        .iter()
        .map(|v| if *v > 0.0 { v.sqrt() } else { 1.0 })
        .collect();
    (mean, scale)
}

/// Fit the probe on `pos` (label 1) and `neg` (label 0) rows with inverse regularisation `c`.
pub fn fit(pos: &[Vec<f64>], neg: &[Vec<f64>], c: f64) -> Result<Probe> {
    if pos.is_empty() || neg.is_empty() {
        return Err(EvalError::Invalid(
            "probe: needs rows of both classes".into(),
        ));
    }
    if !(c > 0.0 && c.is_finite()) {
        return Err(EvalError::Invalid(format!(
            "probe: C must be positive, not {c}"
        )));
    }
    let rows: Vec<Vec<f64>> = pos.iter().chain(neg).cloned().collect();
    let (mean, scale) = standardiser(&rows);
    let std_rows: Vec<Vec<f64>> = rows
        .iter()
        .map(|r| (0..r.len()).map(|j| (r[j] - mean[j]) / scale[j]).collect())
        .collect();
    let x = to_mat(&std_rows);
    let y: Vec<f64> = (0..rows.len())
        .map(|i| if i < pos.len() { 1.0 } else { -1.0 })
        .collect();
    // More features than rows: solve in an orthonormal basis of the rows' span.
    let basis = if x.ncols() > x.nrows() {
        let svd = x
            .thin_svd()
            .map_err(|e| EvalError::Invalid(format!("probe: SVD of the features failed: {e:?}")))?;
        let s = svd.S().column_vector();
        let tol = s[0] * 1e-12 * x.ncols() as f64;
        let rank = (0..s.nrows()).filter(|&i| s[i] > tol).count();
        Some(svd.V().subcols(0, rank).to_owned())
    } else {
        None
    };
    let z = match &basis {
        Some(v) => &x * v,
        None => x,
    };
    let (v, intercept, iterations) = Problem { z, y, c }.solve()?;
    let coef = match &basis {
        Some(b) => (0..b.nrows())
            .map(|i| (0..v.len()).map(|k| b[(i, k)] * v[k]).sum())
            .collect(),
        None => v,
    };
    Ok(Probe {
        mean,
        scale,
        coef,
        intercept,
        iterations,
    })
}

impl Probe {
    /// The probe's logit for one row of raw features (positive: classified chosen).
    pub fn logit(&self, x: &[f64]) -> f64 {
        let terms = self
            .coef
            .iter()
            .zip(x)
            .zip(self.mean.iter().zip(&self.scale));
        self.intercept + terms.map(|((w, x), (m, s))| w * (x - m) / s).sum::<f64>()
    }

    /// The fraction of rows classified right: chosen rows with a positive logit and rejected
    /// rows with a non-positive one (scikit-learn's `score`).
    pub fn accuracy(&self, chosen: &[Vec<f64>], rejected: &[Vec<f64>]) -> f64 {
        let right = chosen.iter().filter(|x| self.logit(x) > 0.0).count()
            + rejected.iter().filter(|x| self.logit(x) <= 0.0).count();
        right as f64 / (chosen.len() + rejected.len()).max(1) as f64
    }

    /// Per pair, the chosen row's logit minus the rejected row's.
    pub fn pair_margins(&self, chosen: &[Vec<f64>], rejected: &[Vec<f64>]) -> Vec<f64> {
        chosen
            .iter()
            .zip(rejected)
            .map(|(c, r)| self.logit(c) - self.logit(r))
            .collect()
    }
}
