//! The process's heap, measured: every allocation goes through [`Counting`] (mimalloc
//! underneath), which keeps the live bytes and their peak. On a CPU the heap holds what a
//! GPU would hold in device memory — weights, gradients, optimizer state, activations,
//! staging, temporaries — so these are the physical figures of a run, not a sum of what
//! the code thinks it holds. The counterpart buffer's host arena (pinned host memory on a
//! GPU) is allocated through [`host_alloc`] and counted apart.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Live bytes of the counted heap.
static LIVE: AtomicU64 = AtomicU64::new(0);
/// Largest `LIVE` since the window started ([`take_peak`]).
static PEAK: AtomicU64 = AtomicU64::new(0);
/// Largest `LIVE` since the process started.
static PROCESS_PEAK: AtomicU64 = AtomicU64::new(0);
/// Live bytes of host arenas.
static HOST_LIVE: AtomicU64 = AtomicU64::new(0);
/// Largest `HOST_LIVE` since the process started.
static HOST_PEAK: AtomicU64 = AtomicU64::new(0);
/// Largest `LIVE + HOST_LIVE` since the process started: the process's memory at its
/// worst moment.
static TOTAL_PEAK: AtomicU64 = AtomicU64::new(0);

/// The global allocator of `ldt`: mimalloc, counted.
pub struct Counting;

fn grow(bytes: usize) {
    let now = LIVE.fetch_add(bytes as u64, Relaxed) + bytes as u64;
    PEAK.fetch_max(now, Relaxed);
    PROCESS_PEAK.fetch_max(now, Relaxed);
    TOTAL_PEAK.fetch_max(now + HOST_LIVE.load(Relaxed), Relaxed);
}

fn shrink(bytes: usize) {
    LIVE.fetch_sub(bytes as u64, Relaxed);
}

// SAFETY: every call is forwarded unchanged to mimalloc, which upholds `GlobalAlloc`'s
// contract; the counters are only read and written atomically beside it.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded from the caller.
        let p = unsafe { mimalloc::MiMalloc.alloc(layout) };
        if !p.is_null() {
            grow(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded from the caller.
        let p = unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) };
        if !p.is_null() {
            grow(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded from the caller.
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) };
        shrink(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded from the caller.
        let p = unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            shrink(layout.size());
            grow(new_size);
        }
        p
    }
}

/// mimalloc's `mi_option_purge_delay`: how long freed memory stays committed before it
/// is returned to the OS (milliseconds; -1 = never; mimalloc's default is 10).
const PURGE_DELAY: std::ffi::c_int = 15;

/// The purge delay `ldt` runs with: never. A training step frees and reallocates the
/// same activation buffers every few hundred milliseconds; with mimalloc's 10 ms the
/// kernel unmaps and zeroes them again on every step (page faults and `clear_page` were
/// 15-20% of a resnet18 step). Measured side by side (`ldt bench --step`, resnet18 erm,
/// batch 32, 1 thread, same binary, `MIMALLOC_PURGE_DELAY` set): 256 ms/step at 10 ms,
/// 210 at 1000 ms, 182 at never; peak RSS 341, 386 and 398 MB. Freed memory stays with
/// the process for its next use, as a caching GPU allocator keeps it; the peak is the
/// run's peak either way.
pub const KEEP_FREED_MS: i64 = -1;

/// Keeps freed memory committed ([`KEEP_FREED_MS`]) instead of returning it to the OS,
/// unless the environment sets `MIMALLOC_PURGE_DELAY` (which then wins). Called once at
/// start by the command line.
pub fn keep_freed_pages() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: setting an option is thread-safe in mimalloc; the value is in range.
        unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, KEEP_FREED_MS as _) };
    }
}

/// Allocates a host arena (the counterpart buffer's RAM tier), counted apart from the
/// heap: on a GPU it is pinned host memory, not device memory.
///
/// # Safety
/// As [`std::alloc::alloc`]: `layout` has a non-zero size; free with [`host_dealloc`].
pub unsafe fn host_alloc(layout: Layout) -> *mut u8 {
    // SAFETY: forwarded from the caller.
    let p = unsafe { mimalloc::MiMalloc.alloc(layout) };
    if !p.is_null() {
        let now = HOST_LIVE.fetch_add(layout.size() as u64, Relaxed) + layout.size() as u64;
        HOST_PEAK.fetch_max(now, Relaxed);
        TOTAL_PEAK.fetch_max(now + LIVE.load(Relaxed), Relaxed);
    }
    p
}

/// Frees a host arena of [`host_alloc`].
///
/// # Safety
/// `ptr` came from [`host_alloc`] with this `layout`.
pub unsafe fn host_dealloc(ptr: *mut u8, layout: Layout) {
    // SAFETY: forwarded from the caller.
    unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) };
    HOST_LIVE.fetch_sub(layout.size() as u64, Relaxed);
}

/// Live bytes of the heap now.
pub fn live() -> u64 {
    LIVE.load(Relaxed)
}

/// The heap's peak since the last call (or the process start); the next window starts
/// at the live bytes of now.
pub fn take_peak() -> u64 {
    PEAK.swap(LIVE.load(Relaxed), Relaxed)
}

/// Runs `f` and returns its result with the heap's peak above the live bytes at its
/// start (what `f` needed at its worst moment). The window of [`take_peak`] around it
/// is kept: an enclosing stage still sees this peak.
pub fn peak_during<R>(f: impl FnOnce() -> R) -> (R, u64) {
    let outer = take_peak();
    let start = live();
    let r = f();
    let inner = take_peak();
    PEAK.fetch_max(outer.max(inner), Relaxed);
    (r, inner.saturating_sub(start))
}

/// The heap's peak since the process started (or the last [`restart_peaks`]).
pub fn process_peak() -> u64 {
    PROCESS_PEAK.load(Relaxed)
}

/// The peak of heap and host arenas together since the process started (or the last
/// [`restart_peaks`]).
pub fn total_peak() -> u64 {
    TOTAL_PEAK.load(Relaxed)
}

/// Starts the process-wide peaks ([`process_peak`], [`host_arena`]'s, [`total_peak`])
/// again from the live bytes of now: a run measures its own, after earlier runs in the
/// same process (`ldt bench`, tests).
pub fn restart_peaks() {
    let (heap, host) = (LIVE.load(Relaxed), HOST_LIVE.load(Relaxed));
    PROCESS_PEAK.store(heap, Relaxed);
    HOST_PEAK.store(host, Relaxed);
    TOTAL_PEAK.store(heap + host, Relaxed);
}

/// Host-arena bytes: live now, and the peak since the process started.
pub fn host_arena() -> (u64, u64) {
    (HOST_LIVE.load(Relaxed), HOST_PEAK.load(Relaxed))
}

/// An f32 buffer in host memory, counted apart from the heap like the counterpart
/// arena ([`host_alloc`]): where the host optimizer keeps master weights and moments
/// (host RAM on a GPU machine, never device memory).
pub struct HostVec {
    ptr: std::ptr::NonNull<f32>,
    len: usize,
}

// SAFETY: a HostVec owns its allocation exclusively, like a Vec<f32>.
unsafe impl Send for HostVec {}
// SAFETY: shared access only reads, like a &[f32].
unsafe impl Sync for HostVec {}

impl HostVec {
    /// `len` zeros.
    pub fn zeroed(len: usize) -> HostVec {
        if len == 0 {
            return HostVec {
                ptr: std::ptr::NonNull::dangling(),
                len,
            };
        }
        let layout = Layout::array::<f32>(len).expect("a host buffer larger than memory");
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { host_alloc(layout) } as *mut f32;
        let Some(ptr) = std::ptr::NonNull::new(p) else {
            std::alloc::handle_alloc_error(layout)
        };
        // SAFETY: `ptr` holds `len` f32s, just allocated; zero bits are 0.0.
        unsafe { std::ptr::write_bytes(ptr.as_ptr(), 0, len) };
        HostVec { ptr, len }
    }

    /// A copy of `x`.
    pub fn from_slice(x: &[f32]) -> HostVec {
        let mut v = HostVec::zeroed(x.len());
        v.copy_from_slice(x);
        v
    }
}

impl Clone for HostVec {
    fn clone(&self) -> HostVec {
        HostVec::from_slice(self)
    }
}

impl std::ops::Deref for HostVec {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        // SAFETY: `ptr` holds `len` initialised f32s (or is dangling with len 0).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for HostVec {
    fn deref_mut(&mut self) -> &mut [f32] {
        // SAFETY: as in `deref`, and `&mut self` makes the borrow exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for HostVec {
    fn drop(&mut self) {
        if self.len > 0 {
            let layout = Layout::array::<f32>(self.len).expect("allocated with this layout");
            // SAFETY: allocated by `host_alloc` with this layout in `zeroed`.
            unsafe { host_dealloc(self.ptr.as_ptr() as *mut u8, layout) };
        }
    }
}
