//! libFuzzer target `llama2c_checkpoint`: see `reprpo_fuzz::llama2c_checkpoint`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|d: &[u8]| reprpo_fuzz::llama2c_checkpoint(d));
