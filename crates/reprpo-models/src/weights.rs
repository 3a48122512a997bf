//! A model folder's safetensors read one tensor at a time, and what a model loader needs from
//! its tensors: dense tensors checked against their expected shape and cast to the compute
//! dtype, and linear weights that may be quantised on the way in (`model.quantize`) or read
//! pre-quantised from a bitsandbytes checkpoint (`quantization_config` in `config.json`).
//!
//! [`LazyFiles`] parses only the headers of `model.safetensors` or of the shards listed in
//! `model.safetensors.index.json` and reads a tensor's bytes when the loader asks for it, so a
//! model quantised at load time never holds more than one full-precision tensor at once (the
//! peak is about the quantised model plus the largest tensor, not the full-precision model).
//! A `HashMap<String, Tensor>` (tensors already in memory, e.g. a random model) is a
//! [`TensorSource`] too.
//!
//! Pre-quantised linear layers are recognised by the names bitsandbytes saves beside
//! `{module}.weight`: 4-bit (`load_in_4bit`) `{module}.weight.absmax`, `.quant_map`,
//! `.quant_state.bitsandbytes__nf4` / `__fp4` (and `.nested_*` with double quantisation);
//! LLM.int8 (`load_in_8bit`) `{module}.SCB` and `{module}.weight_format`, the `weight` itself
//! stored as safetensors I8 (read as U8 with the same bytes, candle having no i8).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::adapter::{BaseWeight, Linear};
use crate::error::{ModelError, Result};
use crate::quant::{QuantConfig, QuantTensor};

/// Where a loader takes its named tensors from (Hugging Face names).
pub trait TensorSource {
    /// Remove `name` and return it in its stored dtype on `device`; `None` when absent.
    fn take_raw(&mut self, name: &str, device: &Device) -> Result<Option<Tensor>>;
    /// The names of the tensors not taken yet.
    fn names(&self) -> Vec<String>;
    /// The names of the tensors not taken yet that start with `prefix`. The loader asks this
    /// once per linear layer, so a source that can answer without listing every name (a sorted
    /// map) should override the default, which filters [`TensorSource::names`].
    fn names_with_prefix(&self, prefix: &str) -> Vec<String> {
        self.names()
            .into_iter()
            .filter(|n| n.starts_with(prefix))
            .collect()
    }
}

impl TensorSource for HashMap<String, Tensor> {
    fn take_raw(&mut self, name: &str, device: &Device) -> Result<Option<Tensor>> {
        match self.remove(name) {
            Some(t) => Ok(Some(t.to_device(device)?)),
            None => Ok(None),
        }
    }

    fn names(&self) -> Vec<String> {
        self.keys().cloned().collect()
    }

    fn names_with_prefix(&self, prefix: &str) -> Vec<String> {
        self.keys()
            .filter(|n| n.starts_with(prefix))
            .cloned()
            .collect()
    }
}

/// One tensor's place in a file.
struct Entry {
    file: PathBuf,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    range: (u64, u64),
}

/// The safetensors files of a model folder, headers parsed, data read on demand.
pub struct LazyFiles {
    /// Sorted by name, so the names under a prefix are a range (`names_with_prefix`).
    entries: BTreeMap<String, Entry>,
}

/// `model.safetensors`, or the shards named in `model.safetensors.index.json`.
pub fn model_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    if single.exists() {
        return Ok(vec![single]);
    }
    if !index.exists() {
        return Err(ModelError::Io {
            file: single,
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no model.safetensors(.index.json)",
            ),
        });
    }
    let text = std::fs::read_to_string(&index).map_err(|source| ModelError::Io {
        file: index.clone(),
        source,
    })?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::Format {
        file: index.clone(),
        problem: e.to_string(),
    })?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| ModelError::Config {
            file: index.clone(),
            key: "weight_map".into(),
            problem: "missing or not an object".into(),
        })?;
    let mut shards: Vec<String> = map
        .values()
        .filter_map(|s| s.as_str().map(str::to_string))
        .collect();
    shards.sort();
    shards.dedup();
    Ok(shards.into_iter().map(|s| dir.join(s)).collect())
}

/// The safetensors header of `file`: (tensor infos, the offset where the data starts).
fn read_header(file: &Path) -> Result<(safetensors::tensor::Metadata, u64)> {
    let bad = |problem: String| ModelError::Format {
        file: file.to_path_buf(),
        problem,
    };
    let io = |source| ModelError::Io {
        file: file.to_path_buf(),
        source,
    };
    let mut f = File::open(file).map_err(io)?;
    let file_len = f.metadata().map_err(io)?.len();
    let mut len8 = [0u8; 8];
    f.read_exact(&mut len8).map_err(io)?;
    let n = u64::from_le_bytes(len8);
    if n > file_len.saturating_sub(8) || n > 100_000_000 {
        return Err(bad(format!("header length {n} exceeds the file")));
    }
    let mut buf = Vec::with_capacity(8 + n as usize);
    buf.extend_from_slice(&len8);
    buf.resize(8 + n as usize, 0);
    f.read_exact(&mut buf[8..]).map_err(io)?;
    // `SafeTensors::read_metadata` wants the whole file (it checks that the buffer ends where
    // the data does); the header alone is parsed as JSON into the same validated `Metadata`.
    let meta: safetensors::tensor::Metadata =
        serde_json::from_slice(&buf[8..]).map_err(|e| bad(format!("safetensors header: {e}")))?;
    let start = 8 + n;
    for (name, info) in meta.tensors() {
        let (a, b) = info.data_offsets;
        if start + b as u64 > file_len || a > b {
            return Err(bad(format!("tensor {name}: data past the end of the file")));
        }
    }
    Ok((meta, start))
}

impl LazyFiles {
    /// Parse the headers of every safetensors file of the model folder `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let mut entries = BTreeMap::new();
        for file in model_files(dir)? {
            let (meta, start) = read_header(&file)?;
            for (name, info) in meta.tensors() {
                let (a, b) = info.data_offsets;
                entries.insert(
                    name,
                    Entry {
                        file: file.clone(),
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        range: (start + a as u64, start + b as u64),
                    },
                );
            }
        }
        Ok(LazyFiles { entries })
    }

    fn read(e: &Entry, name: &str, device: &Device) -> Result<Tensor> {
        let io = |source| ModelError::Io {
            file: e.file.clone(),
            source,
        };
        let mut f = File::open(&e.file).map_err(io)?;
        f.seek(SeekFrom::Start(e.range.0)).map_err(io)?;
        let mut bytes = vec![0u8; (e.range.1 - e.range.0) as usize];
        f.read_exact(&mut bytes).map_err(io)?;
        let bad = |problem: String| ModelError::Weight {
            file: e.file.clone(),
            name: name.into(),
            problem,
        };
        use safetensors::Dtype as S;
        let dtype = match e.dtype {
            // bitsandbytes' int8 weights: candle has no i8; the bytes are kept as they are and
            // `QuantTensor::from_bnb` reads them back as int8.
            S::U8 | S::I8 => DType::U8,
            S::U32 => DType::U32,
            S::I16 => DType::I16,
            S::I32 => DType::I32,
            S::I64 => DType::I64,
            S::BF16 => DType::BF16,
            S::F16 => DType::F16,
            S::F32 => DType::F32,
            S::F64 => DType::F64,
            other => return Err(bad(format!("dtype {other:?} is not supported"))),
        };
        let want = e.shape.iter().product::<usize>() * dtype.size_in_bytes();
        if bytes.len() != want {
            return Err(bad(format!(
                "{} bytes for shape {:?} of {dtype:?}",
                bytes.len(),
                e.shape
            )));
        }
        Ok(Tensor::from_raw_buffer(&bytes, dtype, &e.shape, device)?)
    }
}

impl TensorSource for LazyFiles {
    fn take_raw(&mut self, name: &str, device: &Device) -> Result<Option<Tensor>> {
        match self.entries.remove(name) {
            Some(e) => Ok(Some(Self::read(&e, name, device)?)),
            None => Ok(None),
        }
    }

    fn names(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
    }

    fn names_with_prefix(&self, prefix: &str) -> Vec<String> {
        self.entries
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .map(|(name, _)| name)
            .take_while(|name| name.starts_with(prefix))
            .cloned()
            .collect()
    }
}

/// How a model's weights are loaded.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// The compute dtype (embeddings, norms, output head, dense linear weights, activations).
    pub dtype: DType,
    /// Where the model lives.
    pub device: Device,
    /// Quantise every adaptable linear weight at load time (`model.quantize`); `None`: dense,
    /// unless the checkpoint itself is pre-quantised.
    pub quantize: Option<QuantConfig>,
}

impl LoadOptions {
    /// Dense weights in `dtype` on `device`.
    pub fn dense(dtype: DType, device: &Device) -> Self {
        LoadOptions {
            dtype,
            device: device.clone(),
            quantize: None,
        }
    }
}

/// Takes a model's tensors from a [`TensorSource`] with the checks every loader needs.
pub struct Loader<'a> {
    src: &'a mut dyn TensorSource,
    /// Named in errors (the model folder or file).
    file: &'a Path,
    opts: &'a LoadOptions,
}

impl<'a> Loader<'a> {
    /// A loader over `src`; `file` names the origin in errors.
    pub fn new(src: &'a mut dyn TensorSource, file: &'a Path, opts: &'a LoadOptions) -> Self {
        Loader { src, file, opts }
    }

    fn weight_err(&self, name: &str, problem: String) -> ModelError {
        ModelError::Weight {
            file: self.file.to_path_buf(),
            name: name.into(),
            problem,
        }
    }

    fn raw(&mut self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        let t = self
            .src
            .take_raw(name, device)?
            .ok_or_else(|| self.weight_err(name, "missing".into()))?;
        if t.dims() != shape {
            return Err(self.weight_err(name, format!("shape {:?}, expected {shape:?}", t.dims())));
        }
        Ok(t)
    }

    /// `raw`, refused unless stored as a float: an integer tensor here is quantised data whose
    /// quantisation state is missing (e.g. an int8 `weight` without its `SCB`), and casting it
    /// would silently give wrong weights.
    fn raw_float(&mut self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        let t = self.raw(name, shape, device)?;
        if !t.dtype().is_float() {
            return Err(self.weight_err(
                name,
                format!(
                    "holds integer data (read as {:?}; safetensors I8 reads as U8), expected a \
                     float tensor: quantised data without its quantisation state (e.g. an int8 \
                     weight without `SCB`)?",
                    t.dtype()
                ),
            ));
        }
        Ok(t)
    }

    /// The dense tensor `name` of shape `shape`, in the compute dtype.
    pub fn dense(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let device = self.opts.device.clone();
        Ok(self
            .raw_float(name, shape, &device)?
            .to_dtype(self.opts.dtype)?)
    }

    /// The linear layer `module` (`{module}.weight`, `[out, in]`): read pre-quantised when the
    /// checkpoint stores it so (bitsandbytes' 4-bit `{module}.weight.*` state, or LLM.int8's
    /// `{module}.SCB` / `{module}.weight_format` beside it), quantised here when the options ask
    /// for it, dense otherwise.
    pub fn linear(&mut self, module: &str, out: usize, inp: usize) -> Result<Linear> {
        let name = format!("{module}.weight");
        let four_prefix = format!("{name}.");
        let scb = format!("{module}.SCB");
        let format_name = format!("{module}.weight_format");
        let (mut four_bit, mut int8) = (Vec::new(), Vec::new());
        for n in self.src.names_with_prefix(&format!("{module}.")) {
            if n.starts_with(&four_prefix) {
                four_bit.push(n);
            } else if n == scb || n == format_name {
                int8.push(n);
            }
        }
        match (four_bit.is_empty(), int8.is_empty()) {
            (false, false) => {
                return Err(self.weight_err(
                    &name,
                    format!(
                        "both 4-bit quantisation state ({}) and int8 state ({}) are stored for \
                         this weight; expected one",
                        four_bit.join(", "),
                        int8.join(", ")
                    ),
                ));
            }
            (false, true) => return self.prequantized(module, &name, four_bit, (out, inp)),
            (true, false) => {
                if !int8.contains(&scb) {
                    return Err(self.weight_err(
                        &scb,
                        format!(
                            "missing: `{format_name}` marks an LLM.int8 weight, whose row \
                             scales `{scb}` are not in the checkpoint"
                        ),
                    ));
                }
                return self.prequantized(module, &name, int8, (out, inp));
            }
            (true, true) => {}
        }
        let base = match &self.opts.quantize {
            None => BaseWeight::Dense(self.dense(&name, &[out, inp])?),
            Some(cfg) => {
                // Quantised on the CPU from the weight in the compute dtype (as transformers
                // casts a checkpoint tensor to `torch_dtype` before bitsandbytes packs it).
                let w = self
                    .raw_float(&name, &[out, inp], &Device::Cpu)?
                    .to_dtype(self.opts.dtype)?;
                let q = QuantTensor::quantize(&w, cfg, &name)?;
                BaseWeight::Quant {
                    q: Arc::new(q),
                    dtype: self.opts.dtype,
                    device: self.opts.device.clone(),
                }
            }
        };
        Ok(Linear::with_base(module.to_string(), base))
    }

    fn prequantized(
        &mut self,
        module: &str,
        name: &str,
        mut parts: Vec<String>,
        shape: (usize, usize),
    ) -> Result<Linear> {
        parts.push(name.to_string());
        let mut got: HashMap<String, Tensor> = HashMap::new();
        for p in parts {
            // Packed data and quantisation state stay on the CPU: they are dequantised there.
            if let Some(t) = self.src.take_raw(&p, &Device::Cpu)? {
                got.insert(p, t);
            }
        }
        if !got.contains_key(name) {
            return Err(self.weight_err(name, "missing (its quantisation state is there)".into()));
        }
        let q = QuantTensor::from_bnb(&format!("{module}."), &|n| got.get(n).cloned(), shape)
            .map_err(|e| self.weight_err(name, e.to_string()))?;
        if let Some(cfg) = &self.opts.quantize
            && cfg.qtype != q.qtype()
        {
            return Err(self.weight_err(
                name,
                format!(
                    "the checkpoint is pre-quantised as {:?}, model.quantize asks for {:?}; \
                     a pre-quantised checkpoint is used as it is (leave model.quantize unset \
                     or set it to the checkpoint's type)",
                    q.qtype(),
                    cfg.qtype
                ),
            ));
        }
        Ok(Linear::with_base(
            module.to_string(),
            BaseWeight::Quant {
                q: Arc::new(q),
                dtype: self.opts.dtype,
                device: self.opts.device.clone(),
            },
        ))
    }
}
