//! The reprpo library crates outside their workspace, on stock candle-core: the fixture's pairs
//! tokenise to the batch the Python reference used, and one DPO and one ReprPO step give the
//! loss, metrics and adapter gradient norm that TRL / PyTorch computed for the same model,
//! adapter and batch (`tests/fixtures/train/expected.json`, cases `dpo_sigmoid_lora` and
//! `reprpo_lora`, the first step at learning rate 0, so the values are those of the initial
//! adapter). Tolerance: 1e-4 relative + 1e-5 absolute, as the workspace's train_reference.rs.

use anyhow::{Context, Result};
use reprpo_downstream::{Step, Tensors, dpo_step, fixtures, pair_batch, policy, reprpo_step};
use serde_json::Value;

const RTOL: f64 = 1e-4;
const ATOL: f64 = 1e-5;

fn expected() -> Result<Value> {
    let text = std::fs::read_to_string(fixtures().join("expected.json"))?;
    Ok(serde_json::from_str(&text)?)
}

fn case(name: &str) -> Result<Value> {
    let e = expected()?;
    let cases = e["cases"].as_array().context("cases")?;
    cases
        .iter()
        .find(|c| c["name"] == name)
        .cloned()
        .with_context(|| format!("no case {name}"))
}

fn ints(v: &Value) -> Result<Vec<u64>> {
    let rows = v.as_array().context("rows")?;
    let mut out = Vec::new();
    for r in rows {
        for x in r.as_array().context("row")? {
            out.push(x.as_u64().context("int")?);
        }
    }
    Ok(out)
}

/// Every metric of the case that the step reports (and the loss and grad norm), within
/// tolerance; at least `min` metrics compared.
fn check(name: &str, got: &Step, min: usize) -> Result<()> {
    let c = case(name)?;
    let want = c["metrics"].as_object().context("metrics")?;
    let mut failures = Vec::new();
    let mut n = 0;
    for (k, w) in want {
        let w = w.as_f64().context("metric")?;
        let have = match k.as_str() {
            "loss" => got.loss,
            "grad_norm" => got.grad_norm,
            _ => match got.metrics.get(k) {
                Some(v) => *v,
                None => continue,
            },
        };
        n += 1;
        let diff = (have - w).abs();
        println!("{name} {k:18} ours {have:+.8e} reference {w:+.8e} |diff| {diff:.2e}");
        if !(diff <= RTOL * w.abs() + ATOL) {
            failures.push(format!("{k}: ours {have}, reference {w}"));
        }
    }
    assert!(failures.is_empty(), "{name}: {failures:?}");
    assert!(n >= min, "{name}: only {n} metrics compared");
    Ok(())
}

#[test]
fn pairs_tokenise_to_the_reference_batch() -> Result<()> {
    let got = pair_batch(&fixtures())?;
    let want = &expected()?["batch"];
    assert_eq!(got.rows as u64, want["rows"].as_u64().context("rows")?);
    assert_eq!(
        got.seq_len as u64,
        want["seq_len"].as_u64().context("seq_len")?
    );
    let as_u64 = |v: &[u8]| v.iter().map(|&x| u64::from(x)).collect::<Vec<_>>();
    let ids: Vec<u64> = got.input_ids.iter().map(|&x| u64::from(x)).collect();
    assert!(!ids.is_empty());
    assert_eq!(ids, ints(&want["input_ids"])?);
    assert_eq!(as_u64(&got.attention_mask), ints(&want["attention_mask"])?);
    assert_eq!(as_u64(&got.loss_mask), ints(&want["completion_mask"])?);
    Ok(())
}

#[test]
fn dpo_step_matches_trl() -> Result<()> {
    let dir = fixtures();
    let t = Tensors::new(&pair_batch(&dir)?)?;
    let step = dpo_step(&policy(&dir)?, &t)?;
    // loss, grad_norm and the eight reward / logp / logit metrics TRL logs (logits/* need the
    // logits sums, not given here: 8 of 10 compared at least).
    check("dpo_sigmoid_lora", &step, 8)
}

#[test]
fn reprpo_step_matches_pytorch() -> Result<()> {
    let dir = fixtures();
    let t = Tensors::new(&pair_batch(&dir)?)?;
    let c = case("reprpo_lora")?;
    let step = reprpo_step(&policy(&dir)?, &t)?;
    assert_eq!(
        c["hidden_state_indices"],
        serde_json::json!([1, 2]),
        "the fixture's layers"
    );
    check("reprpo_lora", &step, 6)
}
