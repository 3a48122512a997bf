//! libFuzzer target `table_csv`: see `reprpo_fuzz::table_csv`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|d: &[u8]| reprpo_fuzz::table_csv(d));
