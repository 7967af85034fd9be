//! Asynchronous host copies, modeled on CUDA streams and events, and a bounded staging area.

use std::any::Any;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam::channel::{self, Sender};
use parking_lot::{Condvar, Mutex};

use super::OffloadError;

/// A queued unit of work, already wrapped so it completes its fence.
type Job = Box<dyn FnOnce() + Send + 'static>;

/// Completion state shared by a job and the fences that watch it.
#[derive(Default)]
struct FenceState {
    result: Mutex<Option<Result<(), String>>>,
    done: Condvar,
}

/// Marks the completion of one submitted job, like a CUDA event recorded after it.
/// Clones watch the same job.
#[derive(Clone)]
pub struct Fence {
    state: Arc<FenceState>,
}

impl std::fmt::Debug for Fence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fence")
            .field("result", &*self.state.result.lock())
            .finish()
    }
}

impl Fence {
    /// Blocks until the job has finished and returns its result; a panic in the job comes
    /// back as an error, and a job that can never run (its engine is gone) as well.
    pub fn wait(&self) -> Result<(), String> {
        let mut result = self.state.result.lock();
        loop {
            if let Some(r) = &*result {
                return r.clone();
            }
            self.state.done.wait(&mut result);
        }
    }

    /// Whether the job has finished (successfully or not), without blocking.
    pub fn is_done(&self) -> bool {
        self.state.result.lock().is_some()
    }
}

/// The completing end of a fence. If it is dropped without `complete` (the job was never
/// run, or the worker unwound past it), the fence still completes, with an error, so
/// `Fence::wait` never hangs.
struct Completion {
    state: Option<Arc<FenceState>>,
}

impl Completion {
    fn new() -> (Completion, Fence) {
        let state = Arc::new(FenceState::default());
        let fence = Fence {
            state: state.clone(),
        };
        (Completion { state: Some(state) }, fence)
    }

    fn complete(mut self, result: Result<(), String>) {
        if let Some(state) = self.state.take() {
            *state.result.lock() = Some(result);
            state.done.notify_all();
        }
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if let Some(state) = self.state.take() {
            *state.result.lock() = Some(Err("copy job was dropped without running".into()));
            state.done.notify_all();
        }
    }
}

/// Text of a panic payload.
fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

/// Host copy streams: each stream is one worker thread that runs its jobs one after the
/// other in submission order, as a CUDA stream does; jobs on different streams run
/// concurrently. Dropping the engine finishes every queued job and joins the workers.
pub struct CopyEngine {
    queues: Vec<Sender<Job>>,
    workers: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for CopyEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyEngine")
            .field("streams", &self.queues.len())
            .finish()
    }
}

impl CopyEngine {
    /// Starts `streams` worker threads (at least one).
    ///
    /// # Panics
    /// If the operating system cannot start a thread.
    pub fn new(streams: usize) -> Self {
        let (queues, workers) = (0..streams.max(1))
            .map(|k| {
                let (tx, rx) = channel::unbounded::<Job>();
                let worker = std::thread::Builder::new()
                    .name(format!("ldt-copy-{k}"))
                    .spawn(move || rx.iter().for_each(|job| job()))
                    .expect("could not start a copy-stream thread");
                (tx, worker)
            })
            .unzip();
        CopyEngine { queues, workers }
    }

    /// Number of streams.
    pub fn streams(&self) -> usize {
        self.queues.len()
    }

    /// Queues `job` on `stream`; it runs after every job submitted to that stream before.
    ///
    /// # Panics
    /// If `stream >= self.streams()`.
    pub fn submit(
        &self,
        stream: usize,
        job: impl FnOnce() -> Result<(), String> + Send + 'static,
    ) -> Fence {
        self.submit_after(stream, &[], job)
    }

    /// Queues `job` on `stream` to start only once every fence in `after` has completed
    /// (like `cudaStreamWaitEvent`), which orders work across streams. The stream waits, so
    /// its later jobs wait too. If a prerequisite failed, `job` is not run and its fence
    /// fails with the prerequisite's error (a copy must not read data that never arrived).
    ///
    /// No deadlock is possible: a fence exists only for an already submitted job, so every
    /// job waits only for jobs submitted before it, and by induction over submission order
    /// each of those completes.
    ///
    /// # Panics
    /// If `stream >= self.streams()`.
    pub fn submit_after(
        &self,
        stream: usize,
        after: &[Fence],
        job: impl FnOnce() -> Result<(), String> + Send + 'static,
    ) -> Fence {
        assert!(
            stream < self.queues.len(),
            "copy stream {stream} does not exist (the engine has {})",
            self.queues.len()
        );
        let (completion, fence) = Completion::new();
        let after = after.to_vec();
        let wrapped: Job = Box::new(move || {
            let prerequisites = after.iter().try_for_each(|f| {
                f.wait()
                    .map_err(|e| format!("skipped: a job it waited for failed: {e}"))
            });
            let result = prerequisites.and_then(|()| {
                panic::catch_unwind(AssertUnwindSafe(job)).unwrap_or_else(|payload| {
                    Err(format!("copy job panicked: {}", panic_message(&*payload)))
                })
            });
            completion.complete(result);
        });
        // A send only fails once the worker is gone; the job is then dropped here, and
        // dropping its `Completion` fails the fence instead of leaving it pending.
        let _ = self.queues[stream].send(wrapped);
        fence
    }

    /// A fence that completes when every job submitted to `stream` so far has finished
    /// (like `cudaEventRecord`); it carries no error of those jobs.
    ///
    /// # Panics
    /// If `stream >= self.streams()`.
    pub fn record(&self, stream: usize) -> Fence {
        self.submit(stream, || Ok(()))
    }
}

impl Drop for CopyEngine {
    fn drop(&mut self) {
        // Closing the queues lets each worker drain what is queued and then stop.
        self.queues.clear();
        for worker in self.workers.drain(..) {
            // Jobs cannot panic past `catch_unwind`, so a join error is impossible; and
            // nothing useful could be done with one while dropping.
            let _ = worker.join();
        }
    }
}

/// Byte accounting of the staging area, with a FIFO queue of waiters.
#[derive(Debug)]
struct StagingState {
    in_use: u64,
    next_ticket: u64,
    serving: u64,
}

#[derive(Debug)]
struct StagingInner {
    capacity: u64,
    state: Mutex<StagingState>,
    freed: Condvar,
}

/// A bounded amount of staging memory (`offload.staging_bytes`) shared by all copies: a
/// swap takes leases of at most this size, chunk by chunk, instead of holding a second full
/// copy of the weights. Requests are served first come, first served, so a large chunk is
/// not starved by small ones. Cheap to clone; clones share the budget.
#[derive(Debug, Clone)]
pub struct StagingArea {
    inner: Arc<StagingInner>,
}

/// A reservation of staging bytes, returned to the area when dropped. It can be moved into
/// a copy job so the bytes are released when the copy is done.
#[derive(Debug)]
pub struct StagingLease {
    inner: Arc<StagingInner>,
    bytes: u64,
}

impl StagingLease {
    /// Bytes this lease holds.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for StagingLease {
    fn drop(&mut self) {
        self.inner.state.lock().in_use -= self.bytes;
        self.inner.freed.notify_all();
    }
}

impl StagingArea {
    /// An area of `capacity` bytes.
    pub fn new(capacity: u64) -> Self {
        StagingArea {
            inner: Arc::new(StagingInner {
                capacity,
                state: Mutex::new(StagingState {
                    in_use: 0,
                    next_ticket: 0,
                    serving: 0,
                }),
                freed: Condvar::new(),
            }),
        }
    }

    /// The whole area in bytes (for the memory report).
    pub fn capacity(&self) -> u64 {
        self.inner.capacity
    }

    /// Bytes currently leased.
    pub fn in_use(&self) -> u64 {
        self.inner.state.lock().in_use
    }

    /// Requests queued behind others or waiting for bytes (a sign of staging pressure).
    pub fn waiting(&self) -> u64 {
        let s = self.inner.state.lock();
        s.next_ticket - s.serving
    }

    /// Reserves `bytes`, blocking until they are free and every earlier request is served.
    ///
    /// # Errors
    /// [`OffloadError::StagingTooSmall`] if `bytes` exceeds the whole area: it could never
    /// be served, so the caller must copy in smaller chunks.
    pub fn acquire(&self, bytes: u64) -> Result<StagingLease, OffloadError> {
        self.check(bytes)?;
        let inner = &self.inner;
        let mut s = inner.state.lock();
        let ticket = s.next_ticket;
        s.next_ticket += 1;
        while s.serving != ticket || s.in_use + bytes > inner.capacity {
            inner.freed.wait(&mut s);
        }
        s.serving += 1;
        s.in_use += bytes;
        drop(s);
        // The next ticket may fit in what is left.
        inner.freed.notify_all();
        Ok(self.lease(bytes))
    }

    /// Reserves `bytes` only if that is possible right now without queueing.
    ///
    /// # Errors
    /// [`OffloadError::StagingTooSmall`] as for [`StagingArea::acquire`].
    pub fn try_acquire(&self, bytes: u64) -> Result<Option<StagingLease>, OffloadError> {
        self.check(bytes)?;
        let mut s = self.inner.state.lock();
        if s.next_ticket != s.serving || s.in_use + bytes > self.inner.capacity {
            return Ok(None);
        }
        s.in_use += bytes;
        drop(s);
        Ok(Some(self.lease(bytes)))
    }

    fn check(&self, bytes: u64) -> Result<(), OffloadError> {
        if bytes > self.inner.capacity {
            Err(OffloadError::StagingTooSmall {
                requested: bytes,
                capacity: self.inner.capacity,
            })
        } else {
            Ok(())
        }
    }

    fn lease(&self, bytes: u64) -> StagingLease {
        StagingLease {
            inner: self.inner.clone(),
            bytes,
        }
    }
}
