//! libFuzzer target `train_config`: see `reprpo_fuzz::train_config`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|d: &[u8]| reprpo_fuzz::train_config(d));
