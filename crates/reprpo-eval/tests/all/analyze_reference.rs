//! The hidden-state analysis' numbers against NumPy / scikit-learn: `tests/fixtures/analyze/stats.json`
//! from `tests/reference/gen_analyze_fixtures.py` (fixed pooled states, two layers, a case with
//! fewer features than rows and one with more).
//!
//! Tolerances: cosines, their summaries, explained variance, the separation and correlations
//! within 1e-9 absolute (f64 sums in a different order); the probe's coefficients and intercept
//! within 1e-6 of the largest coefficient (both solvers stop at a gradient near 1e-12, the
//! coefficients of a nearly separable problem are large and flat in some directions); the
//! accuracies to rounding (the same rows on the same side of 0); the by_h profiles and the
//! by_token projections within 1e-12 (relative for the latter: they are divided by a half gap).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use reprpo_eval::analyze::{
    AnalyzeOptions, Collected, PairTokens, Pooled, layer_stats, pictures, probe, stats,
};
use serde_json::Value;

fn fixture() -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/analyze/stats.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).expect("stats.json parses")
}

fn rows(v: &Value) -> Vec<Vec<f64>> {
    v.as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            r.as_array()
                .expect("row")
                .iter()
                .map(|x| x.as_f64().expect("number"))
                .collect()
        })
        .collect()
}

fn vec(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

fn pooled(v: &Value) -> Pooled {
    Pooled {
        chosen: rows(&v["chosen"]),
        rejected: rows(&v["rejected"]),
    }
}

fn close(what: &str, got: f64, want: f64, tol: f64) {
    assert!(
        (got - want).abs() <= tol,
        "{what}: {got} vs reference {want} (tolerance {tol})"
    );
}

/// Every number of `got` (serialised) against `want`, recursively, by key; `skip` keys are the
/// reference's extras (the probe's coefficients, by_h) checked separately.
fn compare(path: &str, got: &Value, want: &Value) {
    match (got, want) {
        (Value::Object(g), Value::Object(w)) => {
            for (k, wv) in w {
                if ["probe_coef", "probe_intercept", "by_h"].contains(&k.as_str()) {
                    continue;
                }
                let gv = g.get(k).unwrap_or_else(|| panic!("{path}.{k} missing"));
                compare(&format!("{path}.{k}"), gv, wv);
            }
        }
        (Value::Array(g), Value::Array(w)) => {
            assert_eq!(g.len(), w.len(), "{path}: lengths");
            for (i, (gv, wv)) in g.iter().zip(w).enumerate() {
                compare(&format!("{path}[{i}]"), gv, wv);
            }
        }
        (Value::Number(g), Value::Number(w)) => {
            let (g, w) = (g.as_f64().expect("f64"), w.as_f64().expect("f64"));
            if path.ends_with(".count") || path.ends_with(".k") {
                assert_eq!(g, w, "{path}");
            } else if path.contains("accuracy") {
                // One row more or less right moves an accuracy by 1/rows >= 1/60: 1e-12 only
                // absorbs NumPy's rounding of the mean.
                close(path, g, w, 1e-12);
            } else {
                close(path, g, w, 1e-9);
            }
        }
        (Value::String(_), Value::String(_)) => {}
        _ => panic!("{path}: {got} against {want}"),
    }
}

#[test]
fn layer_statistics_match_numpy_and_sklearn() {
    let f = fixture();
    let opts = AnalyzeOptions {
        top_k: f["top_k"]
            .as_array()
            .expect("top_k")
            .iter()
            .map(|k| k.as_u64().expect("k") as usize)
            .collect(),
        probe_c: f["probe_c"].as_f64().expect("probe_c"),
        ..Default::default()
    };
    let mut checked = 0;
    for (case, c) in f["cases"].as_object().expect("cases") {
        for (li, l) in c["layers"].as_array().expect("layers").iter().enumerate() {
            let train = pooled(&l["train"]);
            let transfer = pooled(&l["transfer"]);
            let got = layer_stats(
                li,
                ("train", &train),
                &vec(&l["margin"]),
                &[("transfer", &transfer)],
                &opts,
            )
            .expect("layer_stats");
            let got = serde_json::to_value(&got).expect("serialise");
            compare(&format!("{case}.layer{li}"), &got, &l["expected"]);
            checked += 1;
        }
    }
    assert_eq!(checked, 4);
}

#[test]
fn probe_coefficients_match_sklearn() {
    let f = fixture();
    for (case, c) in f["cases"].as_object().expect("cases") {
        for (li, l) in c["layers"].as_array().expect("layers").iter().enumerate() {
            let train = pooled(&l["train"]);
            let p = probe::fit(&train.chosen, &train.rejected, 1.0).expect("fit");
            let want = vec(&l["expected"]["probe_coef"]);
            let scale = want.iter().fold(0f64, |m, x| m.max(x.abs()));
            assert_eq!(p.coef.len(), want.len());
            for (j, (g, w)) in p.coef.iter().zip(&want).enumerate() {
                close(&format!("{case}.layer{li}.coef[{j}]"), *g, *w, 1e-6 * scale);
            }
            let b = l["expected"]["probe_intercept"]
                .as_f64()
                .expect("intercept");
            close(
                &format!("{case}.layer{li}.intercept"),
                p.intercept,
                b,
                1e-6 * scale,
            );
        }
    }
}

#[test]
fn by_h_profiles_match_numpy() {
    let f = fixture();
    for (case, c) in f["cases"].as_object().expect("cases") {
        for (li, l) in c["layers"].as_array().expect("layers").iter().enumerate() {
            let p = pooled(&l["train"]);
            let got = [
                stats::mean_abs(&stats::differences(&p.chosen, &p.rejected)),
                stats::mean_abs(&stats::sample_differences(&p.chosen)),
                stats::mean_abs(&stats::sample_differences(&p.rejected)),
            ];
            let want = l["expected"]["by_h"].as_array().expect("by_h");
            for (k, (g, w)) in got.iter().zip(want).enumerate() {
                for (j, (x, y)) in g.iter().zip(vec(w)).enumerate() {
                    close(&format!("{case}.layer{li}.by_h[{k}][{j}]"), *x, y, 1e-12);
                }
            }
            // The picture's panels are those profiles, sorted by A1-B1 and scaled by mean A1-A2.
            let c = Collected {
                layers: vec![li],
                pooled: vec![p],
                ..Default::default()
            };
            let panels = pictures::by_h_panels(&c);
            let norm = got[1].iter().sum::<f64>() / got[1].len() as f64;
            let mut sorted = got[0].clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            for (x, y) in panels[0].rows[0].iter().zip(&sorted) {
                close("by_h panel", *x, y / norm, 1e-12);
            }
        }
    }
}

/// The by_token panels: per pair and completion, each token's projection on the layer's unit mean
/// preference direction, centred on the midpoint of the mean chosen and rejected projections and
/// divided by their half gap.
#[test]
fn by_token_panels_match_numpy() {
    let f = fixture();
    for (case, c) in f["cases"].as_object().expect("cases") {
        let layers = c["layers"].as_array().expect("layers");
        let pairs = c["token_pairs"].as_array().expect("token_pairs");
        let states = |p: &Value, side: &str| -> Vec<Vec<Vec<f64>>> {
            p[side]
                .as_array()
                .expect("layers")
                .iter()
                .map(rows)
                .collect()
        };
        let collected = Collected {
            layers: (0..layers.len()).collect(),
            pooled: layers.iter().map(|l| pooled(&l["train"])).collect(),
            tokens: pairs
                .iter()
                .map(|p| PairTokens {
                    id: p["id"].as_str().expect("id").to_string(),
                    chosen: states(p, "chosen"),
                    rejected: states(p, "rejected"),
                })
                .collect(),
            ..Default::default()
        };
        let panels = pictures::by_token_panels(&collected);
        assert_eq!(panels.len(), 2 * pairs.len(), "{case}: two panels per pair");
        for (pi, p) in pairs.iter().enumerate() {
            for (si, side) in ["chosen", "rejected"].iter().enumerate() {
                let panel = &panels[2 * pi + si];
                assert!(panel.title.contains(side), "{case}: {}", panel.title);
                let want = rows(&p["expected"][*side]);
                assert_eq!(panel.rows.len(), want.len(), "{case}: one row per layer");
                for (li, (g, w)) in panel.rows.iter().zip(&want).enumerate() {
                    assert_eq!(g.len(), w.len(), "{case}: one value per token");
                    for (t, (x, y)) in g.iter().zip(w).enumerate() {
                        let what = format!("{case}.pair{pi}.{side}.layer{li}.token{t}");
                        close(&what, *x, *y, 1e-12 * y.abs().max(1.0));
                    }
                }
            }
        }
    }
}
