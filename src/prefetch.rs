//! Software prefetch: telling the processor which lines will be read soon.
//!
//! The core's big loops (planning and settling a million changes) are bound by waits for memory:
//! each step reads or writes lines last touched long ago (a queue entry, a mapping slot, the
//! counts of a shared block), and many of those writes are atomic, which wait for their line one
//! at a time. Asking for the lines of a step some steps ahead overlaps the waits. A prefetch is
//! only a hint: it changes no result.

/// The size of a cache line on the processors this is tuned for.
const LINE: usize = 64;

/// Asks for the line holding `p`.
#[inline(always)]
pub(crate) fn line<T: ?Sized>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 is a hint: it dereferences nothing architecturally and cannot fault, so
    // any address (dangling, null, unmapped) is sound. (`unused_unsafe`: newer compilers declare
    // the intrinsic safe; the oldest one this crate supports does not.)
    #[allow(unsafe_code, unused_unsafe)]
    unsafe {
        use core::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        _mm_prefetch::<_MM_HINT_T0>(p as *const u8 as *const i8)
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Asks for every line of `value`.
#[inline(always)]
pub(crate) fn value<T>(value: &T) {
    let start = value as *const T as *const u8;
    let mut offset = 0;
    while offset < std::mem::size_of::<T>() {
        line(start.wrapping_add(offset));
        offset += LINE;
    }
    // The last byte's line, when the value straddles one more line than its size fills.
    line(start.wrapping_add(std::mem::size_of::<T>().saturating_sub(1)));
}

/// Where an `Arc`'s counts sit: in the 16 bytes before its data (what a clone or drop writes).
#[inline(always)]
pub(crate) fn arc_counts_ptr<T: ?Sized>(arc: &std::sync::Arc<T>) -> *const u8 {
    std::sync::Arc::as_ptr(arc).cast::<u8>().wrapping_sub(16)
}

/// Asks for the line of an `Arc`'s counts.
#[inline(always)]
pub(crate) fn arc_counts<T: ?Sized>(arc: &std::sync::Arc<T>) {
    line(arc_counts_ptr(arc));
}
