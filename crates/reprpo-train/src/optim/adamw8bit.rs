//! 8-bit AdamW as bitsandbytes' `bnb.optim.AdamW8bit` computes it (`train.optim =
//! "adamw_8bit"`): both moments kept in 8 bits with blockwise dynamic quantisation, tensors
//! below [`MIN_8BIT_SIZE`] elements kept in f32.
//!
//! Checked against bitsandbytes 0.50.2 on CPU tensors (its `cpu` kernels
//! `optimizer_update_8bit_blockwise` / `optimizer_update_32bit` and its native CPU
//! `quantize_blockwise`): `tests/fixtures/optim8bit/`, `tests/all/optim8bit.rs`.
//!
//! # Blockwise dynamic quantisation
//! A tensor of `n` elements is cut, in memory order, into blocks of `BLOCK` = 256 elements (the
//! last one shorter). Each block keeps `absmax = max |x|` (f32) and one u8 code per element,
//! an index into a sorted 256-entry map: `create_dynamic_map(signed=True)` for the first moment
//! `m`, `create_dynamic_map(signed=False)` for the second `v` ([`dynamic_map`]).
//! Dequantised: `x = map[code] * absmax`. Quantised (bitsandbytes' CPU routine, reproduced
//! exactly): `s = clamp(x * (1 / absmax), -1, 1)`, `i = trunc((s + 1) / 2 * 65535 + 0.5)` (a u16),
//! `code = lut[i]`, where `lut[i]` is the number of midpoints `(map[k] + map[k+1]) / 2` below
//! `-1 + 2 i / 65535` (the nearest map entry on a 65536-point grid; `quantize_lut`); a block
//! with `absmax = 0` gets code 0 everywhere.
//!
//! # The update of an 8-bit tensor (step `t`, 1-based)
//! `m`, `v` dequantised, then, in f32 (`*` rounds; `fma` is fused as PyTorch's vectorised
//! `add_(alpha=)` and `addcmul_` are on the CPU):
//!
//! `m <- fma(g, 1 - b1, m * b1)`, `v <- fma((1 - b2) * g, g, v * b2)`,
//! `c1 = 1 - b1^t`, `c2 = sqrt(1 - b2^t)` (f64),
//! `d = sqrt(v) / c2 + eps`, `p <- p (1 - lr wd)` (when `wd > 0`), `p <- p + ((-lr / c1) m) / d`,
//! then `m`, `v` requantised (new absmax per block). The update uses the moments before
//! requantisation. Weight decay is decoupled (AdamW); `eps` is added after the bias correction.
//!
//! # The update of a small tensor (f32 moments, `n < MIN_8BIT_SIZE`)
//! bitsandbytes' 32-bit Adam, which differs from `torch.optim.AdamW` in where `eps` goes:
//! the same `m`, `v`; `p <- p (1 - lr wd)`; `p <- fma(m / (sqrt(v) + eps c2), -lr c2 / c1, p)`.
//!
//! Fused multiply-adds are computed in f64 (an f32 product is exact in f64) and rounded to
//! f32: the same value as a fused f32 operation except in double-rounding ties (about one in
//! 2^29). PyTorch's CPU `sqrt` is not always correctly rounded (about 0.7% of the elements are
//! one ulp away from the exact square root that candle takes), so the parameters match
//! bitsandbytes' within a few ulps while the moments (which do not depend on `sqrt`) match bit
//! for bit; see the test's bounds.

use candle_core::{DType, Device, Shape, Tensor};

use super::AdamWConfig;
use crate::error::Result;

/// Elements per quantisation block (bitsandbytes' blockwise optimizers).
pub(crate) const BLOCK: usize = 256;

/// Tensors with fewer elements keep f32 moments (bitsandbytes' `min_8bit_size`).
pub const MIN_8BIT_SIZE: usize = 4096;

/// Entries of the u16 grid of the quantisation look-up table.
const LUT_SIZE: usize = 65536;

/// The number of blocks of a tensor of `n` elements.
pub fn blocks(n: usize) -> usize {
    n.div_ceil(BLOCK)
}

/// bitsandbytes' `create_dynamic_map(signed)` (`max_exponent_bits = 7`, 8 bits): sorted, in
/// `[-1, 1]` (signed) or `[0, 1]`. The f32 bit patterns as bitsandbytes 0.50.2 with torch 2.15
/// builds them (its `torch.linspace` rounding included), checked against the fixture.
pub fn dynamic_map(signed: bool) -> [f32; 256] {
    let bits = if signed { &SIGNED_MAP } else { &UNSIGNED_MAP };
    bits.map(f32::from_bits)
}

/// The quantisation look-up table of a sorted map, as bitsandbytes' CPU `build_quantize_lut`:
/// entry `i` is the index of the map entry nearest to `-1 + 2 i / 65535` (the count of midpoints
/// below it), in f32 arithmetic.
pub(crate) fn quantize_lut(map: &[f32; 256]) -> Vec<u8> {
    let mid: Vec<f32> = map.windows(2).map(|w| 0.5f32 * (w[0] + w[1])).collect();
    let mut lut = Vec::with_capacity(LUT_SIZE);
    let mut k = 0usize;
    for i in 0..LUT_SIZE {
        let val = -1.0f32 + (2.0f32 * i as f32) / (LUT_SIZE - 1) as f32;
        while k < mid.len() && mid[k] < val {
            k += 1;
        }
        // k <= 255 (there are 255 midpoints).
        lut.push(k.min(255) as u8);
    }
    lut
}

/// One map on a device: the map (`[256]` f32) and its look-up table (`[65536]` u8).
#[derive(Debug, Clone)]
pub(crate) struct Codebook {
    map: Tensor,
    lut: Tensor,
}

impl Codebook {
    /// The signed (first moment) or unsigned (second moment) dynamic map on `device`.
    pub fn new(signed: bool, device: &Device) -> Result<Self> {
        let map = dynamic_map(signed);
        let lut = quantize_lut(&map);
        Ok(Codebook {
            map: Tensor::from_slice(&map, 256, device)?,
            lut: Tensor::from_vec(lut, LUT_SIZE, device)?,
        })
    }

    /// Dequantise u8 `codes` (any shape) with their per-block `absmax` (`[blocks]` f32):
    /// `map[code] * absmax`, f32 of the codes' shape.
    pub fn dequantize(&self, codes: &Tensor, absmax: &Tensor) -> Result<Tensor> {
        let n = codes.elem_count();
        let b = blocks(n);
        // u32 ids: candle's index_select reads the largest value of the id type (255 for u8)
        // as padding and yields 0 there.
        let ids = codes.flatten_all()?.to_dtype(DType::U32)?;
        let vals = self.map.index_select(&ids, 0)?;
        let vals = vals
            .pad_with_zeros(0, 0, b * BLOCK - n)?
            .reshape((b, BLOCK))?;
        let x = vals.broadcast_mul(&absmax.reshape((b, 1))?)?;
        Ok(x.flatten_all()?.narrow(0, 0, n)?.reshape(codes.shape())?)
    }

    /// Quantise f32 `x` (any shape): u8 codes of its shape and the `[blocks]` f32 absmax (see the
    /// module docs).
    pub fn quantize(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = x.elem_count();
        let b = blocks(n);
        let xb = x
            .flatten_all()?
            .pad_with_zeros(0, 0, b * BLOCK - n)?
            .reshape((b, BLOCK))?;
        let absmax = xb.abs()?.max_keepdim(1)?;
        let zero = absmax.eq(0f32)?;
        // 1 / absmax, and 0 for an all-zero block (its codes are set to 0 below).
        let inv = zero.where_cond(&absmax.zeros_like()?, &absmax.recip()?)?;
        let s = xb.broadcast_mul(&inv)?.clamp(-1f32, 1f32)?;
        // (s + 1) * 0.5 == s * 0.5 + 0.5 exactly (halving is exact), then * 65535 + 0.5.
        let i = s
            .affine(0.5, 0.5)?
            .affine((LUT_SIZE - 1) as f64, 0.5)?
            .to_dtype(DType::U32)?;
        let q = self
            .lut
            .index_select(&i.flatten_all()?, 0)?
            .reshape((b, BLOCK))?;
        let q = zero
            .broadcast_as((b, BLOCK))?
            .where_cond(&q.zeros_like()?, &q)?;
        let codes = q.flatten_all()?.narrow(0, 0, n)?.reshape(x.shape())?;
        Ok((codes, absmax.flatten_all()?))
    }
}

/// Both codebooks on one device.
#[derive(Debug, Clone)]
pub(crate) struct Codebooks {
    /// Signed, for the first moment.
    pub m: Codebook,
    /// Unsigned, for the second moment.
    pub v: Codebook,
}

impl Codebooks {
    /// Both maps on `device`.
    pub fn new(device: &Device) -> Result<Self> {
        Ok(Codebooks {
            m: Codebook::new(true, device)?,
            v: Codebook::new(false, device)?,
        })
    }
}

/// The 8-bit moments of one tensor: u8 codes of the parameter's shape and f32 absmax per block.
#[derive(Debug, Clone)]
pub struct Quantized {
    /// First-moment codes (signed map).
    pub m: Tensor,
    /// First-moment absmax, `[blocks]`.
    pub m_absmax: Tensor,
    /// Second-moment codes (unsigned map).
    pub v: Tensor,
    /// Second-moment absmax, `[blocks]`.
    pub v_absmax: Tensor,
}

impl Quantized {
    /// The initial state of a parameter of shape `shape` (codes 0, absmax 0: moments 0).
    pub fn zeros(shape: &Shape, device: &Device) -> Result<Self> {
        let codes = Tensor::zeros(shape, DType::U8, device)?;
        let absmax = Tensor::zeros(blocks(shape.elem_count()), DType::F32, device)?;
        Ok(Quantized {
            m: codes.clone(),
            m_absmax: absmax.clone(),
            v: codes,
            v_absmax: absmax,
        })
    }

    /// Bytes held: two codes per element and two f32 per block.
    pub fn bytes(&self) -> usize {
        2 * self.m.elem_count() + 8 * self.m_absmax.elem_count()
    }
}

/// The new moments from the old ones (f32): `m <- fma(g, 1 - b1, m * b1)`,
/// `v <- fma((1 - b2) * g, g, v * b2)`, the fused operations in f64.
fn moments(cfg: &AdamWConfig, g: &Tensor, m: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
    // PyTorch casts the Python scalars to f32 before the kernel.
    let a1 = (1.0 - cfg.beta1) as f32 as f64;
    let a2 = (1.0 - cfg.beta2) as f32 as f64;
    let g64 = g.to_dtype(DType::F64)?;
    let mb = m.affine(cfg.beta1, 0.0)?.to_dtype(DType::F64)?;
    let m = (g64.affine(a1, 0.0)? + mb)?.to_dtype(DType::F32)?;
    let ag = g.affine(a2, 0.0)?.to_dtype(DType::F64)?;
    let vb = v.affine(cfg.beta2, 0.0)?.to_dtype(DType::F64)?;
    let v = ((ag * g64)? + vb)?.to_dtype(DType::F32)?;
    Ok((m, v))
}

/// `p (1 - lr wd)` (f32), or `p` without weight decay.
fn decay(cfg: &AdamWConfig, p: &Tensor, lr: f64) -> Result<Tensor> {
    Ok(if cfg.weight_decay > 0.0 {
        p.affine(1.0 - lr * cfg.weight_decay, 0.0)?
    } else {
        p.clone()
    })
}

/// `(1 - b1^t, sqrt(1 - b2^t))` in f64 (`powf`: the C library's `pow`, as Python's `**`).
fn corrections(cfg: &AdamWConfig, t: usize) -> (f64, f64) {
    let t = t as f64;
    (1.0 - cfg.beta1.powf(t), (1.0 - cfg.beta2.powf(t)).sqrt())
}

/// One step `t` of an 8-bit tensor: the new parameter and quantised moments.
pub(crate) fn step_8bit(
    cfg: &AdamWConfig,
    books: &Codebooks,
    p: &Tensor,
    g: &Tensor,
    q: &Quantized,
    lr: f64,
    t: usize,
) -> Result<(Tensor, Quantized)> {
    let m = books.m.dequantize(&q.m, &q.m_absmax)?;
    let v = books.v.dequantize(&q.v, &q.v_absmax)?;
    let (m, v) = moments(cfg, g, &m, &v)?;
    let (c1, c2) = corrections(cfg, t);
    let c2 = Tensor::new(c2 as f32, p.device())?;
    // A true division by c2 (candle's `x / f64` multiplies by the reciprocal).
    let d = v.sqrt()?.broadcast_div(&c2)?.affine(1.0, cfg.eps)?;
    let p = (decay(cfg, p, lr)? + (m.affine(-lr / c1, 0.0)? / d)?)?;
    let (m, m_absmax) = books.m.quantize(&m)?;
    let (v, v_absmax) = books.v.quantize(&v)?;
    Ok((
        p,
        Quantized {
            m,
            m_absmax,
            v,
            v_absmax,
        },
    ))
}

/// One step `t` of a small tensor (f32 moments, bitsandbytes' 32-bit formula): `(p, m, v)`.
pub(crate) fn step_32bit(
    cfg: &AdamWConfig,
    p: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    lr: f64,
    t: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (m, v) = moments(cfg, g, m, v)?;
    let (c1, c2) = corrections(cfg, t);
    let step_size = -lr * c2 / c1;
    let upd = (&m / v.sqrt()?.affine(1.0, cfg.eps * c2)?)?;
    let pw = decay(cfg, p, lr)?.to_dtype(DType::F64)?;
    let p = (upd
        .to_dtype(DType::F64)?
        .affine(step_size as f32 as f64, 0.0)?
        + pw)?
        .to_dtype(DType::F32)?;
    Ok((p, m, v))
}

const SIGNED_MAP: [u32; 256] = [
    0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000,
    0xbf616666, 0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333,
    0xbf44999a, 0xbf410000, 0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666,
    0xbf27cccd, 0xbf243334, 0xbf20999a, 0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a,
    0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333, 0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a,
    0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a, 0xbeb86666, 0xbeb13333, 0xbeaa0000,
    0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999, 0xbe6f3333, 0xbe60cccd,
    0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000, 0xbddb3334,
    0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
    0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d,
    0xbd5b851f, 0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148,
    0xbcfeb852, 0xbce7ae15, 0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148,
    0xbc1f3b64, 0xbc160418, 0xbc0ccccd, 0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4,
    0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a, 0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d,
    0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01, 0xb9c7e283, 0xb98ce705, 0xb923d70b,
    0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94, 0xb513a3b7, 0x00000000,
    0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b, 0x3923d70b,
    0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4,
    0x3bcfdf3b, 0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148,
    0x3c68f5c3, 0x3c8b851f, 0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148,
    0x3d166667, 0x3d21eb85, 0x3d2d70a3, 0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d,
    0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d, 0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a,
    0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667, 0x3dc428f7, 0x3dc9eb85, 0x3ddb3334,
    0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000, 0x3e526666, 0x3e60cccd,
    0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc, 0x3eaa0000,
    0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a,
    0x3f123334, 0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666,
    0x3f2f0000, 0x3f32999a, 0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333,
    0x3f4bcccd, 0x3f4f6666, 0x3f530000, 0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000,
    0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666, 0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000,
];
const UNSIGNED_MAP: [u32; 256] = [
    0x00000000, 0x34ae7baa, 0x35500998, 0x360e9b38, 0x3692ccf6, 0x36de4c51, 0x3714e5d5, 0x3783126e,
    0x37e171a0, 0x381fe868, 0x384f1800, 0x387e479a, 0x3896bb99, 0x38ae5364, 0x38c5eb31, 0x3906594b,
    0x394154ca, 0x397c5049, 0x399ba5e4, 0x39b923a2, 0x39d6a163, 0x39f41f22, 0x3a08ce71, 0x3a178d50,
    0x3a264c30, 0x3a350b10, 0x3a43c9ef, 0x3a5288d0, 0x3a6147af, 0x3a70068e, 0x3a7ec56e, 0x3a958106,
    0x3aba5e35, 0x3adf3b64, 0x3b020c4a, 0x3b147ae1, 0x3b26e978, 0x3b395810, 0x3b4bc6a7, 0x3b5e3540,
    0x3b70a3d7, 0x3b818937, 0x3b8ac082, 0x3b93f7cf, 0x3b9d2f1a, 0x3ba66666, 0x3baf9db2, 0x3bb8d4fd,
    0x3bc20c4a, 0x3bcb4395, 0x3bd47ae1, 0x3bddb22e, 0x3be6e978, 0x3bf020c5, 0x3bf9580f, 0x3c0147ae,
    0x3c05e354, 0x3c0a7ef9, 0x3c0f1aa0, 0x3c13b645, 0x3c1851eb, 0x3c1ced92, 0x3c218937, 0x3c2f5c2a,
    0x3c466667, 0x3c5d70a3, 0x3c747ae2, 0x3c85c28f, 0x3c9147af, 0x3c9ccccd, 0x3ca851eb, 0x3cb3d70b,
    0x3cbf5c29, 0x3ccae147, 0x3cd66667, 0x3ce1eb87, 0x3ced70a3, 0x3cf8f5c3, 0x3d023d70, 0x3d080000,
    0x3d0dc28f, 0x3d13851f, 0x3d1947af, 0x3d1f0a3d, 0x3d24cccd, 0x3d2a8f5c, 0x3d3051eb, 0x3d36147b,
    0x3d3bd70a, 0x3d41999a, 0x3d475c28, 0x3d4d1eb8, 0x3d52e147, 0x3d58a3d7, 0x3d5e6667, 0x3d6428f7,
    0x3d69eb87, 0x3d6fae15, 0x3d7570a3, 0x3d7b3333, 0x3d807ae2, 0x3d835c2a, 0x3d863d71, 0x3d891eb8,
    0x3d8c0000, 0x3d8ee148, 0x3d91c290, 0x3d94a3d7, 0x3d97851f, 0x3d9a6667, 0x3d9d47af, 0x3da028f6,
    0x3da30a3e, 0x3da5eb85, 0x3da8cccd, 0x3dabae15, 0x3dae8f5c, 0x3db170a4, 0x3db451eb, 0x3db73333,
    0x3dba147b, 0x3dbcf5c3, 0x3dbfd70b, 0x3dc2b852, 0x3dc5999a, 0x3dc87ae2, 0x3dcb5c29, 0x3dd40000,
    0x3de26666, 0x3df0cccd, 0x3dff3333, 0x3e06cccc, 0x3e0e0000, 0x3e153334, 0x3e1c6666, 0x3e23999a,
    0x3e2acccc, 0x3e320000, 0x3e393334, 0x3e406666, 0x3e47999a, 0x3e4ecccc, 0x3e560000, 0x3e5d3334,
    0x3e646666, 0x3e6b999a, 0x3e72cccc, 0x3e7a0000, 0x3e809999, 0x3e843333, 0x3e87cccd, 0x3e8b6666,
    0x3e8f0000, 0x3e92999a, 0x3e963333, 0x3e99cccc, 0x3e9d6666, 0x3ea10000, 0x3ea4999a, 0x3ea83333,
    0x3eabcccc, 0x3eaf6666, 0x3eb30000, 0x3eb6999a, 0x3eba3333, 0x3ebdcccc, 0x3ec16666, 0x3ec50000,
    0x3ec8999a, 0x3ecc3333, 0x3ecfcccc, 0x3ed36666, 0x3ed70000, 0x3eda999a, 0x3ede3333, 0x3ee1cccc,
    0x3ee56666, 0x3ee90000, 0x3eec999a, 0x3ef03333, 0x3ef3cccc, 0x3ef76666, 0x3efb0000, 0x3efe9999,
    0x3f01199a, 0x3f02e666, 0x3f04b333, 0x3f068000, 0x3f084ccc, 0x3f0a199a, 0x3f0be666, 0x3f0db334,
    0x3f0f8000, 0x3f114ccd, 0x3f13199a, 0x3f14e666, 0x3f16b334, 0x3f188000, 0x3f1a4ccd, 0x3f1c199a,
    0x3f1de666, 0x3f1fb334, 0x3f218000, 0x3f234ccd, 0x3f25199a, 0x3f26e666, 0x3f28b334, 0x3f2a8000,
    0x3f2c4ccd, 0x3f2e199a, 0x3f2fe666, 0x3f31b334, 0x3f338000, 0x3f354ccd, 0x3f37199a, 0x3f38e666,
    0x3f3ab334, 0x3f3c8000, 0x3f3e4ccd, 0x3f40199a, 0x3f41e666, 0x3f43b334, 0x3f458000, 0x3f474ccc,
    0x3f49199a, 0x3f4ae666, 0x3f4cb334, 0x3f4e8000, 0x3f504ccc, 0x3f52199a, 0x3f53e666, 0x3f55b334,
    0x3f578000, 0x3f594ccc, 0x3f5b199a, 0x3f5ce666, 0x3f5eb334, 0x3f608000, 0x3f624ccc, 0x3f64199a,
    0x3f65e666, 0x3f67b334, 0x3f698000, 0x3f6b4ccc, 0x3f6d199a, 0x3f6ee666, 0x3f70b334, 0x3f728000,
    0x3f744ccc, 0x3f76199a, 0x3f77e666, 0x3f79b334, 0x3f7b8000, 0x3f7d4ccc, 0x3f7f199a, 0x3f800000,
];
