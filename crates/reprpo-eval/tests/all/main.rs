//! Every integration test of `reprpo-eval` in one test binary (one link instead of one per
//! file: the test build's size and time, see docs/ARCHITECTURE.md, "Tests"). Each module
//! is one test file; run one with `cargo test -p reprpo-eval --test all <module>::`.

mod analyze_collect;
mod analyze_reference;
mod common;
mod open_pref_eval;
mod output;
mod plot;
mod reference;
mod suites;
mod table;
mod truncation;
