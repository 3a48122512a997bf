//! libFuzzer target `recipe`: see `reprpo_fuzz::recipe`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|d: &[u8]| reprpo_fuzz::recipe(d));
