#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The pieces of the training step that replaced host reads (issue 14) give the host's numbers:
//!
//! - the global gradient norm and the clipping coefficient computed on the device scale the
//!   gradients exactly as the host formula did (`max / (norm + 1e-6)` in f64, rounded to f32),
//!   and leave unclipped gradients unchanged bit for bit;
//! - a gated AdamW update with the gate closed changes neither the parameters nor the moments,
//!   even with NaN gradients; with it open it is the plain update, bit for bit;
//! - a `DeviceBatch` carries the counted positions its device tensors imply.

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use reprpo_data::Tok;
use reprpo_models::logps::CountedRows;
use reprpo_train::data;
use reprpo_train::optim::{AdamW, AdamWConfig, clip_grads_to, global_grad_norm};

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

fn grads() -> Vec<Option<Tensor>> {
    let dev = Device::Cpu;
    vec![
        Some(Tensor::randn(0f32, 1.0, (16, 8), &dev).unwrap()),
        None,
        Some(Tensor::randn(0f32, 0.1, 8, &dev).unwrap()),
        Some(Tensor::randn(0f32, 3.0, (4, 4, 2), &dev).unwrap()),
    ]
}

/// The host computation the device one replaced.
fn host_norm(grads: &[Option<Tensor>]) -> f64 {
    grads
        .iter()
        .flatten()
        .map(|g| {
            g.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        })
        .fold(0f64, |s, v| s + v)
        .sqrt()
}

#[test]
fn clipping_on_the_device_matches_the_host_formula() {
    let g = grads();
    let want_norm = host_norm(&g);
    let norm = global_grad_norm(&g).unwrap().unwrap();
    assert_eq!(
        norm.to_scalar::<f64>().unwrap().to_bits(),
        want_norm.to_bits()
    );
    for max in [want_norm / 3.0, 0.5, want_norm * 2.0, 0.0] {
        let mut clipped = g.clone();
        clip_grads_to(&mut clipped, &norm, max).unwrap();
        for (a, b) in g.iter().zip(&clipped) {
            let (Some(a), Some(b)) = (a, b) else {
                assert!(a.is_none() && b.is_none());
                continue;
            };
            let want = if max > 0.0 && want_norm > max {
                (a * (max / (want_norm + 1e-6))).unwrap()
            } else {
                a.clone()
            };
            assert_eq!(bits(b), bits(&want), "max {max}");
        }
    }
    assert!(global_grad_norm(&[None, None]).unwrap().is_none());
}

fn adamw(dev: &Device) -> (AdamW, Vec<(String, Var)>) {
    let params = vec![
        (
            "a".to_string(),
            Var::from_tensor(&Tensor::randn(0f32, 1.0, (6, 3), dev).unwrap()).unwrap(),
        ),
        (
            "b".to_string(),
            Var::from_tensor(&Tensor::randn(0f32, 1.0, 5, dev).unwrap()).unwrap(),
        ),
    ];
    let cfg = AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    (AdamW::new(params.clone(), cfg).unwrap(), params)
}

fn snapshot(opt: &AdamW, params: &[(String, Var)]) -> Vec<(String, Vec<u32>)> {
    let mut out: Vec<(String, Vec<u32>)> = params
        .iter()
        .map(|(n, p)| (n.clone(), bits(p.as_tensor())))
        .collect();
    let mut state: Vec<_> = opt.state().into_iter().collect();
    state.sort_by(|a, b| a.0.cmp(&b.0));
    out.extend(state.into_iter().map(|(k, t)| (k, bits(&t))));
    out
}

#[test]
fn a_closed_gate_keeps_parameters_and_moments() {
    let dev = Device::Cpu;
    let (mut opt, params) = adamw(&dev);
    let g1: Vec<Option<Tensor>> = params
        .iter()
        .map(|(_, p)| Some(Tensor::randn(0f32, 1.0, p.dims(), &dev).unwrap()))
        .collect();
    opt.update(&g1, 1e-2).unwrap();
    let before = snapshot(&opt, &params);
    let nan: Vec<Option<Tensor>> = params
        .iter()
        .map(|(_, p)| Some((p.as_tensor().ones_like().unwrap() * f64::NAN).unwrap()))
        .collect();
    let closed = Tensor::zeros(1, DType::U8, &dev).unwrap();
    opt.update_gated(&nan, 1e-2, Some(&closed)).unwrap();
    assert_eq!(snapshot(&opt, &params), before);

    // Open: the same as the plain update.
    let (mut a, pa) = adamw(&dev);
    let (mut b, pb) = adamw(&dev);
    for ((_, x), (_, y)) in pa.iter().zip(&pb) {
        y.set(x.as_tensor()).unwrap();
    }
    let open = Tensor::ones(1, DType::U8, &dev).unwrap();
    for _ in 0..2 {
        a.update(&g1, 1e-2).unwrap();
        b.update_gated(&g1, 1e-2, Some(&open)).unwrap();
    }
    assert_eq!(snapshot(&a, &pa), snapshot(&b, &pb));
}

#[test]
fn device_batches_carry_their_counted_positions() {
    let tok = Tok::byte_level().unwrap();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets");
    let raw = data::load_pairs(&["default".to_string()], &dir, 0).unwrap();
    let pairs = data::tokenize(&tok, &raw[..5], &Default::default()).unwrap();
    let refs: Vec<_> = pairs.iter().collect();
    for b in [
        data::pair_batch(&refs, tok.pad, &Device::Cpu).unwrap(),
        data::chosen_batch(&refs, tok.pad, &Device::Cpu).unwrap(),
    ] {
        let (rows, t) = b.ids.dims2().unwrap();
        let ids = b.ids.flatten_all().unwrap().to_vec1::<u32>().unwrap();
        let lm = b.loss_mask.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want = CountedRows::new(&ids, rows, t, |i| lm[i] > 0.0);
        let got = b.counted();
        assert!(!got.pick.is_empty());
        assert_eq!(
            (&got.pick, &got.targets, &got.owner),
            (&want.pick, &want.targets, &want.owner)
        );
    }
}
