//! `reprpo.layers = []` is rejected by validation, before any work, naming the key.

use reprpo_losses::{LossError, ReprPoConfig, resolve_layers};

#[test]
fn empty_layers_fail_validation() {
    let cfg = ReprPoConfig {
        layers: Some(vec![]),
        ..ReprPoConfig::default()
    };
    let err = cfg.validate().expect_err("empty layers must not validate");
    assert!(matches!(err, LossError::InvalidConfig(_)), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("layers is empty"), "{msg}");
    assert!(
        resolve_layers(&[], 5)
            .expect_err("no index resolves to no layer")
            .to_string()
            .contains("layers is empty")
    );
    // Unset layers (the default) and a non-empty list still validate.
    assert!(ReprPoConfig::default().validate().is_ok());
    let cfg = ReprPoConfig {
        layers: Some(vec![-1]),
        ..ReprPoConfig::default()
    };
    assert!(cfg.validate().is_ok());
}
