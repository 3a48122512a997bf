//! Writes the binary seeds of `regressions/` that no text editor makes: Parquet files (flat
//! pairs, MC items with a list column, and a TruthfulQA hub layout with struct and list columns),
//! the resolved default training config, and checkpoint folders. The text seeds were cut by hand
//! from the repository's fixtures and `datasets/`.
//!
//! `cargo run -p reprpo-fuzz --example seeds -- crates/reprpo-fuzz/regressions`

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::{Int64Builder, ListBuilder, StringBuilder};
use arrow_array::{ArrayRef, RecordBatch, StringArray, StructArray};
use arrow_schema::{DataType, Field, Fields};
use candle_core::{Device, Tensor};
use reprpo_data::types::{McItem, PreferencePair, SourceMeta};
use reprpo_fuzz::join_parts;

fn main() {
    let out = PathBuf::from(std::env::args().nth(1).expect("usage: seeds OUT_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    parquet_seeds(&out.join("table_parquet"), tmp.path());
    train_config_seeds(&out.join("train_config"));
    checkpoint_seeds(&out.join("checkpoint"), tmp.path());
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn source(row: usize) -> SourceMeta {
    SourceMeta {
        dataset: "seed".into(),
        row,
        chosen_score: Some(3.5),
        rejected_score: None,
    }
}

fn parquet_seeds(dir: &Path, tmp: &Path) {
    let pairs = vec![
        PreferencePair {
            id: "seed/1".into(),
            prompt: "User: Hi!\nAssistant:".into(),
            chosen: " Hello.".into(),
            rejected: " Go away.".into(),
            source: source(1),
        },
        PreferencePair {
            id: "seed/2".into(),
            prompt: "User: 2 + 2?\nAssistant:".into(),
            chosen: " 4".into(),
            rejected: " 5".into(),
            source: source(2),
        },
    ];
    let p = tmp.join("pairs.parquet");
    reprpo_data::write::write_pairs(&p, &pairs).unwrap();
    write(dir, "seed-pairs.parquet", &std::fs::read(&p).unwrap());
    let mc = vec![McItem {
        id: "seed/1".into(),
        prompt: "Q: 2 + 2?".into(),
        choices: vec!["4".into(), "5".into(), "22".into()],
        correct: vec![0],
        source: source(1),
    }];
    let p = tmp.join("mc.parquet");
    reprpo_data::write::write_mc(&p, &mc).unwrap();
    write(dir, "seed-mc.parquet", &std::fs::read(&p).unwrap());

    // The TruthfulQA hub layout: question, mc1_targets {choices: list<utf8>, labels: list<i64>}.
    let question: ArrayRef = Arc::new(StringArray::from(vec!["What is 2 + 2?"]));
    let mut choices = ListBuilder::new(StringBuilder::new());
    for c in ["4", "5"] {
        choices.values().append_value(c);
    }
    choices.append(true);
    let mut labels = ListBuilder::new(Int64Builder::new());
    labels.values().append_value(1);
    labels.values().append_value(0);
    labels.append(true);
    let choices: ArrayRef = Arc::new(choices.finish());
    let labels: ArrayRef = Arc::new(labels.finish());
    let fields = Fields::from(vec![
        Field::new("choices", choices.data_type().clone(), true),
        Field::new("labels", labels.data_type().clone(), true),
    ]);
    let targets: ArrayRef = Arc::new(StructArray::new(
        fields.clone(),
        vec![choices, labels],
        None,
    ));
    let batch = RecordBatch::try_from_iter(vec![
        ("question", question),
        ("mc1_targets", targets.clone()),
        ("mc2_targets", targets),
    ])
    .unwrap();
    assert!(matches!(
        batch.schema().field(1).data_type(),
        DataType::Struct(_)
    ));
    let mut bytes = Vec::new();
    let mut w = parquet::arrow::ArrowWriter::try_new(&mut bytes, batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    write(dir, "seed-truthfulqa-hub.parquet", &bytes);
}

fn train_config_seeds(dir: &Path) {
    let toml = reprpo_train::TrainConfig::default().to_toml().unwrap();
    write(
        dir,
        "seed-resolved-default.toml",
        &join_parts(&[toml.as_bytes()]),
    );
    let small =
        "loss = \"dpo\"\n\n[train]\nlr = 1e-4\nmax_steps = 10\n\n[adapter]\nkind = \"lora\"\n";
    let overrides = "train.lr=5e-5\nadapter=dora\ndatasets=[default,hh]\nreprpo.layers=[1,2]\n";
    write(
        dir,
        "seed-file-and-overrides.toml",
        &join_parts(&[small.as_bytes(), overrides.as_bytes()]),
    );
}

fn checkpoint_seeds(dir: &Path, tmp: &Path) {
    let state = br#"{"step":7,"total_steps":10,"running":null,"config_hash":"00ff"}"#;
    let mut moments = HashMap::new();
    moments.insert(
        "m.base_model.model.layers.0.q.lora_A.weight".to_string(),
        Tensor::new(&[[0.5f32, -1.0], [0.25, 2.0]], &Device::Cpu).unwrap(),
    );
    moments.insert(
        "step".to_string(),
        Tensor::new(&[7u32], &Device::Cpu).unwrap(),
    );
    let opt = tmp.join("optimizer.safetensors");
    candle_core::safetensors::save(&moments, &opt).unwrap();
    let opt = std::fs::read(&opt).unwrap();
    // Empty manifest part: the harness writes a correct one.
    write(dir, "seed-auto-manifest", &join_parts(&[b"", state, &opt]));
    // An explicit manifest, as `run::write_manifest` writes it.
    let ck = tmp.join("step-7");
    std::fs::create_dir_all(&ck).unwrap();
    std::fs::write(ck.join("trainer_state.json"), state).unwrap();
    std::fs::write(ck.join("optimizer.safetensors"), &opt).unwrap();
    reprpo_train::run::write_manifest(&ck).unwrap();
    let manifest = std::fs::read(ck.join(reprpo_train::run::MANIFEST)).unwrap();
    write(dir, "seed-manifest", &join_parts(&[&manifest, state, &opt]));
}
