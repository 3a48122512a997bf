//! libFuzzer target `chat_template`: see `reprpo_fuzz::chat_template`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|d: &[u8]| reprpo_fuzz::chat_template(d));
