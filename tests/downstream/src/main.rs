//! Times the downstream check's DPO and ReprPO steps (median of `N` after one warm-up, default
//! 20) and prints one JSON line with the peak RSS: built once with stock candle-core (this
//! crate's own lock file) and once with the workspace's patched copy (`--config
//! patch.crates-io.candle-core.path=...`), it gives docs/perf.md's stock-against-patched row.
//!
//! `reprpo-downstream [N]`: the fixture (tests/fixtures/train: a 3-layer, 32-wide Llama, 4 pairs);
//! `reprpo-downstream N PRESET PAIRS SEQ`: a random `LlamaConfig::preset` model (e.g. `small 2
//! 128`) with a LoRA r 16 on the seven projections.

use std::time::Instant;

use anyhow::Result;
use reprpo_downstream::{
    Tensors, dpo_step, fixtures, pair_batch, peak_rss_mib, policy, random_setup, reprpo_step,
};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).map_or(Ok(20), |s| s.parse())?;
    let (model, t) = match args.get(2) {
        Some(preset) => {
            let pairs = args.get(3).map_or(Ok(2), |s| s.parse())?;
            let seq = args.get(4).map_or(Ok(128), |s| s.parse())?;
            random_setup(preset, pairs, seq)?
        }
        None => {
            let dir = fixtures();
            (policy(&dir)?, Tensors::new(&pair_batch(&dir)?)?)
        }
    };
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
