//! Replays every committed fuzz input (`regressions/<target>/*`: the crashers the fuzzers found,
//! and a few small seeds) through the same harness `cargo fuzz` runs, under plain stable
//! `cargo test`: no input may panic, and none may make the reader allocate more than its length
//! justifies.
//!
//! The allocation bound is checked with a counting global allocator: the peak of live heap bytes
//! during one input, above what was live before it, must stay under
//! `64 MiB + 1000 x input length`. The constant covers the fixed costs a harness pays whatever
//! the input (a temporary folder, the base model of the adapter target, a minijinja environment,
//! a small model a config describes); the factor covers what a reader legitimately builds from
//! each input byte: a JSON row becomes a map of `serde_json::Value`s (tens of bytes per input
//! byte), and gzip inflates at most about 1032 : 1. A reader that sizes a buffer from a length
//! read in a header (a llama2.c dimension, a safetensors header size, a Parquet page size)
//! without checking it against the file breaks this bound by orders of magnitude, which is what
//! this test is for. Chat templates get 256 MiB more (`reprpo_fuzz::extra_bytes`): a template is
//! a program, and minijinja builds strings of up to 100 MB for it.

#![allow(unsafe_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![cfg_attr(feature = "libfuzzer", allow(dead_code))]

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The system allocator, counting live bytes and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let now = LIVE.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every call is forwarded unchanged to `System`; the counters do not allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's pointer and layout.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded with the caller's pointer, layout and size.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size());
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

// With the `libfuzzer` feature the library brings its own (budget) allocator; the counts here
// then stay 0 and only the panic check is meaningful. CI builds without the feature.
#[cfg(not(feature = "libfuzzer"))]
#[global_allocator]
static ALLOC: Counting = Counting;

/// The most heap one input may add (see the module docs).
fn allowed(len: usize) -> usize {
    reprpo_fuzz::allowed_bytes(len)
}

fn regressions() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("regressions")
}

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// One test for all targets: they share the counters, so inputs must not run in parallel.
#[test]
fn every_committed_input_reads_without_panic_or_outsized_allocation() {
    let root = regressions();
    let mut dirs: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    dirs.sort();
    for d in &dirs {
        assert!(
            reprpo_fuzz::TARGETS.contains(&d.as_str()),
            "regressions/{d}: no such target (known: {:?})",
            reprpo_fuzz::TARGETS
        );
    }
    let mut failures = Vec::new();
    for target in reprpo_fuzz::TARGETS {
        // The largest peak of the target's inputs, for `--nocapture`.
        let mut largest = (0usize, 0usize);
        let files = inputs(&root.join(target));
        assert!(
            !files.is_empty(),
            "regressions/{target}: every target keeps at least one seed"
        );
        for f in files {
            let data = std::fs::read(&f).unwrap();
            let before = LIVE.load(Ordering::Relaxed);
            PEAK.store(before, Ordering::Relaxed);
            let ran = std::panic::catch_unwind(|| reprpo_fuzz::run_target(target, &data));
            let peak = PEAK.load(Ordering::Relaxed).saturating_sub(before);
            let name = f.strip_prefix(&root).unwrap_or(&f).display().to_string();
            match ran {
                Ok(true) => {}
                Ok(false) => failures.push(format!("{name}: unknown target")),
                Err(_) => failures.push(format!("{name}: panicked")),
            }
            largest = largest.max((peak, data.len()));
            let allowed = allowed(data.len()) + reprpo_fuzz::extra_bytes(target);
            if peak > allowed {
                failures.push(format!(
                    "{name}: allocated {peak} bytes at peak for a {}-byte input (allowed {allowed})",
                    data.len(),
                ));
            }
        }
        eprintln!(
            "{target}: largest peak {} KiB (a {}-byte input)",
            largest.0 / 1024,
            largest.1
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The part splitting multi-file targets use.
#[test]
fn parts_split_at_the_separator_and_pad_with_empty_parts() {
    let joined = reprpo_fuzz::join_parts(&[b"a", b"bc"]);
    assert_eq!(reprpo_fuzz::parts::<2>(&joined), [&b"a"[..], &b"bc"[..]]);
    assert_eq!(
        reprpo_fuzz::parts::<3>(&joined),
        [&b"a"[..], &b"bc"[..], &b""[..]]
    );
    assert_eq!(reprpo_fuzz::parts::<1>(&joined), [&joined[..]]);
}

/// `fuzz/` has one libFuzzer target per harness, each calling it, and a `[[bin]]` for it.
#[test]
fn every_harness_has_a_cargo_fuzz_target() {
    let fuzz = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let manifest = std::fs::read_to_string(fuzz.join("Cargo.toml")).unwrap();
    let mut files: Vec<String> = std::fs::read_dir(fuzz.join("fuzz_targets"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    let mut expected: Vec<String> = reprpo_fuzz::TARGETS
        .iter()
        .map(|t| format!("{t}.rs"))
        .collect();
    expected.sort();
    assert_eq!(files, expected);
    for t in reprpo_fuzz::TARGETS {
        let src = std::fs::read_to_string(fuzz.join(format!("fuzz_targets/{t}.rs"))).unwrap();
        assert!(
            src.contains(&format!("reprpo_fuzz::{t}(d)")),
            "fuzz_targets/{t}.rs must call reprpo_fuzz::{t}"
        );
        assert!(
            manifest.contains(&format!("name = \"{t}\"\npath = \"fuzz_targets/{t}.rs\"")),
            "fuzz/Cargo.toml has no [[bin]] for {t}"
        );
    }
}

/// The Parquet file on which the `parquet` crate panics (a dictionary page that declares no
/// values: a division by zero inside the decoder) is a `Malformed` error naming the file.
#[test]
fn a_parquet_decoder_panic_is_a_malformed_file_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.parquet");
    std::fs::copy(
        regressions()
            .join("table_parquet/crash-dictionary-page-without-values-divides-by-zero.parquet"),
        &path,
    )
    .unwrap();
    let err = reprpo_data::read_table(&path).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            reprpo_data::DataError::Malformed {
                format: "Parquet",
                ..
            }
        ),
        "{msg}"
    );
    assert!(msg.contains("bad.parquet"), "{msg}");
    assert!(msg.contains("the Parquet decoder failed"), "{msg}");
}
