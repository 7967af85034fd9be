//! The backend trait: how layer tensors move between the live network and the
//! counterpart buffer, and how DPU folds run across them. LDT logic (the dual branch in
//! swap placement and LDT-S) is written once over this trait; [`CpuBackend`] is the host
//! implementation (the live network is itself in host memory), a CUDA backend implements
//! the same calls with pinned memory, copy streams and PTX kernels. The counterpart store
//! ([`super::store`]) picks the backend for a device and is its one user in training.

use super::{
    fused_ema, CopyEngine, CounterpartBuffer, EmaTask, Fence, HostSlice, HostSliceMut,
    OffloadConfig, OffloadError, SharedCounterpartBuffer, SlotSpec, StorageDtype,
};
use anyhow::{bail, Result};
use candle_core::{CpuStorage, Device, InplaceOp1, Layout, Storage, Tensor, Var};
use half::bf16;
use parking_lot::Mutex;
use std::sync::Arc;

/// Moves and folds layer tensors between live tensors and buffer slots.
pub trait Backend: Send + Sync {
    /// Allocates the counterpart buffer this backend works on (a device backend puts its
    /// RAM tier in pinned memory).
    ///
    /// # Errors
    /// As [`CounterpartBuffer::allocate`].
    fn allocate(
        &self,
        specs: &[SlotSpec],
        cfg: &OffloadConfig,
    ) -> Result<CounterpartBuffer, OffloadError> {
        CounterpartBuffer::allocate(specs, cfg)
    }
    /// Exchanges the contents of live tensor `t` and slot `slot` in place.
    fn swap(&self, t: &Tensor, buf: &SharedCounterpartBuffer, slot: usize) -> Result<()>;
    /// A new live tensor of `shape` holding slot `slot`.
    fn load(&self, buf: &SharedCounterpartBuffer, slot: usize, shape: &[usize]) -> Result<Tensor>;
    /// Copies live tensor `t` into slot `slot`.
    fn store(&self, t: &Tensor, buf: &SharedCounterpartBuffer, slot: usize) -> Result<()>;
    /// Starts `slot = w*slot + (1-w)*src` for each `(slot, src, w)`; the returned fence
    /// completes when every fold has read `src` and written its slot. `src` must not be
    /// modified before the fence completes.
    fn fold_into_slots(
        &self,
        buf: &Arc<SharedCounterpartBuffer>,
        jobs: Vec<(usize, Tensor, f64)>,
    ) -> Fence;
    /// Starts loading slots into new live tensors (`(slot, shape)` each, in order) so
    /// that a phase change finds them ready; the fence completes when all are loaded.
    /// Runs after every fold already submitted (same stream).
    fn prefetch(
        &self,
        buf: &Arc<SharedCounterpartBuffer>,
        slots: Vec<(usize, Vec<usize>)>,
    ) -> (Fence, Arc<Mutex<Vec<Tensor>>>);
    /// Slot `slot` as a new host (CPU) tensor of `shape` in the slot's storage dtype,
    /// read in place once the work writing it is complete (checkpoints: nothing passes
    /// through the device).
    fn read_host(
        &self,
        buf: &SharedCounterpartBuffer,
        slot: usize,
        shape: &[usize],
    ) -> Result<Tensor>;
    /// `dst = w*dst + (1-w)*slot` for a live `dst`, synchronously.
    fn fold_into_live(
        &self,
        dst: &Tensor,
        buf: &SharedCounterpartBuffer,
        slot: usize,
        w: f64,
    ) -> Result<()>;
    /// New live tensors holding host f32 values, one per [`Upload`], in `dtype` (F32, or
    /// BF16: each value rounded as `half::bf16::from_f32`): a streamed block's working
    /// copies made from its master weights. The values are read before this returns (a
    /// device backend converts them into pinned staging and copies from there on its
    /// H2D queue), so they may change at once; the compute queue waits for the copies,
    /// so the tensors may be used at once.
    fn upload(&self, uploads: &[Upload<'_>], dtype: StorageDtype) -> Result<Vec<Tensor>>;
}

/// One tensor of [`Backend::upload`].
pub struct Upload<'a> {
    /// The values (f32).
    pub values: &'a [f32],
    /// The tensor's shape.
    pub shape: &'a [usize],
    /// Whether the tensor records gradients (made a `Var`).
    pub track: bool,
}

/// The host values of `u` as a CPU tensor in `dtype` (a `Var` where it tracks): the
/// CPU backend's upload, and the rounding every backend's upload makes.
pub fn host_upload(u: &Upload<'_>, dtype: StorageDtype) -> Result<Tensor> {
    let dev = &Device::Cpu;
    Ok(match (dtype, u.track) {
        (StorageDtype::F32, false) => Tensor::from_slice(u.values, u.shape, dev)?,
        (StorageDtype::F32, true) => Var::from_slice(u.values, u.shape, dev)?.into_inner(),
        (StorageDtype::BF16, track) => {
            let bits: Vec<bf16> = u.values.iter().map(|&x| bf16::from_f32(x)).collect();
            match track {
                true => Var::from_vec(bits, u.shape, dev)?.into_inner(),
                false => Tensor::from_vec(bits, u.shape, dev)?,
            }
        }
        (StorageDtype::F16, _) => bail!("weights are uploaded in f32 or bf16, not f16"),
    })
}

/// Host backend: copies are memcpy/swap, folds run on the copy engine's worker thread
/// with the fused multi-threaded EMA.
pub struct CpuBackend {
    engine: CopyEngine,
    threads: usize,
}

impl CpuBackend {
    /// A backend with one fold stream and `threads` EMA threads.
    pub fn new(threads: usize) -> Self {
        CpuBackend {
            engine: CopyEngine::new(1),
            threads: threads.max(1),
        }
    }
}

/// A host (CPU) tensor of `shape` holding a copy of `s`, in its storage dtype.
pub fn host_tensor(s: HostSlice<'_>, shape: &[usize]) -> Result<Tensor> {
    Ok(match s {
        HostSlice::F32(v) => Tensor::from_slice(v, shape, &Device::Cpu)?,
        HostSlice::BF16(v) => Tensor::from_slice(v, shape, &Device::Cpu)?,
        HostSlice::F16(v) => Tensor::from_slice(v, shape, &Device::Cpu)?,
    })
}

/// Runs `f` on the f32 slice of a contiguous CPU tensor (read access).
pub fn with_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (s, l) = t.storage_and_layout();
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("counterpart copies need contiguous tensors")
    };
    match &*s {
        Storage::Cpu(CpuStorage::F32(v)) => Ok(f(&v[a..b])),
        _ => bail!("the CPU backend needs f32 CPU tensors"),
    }
}

struct MutSlice<F> {
    f: Mutex<Option<F>>,
}

impl<F: FnOnce(&mut [f32])> InplaceOp1 for MutSlice<F> {
    fn name(&self) -> &'static str {
        "ldt-counterpart"
    }
    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("counterpart copies need contiguous tensors")
        };
        let CpuStorage::F32(v) = s else {
            candle_core::bail!("counterpart copies need f32 tensors")
        };
        if let Some(f) = self.f.lock().take() {
            f(&mut v[a..b]);
        }
        Ok(())
    }
}

/// Runs `f` on the mutable f32 slice of a contiguous CPU tensor, in place.
pub fn with_slice_mut(t: &Tensor, f: impl FnOnce(&mut [f32])) -> Result<()> {
    t.inplace_op1(&MutSlice {
        f: Mutex::new(Some(f)),
    })?;
    Ok(())
}

fn f32_mut<'a>(s: HostSliceMut<'a>) -> Result<&'a mut [f32]> {
    match s {
        HostSliceMut::F32(v) => Ok(v),
        _ => bail!("the CPU backend keeps f32 counterparts"),
    }
}

fn f32_ref<'a>(s: HostSlice<'a>) -> Result<&'a [f32]> {
    match s {
        HostSlice::F32(v) => Ok(v),
        _ => bail!("the CPU backend keeps f32 counterparts"),
    }
}

impl Backend for CpuBackend {
    fn swap(&self, t: &Tensor, buf: &SharedCounterpartBuffer, slot: usize) -> Result<()> {
        let mut g = buf.write(slot);
        let dst = f32_mut(g.slice_mut())?;
        let mut res = Ok(());
        with_slice_mut(t, |live| {
            if live.len() == dst.len() {
                live.swap_with_slice(dst);
            } else {
                res = Err(anyhow::anyhow!(
                    "slot {slot} holds {} values, the live tensor {}",
                    dst.len(),
                    live.len()
                ));
            }
        })?;
        res
    }

    fn load(&self, buf: &SharedCounterpartBuffer, slot: usize, shape: &[usize]) -> Result<Tensor> {
        let g = buf.read(slot);
        Ok(Tensor::from_slice(
            f32_ref(g.slice())?,
            shape,
            &Device::Cpu,
        )?)
    }

    fn read_host(
        &self,
        buf: &SharedCounterpartBuffer,
        slot: usize,
        shape: &[usize],
    ) -> Result<Tensor> {
        // Folds run on the engine's stream: everything submitted so far must be done.
        self.engine
            .record(0)
            .wait()
            .map_err(|e| anyhow::anyhow!("counterpart fold failed: {e}"))?;
        self.load(buf, slot, shape)
    }

    fn store(&self, t: &Tensor, buf: &SharedCounterpartBuffer, slot: usize) -> Result<()> {
        let mut g = buf.write(slot);
        let dst = f32_mut(g.slice_mut())?;
        with_slice(t, |src| dst.copy_from_slice(src))
    }

    fn upload(&self, uploads: &[Upload<'_>], dtype: StorageDtype) -> Result<Vec<Tensor>> {
        uploads.iter().map(|u| host_upload(u, dtype)).collect()
    }

    fn fold_into_slots(
        &self,
        buf: &Arc<SharedCounterpartBuffer>,
        jobs: Vec<(usize, Tensor, f64)>,
    ) -> Fence {
        let buf = buf.clone();
        let threads = self.threads;
        self.engine.submit(0, move || {
            let slots: Vec<usize> = jobs.iter().map(|j| j.0).collect();
            let mut guards = buf.write_many(&slots).map_err(|e| e.to_string())?;
            let reads: Vec<_> = jobs.iter().map(|j| j.1.storage_and_layout()).collect();
            let mut tasks = Vec::with_capacity(jobs.len());
            for ((g, (s, l)), j) in guards.iter_mut().zip(&reads).zip(&jobs) {
                let (a, b) = l.contiguous_offsets().ok_or("fold source not contiguous")?;
                let Storage::Cpu(CpuStorage::F32(v)) = &**s else {
                    return Err("fold source is not an f32 CPU tensor".into());
                };
                tasks.push(EmaTask {
                    dst: g.slice_mut(),
                    src: HostSlice::F32(&v[a..b]),
                    w: j.2,
                });
            }
            fused_ema(&mut tasks, threads);
            Ok(())
        })
    }

    fn prefetch(
        &self,
        buf: &Arc<SharedCounterpartBuffer>,
        slots: Vec<(usize, Vec<usize>)>,
    ) -> (Fence, Arc<Mutex<Vec<Tensor>>>) {
        let out = Arc::new(Mutex::new(Vec::with_capacity(slots.len())));
        let (buf, sink) = (buf.clone(), out.clone());
        let fence = self.engine.submit(0, move || {
            for (slot, shape) in slots {
                let g = buf.read(slot);
                let HostSlice::F32(v) = g.slice() else {
                    return Err("the CPU backend keeps f32 counterparts".into());
                };
                let t = Tensor::from_slice(v, shape, &Device::Cpu).map_err(|e| e.to_string())?;
                sink.lock().push(t);
            }
            Ok(())
        });
        (fence, out)
    }

    fn fold_into_live(
        &self,
        dst: &Tensor,
        buf: &SharedCounterpartBuffer,
        slot: usize,
        w: f64,
    ) -> Result<()> {
        let g = buf.read(slot);
        let src = g.slice();
        let threads = self.threads;
        with_slice_mut(dst, |d| {
            fused_ema(
                &mut [EmaTask {
                    dst: HostSliceMut::F32(d),
                    src,
                    w,
                }],
                threads,
            )
        })
    }
}

/// The DPU fold between two live tensors (the resident dual branch): `dst = w*dst +
/// (1-w)*src` with the authors' f32 arithmetic (`dst*f32(w) + f32(1-w)*src`, no fused
/// multiply-add), through the fused EMA the counterpart buffer uses, so every placement
/// computes the same bits: the host's fused EMA for CPU tensors, [`fold_generic`] on
/// other devices (and inside [`crate::model::dispatch::with_generic_ops`]).
pub fn fold_live(dst: &Tensor, src: &Tensor, w: f64) -> Result<()> {
    if crate::model::dispatch::generic_path(dst) {
        return fold_generic(dst, src, w);
    }
    with_slice(src, |s| {
        with_slice_mut(dst, |d| {
            fused_ema(
                &mut [EmaTask {
                    dst: HostSliceMut::F32(d),
                    src: HostSlice::F32(s),
                    w,
                }],
                1,
            )
        })
    })?
}

/// The fold in tensor ops for any device, written into `dst` in place: `f32(w)*dst` and
/// `f32(1-w)*src` rounded separately, then added — the host fold's arithmetic (checked
/// bit for bit against it on the CPU).
#[doc(hidden)]
pub fn fold_generic(dst: &Tensor, src: &Tensor, w: f64) -> Result<()> {
    let new = (dst.affine(w, 0.0)? + src.affine(1.0 - w, 0.0)?)?;
    dst.slice_set(&new, 0, 0)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn generic_fold_computes_the_host_bits() {
        use candle_core::{Device, Tensor};
        let n = 1003;
        let mut r = crate::rng::Rng::new(9, 9);
        let mk = |r: &mut crate::rng::Rng| {
            let v: Vec<f32> = (0..n).map(|_| (r.next_f64() * 8.0 - 4.0) as f32).collect();
            Tensor::from_vec(v, n, &Device::Cpu).unwrap()
        };
        let (a, src) = (mk(&mut r), mk(&mut r));
        let b = a.copy().unwrap();
        for w in [0.99, 0.999, 0.9997, 0.5, 0.0] {
            super::fold_live(&a, &src, w).unwrap();
            super::fold_generic(&b, &src, w).unwrap();
            let (x, y) = (a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
            assert!(
                x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()),
                "w = {w}"
            );
        }
    }
}
