#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! `peft::add_frozen_copy` and `ForwardSpec::reference` (the reference model of
//! `adapter.reference = "initial"`): the copy starts equal to the policy, does not move when the
//! policy is trained, is a different set of tensors than `adapter_params` of the policy, and gets
//! no gradient from a reference forward; without a reference adapter a reference forward is the
//! base (adapters off).

use candle_core::{DType, Device, Tensor};
use reprpo_models::adapter::AdapterHost;
use reprpo_models::{ForwardSpec, Llama, peft};

use crate::common;

use common::{fixture, max_abs};

fn logits(m: &Llama, ids: &Tensor, spec: &ForwardSpec) -> Tensor {
    m.forward(ids, None, None, spec).unwrap().logits.unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).unwrap())
}

/// A model with a non-identity LoRA "policy" (B drawn, not zero) at index 0.
fn model_with_policy() -> Llama {
    let mut m = Llama::load(&fixture("llama_tied"), DType::F32, &Device::Cpu).unwrap();
    let cfg = peft::AdapterConfig::lora(4, 8.0, &["q_proj", "v_proj", "down_proj"]);
    peft::add_adapter(&mut m, "policy", cfg, None, 0).unwrap();
    for (name, var) in peft::adapter_params(&m, 0) {
        if name.ends_with("lora_B.weight") {
            var.set(&var.as_tensor().randn_like(0.0, 0.5).unwrap())
                .unwrap();
        }
    }
    m
}

fn reference() -> ForwardSpec {
    ForwardSpec {
        reference: true,
        ..ForwardSpec::logits()
    }
}

#[test]
fn without_a_reference_adapter_the_reference_is_the_base() {
    let m = model_with_policy();
    let ids = Tensor::new(&[[3u32, 7, 11, 2, 5, 9, 1, 4]], &Device::Cpu).unwrap();
    let off = ForwardSpec {
        adapters_off: true,
        ..ForwardSpec::logits()
    };
    let base = logits(&m, &ids, &off);
    assert_eq!(max_diff(&logits(&m, &ids, &reference()), &base), 0.0);
    assert!(max_diff(&logits(&m, &ids, &ForwardSpec::logits()), &base) > 1e-3);
}

#[test]
fn the_copy_is_frozen_and_separate() {
    let mut m = model_with_policy();
    let idx = peft::add_frozen_copy(&mut m, 0, "ref").unwrap();
    assert_eq!(m.adapter_set().reference, Some(idx));
    assert_eq!(m.adapter_set().active, Some(0));
    let ids = Tensor::new(&[[3u32, 7, 11, 2, 5, 9, 1, 4]], &Device::Cpu).unwrap();
    let start = logits(&m, &ids, &ForwardSpec::logits());
    assert_eq!(max_diff(&logits(&m, &ids, &reference()), &start), 0.0);

    // The optimizer's tensors are the policy's only: none is the copy's.
    let policy = peft::adapter_params(&m, 0);
    let copy = peft::adapter_params(&m, idx);
    assert_eq!(policy.len(), copy.len());
    for ((pk, pv), (ck, cv)) in policy.iter().zip(&copy) {
        assert_eq!(pk, ck);
        assert_ne!(pv.as_tensor().id(), cv.as_tensor().id());
    }

    // No gradient reaches the copy from a reference forward; the policy's forward gets one.
    let pol = logits(&m, &ids, &ForwardSpec::logits());
    let refr = logits(&m, &ids, &reference());
    let loss = (pol.sum_all().unwrap() + refr.sum_all().unwrap()).unwrap();
    let grads = loss.backward().unwrap();
    assert!(
        policy
            .iter()
            .all(|(_, v)| grads.get(v.as_tensor()).is_some())
    );
    assert!(copy.iter().all(|(_, v)| grads.get(v.as_tensor()).is_none()));

    // Moving the policy leaves the copy (and the reference forward) where it was.
    for (_, var) in &policy {
        var.set(&(var.as_tensor() + 0.1).unwrap()).unwrap();
    }
    assert!(max_diff(&logits(&m, &ids, &ForwardSpec::logits()), &start) > 1e-3);
    assert_eq!(max_diff(&logits(&m, &ids, &reference()), &start), 0.0);
}
