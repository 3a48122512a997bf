//! `output::file_label`: model labels (run folder names, hub ids) made safe as a part of a file
//! name for `examples-<label>.jsonl`.

use reprpo_eval::output::file_label;

#[test]
fn labels_become_file_name_parts() {
    for (label, want) in [
        ("base", "base"),
        ("dpo-lora-20261207-101500", "dpo-lora-20261207-101500"),
        ("org/model@v1", "org_model_v1"),
        ("run'", "run_"),
        ("../x", "_._x"),
        (".hidden", "_hidden"),
        ("a b\\c:d", "a_b_c_d"),
        ("", "_"),
        ("modèle", "mod_le"),
    ] {
        assert_eq!(file_label(label), want, "{label:?}");
    }
}
