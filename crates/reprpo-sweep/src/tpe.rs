//! TPE search (`method = "tpe"` in `[search]`): the tree-structured Parzen estimator of Bergstra
//! et al. (2011), Optuna's default sampler, from the `tpe` crate (one univariate estimator per
//! key, as Optuna's default `multivariate=False`).
//!
//! ```toml
//! [search]
//! method = "tpe"
//! budget = 16            # trials in all
//! startup = 6            # random trials first (the same draws as method = "random")
//! batch = 2              # trials TPE proposes per round
//! objective = { suite = "train-job", dataset = "default-ood", goal = "max" }
//! [search.space]
//! "train.lr" = { log_uniform = [1e-5, 1e-3] }
//! ```
//!
//! A sweep is planned in rounds: planning gives the startup trials; each time planning finds every
//! run of every trial so far finished (in the sweep folder), it reads each trial's objective (the
//! mean of the metric on `objective.dataset` of `objective.suite` over the trial's runs: its
//! seeds, variants and axis values; a trial with no finite value, whose runs failed, is told as
//! the worst value of the others), tells TPE the trials in order and asks for the next `batch`
//! points, until `budget`. Proposals are a
//! deterministic function of the seed, the round and the results (SplitMix64 drives the
//! estimator's sampling), so planning again with the same results plans the same runs, and a
//! sweep folder stays one plan that grows. `sweep run` plans again after each round by itself;
//! with Slurm, `sweep slurm` again after each array job.

use std::convert::Infallible;

use crate::search::{Range, Search, SplitMix64, round3};

/// A point of the search space: `(key, value)` in the space's key order.
pub type Point = Vec<(String, toml::Value)>;

/// What TPE optimises.
#[derive(Debug, Clone, PartialEq)]
pub struct Objective {
    /// `train-job` or the name of an eval suite of the sweep.
    pub suite: String,
    /// The dataset (column) of that suite.
    pub dataset: String,
    /// Larger is better (`goal = "max"`, the default) or smaller.
    pub maximize: bool,
}

/// `[search]`'s TPE settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Tpe {
    /// Random trials before TPE proposes any (`1..=budget`).
    pub startup: usize,
    /// Trials proposed per round (>= 1).
    pub batch: usize,
    /// The objective.
    pub objective: Objective,
}

impl rand_core::TryRng for SplitMix64 {
    type Error = Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        Ok((self.next_u64() >> 32) as u32)
    }

    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        Ok(self.next_u64())
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        for chunk in dst.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
        Ok(())
    }
}

/// The estimator's coordinate of a value of `range`: the value (log for `log_uniform`, the index
/// for `choice`); `None` for a value that is not in the range's kind.
fn encode(range: &Range, v: &toml::Value) -> Option<f64> {
    match range {
        Range::Uniform(..) => v.as_float(),
        Range::LogUniform(..) => v.as_float().map(f64::ln),
        Range::Int(..) => v.as_integer().map(|i| i as f64),
        Range::Choice(values) => values.iter().position(|x| x == v).map(|i| i as f64),
    }
}

/// The value of a coordinate (rounded as random draws are).
fn decode(range: &Range, x: f64) -> toml::Value {
    match range {
        Range::Uniform(lo, hi) => toml::Value::Float(round3(x.clamp(*lo, *hi))),
        Range::LogUniform(lo, hi) => toml::Value::Float(round3(x.exp().clamp(*lo, *hi))),
        Range::Int(lo, hi) => toml::Value::Integer((x.floor() as i64).clamp(*lo, *hi)),
        Range::Choice(values) => {
            values[(x.floor().max(0.0) as usize).min(values.len() - 1)].clone()
        }
    }
}

/// The estimator and its coordinate range for `range`.
fn optimizer(range: &Range) -> Result<tpe::TpeOptimizer, String> {
    let err = |e: tpe::range::RangeError| e.to_string();
    Ok(match range {
        Range::Uniform(lo, hi) => {
            tpe::TpeOptimizer::new(tpe::parzen_estimator(), tpe::range(*lo, *hi).map_err(err)?)
        }
        Range::LogUniform(lo, hi) => tpe::TpeOptimizer::new(
            tpe::parzen_estimator(),
            tpe::range(lo.ln(), hi.ln()).map_err(err)?,
        ),
        Range::Int(lo, hi) => tpe::TpeOptimizer::new(
            tpe::parzen_estimator(),
            tpe::range(*lo as f64, *hi as f64 + 1.0).map_err(err)?,
        ),
        Range::Choice(values) => tpe::TpeOptimizer::new(
            tpe::histogram_estimator(),
            tpe::categorical_range(values.len()).map_err(err)?,
        ),
    })
}

/// `n` new points of round `round` (1, 2, ...) after the finished trials `history` (each point
/// with its objective value, finite), for `search` and its TPE settings.
pub fn propose(
    search: &Search,
    tpe: &Tpe,
    history: &[(Point, f64)],
    n: usize,
    round: u64,
) -> Result<Vec<Point>, String> {
    let mut rng = SplitMix64::new(search.seed ^ round.wrapping_mul(0xd1b5_4a32_d192_ed03));
    let mut out: Vec<Point> = vec![Vec::with_capacity(search.space.len()); n];
    for (j, (key, range)) in search.space.iter().enumerate() {
        let mut opt = optimizer(range)?;
        for (point, value) in history {
            let x = point
                .get(j)
                .and_then(|(_, v)| encode(range, v))
                .ok_or_else(|| format!("trial point {point:?} has no value of `{key}`"))?;
            let v = if tpe.objective.maximize {
                -value
            } else {
                *value
            };
            opt.tell(x, v).map_err(|e| format!("`{key}`: {e}"))?;
        }
        for p in out.iter_mut() {
            let x = opt.ask(&mut rng).map_err(|e| format!("`{key}`: {e}"))?;
            p.push((key.clone(), decode(range, x)));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn search(budget: usize) -> (Search, Tpe) {
        let tpe = Tpe {
            startup: 8,
            batch: 1,
            objective: Objective {
                suite: "train-job".into(),
                dataset: "d".into(),
                maximize: false,
            },
        };
        let s = Search {
            budget,
            seed: 7,
            space: vec![
                ("a".into(), Range::Uniform(-5.0, 5.0)),
                (
                    "b".into(),
                    Range::Choice(vec!["x".into(), "y".into(), "z".into()]),
                ),
            ],
            tpe: Some(tpe.clone()),
        };
        (s, tpe)
    }

    fn f(p: &Point) -> f64 {
        let a = p[0].1.as_float().unwrap_or(f64::NAN);
        let b = if p[1].1.as_str() == Some("y") {
            0.0
        } else {
            4.0
        };
        (a - 1.5).powi(2) + b
    }

    /// Sequential TPE on a quadratic with a categorical key: every proposal is in range, the same
    /// history proposes the same points, and after the startup TPE's trials are better on average
    /// than the random draws of the same budget.
    #[test]
    fn tpe_proposals_are_deterministic_in_range_and_beat_random() {
        let (s, tpe) = search(40);
        let mut points: Vec<Point> = s.draws().into_iter().take(tpe.startup).collect();
        let mut round = 1;
        while points.len() < s.budget {
            let history: Vec<(Point, f64)> = points.iter().map(|p| (p.clone(), f(p))).collect();
            let new = propose(&s, &tpe, &history, tpe.batch, round).unwrap();
            assert_eq!(new, propose(&s, &tpe, &history, tpe.batch, round).unwrap());
            for p in &new {
                let a = p[0].1.as_float().unwrap();
                assert!((-5.0..=5.0).contains(&a) && a == round3(a), "{a}");
                assert!(["x", "y", "z"].contains(&p[1].1.as_str().unwrap()));
            }
            points.extend(new);
            round += 1;
        }
        let tpe_mean = points[tpe.startup..].iter().map(f).sum::<f64>() / 32.0;
        let random = s.draws();
        let random_mean = random[tpe.startup..].iter().map(f).sum::<f64>() / 32.0;
        assert!(
            tpe_mean < 0.5 * random_mean,
            "TPE {tpe_mean} against random {random_mean}"
        );
    }
}
