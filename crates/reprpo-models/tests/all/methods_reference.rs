//! Every method case of `tests/fixtures/methods` (written by
//! `tests/reference/gen_methods_fixtures.py` from the reference ReprPO project's own code at
//! bd9ae63): each preset's transform (`reprpo_models::transform`, parameters loaded from the
//! fixture) followed by its loss (`reprpo_losses::methods`), against the reference's loss, every
//! metric its training step logs, and the gradients with respect to the policy activations, the
//! policy log-probabilities and NLLs, and the transform parameters. f32 throughout; relative
//! error at most 1e-4 (of the tensor's largest entry for gradients).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use candle_core::{Device, Tensor, Var};
use reprpo_losses::methods::{Collected, MethodInputs, MethodLoss, method_loss};
use reprpo_models::transform::{self, ModelMatrices, TransformConfig, TransformSite};
use serde_json::Value;

const ROLES: [&str; 4] = ["pi_cho", "pi_rej", "ref_cho", "ref_rej"];
const TOL: f64 = 1e-4;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/methods")
}

struct Fixture {
    json: Value,
    t: HashMap<String, Tensor>,
}

fn load() -> Fixture {
    let json = serde_json::from_str(
        &std::fs::read_to_string(dir().join("methods.json")).expect("methods.json"),
    )
    .unwrap();
    Fixture {
        json,
        t: common::st(dir().join("methods.safetensors")),
    }
}

impl Fixture {
    fn get(&self, name: &str) -> &Tensor {
        self.t
            .get(name)
            .unwrap_or_else(|| panic!("fixture tensor {name}"))
    }
}

/// The policy leaves whose gradients are checked: `(fixture grad name, var)`.
type Leaves = Vec<(String, Var)>;

fn inputs(
    fx: &Fixture,
    set: &str,
    keys: &[String],
    leaves: &mut Leaves,
) -> [(BTreeMap<String, Tensor>, Tensor, Tensor); 4] {
    ROLES.map(|role| {
        let policy = role.starts_with("pi_");
        let mut acts = BTreeMap::new();
        for k in keys {
            let x = fx.get(&format!("in/{set}/{role}/hs/{k}")).clone();
            let x = if policy {
                let v = Var::from_tensor(&x).unwrap();
                leaves.push((format!("{role}/hs/{k}"), v.clone()));
                v.as_tensor().clone()
            } else {
                x
            };
            acts.insert(k.clone(), x);
        }
        let mask = fx.get(&format!("in/{set}/{role}/mask")).clone();
        let lp = fx.get(&format!("in/{set}/{role}/logprobs")).clone();
        let lp = if policy {
            let v = Var::from_tensor(&lp).unwrap();
            leaves.push((format!("{role}/logprobs"), v.clone()));
            v.as_tensor().clone()
        } else {
            lp
        };
        (acts, mask, lp)
    })
}

fn transform_config(v: &Value) -> (TransformConfig, bool) {
    let mut v = v.clone();
    let tied = v
        .as_object_mut()
        .and_then(|o| o.remove("tied"))
        .and_then(|t| t.as_bool())
        .unwrap_or(false);
    (serde_json::from_value(v).unwrap(), tied)
}

fn loss_config(v: &Value) -> MethodLoss {
    serde_json::from_value(v.clone()).unwrap()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= TOL * b.abs().max(1e-3) || (a.is_nan() && b.is_nan())
}

fn check_grad(name: &str, got: Option<&Tensor>, want: &Tensor, atol: f64, errs: &mut Vec<String>) {
    let scale = f64::from(common::max_abs(want));
    let Some(got) = got else {
        if scale > 0.0 {
            errs.push(format!("{name}: no gradient, reference max {scale:e}"));
        }
        return;
    };
    let diff = f64::from(common::max_abs(&(got - want).unwrap()));
    if diff > TOL * scale + atol {
        errs.push(format!(
            "{name}: max |diff| {diff:e} vs reference max {scale:e}"
        ));
    }
}

fn run_case(fx: &Fixture, case: &Value) -> Vec<String> {
    let name = case["name"].as_str().unwrap();
    let set = case["set"].as_str().unwrap();
    let sets = &fx.json["sets"][set];
    let keys: Vec<String> = sets["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap().to_string())
        .collect();
    let sizes: BTreeMap<String, usize> = keys
        .iter()
        .map(|k| (k.clone(), sets["widths"][k].as_u64().unwrap() as usize))
        .collect();
    let mut leaves = Leaves::new();
    let [pc, pr, rc, rr] = inputs(fx, set, &keys, &mut leaves);
    let nll_pi = Var::from_tensor(fx.get(&format!("in/{set}/pi_cho/nll"))).unwrap();
    leaves.push(("pi_cho/nll".into(), nll_pi.clone()));
    let nll_ref = fx.get(&format!("in/{set}/ref_cho/nll")).clone();

    let (tcfg, tied) = transform_config(&case["transform"]);
    let head = fx.get("in/hs/head").clone();
    let embed = if tied {
        head.clone()
    } else {
        fx.get("in/hs/embed").clone()
    };
    let matrices = ModelMatrices { embed, head };
    let site = TransformSite {
        sizes: &sizes,
        matrices: Some(&matrices),
        device: &Device::Cpu,
        seed: 0,
        hidden_states: set == "hs",
    };
    let tr = transform::build(&tcfg, &site).unwrap();
    let mut errs = Vec::new();
    let saved: HashMap<String, Tensor> = case["params"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let p = p.as_str().unwrap();
            (
                p.to_string(),
                fx.get(&format!("case/{name}/param/{p}")).clone(),
            )
        })
        .collect();
    transform::set_from(tr.as_ref(), &saved, &dir()).unwrap();
    let ours: Vec<String> = tr.params().into_iter().map(|(n, _)| n).collect();
    let theirs: Vec<String> = case["trainable"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    let mut sorted = ours.clone();
    sorted.sort();
    if sorted != theirs {
        errs.push(format!(
            "trainable parameters {sorted:?}, reference {theirs:?}"
        ));
    }
    let maps = tr.apply(&[&pc.0, &pr.0, &rc.0, &rr.0], false).unwrap();
    let coll = |acts: &BTreeMap<String, Tensor>, r: &(BTreeMap<String, Tensor>, Tensor, Tensor)| {
        Collected {
            acts: acts.clone(),
            mask: r.1.clone(),
            logps: r.2.clone(),
        }
    };
    let inputs = MethodInputs {
        pi_cho: coll(&maps[0], &pc),
        pi_rej: coll(&maps[1], &pr),
        ref_cho: coll(&maps[2], &rc),
        ref_rej: coll(&maps[3], &rr),
        nll_pi: Some(nll_pi.as_tensor().clone()),
        nll_ref: Some(nll_ref),
    };
    let out = method_loss(&inputs, &loss_config(&case["loss"])).unwrap();
    let loss = out.loss.to_scalar::<f32>().unwrap() as f64;
    let want = case["loss_value"].as_f64().unwrap();
    if !close(loss, want) {
        errs.push(format!("loss {loss} vs reference {want}"));
    }
    let info = case["info"].as_object().unwrap();
    let got: Vec<&String> = out.metrics.keys().collect();
    let mut wanted: Vec<&String> = info.keys().collect();
    wanted.sort();
    if got != wanted {
        errs.push(format!("metric names {got:?} vs reference {wanted:?}"));
    }
    let hard = name.ends_with("-hard");
    for (k, v) in info {
        let Some(m) = out.metrics.get(k) else {
            continue;
        };
        if hard && k.ends_with("_cosine") {
            // The hard SVD map is the identity (V >= d), so `h - io` is exactly 0 here and
            // float rounding noise in the reference: cosines of noise are not comparable.
            continue;
        }
        let m = m.to_scalar::<f32>().unwrap() as f64;
        let w = v.as_f64().unwrap_or(f64::NAN);
        if !close(m, w) {
            errs.push(format!("metric {k}: {m} vs reference {w}"));
        }
    }
    let grads = out.loss.backward().unwrap();
    // The hard SVD case transforms activations into rounding noise (h - h): gradients are
    // compared with an absolute tolerance of that noise.
    let atol = if hard { 1e-3 } else { 0.0 };
    let mut scale = 0f64;
    for (gname, v) in &leaves {
        let key = format!("case/{name}/grad/{gname}");
        match fx.t.get(&key) {
            Some(w) => {
                scale = scale.max(f64::from(common::max_abs(w)));
                check_grad(gname, grads.get(v.as_tensor()), w, atol, &mut errs)
            }
            None => {
                if let Some(g) = grads.get(v.as_tensor())
                    && common::max_abs(g) > 0.0
                {
                    errs.push(format!("{gname}: gradient where the reference has none"));
                }
            }
        }
    }
    // Some transform parameters have a gradient that is zero in exact arithmetic (HRA under
    // mse, whose distances an orthogonal map keeps; ETHER's 1x1 blocks, constant +-1): both
    // sides then hold rounding noise, bounded here by 1e-4 of the case's largest activation
    // gradient.
    for (pname, v) in tr.params() {
        let key = format!("case/{name}/grad/param/{pname}");
        let w = fx.get(&key);
        check_grad(
            &pname,
            grads.get(v.as_tensor()),
            w,
            atol.max(TOL * scale),
            &mut errs,
        );
    }
    errs.into_iter().map(|e| format!("{name}: {e}")).collect()
}

#[test]
fn every_method_case_matches_the_reference_code() {
    let fx = load();
    let cases = fx.json["cases"].as_array().unwrap();
    assert!(cases.len() >= 45, "fixture has {} cases", cases.len());
    let errs: Vec<String> = cases.iter().flat_map(|c| run_case(&fx, c)).collect();
    assert!(
        errs.is_empty(),
        "{} problems:\n{}",
        errs.len(),
        errs.join("\n")
    );
}
