//! The sink-filtered token reduction (`methods::reduce`) against the reference ReprPO project's
//! `reduce_tokens_w_attention` (fixture `tests/fixtures/methods`, written by
//! `tests/reference/gen_methods_fixtures.py`): outputs, the gradient of `sum(out * w)`, which
//! positions the filter keeps, and the NaN rows of an all-padding row, as the reference gives
//! them. f32; relative error at most 1e-5 of each tensor's largest entry.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use candle_core::{Device, IndexOp, Tensor, Var};
use reprpo_losses::methods::reduce::{SINK_THRESHOLD, reduce_tokens, sink_filtered_mask};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/methods")
}

fn max_abs(x: &Tensor) -> f32 {
    x.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// `x` with NaN replaced by 0 (rows checked separately).
fn finite(x: &Tensor) -> Tensor {
    x.eq(x)
        .unwrap()
        .where_cond(x, &x.zeros_like().unwrap())
        .unwrap()
}

fn nan_rows(x: &Tensor) -> Vec<usize> {
    let v: Vec<Vec<f32>> = x.to_vec2().unwrap();
    v.iter()
        .enumerate()
        .filter(|(_, r)| r.iter().any(|x| x.is_nan()))
        .map(|(i, _)| i)
        .collect()
}

#[test]
fn token_reduction_matches_the_reference() {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("methods.json")).unwrap())
            .unwrap();
    let t =
        candle_core::safetensors::load(dir().join("methods.safetensors"), &Device::Cpu).unwrap();
    let cases = json["reduce"].as_array().unwrap();
    assert!(cases.len() >= 4);
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let get = |k: &str| t[c[k].as_str().unwrap()].clone();
        let x = Var::from_tensor(&get("x")).unwrap();
        let mask = get("mask");
        let out = reduce_tokens(x.as_tensor(), &mask).unwrap();
        let want = get("out");
        let rows: Vec<usize> = c["nan_rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(nan_rows(&out), rows, "{name}: NaN rows");
        let diff = max_abs(&(finite(&out) - finite(&want)).unwrap());
        assert!(
            diff <= 1e-5 * max_abs(&finite(&want)),
            "{name}: out diff {diff}"
        );
        let loss = (out * get("w")).unwrap();
        let loss = finite(&loss).sum_all().unwrap();
        let g = loss.backward().unwrap();
        let got = finite(g.get(x.as_tensor()).unwrap());
        let want = finite(&get("grad"));
        let diff = max_abs(&(got - &want).unwrap());
        assert!(diff <= 1e-5 * max_abs(&want), "{name}: grad diff {diff}");
        let kept = sink_filtered_mask(x.as_tensor(), &mask, SINK_THRESHOLD).unwrap();
        for (b, row) in c["kept"].as_array().unwrap().iter().enumerate() {
            let Some(row) = row.as_array() else { continue };
            let want: Vec<f32> = row.iter().map(|v| v.as_f64().unwrap() as f32).collect();
            let got: Vec<f32> = kept.i(b).unwrap().to_vec1().unwrap();
            assert_eq!(got, want, "{name}: kept positions of row {b}");
        }
    }
}
