//! Every integration test of `reprpo-sweep` in one test binary (one link instead of one per
//! file: the test build's size and time, see docs/ARCHITECTURE.md, "Tests"). Each module
//! is one test file; run one with `cargo test -p reprpo-sweep --test all <module>::`.

mod plan;
mod run_report;
mod stats_reference;
mod tpe;
