//! libFuzzer target `table_jsonl`: see `reprpo_fuzz::table_jsonl`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|d: &[u8]| reprpo_fuzz::table_jsonl(d));
