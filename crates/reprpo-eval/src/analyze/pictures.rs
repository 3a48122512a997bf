//! The analysis' pictures, one set per subject plus per-layer charts that put the subjects (base
//! and adapters) side by side:
//!
//! - `by_h-<subject>.png`: three heatmaps, rows = layers, columns = neurons: the mean over pairs
//!   of `|c_i - r_i|` (same pair, chosen vs rejected: A1-B1), `|c_i - c_{i+h}|` (two unrelated
//!   chosen completions: A1-A2) and `|r_i - r_{i+h}|` (B1-B2), each row divided by the mean of its
//!   A1-A2 row (1 = as different as two unrelated samples) and the neurons of a row sorted by
//!   their A1-B1 value (largest first) in all three panels, so the panels show whether the
//!   neurons that separate chosen from rejected are the ones that vary anyway;
//! - `by_token-<subject>.png`: for the first pairs, each completion token's hidden state
//!   projected onto the layer's mean preference direction (the mean of `c_i - r_i`, unit
//!   length), shifted and scaled so that the mean chosen completion sits at +1 and the mean
//!   rejected one at -1 (red: looks like chosen, blue: like rejected; colours clipped at the
//!   95th percentile of the absolute values, at least 1);
//! - `consistency.png`, `pca.png`, `probe.png`, `margin.png`: per layer, the mean cosine between
//!   preference directions (and between sample directions), the variance the first principal
//!   direction explains, the probe's pair accuracy on each dataset, and the correlations with
//!   the DPO margin.

use std::path::{Path, PathBuf};

use super::{Analysis, Collected, stats};
use crate::error::Result;
use crate::output::file_label;
use crate::plot::heatmap::{ColourScale, HeatPanel, heatmap};
use crate::plot::{Series, line_chart};

fn layer_labels(c: &Collected) -> Vec<String> {
    c.layers.iter().map(|l| format!("h{l}")).collect()
}

/// The three by_h panels of one dataset's collected states.
pub fn by_h_panels(c: &Collected) -> Vec<HeatPanel> {
    let mut rows: [Vec<Vec<f64>>; 3] = Default::default();
    for p in &c.pooled {
        let pref = stats::mean_abs(&stats::differences(&p.chosen, &p.rejected));
        let a = stats::mean_abs(&stats::sample_differences(&p.chosen));
        let b = stats::mean_abs(&stats::sample_differences(&p.rejected));
        let norm = a.iter().sum::<f64>() / a.len().max(1) as f64;
        let norm = if norm > 0.0 { norm } else { 1.0 };
        let mut order: Vec<usize> = (0..pref.len()).collect();
        order.sort_by(|&i, &j| pref[j].total_cmp(&pref[i]));
        for (k, profile) in [pref, a, b].iter().enumerate() {
            rows[k].push(order.iter().map(|&i| profile[i] / norm).collect());
        }
    }
    let titles = [
        "chosen - rejected, same pair (A1-B1)",
        "chosen - chosen, unrelated (A1-A2)",
        "rejected - rejected, unrelated (B1-B2)",
    ];
    titles
        .iter()
        .zip(rows)
        .map(|(t, rows)| HeatPanel {
            title: t.to_string(),
            row_labels: layer_labels(c),
            rows,
        })
        .collect()
}

/// Per layer, the unit mean preference direction and the projection's midpoint and half gap.
fn directions(c: &Collected) -> Vec<(Vec<f64>, f64, f64)> {
    c.pooled
        .iter()
        .map(|p| {
            let pref = stats::differences(&p.chosen, &p.rejected);
            let d = pref.first().map_or(0, Vec::len);
            let mut u = vec![0.0; d];
            for r in &pref {
                u.iter_mut().zip(r).for_each(|(a, x)| *a += x);
            }
            let norm = u.iter().map(|x| x * x).sum::<f64>().sqrt();
            if norm > 0.0 {
                u.iter_mut().for_each(|x| *x /= norm);
            }
            let proj = |rows: &[Vec<f64>]| {
                rows.iter().map(|r| dot(r, &u)).sum::<f64>() / rows.len().max(1) as f64
            };
            let (pc, pr) = (proj(&p.chosen), proj(&p.rejected));
            let half = (pc - pr) / 2.0;
            (
                u,
                (pc + pr) / 2.0,
                if half.abs() > 0.0 { half } else { 1.0 },
            )
        })
        .collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Two by_token panels (chosen, rejected) per pair whose tokens were kept.
pub fn by_token_panels(c: &Collected) -> Vec<HeatPanel> {
    let dirs = directions(c);
    let project = |states: &[Vec<Vec<f64>>]| -> Vec<Vec<f64>> {
        states
            .iter()
            .zip(&dirs)
            .map(|(tokens, (u, mid, half))| {
                tokens.iter().map(|x| (dot(x, u) - mid) / half).collect()
            })
            .collect()
    };
    let mut panels = Vec::with_capacity(2 * c.tokens.len());
    for t in &c.tokens {
        for (which, states) in [("chosen", &t.chosen), ("rejected", &t.rejected)] {
            panels.push(HeatPanel {
                title: format!("pair {}: {which} completion", t.id),
                row_labels: layer_labels(c),
                rows: project(states),
            });
        }
    }
    panels
}

fn per_layer(a: &Analysis, f: impl Fn(&super::LayerStats) -> Option<f64>) -> Vec<(f64, f64)> {
    a.layers
        .iter()
        .map(|l| (l.layer as f64, f(l).unwrap_or(f64::NAN)))
        .collect()
}

/// The per-layer charts of every subject.
fn layer_charts(dir: &Path, analyses: &[Analysis]) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let mut chart = |name: &str, title: &str, series: Vec<Series>| -> Result<()> {
        let path = dir.join(name);
        line_chart(&path, title, "hidden-state index (layer)", &series)?;
        written.push(path);
        Ok(())
    };
    let s = |name: String, points| Series { name, points };
    let mut cons = Vec::new();
    let mut pca = Vec::new();
    let mut probe = Vec::new();
    let mut margin = Vec::new();
    for a in analyses {
        let who = &a.subject;
        cons.push(s(
            format!("A1-B1 {who}"),
            per_layer(a, |l| l.consistency.map(|x| x.mean)),
        ));
        cons.push(s(
            format!("A1-A2 {who}"),
            per_layer(a, |l| l.sample_consistency.map(|x| x.mean)),
        ));
        pca.push(s(
            format!("A1-B1 {who}"),
            per_layer(a, |l| l.pca.first().map(|t| t.fraction)),
        ));
        pca.push(s(
            format!("A1-A2 {who}"),
            per_layer(a, |l| l.sample_pca.first().map(|t| t.fraction)),
        ));
        for (k, c) in a.data.iter().enumerate() {
            probe.push(s(
                format!("{} {who}", c.dataset),
                per_layer(a, |l| l.probe.get(k).map(|p| p.pair_accuracy)),
            ));
        }
        margin.push(s(
            format!("probe {who}"),
            per_layer(a, |l| l.probe_vs_margin),
        ));
        margin.push(s(
            format!("alignment {who}"),
            per_layer(a, |l| l.alignment_vs_margin),
        ));
    }
    chart(
        "consistency.png",
        "mean cosine between directions of two pairs",
        cons,
    )?;
    chart(
        "pca.png",
        "variance along the first principal direction",
        pca,
    )?;
    chart(
        "probe.png",
        "probe pair accuracy (trained on the first dataset)",
        probe,
    )?;
    chart(
        "margin.png",
        "correlation with the DPO log-prob margin",
        margin,
    )?;
    Ok(written)
}

/// The `q` quantile of the finite absolute values of every panel (0 when there are none).
fn abs_quantile(panels: &[HeatPanel], q: f64) -> f64 {
    let mut v: Vec<f64> = panels
        .iter()
        .flat_map(|p| p.rows.iter().flatten())
        .filter(|x| x.is_finite())
        .map(|x| x.abs())
        .collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// Every picture into `dir`; the paths written.
pub fn write_all(dir: &Path, analyses: &[Analysis]) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for a in analyses {
        let Some(c) = a.data.first() else { continue };
        let label = file_label(&a.subject);
        let path = dir.join(format!("by_h-{label}.png"));
        let panels = by_h_panels(c);
        let max = panels
            .iter()
            .flat_map(|p| p.rows.iter().flatten())
            .copied()
            .filter(|v| v.is_finite())
            .fold(0.0, f64::max);
        heatmap(
            &path,
            &format!(
                "{}: hidden-state differences by neuron ({})",
                a.subject, c.dataset
            ),
            &panels,
            3,
            ColourScale::Sequential { max },
            "mean |difference| over pairs / mean |A1-A2| of the layer; neurons sorted by A1-B1",
        )?;
        written.push(path);
        let path = dir.join(format!("by_token-{label}.png"));
        let panels = by_token_panels(c);
        let limit = abs_quantile(&panels, 0.95).max(1.0);
        heatmap(
            &path,
            &format!(
                "{}: tokens along the preference direction ({})",
                a.subject, c.dataset
            ),
            &panels,
            2,
            ColourScale::Diverging { limit },
            "projection on the layer's mean chosen - rejected direction: +1 = mean chosen, -1 = \
             mean rejected (colours clipped at the 95th percentile of |value|)",
        )?;
        written.push(path);
    }
    written.extend(layer_charts(dir, analyses)?);
    Ok(written)
}
