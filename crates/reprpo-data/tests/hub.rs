//! Hub datasets through `hf-hub`'s cache layout, offline: files are found in a cache folder built
//! here exactly as `hf-hub` writes it; a split that is not cached gives an error that says so.
//! (Tests never touch the network.)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::sync::Arc;

use arrow_array::{ArrayRef, Int32Array, RecordBatch, StringArray};
use hf_hub::Cache;
use reprpo_data::hub::{PARQUET_REVISION, dataset_files_with};
use reprpo_data::recipe::HubSource;
use reprpo_data::{ConvertOptions, Converter, convert, read_table};

fn write_parquet(path: &Path, prompts: &[&str]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let n = prompts.len();
    let cols: Vec<(&str, ArrayRef)> = vec![
        ("prompt", Arc::new(StringArray::from(prompts.to_vec()))),
        (
            "chosen_response",
            Arc::new(StringArray::from(vec![" good"; n])),
        ),
        (
            "rejected_response",
            Arc::new(StringArray::from(vec![" bad"; n])),
        ),
        (
            "n",
            Arc::new(Int32Array::from((0..n as i32).collect::<Vec<_>>())),
        ),
    ];
    let batch = RecordBatch::try_from_iter(cols).unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

/// A cache folder as hf-hub lays it out: `datasets--org--name/refs/<revision>` holds the commit,
/// `snapshots/<commit>/<file>` the files.
fn fake_cache(root: &Path) -> Cache {
    let hub = root.join("hub");
    let repo = hub.join("datasets--org--prefs");
    let refs = repo.join("refs").join(PARQUET_REVISION);
    std::fs::create_dir_all(refs.parent().unwrap()).unwrap();
    std::fs::write(&refs, "0123abcd").unwrap();
    let snap = repo.join("snapshots/0123abcd");
    write_parquet(&snap.join("default/train/0000.parquet"), &["p1", "p2"]);
    write_parquet(&snap.join("default/train/0001.parquet"), &["p3"]);
    write_parquet(&snap.join("default/test/0000.parquet"), &["t1"]);
    Cache::new(hub)
}

#[test]
fn offline_finds_cached_split_files_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let cache = fake_cache(dir.path());
    let src = HubSource {
        repo: "org/prefs".into(),
        config: "default".into(),
        split: "train".into(),
    };
    let files = dataset_files_with(&src, &cache, true).unwrap();
    let names: Vec<String> = files
        .iter()
        .map(|f| {
            f.strip_prefix(dir.path())
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/")
        })
        .collect();
    assert_eq!(
        names,
        vec![
            "hub/datasets--org--prefs/snapshots/0123abcd/default/train/0000.parquet",
            "hub/datasets--org--prefs/snapshots/0123abcd/default/train/0001.parquet",
        ]
    );
    // And they convert: the hub's Parquet goes through the same converters.
    let mut prompts = Vec::new();
    for f in &files {
        let t = read_table(f).unwrap();
        let c = convert(
            Converter::HelpSteer2Dpo,
            &t,
            &ConvertOptions {
                dataset: "prefs".into(),
                seed: 0,
            },
        )
        .unwrap();
        prompts.extend(c.pairs.into_iter().map(|p| p.prompt));
    }
    assert_eq!(prompts, vec!["p1", "p2", "p3"]);
}

#[test]
fn offline_missing_split_or_repo_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let cache = fake_cache(dir.path());
    let missing_split = HubSource {
        repo: "org/prefs".into(),
        config: "default".into(),
        split: "validation".into(),
    };
    let err = dataset_files_with(&missing_split, &cache, true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("org/prefs"), "{err}");
    assert!(err.contains("validation"), "{err}");
    assert!(err.contains("HF_HUB_OFFLINE"), "{err}");
    let missing_repo = HubSource {
        repo: "org/absent".into(),
        config: "default".into(),
        split: "train".into(),
    };
    let err = dataset_files_with(&missing_repo, &cache, true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not cached"), "{err}");
    assert!(err.contains("HF_HUB_OFFLINE"), "{err}");
}
