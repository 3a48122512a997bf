//! libFuzzer target `table_gzip`: see `reprpo_fuzz::table_gzip`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|d: &[u8]| reprpo_fuzz::table_gzip(d));
