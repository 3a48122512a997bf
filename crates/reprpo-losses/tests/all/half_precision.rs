//! bf16 / f16 hidden states through `reprpo_loss`, every variant and both token reductions (on
//! the CPU all of them take a fused kernel, which accumulates in f32; off the CPU the chain of
//! candle ops runs in f32): the
//! loss is computed in f32 from the half-precision inputs and cast back, so its value must be the
//! f32 chain's on the same (rounded) inputs, rounded once to the half dtype, and the gradient that
//! reaches a half-precision variable must be the f32 chain's gradient rounded to that dtype.
//!
//! Tolerances: one rounding of the output to the half dtype, `u = 2^-8` (bf16) or `2^-11` (f16)
//! relative, doubled for safety; gradients compare element by element with the same relative
//! bound plus an absolute floor of `u` times the largest gradient (elements near zero).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use candle_core::{DType, Device, Tensor, Var};
use reprpo_losses::reprpo::{
    HiddenPairs, ReprPoConfig, ReprPoVariant, TokenReduction, reprpo_loss, reprpo_loss_unfused,
};

fn masks(dev: &Device) -> (Tensor, Tensor) {
    let c = Tensor::new(&[[1u8, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dev).unwrap();
    let r = Tensor::new(&[[1u8, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dev).unwrap();
    (c, r)
}

#[test]
fn half_inputs_give_the_f32_result_rounded_for_every_configuration() {
    let dev = Device::Cpu;
    let (mc, mr) = masks(&dev);
    let shape = (2, 2, 5, 16);
    let base: Vec<Tensor> = (0..4)
        .map(|i| {
            (Tensor::randn(0f32, 1.0, shape, &dev).unwrap() * (1.0 + 0.25 * i as f64)).unwrap()
        })
        .collect();
    let mut checked = 0;
    let cases = ReprPoVariant::ALL.into_iter().flat_map(|v| {
        [TokenReduction::PerPosition, TokenReduction::Mean]
            .into_iter()
            .filter(move |&r| !(v == ReprPoVariant::Cka && r == TokenReduction::Mean))
            .map(move |r| (v, r))
    });
    for (dtype, u) in [(DType::BF16, 2f64.powi(-8)), (DType::F16, 2f64.powi(-11))] {
        for (variant, token_reduction) in cases.clone() {
            let cfg = ReprPoConfig {
                variant,
                token_reduction,
                example_weights: false,
                ..Default::default()
            };
            // The same values in both dtypes: round to the half dtype first.
            let half: Vec<Tensor> = base.iter().map(|t| t.to_dtype(dtype).unwrap()).collect();
            checked += 1;
            // The four tensors with the policy's rejected states as a variable (the gradient
            // checked below).
            let with_var = |t: &[Tensor]| {
                let v = Var::from_tensor(&t[1]).unwrap();
                let inputs = HiddenPairs::new(
                    t[0].clone(),
                    v.as_tensor().clone(),
                    t[2].clone(),
                    t[3].clone(),
                    mc.clone(),
                    mr.clone(),
                );
                (v, inputs)
            };
            let (v_half, inputs_half) = with_var(&half);
            let f32s: Vec<Tensor> = half
                .iter()
                .map(|t| t.to_dtype(DType::F32).unwrap())
                .collect();
            let (v32, inputs32) = with_var(&f32s);
            let got = reprpo_loss(&inputs_half, &cfg, 0.3).unwrap();
            let want = reprpo_loss_unfused(&inputs32, &cfg, 0.3).unwrap();
            assert_eq!(
                got.loss.dtype(),
                dtype,
                "{variant:?}: the loss keeps the input dtype"
            );
            let g = got
                .loss
                .to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            let w = want
                .loss
                .to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(
                (g - w).abs() <= 2.0 * u * w.abs().max(1e-6),
                "{dtype:?} {variant:?}: loss {g} vs f32 {w}"
            );
            let gh = got.loss.backward().unwrap();
            let g32 = want.loss.backward().unwrap();
            let gh = gh
                .get(v_half.as_tensor())
                .expect("gradient reaches the half var");
            assert_eq!(gh.dtype(), dtype);
            let gh: Vec<f32> = gh
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let gw: Vec<f32> = g32
                .get(v32.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let scale = gw.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
            assert!(
                scale > 0.0,
                "{variant:?}: a gradient that is all zero checks nothing"
            );
            for (a, b) in gh.iter().zip(&gw) {
                let (a, b) = (f64::from(*a), f64::from(*b));
                assert!(
                    (a - b).abs() <= 2.0 * u * b.abs() + u * scale,
                    "{dtype:?} {variant:?}: gradient {a} vs f32 {b}"
                );
            }
        }
    }
    // Nine variants per position and eight with mean token reduction (cka takes no mean), in two
    // dtypes.
    assert_eq!(checked, 34);
}
