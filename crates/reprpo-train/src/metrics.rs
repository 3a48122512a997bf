//! `metrics.jsonl`, the run's log: one JSON object per logged step (and per evaluation), each
//! with its `"step"`.
//!
//! Every checkpoint holds a copy of the log's records up to its step (`metrics.jsonl` inside the
//! checkpoint, covered by its manifest). On `--resume`, [`MetricsLog::resume`] compares the run's
//! log with that copy: the records up to the checkpoint's step must be the same, in the same
//! order. A log that was deleted, cut or edited is kept aside as `metrics.jsonl.damaged` and
//! rebuilt from the checkpoint's copy, and the resume says so; records of steps after the
//! checkpoint are dropped (the resumed run logs them again).
//!
//! With `run.tensorboard`, [`MetricsLog::tensorboard`] also writes every record to a TensorBoard
//! event file ([`crate::tensorboard`]).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Result, TrainError, io};
use crate::run::write_atomic;
use crate::tensorboard::EventWriter;

/// The log's file name, in the run folder and in each checkpoint.
pub const METRICS: &str = "metrics.jsonl";

/// One record of the log.
pub type Record = BTreeMap<String, Value>;

/// The open log of a run: appends are flushed line by line; the lines written so far are kept to
/// be copied into checkpoints.
#[derive(Debug)]
pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
    /// `(step, line)` of every record in the file.
    lines: Vec<(usize, String)>,
    /// The TensorBoard event file that each record also goes to, if any.
    tb: Option<EventWriter>,
}

/// How [`MetricsLog::resume`] found the run's log.
#[derive(Debug, Clone, PartialEq)]
pub enum LogCheck {
    /// Its records up to the checkpoint are the checkpoint's.
    Intact,
    /// The checkpoint predates stored logs: nothing to compare with; kept as it was.
    Unverified,
    /// Damaged (`why`), moved to `kept_as` (when there was a file) and rebuilt with the
    /// checkpoint's `records` records.
    Rebuilt {
        /// What was wrong.
        why: String,
        /// Where the damaged file now is.
        kept_as: Option<PathBuf>,
        /// Records restored from the checkpoint.
        records: usize,
    },
}

impl MetricsLog {
    /// Start the log of a new run (an existing file is replaced).
    pub fn create(path: &Path) -> Result<Self> {
        write_atomic(path, b"")?;
        Self::append_to(path, Vec::new())
    }

    /// Reopen the log of a run resumed from the checkpoint folder `ck` at `step`: verify it
    /// against the checkpoint's copy, rebuild it from that copy when damaged, and drop the
    /// records after `step`.
    pub fn resume(path: &Path, ck: &Path, step: usize) -> Result<(Self, LogCheck)> {
        let stored_path = ck.join(METRICS);
        let stored = if stored_path.is_file() {
            let bytes = std::fs::read(&stored_path).map_err(io(&stored_path))?;
            Some(parse_strict(&bytes, &stored_path)?)
        } else {
            None
        };
        let found = read_run_log(path, step);
        let (lines, check) = match (stored, found) {
            (None, Ok(lines)) => (lines, LogCheck::Unverified),
            (None, Err(why)) => {
                return Err(TrainError::Malformed {
                    path: path.to_path_buf(),
                    problem: format!(
                        "{why}, and checkpoint {} predates stored logs: nothing to rebuild it \
                         from",
                        ck.display()
                    ),
                });
            }
            (Some(stored), Ok(lines)) if same_records(&lines, &stored) => (lines, LogCheck::Intact),
            (Some(stored), found) => {
                let why = match found {
                    Err(why) => why,
                    Ok(lines) => differences(&lines, &stored),
                };
                let kept_as = set_aside(path)?;
                let records = stored.len();
                let check = LogCheck::Rebuilt {
                    why,
                    kept_as,
                    records,
                };
                (stored, check)
            }
        };
        write_atomic(path, body(&lines).as_bytes())?;
        Ok((Self::append_to(path, lines)?, check))
    }

    fn append_to(path: &Path, lines: Vec<(usize, String)>) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io(path))?;
        Ok(MetricsLog {
            path: path.to_path_buf(),
            file,
            lines,
            tb: None,
        })
    }

    /// From now on, also write each record to a new TensorBoard event file in `dir` (the run's
    /// `tb/`), after cutting the files already there to the steps up to `upto` (the checkpoint
    /// resumed from; 0 for a new run). A folder with no event file first gets the records logged
    /// so far. Returns the new file's path.
    pub fn tensorboard(&mut self, dir: &Path, upto: usize) -> Result<&Path> {
        let so_far: Vec<Record> = self
            .lines
            .iter()
            .filter_map(|(_, l)| serde_json::from_str(l).ok())
            .collect();
        let tb = self.tb.insert(EventWriter::open(dir, upto, &so_far)?);
        Ok(tb.path())
    }

    /// Append one record (it must have its `"step"`).
    pub fn write(&mut self, record: &Record) -> Result<()> {
        let malformed = |problem: String| TrainError::Malformed {
            path: self.path.clone(),
            problem,
        };
        let step = record
            .get("step")
            .and_then(Value::as_u64)
            .ok_or_else(|| malformed("a metrics record without a step".into()))?;
        let line = serde_json::to_string(record).map_err(|e| malformed(e.to_string()))?;
        writeln!(self.file, "{line}").map_err(io(&self.path))?;
        self.file.flush().map_err(io(&self.path))?;
        self.lines.push((step as usize, line));
        match &mut self.tb {
            Some(tb) => tb.write(record),
            None => Ok(()),
        }
    }

    /// The log's text up to `step` (what a checkpoint at `step` stores).
    pub fn upto(&self, step: usize) -> String {
        let kept: Vec<(usize, String)> = self
            .lines
            .iter()
            .filter(|(s, _)| *s <= step)
            .cloned()
            .collect();
        body(&kept)
    }
}

impl std::fmt::Display for LogCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LogCheck::Intact => write!(f, "metrics.jsonl matches the checkpoint"),
            LogCheck::Unverified => write!(
                f,
                "metrics.jsonl not verified: the checkpoint predates stored logs"
            ),
            LogCheck::Rebuilt {
                why,
                kept_as,
                records,
            } => {
                write!(f, "metrics.jsonl was damaged ({why}); ")?;
                if let Some(p) = kept_as {
                    write!(f, "kept it as {}; ", p.display())?;
                }
                write!(f, "rebuilt its {records} records from the checkpoint")
            }
        }
    }
}

/// The lines of `lines` joined, each ending in a newline.
fn body(lines: &[(usize, String)]) -> String {
    lines.iter().map(|(_, l)| format!("{l}\n")).collect()
}

/// Parse one line: its record and step.
fn parse_line(line: &[u8]) -> std::result::Result<(usize, Record), String> {
    let text = std::str::from_utf8(line)
        .map_err(|e| format!("not valid UTF-8 (byte {} of the line)", e.valid_up_to() + 1))?;
    let rec: Record = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let step = rec
        .get("step")
        .and_then(Value::as_u64)
        .ok_or("no \"step\"")?;
    Ok((step as usize, rec))
}

/// Every record of a log that must be whole (a checkpoint's copy).
fn parse_strict(bytes: &[u8], path: &Path) -> Result<Vec<(usize, String)>> {
    let mut out = Vec::new();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let (step, _) = parse_line(line).map_err(|problem| TrainError::Malformed {
            path: path.to_path_buf(),
            problem: format!("line {}: {problem}", i + 1),
        })?;
        out.push((step, String::from_utf8_lossy(line).into_owned()));
    }
    Ok(out)
}

/// The run log's lines up to `step`, or why it cannot be read. A last line without its newline
/// that does not parse is a write cut by a kill, not damage: it is dropped.
fn read_run_log(path: &Path, step: usize) -> std::result::Result<Vec<(usize, String)>, String> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err("missing".into()),
        Err(e) => return Err(format!("unreadable: {e}")),
    };
    let segments: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
    let mut out = Vec::new();
    for (i, line) in segments.iter().enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match parse_line(line) {
            Ok((s, _)) if s <= step => {
                out.push((s, String::from_utf8_lossy(line).into_owned()));
            }
            Ok(_) => {}
            Err(_) if i + 1 == segments.len() => {}
            Err(problem) => return Err(format!("line {}: {problem}", i + 1)),
        }
    }
    Ok(out)
}

fn records(lines: &[(usize, String)]) -> Vec<Option<Value>> {
    lines
        .iter()
        .map(|(_, l)| serde_json::from_str(l).ok())
        .collect()
}

fn same_records(a: &[(usize, String)], b: &[(usize, String)]) -> bool {
    records(a) == records(b)
}

/// Why the run's records `found` differ from the checkpoint's `stored`.
fn differences(found: &[(usize, String)], stored: &[(usize, String)]) -> String {
    let (fr, sr) = (records(found), records(stored));
    match fr.iter().zip(&sr).position(|(a, b)| a != b) {
        Some(i) => format!(
            "record {} (step {}) differs from the checkpoint's",
            i + 1,
            found[i].0
        ),
        None => format!(
            "{} records up to the checkpoint's step where the checkpoint holds {}",
            found.len(),
            stored.len()
        ),
    }
}

/// Move a damaged log to `metrics.jsonl.damaged` (`.damaged-2`, ... if taken); `None` when
/// there is no file.
fn set_aside(path: &Path) -> Result<Option<PathBuf>> {
    if !path.exists() {
        return Ok(None);
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| METRICS.into());
    let mut dst = path.with_file_name(format!("{name}.damaged"));
    let mut n = 2;
    while dst.exists() {
        dst = path.with_file_name(format!("{name}.damaged-{n}"));
        n += 1;
    }
    std::fs::rename(path, &dst).map_err(io(&dst))?;
    Ok(Some(dst))
}

/// Read every record of a `metrics.jsonl`; an unreadable line is an error naming it.
pub fn read_metrics(path: &Path) -> Result<Vec<Record>> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    let mut out = Vec::new();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let text = std::str::from_utf8(line).map_err(|e| TrainError::Malformed {
            path: path.to_path_buf(),
            problem: format!(
                "line {}: not valid UTF-8 (byte {} of the line)",
                i + 1,
                e.valid_up_to() + 1
            ),
        })?;
        if !text.trim().is_empty() {
            out.push(
                serde_json::from_str(text).map_err(|e| TrainError::Malformed {
                    path: path.to_path_buf(),
                    problem: format!("line {}: {e}", i + 1),
                })?,
            );
        }
    }
    Ok(out)
}
