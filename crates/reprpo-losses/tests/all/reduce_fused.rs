//! The fused CPU kernel of the methods' token reduction (`methods::reduce`: `reduce_tokens`, and
//! `reduce_log_softmax_tokens` for the `rank` loss) against the written-out chain of candle ops it
//! replaces (`reduce_tokens_unfused`, `reduce_log_softmax_tokens_unfused`; that chain is checked
//! against the reference project by `reduce_reference.rs` and the method fixtures), on seeded
//! inputs with left and right padding, planted high-norm "sink" tokens, a row whose only real
//! token is a sink (no counted token: NaN, as the chain and the reference give), fractional mask
//! weights, and `T = 1` (no standard deviation: nothing filtered).
//!
//! - f64: fused against the chain elementwise within 1e-11 relative to each tensor's largest
//!   entry: outputs and the gradient of `sum(out * w)`.
//! - f32: the fused kernel against the chain in f64 on the same f32 inputs within 1e-5 (the f32
//!   chain's own error is printed beside it).
//! - bf16 / f16: the fused kernel on rounded inputs against the f32 chain on the same rounded
//!   inputs: the kernel accumulates in f32 and rounds once, so within 2u of the largest entry
//!   (`u` = 2^-8 for bf16, 2^-11 for f16).
//! - The filter's decisions are the chain's: every token norm of the inputs is checked to be at
//!   least 1e-4 (relative) from its row's threshold, so f32 rounding cannot flip one.
//! - Under `reprpo_kernels::written_out` the chain runs (the fused op is not traced), and the CPU
//!   path traces `sink-token-mean`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use candle_core::{DType, Device, Tensor, Var};
use reprpo_losses::methods::reduce::{
    SINK_THRESHOLD, reduce_log_softmax_tokens, reduce_log_softmax_tokens_unfused, reduce_tokens,
    reduce_tokens_unfused,
};

/// A small seeded generator (xorshift64*), roughly normal values.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let v = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        (v >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
    fn normal(&mut self) -> f64 {
        (0..4).map(|_| self.next()).sum::<f64>() * 0.866
    }
}

type Fn2 = fn(&Tensor, &Tensor) -> reprpo_losses::Result<Tensor>;

/// One case: activations `[B, T, H]` (f64 on the host), the mask `[B, T]`, the weights `w`
/// `[B, H]` of the scalar `sum(out * w)`.
struct Case {
    name: &'static str,
    dims: (usize, usize, usize),
    x: Vec<f64>,
    mask: Vec<f64>,
    w: Vec<f64>,
}

fn case(name: &'static str, (b, t, h): (usize, usize, usize), seed: u64) -> Case {
    let mut rng = Rng(seed);
    let mut x: Vec<f64> = (0..b * t * h).map(|_| rng.normal()).collect();
    let mut mask = vec![0f64; b * t];
    for bi in 0..b {
        let pad_left = bi * t / (4 * b);
        let pad_right = if bi % 2 == 1 { bi * t / (3 * b) } else { 0 };
        for ti in pad_left..t - pad_right {
            mask[bi * t + ti] = 1.0;
        }
        // A planted sink: the first real token, scaled up.
        if t > 2 {
            for v in &mut x[(bi * t + pad_left) * h..(bi * t + pad_left + 1) * h] {
                *v *= 6.0;
            }
        }
    }
    if b > 2 && t > 2 {
        // Example 2: fractional weights on its real tokens.
        for ti in 0..t {
            mask[2 * t + ti] *= 0.25 + 0.5 * (ti % 3) as f64;
        }
    }
    if b > 3 && t > 2 {
        // Example 3: only the sink is real -> no counted token (NaN row).
        for ti in 0..t {
            mask[3 * t + ti] = 0.0;
        }
        let pad_left = 3 * t / (4 * b);
        mask[3 * t + pad_left] = 1.0;
    }
    let w = (0..b * h).map(|_| rng.normal()).collect();
    Case {
        name,
        dims: (b, t, h),
        x,
        mask,
        w,
    }
}

fn cases() -> Vec<Case> {
    vec![
        case("4x24x40", (4, 24, 40), 11),
        case("5x17x9", (5, 17, 9), 12),
        case("2x64x256", (2, 64, 256), 13),
        case("3x1x16 (T = 1)", (3, 1, 16), 14),
        // Large enough for the threaded paths (>= 2^15 elements).
        case("4x40x300", (4, 40, 300), 15),
    ]
}

/// `y` of the case under `log_softmax` or not, then the smallest relative distance of a token
/// norm from its row's threshold (f64).
fn min_margin(c: &Case, log_softmax: bool) -> f64 {
    let (b, t, h) = c.dims;
    if t < 2 {
        return f64::INFINITY;
    }
    let mut worst = f64::INFINITY;
    for bi in 0..b {
        let g: Vec<f64> = (0..t)
            .map(|ti| {
                let row = &c.x[(bi * t + ti) * h..(bi * t + ti + 1) * h];
                let off = if log_softmax {
                    let mx = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    mx + row.iter().map(|v| (v - mx).exp()).sum::<f64>().ln()
                } else {
                    0.0
                };
                row.iter()
                    .map(|v| (v - off) * (v - off))
                    .sum::<f64>()
                    .sqrt()
            })
            .collect();
        let mu = g.iter().sum::<f64>() / t as f64;
        let sd = (g.iter().map(|v| (v - mu).powi(2)).sum::<f64>() / (t as f64 - 1.0)).sqrt();
        let thr = mu + SINK_THRESHOLD * sd;
        for v in g {
            worst = worst.min((v - thr).abs() / thr.abs());
        }
    }
    worst
}

fn tensor(v: &[f64], shape: &[usize], dt: DType) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dt)
        .unwrap()
}

/// `(out, d sum(out * w) / dx)` as f64 vectors (NaN kept), computing in `dt` from `x` rounded to
/// `x_dt` first.
fn run(c: &Case, f: Fn2, x_dt: DType, dt: DType) -> (Vec<f64>, Vec<f64>) {
    let (b, t, h) = c.dims;
    let x0 = tensor(&c.x, &[b, t, h], x_dt).to_dtype(dt).unwrap();
    let x = Var::from_tensor(&x0).unwrap();
    let mask = tensor(&c.mask, &[b, t], dt);
    let out = f(x.as_tensor(), &mask).unwrap();
    assert_eq!(out.dims(), [b, h], "{}", c.name);
    assert_eq!(out.dtype(), dt, "{}", c.name);
    // NaN rows do not enter the scalar (their weights are zeroed through `where`).
    let ok = out.eq(&out).unwrap();
    let prod = (&out * tensor(&c.w, &[b, h], dt)).unwrap();
    let loss = ok
        .where_cond(&prod, &prod.zeros_like().unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let g = grads.get(x.as_tensor()).unwrap();
    let v = |t: &Tensor| {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    };
    (v(&out), v(g))
}

/// Max |a - b| over the entries where `b` is finite, relative to max |b| there; the NaN
/// positions must agree (NaN gradients where an example has no counted token are compared only
/// for being NaN in both or in neither).
fn rel_err(what: &str, a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "{what}");
    let mut scale: f64 = 0.0;
    let mut err: f64 = 0.0;
    for (&x, &y) in a.iter().zip(b) {
        if y.is_nan() {
            assert!(x.is_nan(), "{what}: {x} where the chain gives NaN");
            continue;
        }
        assert!(!x.is_nan(), "{what}: NaN where the chain gives {y}");
        scale = scale.max(y.abs());
        err = err.max((x - y).abs());
    }
    if scale == 0.0 { err } else { err / scale }
}

const KINDS: [(&str, Fn2, Fn2); 2] = [
    ("reduce", reduce_tokens, reduce_tokens_unfused),
    (
        "log-softmax reduce",
        reduce_log_softmax_tokens,
        reduce_log_softmax_tokens_unfused,
    ),
];

#[test]
fn inputs_keep_the_filter_decisions_away_from_the_threshold() {
    for c in cases() {
        for (kind, ls) in [("reduce", false), ("log-softmax reduce", true)] {
            let m = min_margin(&c, ls);
            assert!(
                m > 1e-4,
                "{} {kind}: a token norm within {m:e} of its threshold",
                c.name
            );
        }
    }
}

#[test]
fn fused_equals_the_chain_in_f64() {
    for c in cases() {
        for (kind, fused, chain) in KINDS {
            let (o1, g1) = run(&c, fused, DType::F64, DType::F64);
            let (o2, g2) = run(&c, chain, DType::F64, DType::F64);
            let eo = rel_err(&format!("{} {kind} out", c.name), &o1, &o2);
            let eg = rel_err(&format!("{} {kind} grad", c.name), &g1, &g2);
            assert!(
                eo <= 1e-11 && eg <= 1e-11,
                "{} {kind}: out {eo:e}, grad {eg:e}",
                c.name
            );
        }
    }
}

#[test]
fn fused_f32_within_1e5_of_the_chain_in_f64() {
    for c in cases() {
        for (kind, fused, chain) in KINDS {
            let (o1, g1) = run(&c, fused, DType::F32, DType::F32);
            let (o2, g2) = run(&c, chain, DType::F32, DType::F64);
            let (o3, g3) = run(&c, chain, DType::F32, DType::F32);
            let eo = rel_err(&format!("{} {kind} out", c.name), &o1, &o2);
            let eg = rel_err(&format!("{} {kind} grad", c.name), &g1, &g2);
            let co = rel_err(&format!("{} {kind} chain out", c.name), &o3, &o2);
            let cg = rel_err(&format!("{} {kind} chain grad", c.name), &g3, &g2);
            eprintln!(
                "{} {kind}: fused f32 out {eo:.1e} grad {eg:.1e}; \
                 chain f32 out {co:.1e} grad {cg:.1e}",
                c.name
            );
            assert!(
                eo <= 1e-5 && eg <= 1e-5,
                "{} {kind}: out {eo:e}, grad {eg:e}",
                c.name
            );
        }
    }
}

#[test]
fn fused_half_precision_is_the_f32_result_rounded_once() {
    for (dt, u) in [(DType::BF16, 2f64.powi(-8)), (DType::F16, 2f64.powi(-11))] {
        for c in cases() {
            for (kind, fused, chain) in KINDS {
                let (o1, g1) = run(&c, fused, dt, dt);
                let (o2, g2) = run(&c, chain, dt, DType::F32);
                let eo = rel_err(&format!("{} {kind} {dt:?} out", c.name), &o1, &o2);
                let eg = rel_err(&format!("{} {kind} {dt:?} grad", c.name), &g1, &g2);
                assert!(
                    eo <= 2.0 * u && eg <= 2.0 * u,
                    "{} {kind} {dt:?}: out {eo:e}, grad {eg:e} (u = {u:e})",
                    c.name
                );
            }
        }
    }
}

#[test]
fn written_out_takes_the_chain_and_the_cpu_the_kernel() {
    let c = case("4x24x40", (4, 24, 40), 11);
    for (kind, fused, chain) in KINDS {
        let (cpu, seen) =
            reprpo_kernels::trace_cpu_kernels(|| run(&c, fused, DType::F32, DType::F32));
        assert!(seen.contains(&"sink-token-mean"), "{kind}: {seen:?}");
        let (wo, seen) = reprpo_kernels::trace_cpu_kernels(|| {
            reprpo_kernels::written_out(|| run(&c, fused, DType::F32, DType::F32))
        });
        assert!(!seen.contains(&"sink-token-mean"), "{kind}: {seen:?}");
        let want = run(&c, chain, DType::F32, DType::F32);
        assert_eq!(wo.0.len(), want.0.len());
        assert!(
            wo.0.iter()
                .zip(&want.0)
                .all(|(a, b)| a == b || (a.is_nan() && b.is_nan()))
        );
        assert!(rel_err(kind, &cpu.0, &want.0) <= 1e-5);
    }
}

#[test]
fn a_mask_that_does_not_match_is_an_error() {
    let x = Tensor::zeros((2, 5, 4), DType::F32, &Device::Cpu).unwrap();
    let m = Tensor::ones((2, 4), DType::F32, &Device::Cpu).unwrap();
    for (kind, fused, _) in KINDS {
        let e = fused(&x, &m).unwrap_err().to_string();
        assert!(e.contains("does not match"), "{kind}: {e}");
    }
}
