//! An input file without a single record fails naming the file ("no rows"), in every format;
//! token-length statistics of no pairs are an error, not a table of NaN.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use reprpo_data::tokenize::TokenizeConfig;
use reprpo_data::{DataError, Tok, read_table, stats};

#[test]
fn empty_files_name_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, text) in [
        ("empty.jsonl", ""),
        ("blank.jsonl", "\n  \n"),
        ("empty.json", "[]"),
        ("header.csv", "prompt,chosen,rejected\n"),
    ] {
        let p = tmp.path().join(name);
        std::fs::write(&p, text).unwrap();
        let err = read_table(&p).unwrap_err();
        assert!(matches!(err, DataError::NoRows { .. }), "{name}: {err}");
        let msg = err.to_string();
        assert!(
            msg.starts_with(&p.display().to_string()) && msg.contains("no rows"),
            "{msg}"
        );
    }
    // Gzip-compressed empty JSONL too.
    let p = tmp.path().join("empty.jsonl.gz");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, b"").unwrap();
    std::fs::write(&p, gz.finish().unwrap()).unwrap();
    assert!(matches!(read_table(&p), Err(DataError::NoRows { .. })));
    // One row is enough.
    let p = tmp.path().join("one.jsonl");
    std::fs::write(&p, r#"{"prompt": "p", "chosen": "a", "rejected": "b"}"#).unwrap();
    assert_eq!(read_table(&p).unwrap().len(), 1);
}

#[test]
fn stats_of_no_pairs_is_an_error() {
    let tok = Tok::byte_level().unwrap();
    let err = stats::pair_stats(&tok, &[], &TokenizeConfig::default()).unwrap_err();
    assert!(err.to_string().contains("no preference pairs"), "{err}");
}
