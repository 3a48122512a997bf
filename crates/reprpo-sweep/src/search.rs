//! Search: `budget` points drawn from ranges with a seed (`method = "random"`, the default), or
//! proposed by TPE from the results so far (`method = "tpe"`, see `tpe.rs`), each point one more
//! configuration (crossed with the variants and axes, and run at every seed).
//!
//! ```toml
//! [search]
//! budget = 8
//! seed = 0
//! [search.space]
//! "train.lr" = { log_uniform = [1e-4, 1e-2] }
//! "reprpo.alpha" = { uniform = [0.1, 10.0] }
//! "train.epochs" = { int = [1, 3] }          # both ends included
//! loss = { choice = ["reprpo", "reprpo-rr-only"] }
//! ```
//!
//! Draws come from SplitMix64 (a fixed, portable generator: the same seed draws the same points
//! on every machine and with every version of this crate's dependencies), keys in alphabetical
//! order; a float is rounded to 3 significant digits, so a run's label shows the value it trains
//! with. Random points are drawn independently of the results; TPE's startup trials are the
//! first random draws.

use std::path::Path;

use crate::error::{Result, key_err};

/// A range to draw from.
#[derive(Debug, Clone, PartialEq)]
pub enum Range {
    /// Uniform on `[lo, hi)`.
    Uniform(f64, f64),
    /// Log-uniform on `[lo, hi)`, `lo > 0`.
    LogUniform(f64, f64),
    /// An integer in `lo..=hi`, uniform.
    Int(i64, i64),
    /// One of the values, uniform.
    Choice(Vec<toml::Value>),
}

/// `[search]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Search {
    /// Points to draw.
    pub budget: usize,
    /// The generator's seed.
    pub seed: u64,
    /// Key and range, keys in alphabetical order.
    pub space: Vec<(String, Range)>,
    /// `method = "tpe"`: its settings (`None`: random search).
    pub tpe: Option<crate::tpe::Tpe>,
}

/// SplitMix64 (Steele, Lea and Flood 2014; the reference `splitmix64.c`).
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    /// The next 64 bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform on `[0, 1)` (the top 53 bits).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// `x` to 3 significant digits.
pub(crate) fn round3(x: f64) -> f64 {
    format!("{x:.2e}").parse().unwrap_or(x)
}

impl Range {
    fn draw(&self, rng: &mut SplitMix64) -> toml::Value {
        let u = rng.next_f64();
        match self {
            Range::Uniform(lo, hi) => toml::Value::Float(round3(lo + u * (hi - lo))),
            Range::LogUniform(lo, hi) => {
                toml::Value::Float(round3((lo.ln() + u * (hi.ln() - lo.ln())).exp()))
            }
            Range::Int(lo, hi) => {
                let span = (hi - lo + 1) as f64;
                toml::Value::Integer(lo + ((u * span) as i64).min(hi - lo))
            }
            Range::Choice(values) => {
                let i = ((u * values.len() as f64) as usize).min(values.len() - 1);
                values[i].clone()
            }
        }
    }
}

impl Search {
    /// The points: `budget` lists of `(key, value)`.
    pub fn draws(&self) -> Vec<Vec<(String, toml::Value)>> {
        let mut rng = SplitMix64::new(self.seed);
        (0..self.budget)
            .map(|_| {
                self.space
                    .iter()
                    .map(|(k, r)| (k.clone(), r.draw(&mut rng)))
                    .collect()
            })
            .collect()
    }
}

fn number(v: &toml::Value) -> Option<f64> {
    match v {
        toml::Value::Float(f) => Some(*f),
        toml::Value::Integer(i) => Some(*i as f64),
        _ => None,
    }
}

/// A `[lo, hi]` pair of finite numbers with `lo < hi`.
fn pair(v: &toml::Value) -> Option<(f64, f64)> {
    match v.as_array().map(Vec::as_slice) {
        Some([a, b]) => {
            let (lo, hi) = (number(a)?, number(b)?);
            (lo.is_finite() && hi.is_finite() && lo < hi).then_some((lo, hi))
        }
        _ => None,
    }
}

fn range(file: &Path, key: &str, v: &toml::Value) -> Result<Range> {
    let at = format!("search.space.\"{key}\"");
    let bad = |p: &str| key_err(file, &at, p);
    let t = v
        .as_table()
        .filter(|t| t.len() == 1)
        .ok_or_else(|| bad("must be one of { uniform = [lo, hi] }, { log_uniform = [lo, hi] }, { int = [lo, hi] }, { choice = [...] }"))?;
    let (kind, v) = t.iter().next().ok_or_else(|| bad("is empty"))?;
    let need = "needs [lo, hi] with finite lo < hi";
    match kind.as_str() {
        "uniform" => pair(v)
            .map(|(a, b)| Range::Uniform(a, b))
            .ok_or_else(|| bad(need)),
        "log_uniform" => match pair(v) {
            Some((a, b)) if a > 0.0 => Ok(Range::LogUniform(a, b)),
            _ => Err(bad("needs [lo, hi] with 0 < lo < hi")),
        },
        "int" => match v.as_array().map(Vec::as_slice) {
            Some([toml::Value::Integer(a), toml::Value::Integer(b)]) if a <= b => {
                Ok(Range::Int(*a, *b))
            }
            _ => Err(bad("needs [lo, hi], integers with lo <= hi")),
        },
        "choice" => match v.as_array() {
            Some(a) if !a.is_empty() => Ok(Range::Choice(a.clone())),
            _ => Err(bad("needs a non-empty list")),
        },
        other => Err(bad(&format!(
            "unknown range `{other}` (uniform, log_uniform, int, choice)"
        ))),
    }
}

/// Parse `[search]` (`None` without one); keys must not be axes or seed keys.
pub fn parse(file: &Path, raw: Option<toml::Table>, taken: &[String]) -> Result<Option<Search>> {
    let Some(mut t) = raw else {
        return Ok(None);
    };
    let budget = match t.remove("budget") {
        Some(toml::Value::Integer(n)) if n >= 1 => n as usize,
        _ => {
            return Err(key_err(
                file,
                "search.budget",
                "an integer >= 1 is required",
            ));
        }
    };
    let seed = match t.remove("seed") {
        None => 0,
        Some(toml::Value::Integer(n)) if n >= 0 => n as u64,
        Some(_) => return Err(key_err(file, "search.seed", "must be an integer >= 0")),
    };
    let space = match t.remove("space") {
        Some(toml::Value::Table(s)) if !s.is_empty() => s,
        _ => {
            return Err(key_err(
                file,
                "search.space",
                "a table of key = range is required",
            ));
        }
    };
    let tpe = parse_method(file, &mut t, budget)?;
    if let Some(k) = t.keys().next() {
        return Err(key_err(
            file,
            format!("search.{k}"),
            "unknown key (method, budget, seed, space, and for tpe: startup, batch, objective)",
        ));
    }
    let mut out = Vec::with_capacity(space.len());
    for (key, v) in &space {
        if taken.contains(key) {
            return Err(key_err(
                file,
                format!("search.space.\"{key}\""),
                "is also an axis or a seed key",
            ));
        }
        out.push((key.clone(), range(file, key, v)?));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(Some(Search {
        budget,
        seed,
        space: out,
        tpe,
    }))
}

/// An integer key of `[search]` at least 1 (`default` when absent).
fn positive(file: &Path, t: &mut toml::Table, key: &str, default: usize) -> Result<usize> {
    match t.remove(key) {
        None => Ok(default),
        Some(toml::Value::Integer(n)) if n >= 1 => Ok(n as usize),
        Some(_) => Err(key_err(
            file,
            format!("search.{key}"),
            "must be an integer >= 1",
        )),
    }
}

/// `method` and, for `tpe`, `startup`, `batch` and `objective`.
fn parse_method(
    file: &Path,
    t: &mut toml::Table,
    budget: usize,
) -> Result<Option<crate::tpe::Tpe>> {
    let method = t.remove("method");
    match method.as_ref().map(|m| m.as_str()) {
        None | Some(Some("random")) => {
            for k in ["startup", "batch", "objective"] {
                if t.contains_key(k) {
                    return Err(key_err(
                        file,
                        format!("search.{k}"),
                        "is a TPE setting: give method = \"tpe\"",
                    ));
                }
            }
            return Ok(None);
        }
        Some(Some("tpe")) => {}
        _ => {
            return Err(key_err(
                file,
                "search.method",
                "must be \"random\" or \"tpe\"",
            ));
        }
    }
    let startup = positive(file, t, "startup", budget.min(10))?;
    if startup > budget {
        return Err(key_err(
            file,
            "search.startup",
            format!("{startup} random trials is more than the budget of {budget}"),
        ));
    }
    let batch = positive(file, t, "batch", 1)?;
    let objective = parse_objective(file, t.remove("objective"))?;
    Ok(Some(crate::tpe::Tpe {
        startup,
        batch,
        objective,
    }))
}

/// `objective = { suite = "...", dataset = "...", goal = "max" | "min" }`.
fn parse_objective(file: &Path, v: Option<toml::Value>) -> Result<crate::tpe::Objective> {
    let at = "search.objective";
    let need = "TPE needs objective = { suite = \"train-job\" or an eval suite, dataset = \
                \"...\", goal = \"max\" or \"min\" }";
    let Some(toml::Value::Table(mut o)) = v else {
        return Err(key_err(file, at, need));
    };
    let mut text = |k: &str| match o.remove(k) {
        Some(toml::Value::String(s)) if !s.is_empty() => Ok(Some(s)),
        None => Ok(None),
        Some(_) => Err(key_err(
            file,
            format!("{at}.{k}"),
            "must be a non-empty string",
        )),
    };
    let (Some(suite), Some(dataset)) = (text("suite")?, text("dataset")?) else {
        return Err(key_err(file, at, need));
    };
    let maximize = match text("goal")?.as_deref() {
        None | Some("max") => true,
        Some("min") => false,
        Some(g) => {
            return Err(key_err(
                file,
                format!("{at}.goal"),
                format!("`{g}`: must be \"max\" or \"min\""),
            ));
        }
    };
    if let Some(k) = o.keys().next() {
        return Err(key_err(
            file,
            format!("{at}.{k}"),
            "unknown key (suite, dataset, goal)",
        ));
    }
    Ok(crate::tpe::Objective {
        suite,
        dataset,
        maximize,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_gives_the_reference_sequence() {
        // splitmix64.c with x = 1234567: the published first outputs.
        let mut r = SplitMix64::new(1234567);
        assert_eq!(r.next_u64(), 6457827717110365317);
        assert_eq!(r.next_u64(), 3203168211198807973);
        assert_eq!(r.next_u64(), 9817491932198370423);
    }

    #[test]
    fn draws_stay_in_their_ranges_and_repeat_with_the_seed() {
        let s = Search {
            budget: 200,
            seed: 3,
            space: vec![
                ("a".into(), Range::LogUniform(1e-4, 1e-2)),
                ("b".into(), Range::Int(1, 3)),
                ("c".into(), Range::Choice(vec!["x".into(), "y".into()])),
            ],
            tpe: None,
        };
        let d = s.draws();
        assert_eq!(d, s.draws());
        let mut ints = std::collections::BTreeSet::new();
        for p in &d {
            let a = p[0].1.as_float().unwrap();
            assert!((1e-4..=1e-2).contains(&a) && a == round3(a), "{a}");
            ints.insert(p[1].1.as_integer().unwrap());
        }
        assert_eq!(ints.into_iter().collect::<Vec<_>>(), [1, 2, 3]);
    }
}
