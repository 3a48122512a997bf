//! 4-bit NF4 / FP4 blockwise quantisation and its double-quantised absmax, as bitsandbytes 0.50
//! computes them on the CPU (formulas in `mod.rs`).
//!
//! What makes it bit for bit:
//! - quantisation follows bitsandbytes' PyTorch implementation (it has no CPU kernel for it):
//!   `x * (1 / absmax)` for full blocks and `x / absmax` for the last partial block (absmax
//!   clamped to at least 1e-38 in the divisor; the stored absmax of a full block is not clamped,
//!   that of a partial one is), clamp to [-1, 1], then `torch.bucketize` against the f32
//!   midpoints `(c_k + c_{k+1}) / 2` of the sorted code book (a value on a midpoint takes the
//!   lower code), FP4 mapped back through the sort order;
//! - the double-quantisation offset is `absmax.mean()` in PyTorch's CPU summation order
//!   (`torch_mean_f32`);
//! - the 8-bit absmax codes follow bitsandbytes' CPU kernel: `1 / absmax` times the value,
//!   clamped, mapped to `trunc(fma((v + 1) * 0.5, 65535, 0.5))` in a 65536-entry table of the
//!   nearest dynamic-map index (a zero group gives code 0);
//! - dequantisation is `code[q] * absmax` in f32 (the nested absmax `dynamic[q] * nested + offset`
//!   in f32), rounded to nearest even for bf16 / f16.

use rayon::prelude::*;

use super::QuantType;

/// bitsandbytes' NF4 code book (`get_4bit_type("nf4")`), sorted.
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// bitsandbytes' FP4 code book (`get_4bit_type("fp4")`): the E2M1 values with bias 2,
/// divided (in f32) by the largest, 12. Index 8 is +0.0 as in bitsandbytes' PyTorch table.
pub const FP4_CODE: [f32; 16] = [
    0.0,
    0.0625 / 12.0,
    8.0 / 12.0,
    1.0,
    4.0 / 12.0,
    6.0 / 12.0,
    2.0 / 12.0,
    3.0 / 12.0,
    0.0,
    -0.0625 / 12.0,
    -8.0 / 12.0,
    -1.0,
    -4.0 / 12.0,
    -6.0 / 12.0,
    -2.0 / 12.0,
    -3.0 / 12.0,
];

/// The signed 8-bit dynamic map of bitsandbytes' `create_dynamic_map()` (256 sorted values),
/// which quantises the absmax under double quantisation.
pub const DYNAMIC_MAP: [f32; 256] = [
    -0.99296874,
    -0.9789063,
    -0.96484375,
    -0.9507812,
    -0.93671876,
    -0.92265624,
    -0.9085938,
    -0.89453125,
    -0.8804687,
    -0.86640626,
    -0.85234374,
    -0.8382813,
    -0.82421875,
    -0.8101562,
    -0.79609376,
    -0.78203124,
    -0.7679688,
    -0.75390625,
    -0.7398437,
    -0.72578126,
    -0.7117188,
    -0.6976563,
    -0.68359375,
    -0.6695312,
    -0.65546876,
    -0.6414063,
    -0.6273438,
    -0.61328125,
    -0.5992187,
    -0.58515626,
    -0.5710938,
    -0.5570313,
    -0.54296875,
    -0.5289062,
    -0.5148437,
    -0.50078124,
    -0.4867187,
    -0.47265625,
    -0.45859373,
    -0.44453126,
    -0.43046874,
    -0.41640624,
    -0.40234375,
    -0.38828123,
    -0.37421876,
    -0.36015624,
    -0.34609374,
    -0.33203125,
    -0.31796873,
    -0.30390626,
    -0.28984374,
    -0.27578127,
    -0.26171875,
    -0.24765624,
    -0.23359375,
    -0.21953125,
    -0.20546874,
    -0.19140625,
    -0.17734376,
    -0.16328125,
    -0.14921875,
    -0.13515624,
    -0.12109375,
    -0.107031256,
    -0.09859375,
    -0.09578126,
    -0.092968754,
    -0.09015625,
    -0.08734375,
    -0.08453125,
    -0.08171876,
    -0.07890625,
    -0.07609375,
    -0.07328125,
    -0.070468746,
    -0.067656256,
    -0.06484375,
    -0.06203125,
    -0.059218753,
    -0.05640625,
    -0.05359375,
    -0.05078125,
    -0.04796875,
    -0.04515625,
    -0.042343747,
    -0.03953125,
    -0.036718752,
    -0.03390625,
    -0.03109375,
    -0.028281251,
    -0.02546875,
    -0.02265625,
    -0.019843752,
    -0.01703125,
    -0.01421875,
    -0.01140625,
    -0.00971875,
    -0.009156249,
    -0.00859375,
    -0.00803125,
    -0.00746875,
    -0.00690625,
    -0.00634375,
    -0.00578125,
    -0.0052187503,
    -0.0046562497,
    -0.00409375,
    -0.0035312497,
    -0.00296875,
    -0.00240625,
    -0.00184375,
    -0.0012812499,
    -9.437501e-04,
    -8.3125e-04,
    -7.1875006e-04,
    -6.062501e-04,
    -4.9375003e-04,
    -3.8125002e-04,
    -2.6875004e-04,
    -1.5625001e-04,
    -8.875e-05,
    -6.625e-05,
    -4.375e-05,
    -2.1249998e-05,
    -7.75e-06,
    -3.2500002e-06,
    -5.5000004e-07,
    0.0,
    5.5000004e-07,
    3.2500002e-06,
    7.75e-06,
    2.1249998e-05,
    4.375e-05,
    6.625e-05,
    8.875e-05,
    1.5625001e-04,
    2.6875004e-04,
    3.8125002e-04,
    4.9375003e-04,
    6.062501e-04,
    7.1875006e-04,
    8.3125e-04,
    9.437501e-04,
    0.0012812499,
    0.00184375,
    0.00240625,
    0.00296875,
    0.0035312497,
    0.00409375,
    0.0046562497,
    0.0052187503,
    0.00578125,
    0.00634375,
    0.00690625,
    0.00746875,
    0.00803125,
    0.00859375,
    0.009156249,
    0.00971875,
    0.01140625,
    0.01421875,
    0.01703125,
    0.019843752,
    0.02265625,
    0.02546875,
    0.028281251,
    0.03109375,
    0.03390625,
    0.036718752,
    0.03953125,
    0.042343747,
    0.04515625,
    0.04796875,
    0.05078125,
    0.05359375,
    0.05640625,
    0.059218753,
    0.06203125,
    0.06484375,
    0.067656256,
    0.070468746,
    0.07328125,
    0.07609375,
    0.07890625,
    0.08171876,
    0.08453125,
    0.08734375,
    0.09015625,
    0.092968754,
    0.09578126,
    0.09859375,
    0.107031256,
    0.12109375,
    0.13515624,
    0.14921875,
    0.16328125,
    0.17734376,
    0.19140625,
    0.20546874,
    0.21953125,
    0.23359375,
    0.24765624,
    0.26171875,
    0.27578127,
    0.28984374,
    0.30390626,
    0.31796873,
    0.33203125,
    0.34609374,
    0.36015624,
    0.37421876,
    0.38828123,
    0.40234375,
    0.41640624,
    0.43046874,
    0.44453126,
    0.45859373,
    0.47265625,
    0.4867187,
    0.50078124,
    0.5148437,
    0.5289062,
    0.54296875,
    0.5570313,
    0.5710938,
    0.58515626,
    0.5992187,
    0.61328125,
    0.6273438,
    0.6414063,
    0.65546876,
    0.6695312,
    0.68359375,
    0.6976563,
    0.7117188,
    0.72578126,
    0.7398437,
    0.75390625,
    0.7679688,
    0.78203124,
    0.79609376,
    0.8101562,
    0.82421875,
    0.8382813,
    0.85234374,
    0.86640626,
    0.8804687,
    0.89453125,
    0.9085938,
    0.92265624,
    0.93671876,
    0.9507812,
    0.96484375,
    0.9789063,
    0.99296874,
    1.0,
];

/// Lanes of the `Vectorized<float>` PyTorch's CPU sum runs with (8: found by matching
/// `torch.mean` on an AVX-512 CPU; 16 lanes does not match), which fix its summation order.
const TORCH_VEC_LANES: usize = 8;

/// Blocks of absmax per nested (double-quantisation) group, as bitsandbytes' `quantize_4bit` uses.
pub(crate) const NESTED_BLOCK: usize = 256;

/// `x.mean()` of a contiguous 1-D f32 tensor as PyTorch computes it on the CPU: `sum / n`,
/// with the sum in the order of `cascade_sum` (`aten/src/ATen/native/cpu/SumKernel.cpp`) for
/// 8-lane vectors: whole vectors summed by `row_sum` (4 interleaved accumulators, each a 4-level
/// cascade with steps of 16), the leftover elements summed in order, then the 8 lanes added to
/// that left to right; fewer than 8 elements take the scalar `row_sum`. Equal to PyTorch 2.15's
/// bit for bit (tested against it on an AVX-512 CPU) when it runs single-threaded or with fewer
/// than 32768 elements; above that PyTorch splits the sum over threads and the offset may differ
/// in its last bits (a weight of more than 2M elements with block size 64).
pub fn torch_mean_f32(x: &[f32]) -> f32 {
    let n = x.len();
    if n == 0 {
        return f32::NAN;
    }
    let sum = if n >= TORCH_VEC_LANES {
        let vecs = n / TORCH_VEC_LANES;
        let acc = row_sum::<TORCH_VEC_LANES>(vecs, |i| {
            let mut v = [0.0f32; TORCH_VEC_LANES];
            v.copy_from_slice(&x[i * TORCH_VEC_LANES..(i + 1) * TORCH_VEC_LANES]);
            v
        });
        let mut total = 0.0f32;
        for &v in &x[vecs * TORCH_VEC_LANES..] {
            total += v;
        }
        for lane in acc {
            total += lane;
        }
        total
    } else {
        row_sum::<1>(n, |i| [x[i]])[0]
    };
    sum / n as f32
}

/// `ceil(log2(x))` as c10's `CeilLog2` (1 for x <= 2).
fn ceil_log2(x: usize) -> u32 {
    if x <= 2 {
        1
    } else {
        usize::BITS - (x - 1).leading_zeros()
    }
}

fn add<const L: usize>(a: &mut [f32; L], b: &[f32; L]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x += *y;
    }
}

/// PyTorch's `row_sum` over `size` items (each an `L`-lane vector): `multi_row_sum` with 4
/// interleaved rows, the leftover items into row 0, then rows 1..3 into row 0.
// Index loops keep PyTorch's accumulation order (level, row, lane) visible.
#[allow(clippy::needless_range_loop)]
fn row_sum<const L: usize>(size: usize, load: impl Fn(usize) -> [f32; L]) -> [f32; L] {
    const ILP: usize = 4;
    const LEVELS: usize = 4;
    let size_ilp = size / ILP;
    let level_power = (ceil_log2(size_ilp) / LEVELS as u32).max(4);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[[0.0f32; L]; ILP]; LEVELS];
    let mut i = 0usize;
    while i + level_step <= size_ilp {
        for _ in 0..level_step {
            for (k, row) in acc[0].iter_mut().enumerate() {
                add(row, &load(i * ILP + k));
            }
            i += 1;
        }
        for j in 1..LEVELS {
            for k in 0..ILP {
                let lower = acc[j - 1][k];
                add(&mut acc[j][k], &lower);
                acc[j - 1][k] = [0.0; L];
            }
            if i & (level_mask << (j * level_power as usize)) != 0 {
                break;
            }
        }
    }
    while i < size_ilp {
        for (k, row) in acc[0].iter_mut().enumerate() {
            add(row, &load(i * ILP + k));
        }
        i += 1;
    }
    for j in 1..LEVELS {
        for k in 0..ILP {
            let upper = acc[j][k];
            add(&mut acc[0][k], &upper);
        }
    }
    let mut partial = acc[0];
    for idx in size_ilp * ILP..size {
        add(&mut partial[0], &load(idx));
    }
    let mut out = partial[0];
    for row in &partial[1..] {
        add(&mut out, row);
    }
    out
}

/// The code book of a 4-bit type.
pub(crate) fn code_book(qtype: QuantType) -> &'static [f32; 16] {
    match qtype {
        QuantType::Fp4 => &FP4_CODE,
        _ => &NF4_CODE,
    }
}

/// `torch.bucketize` boundaries of a 4-bit code book and the sort order (bitsandbytes'
/// `_get_4bit_quantize_bounds`; a stable sort, so FP4's +0 (index 0) precedes its other zero).
fn bounds_and_order(code: &[f32; 16]) -> ([f32; 15], [u8; 16]) {
    let mut order: [u8; 16] = std::array::from_fn(|i| i as u8);
    order.sort_by(|&a, &b| code[a as usize].total_cmp_zero_eq(code[b as usize]));
    let bounds =
        std::array::from_fn(|k| (code[order[k] as usize] + code[order[k + 1] as usize]) / 2.0);
    (bounds, order)
}

trait ZeroEqCmp {
    fn total_cmp_zero_eq(self, other: f32) -> std::cmp::Ordering;
}

impl ZeroEqCmp for f32 {
    /// Order of finite floats with -0 == +0 (as `torch.argsort` compares).
    fn total_cmp_zero_eq(self, other: f32) -> std::cmp::Ordering {
        self.partial_cmp(&other)
            .unwrap_or(std::cmp::Ordering::Equal)
    }
}

/// The double-quantised absmax.
#[derive(Clone, Debug)]
pub(crate) struct Nested {
    /// One 8-bit code per block (`weight.absmax`, U8).
    pub(crate) codes: Vec<u8>,
    /// One f32 per group of `block_size` codes (`weight.nested_absmax`).
    pub(crate) absmax: Vec<f32>,
    /// The 8-bit map the codes index (`weight.nested_quant_map`).
    pub(crate) map: Vec<f32>,
    /// Codes per group (`nested_blocksize`, 256).
    pub(crate) block_size: usize,
    /// The mean subtracted before quantising (`nested_offset`).
    pub(crate) offset: f32,
}

impl Nested {
    /// bitsandbytes' `quantize_4bit(compress_statistics=True)` on the absmax.
    fn quantize(absmax: &[f32]) -> Self {
        let offset = torch_mean_f32(absmax);
        let centred: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
        let (codes, nested) = quantize_blockwise_8bit(&centred, &DYNAMIC_MAP, NESTED_BLOCK);
        Self {
            codes,
            absmax: nested,
            map: DYNAMIC_MAP.to_vec(),
            block_size: NESTED_BLOCK,
            offset,
        }
    }

    /// The f32 absmax of block `j` bitsandbytes dequantises with:
    /// `map[code] * nested_absmax + offset` (computed when used, never stored: keeping them would
    /// cost the 4 bytes per block that double quantisation saves).
    fn scale(&self, j: usize) -> f32 {
        let Some(&c) = self.codes.get(j) else {
            return 0.0;
        };
        let group = self
            .absmax
            .get(j / self.block_size.max(1))
            .copied()
            .unwrap_or(0.0);
        self.map.get(c as usize).copied().unwrap_or(0.0) * group + self.offset
    }
}

impl Absmax {
    /// The f32 absmax of block `b` (0 past the end).
    pub(crate) fn scale(&self, b: usize) -> f32 {
        match self {
            Absmax::Plain(a) => a.get(b).copied().unwrap_or(0.0),
            Absmax::Nested(n) => n.scale(b),
        }
    }
}

/// bitsandbytes' CPU `quantize_blockwise` (`quantize_cpu_impl`, f32 input): per block the
/// absmax, then each value's code from a 65536-entry look-up table built from the code book.
fn quantize_blockwise_8bit(x: &[f32], code: &[f32; 256], block: usize) -> (Vec<u8>, Vec<f32>) {
    const LUT_SIZE: usize = 65536;
    let mut mid = [0.0f32; 255];
    for (i, m) in mid.iter_mut().enumerate() {
        *m = 0.5 * (code[i] + code[i + 1]);
    }
    let mut lut = vec![0u8; LUT_SIZE];
    let mut idx = 0usize;
    for (i, entry) in lut.iter_mut().enumerate() {
        let val = -1.0f32 + (2.0f32 * i as f32) / (LUT_SIZE - 1) as f32;
        while idx < 255 && mid[idx] < val {
            idx += 1;
        }
        *entry = idx as u8;
    }
    let mut codes = vec![0u8; x.len()];
    let mut absmax = Vec::with_capacity(x.len().div_ceil(block));
    for (xs, out) in x.chunks(block).zip(codes.chunks_mut(block)) {
        let amax = xs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        absmax.push(amax);
        if amax == 0.0 {
            continue;
        }
        let inv = 1.0f32 / amax;
        for (o, &v) in out.iter_mut().zip(xs) {
            let h = ((v * inv).clamp(-1.0, 1.0) + 1.0) * 0.5;
            // fma(h, 65535, 0.5) in f32: the f64 product and sum are exact, one rounding to f32.
            let t = (f64::from(h) * 65535.0 + 0.5) as f32;
            *o = lut[(t as i64 as u16) as usize];
        }
    }
    (codes, absmax)
}

/// The absmax of a 4-bit weight.
#[derive(Clone, Debug)]
pub(crate) enum Absmax {
    /// f32, one per block.
    Plain(Vec<f32>),
    /// Double-quantised.
    Nested(Nested),
}

/// A 4-bit weight in bitsandbytes' layout.
#[derive(Clone, Debug)]
pub(crate) struct FourBit {
    pub(crate) qtype: QuantType,
    pub(crate) block_size: usize,
    /// Two codes per byte, the first in the high nibble; `ceil(n / 2)` bytes.
    pub(crate) packed: Vec<u8>,
    /// The shape `weight` was saved with (bitsandbytes: `[ceil(n / 2), 1]`).
    pub(crate) packed_shape: Vec<usize>,
    pub(crate) absmax: Absmax,
    /// `weight.quant_map` as saved (dequantisation uses the built-in code book, as bitsandbytes).
    pub(crate) quant_map: Vec<f32>,
    /// `weight.quant_state.bitsandbytes__{nf4,fp4}`: the JSON of the non-tensor state.
    pub(crate) state_json: Vec<u8>,
}

impl FourBit {
    /// bitsandbytes' `quantize_4bit` on the flat f32 values of an `[out, in]` weight.
    pub(crate) fn quantize(
        x: &[f32],
        shape: (usize, usize),
        qtype: QuantType,
        block: usize,
        double_quant: bool,
        dtype: &str,
    ) -> Self {
        let code = code_book(qtype);
        let (bounds, order) = bounds_and_order(code);
        let n = x.len();
        let full = n - n % block;
        let mut absmax = Vec::with_capacity(n.div_ceil(block));
        let mut q = vec![0u8; n + n % 2];
        let encode = |s: f32| -> u8 {
            let bucket = bounds.iter().take_while(|&&b| b < s).count();
            order[bucket]
        };
        for (xs, qs) in x[..full].chunks_exact(block).zip(q.chunks_mut(block)) {
            let amax = xs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            absmax.push(amax);
            let inv = 1.0f32 / amax.max(1e-38);
            for (o, &v) in qs.iter_mut().zip(xs) {
                *o = encode((v * inv).clamp(-1.0, 1.0));
            }
        }
        if full < n {
            let amax = x[full..]
                .iter()
                .fold(0.0f32, |m, v| m.max(v.abs()))
                .max(1e-38);
            absmax.push(amax);
            for (o, &v) in q[full..n].iter_mut().zip(&x[full..]) {
                *o = encode((v / amax).clamp(-1.0, 1.0));
            }
        }
        if n % 2 == 1 {
            q[n] = encode(0.0);
        }
        let packed: Vec<u8> = q.chunks_exact(2).map(|p| (p[0] << 4) | p[1]).collect();
        let absmax = if double_quant {
            Absmax::Nested(Nested::quantize(&absmax))
        } else {
            Absmax::Plain(absmax)
        };
        let mut me = Self {
            qtype,
            block_size: block,
            packed_shape: vec![packed.len(), 1],
            packed,
            absmax,
            quant_map: code.to_vec(),
            state_json: Vec::new(),
        };
        me.state_json = super::bnb::state_json(&me, shape, dtype).into_bytes();
        me
    }

    pub(crate) fn is_nested(&self) -> bool {
        matches!(self.absmax, Absmax::Nested(_))
    }

    pub(crate) fn nbytes(&self) -> usize {
        let absmax = match &self.absmax {
            Absmax::Plain(a) => 4 * a.len(),
            Absmax::Nested(n) => n.codes.len() + 4 * (n.absmax.len() + n.map.len()),
        };
        self.packed.len() + absmax + 4 * self.quant_map.len() + self.state_json.len()
    }

    /// `code[q] * absmax` for every element of `[rows, cols]`, converted by `conv`; rows in
    /// parallel, one 16-entry table per block segment.
    pub(crate) fn dequantize<T: Copy + Default + Send + Sync>(
        &self,
        (rows, cols): (usize, usize),
        conv: impl Fn(f32) -> T + Sync,
    ) -> Vec<T> {
        let mut out = vec![T::default(); rows * cols];
        if cols == 0 {
            return out;
        }
        let code = code_book(self.qtype);
        let block = self.block_size;
        let packed = &self.packed;
        let absmax = &self.absmax;
        out.par_chunks_mut(cols).enumerate().for_each(|(r, row)| {
            let start = r * cols;
            let mut j = 0;
            while j < cols {
                let b = (start + j) / block;
                let end = ((b + 1) * block - start).min(cols);
                let s = absmax.scale(b);
                let table: [T; 16] = std::array::from_fn(|i| conv(code[i] * s));
                let mut k = j;
                if (start + k) % 2 == 1 {
                    out_nibble(row, k, packed, start, &table, false);
                    k += 1;
                }
                let pairs = (end - k) / 2;
                let byte0 = (start + k) / 2;
                if let Some(bytes) = packed.get(byte0..byte0 + pairs) {
                    for (o, &byte) in row[k..k + 2 * pairs].chunks_exact_mut(2).zip(bytes) {
                        o[0] = table[(byte >> 4) as usize];
                        o[1] = table[(byte & 15) as usize];
                    }
                }
                k += 2 * pairs;
                if k < end {
                    out_nibble(row, k, packed, start, &table, true);
                }
                j = end;
            }
        });
        out
    }
}

/// One element from a half byte: the high nibble for an even flat index, the low for an odd.
fn out_nibble<T: Copy>(
    row: &mut [T],
    k: usize,
    packed: &[u8],
    start: usize,
    table: &[T; 16],
    high: bool,
) {
    let byte = packed.get((start + k) / 2).copied().unwrap_or(0);
    let nib = if high { byte >> 4 } else { byte & 15 };
    row[k] = table[nib as usize];
}
