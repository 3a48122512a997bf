//! The evaluation suite behind `cargo xtask eval` (issue 6: not yet written).
pub mod plot;
