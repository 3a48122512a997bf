//! Times the downstream check's DPO and ReprPO steps (median of `N` after one warm-up, default
//! 20) and prints one JSON line with the peak RSS: built once with stock candle-core (this
//! crate's own lock file) and once with the workspace's patched copy (`--config
//! patch.crates-io.candle-core.path=...`), it gives docs/perf.md's stock-against-patched row.

use std::time::Instant;

use anyhow::Result;
use reprpo_downstream::{
    Tensors, dpo_step, fixtures, pair_batch, peak_rss_mib, policy, reprpo_step,
};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let n: usize = std::env::args().nth(1).map_or(Ok(20), |s| s.parse())?;
    let dir = fixtures();
    let t = Tensors::new(&pair_batch(&dir)?)?;
    let model = policy(&dir)?;
    let mut out = serde_json::Map::new();
    for (name, f) in [
        ("dpo", dpo_step as fn(&_, &_) -> Result<_>),
        ("reprpo", reprpo_step),
    ] {
        f(&model, &t)?;
        let mut ts = Vec::with_capacity(n);
        for _ in 0..n.max(1) {
            let t0 = Instant::now();
            f(&model, &t)?;
            ts.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        out.insert(format!("{name}_step_ms"), median(ts).into());
    }
    out.insert("peak_rss_mib".into(), peak_rss_mib().into());
    println!("{}", serde_json::Value::Object(out));
    Ok(())
}
