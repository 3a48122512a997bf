//! Every integration test of `reprpo-models` in one test binary (one link instead of one per
//! file: the test build's size and time, see docs/ARCHITECTURE.md, "Tests"). Each module
//! is one test file; run one with `cargo test -p reprpo-models --test all <module>::`.

mod adapter_nonfinite;
mod adapters_reference;
mod checkpoint;
mod collect;
mod common;
mod device_path;
mod frozen;
mod frozen_copy;
mod full;
mod generate_phi3;
mod hub_models;
mod linalg_device;
mod llama2c;
mod llama_reference;
mod loading;
mod logps;
mod matmul;
mod methods_reference;
mod model_paths;
mod ops;
mod orth_reference;
mod peft_export;
mod peft_prequantised;
mod phi3_reference;
mod qlora_reference;
mod quant_reference;
mod stories260k;
mod threads;
mod transforms_dtype;
