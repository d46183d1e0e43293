//! The `weightdiff` binary: the command line lives in the library ([`weightdiff::cli`]),
//! shared with the Python package's console script.

fn main() -> std::process::ExitCode {
    keep_freed_memory();
    std::process::ExitCode::from(weightdiff::cli::main(std::env::args_os()))
}

/// Keeps freed memory in the process for the next tensor instead of returning it to the
/// OS. The low-rank stage allocates, per matrix, sketches of m × 32 f64 and the like (39 MB
/// each for a 151936-row embedding); glibc maps blocks above its mmap threshold (at most
/// 32 MiB) afresh and trims its heaps when they are freed, so each matrix faulted its
/// pages in again: 166 k page faults in a `compare` of the 32B-shaped pair, 86 k with
/// these settings, 5 % less CPU time, peak RSS 322 → 349 MiB (BENCHMARKS.md). One arena:
/// the workers allocate little outside their reused buffers, and per-thread arenas each
/// kept their own freed blocks.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    // SAFETY: mallopt only sets the allocator's parameters; it runs before any other
    // thread exists. A parameter glibc refuses leaves its default.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}
