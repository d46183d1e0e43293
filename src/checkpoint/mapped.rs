//! Shards read in place: each file mapped once for the run, guarded against SIGBUS.
//!
//! Reading a tensor through `pread` costs the kernel a copy of every page-cache page into
//! the read buffer (about half the diff's time, BENCHMARKS.md issue 11); a mapping hands
//! the consumer the page-cache pages themselves. Two things make mapping safe and cheap:
//!
//! - **Once per file, not per window.** A shard is mapped whole on its first window and
//!   unmapped when the shard is dropped, so there is no `mmap`/`munmap` per window. Each
//!   window's pages are populated in the kernel (`MADV_POPULATE_READ`) before the
//!   consumer touches them, which also reports a range past the end of the file as
//!   `EFAULT` instead of a fault. When the window drops, its pages are released from the
//!   process (`MADV_DONTNEED`: for a private, never-written file mapping this only drops
//!   the page-table entries; the page cache keeps the data), so the resident set stays
//!   bounded by the windows in flight, not by the model.
//! - **A SIGBUS guard.** If the file shrinks after a window was populated, the kernel
//!   removes the pages past the new end from every mapping, and the next access raises
//!   SIGBUS. A process-wide handler (installed once, chaining to the previous one) looks
//!   the fault address up in a fixed table of live mappings; if it lies in one, it maps
//!   anonymous zero pages over the rest of that mapping (`MAP_FIXED`), marks the mapping
//!   as faulted and returns: the interrupted instruction is restarted and reads zeros.
//!   The consumer then asks the window whether it is [`Mapped::intact`] and reports its
//!   tensor as an error. Any other SIGBUS goes to the handler that was there before
//!   (Rust's stack-overflow handler, Python's `faulthandler`, …) or to the default action.
//!
//! Why the handler is async-signal-safe enough: it reads only atomics of a static table
//! (no locks, no allocation), and calls `mmap`, `sigaction` and `raise`. `sigaction` and
//! `raise` are on POSIX's async-signal-safe list; `mmap` is not listed, but on Linux it
//! is a bare system call in glibc and musl (no lock, no allocation; it only sets `errno`,
//! which the handler saves and restores). The fault it handles is synchronous (raised in
//! the thread that touched the page), so the flag it sets is seen by that thread's later
//! [`Mapped::intact`] call in program order.

use std::ffi::c_void;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering, fence};
use std::sync::{Arc, Once, RwLock};

/// Live mappings the handler knows. A shard mapped when all are taken is read with
/// positioned reads instead (a model with more than this many shards open at once).
const SLOTS: usize = 1024;

struct Slot {
    /// Claimed by a mapping (set first, cleared last).
    used: AtomicBool,
    /// Start address; 0 while the slot is not live.
    start: AtomicUsize,
    /// Length in bytes, rounded up to pages.
    len: AtomicUsize,
    /// Set by the handler when a fault in this mapping was answered with zeros.
    faulted: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const FREE: Slot = Slot {
    used: AtomicBool::new(false),
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    faulted: AtomicBool::new(false),
};
static REGISTRY: [Slot; SLOTS] = [FREE; SLOTS];

/// Faults answered with zeros since the process started (for tests and diagnostics).
static FAULTS: AtomicU64 = AtomicU64::new(0);
static PAGE: AtomicUsize = AtomicUsize::new(4096);

/// The SIGBUS action found when the guard was installed, called for faults that are not
/// ours. Written once, before the handler can run, and only read afterwards.
struct Previous(std::cell::UnsafeCell<std::mem::MaybeUninit<libc::sigaction>>);
// SAFETY: written once inside `INSTALL.call_once` before our handler is installed, then
// only read.
unsafe impl Sync for Previous {}
static PREVIOUS: Previous = Previous(std::cell::UnsafeCell::new(std::mem::MaybeUninit::uninit()));
static INSTALL: Once = Once::new();
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// Faults in registered mappings answered with zeros so far, process-wide.
pub fn faults_handled() -> u64 {
    FAULTS.load(Ordering::SeqCst)
}

type Hook = Box<dyn Fn(&Path, u64, u64) + Send + Sync>;
static HOOK_SET: AtomicBool = AtomicBool::new(false);
static HOOK: RwLock<Option<Hook>> = RwLock::new(None);

/// Test hook: called with the file, offset and length of every mapped window after its
/// pages were populated and before it is handed to the consumer, so that a test can
/// truncate the file exactly there.
#[doc(hidden)]
pub fn set_window_hook(hook: Option<Hook>) {
    let mut h = HOOK.write().unwrap_or_else(|p| p.into_inner());
    HOOK_SET.store(hook.is_some(), Ordering::SeqCst);
    *h = hook;
}

fn install() -> bool {
    INSTALL.call_once(|| {
        // SAFETY: plain libc calls on zeroed, valid structures; PREVIOUS is written here
        // only, before the handler that reads it is installed.
        unsafe {
            let page = libc::sysconf(libc::_SC_PAGESIZE);
            if page > 0 {
                PAGE.store(page as usize, Ordering::SeqCst);
            }
            let prev = (*PREVIOUS.0.get()).as_mut_ptr();
            if libc::sigaction(libc::SIGBUS, std::ptr::null(), prev) != 0 {
                return;
            }
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigbus as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut()) == 0 {
                INSTALLED.store(true, Ordering::SeqCst);
            }
        }
    });
    INSTALLED.load(Ordering::SeqCst)
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    let errno = unsafe { *libc::__errno_location() };
    let page = PAGE.load(Ordering::Relaxed);
    for slot in REGISTRY.iter() {
        let start = slot.start.load(Ordering::SeqCst);
        if start == 0 || addr < start {
            continue;
        }
        let len = slot.len.load(Ordering::SeqCst);
        if addr - start >= len {
            continue;
        }
        let from = addr & !(page - 1);
        // SAFETY: [from, start + len) lies inside a mapping this module made and still
        // owns (it is unregistered before it is unmapped); replacing it with anonymous
        // read-only zero pages changes only what its readers see.
        let r = unsafe {
            libc::mmap(
                from as *mut c_void,
                start + len - from,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if r == libc::MAP_FAILED {
            break;
        }
        slot.faulted.store(true, Ordering::SeqCst);
        FAULTS.fetch_add(1, Ordering::SeqCst);
        unsafe { *libc::__errno_location() = errno };
        return;
    }
    // Not ours: what was there before.
    // SAFETY: PREVIOUS was filled before this handler was installed.
    unsafe {
        let prev = &*(*PREVIOUS.0.get()).as_ptr();
        let handler = prev.sa_sigaction;
        if handler == libc::SIG_DFL || handler == libc::SIG_IGN {
            // Restore it: a fault re-executes the instruction on return and the kernel
            // applies the default action (a faulting SIGBUS cannot be ignored); a SIGBUS
            // sent by kill() is raised again.
            libc::sigaction(libc::SIGBUS, prev, std::ptr::null_mut());
            if (*info).si_code <= 0 {
                libc::raise(sig);
            }
        } else if prev.sa_flags & libc::SA_SIGINFO != 0 {
            let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut c_void) =
                std::mem::transmute(handler);
            f(sig, info, ctx);
        } else {
            let f: extern "C" fn(libc::c_int) = std::mem::transmute(handler);
            f(sig);
        }
    }
}

/// A whole file mapped read-only for the run, registered with the SIGBUS guard.
pub struct ShardMap {
    ptr: *mut u8,
    len: usize,
    slot: usize,
}

// SAFETY: the mapping is read-only memory owned by this value; readers only get shared
// slices of it.
unsafe impl Send for ShardMap {}
unsafe impl Sync for ShardMap {}

impl std::fmt::Debug for ShardMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ShardMap({} bytes, slot {})", self.len, self.slot)
    }
}

impl ShardMap {
    /// Maps the first `len` bytes of `file`. `None` when it cannot be guarded (no slot
    /// left, the handler could not be installed) or mapped: the caller reads instead.
    pub fn map(file: &File, len: u64) -> Option<Arc<ShardMap>> {
        let len = usize::try_from(len).ok().filter(|&l| l > 0)?;
        if !install() {
            return None;
        }
        let slot = REGISTRY.iter().position(|s| {
            s.used
                .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        })?;
        // SAFETY: a fresh private read-only mapping of an open file; the address is the
        // kernel's choice.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        let s = &REGISTRY[slot];
        if ptr == libc::MAP_FAILED {
            s.used.store(false, Ordering::SeqCst);
            return None;
        }
        let page = PAGE.load(Ordering::SeqCst);
        s.faulted.store(false, Ordering::SeqCst);
        s.len.store(len.div_ceil(page) * page, Ordering::SeqCst);
        s.start.store(ptr as usize, Ordering::SeqCst);
        Some(Arc::new(ShardMap {
            ptr: ptr.cast(),
            len,
            slot,
        }))
    }

    /// Whether a fault in this mapping was answered with zeros.
    pub fn faulted(&self) -> bool {
        fence(Ordering::SeqCst);
        REGISTRY[self.slot].faulted.load(Ordering::SeqCst)
    }

    /// Page-aligned `[offset, offset + len)`, clipped to the mapping.
    fn pages(&self, offset: usize, len: usize) -> (*mut c_void, usize) {
        let page = PAGE.load(Ordering::Relaxed);
        let from = offset & !(page - 1);
        let to = (offset + len).min(self.len);
        // SAFETY: from <= offset < self.len, inside the mapping.
        (unsafe { self.ptr.add(from) }.cast(), to - from)
    }

    /// Bytes `[offset, offset + len)`, populated. An error when the file no longer holds
    /// them (`MADV_POPULATE_READ` reports `EFAULT`) or the mapping already faulted.
    pub fn window(self: &Arc<Self>, path: &Path, offset: u64, len: u64) -> std::io::Result<Mapped> {
        let (offset, len) = (offset as usize, len as usize);
        if offset.checked_add(len).is_none_or(|e| e > self.len) {
            return Err(std::io::Error::other("range past the end of the mapping"));
        }
        let (addr, span) = self.pages(offset, len);
        // SAFETY: advice on pages of our own mapping.
        let r = unsafe { libc::madvise(addr, span, libc::MADV_POPULATE_READ) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                // Kernels before 5.14 do not know the advice: fault on access instead.
                Some(libc::EINVAL) => unsafe {
                    libc::madvise(addr, span, libc::MADV_WILLNEED);
                },
                Some(libc::EFAULT) => {
                    return Err(std::io::Error::other(
                        "the file shrank: the window lies past its end",
                    ));
                }
                _ => return Err(e),
            }
        }
        if HOOK_SET.load(Ordering::Relaxed)
            && let Some(h) = &*HOOK.read().unwrap_or_else(|p| p.into_inner())
        {
            h(path, offset as u64, len as u64);
        }
        let w = Mapped {
            map: self.clone(),
            offset,
            len,
        };
        w.intact()?;
        Ok(w)
    }
}

impl Drop for ShardMap {
    fn drop(&mut self) {
        let s = &REGISTRY[self.slot];
        // Unregistered first: no window of it is alive, so no fault can come from it.
        s.start.store(0, Ordering::SeqCst);
        s.len.store(0, Ordering::SeqCst);
        // SAFETY: our own mapping, no longer referenced.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
        s.used.store(false, Ordering::SeqCst);
    }
}

/// A window of a [`ShardMap`]: its pages are released from the process when it drops.
pub struct Mapped {
    map: Arc<ShardMap>,
    offset: usize,
    len: usize,
}

impl Mapped {
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: inside the mapping (checked in `window`), which lives as long as `map`.
        unsafe { std::slice::from_raw_parts(self.map.ptr.add(self.offset), self.len) }
    }

    /// An error if the file shrank while this window was in use: some of the bytes read
    /// were zeros put there by the SIGBUS guard, not the file's.
    pub fn intact(&self) -> std::io::Result<()> {
        if self.map.faulted() {
            return Err(std::io::Error::other(
                "the file shrank while it was being read (a mapped page vanished)",
            ));
        }
        Ok(())
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        let (addr, span) = self.map.pages(self.offset, self.len);
        // SAFETY: for a private mapping never written, MADV_DONTNEED only drops the
        // page-table entries; a later access (a neighbouring window sharing a boundary
        // page) faults the page cache's page back in.
        unsafe { libc::madvise(addr, span, libc::MADV_DONTNEED) };
    }
}
