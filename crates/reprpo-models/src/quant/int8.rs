//! LLM.int8 row-wise 8-bit weights, as bitsandbytes' `Int8Params` quantises them and
//! `int8_vectorwise_dequant` restores them (both its PyTorch implementation; it has no CPU kernel):
//!
//! ```text
//! h       = W cast to float16                       (Int8Params does this first)
//! SCB[r]  = max_i |h_ri|                            (f32)
//! q_ri    = round_half_even(h_ri * ((1 / SCB[r]) * 127)) as int8
//!           (PyTorch evaluates `127.0 / SCB` as `reciprocal(SCB) * 127`; a zero row gives NaN,
//!           which the cast turns into 0)
//! W'_ri   = (q_ri * SCB[r]) * f32(1 / 127)          (the constant 7.874015718698502e-3 as f32)
//! ```

use rayon::prelude::*;

/// bitsandbytes' `1 / 127`, as the f32 PyTorch multiplies by.
const INV_127: f32 = 7.874_015_718_698_502e-3_f64 as f32;

/// An int8 weight with one f32 scale per row.
#[derive(Clone, Debug)]
pub(crate) struct Int8Rows {
    /// `[out, in]` int8 values, row-major.
    pub(crate) q: Vec<i8>,
    /// `SCB`: the absmax of each row.
    pub(crate) scb: Vec<f32>,
    /// Whether `weight_format` was saved (bitsandbytes writes a U8 scalar 0, "row").
    pub(crate) weight_format: bool,
}

impl Int8Rows {
    /// `Int8Params._quantize` on the flat f32 values of an `[out, in]` weight.
    pub(crate) fn quantize(x: &[f32], (rows, cols): (usize, usize)) -> Self {
        let mut q = vec![0i8; rows * cols];
        let mut scb = vec![0.0f32; rows];
        if cols > 0 {
            q.par_chunks_mut(cols)
                .zip(scb.par_iter_mut())
                .zip(x.par_chunks(cols))
                .for_each(|((qr, s), xr)| {
                    let h: Vec<f32> = xr
                        .iter()
                        .map(|&v| half::f16::from_f32(v).to_f32())
                        .collect();
                    let amax = h.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                    *s = amax;
                    let scale = (1.0f32 / amax) * 127.0;
                    for (o, v) in qr.iter_mut().zip(&h) {
                        // `as` saturates and maps NaN (a zero row: 0 * inf) to 0, as PyTorch's cast did.
                        *o = (v * scale).round_ties_even() as i8;
                    }
                });
        }
        Self {
            q,
            scb,
            weight_format: true,
        }
    }

    pub(crate) fn nbytes(&self) -> usize {
        self.q.len() + 4 * self.scb.len()
    }

    /// `(q * SCB) * (1 / 127)` per element, converted by `conv`; rows in parallel.
    pub(crate) fn dequantize<T: Copy + Default + Send + Sync>(
        &self,
        (rows, cols): (usize, usize),
        conv: impl Fn(f32) -> T + Sync,
    ) -> Vec<T> {
        let mut out = vec![T::default(); rows * cols];
        if cols == 0 {
            return out;
        }
        out.par_chunks_mut(cols)
            .zip(self.q.par_chunks(cols))
            .zip(self.scb.par_iter())
            .for_each(|((o, qr), &s)| {
                for (y, &v) in o.iter_mut().zip(qr) {
                    *y = conv((f32::from(v) * s) * INV_127);
                }
            });
        out
    }
}
