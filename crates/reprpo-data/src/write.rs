//! Writers for prepared data: pairs and MC items as JSONL or Parquet, written atomically (a
//! temporary file in the target folder, renamed into place only when complete), so a failed run
//! never leaves a half-written file.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use arrow_array::builder::{ListBuilder, UInt32Builder};
use arrow_array::{ArrayRef, Float64Array, RecordBatch, StringArray, UInt64Array};
use serde::Serialize;

use crate::error::{DataError, Result};
use crate::read::Format;
use crate::types::{McItem, PreferencePair};

fn werr(path: &Path, e: impl std::fmt::Display) -> DataError {
    DataError::Write {
        file: path.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    }
}

/// A failed atomic write: the file or folder at fault (the target, its folder) and why.
#[derive(Debug)]
pub struct WriteFailure {
    /// The target file, or its folder when that could not be created.
    pub path: std::path::PathBuf,
    /// The underlying error.
    pub source: std::io::Error,
}

/// The one atomic write of the workspace: `fill` writes into a temporary file beside `path`
/// (the folder is created if missing), which is synced and renamed onto `path` only if `fill`
/// succeeds; on any error the temporary file is removed and `path` is untouched. `io_err` turns
/// an I/O failure (the path at fault, the error) into the caller's error type.
pub fn atomic_write_with<E>(
    path: &Path,
    fill: impl FnOnce(&mut std::fs::File) -> std::result::Result<(), E>,
    io_err: impl Fn(&Path, std::io::Error) -> E,
) -> std::result::Result<(), E> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let mut tmp = temp_builder()
        .tempfile_in(dir)
        .map_err(|e| io_err(path, e))?;
    fill(tmp.as_file_mut())?;
    tmp.as_file_mut().sync_all().map_err(|e| io_err(path, e))?;
    tmp.persist(path).map_err(|e| io_err(path, e.error))?;
    Ok(())
}

/// Write `bytes` to `path` atomically (see [`atomic_write_with`]).
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> std::result::Result<(), WriteFailure> {
    let failure = |p: &Path, source| WriteFailure {
        path: p.to_path_buf(),
        source,
    };
    atomic_write_with(
        path,
        |f| f.write_all(bytes).map_err(|e| failure(path, e)),
        failure,
    )
}

/// [`atomic_write_with`] with this crate's error ([`DataError::Write`]).
pub(crate) fn atomic_write(
    path: &Path,
    fill: impl FnOnce(&mut std::fs::File) -> Result<()>,
) -> Result<()> {
    atomic_write_with(path, fill, |p, source| DataError::Write {
        file: p.to_path_buf(),
        source,
    })
}

/// A temporary-file builder whose files get the mode a plain `File::create` would give: 0666
/// masked by the process's umask (tempfile's default, 0600, would make the renamed output
/// private where every other output follows the umask).
fn temp_builder() -> tempfile::Builder<'static, 'static> {
    let mut b = tempfile::Builder::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        b.permissions(std::fs::Permissions::from_mode(0o666));
    }
    b
}

fn write_jsonl<T: Serialize>(path: &Path, rows: &[T]) -> Result<()> {
    atomic_write(path, |f| {
        let mut w = std::io::BufWriter::new(f);
        for r in rows {
            serde_json::to_writer(&mut w, r).map_err(|e| werr(path, e))?;
            w.write_all(b"\n").map_err(|e| werr(path, e))?;
        }
        w.flush().map_err(|e| werr(path, e))
    })
}

fn write_batch(path: &Path, batch: RecordBatch) -> Result<()> {
    atomic_write(path, |f| {
        let mut w = parquet::arrow::ArrowWriter::try_new(f, batch.schema(), None)
            .map_err(|e| werr(path, e))?;
        w.write(&batch).map_err(|e| werr(path, e))?;
        w.close().map_err(|e| werr(path, e))?;
        Ok(())
    })
}

fn strings<'a>(it: impl Iterator<Item = &'a str>) -> ArrayRef {
    Arc::new(StringArray::from_iter_values(it))
}

/// Write preference pairs to `.jsonl` (one [`PreferencePair`] per line) or `.parquet` (flat
/// columns id, prompt, chosen, rejected, dataset, row, chosen_score, rejected_score).
pub fn write_pairs(path: &Path, pairs: &[PreferencePair]) -> Result<()> {
    match Format::from_path(path)? {
        (Format::Jsonl, false) => write_jsonl(path, pairs),
        (Format::Parquet, false) => {
            let cols: Vec<(&str, ArrayRef)> = vec![
                ("id", strings(pairs.iter().map(|p| p.id.as_str()))),
                ("prompt", strings(pairs.iter().map(|p| p.prompt.as_str()))),
                ("chosen", strings(pairs.iter().map(|p| p.chosen.as_str()))),
                (
                    "rejected",
                    strings(pairs.iter().map(|p| p.rejected.as_str())),
                ),
                (
                    "dataset",
                    strings(pairs.iter().map(|p| p.source.dataset.as_str())),
                ),
                (
                    "row",
                    Arc::new(UInt64Array::from_iter_values(
                        pairs.iter().map(|p| p.source.row as u64),
                    )),
                ),
                (
                    "chosen_score",
                    Arc::new(Float64Array::from_iter(
                        pairs.iter().map(|p| p.source.chosen_score),
                    )),
                ),
                (
                    "rejected_score",
                    Arc::new(Float64Array::from_iter(
                        pairs.iter().map(|p| p.source.rejected_score),
                    )),
                ),
            ];
            write_batch(
                path,
                RecordBatch::try_from_iter(cols).map_err(|e| werr(path, e))?,
            )
        }
        _ => Err(DataError::UnknownFormat {
            file: path.to_path_buf(),
        }),
    }
}

/// Write MC items to `.jsonl` or `.parquet` (columns id, prompt, choices: `list<utf8>`,
/// correct: `list<uint32>`, dataset, row).
pub fn write_mc(path: &Path, items: &[McItem]) -> Result<()> {
    match Format::from_path(path)? {
        (Format::Jsonl, false) => write_jsonl(path, items),
        (Format::Parquet, false) => {
            let mut choices = ListBuilder::new(arrow_array::builder::StringBuilder::new());
            let mut correct = ListBuilder::new(UInt32Builder::new());
            for it in items {
                for c in &it.choices {
                    choices.values().append_value(c);
                }
                choices.append(true);
                for &c in &it.correct {
                    correct.values().append_value(c as u32);
                }
                correct.append(true);
            }
            let cols: Vec<(&str, ArrayRef)> = vec![
                ("id", strings(items.iter().map(|p| p.id.as_str()))),
                ("prompt", strings(items.iter().map(|p| p.prompt.as_str()))),
                ("choices", Arc::new(choices.finish())),
                ("correct", Arc::new(correct.finish())),
                (
                    "dataset",
                    strings(items.iter().map(|p| p.source.dataset.as_str())),
                ),
                (
                    "row",
                    Arc::new(UInt64Array::from_iter_values(
                        items.iter().map(|p| p.source.row as u64),
                    )),
                ),
            ];
            write_batch(
                path,
                RecordBatch::try_from_iter(cols).map_err(|e| werr(path, e))?,
            )
        }
        _ => Err(DataError::UnknownFormat {
            file: path.to_path_buf(),
        }),
    }
}
