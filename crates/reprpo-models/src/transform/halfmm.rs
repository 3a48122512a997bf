//! Half-precision (bf16 / f16) products of many token rows with a small matrix, for the
//! activation transforms (ETHER's `d -> d/60 -> d` bottleneck, HRA's reflections, ortho's map).
//!
//! # Formula
//! Forward `Y = X W` with `X` `[M, K]` (M tokens, large) and `W` `[K, N]`, both in one
//! half-precision dtype `h`: `Y = h(f32(X) f32(W))`, the product in f32 and rounded once to `h`
//! (round to nearest even), as candle's bf16 matmul computes it. Backward, for the output
//! gradient `G` `[M, N]` (in `h`): `∂X = h(f32(G) f32(W)ᵀ)` and `∂W = h(f32(X)ᵀ f32(G))`.
//!
//! candle has no half-precision GEMM: its bf16 matmul widens both whole operands to fresh f32
//! copies, multiplies and narrows a fresh f32 result. For a `[8·512, 2048]` activation that is
//! 32 MiB of new f32 pages per operand, which the kernel clears on first touch (about a third
//! of ETHER + prefvec's time at bf16, `docs/perf.md`). Here the tall operand is widened 64 rows
//! at a time into a per-thread buffer that stays in cache, multiplied there by faer's f32 GEMM
//! and narrowed straight into the output; the row tiles run in parallel. `∂W` sums over the
//! rows: fixed chunks of rows each give a partial sum, added in order, so the result does not
//! depend on the thread count or the scheduling.
//!
//! Used by [`super::tokens_matmul`] for bf16 / f16 activations on the CPU outside
//! `reprpo_kernels::written_out`; elsewhere candle's matmul runs (same values up to the order
//! of the f32 sums). Tested against f64 products in `tests/halfmm.rs`.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor, WithDType};
use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::ops::data;

/// Rows widened at a time: 64 rows of 2048 f32 are 512 KiB, within a core's L2.
const TILE: usize = 64;
/// Rows per partial sum of `∂W` (at least; more for very tall inputs, at most 64 partials).
const CHUNK: usize = 512;

/// A half-precision element: widening to f32 and rounding back.
pub(crate) trait Half: WithDType + bytemuck::Pod {
    /// `dst = f32(src)` (exact).
    fn widen(src: &[Self], dst: &mut [f32]);
    /// `dst = h(src)`, round to nearest even (NaN stays NaN).
    fn narrow(src: &[f32], dst: &mut [Self]);
}

/// f32 -> bf16, round to nearest even, without branches (so that the loop vectorises); the same
/// bits as `bf16::from_f32` for every input (NaNs keep their top mantissa bits and become quiet).
#[inline(always)]
pub(crate) fn bf16_round(x: f32) -> bf16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16;
    let quiet_nan = ((b >> 16) as u16) | 0x40;
    let is_nan = (b & 0x7FFF_FFFF) > 0x7F80_0000;
    bf16::from_bits(if is_nan { quiet_nan } else { rounded })
}

impl Half for bf16 {
    fn widen(src: &[bf16], dst: &mut [f32]) {
        // A bf16's bits are the f32's top half: exact, and one unpack per vector.
        for (d, &v) in dst.iter_mut().zip(src) {
            *d = f32::from_bits(u32::from(v.to_bits()) << 16);
        }
    }
    fn narrow(src: &[f32], dst: &mut [bf16]) {
        for (d, &v) in dst.iter_mut().zip(src) {
            *d = bf16_round(v);
        }
    }
}

impl Half for f16 {
    fn widen(src: &[f16], dst: &mut [f32]) {
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(src, dst);
    }
    fn narrow(src: &[f32], dst: &mut [f16]) {
        half::slice::HalfFloatSliceExt::convert_from_f32_slice(dst, src);
    }
}

/// `n` zeros from a zeroed allocation (no fill pass).
fn zeros<H: Half>(n: usize) -> Vec<H> {
    bytemuck::allocation::cast_vec(vec![0u16; n])
}

/// `h(f32(x) f32(w))` for row-major `x` `[m, k]` and `w` `[k, n]`.
fn tall_matmul<H: Half>(x: &[H], w: &[H], (m, k, n): (usize, usize, usize)) -> Vec<H> {
    let mut out = zeros::<H>(m * n);
    if m == 0 || k == 0 || n == 0 {
        return out;
    }
    let mut w32 = vec![0f32; k * n];
    H::widen(w, &mut w32);
    let w32 = MatRef::from_row_major_slice(&w32, k, n);
    out.par_chunks_mut(TILE * n)
        .zip(x.par_chunks(TILE * k))
        .for_each_init(
            || (Vec::new(), Vec::new()),
            |(xb, yb): &mut (Vec<f32>, Vec<f32>), (y, xs)| {
                let r = xs.len() / k;
                xb.resize(r * k, 0.0);
                yb.resize(r * n, 0.0);
                H::widen(xs, xb);
                matmul(
                    MatMut::from_row_major_slice_mut(yb, r, n),
                    Accum::Replace,
                    MatRef::from_row_major_slice(xb, r, k),
                    w32,
                    1.0,
                    Par::Seq,
                );
                H::narrow(yb, y);
            },
        );
    out
}

/// `h(f32(x)ᵀ f32(g))` `[k, n]` for row-major `x` `[m, k]` and `g` `[m, n]`.
fn tall_gram<H: Half>(x: &[H], g: &[H], (m, k, n): (usize, usize, usize)) -> Vec<H> {
    let mut out = zeros::<H>(k * n);
    if m == 0 || k == 0 || n == 0 {
        return out;
    }
    let chunk = CHUNK.max(m.div_ceil(64));
    let parts: Vec<Vec<f32>> = x
        .par_chunks(chunk * k)
        .zip(g.par_chunks(chunk * n))
        .map(|(xs, gs)| {
            let mut acc = vec![0f32; k * n];
            let (mut xb, mut gb) = (Vec::new(), Vec::new());
            for (xt, gt) in xs.chunks(TILE * k).zip(gs.chunks(TILE * n)) {
                let r = xt.len() / k;
                xb.resize(r * k, 0.0);
                gb.resize(r * n, 0.0);
                H::widen(xt, &mut xb);
                H::widen(gt, &mut gb);
                matmul(
                    MatMut::from_row_major_slice_mut(&mut acc, k, n),
                    Accum::Add,
                    MatRef::from_row_major_slice(&xb, r, k).transpose(),
                    MatRef::from_row_major_slice(&gb, r, n),
                    1.0,
                    Par::Seq,
                );
            }
            acc
        })
        .collect();
    let mut sum = vec![0f32; k * n];
    for p in parts {
        for (s, v) in sum.iter_mut().zip(p) {
            *s += v;
        }
    }
    H::narrow(&sum, &mut out);
    out
}

/// The two products, by which operand is summed over.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// `X W`: `[m, k] x [k, n]`.
    Product,
    /// `Xᵀ G`: `[m, k]ᵀ x [m, n]` (the weight's gradient; no backward of its own).
    Gram,
}

struct HalfTall(Kind);

/// `[rows, cols]` of a rank-2 layout.
fn dims2(l: &Layout, op: &str) -> candle_core::Result<(usize, usize)> {
    match l.dims() {
        &[r, c] => Ok((r, c)),
        d => candle_core::bail!("{op}: expected a matrix, got shape {d:?}"),
    }
}

impl HalfTall {
    fn run<H: Half>(
        &self,
        a: &CpuStorage,
        a_l: &Layout,
        b: &CpuStorage,
        b_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let op = self.name();
        let ((ar, ac), (br, bc)) = (dims2(a_l, op)?, dims2(b_l, op)?);
        let (a, b) = (data::<H>(a, a_l, op)?, data::<H>(b, b_l, op)?);
        let (out, shape) = match self.0 {
            Kind::Product if ac == br => (tall_matmul(a, b, (ar, ac, bc)), (ar, bc)),
            Kind::Gram if ar == br => (tall_gram(a, b, (ar, ac, bc)), (ac, bc)),
            _ => candle_core::bail!("{op}: shapes [{ar}, {ac}] and [{br}, {bc}] do not fit"),
        };
        Ok((H::to_cpu_storage_owned(out), Shape::from(shape)))
    }
}

impl CustomOp2 for HalfTall {
    fn name(&self) -> &'static str {
        match self.0 {
            Kind::Product => "half-tall-matmul",
            Kind::Gram => "half-tall-gram",
        }
    }

    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        a_l: &Layout,
        b: &CpuStorage,
        b_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        reprpo_kernels::ran_cpu_kernel(self.name());
        match (a, b) {
            (CpuStorage::BF16(_), CpuStorage::BF16(_)) => self.run::<bf16>(a, a_l, b, b_l),
            (CpuStorage::F16(_), CpuStorage::F16(_)) => self.run::<f16>(a, a_l, b, b_l),
            _ => candle_core::bail!("{}: needs bf16 or f16 inputs of one dtype", self.name()),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        if let Kind::Gram = self.0 {
            candle_core::bail!("half-tall-gram: no backward (it is itself a gradient)");
        }
        let g = g.contiguous()?;
        let dx = if x.track_op() {
            let wt = w.t()?.contiguous()?;
            Some(g.apply_op2_no_bwd(&wt, &HalfTall(Kind::Product))?)
        } else {
            None
        };
        let dw = if w.track_op() {
            Some(x.apply_op2_no_bwd(&g, &HalfTall(Kind::Gram))?)
        } else {
            None
        };
        Ok((dx, dw))
    }
}

/// Whether [`matmul_tall`] applies: `x` in bf16 or f16 on the CPU, outside `written_out`.
pub(crate) fn applies(x: &Tensor) -> bool {
    matches!(x.dtype(), DType::BF16 | DType::F16) && reprpo_kernels::fused_cpu(x.device())
}

/// `x w` for `x` `[m, k]` and `w` `[k, n]` of one half-precision dtype (module docs),
/// differentiable in both.
pub(crate) fn matmul_tall(x: &Tensor, w: &Tensor) -> crate::error::Result<Tensor> {
    Ok(x.contiguous()?
        .apply_op2(&w.contiguous()?, HalfTall(Kind::Product))?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use candle_core::{Device, Var};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    #[test]
    fn bf16_round_is_half_from_f32_bit_for_bit() {
        let mut bits: Vec<u32> = (0..=u32::MAX).step_by(4099).collect();
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..20_000 {
            let top = rng.random::<u32>() & 0xFFFF_0000;
            // Ties (both parities), just below and just above a tie, and the extremes.
            bits.extend([0x8000, 0x7FFF, 0x8001, 0, 0xFFFF].map(|lo| top | lo));
        }
        bits.extend([
            0x7F80_0000,
            0xFF80_0000,
            0x7F80_0001,
            0x7FC0_0000,
            0xFFFF_FFFF,
        ]);
        bits.extend([0x7F7F_FFFF, 0x8000_0000, 0x0000_0001, 0x007F_FFFF]);
        for b in bits {
            let x = f32::from_bits(b);
            assert_eq!(
                bf16_round(x).to_bits(),
                bf16::from_f32(x).to_bits(),
                "{b:#010x}"
            );
        }
    }

    /// `n` values of `N(0, 1)`-ish spread, exactly representable in `dtype`.
    fn rand_half(rng: &mut StdRng, shape: (usize, usize), dtype: DType) -> Tensor {
        let v: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| rng.random::<f32>() * 4.0 - 2.0)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    fn f64_rows(t: &Tensor) -> Vec<Vec<f64>> {
        t.to_dtype(DType::F64).unwrap().to_vec2().unwrap()
    }

    /// `a b` in f64 with `Σ |a||b|` per entry (the scale of the f32 summation error).
    fn product(a: &[Vec<f64>], b: &[Vec<f64>]) -> Vec<Vec<(f64, f64)>> {
        a.iter()
            .map(|row| {
                (0..b[0].len())
                    .map(|j| {
                        let terms = row.iter().zip(b).map(|(x, r)| (x * r[j], (x * r[j]).abs()));
                        terms.fold((0.0, 0.0), |(s, a), (v, av)| (s + v, a + av))
                    })
                    .collect()
            })
            .collect()
    }

    fn transpose(a: &[Vec<f64>]) -> Vec<Vec<f64>> {
        (0..a[0].len())
            .map(|j| a.iter().map(|r| r[j]).collect())
            .collect()
    }

    /// Every entry within one rounding to `dtype` (unit roundoff `u`) of the f64 value, plus
    /// the f32 summation's error bound.
    fn check(got: &Tensor, want: &[Vec<(f64, f64)>], dtype: DType, what: &str) {
        let u = if dtype == DType::BF16 {
            2f64.powi(-8)
        } else {
            2f64.powi(-11)
        };
        let got = f64_rows(got);
        assert_eq!(got.len(), want.len(), "{what}: rows");
        for (i, (gr, wr)) in got.iter().zip(want).enumerate() {
            assert_eq!(gr.len(), wr.len(), "{what}: columns");
            for (j, (&g, &(w, scale))) in gr.iter().zip(wr).enumerate() {
                let tol = u * w.abs() + 1e-6 * scale + 1e-30;
                assert!(
                    (g - w).abs() <= tol,
                    "{what}[{i},{j}]: {g} vs {w} (tol {tol})"
                );
            }
        }
    }

    /// Forward and both gradients against f64, for tall-times-narrow (ETHER's down-projection)
    /// and narrow-times-wide (its up-projection) shapes, with a row count that leaves a partial
    /// tile and spans several partial sums of the weight's gradient.
    #[test]
    fn product_and_gradients_match_f64() {
        let mut rng = StdRng::seed_from_u64(3);
        for dtype in [DType::BF16, DType::F16] {
            for (m, k, n) in [(150, 70, 5), (1300, 33, 6), (1300, 5, 70), (7, 3, 2)] {
                let x = Var::from_tensor(&rand_half(&mut rng, (m, k), dtype)).unwrap();
                let w = Var::from_tensor(&rand_half(&mut rng, (k, n), dtype)).unwrap();
                let c = rand_half(&mut rng, (m, n), dtype);
                let ((y, grads), ran) = reprpo_kernels::trace_cpu_kernels(|| {
                    let y = matmul_tall(x.as_tensor(), w.as_tensor()).unwrap();
                    let loss = (y.to_dtype(DType::F32).unwrap() * c.to_dtype(DType::F32).unwrap())
                        .unwrap()
                        .sum_all()
                        .unwrap();
                    (y, loss.backward().unwrap())
                });
                assert!(ran.contains(&"half-tall-matmul") && ran.contains(&"half-tall-gram"));
                let (xs, ws, cs) = (
                    f64_rows(x.as_tensor()),
                    f64_rows(w.as_tensor()),
                    f64_rows(&c),
                );
                let what = format!("{dtype:?} {m}x{k}x{n}");
                check(&y, &product(&xs, &ws), dtype, &format!("{what} y"));
                let dx = grads.get(x.as_tensor()).unwrap();
                check(
                    dx,
                    &product(&cs, &transpose(&ws)),
                    dtype,
                    &format!("{what} dx"),
                );
                let dw = grads.get(w.as_tensor()).unwrap();
                check(
                    dw,
                    &product(&transpose(&xs), &cs),
                    dtype,
                    &format!("{what} dw"),
                );
            }
        }
    }

    /// The weight's gradient is the same bits on one thread as on several (fixed partial sums).
    #[test]
    fn gram_does_not_depend_on_the_thread_count() {
        let mut rng = StdRng::seed_from_u64(5);
        let x = rand_half(&mut rng, (2000, 40), DType::BF16);
        let g = rand_half(&mut rng, (2000, 3), DType::BF16);
        let on = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let t = x.apply_op2_no_bwd(&g, &HalfTall(Kind::Gram)).unwrap();
                t.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap()
            })
        };
        assert_eq!(on(1), on(4));
    }

    #[test]
    fn mismatched_shapes_are_an_error() {
        let mut rng = StdRng::seed_from_u64(1);
        let x = rand_half(&mut rng, (10, 4), DType::BF16);
        let w = rand_half(&mut rng, (5, 3), DType::BF16);
        let err = matmul_tall(&x, &w).unwrap_err().to_string();
        assert!(err.contains("do not fit"), "{err}");
        let w16 = rand_half(&mut rng, (4, 3), DType::F16);
        assert!(matmul_tall(&x, &w16).is_err());
    }
}
