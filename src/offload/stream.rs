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

use super::backend::Backend;
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
    _buf: SharedCounterpartBuffer,
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

/// The [`Backend`] of a device with queues (see the module documentation).
pub struct StreamBackend<D: DeviceApi> {
    dev: Arc<D>,
    ema: EmaPlacement,
    stage: [D::Memory; 2],
    half: usize,
    state: Mutex<State<D::Event>>,
    host_stage: Mutex<HostStage<D::Event>>,
    host: CopyEngine,
    threads: usize,
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
            host: CopyEngine::new(1),
            threads: offload.threads.max(1),
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
                    _buf: buf.clone(),
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
                _buf: buf.clone(),
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
                _buf: buf.clone(),
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
                            _buf: (**buf).clone(),
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
                    _buf: (**buf).clone(),
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
                    _buf: (**buf).clone(),
                },
            ));
            out.lock().extend(tensors);
            Ok(self.fence_for(e))
        };
        let fence = submit().unwrap_or_else(|e| self.failed(e));
        (fence, out)
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
                _buf: buf.clone(),
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
mod tests {
    //! The backend on a simulated device: the test's "compute" (changes to live tensors)
    //! is queued on the compute queue like the copies on theirs, and queued work runs
    //! only when the host waits for it, in a seeded random order of the queues that
    //! respects nothing but the recorded waits. A missing wait therefore reads or
    //! overwrites data too early and the numbers differ from [`CpuBackend`]'s.

    use super::*;
    use crate::offload::backend::{with_slice, with_slice_mut, CpuBackend};
    use crate::offload::buffer::std_alloc;
    use crate::offload::launch::emulate;
    use candle_core::{CpuStorage, DType, Device, Storage};
    use half::{bf16, f16};
    use std::collections::VecDeque;

    /// A recorded point: complete when queue `q` has run `seq` operations.
    #[derive(Clone, Debug)]
    struct SimEvent {
        q: usize,
        seq: u64,
    }

    /// Work the test queues on the compute queue.
    type Job = Box<dyn FnOnce() + Send>;

    enum Op {
        Compute(Job),
        Copy { dst: u64, src: u64, bytes: usize },
        Launch(EmaLaunch),
        Wait(SimEvent),
    }

    struct SimState {
        queues: [VecDeque<Op>; 3],
        issued: [u64; 3],
        done: [u64; 3],
        rng: u64,
        ops_run: u64,
    }

    /// The simulated device; `ignore_waits` drops every cross-queue wait (to show the
    /// tests notice).
    struct Sim {
        state: std::sync::Mutex<SimState>,
        ignore_waits: bool,
    }

    struct SimMem(Vec<u64>);

    fn loc(l: Loc) -> u64 {
        match l {
            Loc::Device(a) => a,
            Loc::Host(p) => p as u64,
        }
    }

    impl Sim {
        fn new(seed: u64, ignore_waits: bool) -> Sim {
            Sim {
                state: std::sync::Mutex::new(SimState {
                    queues: Default::default(),
                    issued: [0; 3],
                    done: [0; 3],
                    rng: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
                    ops_run: 0,
                }),
                ignore_waits,
            }
        }

        fn push(&self, q: Queue, op: Op) {
            let mut s = self.state.lock().unwrap();
            s.queues[q.index()].push_back(op);
            s.issued[q.index()] += 1;
        }

        /// Runs queued operations, the queue chosen at random among those whose next
        /// operation may run, until `e` completed.
        fn run_until(&self, e: &SimEvent) {
            let mut s = self.state.lock().unwrap();
            while s.done[e.q] < e.seq {
                let ready: Vec<usize> = (0..3)
                    .filter(|&q| match s.queues[q].front() {
                        None => false,
                        Some(Op::Wait(w)) => s.done[w.q] >= w.seq,
                        Some(_) => true,
                    })
                    .collect();
                assert!(!ready.is_empty(), "deadlock: nothing can run");
                s.rng ^= s.rng << 13;
                s.rng ^= s.rng >> 7;
                s.rng ^= s.rng << 17;
                let q = ready[(s.rng % ready.len() as u64) as usize];
                let op = s.queues[q].pop_front().expect("a ready queue has an op");
                match op {
                    Op::Compute(job) => job(),
                    // SAFETY: the backend hands out addresses of live tensors, slots,
                    // staging and host staging that it keeps alive until the event of the
                    // operation completed; running here is that completion.
                    Op::Copy { dst, src, bytes } => unsafe {
                        std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, bytes)
                    },
                    // SAFETY: as for copies.
                    Op::Launch(EmaLaunch::Table { entries, .. }) => unsafe {
                        emulate::run(&entries)
                    },
                    // SAFETY: as for copies.
                    Op::Launch(EmaLaunch::Single(sp)) => unsafe { emulate::run(&pack(&[sp], 256)) },
                    Op::Wait(_) => {}
                }
                s.done[q] += 1;
                s.ops_run += 1;
            }
        }
    }

    impl DeviceApi for Sim {
        type Event = SimEvent;
        type Memory = SimMem;

        fn record(&self, q: Queue) -> Result<SimEvent> {
            let s = self.state.lock().unwrap();
            Ok(SimEvent {
                q: q.index(),
                seq: s.issued[q.index()],
            })
        }
        fn wait(&self, q: Queue, e: &SimEvent) -> Result<()> {
            if !self.ignore_waits {
                self.push(q, Op::Wait(e.clone()));
            }
            Ok(())
        }
        fn synchronize(&self, e: &SimEvent) -> Result<()> {
            self.run_until(e);
            Ok(())
        }
        fn is_complete(&self, e: &SimEvent) -> Result<bool> {
            Ok(self.state.lock().unwrap().done[e.q] >= e.seq)
        }
        fn alloc(&self, bytes: usize) -> Result<SimMem> {
            Ok(SimMem(vec![0xDEAD_BEEF_DEAD_BEEF; bytes.div_ceil(8)]))
        }
        fn address(&self, m: &SimMem) -> u64 {
            m.0.as_ptr() as u64
        }
        fn tensor_address(&self, t: &Tensor) -> Result<(u64, StorageDtype, usize)> {
            let (s, l) = t.storage_and_layout();
            let (a, b) = l.contiguous_offsets().context("not contiguous")?;
            Ok(match &*s {
                Storage::Cpu(CpuStorage::F32(v)) => {
                    (v[a..].as_ptr() as u64, StorageDtype::F32, b - a)
                }
                Storage::Cpu(CpuStorage::BF16(v)) => {
                    (v[a..].as_ptr() as u64, StorageDtype::BF16, b - a)
                }
                Storage::Cpu(CpuStorage::F16(v)) => {
                    (v[a..].as_ptr() as u64, StorageDtype::F16, b - a)
                }
                _ => bail!("unsupported tensor"),
            })
        }
        fn empty(&self, shape: &[usize], dtype: StorageDtype) -> Result<Tensor> {
            let d = match dtype {
                StorageDtype::F32 => DType::F32,
                StorageDtype::BF16 => DType::BF16,
                StorageDtype::F16 => DType::F16,
            };
            // Poisoned, so a copy that never arrives is visible.
            Ok((Tensor::ones(shape, d, &Device::Cpu)? * 12345.0)?)
        }
        fn copy(&self, q: Queue, dst: Loc, src: Loc, bytes: usize) -> Result<()> {
            self.push(
                q,
                Op::Copy {
                    dst: loc(dst),
                    src: loc(src),
                    bytes,
                },
            );
            Ok(())
        }
        fn launch(&self, q: Queue, l: &EmaLaunch) -> Result<()> {
            self.push(q, Op::Launch(l.clone()));
            Ok(())
        }
        fn host_alloc(&self, bytes: usize) -> Result<Box<dyn HostMemory>, OffloadError> {
            std_alloc(bytes)
        }
        fn mapped(&self, host: *mut u8) -> Result<u64> {
            Ok(host as u64)
        }
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn values(&mut self, n: usize) -> Vec<f32> {
            (0..n)
                .map(|_| (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0)
                .collect()
        }
    }

    /// Layer sizes: odd, one larger than a staging half, one empty.
    const SIZES: [usize; 5] = [1, 300, 1000, 0, 2500];
    /// 2 x 1152 bytes: halves of 288 f32, so large tensors go in many fills.
    const STAGING: u64 = 2304;

    fn offload(threads: usize) -> OffloadConfig {
        OffloadConfig {
            host_budget_bytes: 1 << 30,
            file_path: None,
            staging_bytes: STAGING,
            threads,
        }
    }

    /// Live tensors, and a buffer with two slots per layer (weight, moment).
    fn setup(backend: &dyn Backend, seed: u64) -> (Vec<Tensor>, Arc<SharedCounterpartBuffer>) {
        let mut rng = Rng(seed | 1);
        let live: Vec<Tensor> = SIZES
            .iter()
            .map(|&n| Tensor::from_vec(rng.values(n), n, &Device::Cpu).unwrap())
            .collect();
        let specs: Vec<SlotSpec> = SIZES
            .iter()
            .enumerate()
            .flat_map(|(i, &n)| {
                ["w", "m"].map(|k| SlotSpec {
                    name: format!("{i}:{k}"),
                    numel: n,
                    dtype: StorageDtype::F32,
                })
            })
            .collect();
        let buf = backend.allocate(&specs, &offload(2)).unwrap();
        let buf = Arc::new(SharedCounterpartBuffer::new(buf));
        for (i, &n) in SIZES.iter().enumerate() {
            let t = Tensor::from_vec(rng.values(n), n, &Device::Cpu).unwrap();
            backend.store(&t, &buf, 2 * i).unwrap();
            backend.store(&live[i], &buf, 2 * i + 1).unwrap();
        }
        (live, buf)
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        with_slice(t, |s| s.iter().map(|x| x.to_bits()).collect()).unwrap()
    }

    /// Where the test's compute runs: at once (the CPU backend), or queued on the
    /// simulated compute queue.
    trait Exec {
        /// Runs or queues `job`.
        fn compute(&self, job: Job);
        /// Completes everything queued.
        fn finish(&self);
    }

    /// The CPU backend's compute: the calling thread, at once.
    struct Now;

    impl Exec for Now {
        fn compute(&self, job: Job) {
            job()
        }
        fn finish(&self) {}
    }

    impl Exec for StreamBackend<Sim> {
        fn compute(&self, job: Job) {
            self.device().push(Queue::Compute, Op::Compute(job));
        }
        fn finish(&self) {
            for q in Queue::ALL {
                let e = self.device().record(q).unwrap();
                self.device().run_until(&e);
            }
        }
    }

    /// Runs a seeded random program of backend calls the way `train::single` uses them
    /// (sources and slots of pending folds are touched only after their fences, slots
    /// being prefetched are written only after theirs; changes to live tensors are
    /// compute work) and returns every live tensor, every prefetched tensor and every
    /// slot at the end.
    fn program(backend: &dyn Backend, exec: &dyn Exec, seed: u64, steps: usize) -> Vec<Vec<u32>> {
        let (live, buf) = setup(backend, seed);
        let mut rng = Rng(seed.wrapping_add(77) | 1);
        let mut pending: Vec<Fence> = Vec::new();
        let mut staged: Vec<(Fence, Arc<Mutex<Vec<Tensor>>>)> = Vec::new();
        let n = SIZES.len();
        for _ in 0..steps {
            let i = rng.below(n);
            match rng.below(7) {
                0 => {
                    // An optimizer step changes every live tensor.
                    for f in pending.drain(..) {
                        f.wait().unwrap();
                    }
                    let k = rng.next() as f32 / u64::MAX as f32;
                    let ts = live.clone();
                    exec.compute(Box::new(move || {
                        for t in &ts {
                            with_slice_mut(t, |v| v.iter_mut().for_each(|x| *x = *x * 0.75 + k))
                                .unwrap();
                        }
                    }));
                }
                1 => {
                    for f in pending.drain(..).chain(staged.iter().map(|s| s.0.clone())) {
                        f.wait().unwrap();
                    }
                    backend.swap(&live[i], &buf, 2 * i + rng.below(2)).unwrap();
                }
                2 => {
                    let jobs: Vec<(usize, Tensor, f64)> = (0..n)
                        .filter(|_| rng.below(2) == 0)
                        .map(|j| (2 * j, live[j].clone(), 0.9 + 0.01 * j as f64))
                        .collect();
                    pending.push(backend.fold_into_slots(&buf, jobs));
                }
                3 => {
                    for f in pending.drain(..) {
                        f.wait().unwrap();
                    }
                    backend
                        .fold_into_live(&live[i], &buf, 2 * i + 1, 0.99)
                        .unwrap();
                }
                4 => {
                    for f in pending.drain(..) {
                        f.wait().unwrap();
                    }
                    let t = backend.load(&buf, 2 * i, &[SIZES[i]]).unwrap();
                    let l = live[i].clone();
                    exec.compute(Box::new(move || {
                        with_slice_mut(&l, |v| {
                            with_slice(&t, |s| {
                                v.iter_mut().zip(s).for_each(|(x, y)| *x = 0.5 * *x + *y)
                            })
                            .unwrap()
                        })
                        .unwrap()
                    }));
                }
                5 => {
                    for f in pending.drain(..).chain(staged.iter().map(|s| s.0.clone())) {
                        f.wait().unwrap();
                    }
                    backend.store(&live[i], &buf, 2 * i + 1).unwrap();
                }
                _ => {
                    let slots = (0..n).map(|j| (2 * j + 1, vec![SIZES[j]])).collect();
                    staged.push(backend.prefetch(&buf, slots));
                }
            }
        }
        for f in pending.drain(..) {
            f.wait().unwrap();
        }
        let mut out: Vec<Tensor> = live.clone();
        for (f, ts) in staged {
            f.wait().unwrap();
            out.extend(ts.lock().iter().cloned());
        }
        for k in 0..buf.len() {
            out.push(backend.load(&buf, k, &[buf.spec(k).numel]).unwrap());
        }
        exec.finish();
        out.iter().map(bits).collect()
    }

    fn stream(seed: u64, ema: EmaPlacement, ignore_waits: bool) -> StreamBackend<Sim> {
        StreamBackend::new(Sim::new(seed, ignore_waits), &offload(2), ema).unwrap()
    }

    const PLACEMENTS: [EmaPlacement; 3] = [
        EmaPlacement::Host,
        EmaPlacement::Device,
        EmaPlacement::Mapped,
    ];

    #[test]
    fn every_placement_computes_what_the_cpu_backend_computes() {
        for seed in 1..=12u64 {
            let reference = program(&CpuBackend::new(2), &Now, seed, 60);
            for ema in PLACEMENTS {
                let b = stream(seed * 31, ema, false);
                let got = program(&b, &b, seed, 60);
                assert_eq!(got.len(), reference.len());
                for (k, (g, r)) in got.iter().zip(&reference).enumerate() {
                    assert!(g == r, "seed {seed}, {ema:?}: tensor {k} differs");
                }
                assert!(b.device().state.lock().unwrap().ops_run > 0);
            }
        }
    }

    /// The same programs with every cross-queue wait dropped go wrong: the test above
    /// would catch a missing wait.
    #[test]
    fn dropping_the_waits_is_caught() {
        for ema in PLACEMENTS {
            let wrong = (1..=12u64).any(|seed| {
                let reference = program(&CpuBackend::new(2), &Now, seed, 60);
                let b = stream(seed * 31, ema, true);
                program(&b, &b, seed, 60) != reference
            });
            assert!(wrong, "{ema:?}: no program noticed the missing waits");
        }
    }

    /// Slots in bf16 and f16 (the live side f32, or the slot's dtype for copies): the
    /// folds in every placement give the host fold's bits.
    #[test]
    fn narrow_slots_fold_like_the_host() {
        for dtype in [StorageDtype::BF16, StorageDtype::F16] {
            for ema in PLACEMENTS {
                let b = stream(5, ema, false);
                let mut rng = Rng(99);
                let n = 1001;
                let specs = vec![SlotSpec {
                    name: "s".into(),
                    numel: n,
                    dtype,
                }];
                let buf = Arc::new(SharedCounterpartBuffer::new(
                    b.allocate(&specs, &offload(1)).unwrap(),
                ));
                let init = rng.values(n);
                buf.write(0).slice_mut().copy_from_f32(&init);
                let src = Tensor::from_vec(rng.values(n), n, &Device::Cpu).unwrap();
                let mut expect = buf.read(0).slice().as_bytes().to_vec();
                let mut host = CounterpartBuffer::allocate(&specs, &offload(1)).unwrap();
                host.write_bytes(0, &expect).unwrap();
                with_slice(&src, |s| {
                    fused_ema(
                        &mut [EmaTask {
                            dst: host.slot_mut(0),
                            src: HostSlice::F32(s),
                            w: 0.97,
                        }],
                        1,
                    )
                })
                .unwrap();
                b.fold_into_slots(&buf, vec![(0, src.clone(), 0.97)])
                    .wait()
                    .unwrap();
                let t = b.load(&buf, 0, &[n]).unwrap();
                b.finish();
                host.read_bytes(0, &mut expect).unwrap();
                let got = match dtype {
                    StorageDtype::BF16 => t
                        .to_vec1::<bf16>()
                        .unwrap()
                        .iter()
                        .map(|x| x.to_bits())
                        .collect::<Vec<_>>(),
                    _ => t
                        .to_vec1::<f16>()
                        .unwrap()
                        .iter()
                        .map(|x| x.to_bits())
                        .collect(),
                };
                let want: Vec<u16> = expect
                    .chunks_exact(2)
                    .map(|c| u16::from_ne_bytes([c[0], c[1]]))
                    .collect();
                assert!(got == want, "{dtype:?} {ema:?}: fold into slot");
                // And back into an f32 live tensor.
                let live = Tensor::from_vec(rng.values(n), n, &Device::Cpu).unwrap();
                let mut want = with_slice(&live, |s| s.to_vec()).unwrap();
                let slot32: Vec<f32> = {
                    let mut v = vec![0f32; n];
                    host.read_into_f32(0, &mut v).unwrap();
                    v
                };
                fused_ema(
                    &mut [EmaTask {
                        dst: HostSliceMut::F32(&mut want),
                        src: host.slot(0),
                        w: 0.9,
                    }],
                    1,
                );
                assert_ne!(want, slot32);
                b.fold_into_live(&live, &buf, 0, 0.9).unwrap();
                b.finish();
                let got = with_slice(&live, |s| s.to_vec()).unwrap();
                let same = got
                    .iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{dtype:?} {ema:?}: fold into live");
            }
        }
    }

    #[test]
    fn mismatched_tensors_are_errors() {
        let b = stream(1, EmaPlacement::Device, false);
        let specs = vec![SlotSpec {
            name: "layer:w".into(),
            numel: 4,
            dtype: StorageDtype::F32,
        }];
        let buf = Arc::new(SharedCounterpartBuffer::new(
            b.allocate(&specs, &offload(1)).unwrap(),
        ));
        let t = Tensor::zeros(5, DType::F32, &Device::Cpu).unwrap();
        let e = b.store(&t, &buf, 0).unwrap_err().to_string();
        assert!(e.contains("\"layer:w\" holds 4"), "{e}");
        let e = b
            .fold_into_slots(&buf, vec![(0, t.clone(), 0.5)])
            .wait()
            .unwrap_err();
        assert!(e.contains("the source 5"), "{e}");
        assert!(b.fold_into_live(&t, &buf, 0, 0.5).is_err());
    }

    #[test]
    fn a_staging_area_below_two_cuts_is_refused() {
        let mut o = offload(1);
        o.staging_bytes = 2 * MIN_HALF_BYTES as u64 - 2;
        let e = StreamBackend::new(Sim::new(1, false), &o, EmaPlacement::Host)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("offload.staging_bytes"), "{e}");
    }
}
