//! The allocation budget under libFuzzer (feature `libfuzzer`): a global allocator that counts
//! live heap bytes and, while a [`Guard`] is held, refuses (returns null for) any allocation that
//! would take them past what was live at its start plus the input's budget
//! ([`crate::allowed_bytes`]). A refused allocation aborts through `handle_alloc_error` ("memory
//! allocation of N bytes failed"), which libFuzzer records as a crash with its input. It checks
//! reservations too, which libFuzzer's own `-malloc_limit_mb` cannot see without a sanitizer.

#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

static LIVE: AtomicUsize = AtomicUsize::new(0);
static LIMIT: AtomicUsize = AtomicUsize::new(usize::MAX);

struct Budget;

fn fits(extra: usize) -> bool {
    LIVE.load(Ordering::Relaxed).saturating_add(extra) <= LIMIT.load(Ordering::Relaxed)
}

// SAFETY: every call is forwarded unchanged to `System`, or refused with null as the
// `GlobalAlloc` contract allows; the counters do not allocate.
unsafe impl GlobalAlloc for Budget {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !fits(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded with the caller's layout.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !fits(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded with the caller's layout.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's pointer and layout.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let growth = new_size.saturating_sub(layout.size());
        if !fits(growth) {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded with the caller's pointer, layout and size.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_add(new_size, Ordering::Relaxed);
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Budget = Budget;

/// The budget of one input, from [`Guard::start`] until dropped.
pub(crate) struct Guard;

impl Guard {
    /// Allow `bytes` more than what is live now.
    pub(crate) fn start(bytes: usize) -> Guard {
        LIMIT.store(
            LIVE.load(Ordering::Relaxed).saturating_add(bytes),
            Ordering::Relaxed,
        );
        Guard
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        LIMIT.store(usize::MAX, Ordering::Relaxed);
    }
}
