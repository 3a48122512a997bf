//! reprpo-kernels: the one place that decides whether a fused kernel runs.
//!
//! The models and losses crates have fused CPU kernels (custom ops with their own backward) next
//! to the written-out candle ops they are tested against. Each kernel asks [`fused_cpu`] before
//! it runs; the answer is "yes" for CPU tensors unless the calling thread is inside
//! [`written_out`], which makes every op on that thread take the written-out path, the path every
//! non-CPU device takes. `cargo xtask doctor --device cpu` runs each check both ways and compares;
//! on a GPU it compares the device with the CPU's fused kernels.
//!
//! The switch is per thread (a thread-local), so concurrent tests and jobs do not see each other's
//! choice. Kernels decide on the thread that calls the op (the job thread), including when a
//! gradient-checkpointed block is recomputed in backward, so one scope covers a whole step.
//!
//! Every custom op's CPU forward reports itself ([`ran_cpu_kernel`]); [`trace_cpu_kernels`]
//! collects those names for a closure. Tests use it to assert which custom ops a step would
//! run on another device: under [`written_out`], only ops that also have a CUDA forward.
//!
//! [`simd`] holds the exponential and the softmax row loops the fused kernels share, in explicit
//! SIMD chosen at run time.
//!
//! # Example
//!
//! ```
//! use candle_core::Device;
//! use reprpo_kernels::{fused_cpu, written_out};
//!
//! assert!(fused_cpu(&Device::Cpu));
//! // Inside the scope every op on this thread takes the written-out path.
//! assert!(!written_out(|| fused_cpu(&Device::Cpu)));
//! assert!(fused_cpu(&Device::Cpu));
//! ```

pub mod simd;

use std::cell::{Cell, RefCell};

use candle_core::Device;

thread_local! {
    static WRITTEN_OUT: Cell<bool> = const { Cell::new(false) };
    static TRACE: RefCell<Option<Vec<&'static str>>> = const { RefCell::new(None) };
}

/// Called by each custom op's CPU forward with its name; recorded inside
/// [`trace_cpu_kernels`], otherwise a thread-local read and nothing else.
pub fn ran_cpu_kernel(name: &'static str) {
    TRACE.with(|t| {
        if let Some(v) = t.borrow_mut().as_mut() {
            v.push(name);
        }
    });
}

/// Run `f` and return, with its result, the names of the custom ops whose CPU forward ran on
/// this thread meanwhile, in order (with repeats). Nested calls see only their own ops.
pub fn trace_cpu_kernels<R>(f: impl FnOnce() -> R) -> (R, Vec<&'static str>) {
    struct Restore(Option<Vec<&'static str>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let prev = self.0.take();
            TRACE.with(|t| *t.borrow_mut() = prev);
        }
    }
    let restore = Restore(TRACE.with(|t| t.borrow_mut().replace(Vec::new())));
    let r = f();
    let seen = TRACE.with(|t| t.borrow_mut().take()).unwrap_or_default();
    drop(restore);
    (r, seen)
}

/// Whether the fused CPU kernels may run for tensors on `device`: on the CPU, outside
/// [`written_out`]. Each kernel still checks its own dtypes and shapes.
pub fn fused_cpu(device: &Device) -> bool {
    device.is_cpu() && !WRITTEN_OUT.with(Cell::get)
}

/// Whether the calling thread is inside [`written_out`].
pub fn is_written_out() -> bool {
    WRITTEN_OUT.with(Cell::get)
}

/// Run `f` with every fused CPU kernel off on this thread: each op takes its written-out candle
/// form, as on a non-CPU device. Nested calls and panics restore the previous setting.
pub fn written_out<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            WRITTEN_OUT.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(WRITTEN_OUT.with(|c| c.replace(true)));
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_switches_and_restores() {
        let cpu = Device::Cpu;
        assert!(fused_cpu(&cpu));
        written_out(|| {
            assert!(!fused_cpu(&cpu));
            written_out(|| assert!(is_written_out()));
            assert!(is_written_out());
        });
        assert!(fused_cpu(&cpu));
        let r = std::panic::catch_unwind(|| written_out(|| panic!("inside")));
        assert!(r.is_err());
        assert!(
            fused_cpu(&cpu),
            "a panic inside the scope restores the setting"
        );
    }

    #[test]
    fn traces_nest_and_record_only_inside() {
        ran_cpu_kernel("outside");
        let ((), outer) = trace_cpu_kernels(|| {
            ran_cpu_kernel("a");
            let ((), inner) = trace_cpu_kernels(|| ran_cpu_kernel("b"));
            assert_eq!(inner, ["b"]);
            ran_cpu_kernel("c");
        });
        assert_eq!(outer, ["a", "c"]);
    }

    #[test]
    fn other_threads_are_unaffected() {
        written_out(|| {
            let seen = std::thread::spawn(|| fused_cpu(&Device::Cpu)).join();
            assert!(matches!(seen, Ok(true)));
        });
    }
}
