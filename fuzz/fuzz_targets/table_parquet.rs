//! libFuzzer target `table_parquet`: see `reprpo_fuzz::table_parquet`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|d: &[u8]| reprpo_fuzz::table_parquet(d));
