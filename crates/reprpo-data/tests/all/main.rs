//! Every integration test of `reprpo-data` in one test binary (one link instead of one per
//! file: the test build's size and time, see docs/ARCHITECTURE.md, "Tests"). Each module
//! is one test file; run one with `cargo test -p reprpo-data --test all <module>::`.

mod bad_input;
mod convert_fixtures;
mod convert_real;
mod data_paths;
mod default_data;
mod empty_input;
mod hub;
mod recipes;
mod reprpo_ref;
mod tokenize_trl;
mod write_modes;
