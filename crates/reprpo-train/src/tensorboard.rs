//! TensorBoard event files (`run.tensorboard = true`): the scalars of `metrics.jsonl` under
//! `<run>/tb/`, readable by `tensorboard --logdir runs`.
//!
//! Why written here rather than through a crate: `tensorboard-rs` (last release 2022, its
//! repository marked "not active") pulls protobuf 2 and `image` 0.23; `tboard` (2023) generates
//! its messages with `prost-build`, which needs `protoc` at build time. The format is small and
//! documented, so the three messages it takes are declared with `prost`'s derive (field numbers
//! of TensorFlow's `event.proto` / `summary.proto`) and framed as TFRecords with the `crc32c`
//! crate.
//!
//! A file is a sequence of TFRecords: `u64` length (little-endian), masked CRC-32C of those 8
//! bytes (`u32` LE), the data, masked CRC-32C of the data. Each record's data is an `Event`; the
//! first holds `file_version = "brain.Event:2"`, then one `Event` per `metrics.jsonl` record with
//! its `step` and one `Summary.Value { tag, simple_value }` per numeric field (the tag is the
//! field name; `step` itself is not a scalar). TensorBoard's scalars are `f32`, so each value is
//! the record's `f64` rounded to `f32`.
//!
//! Files are named `events.out.tfevents.<unix seconds>.<host>` (`.2`, `.3`, ... when taken). On
//! `--resume` from the checkpoint at step N, the run's existing event files are first cut to their
//! events of steps <= N (what a kill after the checkpoint wrote is dropped, as `metrics.jsonl`
//! drops it, and so is a record cut by the kill), then a new file takes the records of the resumed
//! steps: TensorBoard, which merges the files of a folder, shows every step once. When no event
//! file is there yet (the key turned on at resume), the new file first gets the log's records up
//! to N.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message;
use serde_json::Value;

use crate::error::{Result, TrainError, io};
use crate::metrics::Record;
use crate::run::write_atomic;

/// The folder of event files inside a run folder.
pub const TB_DIR: &str = "tb";

/// The `file_version` of the first event of every file.
const FILE_VERSION: &str = "brain.Event:2";

/// TensorFlow's `Event` (`tensorflow/core/util/event.proto`), the fields written here.
#[derive(Clone, PartialEq, Message)]
pub struct Event {
    /// Seconds since the Unix epoch.
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    /// The training step.
    #[prost(int64, tag = "2")]
    pub step: i64,
    /// Set on the first event of a file (`oneof what`).
    #[prost(string, optional, tag = "3")]
    pub file_version: Option<String>,
    /// The scalars of one record (`oneof what`).
    #[prost(message, optional, tag = "5")]
    pub summary: Option<Summary>,
}

/// TensorFlow's `Summary` (`tensorflow/core/framework/summary.proto`).
#[derive(Clone, PartialEq, Message)]
pub struct Summary {
    /// One value per tag.
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

/// `Summary.Value` with a scalar (`oneof value { float simple_value = 2; ... }`).
#[derive(Clone, PartialEq, Message)]
pub struct SummaryValue {
    /// The tag (a `metrics.jsonl` field name).
    #[prost(string, tag = "1")]
    pub tag: String,
    /// The value.
    #[prost(float, optional, tag = "2")]
    pub simple_value: Option<f32>,
}

/// The open event file of a run.
#[derive(Debug)]
pub struct EventWriter {
    path: PathBuf,
    file: std::fs::File,
}

impl EventWriter {
    /// Open a new event file in `dir` after cutting the files already there to their events of
    /// steps <= `upto` (see the module docs). `backfill`: the log's records so far, written
    /// first when `dir` held no event file.
    pub fn open(dir: &Path, upto: usize, backfill: &[Record]) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let existing = event_files(dir)?;
        for f in &existing {
            cut_after(f, upto)?;
        }
        let mut w = Self::create_file(dir)?;
        w.append(&Event {
            wall_time: now(),
            file_version: Some(FILE_VERSION.into()),
            ..Default::default()
        })?;
        if existing.is_empty() {
            for r in backfill {
                w.write(r)?;
            }
        }
        Ok(w)
    }

    /// The file written to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Write the numeric fields of one `metrics.jsonl` record as one event at its `step` (a
    /// record without numeric fields writes nothing).
    pub fn write(&mut self, record: &Record) -> Result<()> {
        let step =
            record
                .get("step")
                .and_then(Value::as_i64)
                .ok_or_else(|| TrainError::Malformed {
                    path: self.path.clone(),
                    problem: "a metrics record without a step".into(),
                })?;
        let value: Vec<SummaryValue> = record
            .iter()
            .filter(|(k, _)| k.as_str() != "step")
            .filter_map(|(k, v)| {
                v.as_f64().map(|x| SummaryValue {
                    tag: k.clone(),
                    simple_value: Some(x as f32),
                })
            })
            .collect();
        if value.is_empty() {
            return Ok(());
        }
        self.append(&Event {
            wall_time: now(),
            step,
            summary: Some(Summary { value }),
            ..Default::default()
        })
    }

    fn append(&mut self, event: &Event) -> Result<()> {
        self.file
            .write_all(&frame(&event.encode_to_vec()))
            .and_then(|()| self.file.flush())
            .map_err(io(&self.path))
    }

    /// A new file `events.out.tfevents.<secs>.<host>[.N]`, never one that exists.
    fn create_file(dir: &Path) -> Result<Self> {
        let base = format!("events.out.tfevents.{}.{}", now() as u64, host());
        let mut n = 1;
        loop {
            let path = match n {
                1 => dir.join(&base),
                _ => dir.join(format!("{base}.{n}")),
            };
            match std::fs::File::create_new(&path) {
                Ok(file) => return Ok(EventWriter { path, file }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => n += 1,
                Err(e) => return Err(io(&path)(e)),
            }
        }
    }
}

/// TFRecord framing of one record's `data`.
pub fn frame(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

/// The masked CRC-32C of TFRecords: `((crc >> 15) | (crc << 17)) + 0xa282ead8`.
pub(crate) fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// The data of each whole, intact record of `bytes`, in order, up to the first record that is
/// cut or fails a CRC (a write cut by a kill).
pub fn records(bytes: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while let Some((data, tail)) = next_record(rest) {
        out.push(data);
        rest = tail;
    }
    out
}

fn next_record(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let u32_at = |i: usize| -> Option<u32> {
        Some(u32::from_le_bytes(bytes.get(i..i + 4)?.try_into().ok()?))
    };
    let len_bytes = bytes.get(..8)?;
    if u32_at(8)? != masked_crc(len_bytes) {
        return None;
    }
    let len = usize::try_from(u64::from_le_bytes(len_bytes.try_into().ok()?)).ok()?;
    let end = 12usize.checked_add(len)?;
    let data = bytes.get(12..end)?;
    if u32_at(end)? != masked_crc(data) {
        return None;
    }
    Some((data, &bytes[end + 4..]))
}

/// The event files of `dir` (names containing `tfevents`, as TensorBoard reads them), sorted.
fn event_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let path = entry.map_err(io(dir))?.path();
        let named = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().contains("tfevents"));
        if named && path.is_file() {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// Rewrite the event file `path` with its intact events of steps <= `upto` (the file-version
/// event kept); untouched when nothing is dropped.
fn cut_after(path: &Path, upto: usize) -> Result<()> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    let all = records(&bytes);
    let kept: Vec<&[u8]> = all
        .iter()
        .copied()
        .filter(|data| {
            Event::decode(*data).is_ok_and(|e| usize::try_from(e.step).is_ok_and(|s| s <= upto))
        })
        .collect();
    let body: Vec<u8> = kept.iter().flat_map(|d| frame(d)).collect();
    if body.len() != bytes.len() {
        write_atomic(path, &body)?;
    }
    Ok(())
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The host name for the file name (Linux's `/proc`; `localhost` elsewhere), with `/` and
/// whitespace replaced.
fn host() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let name: String = name
        .trim()
        .chars()
        .map(|c| {
            if c == '/' || c.is_whitespace() {
                '_'
            } else {
                c
            }
        })
        .collect();
    if name.is_empty() {
        "localhost".into()
    } else {
        name
    }
}
