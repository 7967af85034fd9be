//! The NCCL engine (`--features nccl`, NCCL through candle's re-exported cudarc): one
//! communicator per rank on the run's GPU, driven on candle's compute stream, so a
//! gradient all-reduce is ordered after the backward pass that produced it and before the
//! optimizer step that reads it without any host synchronization.

use super::rendezvous::{launch_token, Rendezvous};
use super::{Collective, Launch};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaStream, DeviceRepr};
use candle_core::cuda_backend::cudarc::nccl::{Comm, Id, NcclType, ReduceOp};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use parking_lot::Mutex;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// How long ranks other than 0 wait for rank 0's NCCL id before giving up.
const ID_TIMEOUT: Duration = Duration::from_secs(600);

/// A NCCL communicator over the ranks of the launch, bound to one GPU.
pub struct NcclEngine {
    comm: Mutex<Comm>,
    device: CudaDevice,
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
}

// SAFETY: a NCCL communicator may be used from any thread as long as calls on it do not
// overlap; every call goes through the mutex.
unsafe impl Send for NcclEngine {}
// SAFETY: as above; shared access reaches the communicator only through the mutex.
unsafe impl Sync for NcclEngine {}

/// Creates the communicator: rank 0 makes the NCCL id and publishes it in `run_dir`,
/// the other ranks read it from there (the run directory must be on a file system every
/// node sees, as it must be for checkpoints), then all ranks join.
pub fn connect(device: &Device, launch: &Launch, run_dir: &Path) -> Result<NcclEngine> {
    let Device::Cuda(dev) = device else {
        bail!("the NCCL engine needs a CUDA device (config key `device` = \"cuda:N\")");
    };
    let token = launch_token(|k| std::env::var(k).ok());
    let rendezvous = Rendezvous::new(run_dir, &token, launch.world);
    let id = if launch.rank == 0 {
        let id = Id::new().map_err(|e| anyhow!("ncclGetUniqueId: {e:?}"))?;
        let bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
        rendezvous.publish(&bytes)?;
        id
    } else {
        let bytes = rendezvous.wait(ID_TIMEOUT)?;
        let mut internal = [0 as std::ffi::c_char; 128];
        if bytes.len() != internal.len() {
            bail!(
                "{}: the NCCL id has {} bytes, not 128",
                rendezvous.path().display(),
                bytes.len()
            );
        }
        for (d, &b) in internal.iter_mut().zip(&bytes) {
            *d = b as std::ffi::c_char;
        }
        Id::uninit(internal)
    };
    let stream = dev.cuda_stream();
    let comm = Comm::from_rank(stream.clone(), launch.rank, launch.world, id).map_err(|e| {
        anyhow!(
            "ncclCommInitRank (rank {} of {}, {}): {e:?}",
            launch.rank,
            launch.world,
            launch.launcher
        )
    });
    if launch.rank == 0 {
        // Every rank has read the id once all have joined (or the join failed).
        rendezvous.withdraw();
    }
    let engine = NcclEngine {
        comm: Mutex::new(comm?),
        device: dev.clone(),
        stream,
        rank: launch.rank,
        world: launch.world,
    };
    self_test(&engine)?;
    Ok(engine)
}

impl NcclEngine {
    /// Runs [`NcclOp`] on a tensor of this engine's GPU.
    fn on_device(&self, t: &Tensor, root: Option<i32>) -> Result<Tensor> {
        if !matches!(t.device(), Device::Cuda(d) if d.same_device(&self.device)) {
            bail!(
                "the NCCL engine works on tensors of its own GPU; got one on {:?}",
                t.device().location()
            );
        }
        let comm = self.comm.lock();
        Ok(t.contiguous()?
            .apply_op1_no_bwd(&NcclOp { comm: &comm, root })?)
    }

    /// Sums a host buffer over ranks: to the GPU, all-reduce in place, back.
    fn host_sum<T: DeviceRepr + NcclType + Copy>(&self, buf: &mut [T]) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let comm = self.comm.lock();
        let mut d: CudaSlice<T> = self.stream.clone_htod(buf)?;
        comm.all_reduce_in_place(&mut d, &ReduceOp::Sum)
            .map_err(|e| anyhow!("ncclAllReduce of {} values: {e:?}", buf.len()))?;
        self.stream.memcpy_dtoh(&d, buf)?;
        self.stream.synchronize()?;
        Ok(())
    }
}

impl Collective for NcclEngine {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        self.host_sum(buf)
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.host_sum(buf)
    }
    fn broadcast_f64(&self, buf: &mut [f64], root: usize) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let comm = self.comm.lock();
        let mut d = self.stream.clone_htod(buf)?;
        comm.broadcast_in_place(&mut d, root as i32)
            .map_err(|e| anyhow!("ncclBroadcast of {} values: {e:?}", buf.len()))?;
        self.stream.memcpy_dtoh(&d, buf)?;
        self.stream.synchronize()?;
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        self.host_sum(&mut [0f64])
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        self.on_device(t, None)
    }
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        self.on_device(t, Some(root as i32))
    }
    fn name(&self) -> &'static str {
        "nccl"
    }
}

/// A NCCL collective from a tensor's device memory into a new buffer, as a candle op so
/// that the result is an ordinary tensor on the same stream: `ncclAllReduce` (sum) or
/// `ncclBroadcast` from rank `root`, of f32, f64 or i64 values.
struct NcclOp<'a> {
    comm: &'a Comm,
    /// `None`: all-reduce (sum); `Some(root)`: broadcast from `root`.
    root: Option<i32>,
}

impl NcclOp<'_> {
    fn typed<T: CudaDType + DeviceRepr + NcclType>(
        &self,
        storage: &CudaStorage,
        lo: usize,
        hi: usize,
    ) -> candle_core::Result<CudaStorage> {
        let src = storage.as_cuda_slice::<T>()?.slice(lo..hi);
        let dev = storage.device.clone();
        // SAFETY: every element is written by the collective before anything reads it.
        let mut dst = unsafe { dev.alloc::<T>(hi - lo) }?;
        match self.root {
            None => self.comm.all_reduce(&src, &mut dst, &ReduceOp::Sum),
            Some(root) => self.comm.broadcast(Some(&src), &mut dst, root),
        }
        .map_err(|e| candle_core::Error::Msg(format!("{}: {e:?}", self.name())))?;
        Ok(CudaStorage::wrap_cuda_slice(dst, dev))
    }
}

impl CustomOp1 for NcclOp<'_> {
    fn name(&self) -> &'static str {
        match self.root {
            None => "ncclAllReduce",
            Some(_) => "ncclBroadcast",
        }
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("{} needs a CUDA tensor", self.name())
    }

    fn cuda_fwd(
        &self,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let Some((lo, hi)) = layout.contiguous_offsets() else {
            candle_core::bail!("{} needs a contiguous tensor", self.name());
        };
        let out = match storage.dtype() {
            DType::F32 => self.typed::<f32>(storage, lo, hi)?,
            DType::F64 => self.typed::<f64>(storage, lo, hi)?,
            DType::I64 => self.typed::<i64>(storage, lo, hi)?,
            d => candle_core::bail!("{} takes f32, f64 or i64 tensors, not {d:?}", self.name()),
        };
        Ok((out, layout.shape().clone()))
    }
}

/// Checks a freshly connected engine end to end: a sum over ranks of each rank's number
/// (host and device paths) and a broadcast from rank 0, so that a broken setup fails at
/// start, with the engine named, rather than in the first step.
fn self_test(engine: &NcclEngine) -> Result<()> {
    let (r, w) = (engine.rank as f64, engine.world as f64);
    let expect = w * (w - 1.0) / 2.0;
    let mut v = [r, 1.0];
    engine
        .all_reduce_sum_f64(&mut v)
        .context("NCCL self-test")?;
    let dev = Device::Cuda(engine.device.clone());
    let t = Tensor::from_slice(&[r as f32, 1.0], 2, &dev)?;
    let s = engine.all_reduce_sum(&t)?.to_vec1::<f32>()?;
    let mut b = [if engine.rank == 0 { 7.0 } else { 0.0 }];
    engine.broadcast_f64(&mut b, 0)?;
    let mine = if engine.rank == 0 { 9i64 } else { -1 };
    let c = engine
        .broadcast(&Tensor::from_slice(&[mine, mine], 2, &dev)?, 0)?
        .to_vec1::<i64>()?;
    if v != [expect, w] || s != [expect as f32, w as f32] || b != [7.0] || c != [9, 9] {
        bail!(
            "NCCL self-test on rank {} of {}: sums {v:?} (host) and {s:?} (device), broadcasts \
             {b:?} (host) and {c:?} (device); expected [{expect}, {w}], [7] and [9, 9]",
            engine.rank,
            engine.world
        );
    }
    Ok(())
}
