//! libFuzzer target `table_json`: see `reprpo_fuzz::table_json`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|d: &[u8]| reprpo_fuzz::table_json(d));
