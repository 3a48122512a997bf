//! libFuzzer target `checkpoint`: see `reprpo_fuzz::checkpoint`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|d: &[u8]| reprpo_fuzz::checkpoint(d));
