//! PNG plots of a run, drawn from its `metrics.jsonl` at the end: the loss and its components,
//! the reward accuracy, and the ReprPO cosines (train and eval series on one chart).

use std::path::Path;

use reprpo_eval::plot::{Series, line_chart};

use crate::error::{Result, TrainError};
use crate::metrics::read_metrics;

/// The charts: file name, title, and the metric keys on it (eval series are `eval_<key>`).
const CHARTS: [(&str, &str, &[&str]); 4] = [
    ("loss.png", "loss", &["loss", "nll_loss"]),
    (
        "components.png",
        "ReprPO components",
        &["loss_rr", "loss_retain", "coef_rr", "coef_retain"],
    ),
    (
        "accuracy.png",
        "reward accuracy and margin",
        &["rewards/accuracies", "rewards/margins"],
    ),
    (
        "cosines.png",
        "cosine to the reference (chosen)",
        &["cosine/chosen", "cosine/rejected"],
    ),
];

/// Write `plots/*.png` for every chart that has data.
pub fn write_plots(run_dir: &Path) -> Result<()> {
    let records = read_metrics(&run_dir.join("metrics.jsonl"))?;
    let dir = run_dir.join("plots");
    std::fs::create_dir_all(&dir).map_err(crate::error::io(&dir))?;
    for (file, title, keys) in CHARTS {
        let mut series = Vec::new();
        for key in keys {
            for name in [key.to_string(), format!("eval_{key}")] {
                let points: Vec<(f64, f64)> = records
                    .iter()
                    .filter_map(|r| {
                        let x = r.get("step")?.as_f64()?;
                        let y = r.get(&name)?.as_f64()?;
                        Some((x, y))
                    })
                    .collect();
                if !points.is_empty() {
                    series.push(Series { name, points });
                }
            }
        }
        if series.is_empty() {
            continue;
        }
        line_chart(&dir.join(file), title, "step", &series).map_err(|e| TrainError::Malformed {
            path: dir.join(file),
            problem: e.to_string(),
        })?;
    }
    Ok(())
}
