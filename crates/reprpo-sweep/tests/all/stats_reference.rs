//! The report's statistics against SciPy: Student t quantiles, the mean's 95% interval and the
//! paired difference's, from `tests/fixtures/sweep/stats.json`.
//!
//! Reference (tests/reference/gen_sweep_stats_fixtures.py, scipy 1.16.3):
//! ```python
//! st.t.ppf(p, df)
//! st.ttest_1samp(x, 0.0).confidence_interval(0.95)   # (lo, hi)
//! st.ttest_rel(a, b).confidence_interval(0.95)       # (lo, hi) of a - b
//! ```
//! Tolerances: quantiles within 1e-9 relative (statrs inverts the regularised incomplete beta
//! numerically); means, standard deviations and interval ends within 1e-9 absolute (the inputs
//! are of order 1 to 10, and the constant samples' standard deviations are 1e-16 noise in NumPy
//! and 0 here).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use reprpo_sweep::stats::{LEVEL, mean_ci, paired_ci, t_quantile};
use serde_json::Value;

fn fixture() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/sweep/stats.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).expect("read the fixture"))
        .expect("parse the fixture")
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("an array")
        .iter()
        .map(|x| x.as_f64().expect("a number"))
        .collect()
}

fn close(what: &str, got: Option<f64>, want: &Value, tol: f64) {
    match (got, want.as_f64()) {
        (None, None) => {}
        (Some(g), Some(w)) => assert!((g - w).abs() <= tol, "{what}: {g} vs SciPy {w}"),
        (g, _) => panic!("{what}: {g:?} vs SciPy {want}"),
    }
}

#[test]
fn t_quantiles_match_scipy() {
    let f = fixture();
    let cases = f["quantiles"].as_array().expect("quantiles");
    assert!(cases.len() >= 90);
    for c in cases {
        let (p, df, want) = (
            c["p"].as_f64().expect("p"),
            c["df"].as_f64().expect("df"),
            c["t"].as_f64().expect("t"),
        );
        let got = t_quantile(p, df);
        assert!(
            (got - want).abs() <= 1e-9 * want.abs(),
            "t({p}, {df}) = {got}, SciPy {want}"
        );
    }
}

#[test]
fn mean_intervals_match_scipy() {
    let f = fixture();
    for c in f["means"].as_array().expect("means") {
        let x = floats(&c["x"]);
        let got = mean_ci(&x, LEVEL).expect("a mean");
        let what = format!("{x:?}");
        assert_eq!(got.n as u64, c["n"].as_u64().expect("n"), "{what}");
        close(&format!("{what} mean"), Some(got.mean), &c["mean"], 1e-9);
        close(&format!("{what} sd"), got.sd, &c["sd"], 1e-9);
        close(
            &format!("{what} half"),
            got.half_width,
            &c["half_width"],
            1e-9,
        );
        close(&format!("{what} lo"), got.lo, &c["lo"], 1e-9);
        close(&format!("{what} hi"), got.hi, &c["hi"], 1e-9);
    }
}

#[test]
fn paired_intervals_match_scipy() {
    let f = fixture();
    for c in f["paired"].as_array().expect("paired") {
        let (a, b) = (floats(&c["a"]), floats(&c["b"]));
        let got = paired_ci(&a, &b, LEVEL).expect("a difference");
        let what = format!("{a:?} - {b:?}");
        assert_eq!(got.n as u64, c["n"].as_u64().expect("n"), "{what}");
        close(&format!("{what} mean"), Some(got.mean), &c["mean"], 1e-9);
        close(&format!("{what} lo"), got.lo, &c["lo"], 1e-9);
        close(&format!("{what} hi"), got.hi, &c["hi"], 1e-9);
    }
}
