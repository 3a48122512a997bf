//! `cargo xtask doctor [--device cpu|cuda:N]`: a self-check of every computation a training or
//! evaluation step runs.
//!
//! Each check is a function of a device that builds its inputs from a fixed seed (on the host,
//! then copied, so every device sees the same numbers), runs one computation and returns named
//! tensors: outputs and gradients. The doctor runs it twice and compares:
//! - `--device cpu`: the fused CPU kernels against the written-out candle ops (the same function
//!   under [`reprpo_kernels::written_out`]), so a CPU-only build checks its kernels;
//! - `--device cuda:N`: the device against the CPU (fused kernels), with the same inputs.
//!
//! The error of one tensor is `max |a - b| / max |b|` (`b` the CPU / fused reference, at least
//! 1e-6 in the denominator): a relative error against the tensor's scale, robust to entries near
//! zero. A check's error is the worst of its tensors; the bound depends on the dtype the check
//! computes in ([`bound`]). Token outputs (greedy generation) must be equal.
//!
//! The areas live in their own files: [`models`] (forwards, adapter backward, checkpointing,
//! log-probabilities, generation), [`losses`] (DPO types, ReprPO variants), [`optim`] (AdamW,
//! clipping, the batched inverse).

mod inputs;
mod losses;
mod models;
mod optim;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use clap::Args;

/// Named tensors a check returns (outputs and gradients).
pub(crate) type Outputs = Vec<(String, Tensor)>;

/// A check's computation on a device.
pub(crate) type CheckFn = Box<dyn Fn(&Device) -> Result<Outputs>>;

/// One check: a name, the dtype it computes in, and the computation.
pub(crate) struct Check {
    /// `area.what.variant.dtype`, e.g. `models.llama.forward.left.f32`.
    pub name: String,
    /// The compute dtype (sets the bound).
    pub dtype: DType,
    /// Integer outputs that must be equal (bound 0), e.g. generated tokens.
    pub exact: bool,
    /// The computation on a device.
    pub run: CheckFn,
}

impl Check {
    pub(crate) fn new(
        name: impl Into<String>,
        dtype: DType,
        run: impl Fn(&Device) -> Result<Outputs> + 'static,
    ) -> Self {
        Check {
            name: name.into(),
            dtype,
            exact: false,
            run: Box::new(run),
        }
    }

    pub(crate) fn exact(mut self) -> Self {
        self.exact = true;
        self
    }
}

/// The relative error bound of a check computing in `dtype`: f32 and f64 1e-4; bf16 and f16 5e-2
/// (bf16 keeps 8 significant bits, about 4e-3 per rounding; a few layers of a model forward and
/// backward in bf16 accumulate several roundings, and the paths round at different places).
pub(crate) fn bound(dtype: DType, exact: bool) -> f64 {
    if exact {
        return 0.0;
    }
    match dtype {
        DType::BF16 | DType::F16 => 5e-2,
        _ => 1e-4,
    }
}

/// Arguments of `doctor`.
#[derive(Args)]
pub struct DoctorArgs {
    /// The device to check: `cpu` (fused kernels against the written-out ops) or `cuda:N`
    /// (the device against the CPU).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Run only the checks whose name contains this text.
    #[arg(long)]
    pub only: Option<String>,
    /// List the checks and exit.
    #[arg(long)]
    pub list: bool,
}

/// The gradient of `v` in `grads` as a named output, zeros where none reached it (a loss that
/// ignores an input, e.g. `rr-only`'s retain side, may or may not record a zero gradient).
pub(crate) fn grad_or_zero(
    grads: &candle_core::backprop::GradStore,
    v: &candle_core::Var,
    name: &str,
) -> Result<(String, Tensor)> {
    let t = match grads.get(v.as_tensor()) {
        Some(t) => t.clone(),
        None => v.as_tensor().zeros_like()?,
    };
    Ok((format!("grad.{name}"), t))
}

/// Every check, in order.
pub(crate) fn all_checks() -> Vec<Check> {
    let mut v = models::checks();
    v.extend(losses::checks());
    v.extend(optim::checks());
    v
}

/// The result of one check.
#[derive(serde::Serialize)]
struct Row {
    check: String,
    dtype: String,
    /// Worst relative error (NaN when the check failed to run).
    max_error: f64,
    /// The tensor with the worst error.
    worst: String,
    bound: f64,
    ok: bool,
    /// Seconds for the checked side (the device, or the written-out ops on the CPU).
    seconds: f64,
    /// The error message when a side failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Run the checks and print the table; exits non-zero (an error) when any check fails.
pub fn run(a: DoctorArgs) -> Result<()> {
    let checks: Vec<Check> = all_checks()
        .into_iter()
        .filter(|c| a.only.as_deref().is_none_or(|o| c.name.contains(o)))
        .collect();
    if a.list {
        for c in &checks {
            println!("{}", c.name);
        }
        return Ok(());
    }
    if checks.is_empty() {
        bail!("--only: no check matches");
    }
    let device = crate::bench::parse_device(&a.device)?;
    let mode = if device.is_cpu() {
        "fused CPU kernels vs written-out ops"
    } else {
        "device vs CPU"
    };
    println!("doctor: {} checks on {} ({mode})", checks.len(), a.device);
    println!(
        "{:<52} {:>10} {:>8} {:>4} {:>8}",
        "check", "max error", "bound", "ok", "time s"
    );
    let mut rows = Vec::with_capacity(checks.len());
    for c in &checks {
        let row = run_one(c, &device);
        print_row(&row);
        rows.push(row);
    }
    let failed: Vec<&str> = rows
        .iter()
        .filter(|r| !r.ok)
        .map(|r| r.check.as_str())
        .collect();
    if let Some(path) = &a.json {
        let doc = serde_json::json!({
            "device": a.device, "mode": mode, "checks": rows.len(), "failed": failed,
            "rows": rows,
        });
        reprpo_train::run::write_atomic(path, serde_json::to_string_pretty(&doc)?.as_bytes())?;
    }
    if failed.is_empty() {
        println!("doctor: all {} checks passed", rows.len());
        Ok(())
    } else {
        bail!(
            "doctor: {} of {} checks failed: {}",
            failed.len(),
            rows.len(),
            failed.join(", ")
        )
    }
}

fn print_row(r: &Row) {
    let err = if r.max_error.is_nan() {
        "-".to_string()
    } else {
        format!("{:.2e}", r.max_error)
    };
    println!(
        "{:<52} {:>10} {:>8.0e} {:>4} {:>8.3}",
        r.check,
        err,
        r.bound,
        if r.ok { "ok" } else { "FAIL" },
        r.seconds
    );
    if let Some(e) = &r.error {
        println!("    error: {e}");
    } else if !r.ok {
        println!("    worst: {}", r.worst);
    }
}

/// Run `c` on the reference side (CPU, fused kernels) and the checked side, and compare.
fn run_one(c: &Check, device: &Device) -> Row {
    let bound = bound(c.dtype, c.exact);
    let mut row = Row {
        check: c.name.clone(),
        dtype: format!("{:?}", c.dtype).to_lowercase(),
        max_error: f64::NAN,
        worst: String::new(),
        bound,
        ok: false,
        seconds: 0.0,
        error: None,
    };
    let reference = (c.run)(&Device::Cpu).context("reference side (CPU, fused kernels)");
    let t0 = Instant::now();
    let checked = if device.is_cpu() {
        reprpo_kernels::written_out(|| (c.run)(device)).context("written-out ops")
    } else {
        (c.run)(device)
            .and_then(|o| {
                device.synchronize()?;
                Ok(o)
            })
            .context("device side")
    };
    row.seconds = t0.elapsed().as_secs_f64();
    match reference.and_then(|r| Ok((r, checked?))) {
        Err(e) => row.error = Some(format!("{e:#}")),
        Ok((r, d)) => match compare(&r, &d) {
            Err(e) => row.error = Some(format!("{e:#}")),
            Ok((err, worst)) => {
                row.max_error = err;
                row.worst = worst;
                row.ok = err <= bound;
            }
        },
    }
    row
}

/// The worst relative error over the named tensors of two runs (see the module docs), and the
/// name of the tensor where it is.
fn compare(reference: &Outputs, checked: &Outputs) -> Result<(f64, String)> {
    if reference.len() != checked.len() {
        bail!(
            "the two sides returned {} and {} tensors",
            reference.len(),
            checked.len()
        );
    }
    let mut worst = (0.0f64, String::new());
    for ((name, r), (name2, d)) in reference.iter().zip(checked) {
        if name != name2 || r.dims() != d.dims() {
            bail!(
                "tensor {name} {:?} against {name2} {:?}",
                r.dims(),
                d.dims()
            );
        }
        let r = r.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
        let d = d.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
        let diff = max_abs(&(&d - &r)?)?;
        let scale = max_abs(&r)?.max(1e-6);
        let e = diff / scale;
        // NaN anywhere fails the check (NaN compares false with the bound).
        let e = if d
            .flatten_all()?
            .to_vec1::<f64>()?
            .iter()
            .any(|x| !x.is_finite())
        {
            f64::NAN
        } else {
            e
        };
        if e.is_nan() || e > worst.0 || worst.1.is_empty() {
            worst = (e, name.clone());
            if e.is_nan() {
                break;
            }
        }
    }
    Ok(worst)
}

fn max_abs(t: &Tensor) -> Result<f64> {
    if t.elem_count() == 0 {
        return Ok(0.0);
    }
    Ok(t.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    #[test]
    fn compare_measures_relative_error_and_fails_on_nan_and_shape() {
        let a: Outputs = vec![("x".into(), t(&[1.0, -2.0, 4.0])), ("y".into(), t(&[0.5]))];
        assert_eq!(compare(&a, &a).unwrap().0, 0.0);
        // 1e-3 off on the largest entry of `y` relative to its scale 0.5.
        let b: Outputs = vec![
            ("x".into(), t(&[1.0, -2.0, 4.0])),
            ("y".into(), t(&[0.5005])),
        ];
        let (e, worst) = compare(&a, &b).unwrap();
        assert!((e - 1e-3).abs() < 1e-6, "{e}");
        assert_eq!(worst, "y");
        assert!(e > bound(DType::F32, false));
        let nan: Outputs = vec![
            ("x".into(), t(&[1.0, f32::NAN, 4.0])),
            ("y".into(), t(&[0.5])),
        ];
        let (e, worst) = compare(&a, &nan).unwrap();
        assert!(e.is_nan() && worst == "x");
        let short: Outputs = vec![("x".into(), t(&[1.0, -2.0]))];
        assert!(compare(&a, &short).is_err());
    }

    #[test]
    fn a_failing_side_is_a_failed_row() {
        let c = Check::new("broken", DType::F32, |dev: &Device| {
            if reprpo_kernels::is_written_out() {
                anyhow::bail!("boom")
            }
            Ok(vec![("x".into(), Tensor::new(&[1f32], dev)?)])
        });
        let row = run_one(&c, &Device::Cpu);
        assert!(!row.ok);
        assert!(row.error.unwrap().contains("boom"));
        let differs = Check::new("differs", DType::F32, |dev: &Device| {
            let v = if reprpo_kernels::is_written_out() {
                1.01f32
            } else {
                1.0
            };
            Ok(vec![("x".into(), Tensor::new(&[v], dev)?)])
        });
        let row = run_one(&differs, &Device::Cpu);
        assert!(
            !row.ok && (row.max_error - 0.01).abs() < 1e-6,
            "{}",
            row.max_error
        );
    }
}
