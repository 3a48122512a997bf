//! The analysis' summary, every file written atomically:
//!
//! ```text
//! <dir>/summary.json   the header (model, datasets, layers, options) and, per subject and
//!                      layer, every statistic of `LayerStats`
//! <dir>/summary.md     the same as tables: one per subject, then the base against each
//!                      adapter side by side (before / after training)
//! <dir>/*.png          the pictures (see `pictures`)
//! ```

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::{Analysis, LayerStats, pictures};
use crate::error::{EvalError, Result};
use crate::output::write_atomic;

/// The JSON summary; `header` (model, suite, options) is copied in as it is.
pub fn summary_json(header: &Value, analyses: &[Analysis]) -> Value {
    let subjects: Vec<Value> = analyses
        .iter()
        .map(|a| {
            json!({
                "subject": a.subject,
                "datasets": a.data.iter().map(|c| json!({
                    "name": c.dataset,
                    "pairs": c.margin.len(),
                    "mean_margin": c.margin.iter().sum::<f64>() / c.margin.len().max(1) as f64,
                })).collect::<Vec<_>>(),
                "layers": a.layers,
            })
        })
        .collect();
    json!({ "header": header, "subjects": subjects })
}

fn f(v: Option<f64>) -> String {
    v.filter(|x| x.is_finite())
        .map_or_else(|| "-".to_string(), |x| format!("{x:.3}"))
}

fn top1(l: &LayerStats, sample: bool) -> Option<f64> {
    let v = if sample { &l.sample_pca } else { &l.pca };
    v.first().map(|t| t.fraction)
}

/// One subject's table: a row per layer.
fn subject_table(a: &Analysis) -> String {
    let names: Vec<&str> = a.data.iter().map(|c| c.dataset.as_str()).collect();
    let mut s = format!("## {}\n\n", a.subject);
    let _ = write!(
        s,
        "| layer | pairs | cos A1-B1 | cos A1-A2 | alignment | PCA top-1 A1-B1 | PCA top-1 A1-A2 \
         | separation | corr(alignment, margin) | corr(probe, margin) |"
    );
    for n in &names {
        let _ = write!(s, " probe {n} |");
    }
    s.push_str("\n|");
    s.push_str(&"---|".repeat(10 + names.len()));
    s.push('\n');
    for l in &a.layers {
        let _ = write!(
            s,
            "| h{} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            l.layer,
            l.pairs,
            f(l.consistency.map(|x| x.mean)),
            f(l.sample_consistency.map(|x| x.mean)),
            f(l.alignment.map(|x| x.mean)),
            f(top1(l, false)),
            f(top1(l, true)),
            f(Some(l.separation)),
            f(l.alignment_vs_margin),
            f(l.probe_vs_margin),
        );
        for p in &l.probe {
            let _ = write!(s, " {:.3} / {:.3} |", p.accuracy, p.pair_accuracy);
        }
        s.push('\n');
    }
    s
}

/// The base against one adapter, layer by layer.
fn before_after(base: &Analysis, after: &Analysis) -> String {
    let mut s = format!(
        "## {} against {}\n\n| layer | cos A1-B1 | PCA top-1 | probe pair accuracy (first dataset) \
         | corr(probe, margin) |\n|---|---|---|---|---|\n",
        after.subject, base.subject
    );
    for (b, a) in base.layers.iter().zip(&after.layers) {
        let pair = |l: &LayerStats| l.probe.first().map(|p| p.pair_accuracy);
        let _ = writeln!(
            s,
            "| h{} | {} -> {} | {} -> {} | {} -> {} | {} -> {} |",
            b.layer,
            f(b.consistency.map(|x| x.mean)),
            f(a.consistency.map(|x| x.mean)),
            f(top1(b, false)),
            f(top1(a, false)),
            f(pair(b)),
            f(pair(a)),
            f(b.probe_vs_margin),
            f(a.probe_vs_margin),
        );
    }
    s
}

/// The Markdown summary.
pub fn summary_markdown(title: &str, analyses: &[Analysis]) -> String {
    let mut s = format!(
        "# {title}\n\nPer layer: mean cosine of preference directions of two pairs (A1-B1) and \
         of sample directions (A1-A2); mean leave-one-out alignment; variance along the first \
         principal direction; mean |A1-B1| / mean |A1-A2|; Pearson correlations with the DPO \
         log-prob margin; probe accuracy / pair accuracy per dataset (trained on the first).\n\n"
    );
    for a in analyses {
        s.push_str(&subject_table(a));
        s.push('\n');
    }
    if let Some((base, rest)) = analyses.split_first() {
        for a in rest {
            s.push_str(&before_after(base, a));
            s.push('\n');
        }
    }
    s
}

/// Write the summary and the pictures into `dir`; the paths written.
pub fn write(
    dir: &Path,
    title: &str,
    header: &Value,
    analyses: &[Analysis],
) -> Result<Vec<PathBuf>> {
    let json = serde_json::to_string_pretty(&summary_json(header, analyses))
        .map_err(|e| EvalError::Invalid(format!("summary.json: {e}")))?;
    let mut written = Vec::new();
    let path = dir.join("summary.json");
    write_atomic(&path, json.as_bytes())?;
    written.push(path);
    let path = dir.join("summary.md");
    write_atomic(&path, summary_markdown(title, analyses).as_bytes())?;
    written.push(path);
    written.extend(pictures::write_all(dir, analyses)?);
    Ok(written)
}
