//! Every integration test of `xtask` in one test binary (one link instead of one per
//! file: the test build's size and time, see docs/ARCHITECTURE.md, "Tests"). Each module
//! is one test file; run one with `cargo test -p xtask --test all <module>::`.

mod analyze;
mod byo_data;
mod cli;
mod common;
mod config_messages;
mod doctor;
mod eval_byo;
mod eval_data;
mod gpu_script;
mod interrupt;
mod soak;
mod sweep;
mod train_help;
mod validation;
