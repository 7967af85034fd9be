//! The counterpart buffer: named slots in one aligned host arena, spilling to a mapped file.

use std::alloc::Layout;
use std::fmt;
use std::fs::{self, OpenOptions};
use std::path::PathBuf;
use std::ptr::NonNull;
use std::sync::Arc;

use memmap2::MmapMut;
use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::{HostSlice, HostSliceMut, OffloadConfig, OffloadError, StorageDtype};

/// Alignment of the arena and of every slot: a cache line, and enough for any SIMD load.
const ALIGN: usize = 64;

/// One tensor the buffer holds (e.g. `~A^S` of one layer, or one Adam moment).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotSpec {
    /// The tensor's name, used in error messages.
    pub name: String,
    /// Number of elements.
    pub numel: usize,
    /// Element type on the host.
    pub dtype: StorageDtype,
}

/// Where a slot's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tier {
    Ram,
    File,
}

/// A slot's placement: `bytes` bytes at `ptr` (null when `bytes == 0`).
struct Slot {
    spec: SlotSpec,
    tier: Tier,
    bytes: usize,
    ptr: *mut u8,
}

/// Host memory for the RAM tier, owned by whoever allocated it and freed when dropped: the
/// global allocator by default, or a device layer (page-locked memory a GPU can copy from
/// asynchronously and map into its address space).
pub trait HostMemory: Send + Sync {
    /// Start of the memory, aligned to at least 64 bytes.
    fn ptr(&self) -> *mut u8;
    /// Size in bytes.
    fn len(&self) -> usize;
    /// Whether the memory has no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How the RAM arena is allocated: `bytes` (non-zero) bytes of [`HostMemory`], or
/// [`OffloadError::HostAlloc`].
pub type HostAlloc<'a> = &'a dyn Fn(usize) -> Result<Box<dyn HostMemory>, OffloadError>;

/// Host memory from [`crate::heap::host_alloc`] (counted apart from the heap), aligned
/// to [`ALIGN`].
struct StdMemory {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the allocation is owned exclusively by this value, like a `Box<[u8]>`.
unsafe impl Send for StdMemory {}
// SAFETY: `StdMemory` hands out only the raw pointer; access through it is governed by the
// buffer that owns the arena.
unsafe impl Sync for StdMemory {}

impl HostMemory for StdMemory {
    fn ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    fn len(&self) -> usize {
        self.layout.size()
    }
}

impl Drop for StdMemory {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `host_alloc(self.layout)` and is freed only here.
        unsafe { crate::heap::host_dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// Allocates `bytes` (non-zero) bytes aligned to [`ALIGN`] as a host arena (counted apart
/// from the heap, see [`crate::heap`]); a refusal is an error, not an abort.
pub(crate) fn std_alloc(bytes: usize) -> Result<Box<dyn HostMemory>, OffloadError> {
    let err = || OffloadError::HostAlloc {
        bytes: bytes as u64,
    };
    let layout = Layout::from_size_align(bytes, ALIGN).map_err(|_| err())?;
    // SAFETY: `layout` has a non-zero size (the caller never asks for 0 bytes).
    let raw = unsafe { crate::heap::host_alloc(layout) };
    let ptr = NonNull::new(raw).ok_or_else(err)?;
    Ok(Box::new(StdMemory { ptr, layout }))
}

/// The RAM tier: `bytes` zeroed bytes from `alloc`, absent when nothing lives in RAM.
fn new_arena(
    bytes: usize,
    alloc: HostAlloc<'_>,
) -> Result<Option<Box<dyn HostMemory>>, OffloadError> {
    if bytes == 0 {
        return Ok(None);
    }
    let mem = alloc(bytes)?;
    if mem.len() < bytes || mem.ptr().is_null() || !(mem.ptr() as usize).is_multiple_of(ALIGN) {
        return Err(OffloadError::HostAlloc {
            bytes: bytes as u64,
        });
    }
    // SAFETY: `mem` owns at least `bytes` writable bytes at `ptr` (checked above) and
    // nothing else refers to them yet.
    unsafe { std::ptr::write_bytes(mem.ptr(), 0, bytes) };
    Ok(Some(mem))
}

/// The file tier: a mapping of a file this buffer created, removed when the buffer goes.
/// The file is `flock`ed while in use, so that [`remove_stale_spill`] can tell a file a
/// killed run left from one a live run maps.
struct SpillFile {
    map: Option<MmapMut>,
    path: PathBuf,
    _file: Option<std::fs::File>,
}

/// Removes the counterpart file at `path` if no live process holds it (a run killed
/// while using it left it behind); `Ok(false)` when there is none.
///
/// # Errors
/// A live process holds the file (another run uses that `offload.path`), or it cannot
/// be removed.
pub fn remove_stale_spill(path: &std::path::Path) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    // SAFETY: flock on a descriptor owned here.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(std::io::Error::other(format!(
            "{} is in use by a running process (another run with this offload.path)",
            path.display()
        )));
    }
    fs::remove_file(path)?;
    Ok(true)
}

impl SpillFile {
    /// Creates a new file of exactly `bytes` bytes at `path` and maps it; the file is removed
    /// again if sizing or mapping fails.
    fn create(path: PathBuf, bytes: u64) -> Result<SpillFile, OffloadError> {
        let err = |path: &PathBuf, source| OffloadError::File {
            path: path.clone(),
            bytes,
            source,
        };
        // `create_new`: never clobber a file the user did not mean to give us.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| err(&path, e))?;
        // From here on `spill` owns the path, so any early return removes the file.
        let mut spill = SpillFile {
            map: None,
            path,
            _file: None,
        };
        // Held until the buffer goes (or the process ends): the file is in use.
        // SAFETY: flock on the descriptor just opened.
        if unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&file),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        } != 0
        {
            return Err(err(&spill.path, std::io::Error::last_os_error()));
        }
        file.set_len(bytes).map_err(|e| err(&spill.path, e))?;
        // SAFETY: the file was just created by us with `create_new` and is private to this
        // buffer; nothing else in the process maps or truncates it, and modification by
        // another process is outside the contract of `offload.path`.
        let map = unsafe { MmapMut::map_mut(&file) }.map_err(|e| err(&spill.path, e))?;
        spill.map = Some(map);
        spill._file = Some(file);
        Ok(spill)
    }
}

impl Drop for SpillFile {
    fn drop(&mut self) {
        // Unmap before removing, so removal also works where mapped files cannot be deleted.
        self.map = None;
        let _ = fs::remove_file(&self.path);
    }
}

/// The host side of LDT-S: every off-phase tensor in a named slot, in one 64-byte-aligned
/// RAM arena up to a budget and in a memory-mapped file beyond it.
///
/// Slots are placed in order: each goes to RAM if it still fits in `host_budget_bytes`
/// (offsets aligned to 64 bytes), otherwise to the file at `file_path`. Access follows the
/// borrow rules (`&self` reads, `&mut self` writes); [`SharedCounterpartBuffer`] adds
/// per-slot locks for concurrent copy jobs.
pub struct CounterpartBuffer {
    slots: Vec<Slot>,
    arena: Option<Box<dyn HostMemory>>,
    file: Option<SpillFile>,
    file_bytes: u64,
}

// SAFETY: the buffer owns its arena and its mapping exclusively, like a `Vec<u8>`; the raw
// slot pointers point only into them. Sending it to another thread moves that ownership.
unsafe impl Send for CounterpartBuffer {}
// SAFETY: through `&CounterpartBuffer` only shared slices are handed out (`slot`,
// `read_*`), and all writing needs `&mut self` or the per-slot write lock of
// `SharedCounterpartBuffer`, so shared access from several threads never races.
unsafe impl Sync for CounterpartBuffer {}

impl fmt::Debug for CounterpartBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CounterpartBuffer")
            .field("slots", &self.slots.len())
            .field("bytes_in_ram", &self.bytes_in_ram())
            .field("bytes_in_file", &self.bytes_in_file())
            .field("file", &self.file.as_ref().map(|s| &s.path))
            .finish()
    }
}

impl CounterpartBuffer {
    /// Lays out `specs` and allocates their memory (zeroed), RAM first and the rest in the
    /// spill file.
    ///
    /// # Errors
    /// [`OffloadError::HostBudget`] if the slots do not fit in `host_budget_bytes` and no
    /// `file_path` is set; [`OffloadError::HostAlloc`] if the arena cannot be allocated;
    /// [`OffloadError::File`] if the spill file cannot be created (it must not exist yet);
    /// [`OffloadError::SlotTooLarge`] if a slot's size overflows.
    pub fn allocate(specs: &[SlotSpec], cfg: &OffloadConfig) -> Result<Self, OffloadError> {
        Self::allocate_in(specs, cfg, &std_alloc)
    }

    /// As [`CounterpartBuffer::allocate`], with the RAM arena from `alloc` (e.g. pinned
    /// memory of a GPU backend); the arena is zeroed here and freed by dropping what
    /// `alloc` returned.
    ///
    /// # Errors
    /// As [`CounterpartBuffer::allocate`]; [`OffloadError::HostAlloc`] also if `alloc`
    /// returns less memory than asked for, or memory not aligned to 64 bytes.
    pub fn allocate_in(
        specs: &[SlotSpec],
        cfg: &OffloadConfig,
        alloc: HostAlloc<'_>,
    ) -> Result<Self, OffloadError> {
        // Offsets: (tier, offset, bytes) per slot; and the size if everything were in RAM.
        let mut placed = Vec::with_capacity(specs.len());
        let (mut ram_end, mut file_end, mut all_ram) = (0u64, 0u64, 0u64);
        for spec in specs {
            let bytes = spec
                .numel
                .checked_mul(spec.dtype.size_of())
                .filter(|&b| b <= isize::MAX as usize)
                .ok_or_else(|| OffloadError::SlotTooLarge {
                    name: spec.name.clone(),
                })?;
            let b = bytes as u64;
            let align = |end: u64| end.next_multiple_of(ALIGN as u64);
            all_ram = align(all_ram) + b;
            if bytes == 0 {
                placed.push((Tier::Ram, 0, 0));
            } else if align(ram_end) + b <= cfg.host_budget_bytes {
                placed.push((Tier::Ram, align(ram_end), bytes));
                ram_end = align(ram_end) + b;
            } else {
                placed.push((Tier::File, align(file_end), bytes));
                file_end = align(file_end) + b;
            }
        }
        let file_path = match (&cfg.file_path, file_end) {
            (_, 0) => None,
            (Some(path), _) => Some(path.clone()),
            (None, _) => {
                return Err(OffloadError::HostBudget {
                    needed: all_ram,
                    budget: cfg.host_budget_bytes,
                })
            }
        };
        let ram_bytes =
            usize::try_from(ram_end).map_err(|_| OffloadError::HostAlloc { bytes: ram_end })?;
        let arena = new_arena(ram_bytes, alloc)?;
        let mut file = match file_path {
            Some(path) => Some(SpillFile::create(path, file_end)?),
            None => None,
        };
        let ram_base = arena.as_ref().map(|a| a.ptr());
        let file_base = file
            .as_mut()
            .and_then(|f| f.map.as_mut())
            .map(|m| m.as_mut_ptr());
        let slots = specs
            .iter()
            .zip(placed)
            .map(|(spec, (tier, offset, bytes))| {
                let base = match tier {
                    Tier::Ram => ram_base,
                    Tier::File => file_base,
                };
                let ptr = match base {
                    // SAFETY: `offset + bytes` is within the arena / file of that tier by
                    // the layout above (its size is the end of the last slot placed there).
                    Some(base) if bytes > 0 => unsafe { base.add(offset as usize) },
                    _ => std::ptr::null_mut(),
                };
                Slot {
                    spec: spec.clone(),
                    tier,
                    bytes,
                    ptr,
                }
            })
            .collect();
        Ok(CounterpartBuffer {
            slots,
            arena,
            file,
            file_bytes: file_end,
        })
    }

    /// Number of slots.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether the buffer has no slots.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The spec slot `i` was allocated with.
    ///
    /// # Panics
    /// If `i >= self.len()`.
    pub fn spec(&self, i: usize) -> &SlotSpec {
        &self.slots[i].spec
    }

    /// Whether slot `i` lives in the spill file (slower to reach than RAM).
    ///
    /// # Panics
    /// If `i >= self.len()`.
    pub fn is_in_file(&self, i: usize) -> bool {
        self.slots[i].tier == Tier::File
    }

    /// Bytes of the RAM arena, alignment padding included (for the memory report).
    pub fn bytes_in_ram(&self) -> u64 {
        self.arena.as_ref().map_or(0, |a| a.len() as u64)
    }

    /// Bytes of the spill file, alignment padding included (for the memory report).
    pub fn bytes_in_file(&self) -> u64 {
        self.file_bytes
    }

    /// RAM plus file bytes.
    pub fn total_bytes(&self) -> u64 {
        self.bytes_in_ram() + self.bytes_in_file()
    }

    /// Start and length in bytes of the RAM arena (null and 0 when it is empty), so the
    /// device layer can page-lock it (e.g. `cudaHostRegister`) for asynchronous copies.
    /// Writing through the pointer is subject to the same exclusivity as `slot_mut`.
    pub fn host_arena(&self) -> (*mut u8, usize) {
        self.arena
            .as_ref()
            .map_or((std::ptr::null_mut(), 0), |a| (a.ptr(), a.len()))
    }

    /// Read-only typed view of slot `i`.
    ///
    /// # Panics
    /// If `i >= self.len()`.
    pub fn slot(&self, i: usize) -> HostSlice<'_> {
        let s = &self.slots[i];
        // SAFETY: unless empty, `ptr` points at `bytes = numel * size_of(dtype)`
        // initialized (zeroed, then only written with whole elements) bytes owned by
        // `self`, aligned to 64. No writer exists while the view lives: `slot_mut` /
        // `slots_mut` need `&mut self`, and `SharedCounterpartBuffer` writes slot `i` only
        // under its write lock and calls this only under its read lock.
        unsafe { HostSlice::from_raw(s.ptr, s.spec.dtype, s.spec.numel) }
    }

    /// Writable typed view of slot `i`.
    ///
    /// # Panics
    /// If `i >= self.len()`.
    pub fn slot_mut(&mut self, i: usize) -> HostSliceMut<'_> {
        // SAFETY: `&mut self` makes this the only view of any slot for its lifetime.
        unsafe { self.view_mut(i) }
    }

    /// Writable views of several distinct slots at once (e.g. all destinations of one
    /// fused EMA), in the order of `idx`.
    ///
    /// # Errors
    /// [`OffloadError::SlotIndex`] for an index out of range, [`OffloadError::SlotRepeated`]
    /// if an index appears twice.
    pub fn slots_mut(&mut self, idx: &[usize]) -> Result<Vec<HostSliceMut<'_>>, OffloadError> {
        self.check_distinct(idx)?;
        // SAFETY: the indices are distinct and in range (checked above), slots occupy
        // disjoint byte ranges (the layout in `allocate` places each slot after the end of
        // the previous one in its tier), and `&mut self` excludes every other view.
        Ok(idx.iter().map(|&i| unsafe { self.view_mut(i) }).collect())
    }

    /// Stores `src` into slot `i`, converting to the slot's dtype (round to nearest even).
    ///
    /// # Errors
    /// [`OffloadError::SlotIndex`] or [`OffloadError::SizeMismatch`].
    pub fn write_from_f32(&mut self, i: usize, src: &[f32]) -> Result<(), OffloadError> {
        self.check_len(i, src.len(), "elements")?;
        self.slot_mut(i).copy_from_f32(src);
        Ok(())
    }

    /// Widens slot `i` into `out` as f32 (exact).
    ///
    /// # Errors
    /// [`OffloadError::SlotIndex`] or [`OffloadError::SizeMismatch`].
    pub fn read_into_f32(&self, i: usize, out: &mut [f32]) -> Result<(), OffloadError> {
        self.check_len(i, out.len(), "elements")?;
        self.slot(i).to_f32_into(out);
        Ok(())
    }

    /// Copies raw bytes (native endianness, already in the slot's dtype) into slot `i`.
    ///
    /// # Errors
    /// [`OffloadError::SlotIndex`] or [`OffloadError::SizeMismatch`].
    pub fn write_bytes(&mut self, i: usize, src: &[u8]) -> Result<(), OffloadError> {
        self.check_len(i, src.len(), "bytes")?;
        self.slot_mut(i).as_bytes_mut().copy_from_slice(src);
        Ok(())
    }

    /// Copies slot `i`'s raw bytes into `out`.
    ///
    /// # Errors
    /// [`OffloadError::SlotIndex`] or [`OffloadError::SizeMismatch`].
    pub fn read_bytes(&self, i: usize, out: &mut [u8]) -> Result<(), OffloadError> {
        self.check_len(i, out.len(), "bytes")?;
        out.copy_from_slice(self.slot(i).as_bytes());
        Ok(())
    }

    /// Checks that `i` exists and that a copy of `got` `unit`s matches it.
    fn check_len(&self, i: usize, got: usize, unit: &'static str) -> Result<(), OffloadError> {
        let s = self.slots.get(i).ok_or(OffloadError::SlotIndex {
            index: i,
            len: self.slots.len(),
        })?;
        let expected = if unit == "bytes" {
            s.bytes
        } else {
            s.spec.numel
        };
        if got == expected {
            Ok(())
        } else {
            Err(OffloadError::SizeMismatch {
                slot: s.spec.name.clone(),
                expected,
                got,
                unit,
            })
        }
    }

    /// Checks that every index is in range and none repeats.
    fn check_distinct(&self, idx: &[usize]) -> Result<(), OffloadError> {
        let mut seen = vec![false; self.slots.len()];
        for &i in idx {
            let flag = seen.get_mut(i).ok_or(OffloadError::SlotIndex {
                index: i,
                len: self.slots.len(),
            })?;
            if std::mem::replace(flag, true) {
                return Err(OffloadError::SlotRepeated { index: i });
            }
        }
        Ok(())
    }

    /// Writable view of slot `i` from a shared reference.
    ///
    /// # Safety
    /// For the lifetime of the result no other view (shared or writable) of slot `i` may
    /// exist. Views of other slots may: slots never overlap.
    ///
    /// # Panics
    /// If `i >= self.len()`.
    unsafe fn view_mut(&self, i: usize) -> HostSliceMut<'_> {
        let s = &self.slots[i];
        // SAFETY: as in `slot` for validity and alignment; exclusivity is the caller's
        // obligation. The memory is owned by the arena / mapping, not by `self.slots`, so
        // writing through the pointer does not alias the `&self` borrow of the slot table.
        unsafe { HostSliceMut::from_raw(s.ptr, s.spec.dtype, s.spec.numel) }
    }
}

/// A [`CounterpartBuffer`] shared between threads (cheap to clone), with one reader-writer
/// lock per slot: copy jobs on different streams work on different slots at the same time,
/// and a slot is never read while it is written.
#[derive(Clone)]
pub struct SharedCounterpartBuffer {
    inner: Arc<Shared>,
}

struct Shared {
    buf: CounterpartBuffer,
    locks: Vec<RwLock<()>>,
}

/// Shared access to one slot; the slot cannot be written while this lives.
pub struct SlotReadGuard<'a> {
    _lock: RwLockReadGuard<'a, ()>,
    slice: HostSlice<'a>,
}

/// Exclusive access to one slot; nothing else reads or writes it while this lives.
pub struct SlotWriteGuard<'a> {
    _lock: RwLockWriteGuard<'a, ()>,
    slice: HostSliceMut<'a>,
}

impl SlotReadGuard<'_> {
    /// The slot's contents.
    pub fn slice(&self) -> HostSlice<'_> {
        self.slice
    }
}

impl SlotWriteGuard<'_> {
    /// The slot's contents, read-only.
    pub fn slice(&self) -> HostSlice<'_> {
        self.slice.as_slice()
    }

    /// The slot's contents, writable.
    pub fn slice_mut(&mut self) -> HostSliceMut<'_> {
        self.slice.reborrow()
    }
}

impl fmt::Debug for SharedCounterpartBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SharedCounterpartBuffer")
            .field(&self.inner.buf)
            .finish()
    }
}

impl SharedCounterpartBuffer {
    /// Puts `buf` behind per-slot locks.
    pub fn new(buf: CounterpartBuffer) -> Self {
        let locks = (0..buf.len()).map(|_| RwLock::new(())).collect();
        SharedCounterpartBuffer {
            inner: Arc::new(Shared { buf, locks }),
        }
    }

    /// Gives the buffer back when this is the last handle, else returns the handle.
    pub fn try_unwrap(self) -> Result<CounterpartBuffer, Self> {
        Arc::try_unwrap(self.inner)
            .map(|s| s.buf)
            .map_err(|inner| SharedCounterpartBuffer { inner })
    }

    /// Number of slots.
    pub fn len(&self) -> usize {
        self.inner.buf.len()
    }

    /// Whether the buffer has no slots.
    pub fn is_empty(&self) -> bool {
        self.inner.buf.is_empty()
    }

    /// The spec slot `i` was allocated with.
    ///
    /// # Panics
    /// If `i >= self.len()`.
    pub fn spec(&self, i: usize) -> &SlotSpec {
        self.inner.buf.spec(i)
    }

    /// Whether slot `i` lives in the spill file (pageable memory a device cannot map).
    ///
    /// # Panics
    /// If `i >= self.len()`.
    pub fn is_in_file(&self, i: usize) -> bool {
        self.inner.buf.is_in_file(i)
    }

    /// An identity of the shared buffer: equal for all handles of one buffer.
    pub fn id(&self) -> usize {
        Arc::as_ptr(&self.inner) as usize
    }

    /// Locks slot `i` for reading (blocks while it is being written).
    ///
    /// # Panics
    /// If `i >= self.len()`.
    pub fn read(&self, i: usize) -> SlotReadGuard<'_> {
        let lock = self.inner.locks[i].read();
        SlotReadGuard {
            _lock: lock,
            slice: self.inner.buf.slot(i),
        }
    }

    /// Locks slot `i` for writing (blocks while it is read or written elsewhere).
    ///
    /// # Panics
    /// If `i >= self.len()`.
    pub fn write(&self, i: usize) -> SlotWriteGuard<'_> {
        let lock = self.inner.locks[i].write();
        // SAFETY: the write lock of slot `i` is held for as long as the view lives (both are
        // in the guard), and every view of slot `i` made through this type holds that lock;
        // `inner.buf` itself is never handed out, so no unlocked view exists.
        let slice = unsafe { self.inner.buf.view_mut(i) };
        SlotWriteGuard { _lock: lock, slice }
    }

    /// Locks several distinct slots for writing, in ascending index order (so two callers
    /// never deadlock on each other), and returns the guards in the order of `idx`.
    /// Do not call it while holding a guard of this buffer.
    ///
    /// # Errors
    /// [`OffloadError::SlotIndex`] or [`OffloadError::SlotRepeated`].
    pub fn write_many(&self, idx: &[usize]) -> Result<Vec<SlotWriteGuard<'_>>, OffloadError> {
        self.inner.buf.check_distinct(idx)?;
        let mut order: Vec<usize> = (0..idx.len()).collect();
        order.sort_unstable_by_key(|&k| idx[k]);
        let mut guards: Vec<Option<SlotWriteGuard<'_>>> = idx.iter().map(|_| None).collect();
        for k in order {
            guards[k] = Some(self.write(idx[k]));
        }
        Ok(guards.into_iter().flatten().collect())
    }
}
