//! The [`Backend`] of a device with queues: live tensors in device memory, the counterpart
//! buffer in pinned host memory, copies on one queue per direction, folds on the host, in
//! device memory or straight in mapped host memory ([`EmaPlacement`]).
//!
//! Everything here is written against [`DeviceApi`], the few operations a device offers
//! (record and wait on events, asynchronous copies, one kernel launch): the CUDA backend
//! (`offload::cuda`, feature `cuda`) implements it with streams and PTX kernels, and the
//! tests implement it with a simulated device that runs queued work lazily and in a random
//! order of its queues, so a missing wait shows up as a wrong number on the CPU.
//!
//! Ordering rules (see [`super::order`]):
//! - a copy or kernel that reads a live tensor waits for the compute queue as it was when
//!   the call was made (the work that produced the tensor), nothing later;
//! - the compute queue waits for a copy only when the copy writes a live tensor it will
//!   use, or reads one the caller may change next (`swap`, `load`, `store`,
//!   `fold_into_live`); folds into slots and prefetches are waited for through their
//!   [`Fence`], as the trait says;
//! - slot accesses are ordered per slot by [`SlotOrder`]; the two halves of the device
//!   staging area are reused only after the work that used them last.

use super::backend::{Backend, Upload};
use super::launch::{pack, EmaLaunch, EmaSpan, CHUNK_ELEMS};
use super::order::{plan_fills, Dep, Piece, Queue, SlotOrder, MIN_HALF_BYTES};
use super::{
    fused_ema, CopyEngine, CounterpartBuffer, EmaTask, Fence, HostMemory, HostSlice, HostSliceMut,
    OffloadConfig, OffloadError, SharedCounterpartBuffer, SlotSpec, StorageDtype,
};
use crate::config::EmaPlacement;
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;

/// One end of a copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loc {
    /// A device address.
    Device(u64),
    /// A host address (pinned for an asynchronous copy; pageable memory is copied
    /// synchronously by the device layer).
    Host(*mut u8),
}

/// What a device offers the streamed backend. Queue work is asynchronous: it runs in
/// submission order per queue, and across queues only as ordered by [`DeviceApi::wait`].
pub trait DeviceApi: Send + Sync + 'static {
    /// A recorded point of a queue.
    type Event: Clone + Send + Sync + 'static;
    /// A block of device memory, freed when dropped.
    type Memory: Send + Sync + 'static;

    /// Records the work submitted to `q` so far.
    fn record(&self, q: Queue) -> Result<Self::Event>;
    /// Makes later work on `q` wait until `e` completed.
    fn wait(&self, q: Queue, e: &Self::Event) -> Result<()>;
    /// Blocks the calling thread until `e` completed.
    fn synchronize(&self, e: &Self::Event) -> Result<()>;
    /// Whether `e` completed, without blocking.
    fn is_complete(&self, e: &Self::Event) -> Result<bool>;
    /// `bytes` of device memory.
    fn alloc(&self, bytes: usize) -> Result<Self::Memory>;
    /// The device address of `m`.
    fn address(&self, m: &Self::Memory) -> u64;
    /// Device address, storage dtype and number of elements of a contiguous live tensor.
    fn tensor_address(&self, t: &Tensor) -> Result<(u64, StorageDtype, usize)>;
    /// A new live tensor with unspecified contents, allocated in compute-queue order.
    fn empty(&self, shape: &[usize], dtype: StorageDtype) -> Result<Tensor>;
    /// Copies `bytes` from `src` to `dst` on `q`.
    fn copy(&self, q: Queue, dst: Loc, src: Loc, bytes: usize) -> Result<()>;
    /// Launches an EMA kernel on `q`.
    fn launch(&self, q: Queue, l: &EmaLaunch) -> Result<()>;
    /// Host memory the device can copy from asynchronously and map (the counterpart
    /// arena and host staging).
    fn host_alloc(&self, bytes: usize) -> Result<Box<dyn HostMemory>, OffloadError>;
    /// The device address of `host`, which lies in memory from [`DeviceApi::host_alloc`].
    fn mapped(&self, host: *mut u8) -> Result<u64>;
}

/// What must stay alive until a piece of queued work completed.
struct Keep {
    _tensors: Vec<Tensor>,
    _buf: Option<SharedCounterpartBuffer>,
}

/// Ordering state shared by the calls.
struct State<E> {
    /// Slot order per buffer (by [`SharedCounterpartBuffer::id`]).
    order: HashMap<usize, SlotOrder<E>>,
    /// When each staging half was last used (to be waited for before reuse).
    half_free: [Option<E>; 2],
    /// The half the next fill takes.
    next_half: usize,
    /// Work whose inputs and outputs must stay alive until its event completed.
    inflight: Vec<(E, Keep)>,
}

/// Pinned host memory for host-placement folds, and what its last user must finish.
struct HostStage<E> {
    mem: Option<Box<dyn HostMemory>>,
    busy: Option<Dep<E>>,
}

/// Two pinned host regions weight uploads are converted into ([`Backend::upload`]):
/// one block is staged while the other's copy may still be reading, and a region is
/// written only after its last copy completed.
struct UploadStage<E> {
    regions: [Option<Box<dyn HostMemory>>; 2],
    /// The H2D copy that last read each region.
    busy: [Option<E>; 2],
    /// The region the next upload takes.
    next: usize,
}

/// The [`Backend`] of a device with queues (see the module documentation).
pub struct StreamBackend<D: DeviceApi> {
    dev: Arc<D>,
    ema: EmaPlacement,
    stage: [D::Memory; 2],
    half: usize,
    state: Mutex<State<D::Event>>,
    host_stage: Mutex<HostStage<D::Event>>,
    uploads: Mutex<UploadStage<D::Event>>,
    host: CopyEngine,
    threads: usize,
    /// Test only: uploads skip the host's wait before reusing a staging region.
    #[cfg(test)]
    skip_upload_wait: bool,
}

/// A slot's host memory: address, bytes, dtype, elements.
struct SlotMem {
    ptr: *mut u8,
    bytes: usize,
    dtype: StorageDtype,
    numel: usize,
}

fn slot_mem(buf: &SharedCounterpartBuffer, slot: usize) -> SlotMem {
    let mut g = buf.write(slot);
    let mut s = g.slice_mut();
    let (dtype, numel) = (s.dtype(), s.len());
    let b = s.as_bytes_mut();
    SlotMem {
        ptr: b.as_mut_ptr(),
        bytes: b.len(),
        dtype,
        numel,
    }
}

/// Byte offset `start` elements into `ptr`.
fn host_at(ptr: *mut u8, start: usize, dtype: StorageDtype) -> *mut u8 {
    ptr.wrapping_add(start * dtype.size_of())
}

impl<D: DeviceApi> StreamBackend<D> {
    /// A backend on `dev` folding with `ema`, with a device staging area of
    /// `offload.staging_bytes` (two halves) and `offload.threads` host EMA threads.
    ///
    /// # Errors
    /// If the staging area is below two cuts of f32 (2 KiB) or cannot be allocated.
    pub fn new(dev: D, offload: &OffloadConfig, ema: EmaPlacement) -> Result<Self> {
        let half = (offload.staging_bytes / 2) as usize;
        if half < MIN_HALF_BYTES {
            bail!(
                "config key `offload.staging_bytes` = {}: a device backend needs at least {} bytes (two staging halves)",
                offload.staging_bytes,
                2 * MIN_HALF_BYTES
            );
        }
        let stage = [
            dev.alloc(half)
                .context("allocating the device staging area")?,
            dev.alloc(half)
                .context("allocating the device staging area")?,
        ];
        Ok(StreamBackend {
            dev: Arc::new(dev),
            ema,
            stage,
            half,
            state: Mutex::new(State {
                order: HashMap::new(),
                half_free: [None, None],
                next_half: 0,
                inflight: Vec::new(),
            }),
            host_stage: Mutex::new(HostStage {
                mem: None,
                busy: None,
            }),
            uploads: Mutex::new(UploadStage {
                regions: [None, None],
                busy: [None, None],
                next: 0,
            }),
            host: CopyEngine::new(1),
            threads: offload.threads.max(1),
            #[cfg(test)]
            skip_upload_wait: false,
        })
    }

    /// The device this backend works on.
    pub fn device(&self) -> &D {
        &self.dev
    }

    /// Where the folds run.
    pub fn placement(&self) -> EmaPlacement {
        self.ema
    }

    /// Waits on the device queue `q` for every dependency (a host job is waited for by
    /// the calling thread, as a device cannot wait for it).
    fn wait_deps(&self, q: Queue, deps: &[Dep<D::Event>]) -> Result<()> {
        for d in deps {
            match d {
                Dep::Device(e) => self.dev.wait(q, e)?,
                Dep::Host(f) => f
                    .wait()
                    .map_err(|e| anyhow::anyhow!("a counterpart fold failed: {e}"))?,
            }
        }
        Ok(())
    }

    /// Blocks until every dependency completed.
    fn host_wait(dev: &D, deps: &[Dep<D::Event>]) -> Result<(), String> {
        for d in deps {
            match d {
                Dep::Device(e) => dev.synchronize(e).map_err(|e| e.to_string())?,
                Dep::Host(f) => f.wait()?,
            }
        }
        Ok(())
    }

    /// Drops the kept values of completed work; the state and the slot order of `buf`.
    fn state_for<'a>(
        &'a self,
        buf: &SharedCounterpartBuffer,
    ) -> parking_lot::MutexGuard<'a, State<D::Event>> {
        let mut st = self.state.lock();
        let dev = &self.dev;
        st.inflight
            .retain(|(e, _)| !dev.is_complete(e).unwrap_or(false));
        st.order
            .entry(buf.id())
            .or_insert_with(|| SlotOrder::new(buf.len()));
        st
    }

    /// Makes queue `q` wait for the compute work submitted so far.
    fn after_compute(&self, q: Queue) -> Result<()> {
        let c = self.dev.record(Queue::Compute)?;
        self.dev.wait(q, &c)
    }

    /// Takes the next staging half: waits on `q` until its last use completed.
    fn take_half(&self, st: &mut State<D::Event>, q: Queue) -> Result<usize> {
        let h = st.next_half % 2;
        st.next_half += 1;
        if let Some(e) = &st.half_free[h] {
            self.dev.wait(q, e)?;
        }
        Ok(h)
    }

    /// A fence that completes with event `e`.
    fn fence_for(&self, e: D::Event) -> Fence {
        let dev = self.dev.clone();
        self.host
            .submit(0, move || dev.synchronize(&e).map_err(|e| e.to_string()))
    }

    /// An already failed fence (for errors found while submitting).
    fn failed(&self, e: anyhow::Error) -> Fence {
        let msg = format!("{e:#}");
        self.host.submit(0, move || Err(msg))
    }

    /// Checks that live tensor `t` and slot `slot` hold the same dtype and length, and
    /// returns the tensor's address.
    fn matching(&self, t: &Tensor, buf: &SharedCounterpartBuffer, slot: usize) -> Result<u64> {
        let (addr, dtype, n) = self.dev.tensor_address(t)?;
        let spec = buf.spec(slot);
        if dtype != spec.dtype || n != spec.numel {
            bail!(
                "slot {:?} holds {} {:?} values, the live tensor {n} {dtype:?}",
                spec.name,
                spec.numel,
                spec.dtype
            );
        }
        Ok(addr)
    }

    /// Copies the pieces of a fill between host slots and staging half `h` on `q`.
    fn copy_fill(
        &self,
        q: Queue,
        h: usize,
        fill: &[Piece],
        slots: &[SlotMem],
        to_host: bool,
    ) -> Result<()> {
        let base = self.dev.address(&self.stage[h]);
        for p in fill {
            let s = &slots[p.job];
            let host = Loc::Host(host_at(s.ptr, p.start, s.dtype));
            let dev = Loc::Device(base + p.offset as u64);
            let bytes = p.len * s.dtype.size_of();
            if to_host {
                self.dev.copy(q, host, dev, bytes)?;
            } else {
                self.dev.copy(q, dev, host, bytes)?;
            }
        }
        Ok(())
    }

    /// Folds jobs into their slots through the device staging area, on the copy queues.
    /// Returns the event of the last write of the slots, `None` without jobs.
    fn fold_slots_device(
        &self,
        st: &mut State<D::Event>,
        buf: &SharedCounterpartBuffer,
        jobs: &[(usize, u64, StorageDtype, f64)],
    ) -> Result<Option<D::Event>> {
        if jobs.is_empty() {
            return Ok(None);
        }
        let slots: Vec<SlotMem> = jobs.iter().map(|j| slot_mem(buf, j.0)).collect();
        let sizes: Vec<(usize, usize)> =
            slots.iter().map(|s| (s.numel, s.dtype.size_of())).collect();
        self.after_compute(Queue::D2H)?;
        let order = &st.order[&buf.id()];
        for j in jobs {
            self.wait_deps(Queue::H2D, &order.for_read(j.0))?;
            self.wait_deps(Queue::D2H, &order.for_write(j.0))?;
        }
        let mut last = None;
        for fill in plan_fills(&sizes, self.half) {
            let h = self.take_half(st, Queue::H2D)?;
            self.copy_fill(Queue::H2D, h, &fill, &slots, false)?;
            let staged = self.dev.record(Queue::H2D)?;
            self.dev.wait(Queue::D2H, &staged)?;
            let base = self.dev.address(&self.stage[h]);
            let spans: Vec<EmaSpan> = fill
                .iter()
                .map(|p| {
                    let (_, src, src_dtype, w) = jobs[p.job];
                    EmaSpan {
                        dst: base + p.offset as u64,
                        dst_dtype: slots[p.job].dtype,
                        src: src + (p.start * src_dtype.size_of()) as u64,
                        src_dtype,
                        len: p.len,
                        w,
                    }
                })
                .collect();
            self.dev.launch(
                Queue::D2H,
                &EmaLaunch::Table {
                    entries: pack(&spans, CHUNK_ELEMS),
                    mapped: false,
                },
            )?;
            self.copy_fill(Queue::D2H, h, &fill, &slots, true)?;
            let done = self.dev.record(Queue::D2H)?;
            st.half_free[h] = Some(done.clone());
            last = Some(done);
        }
        Ok(last)
    }

    /// Folds jobs into their slots in place in mapped host memory, one launch on the D2H
    /// queue. Returns the event of the launch, `None` without jobs.
    fn fold_slots_mapped(
        &self,
        st: &State<D::Event>,
        buf: &SharedCounterpartBuffer,
        jobs: &[(usize, u64, StorageDtype, f64)],
    ) -> Result<Option<D::Event>> {
        if jobs.is_empty() {
            return Ok(None);
        }
        self.after_compute(Queue::D2H)?;
        let order = &st.order[&buf.id()];
        let mut spans = Vec::with_capacity(jobs.len());
        for &(slot, src, src_dtype, w) in jobs {
            self.wait_deps(Queue::D2H, &order.for_write(slot))?;
            let s = slot_mem(buf, slot);
            spans.push(EmaSpan {
                dst: self.dev.mapped(s.ptr)?,
                dst_dtype: s.dtype,
                src,
                src_dtype,
                len: s.numel,
                w,
            });
        }
        self.dev.launch(
            Queue::D2H,
            &EmaLaunch::Table {
                entries: pack(&spans, CHUNK_ELEMS),
                mapped: true,
            },
        )?;
        Ok(Some(self.dev.record(Queue::D2H)?))
    }

    /// Pinned host staging of at least `bytes`, once its last user is done.
    fn host_stage(&self, bytes: usize) -> Result<parking_lot::MutexGuard<'_, HostStage<D::Event>>> {
        let mut hs = self.host_stage.lock();
        if let Some(busy) = hs.busy.take() {
            Self::host_wait(&self.dev, &[busy]).map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        if hs.mem.as_ref().map_or(0, |m| m.len()) < bytes {
            hs.mem = None;
            hs.mem = Some(
                self.dev
                    .host_alloc(bytes.max(1))
                    .map_err(|e| anyhow::anyhow!("host staging for the fold: {e}"))?,
            );
        }
        Ok(hs)
    }

    /// Folds jobs into their slots on the host's threads: the sources come to pinned
    /// host memory on the D2H queue, and a host job folds once they arrived.
    fn fold_slots_host(
        &self,
        st: &mut State<D::Event>,
        buf: &Arc<SharedCounterpartBuffer>,
        jobs: &[(usize, u64, StorageDtype, f64)],
    ) -> Result<Option<Fence>> {
        if jobs.is_empty() {
            return Ok(None);
        }
        let sizes: Vec<usize> = jobs
            .iter()
            .map(|j| buf.spec(j.0).numel * j.2.size_of())
            .collect();
        let total: usize = sizes.iter().map(|b| b.next_multiple_of(64)).sum();
        let mut hs = self.host_stage(total)?;
        let base = hs.mem.as_ref().map_or(std::ptr::null_mut(), |m| m.ptr());
        self.after_compute(Queue::D2H)?;
        let mut offsets = Vec::with_capacity(jobs.len());
        let mut off = 0;
        for (j, &bytes) in jobs.iter().zip(&sizes) {
            offsets.push(off);
            self.dev.copy(
                Queue::D2H,
                Loc::Host(base.wrapping_add(off)),
                Loc::Device(j.1),
                bytes,
            )?;
            off += bytes.next_multiple_of(64);
        }
        let arrived = self.dev.record(Queue::D2H)?;
        let order = &st.order[&buf.id()];
        let mut deps: Vec<Dep<D::Event>> = vec![Dep::Device(arrived)];
        for j in jobs {
            deps.extend(order.for_write(j.0));
        }
        let dev = self.dev.clone();
        let buf2 = buf.clone();
        let job_list: Vec<(usize, usize, StorageDtype, f64)> = jobs
            .iter()
            .zip(&offsets)
            .map(|(j, &o)| (j.0, o, j.2, j.3))
            .collect();
        // The staging stays allocated until this job's fence completed (`busy`).
        let base = base as usize;
        let threads = self.threads;
        let fence = self.host.submit(0, move || {
            Self::host_wait(&dev, &deps)?;
            let base = base as *mut u8;
            let slots: Vec<usize> = job_list.iter().map(|j| j.0).collect();
            let mut guards = buf2.write_many(&slots).map_err(|e| e.to_string())?;
            let mut tasks = Vec::with_capacity(job_list.len());
            for (g, &(slot, off, dtype, w)) in guards.iter_mut().zip(&job_list) {
                let n = buf2.spec(slot).numel;
                // SAFETY: `off..off + n * size` lies in the pinned staging (sized for
                // every job above), which the D2H copies filled (waited for above) and
                // nothing writes until this job's fence completed (`busy`).
                let src = unsafe { HostSlice::from_raw(base.wrapping_add(off), dtype, n) };
                tasks.push(EmaTask {
                    dst: g.slice_mut(),
                    src,
                    w,
                });
            }
            fused_ema(&mut tasks, threads);
            Ok(())
        });
        hs.busy = Some(Dep::Host(fence.clone()));
        drop(hs);
        let order = st
            .order
            .get_mut(&buf.id())
            .expect("slot order of the buffer");
        for j in jobs {
            order.write(j.0, Dep::Host(fence.clone()));
        }
        Ok(Some(fence))
    }
}

impl<D: DeviceApi> Backend for StreamBackend<D> {
    fn allocate(
        &self,
        specs: &[SlotSpec],
        cfg: &OffloadConfig,
    ) -> Result<CounterpartBuffer, OffloadError> {
        CounterpartBuffer::allocate_in(specs, cfg, &|bytes| self.dev.host_alloc(bytes))
    }

    fn swap(&self, t: &Tensor, buf: &SharedCounterpartBuffer, slot: usize) -> Result<()> {
        let addr = self.matching(t, buf, slot)?;
        let s = slot_mem(buf, slot);
        let mut st = self.state_for(buf);
        let order = &st.order[&buf.id()];
        self.wait_deps(Queue::H2D, &order.for_read(slot))?;
        self.wait_deps(Queue::D2H, &order.for_write(slot))?;
        self.after_compute(Queue::D2H)?;
        let esize = s.dtype.size_of();
        let mut last = None;
        for fill in plan_fills(&[(s.numel, esize)], self.half) {
            let h = self.take_half(&mut st, Queue::H2D)?;
            // The slot's piece goes to staging before the live piece overwrites it ...
            self.copy_fill(Queue::H2D, h, &fill, std::slice::from_ref(&s), false)?;
            let staged = self.dev.record(Queue::H2D)?;
            self.dev.wait(Queue::D2H, &staged)?;
            // ... the live piece goes to the slot before staging overwrites it.
            for p in &fill {
                let live = addr + (p.start * esize) as u64;
                let host = Loc::Host(host_at(s.ptr, p.start, s.dtype));
                self.dev
                    .copy(Queue::D2H, host, Loc::Device(live), p.len * esize)?;
            }
            let parked = self.dev.record(Queue::D2H)?;
            self.dev.wait(Queue::H2D, &parked)?;
            let base = self.dev.address(&self.stage[h]);
            for p in &fill {
                let live = addr + (p.start * esize) as u64;
                self.dev.copy(
                    Queue::H2D,
                    Loc::Device(live),
                    Loc::Device(base + p.offset as u64),
                    p.len * esize,
                )?;
            }
            let done = self.dev.record(Queue::H2D)?;
            st.half_free[h] = Some(done.clone());
            last = Some((parked, done));
        }
        if let Some((parked, done)) = last {
            self.dev.wait(Queue::Compute, &done)?;
            let order = st
                .order
                .get_mut(&buf.id())
                .expect("slot order of the buffer");
            order.write(slot, Dep::Device(parked));
            st.inflight.push((
                done,
                Keep {
                    _tensors: vec![t.clone()],
                    _buf: Some(buf.clone()),
                },
            ));
        }
        Ok(())
    }

    fn load(&self, buf: &SharedCounterpartBuffer, slot: usize, shape: &[usize]) -> Result<Tensor> {
        let spec = buf.spec(slot).clone();
        let t = self.dev.empty(shape, spec.dtype)?;
        let addr = self.matching(&t, buf, slot)?;
        let s = slot_mem(buf, slot);
        let mut st = self.state_for(buf);
        self.after_compute(Queue::H2D)?;
        self.wait_deps(Queue::H2D, &st.order[&buf.id()].for_read(slot))?;
        self.dev
            .copy(Queue::H2D, Loc::Device(addr), Loc::Host(s.ptr), s.bytes)?;
        let e = self.dev.record(Queue::H2D)?;
        self.dev.wait(Queue::Compute, &e)?;
        let order = st
            .order
            .get_mut(&buf.id())
            .expect("slot order of the buffer");
        order.read(slot, Queue::H2D, e.clone());
        st.inflight.push((
            e,
            Keep {
                _tensors: vec![t.clone()],
                _buf: Some(buf.clone()),
            },
        ));
        Ok(t)
    }

    fn read_host(
        &self,
        buf: &SharedCounterpartBuffer,
        slot: usize,
        shape: &[usize],
    ) -> Result<Tensor> {
        // The slot's last write (a swap, store or fold on any queue) must be complete.
        let deps = self.state_for(buf).order[&buf.id()].for_read(slot);
        Self::host_wait(&self.dev, &deps).map_err(|e| anyhow::anyhow!("{e}"))?;
        let g = buf.read(slot);
        super::backend::host_tensor(g.slice(), shape)
    }

    fn store(&self, t: &Tensor, buf: &SharedCounterpartBuffer, slot: usize) -> Result<()> {
        let addr = self.matching(t, buf, slot)?;
        let s = slot_mem(buf, slot);
        let mut st = self.state_for(buf);
        self.after_compute(Queue::D2H)?;
        self.wait_deps(Queue::D2H, &st.order[&buf.id()].for_write(slot))?;
        self.dev
            .copy(Queue::D2H, Loc::Host(s.ptr), Loc::Device(addr), s.bytes)?;
        let e = self.dev.record(Queue::D2H)?;
        // The caller may change `t` next.
        self.dev.wait(Queue::Compute, &e)?;
        let order = st
            .order
            .get_mut(&buf.id())
            .expect("slot order of the buffer");
        order.write(slot, Dep::Device(e.clone()));
        st.inflight.push((
            e,
            Keep {
                _tensors: vec![t.clone()],
                _buf: Some(buf.clone()),
            },
        ));
        Ok(())
    }

    fn fold_into_slots(
        &self,
        buf: &Arc<SharedCounterpartBuffer>,
        jobs: Vec<(usize, Tensor, f64)>,
    ) -> Fence {
        let submit = || -> Result<Fence> {
            let mut resolved = Vec::with_capacity(jobs.len());
            for (slot, t, w) in &jobs {
                let (addr, dtype, n) = self.dev.tensor_address(t)?;
                let spec = buf.spec(*slot);
                if n != spec.numel {
                    bail!(
                        "fold into slot {:?}: it holds {} values, the source {n}",
                        spec.name,
                        spec.numel
                    );
                }
                resolved.push((*slot, addr, dtype, *w));
            }
            let mut st = self.state_for(buf);
            let tensors: Vec<Tensor> = jobs.iter().map(|j| j.1.clone()).collect();
            let (mapped, staged): (Vec<_>, Vec<_>) = match self.ema {
                EmaPlacement::Host => {
                    let fence = self.fold_slots_host(&mut st, buf, &resolved)?;
                    let e = self.dev.record(Queue::D2H)?;
                    st.inflight.push((
                        e,
                        Keep {
                            _tensors: tensors,
                            _buf: Some((**buf).clone()),
                        },
                    ));
                    return Ok(fence.unwrap_or_else(|| self.host.record(0)));
                }
                EmaPlacement::Device => (Vec::new(), resolved),
                EmaPlacement::Mapped => resolved.into_iter().partition(|j| !buf.is_in_file(j.0)),
            };
            let a = self.fold_slots_mapped(&st, buf, &mapped)?;
            let b = self.fold_slots_device(&mut st, buf, &staged)?;
            let order = st
                .order
                .get_mut(&buf.id())
                .expect("slot order of the buffer");
            for (events, list) in [(&a, &mapped), (&b, &staged)] {
                if let Some(e) = events {
                    for j in list {
                        order.write(j.0, Dep::Device(e.clone()));
                    }
                }
            }
            // Both launches are on the D2H queue: its last event covers them.
            let e = self.dev.record(Queue::D2H)?;
            st.inflight.push((
                e.clone(),
                Keep {
                    _tensors: tensors,
                    _buf: Some((**buf).clone()),
                },
            ));
            Ok(self.fence_for(e))
        };
        submit().unwrap_or_else(|e| self.failed(e))
    }

    fn prefetch(
        &self,
        buf: &Arc<SharedCounterpartBuffer>,
        slots: Vec<(usize, Vec<usize>)>,
    ) -> (Fence, Arc<Mutex<Vec<Tensor>>>) {
        let out = Arc::new(Mutex::new(Vec::with_capacity(slots.len())));
        let submit = || -> Result<Fence> {
            let mut tensors = Vec::with_capacity(slots.len());
            for (slot, shape) in &slots {
                tensors.push(self.dev.empty(shape, buf.spec(*slot).dtype)?);
            }
            let mut st = self.state_for(buf);
            self.after_compute(Queue::H2D)?;
            for ((slot, _), t) in slots.iter().zip(&tensors) {
                let addr = self.matching(t, buf, *slot)?;
                let s = slot_mem(buf, *slot);
                self.wait_deps(Queue::H2D, &st.order[&buf.id()].for_read(*slot))?;
                self.dev
                    .copy(Queue::H2D, Loc::Device(addr), Loc::Host(s.ptr), s.bytes)?;
            }
            let e = self.dev.record(Queue::H2D)?;
            self.dev.wait(Queue::Compute, &e)?;
            let order = st
                .order
                .get_mut(&buf.id())
                .expect("slot order of the buffer");
            for (slot, _) in &slots {
                order.read(*slot, Queue::H2D, e.clone());
            }
            st.inflight.push((
                e.clone(),
                Keep {
                    _tensors: tensors.clone(),
                    _buf: Some((**buf).clone()),
                },
            ));
            out.lock().extend(tensors);
            Ok(self.fence_for(e))
        };
        let fence = submit().unwrap_or_else(|e| self.failed(e));
        (fence, out)
    }

    fn upload(&self, uploads: &[Upload<'_>], dtype: StorageDtype) -> Result<Vec<Tensor>> {
        let size = dtype.size_of();
        // Each tensor's bytes start on a 64-byte boundary of the region.
        let spans: Vec<(usize, usize)> = uploads
            .iter()
            .scan(0usize, |at, u| {
                let span = (*at, u.values.len() * size);
                *at += span.1.div_ceil(64) * 64;
                Some(span)
            })
            .collect();
        let total = spans.last().map_or(0, |&(o, n)| o + n);
        let mut up = self.uploads.lock();
        let r = up.next % 2;
        up.next += 1;
        // The region's last copy must have read it before the host writes it again.
        if let Some(e) = up.busy[r].take() {
            #[cfg(test)]
            let skip = self.skip_upload_wait;
            #[cfg(not(test))]
            let skip = false;
            if !skip {
                self.dev.synchronize(&e)?;
            }
        }
        if up.regions[r].as_ref().is_none_or(|m| m.len() < total) {
            up.regions[r] = None;
            up.regions[r] = Some(
                self.dev
                    .host_alloc(total.max(1))
                    .map_err(|e| anyhow::anyhow!("pinned staging for weight uploads: {e}"))?,
            );
        }
        let base = up.regions[r].as_ref().expect("allocated above").ptr();
        let mut tensors = Vec::with_capacity(uploads.len());
        for (u, &(at, bytes)) in uploads.iter().zip(&spans) {
            // SAFETY: the region holds `total` bytes, 64-byte aligned, and no copy reads
            // it (waited above); `at + bytes <= total`.
            let dst = unsafe { std::slice::from_raw_parts_mut(base.add(at), bytes) };
            match dtype {
                StorageDtype::F32 => {
                    for (d, v) in dst.chunks_exact_mut(4).zip(u.values) {
                        d.copy_from_slice(&v.to_ne_bytes());
                    }
                }
                StorageDtype::BF16 => {
                    for (d, v) in dst.chunks_exact_mut(2).zip(u.values) {
                        d.copy_from_slice(&half::bf16::from_f32(*v).to_bits().to_ne_bytes());
                    }
                }
                StorageDtype::F16 => bail!("weights are uploaded in f32 or bf16, not f16"),
            }
            let t = self.dev.empty(u.shape, dtype)?;
            tensors.push(match u.track {
                true => candle_core::Var::from_tensor(&t)?.into_inner(),
                false => t,
            });
        }
        // The copies write tensors allocated (and, for a `Var`, filled) in compute order.
        self.after_compute(Queue::H2D)?;
        for (t, &(at, bytes)) in tensors.iter().zip(&spans) {
            let (addr, dt, n) = self.dev.tensor_address(t)?;
            if dt != dtype || n * size != bytes {
                bail!("an upload's tensor holds {n} {dt:?} values, not {bytes} bytes of {dtype:?}");
            }
            self.dev.copy(
                Queue::H2D,
                Loc::Device(addr),
                Loc::Host(base.wrapping_add(at)),
                bytes,
            )?;
        }
        let e = self.dev.record(Queue::H2D)?;
        // The tensors are used on the compute queue after their copies.
        self.dev.wait(Queue::Compute, &e)?;
        up.busy[r] = Some(e.clone());
        self.state.lock().inflight.push((
            e,
            Keep {
                _tensors: tensors.clone(),
                _buf: None,
            },
        ));
        Ok(tensors)
    }

    fn fold_into_live(
        &self,
        dst: &Tensor,
        buf: &SharedCounterpartBuffer,
        slot: usize,
        w: f64,
    ) -> Result<()> {
        let (addr, dtype, n) = self.dev.tensor_address(dst)?;
        let s = slot_mem(buf, slot);
        if n != s.numel {
            bail!(
                "fold from slot {:?}: it holds {} values, the live tensor {n}",
                buf.spec(slot).name,
                s.numel
            );
        }
        let mut st = self.state_for(buf);
        let read_deps = st.order[&buf.id()].for_read(slot);
        let (e, read) = match self.ema {
            EmaPlacement::Mapped if !buf.is_in_file(slot) => {
                self.after_compute(Queue::H2D)?;
                self.wait_deps(Queue::H2D, &read_deps)?;
                let span = EmaSpan {
                    dst: addr,
                    dst_dtype: dtype,
                    src: self.dev.mapped(s.ptr)?,
                    src_dtype: s.dtype,
                    len: n,
                    w,
                };
                let launch = EmaLaunch::Table {
                    entries: pack(&[span], CHUNK_ELEMS),
                    mapped: true,
                };
                self.dev.launch(Queue::H2D, &launch)?;
                let e = self.dev.record(Queue::H2D)?;
                (e.clone(), Some(e))
            }
            EmaPlacement::Host => {
                let bytes = n * dtype.size_of();
                let mut hs = self.host_stage(bytes)?;
                let base = hs.mem.as_ref().map_or(std::ptr::null_mut(), |m| m.ptr());
                self.after_compute(Queue::D2H)?;
                self.dev
                    .copy(Queue::D2H, Loc::Host(base), Loc::Device(addr), bytes)?;
                let arrived = self.dev.record(Queue::D2H)?;
                Self::host_wait(&self.dev, &[Dep::Device(arrived)])
                    .and_then(|()| Self::host_wait(&self.dev, &read_deps))
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                {
                    let g = buf.read(slot);
                    // SAFETY: the staging holds `bytes` bytes that the copy above filled
                    // (waited for), and nothing else touches them while `hs` is locked.
                    let d = unsafe { HostSliceMut::from_raw(base, dtype, n) };
                    fused_ema(
                        &mut [EmaTask {
                            dst: d,
                            src: g.slice(),
                            w,
                        }],
                        self.threads,
                    );
                }
                self.dev
                    .copy(Queue::H2D, Loc::Device(addr), Loc::Host(base), bytes)?;
                let e = self.dev.record(Queue::H2D)?;
                hs.busy = Some(Dep::Device(e.clone()));
                (e, None)
            }
            EmaPlacement::Device | EmaPlacement::Mapped => {
                self.after_compute(Queue::H2D)?;
                self.wait_deps(Queue::H2D, &read_deps)?;
                let mut last = None;
                for fill in plan_fills(&[(n, s.dtype.size_of())], self.half) {
                    let h = self.take_half(&mut st, Queue::H2D)?;
                    self.copy_fill(Queue::H2D, h, &fill, std::slice::from_ref(&s), false)?;
                    let base = self.dev.address(&self.stage[h]);
                    for p in &fill {
                        let span = EmaSpan {
                            dst: addr + (p.start * dtype.size_of()) as u64,
                            dst_dtype: dtype,
                            src: base + p.offset as u64,
                            src_dtype: s.dtype,
                            len: p.len,
                            w,
                        };
                        self.dev.launch(Queue::H2D, &EmaLaunch::Single(span))?;
                    }
                    let done = self.dev.record(Queue::H2D)?;
                    st.half_free[h] = Some(done.clone());
                    last = Some(done);
                }
                match last {
                    Some(e) => (e.clone(), Some(e)),
                    None => return Ok(()),
                }
            }
        };
        self.dev.wait(Queue::Compute, &e)?;
        if let Some(r) = read {
            let order = st
                .order
                .get_mut(&buf.id())
                .expect("slot order of the buffer");
            order.read(slot, Queue::H2D, r);
        }
        st.inflight.push((
            e,
            Keep {
                _tensors: vec![dst.clone()],
                _buf: Some(buf.clone()),
            },
        ));
        Ok(())
    }
}

impl<D: DeviceApi> Drop for StreamBackend<D> {
    fn drop(&mut self) {
        // Nothing queued may outlive the memory it uses: finish the host jobs and every
        // queue first.
        let _ = self.host.record(0).wait();
        for q in Queue::ALL {
            if let Ok(e) = self.dev.record(q) {
                let _ = self.dev.synchronize(&e);
            }
        }
        self.state.lock().inflight.clear();
    }
}

#[cfg(test)]
#[path = "stream_sim.rs"]
mod tests;
