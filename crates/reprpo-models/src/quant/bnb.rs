//! The tensor layout of bitsandbytes-quantised weights as transformers saves them
//! (`Linear4bit._save_to_state_dict` = `QuantState.as_dict(packed=True)`, and
//! `Linear8bitLt._save_to_state_dict`), read into and written out of `QuantTensor` unchanged.
//!
//! 4-bit, for a module prefix `p` (e.g. `model.layers.0.self_attn.q_proj.`):
//!
//! | tensor | dtype, shape | content |
//! |---|---|---|
//! | `p weight` | U8 `[ceil(n/2), 1]` | two codes per byte, first element in the high nibble |
//! | `p weight.absmax` | F32 `[blocks]`, or U8 `[blocks]` with double quant | per-block absmax |
//! | `p weight.quant_map` | F32 `[16]` | the code book (bitsandbytes dequantises with its built-in one) |
//! | `p weight.nested_absmax` | F32 `[ceil(blocks/256)]` | double quant only |
//! | `p weight.nested_quant_map` | F32 `[256]` | double quant only: the 8-bit dynamic map |
//! | `p weight.quant_state.bitsandbytes__nf4` (or `__fp4`) | U8 `[len]` | UTF-8 JSON, `json.dumps` style |
//!
//! The JSON holds `quant_type`, `blocksize`, `dtype` (the weight's dtype before quantisation,
//! `"float32"`, `"bfloat16"`, `"float16"`), `shape` (`[out, in]`) and, with double quant,
//! `nested_blocksize`, `nested_dtype` and `nested_offset` (Python's `repr` of the f32 offset read
//! as a double). The raw bytes are kept, so `to_bnb` writes back what `from_bnb` read.
//!
//! int8: `p weight` I8 `[out, in]` (passed through candle as U8 with the same bytes, candle having
//! no i8), `p SCB` F32 `[out]`, and `p weight_format` U8 scalar 0 ("row").

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::Dtype;
use serde_json::Value;

use super::fourbit::{Absmax, FourBit, Nested};
use super::int8::Int8Rows;
use super::{QuantType, VALID_BLOCK_SIZES};
use crate::error::{ModelError, Result};

fn err(name: &str, problem: impl Into<String>) -> ModelError {
    ModelError::Quant {
        name: name.to_string(),
        problem: problem.into(),
    }
}

/// Reads every tensor of a safetensors file onto the CPU, including the I8 tensors of
/// bitsandbytes' int8 weights (as U8 with the same bytes) that candle's own loader rejects.
pub fn read_safetensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
        file: path.to_path_buf(),
        source,
    })?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| ModelError::Format {
        file: path.to_path_buf(),
        problem: e.to_string(),
    })?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let t = tensor_from_bytes(view.dtype(), view.shape(), view.data()).map_err(|problem| {
            ModelError::Weight {
                file: path.to_path_buf(),
                name: name.clone(),
                problem,
            }
        })?;
        out.insert(name, t);
    }
    Ok(out)
}

fn tensor_from_bytes(
    dtype: Dtype,
    shape: &[usize],
    data: &[u8],
) -> std::result::Result<Tensor, String> {
    let dev = &Device::Cpu;
    let shape = shape.to_vec();
    let c2 = |d: &[u8]| d.chunks_exact(2).map(|c| [c[0], c[1]]).collect::<Vec<_>>();
    let c4 = |d: &[u8]| {
        d.chunks_exact(4)
            .map(|c| [c[0], c[1], c[2], c[3]])
            .collect::<Vec<_>>()
    };
    let c8 = |d: &[u8]| {
        d.chunks_exact(8)
            .map(|c| [c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])
            .collect::<Vec<_>>()
    };
    let t = match dtype {
        Dtype::U8 | Dtype::I8 => Tensor::from_vec(data.to_vec(), shape, dev),
        Dtype::F32 => Tensor::from_vec(
            c4(data)
                .into_iter()
                .map(f32::from_le_bytes)
                .collect::<Vec<_>>(),
            shape,
            dev,
        ),
        Dtype::BF16 => Tensor::from_vec(
            c2(data)
                .into_iter()
                .map(|b| half::bf16::from_bits(u16::from_le_bytes(b)))
                .collect::<Vec<_>>(),
            shape,
            dev,
        ),
        Dtype::F16 => Tensor::from_vec(
            c2(data)
                .into_iter()
                .map(|b| half::f16::from_bits(u16::from_le_bytes(b)))
                .collect::<Vec<_>>(),
            shape,
            dev,
        ),
        Dtype::F64 => Tensor::from_vec(
            c8(data)
                .into_iter()
                .map(f64::from_le_bytes)
                .collect::<Vec<_>>(),
            shape,
            dev,
        ),
        Dtype::I64 => Tensor::from_vec(
            c8(data)
                .into_iter()
                .map(i64::from_le_bytes)
                .collect::<Vec<_>>(),
            shape,
            dev,
        ),
        Dtype::I32 => Tensor::from_vec(
            c4(data)
                .into_iter()
                .map(i32::from_le_bytes)
                .collect::<Vec<_>>(),
            shape,
            dev,
        ),
        Dtype::U32 => Tensor::from_vec(
            c4(data)
                .into_iter()
                .map(u32::from_le_bytes)
                .collect::<Vec<_>>(),
            shape,
            dev,
        ),
        other => return Err(format!("safetensors dtype {other:?} is not supported here")),
    };
    t.map_err(|e| e.to_string())
}

/// Python's `repr` of a double (what `json.dumps` writes for a float): the shortest digits that
/// round-trip, positional for decimal exponents -4..16 (with `.0` when integral), scientific
/// (`1e-05`, `1.5e+16`) otherwise.
pub(crate) fn python_float_repr(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return if v.is_nan() {
            "NaN".into()
        } else if v.is_infinite() {
            if v > 0.0 {
                "Infinity".into()
            } else {
                "-Infinity".into()
            }
        } else if v.is_sign_negative() {
            "-0.0".into()
        } else {
            "0.0".into()
        };
    }
    let sci = format!("{v:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if (-4..16).contains(&exp) {
        let s = format!("{v}");
        if s.contains('.') { s } else { format!("{s}.0") }
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    }
}

/// The JSON bitsandbytes packs into `weight.quant_state.bitsandbytes__{type}` (key order and
/// separators of `json.dumps`).
pub(crate) fn state_json(f: &FourBit, (rows, cols): (usize, usize), dtype: &str) -> String {
    let mut s = format!(
        "{{\"quant_type\": \"{}\", \"blocksize\": {}, \"dtype\": \"{dtype}\", \"shape\": [{rows}, {cols}]",
        f.qtype, f.block_size
    );
    if let Absmax::Nested(n) = &f.absmax {
        s.push_str(&format!(
            ", \"nested_blocksize\": {}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
            n.block_size,
            python_float_repr(f64::from(n.offset))
        ));
    }
    s.push('}');
    s
}

fn get_tensor(get: &dyn Fn(&str) -> Option<Tensor>, name: &str, what: &str) -> Result<Tensor> {
    get(name).ok_or_else(|| err(name, format!("missing from the checkpoint ({what})")))
}

fn vec_f32(t: &Tensor, name: &str, len: usize) -> Result<Vec<f32>> {
    if t.dtype() != DType::F32 || t.elem_count() != len {
        return Err(err(
            name,
            format!(
                "expected F32 with {len} elements, got {:?} {:?}",
                t.dtype(),
                t.dims()
            ),
        ));
    }
    Ok(t.flatten_all()?.to_vec1()?)
}

fn vec_u8(t: &Tensor, name: &str, len: usize) -> Result<Vec<u8>> {
    if t.dtype() != DType::U8 || t.elem_count() != len {
        return Err(err(
            name,
            format!(
                "expected U8 with {len} elements, got {:?} {:?}",
                t.dtype(),
                t.dims()
            ),
        ));
    }
    Ok(t.flatten_all()?.to_vec1()?)
}

fn json_usize(v: &Value, key: &str, name: &str) -> Result<usize> {
    v.get(key)
        .ok_or_else(|| err(name, format!("key `{key}` missing from the quant state")))?
        .as_u64()
        .map(|x| x as usize)
        .ok_or_else(|| {
            err(
                name,
                format!(
                    "key `{key}`: expected a non-negative integer, got {}",
                    v[key]
                ),
            )
        })
}

fn json_str<'a>(v: &'a Value, key: &str, name: &str) -> Result<&'a str> {
    v.get(key)
        .ok_or_else(|| err(name, format!("key `{key}` missing from the quant state")))?
        .as_str()
        .ok_or_else(|| {
            err(
                name,
                format!("key `{key}`: expected a string, got {}", v[key]),
            )
        })
}

/// Reads a 4-bit weight (see the module docs for the names).
pub(crate) fn read_four_bit(
    prefix: &str,
    get: &dyn Fn(&str) -> Option<Tensor>,
    (rows, cols): (usize, usize),
) -> Result<FourBit> {
    let w_name = format!("{prefix}weight");
    let nf4_name = format!("{prefix}weight.quant_state.bitsandbytes__nf4");
    let fp4_name = format!("{prefix}weight.quant_state.bitsandbytes__fp4");
    let (state_name, state) = match (get(&nf4_name), get(&fp4_name)) {
        (Some(t), None) => (nf4_name, t),
        (None, Some(t)) => (fp4_name, t),
        (Some(_), Some(_)) => {
            return Err(err(
                &nf4_name,
                format!("both `{nf4_name}` and `{fp4_name}` are present; expected one"),
            ));
        }
        (None, None) => {
            return Err(err(
                &nf4_name,
                format!(
                    "missing from the checkpoint (bitsandbytes 4-bit quant state; nor is `{fp4_name}` there, \
                     nor `{prefix}SCB` for int8)"
                ),
            ));
        }
    };
    if state.dtype() != DType::U8 || state.rank() != 1 {
        return Err(err(
            &state_name,
            format!(
                "expected a 1-D U8 tensor, got {:?} {:?}",
                state.dtype(),
                state.dims()
            ),
        ));
    }
    let state_json: Vec<u8> = state.to_vec1()?;
    let v: Value = serde_json::from_slice(&state_json)
        .map_err(|e| err(&state_name, format!("quant state is not JSON: {e}")))?;
    let qt_str = json_str(&v, "quant_type", &state_name)?;
    let qtype = match qt_str {
        "nf4" => QuantType::Nf4,
        "fp4" => QuantType::Fp4,
        other => {
            return Err(err(
                &state_name,
                format!("key `quant_type`: unknown value {other:?}; expected \"nf4\" or \"fp4\""),
            ));
        }
    };
    if !state_name.ends_with(qt_str) {
        return Err(err(
            &state_name,
            format!("key `quant_type` is {qt_str:?}, which the tensor's name contradicts"),
        ));
    }
    let block = json_usize(&v, "blocksize", &state_name)?;
    if !VALID_BLOCK_SIZES.contains(&block) {
        return Err(err(
            &state_name,
            format!(
                "key `blocksize`: {block} is not supported; bitsandbytes accepts {VALID_BLOCK_SIZES:?}"
            ),
        ));
    }
    let dtype = json_str(&v, "dtype", &state_name)?;
    if !matches!(dtype, "float32" | "bfloat16" | "float16") {
        return Err(err(
            &state_name,
            format!("key `dtype`: {dtype:?} is not float32, bfloat16 or float16"),
        ));
    }
    let shape: Option<Vec<u64>> = v
        .get("shape")
        .and_then(|s| s.as_array())
        .and_then(|a| a.iter().map(Value::as_u64).collect());
    match shape.as_deref() {
        Some([r, c]) if (*r as usize, *c as usize) == (rows, cols) => {}
        Some(other) => {
            return Err(err(
                &state_name,
                format!("key `shape`: {other:?} differs from the expected [{rows}, {cols}]"),
            ));
        }
        None => {
            return Err(err(
                &state_name,
                "key `shape`: missing or not a list of two integers",
            ));
        }
    }

    let n = rows * cols;
    let blocks = n.div_ceil(block);
    let w = get_tensor(get, &w_name, "bitsandbytes 4-bit packed weight")?;
    if w.dtype() != DType::U8 {
        return Err(err(
            &w_name,
            format!(
                "packed 4-bit data must be U8 (bnb_4bit_quant_storage=uint8), got {:?}",
                w.dtype()
            ),
        ));
    }
    let packed_shape = w.dims().to_vec();
    let packed = vec_u8(&w, &w_name, n.div_ceil(2))?;
    let absmax_name = format!("{prefix}weight.absmax");
    let absmax_t = get_tensor(get, &absmax_name, "bitsandbytes 4-bit quant state")?;
    let map_name = format!("{prefix}weight.quant_map");
    let quant_map = vec_f32(
        &get_tensor(get, &map_name, "bitsandbytes 4-bit quant state")?,
        &map_name,
        16,
    )?;

    let nested_name = format!("{prefix}weight.nested_absmax");
    let nested_map_name = format!("{prefix}weight.nested_quant_map");
    let has_nested_json = v.get("nested_offset").is_some();
    let absmax = match (get(&nested_name), has_nested_json) {
        (Some(na), true) => {
            let nb = json_usize(&v, "nested_blocksize", &state_name)?;
            if nb == 0 {
                return Err(err(&state_name, "key `nested_blocksize`: must be positive"));
            }
            let nd = json_str(&v, "nested_dtype", &state_name)?;
            if nd != "float32" {
                return Err(err(
                    &state_name,
                    format!("key `nested_dtype`: {nd:?} is not supported (float32)"),
                ));
            }
            let offset = v
                .get("nested_offset")
                .and_then(Value::as_f64)
                .ok_or_else(|| err(&state_name, "key `nested_offset`: expected a number"))?
                as f32;
            let codes = vec_u8(&absmax_t, &absmax_name, blocks)?;
            let nested = vec_f32(&na, &nested_name, blocks.div_ceil(nb))?;
            let map = vec_f32(
                &get_tensor(get, &nested_map_name, "bitsandbytes double-quant state")?,
                &nested_map_name,
                256,
            )?;
            Absmax::Nested(Nested {
                codes,
                absmax: nested,
                map,
                block_size: nb,
                offset,
            })
        }
        (None, true) => {
            return Err(err(
                &nested_name,
                "missing from the checkpoint (the quant state has `nested_offset`)",
            ));
        }
        (Some(_), false) => {
            return Err(err(
                &state_name,
                format!("key `nested_offset` missing, but `{nested_name}` is present"),
            ));
        }
        (None, false) => Absmax::Plain(vec_f32(&absmax_t, &absmax_name, blocks)?),
    };
    Ok(FourBit {
        qtype,
        block_size: block,
        packed,
        packed_shape,
        absmax,
        quant_map,
        state_json,
    })
}

/// The tensors of a 4-bit weight, in `QuantState.as_dict(packed=True)` order after `weight`.
pub(crate) fn write_four_bit(prefix: &str, f: &FourBit) -> Result<Vec<(String, Tensor)>> {
    let dev = &Device::Cpu;
    let mut out = vec![(
        format!("{prefix}weight"),
        Tensor::from_vec(f.packed.clone(), f.packed_shape.clone(), dev)?,
    )];
    match &f.absmax {
        Absmax::Plain(a) => {
            out.push((
                format!("{prefix}weight.absmax"),
                Tensor::from_vec(a.clone(), a.len(), dev)?,
            ));
            out.push((
                format!("{prefix}weight.quant_map"),
                Tensor::from_vec(f.quant_map.clone(), 16, dev)?,
            ));
        }
        Absmax::Nested(n) => {
            out.push((
                format!("{prefix}weight.absmax"),
                Tensor::from_vec(n.codes.clone(), n.codes.len(), dev)?,
            ));
            out.push((
                format!("{prefix}weight.quant_map"),
                Tensor::from_vec(f.quant_map.clone(), 16, dev)?,
            ));
            out.push((
                format!("{prefix}weight.nested_absmax"),
                Tensor::from_vec(n.absmax.clone(), n.absmax.len(), dev)?,
            ));
            out.push((
                format!("{prefix}weight.nested_quant_map"),
                Tensor::from_vec(n.map.clone(), n.map.len(), dev)?,
            ));
        }
    }
    out.push((
        format!("{prefix}weight.quant_state.bitsandbytes__{}", f.qtype),
        Tensor::from_vec(f.state_json.clone(), f.state_json.len(), dev)?,
    ));
    Ok(out)
}

/// Reads an LLM.int8 weight: `weight` (U8 bytes of int8, or an integer dtype), `SCB`, and the
/// optional `weight_format`.
pub(crate) fn read_int8(
    prefix: &str,
    get: &dyn Fn(&str) -> Option<Tensor>,
    (rows, cols): (usize, usize),
) -> Result<Int8Rows> {
    let w_name = format!("{prefix}weight");
    let w = get_tensor(get, &w_name, "bitsandbytes int8 weight")?;
    if w.dims() != [rows, cols] {
        return Err(err(
            &w_name,
            format!("expected shape [{rows}, {cols}], got {:?}", w.dims()),
        ));
    }
    let q: Vec<i8> = match w.dtype() {
        DType::U8 => w
            .flatten_all()?
            .to_vec1::<u8>()?
            .into_iter()
            .map(|b| b as i8)
            .collect(),
        DType::I64 | DType::I32 | DType::I16 => {
            let vals: Vec<i64> = w.flatten_all()?.to_dtype(DType::I64)?.to_vec1()?;
            vals.into_iter()
                .map(|x| {
                    i8::try_from(x).map_err(|_| err(&w_name, format!("value {x} is outside int8")))
                })
                .collect::<Result<_>>()?
        }
        other => {
            return Err(err(
                &w_name,
                format!("expected int8 data (as U8 bytes), got {other:?}"),
            ));
        }
    };
    let scb_name = format!("{prefix}SCB");
    let scb = vec_f32(
        &get_tensor(get, &scb_name, "bitsandbytes int8 row scales")?,
        &scb_name,
        rows,
    )?;
    let wf_name = format!("{prefix}weight_format");
    let weight_format = match get(&wf_name) {
        None => false,
        Some(t) => {
            let v: Vec<i64> = t.flatten_all()?.to_dtype(DType::I64)?.to_vec1()?;
            if v != [0] {
                return Err(err(
                    &wf_name,
                    format!("only the row-major format 0 is supported, got {v:?}"),
                ));
            }
            true
        }
    };
    Ok(Int8Rows {
        q,
        scb,
        weight_format,
    })
}

/// The tensors of an int8 weight (`weight` as U8 holding the int8 bytes).
pub(crate) fn write_int8(
    prefix: &str,
    q: &Int8Rows,
    (rows, cols): (usize, usize),
) -> Result<Vec<(String, Tensor)>> {
    let dev = &Device::Cpu;
    let bytes: Vec<u8> = q.q.iter().map(|&v| v as u8).collect();
    let mut out = vec![
        (
            format!("{prefix}weight"),
            Tensor::from_vec(bytes, (rows, cols), dev)?,
        ),
        (
            format!("{prefix}SCB"),
            Tensor::from_vec(q.scb.clone(), rows, dev)?,
        ),
    ];
    if q.weight_format {
        out.push((
            format!("{prefix}weight_format"),
            Tensor::from_vec(vec![0u8], (), dev)?,
        ));
    }
    Ok(out)
}
