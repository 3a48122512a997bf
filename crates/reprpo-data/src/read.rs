//! Readers: JSONL, JSON arrays, CSV and Parquet (each optionally gzip-compressed) into one row
//! representation, [`Table`] of [`Record`]s, with typed field accessors whose errors name the
//! file, the row and the field.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{DataError, Result};

/// Container formats this crate reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Format {
    /// One JSON object per line.
    Jsonl,
    /// One JSON array of objects (or an object whose values are row objects, keyed by id).
    Json,
    /// Comma-separated values with a header row.
    Csv,
    /// Apache Parquet.
    Parquet,
}

impl Format {
    /// The format and whether the file is gzip-compressed, from the file name.
    pub fn from_path(path: &Path) -> Result<(Format, bool)> {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_ascii_lowercase();
        let (stem, gz) = match name.strip_suffix(".gz") {
            Some(s) => (s.to_string(), true),
            None => (name, false),
        };
        let format = if stem.ends_with(".jsonl") || stem.ends_with(".ndjson") {
            Format::Jsonl
        } else if stem.ends_with(".json") {
            Format::Json
        } else if stem.ends_with(".csv") {
            Format::Csv
        } else if stem.ends_with(".parquet") {
            Format::Parquet
        } else {
            return Err(DataError::UnknownFormat {
                file: path.to_path_buf(),
            });
        };
        Ok((format, gz))
    }

    fn name(self) -> &'static str {
        match self {
            Format::Jsonl => "JSONL",
            Format::Json => "JSON",
            Format::Csv => "CSV",
            Format::Parquet => "Parquet",
        }
    }
}

/// One row of a source file: its 1-based number and its fields as JSON values.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// 1-based record number in the file.
    pub row: usize,
    /// The fields, in source order.
    pub fields: Map<String, Value>,
}

/// All rows of one file, with the file's path for error messages.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    /// The file the rows came from (or a `hub:` pseudo-path).
    pub file: PathBuf,
    /// The rows in file order.
    pub records: Vec<Record>,
}

/// A field accessor bound to one record of one file, so that every error carries the location.
#[derive(Debug, Clone, Copy)]
pub struct RowRef<'a> {
    /// The file.
    pub file: &'a Path,
    /// The record.
    pub record: &'a Record,
}

impl<'a> RowRef<'a> {
    /// The 1-based row number.
    pub fn row(&self) -> usize {
        self.record.row
    }

    /// An error at this row for `field`.
    pub fn err(&self, field: &str, problem: impl Into<String>) -> DataError {
        DataError::field(self.file, self.record.row, field, problem)
    }

    /// The raw value of `field`, or an error naming it when it is missing.
    pub fn value(&self, field: &str) -> Result<&'a Value> {
        self.record
            .fields
            .get(field)
            .ok_or_else(|| self.err(field, "missing"))
    }

    /// A string field that may be empty.
    pub fn str(&self, field: &str) -> Result<&'a str> {
        match self.value(field)? {
            Value::String(s) => Ok(s),
            other => Err(self.err(field, format!("expected a string, found {}", kind(other)))),
        }
    }

    /// A string field that must contain more than white space.
    pub fn text(&self, field: &str) -> Result<&'a str> {
        let s = self.str(field)?;
        if s.trim().is_empty() {
            return Err(self.err(field, "empty"));
        }
        Ok(s)
    }

    /// A number field (integers are accepted and widened; numeric strings are accepted too,
    /// since CSV has no types).
    pub fn f64(&self, field: &str) -> Result<f64> {
        match self.value(field)? {
            Value::Number(n) => n
                .as_f64()
                .ok_or_else(|| self.err(field, "number out of range")),
            Value::String(s) => s
                .trim()
                .parse::<f64>()
                .map_err(|_| self.err(field, format!("expected a number, found {s:?}"))),
            other => Err(self.err(field, format!("expected a number, found {}", kind(other)))),
        }
    }

    /// An object field.
    pub fn object(&self, field: &str) -> Result<&'a Map<String, Value>> {
        match self.value(field)? {
            Value::Object(m) => Ok(m),
            other => Err(self.err(field, format!("expected an object, found {}", kind(other)))),
        }
    }

    /// An array field.
    pub fn array(&self, field: &str) -> Result<&'a Vec<Value>> {
        match self.value(field)? {
            Value::Array(a) => Ok(a),
            other => Err(self.err(field, format!("expected an array, found {}", kind(other)))),
        }
    }

    /// An array of strings.
    pub fn str_list(&self, field: &str) -> Result<Vec<&'a str>> {
        self.array(field)?
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str().ok_or_else(|| {
                    self.err(
                        &format!("{field}[{i}]"),
                        format!("expected a string, found {}", kind(v)),
                    )
                })
            })
            .collect()
    }
}

/// A short name for the JSON type of `v`, for error messages.
pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl Table {
    /// Iterate over the rows with location-aware accessors.
    pub fn rows(&self) -> impl Iterator<Item = RowRef<'_>> {
        self.records.iter().map(move |record| RowRef {
            file: &self.file,
            record,
        })
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether the table has no rows.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

/// Read a whole file into a [`Table`], the format chosen by its extension.
///
/// # Errors
/// [`DataError::NoRows`] for a file without a single record (empty, blank lines only, a CSV
/// header alone, `[]`), besides the read and parse errors of each format.
pub fn read_table(path: &Path) -> Result<Table> {
    let table = read_any(path)?;
    if table.is_empty() {
        return Err(DataError::NoRows {
            file: path.to_path_buf(),
        });
    }
    Ok(table)
}

fn read_any(path: &Path) -> Result<Table> {
    let (format, gz) = Format::from_path(path)?;
    let io = |source| DataError::Io {
        file: path.to_path_buf(),
        source,
    };
    if format == Format::Parquet {
        if gz {
            return Err(DataError::Malformed {
                file: path.to_path_buf(),
                row: 0,
                format: "Parquet",
                message: "gzip-wrapped Parquet is not supported (Parquet compresses its own pages)"
                    .into(),
            });
        }
        return read_parquet(path);
    }
    let file = File::open(path).map_err(io)?;
    let mut bytes = Vec::new();
    if gz {
        flate2::read::MultiGzDecoder::new(BufReader::new(file))
            .read_to_end(&mut bytes)
            .map_err(|e| DataError::Malformed {
                file: path.to_path_buf(),
                row: 0,
                format: "gzip",
                message: e.to_string(),
            })?;
    } else {
        BufReader::new(file).read_to_end(&mut bytes).map_err(io)?;
    }
    let records = match format {
        Format::Jsonl => parse_jsonl(path, &bytes)?,
        Format::Json => parse_json(path, &bytes)?,
        Format::Csv => parse_csv(path, &bytes)?,
        // Handled above, before the bytes were read.
        Format::Parquet => return read_parquet(path),
    };
    Ok(Table {
        file: path.to_path_buf(),
        records,
    })
}

/// For a record that is not valid UTF-8: the first top-level field whose decoded text holds a
/// replacement character, so the error can name it.
fn utf8_error(path: &Path, row: usize, bytes: &[u8], format: Format) -> DataError {
    let lossy = String::from_utf8_lossy(bytes);
    if let Ok(Value::Object(m)) = serde_json::from_str::<Value>(&lossy) {
        for (k, v) in &m {
            if v.to_string().contains('\u{FFFD}') {
                return DataError::field(path, row, k.clone(), "not valid UTF-8");
            }
        }
    }
    DataError::Malformed {
        file: path.to_path_buf(),
        row,
        format: format.name(),
        message: "not valid UTF-8".into(),
    }
}

fn object_record(path: &Path, row: usize, v: Value, format: Format) -> Result<Record> {
    match v {
        Value::Object(fields) => Ok(Record { row, fields }),
        other => Err(DataError::Malformed {
            file: path.to_path_buf(),
            row,
            format: format.name(),
            message: format!("expected an object, found {}", kind(&other)),
        }),
    }
}

fn parse_jsonl(path: &Path, bytes: &[u8]) -> Result<Vec<Record>> {
    let mut out = Vec::new();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let row = i + 1;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if std::str::from_utf8(line).is_err() {
            return Err(utf8_error(path, row, line, Format::Jsonl));
        }
        let v: Value = serde_json::from_slice(line).map_err(|e| DataError::Malformed {
            file: path.to_path_buf(),
            row,
            format: "JSONL",
            message: e.to_string(),
        })?;
        out.push(object_record(path, row, v, Format::Jsonl)?);
    }
    Ok(out)
}

fn parse_json(path: &Path, bytes: &[u8]) -> Result<Vec<Record>> {
    if std::str::from_utf8(bytes).is_err() {
        // Locate the element: parse lossily and report the first element holding U+FFFD.
        let lossy = String::from_utf8_lossy(bytes);
        if let Ok(Value::Array(items)) = serde_json::from_str::<Value>(&lossy) {
            for (i, item) in items.iter().enumerate() {
                if let Value::Object(m) = item {
                    for (k, v) in m {
                        if v.to_string().contains('\u{FFFD}') {
                            return Err(DataError::field(
                                path,
                                i + 1,
                                k.clone(),
                                "not valid UTF-8",
                            ));
                        }
                    }
                }
            }
        }
        return Err(DataError::Malformed {
            file: path.to_path_buf(),
            row: 0,
            format: "JSON",
            message: "not valid UTF-8".into(),
        });
    }
    let v: Value = serde_json::from_slice(bytes).map_err(|e| DataError::Malformed {
        file: path.to_path_buf(),
        row: 0,
        format: "JSON",
        message: format!("line {} column {}: {e}", e.line(), e.column()),
    })?;
    match v {
        Value::Array(items) => items
            .into_iter()
            .enumerate()
            .map(|(i, v)| object_record(path, i + 1, v, Format::Json))
            .collect(),
        Value::Object(m) => {
            // A mapping id -> row object: keep the key as `_key`.
            m.into_iter()
                .enumerate()
                .map(|(i, (k, v))| {
                    let mut rec = object_record(path, i + 1, v, Format::Json)?;
                    rec.fields.insert("_key".into(), Value::String(k));
                    Ok(rec)
                })
                .collect()
        }
        other => Err(DataError::Malformed {
            file: path.to_path_buf(),
            row: 0,
            format: "JSON",
            message: format!("expected an array of objects, found {}", kind(&other)),
        }),
    }
}

fn parse_csv(path: &Path, bytes: &[u8]) -> Result<Vec<Record>> {
    let bytes = bytes.strip_prefix("\u{feff}".as_bytes()).unwrap_or(bytes);
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(false)
        .from_reader(bytes);
    let malformed = |row: usize, message: String| DataError::Malformed {
        file: path.to_path_buf(),
        row,
        format: "CSV",
        message,
    };
    let headers: Vec<String> = reader
        .byte_headers()
        .map_err(|e| malformed(0, e.to_string()))?
        .iter()
        .enumerate()
        .map(|(i, h)| {
            std::str::from_utf8(h)
                .map(|s| s.trim().to_string())
                .map_err(|_| malformed(0, format!("header column {} is not valid UTF-8", i + 1)))
        })
        .collect::<Result<_>>()?;
    let mut out = Vec::new();
    for (i, rec) in reader.byte_records().enumerate() {
        let row = i + 1;
        let rec = rec.map_err(|e| malformed(row, e.to_string()))?;
        let mut fields = Map::new();
        for (h, cell) in headers.iter().zip(rec.iter()) {
            let s = std::str::from_utf8(cell)
                .map_err(|_| DataError::field(path, row, h.clone(), "not valid UTF-8"))?;
            fields.insert(h.clone(), Value::String(s.to_string()));
        }
        out.push(Record { row, fields });
    }
    Ok(out)
}

fn read_parquet(path: &Path) -> Result<Table> {
    // The `parquet` crate panics on some malformed files instead of returning an error (found by
    // fuzzing: a dictionary page that declares no values divides by zero in parquet 60.1,
    // `arrow/array_reader/byte_array.rs`). A panic inside the decoder means a malformed file,
    // so it is reported as one, at the first row not yet read.
    let mut records = Vec::new();
    let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        read_parquet_into(path, &mut records)
    }));
    match read {
        Ok(r) => r?,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".into());
            return Err(DataError::Malformed {
                file: path.to_path_buf(),
                row: records.len() + 1,
                format: "Parquet",
                message: format!("the Parquet decoder failed on this file ({what})"),
            });
        }
    }
    Ok(Table {
        file: path.to_path_buf(),
        records,
    })
}

/// Read every row of Parquet file `path` into `records`.
fn read_parquet_into(path: &Path, records: &mut Vec<Record>) -> Result<()> {
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let file = File::open(path).map_err(|source| DataError::Io {
        file: path.to_path_buf(),
        source,
    })?;
    let malformed = |row: usize, message: String| DataError::Malformed {
        file: path.to_path_buf(),
        row,
        format: "Parquet",
        message,
    };
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| malformed(0, e.to_string()))?
        .build()
        .map_err(|e| malformed(0, e.to_string()))?;
    for batch in reader {
        let batch = batch.map_err(|e| malformed(records.len() + 1, e.to_string()))?;
        let schema = batch.schema();
        let base = records.len();
        for i in 0..batch.num_rows() {
            let mut fields = Map::new();
            for (c, col) in batch.columns().iter().enumerate() {
                let name = schema.field(c).name();
                let v = arrow_value(col.as_ref(), i).map_err(|problem| {
                    DataError::field(path, base + i + 1, name.clone(), problem)
                })?;
                fields.insert(name.clone(), v);
            }
            records.push(Record {
                row: base + i + 1,
                fields,
            });
        }
    }
    Ok(())
}

/// One cell of an Arrow array as JSON.
fn arrow_value(array: &dyn arrow_array::Array, i: usize) -> std::result::Result<Value, String> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::*;
    use arrow_schema::DataType as D;
    if array.is_null(i) {
        return Ok(Value::Null);
    }
    let num = |x: f64| {
        serde_json::Number::from_f64(x)
            .map(Value::Number)
            .ok_or_else(|| format!("non-finite number {x}"))
    };
    Ok(match array.data_type() {
        D::Null => Value::Null,
        D::Boolean => Value::Bool(array.as_boolean().value(i)),
        D::Int8 => Value::from(array.as_primitive::<Int8Type>().value(i)),
        D::Int16 => Value::from(array.as_primitive::<Int16Type>().value(i)),
        D::Int32 => Value::from(array.as_primitive::<Int32Type>().value(i)),
        D::Int64 => Value::from(array.as_primitive::<Int64Type>().value(i)),
        D::UInt8 => Value::from(array.as_primitive::<UInt8Type>().value(i)),
        D::UInt16 => Value::from(array.as_primitive::<UInt16Type>().value(i)),
        D::UInt32 => Value::from(array.as_primitive::<UInt32Type>().value(i)),
        D::UInt64 => Value::from(array.as_primitive::<UInt64Type>().value(i)),
        D::Float32 => num(f64::from(array.as_primitive::<Float32Type>().value(i)))?,
        D::Float64 => num(array.as_primitive::<Float64Type>().value(i))?,
        D::Utf8 => Value::String(array.as_string::<i32>().value(i).to_string()),
        D::LargeUtf8 => Value::String(array.as_string::<i64>().value(i).to_string()),
        D::Utf8View => Value::String(array.as_string_view().value(i).to_string()),
        D::Binary => utf8_cell(array.as_binary::<i32>().value(i))?,
        D::LargeBinary => utf8_cell(array.as_binary::<i64>().value(i))?,
        D::List(_) => list_value(array.as_list::<i32>().value(i).as_ref())?,
        D::LargeList(_) => list_value(array.as_list::<i64>().value(i).as_ref())?,
        D::Struct(fields) => {
            let s = array.as_struct();
            let mut m = Map::new();
            for (f, col) in fields.iter().zip(s.columns()) {
                let v = arrow_value(col.as_ref(), i).map_err(|e| format!("{}: {e}", f.name()))?;
                m.insert(f.name().clone(), v);
            }
            Value::Object(m)
        }
        other => return Err(format!("unsupported Parquet column type {other}")),
    })
}

fn utf8_cell(bytes: &[u8]) -> std::result::Result<Value, String> {
    std::str::from_utf8(bytes)
        .map(|s| Value::String(s.to_string()))
        .map_err(|_| "not valid UTF-8".to_string())
}

fn list_value(values: &dyn arrow_array::Array) -> std::result::Result<Value, String> {
    (0..values.len())
        .map(|j| arrow_value(values, j))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map(Value::Array)
}

/// Read one or more files (concatenated in order; each keeps its own path for errors).
pub fn read_tables(paths: &[PathBuf]) -> Result<Vec<Table>> {
    paths.iter().map(|p| read_table(p)).collect()
}

/// Count rows per value of a string field (used by converters that group responses by prompt).
pub(crate) fn group_rows<'a>(
    table: &'a Table,
    field: &str,
) -> Result<BTreeMap<usize, Vec<RowRef<'a>>>> {
    // Keyed by the first row of each group, so iteration keeps file order.
    let mut first: std::collections::HashMap<&'a str, usize> = std::collections::HashMap::new();
    let mut groups: BTreeMap<usize, Vec<RowRef<'a>>> = BTreeMap::new();
    for r in table.rows() {
        let key = r.str(field)?;
        let start = *first.entry(key).or_insert(r.row());
        groups.entry(start).or_default().push(r);
    }
    Ok(groups)
}
