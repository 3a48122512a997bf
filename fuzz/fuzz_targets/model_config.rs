//! libFuzzer target `model_config`: see `reprpo_fuzz::model_config`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|d: &[u8]| reprpo_fuzz::model_config(d));
