#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! `run.tensorboard = true` (issue 16): the run's `tb/` event files hold the scalars of
//! `metrics.jsonl`, read back here with a reader of this file's own (TFRecord framing with both
//! masked CRC-32Cs checked, the `Event` / `Summary` protobuf fields decoded by number), so that a
//! wrong field number or CRC in the writer cannot hide behind shared code. On resume, every step
//! shows once across the folder's files.

use std::path::{Path, PathBuf};

use crate::common;

use common::ctx;
use reprpo_train::trainer;
use reprpo_train::{TrainConfig, tensorboard};

/// A 4-step DPO run on 8 pairs with an evaluation every 2 steps (so `eval_*` records too), a
/// checkpoint every step, TensorBoard on; then `extra`.
fn config(out: &Path, extra: &[&str]) -> TrainConfig {
    let mut all = vec![
        "run.tensorboard=true",
        "run.save_steps=1",
        "run.save_total_limit=10",
        "loss=dpo",
        "train.lr=3e-3",
        "train.max_steps=4",
        "data.eval_datasets=[default-test]",
        "train.eval_every=2",
        "train.n_eval_examples=4",
    ];
    all.extend_from_slice(extra);
    common::config(out, &all)
}

/// `(step, tag, value)` of one scalar.
type Scalar = (i64, String, f32);

/// The scalars that `metrics.jsonl` says TensorBoard must show: every numeric field but `step`
/// of every record, in order, as `f32`.
fn expected(run: &Path) -> Vec<Scalar> {
    let mut out = Vec::new();
    for line in std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
    {
        let rec: serde_json::Map<String, serde_json::Value> = serde_json::from_str(line).unwrap();
        let step = rec["step"].as_i64().unwrap();
        for (k, v) in &rec {
            if let (false, Some(x)) = (k == "step", v.as_f64()) {
                out.push((step, k.clone(), x as f32));
            }
        }
    }
    out
}

/// TFRecord's mask, written out here as TensorFlow's `crc32c.h` states it rather than taken from
/// the crate.
#[allow(clippy::manual_rotate)]
fn masked(bytes: &[u8]) -> u32 {
    let c = crc32c::crc32c(bytes);
    ((c >> 15) | (c << 17)).wrapping_add(0xa282_ead8)
}

/// Every record of a TFRecord file, both CRCs checked; the file must end after the last one.
fn frames(path: &Path) -> Vec<Vec<u8>> {
    let bytes = std::fs::read(path).unwrap();
    let mut rest = &bytes[..];
    let mut out = Vec::new();
    while !rest.is_empty() {
        let len_bytes = &rest[..8];
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        let len_crc = u32::from_le_bytes(rest[8..12].try_into().unwrap());
        assert_eq!(len_crc, masked(len_bytes), "{}: length CRC", path.display());
        let data = &rest[12..12 + len];
        let data_crc = u32::from_le_bytes(rest[12 + len..16 + len].try_into().unwrap());
        assert_eq!(data_crc, masked(data), "{}: data CRC", path.display());
        out.push(data.to_vec());
        rest = &rest[16 + len..];
    }
    out
}

/// One protobuf field: number and payload (varint, fixed64, fixed32 or bytes).
enum Field {
    Varint(u64),
    Fixed64([u8; 8]),
    Fixed32([u8; 4]),
    Bytes(Vec<u8>),
}

fn varint(b: &[u8], i: &mut usize) -> u64 {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = b[*i];
        *i += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return v;
        }
    }
    panic!("varint too long")
}

/// The fields of one protobuf message, in order.
fn fields(b: &[u8]) -> Vec<(u64, Field)> {
    let mut i = 0;
    let mut out = Vec::new();
    while i < b.len() {
        let key = varint(b, &mut i);
        let f = match key & 7 {
            0 => Field::Varint(varint(b, &mut i)),
            1 => {
                i += 8;
                Field::Fixed64(b[i - 8..i].try_into().unwrap())
            }
            2 => {
                let n = varint(b, &mut i) as usize;
                i += n;
                Field::Bytes(b[i - n..i].to_vec())
            }
            5 => {
                i += 4;
                Field::Fixed32(b[i - 4..i].try_into().unwrap())
            }
            w => panic!("wire type {w}"),
        };
        out.push((key >> 3, f));
    }
    out
}

/// One decoded `Event`: its step, its `file_version` and its scalars.
#[derive(Default)]
struct Event {
    wall_time: f64,
    step: i64,
    file_version: Option<String>,
    scalars: Vec<(String, f32)>,
}

fn event(data: &[u8]) -> Event {
    let mut e = Event::default();
    for (n, f) in fields(data) {
        match (n, f) {
            (1, Field::Fixed64(b)) => e.wall_time = f64::from_le_bytes(b),
            (2, Field::Varint(v)) => e.step = v as i64,
            (3, Field::Bytes(b)) => e.file_version = Some(String::from_utf8(b).unwrap()),
            (5, Field::Bytes(summary)) => {
                for (n, value) in fields(&summary) {
                    let (1, Field::Bytes(value)) = (n, value) else {
                        panic!("Summary field {n}")
                    };
                    let (mut tag, mut x) = (String::new(), None);
                    for (n, f) in fields(&value) {
                        match (n, f) {
                            (1, Field::Bytes(t)) => tag = String::from_utf8(t).unwrap(),
                            (2, Field::Fixed32(v)) => x = Some(f32::from_le_bytes(v)),
                            (n, _) => panic!("Summary.Value field {n}"),
                        }
                    }
                    e.scalars.push((tag, x.expect("simple_value")));
                }
            }
            (n, _) => panic!("Event field {n}"),
        }
    }
    e
}

/// The event files of a run, in the order TensorBoard reads them (by name).
fn event_files(run: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(run.join("tb"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for f in &files {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("events.out.tfevents."), "{name}");
    }
    files
}

/// The scalars of every event file of a run, each file checked to start with its file version.
fn scalars(run: &Path) -> Vec<Scalar> {
    let mut out = Vec::new();
    for f in event_files(run) {
        let events: Vec<Event> = frames(&f).iter().map(|d| event(d)).collect();
        assert_eq!(
            events[0].file_version.as_deref(),
            Some("brain.Event:2"),
            "{}",
            f.display()
        );
        for e in &events[1..] {
            assert!(e.file_version.is_none() && e.wall_time > 1.6e9);
            out.extend(e.scalars.iter().map(|(t, x)| (e.step, t.clone(), *x)));
        }
    }
    out
}

#[test]
fn event_file_holds_every_scalar_of_metrics_jsonl() {
    let tmp = tempfile::tempdir().unwrap();
    let out = trainer::train(&config(tmp.path(), &[]), &ctx(false), None).unwrap();
    let want = expected(&out.run_dir);
    assert!(want.iter().any(|(_, t, _)| t == "loss"));
    assert!(want.iter().any(|(_, t, _)| t.starts_with("eval_")));
    assert!(want.iter().any(|(_, t, _)| t == "epoch"));
    assert_eq!(event_files(&out.run_dir).len(), 1);
    assert_eq!(scalars(&out.run_dir), want);
}

#[test]
fn off_by_default_no_tb_folder() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(!TrainConfig::default().run.tensorboard);
    let cfg = config(tmp.path(), &["run.tensorboard=false", "train.max_steps=1"]);
    let out = trainer::train(&cfg, &ctx(false), None).unwrap();
    assert!(!out.run_dir.join("tb").exists());
}

/// A kill after the checkpoint at step 1 left an event of step 3 and half a record in the event
/// file; the resume cuts the file back to step 1 and writes steps 2.. to a second file: across
/// the folder every scalar shows once, as in `metrics.jsonl`, which equals the uninterrupted
/// run's.
#[test]
fn resume_cuts_event_files_to_the_checkpoint_and_every_step_shows_once() {
    let tmp = tempfile::tempdir().unwrap();
    let straight = trainer::train(&config(tmp.path(), &[]), &ctx(false), None).unwrap();
    let run = trainer::train(&config(tmp.path(), &[]), &ctx(true), None)
        .unwrap()
        .run_dir;
    let [file] = &event_files(&run)[..] else {
        panic!("one event file")
    };
    let stray = tensorboard::Event {
        wall_time: 1.7e9,
        step: 3,
        summary: Some(tensorboard::Summary {
            value: vec![tensorboard::SummaryValue {
                tag: "loss".into(),
                simple_value: Some(9.0),
            }],
        }),
        ..Default::default()
    };
    let mut bytes = std::fs::read(file).unwrap();
    bytes.extend(tensorboard::frame(&prost::Message::encode_to_vec(&stray)));
    let torn = tensorboard::frame(b"cut short");
    bytes.extend(&torn[..torn.len() - 3]);
    std::fs::write(file, &bytes).unwrap();

    trainer::train(&config(tmp.path(), &[]), &ctx(false), Some(&run)).unwrap();
    assert_eq!(event_files(&run).len(), 2);
    let want = expected(&run);
    assert_eq!(want, expected(&straight.run_dir));
    assert_eq!(scalars(&run), want);
}

/// `run.tensorboard=true` given at resume: the new event file starts with the records logged
/// before the checkpoint.
#[test]
fn turned_on_at_resume_the_event_file_starts_with_the_log_so_far() {
    let tmp = tempfile::tempdir().unwrap();
    let off = ["run.tensorboard=false"];
    let run = trainer::train(&config(tmp.path(), &off), &ctx(true), None)
        .unwrap()
        .run_dir;
    assert!(!run.join("tb").exists());
    trainer::resume(&ctx(false), &run, &["run.tensorboard=true".into()]).unwrap();
    assert_eq!(event_files(&run).len(), 1);
    assert_eq!(scalars(&run), expected(&run));
}
