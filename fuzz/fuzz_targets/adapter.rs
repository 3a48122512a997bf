//! libFuzzer target `adapter`: see `reprpo_fuzz::adapter`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|d: &[u8]| reprpo_fuzz::adapter(d));
