//! Every integration test of `reprpo-losses` in one test binary (one link instead of one per
//! file: the test build's size and time, see docs/ARCHITECTURE.md, "Tests"). Each module
//! is one test file; run one with `cargo test -p reprpo-losses --test all <module>::`.

mod dpo_trl;
mod fused;
mod half_precision;
mod layers_validation;
mod reduce_fused;
mod reduce_reference;
mod reprpo_reference;
