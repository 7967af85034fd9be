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
                Op::Launch(EmaLaunch::Table { entries, .. }) => unsafe { emulate::run(&entries) },
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
            Storage::Cpu(CpuStorage::F32(v)) => (v[a..].as_ptr() as u64, StorageDtype::F32, b - a),
            Storage::Cpu(CpuStorage::BF16(v)) => {
                (v[a..].as_ptr() as u64, StorageDtype::BF16, b - a)
            }
            Storage::Cpu(CpuStorage::F16(v)) => (v[a..].as_ptr() as u64, StorageDtype::F16, b - a),
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

/// Runs a seeded random program of backend calls the way the counterpart store uses them
/// (sources and slots of pending folds are touched only after their fences, slots
/// being prefetched are written only after theirs; changes to live tensors are
/// compute work) and returns every live tensor, every prefetched tensor and every
/// slot at the end.
fn program(backend: &dyn Backend, exec: &dyn Exec, seed: u64, steps: usize) -> Vec<Vec<u32>> {
    let (live, buf) = setup(backend, seed);
    let mut rng = Rng(seed.wrapping_add(77) | 1);
    let mut pending: Vec<Fence> = Vec::new();
    let mut staged: Vec<(Fence, Arc<Mutex<Vec<Tensor>>>)> = Vec::new();
    let mut read: Vec<Tensor> = Vec::new();
    let n = SIZES.len();
    for _ in 0..steps {
        let i = rng.below(n);
        match rng.below(9) {
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
                mix_into(exec, &live[i], t, 0.5);
            }
            5 => {
                for f in pending.drain(..).chain(staged.iter().map(|s| s.0.clone())) {
                    f.wait().unwrap();
                }
                backend.store(&live[i], &buf, 2 * i + 1).unwrap();
            }
            6 => {
                // A host read (checkpoints) waits for the slot's last write itself: a
                // fold still in flight, a swap's copy out.
                let k = 2 * i + rng.below(2);
                read.push(backend.read_host(&buf, k, &[SIZES[i]]).unwrap());
            }
            7 => {
                // A streamed block's working copy: host values uploaded (and changed
                // at once, as the host optimizer may write a master), read by compute
                // into a live tensor (after the folds reading it).
                for f in pending.drain(..) {
                    f.wait().unwrap();
                }
                let t = upload_then_change(backend, &mut rng, i, StorageDtype::F32);
                mix_into(exec, &live[i], t, 0.25);
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
    out.extend(read);
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

/// Queues `live = k * live + t` as compute work.
fn mix_into(exec: &dyn Exec, live: &Tensor, t: Tensor, k: f32) {
    let l = live.clone();
    exec.compute(Box::new(move || {
        with_slice_mut(&l, |v| {
            with_slice(&t, |s| {
                v.iter_mut().zip(s).for_each(|(x, y)| *x = k * *x + *y)
            })
            .unwrap()
        })
        .unwrap()
    }));
}

/// Uploads fresh values of layer `i`'s size in `dtype` and changes the source right
/// after; the tensor must hold the values as they were.
fn upload_then_change(
    backend: &dyn Backend,
    rng: &mut Rng,
    i: usize,
    dtype: StorageDtype,
) -> Tensor {
    let mut host = rng.values(SIZES[i]);
    let shape = [SIZES[i]];
    let up = Upload {
        values: &host,
        shape: &shape,
        track: false,
    };
    let t = backend.upload(&[up], dtype).unwrap().pop().unwrap();
    host.iter_mut().for_each(|x| *x = -*x);
    t
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

/// Weight uploads (streamed weights): three blocks through the two staging regions,
/// each read by compute queued right after it, its source changed at once. The
/// uploads' bits are the CPU backend's (f32, and bf16 rounded as it rounds); dropping
/// the compute queue's wait for a copy, or the host's wait before it reuses a staging
/// region (the third upload), gives other numbers.
#[test]
fn uploads_wait_for_their_copies_and_their_staging() {
    let run = |b: &dyn Backend, exec: &dyn Exec, seed: u64, dtype: StorageDtype| {
        let mut rng = Rng(seed);
        let sums = Arc::new(Mutex::new(Vec::new()));
        let mut uploaded = Vec::new();
        for k in 0..3 {
            let i = [4, 2, 4][k];
            let t = upload_then_change(b, &mut rng, i, dtype);
            let (sums, u) = (sums.clone(), t.clone());
            // What compute reads at the time it runs.
            exec.compute(Box::new(move || {
                let v = u.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
                sums.lock()
                    .push(v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>());
            }));
            uploaded.push(t);
        }
        exec.finish();
        let mut out = sums.lock().clone();
        for t in uploaded {
            let v = t.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
            out.push(v.iter().map(|x| x.to_bits()).collect());
        }
        out
    };
    for dtype in [StorageDtype::F32, StorageDtype::BF16] {
        let reference = run(&CpuBackend::new(1), &Now, 7, dtype);
        for seed in 1..=8u64 {
            let b = stream(seed, EmaPlacement::Host, false);
            assert!(run(&b, &b, 7, dtype) == reference, "{dtype:?}, seed {seed}");
        }
        let caught = (1..=8u64).any(|seed| {
            let b = stream(seed, EmaPlacement::Host, true);
            run(&b, &b, 7, dtype) != reference
        });
        assert!(
            caught,
            "{dtype:?}: no run noticed compute not waiting for a copy"
        );
        let mut b = stream(1, EmaPlacement::Host, false);
        b.skip_upload_wait = true;
        assert!(
            run(&b, &b, 7, dtype) != reference,
            "{dtype:?}: reusing a staging region too early went unnoticed"
        );
    }
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
