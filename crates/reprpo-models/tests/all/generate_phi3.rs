//! Generation drives Phi-3 too: greedy tokens from the KV-cached path equal the argmax of a full
//! forward over the whole sequence at every step, also across LongRoPE's switch from short to long
//! factors (the cache is rebuilt there, as transformers does).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use candle_core::{D, DType, Device, IndexOp, Tensor};
use reprpo_models::ForwardSpec;
use reprpo_models::generate::{Sampling, StopAt, generate};
use reprpo_models::phi3::Phi3;

#[test]
fn phi3_greedy_generation_equals_full_forward_argmax() {
    for name in ["phi3_mini", "phi3_longrope"] {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/models")
            .join(name);
        let model = Phi3::load(&dir, DType::F32, &Device::Cpu).unwrap();
        let prompt = vec![5u32, 17, 3, 60, 41];
        let got = generate(&model, &prompt, 20, &Sampling::Greedy, &StopAt::default()).unwrap();
        let mut seq = prompt.clone();
        for _ in 0..20 {
            let ids = Tensor::new(seq.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let logits = model
                .forward(&ids, None, None, &ForwardSpec::logits())
                .unwrap()
                .logits
                .unwrap();
            let last = logits.i((0, seq.len() - 1)).unwrap();
            let next = last.argmax(D::Minus1).unwrap().to_scalar::<u32>().unwrap();
            seq.push(next);
        }
        assert_eq!(got, seq[prompt.len()..].to_vec(), "{name}");
        assert!(
            seq.len() > 16,
            "the sequence must pass original_max_position_embeddings (16)"
        );
    }
}
