//! The training loop behind `cargo xtask train` (issue 5: not yet written).
