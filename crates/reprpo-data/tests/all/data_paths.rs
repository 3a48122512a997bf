//! Datasets given by path where a recipe name is accepted (issue 16): which specs are files,
//! the converter inferred from the columns (`pairs`, `mc`, `chat` for TRL's conversational rows,
//! `hh-rlhf` for transcripts) or named (`FILE:CONVERTER`), and the errors that name the file,
//! the row and the field.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::path::{Path, PathBuf};

use reprpo_data::convert::{Converter, infer};
use reprpo_data::read::read_table;
use reprpo_data::recipe::{self, path_spec};

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn load(spec: &str) -> reprpo_data::Result<reprpo_data::convert::Converted> {
    let rs = recipe::resolve(&[spec.to_string()], Path::new("../../datasets"))?;
    recipe::load_recipe(&rs[0], Path::new("/unused"), &|_| unreachable!())
}

#[test]
fn which_specs_are_files() {
    for name in ["default", "hh", "default-test", "truthfulqa-mc1"] {
        assert_eq!(path_spec(name), None, "{name}");
    }
    let cases = [
        ("pairs.jsonl", "pairs.jsonl", "auto"),
        ("x/y.CSV.gz", "x/y.CSV.gz", "auto"),
        ("/abs/d.parquet", "/abs/d.parquet", "auto"),
        ("./d", "./d", "auto"),
        ("../d.json:hh-rlhf", "../d.json", "hh-rlhf"),
        ("d.jsonl:chat", "d.jsonl", "chat"),
    ];
    for (spec, path, conv) in cases {
        assert_eq!(
            path_spec(spec),
            Some((PathBuf::from(path), conv.to_string())),
            "{spec}"
        );
    }
}

#[test]
fn the_converter_follows_the_columns() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cases = [
        (
            "pairs.jsonl",
            r#"{"prompt":"Q?","chosen":" yes","rejected":" no"}"#,
            Converter::Pairs,
        ),
        (
            "mc.jsonl",
            r#"{"prompt":"Q?","choices":["a","b"],"correct":[1]}"#,
            Converter::Mc,
        ),
        (
            "hh.jsonl",
            r#"{"chosen":"\n\nHuman: hi\n\nAssistant: hello","rejected":"\n\nHuman: hi\n\nAssistant: go"}"#,
            Converter::HhRlhf,
        ),
        (
            "chat.jsonl",
            r#"{"chosen":[{"role":"user","content":"hi"},{"role":"assistant","content":"hello"}],"rejected":[{"role":"user","content":"hi"},{"role":"assistant","content":"go"}]}"#,
            Converter::Chat,
        ),
    ];
    for (name, row, want) in cases {
        let p = write(d, name, &format!("{row}\n"));
        assert_eq!(infer(&read_table(&p).unwrap()).unwrap(), want, "{name}");
    }
    // By path through a recipe spec: the same pairs the explicit converters give.
    let hh = load(d.join("hh.jsonl").to_str().unwrap()).unwrap();
    assert_eq!(hh.pairs[0].prompt, "\n\nHuman: hi\n\nAssistant:");
    assert_eq!(hh.pairs[0].chosen, " hello");
    assert_eq!(hh.pairs[0].id, "hh/1");
    let chat = load(d.join("chat.jsonl").to_str().unwrap()).unwrap();
    assert_eq!(
        (
            &*chat.pairs[0].prompt,
            &*chat.pairs[0].chosen,
            &*chat.pairs[0].rejected
        ),
        ("hi", "hello", "go")
    );
    let mc = load(d.join("mc.jsonl").to_str().unwrap()).unwrap();
    assert_eq!(mc.mc[0].correct, vec![1]);
    // A layout it cannot tell: the file, the columns, how to name a converter.
    let p = write(d, "odd.jsonl", "{\"question\":\"Q\",\"answer\":\"A\"}\n");
    let msg = load(p.to_str().unwrap()).unwrap_err().to_string();
    assert!(
        msg.contains("odd.jsonl") && msg.contains("question") && msg.contains("FILE:CONVERTER"),
        "{msg}"
    );
}

#[test]
fn named_converters_csv_and_gzip() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let csv = write(d, "p.csv", "prompt,chosen,rejected\nQ?, yes, no\n");
    let c = load(csv.to_str().unwrap()).unwrap();
    assert_eq!(c.pairs[0].id, "p/1");
    // The same rows gzipped, converter named.
    let gz = d.join("p.jsonl.gz");
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(b"{\"prompt\":\"Q?\",\"chosen\":\" yes\",\"rejected\":\" no\"}\n")
        .unwrap();
    std::fs::write(&gz, enc.finish().unwrap()).unwrap();
    let g = load(&format!("{}:pairs", gz.display())).unwrap();
    assert_eq!(
        (g.pairs[0].id.as_str(), g.pairs[0].chosen.as_str()),
        ("p/1", " yes")
    );
    // An unknown converter and a missing file name the spec and the file.
    let msg = load(&format!("{}:nope", csv.display()))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("p.csv") && msg.contains("nope"), "{msg}");
    let msg = load(d.join("missing.jsonl").to_str().unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("missing.jsonl") && msg.contains("no such"),
        "{msg}"
    );
}

#[test]
fn chat_rows_that_do_not_fit_one_user_turn_name_the_row_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let explicit = r#"{"prompt":[{"role":"user","content":"hi"}],"chosen":[{"role":"assistant","content":"a"}],"rejected":[{"role":"assistant","content":"b"}]}"#;
    let system = r#"{"prompt":[{"role":"system","content":"be nice"},{"role":"user","content":"hi"}],"chosen":[{"role":"assistant","content":"a"}],"rejected":[{"role":"assistant","content":"b"}]}"#;
    let p = write(d, "c.jsonl", &format!("{explicit}\n{system}\n"));
    let msg = load(&format!("{}:chat", p.display()))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("c.jsonl") && msg.contains("row 2") && msg.contains("prompt"),
        "{msg}"
    );
    let p = write(d, "ok.jsonl", &format!("{explicit}\n"));
    let c = load(p.to_str().unwrap()).unwrap();
    assert_eq!((&*c.pairs[0].prompt, &*c.pairs[0].rejected), ("hi", "b"));
}
