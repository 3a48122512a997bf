//! libFuzzer target `metrics`: see `reprpo_fuzz::metrics`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|d: &[u8]| reprpo_fuzz::metrics(d));
