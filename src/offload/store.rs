//! The counterpart store: what one live network's other branch keeps while it is parked,
//! layer by layer — that branch's weights and the optimizer state of the layers it
//! trains — in the counterpart buffer, moved and folded by a [`Backend`].
//!
//! Per layer the store owns one weight slot (the copy that is not live: in phase P the
//! AM copy `A^U` / `~A^S`, in phase A the PM copy) and the optimizer-state slots of that
//! layer's trained copy while its branch is parked (`m` only when the optimizer keeps a
//! first moment or momentum). Callers speak in layers; slots, fences and staging are the
//! store's own business. Folds into parked weights run asynchronously and are fenced
//! before anything reads or replaces their source ([`CounterpartStore::sync`], which
//! every swap and read calls itself). Every operation fails with an [`OffloadError`]
//! that names what the store was doing and the layer.

use super::backend::{Backend, CpuBackend};
use super::ema::{fused_ema, EmaTask};
use super::slice::{HostSlice, HostSliceMut};
use super::{
    Fence, OffloadConfig, OffloadError, SharedCounterpartBuffer, SlotSpec, StagingArea,
    StagingLease, StorageDtype,
};
use crate::config::EmaPlacement;
use crate::optim::LayerState;
use anyhow::bail;
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::sync::Arc;

/// The store's results.
pub type Result<T> = std::result::Result<T, OffloadError>;

/// An [`OffloadError::Store`] for what `action` says; the text is made only on failure
/// (these calls sit on the training path, per layer).
fn failed<F: FnOnce() -> String>(action: F) -> impl FnOnce(anyhow::Error) -> OffloadError {
    move |e| OffloadError::Store {
        action: action(),
        message: format!("{e:#}"),
    }
}

/// The backend for `device`: [`CpuBackend`] on the CPU (where only `EmaPlacement::Host`
/// exists); on a GPU (feature `cuda`) the streamed backend with the counterparts in
/// pinned memory, a copy stream per direction and the PTX kernels, folding where `ema`
/// says.
///
/// # Errors
/// For a device this build cannot drive, or when the GPU backend cannot start.
pub fn backend_for(
    device: &Device,
    offload: &OffloadConfig,
    ema: EmaPlacement,
) -> anyhow::Result<Box<dyn Backend>> {
    match device {
        Device::Cpu if ema == EmaPlacement::Host => Ok(Box::new(CpuBackend::new(offload.threads))),
        Device::Cpu => bail!(
            "config key `offload.ema` = `{ema:?}` folds with a GPU kernel; on the CPU use `host`"
        ),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => Ok(Box::new(super::cuda::backend(device, offload, ema)?)),
        other => bail!("no counterpart backend for {other:?} in this build"),
    }
}

/// One parameter tensor of the network whose counterparts the store keeps.
#[derive(Clone, Debug)]
pub struct LayerSpec {
    /// Parameter name (slot names and error messages).
    pub name: String,
    /// Shape of the live tensor.
    pub shape: Vec<usize>,
}

/// The buffer slots of one layer.
struct LayerSlots {
    name: String,
    shape: Vec<usize>,
    weight: usize,
    m: Option<usize>,
    v: Option<usize>,
}

/// A parked layer's optimizer state outside its moments: the step count and which
/// moments its slots hold. Written to checkpoints as `[step, has_m, has_v]`.
pub type ParkedState = (u64, bool, bool);

/// Optimizer state of the next phase, loading early into the staging area.
struct Staged {
    fence: Fence,
    tensors: Arc<parking_lot::Mutex<Vec<Tensor>>>,
    /// `(layer, has m, has v)` in load order.
    layers: Vec<(usize, bool, bool)>,
    lease: StagingLease,
}

/// The counterparts of one live network: the parked branch's weights and optimizer
/// state, per layer.
pub struct CounterpartStore {
    buf: Arc<SharedCounterpartBuffer>,
    tiers: (u64, u64),
    backend: Box<dyn Backend>,
    layers: Vec<LayerSlots>,
    parked: Vec<Option<ParkedState>>,
    pending: Vec<Fence>,
    staging: StagingArea,
    staged: Option<Staged>,
    ready: HashMap<usize, (Option<Tensor>, Option<Tensor>)>,
    /// Threads of the host folds of master weights (`offload.threads`).
    threads: usize,
}

impl CounterpartStore {
    /// Allocates the store for `layers` on `device` (RAM up to `offload.host_bytes`,
    /// pinned on a GPU, the file tier beyond). `(with_m, with_v)`: the slots of the
    /// optimizer state that parks here — a first moment (Adam with beta1 > 0) or
    /// momentum, a second moment (Adam) — none when the state stays on the host
    /// (`offload.optimizer = "host"`). A budget too small is an error with the bytes
    /// needed and the settings to change.
    pub fn allocate(
        layers: &[LayerSpec],
        (with_m, with_v): (bool, bool),
        device: &Device,
        offload: &OffloadConfig,
        ema: EmaPlacement,
    ) -> Result<Self> {
        let backend = backend_for(device, offload, ema)
            .map_err(failed(|| "choosing the counterpart backend".into()))?;
        let mut specs = Vec::new();
        let mut slot = |name: String, numel: usize| {
            specs.push(SlotSpec {
                name,
                numel,
                dtype: StorageDtype::F32,
            });
            specs.len() - 1
        };
        let slots: Vec<LayerSlots> = layers
            .iter()
            .map(|l| {
                let n = l.shape.iter().product();
                let weight = slot(format!("{}:weight", l.name), n);
                let m = with_m.then(|| slot(format!("{}:m", l.name), n));
                let v = with_v.then(|| slot(format!("{}:v", l.name), n));
                LayerSlots {
                    name: l.name.clone(),
                    shape: l.shape.clone(),
                    weight,
                    m,
                    v,
                }
            })
            .collect();
        let buf = backend.allocate(&specs, offload)?;
        Ok(CounterpartStore {
            tiers: (buf.bytes_in_ram(), buf.bytes_in_file()),
            buf: Arc::new(SharedCounterpartBuffer::new(buf)),
            backend,
            parked: vec![None; slots.len()],
            layers: slots,
            pending: Vec::new(),
            staging: StagingArea::new(offload.staging_bytes),
            staged: None,
            ready: HashMap::new(),
            threads: offload.threads,
        })
    }

    /// Waits for every fold in flight.
    pub fn sync(&mut self) -> Result<()> {
        for f in self.pending.drain(..) {
            f.wait().map_err(|message| OffloadError::Store {
                action: "the counterpart fold".into(),
                message,
            })?;
        }
        Ok(())
    }

    /// Parks a copy of live tensor `t` as layer `i`'s counterpart weights.
    pub fn park_weights(&mut self, i: usize, t: &Tensor) -> Result<()> {
        self.sync()?;
        let l = &self.layers[i];
        self.backend
            .store(t, &self.buf, l.weight)
            .map_err(failed(|| format!("parking the weights of `{}`", l.name)))
    }

    /// Exchanges live tensor `t` with layer `i`'s parked weights, in place.
    pub fn swap_weights(&mut self, i: usize, t: &Tensor) -> Result<()> {
        self.sync()?;
        let l = &self.layers[i];
        self.backend
            .swap(t, &self.buf, l.weight)
            .map_err(failed(|| {
                format!("swapping the counterpart of `{}`", l.name)
            }))
    }

    /// Layer `i`'s weight slot as f32 host values, written by `f` (slots are f32).
    fn with_weight_slot<R>(
        &mut self,
        i: usize,
        what: &str,
        f: impl FnOnce(&mut [f32]) -> R,
    ) -> Result<R> {
        self.sync()?;
        let l = &self.layers[i];
        let mut g = self.buf.write(l.weight);
        match g.slice_mut() {
            HostSliceMut::F32(v) => Ok(f(v)),
            _ => Err(failed(|| format!("{what} `{}`", l.name))(anyhow::anyhow!(
                "the store keeps f32 weight slots"
            ))),
        }
    }

    /// Checks that host values of `n` elements fit layer `i`.
    fn check_host_len(&self, i: usize, n: usize, what: &str) -> Result<()> {
        let l = &self.layers[i];
        let want: usize = l.shape.iter().product();
        if n == want {
            return Ok(());
        }
        Err(failed(|| format!("{what} `{}`", l.name))(anyhow::anyhow!(
            "{n} host values for a layer of {want}"
        )))
    }

    /// Parks a copy of host master weights `src` (bf16 working weights keep their f32
    /// masters on the host) as layer `i`'s counterpart.
    pub fn park_master(&mut self, i: usize, src: &[f32]) -> Result<()> {
        self.check_host_len(i, src.len(), "parking the master weights of")?;
        self.with_weight_slot(i, "parking the master weights of", |d| {
            d.copy_from_slice(src)
        })
    }

    /// Exchanges host master weights `live` with layer `i`'s parked weights, in place.
    pub fn swap_master(&mut self, i: usize, live: &mut [f32]) -> Result<()> {
        self.check_host_len(i, live.len(), "swapping the master weights of")?;
        self.with_weight_slot(i, "swapping the master weights of", |d| {
            d.swap_with_slice(live)
        })
    }

    /// `parked_i = w*parked_i + (1-w)*src` for each `(i, src, w)` with host master
    /// weights `src`, on the host, now (the fold of [`Self::fold_into_parked`]).
    pub fn fold_masters_into_parked(&mut self, jobs: &[(usize, &[f32], f64)]) -> Result<()> {
        for &(i, src, _) in jobs {
            self.check_host_len(i, src.len(), "folding the master weights of")?;
        }
        self.sync()?;
        let slots: Vec<usize> = jobs.iter().map(|j| self.layers[j.0].weight).collect();
        let mut guards = self.buf.write_many(&slots).map_err(|e| {
            failed(|| "folding master weights into the counterparts".into())(e.into())
        })?;
        let mut tasks: Vec<EmaTask<'_>> = guards
            .iter_mut()
            .zip(jobs)
            .map(|(g, &(_, src, w))| EmaTask {
                dst: g.slice_mut(),
                src: HostSlice::F32(src),
                w,
            })
            .collect();
        fused_ema(&mut tasks, self.threads);
        Ok(())
    }

    /// `dst = w*dst + (1-w)*parked_i` into host master weights `dst` (the fold of
    /// [`Self::fold_from_parked`]).
    pub fn fold_parked_into_master(&mut self, i: usize, dst: &mut [f32], w: f64) -> Result<()> {
        self.check_host_len(i, dst.len(), "folding the counterpart of")?;
        self.sync()?;
        let g = self.buf.read(self.layers[i].weight);
        fused_ema(
            &mut [EmaTask {
                dst: HostSliceMut::F32(dst),
                src: g.slice(),
                w,
            }],
            self.threads,
        );
        Ok(())
    }

    /// Starts `parked_i = w*parked_i + (1-w)*src` for each `(i, src, w)`: the DPU fold of
    /// live trained weights into the parked branch's frozen copies. `src` must not change
    /// before the next [`CounterpartStore::sync`].
    pub fn fold_into_parked(&mut self, jobs: Vec<(usize, Tensor, f64)>) {
        if jobs.is_empty() {
            return;
        }
        let jobs = jobs
            .into_iter()
            .map(|(i, t, w)| (self.layers[i].weight, t, w))
            .collect();
        self.pending
            .push(self.backend.fold_into_slots(&self.buf, jobs));
    }

    /// `dst = w*dst + (1-w)*parked_i`: the DPU fold of the parked branch's trained weights
    /// into the live network's frozen copy, synchronously.
    pub fn fold_from_parked(&mut self, i: usize, dst: &Tensor, w: f64) -> Result<()> {
        let l = &self.layers[i];
        self.backend
            .fold_into_live(dst, &self.buf, l.weight, w)
            .map_err(failed(|| {
                format!("folding the counterpart of `{}`", l.name)
            }))
    }

    /// Parks layer `i`'s optimizer state (its branch leaves the device).
    pub fn park_state(&mut self, i: usize, st: &LayerState) -> Result<()> {
        let l = &self.layers[i];
        let what = || format!("parking the optimizer state of `{}`", l.name);
        if let Some(m) = &st.m {
            let Some(slot) = l.m else {
                return Err(failed(what)(anyhow::anyhow!(
                    "the optimizer keeps a first moment the store has no slot for"
                )));
            };
            self.backend
                .store(m, &self.buf, slot)
                .map_err(failed(what))?;
        }
        if let Some(v) = &st.v {
            let Some(slot) = l.v else {
                return Err(failed(what)(anyhow::anyhow!(
                    "the optimizer keeps a second moment the store has no slot for"
                )));
            };
            self.backend
                .store(v, &self.buf, slot)
                .map_err(failed(what))?;
        }
        self.parked[i] = Some((st.step, st.m.is_some(), st.v.is_some()));
        Ok(())
    }

    /// Starts loading every parked optimizer state for the next phase change, if it fits
    /// in `offload.staging_bytes` (otherwise [`CounterpartStore::unpark_state`] loads it
    /// synchronously). A no-op while a load is staged.
    pub fn stage_states(&mut self) -> Result<()> {
        if self.staged.is_some() {
            return Ok(());
        }
        let (mut slots, mut layers, mut bytes) = (Vec::new(), Vec::new(), 0u64);
        for (i, p) in self.parked.iter().enumerate() {
            if let Some((_, has_m, has_v)) = *p {
                let l = &self.layers[i];
                let n = l.shape.iter().product::<usize>() as u64;
                if let (true, Some(m)) = (has_m, l.m) {
                    slots.push((m, l.shape.clone()));
                    bytes += 4 * n;
                }
                if let (true, Some(v)) = (has_v, l.v) {
                    slots.push((v, l.shape.clone()));
                    bytes += 4 * n;
                }
                layers.push((i, has_m, has_v));
            }
        }
        if layers.is_empty() || bytes > self.staging.capacity() {
            return Ok(());
        }
        let Some(lease) = self.staging.try_acquire(bytes)? else {
            return Ok(());
        };
        let (fence, tensors) = self.backend.prefetch(&self.buf, slots);
        self.staged = Some(Staged {
            fence,
            tensors,
            layers,
            lease,
        });
        Ok(())
    }

    /// Waits for the staged load, if any, and keeps its tensors for
    /// [`CounterpartStore::unpark_state`].
    pub fn finish_staging(&mut self) -> Result<()> {
        if let Some(s) = self.staged.take() {
            s.fence.wait().map_err(|message| OffloadError::Store {
                action: "staging the next phase's optimizer state".into(),
                message,
            })?;
            let mut it = std::mem::take(&mut *s.tensors.lock()).into_iter();
            for (i, has_m, has_v) in s.layers {
                let m = if has_m { it.next() } else { None };
                let v = if has_v { it.next() } else { None };
                self.ready.insert(i, (m, v));
            }
        }
        Ok(())
    }

    /// Takes layer `i`'s parked optimizer state back (staged when it fit, else loaded
    /// now); `None` when none is parked.
    pub fn unpark_state(&mut self, i: usize) -> Result<Option<LayerState>> {
        let Some((step, has_m, has_v)) = self.parked[i].take() else {
            return Ok(None);
        };
        if let Some((m, v)) = self.ready.remove(&i) {
            return Ok(Some(LayerState { step, m, v }));
        }
        let l = &self.layers[i];
        let load = |slot: usize| {
            self.backend
                .load(&self.buf, slot, &l.shape)
                .map_err(failed(|| {
                    format!("loading the optimizer state of `{}`", l.name)
                }))
        };
        let m = match (has_m, l.m) {
            (true, Some(slot)) => Some(load(slot)?),
            _ => None,
        };
        let v = match (has_v, l.v) {
            (true, Some(slot)) => Some(load(slot)?),
            _ => None,
        };
        Ok(Some(LayerState { step, m, v }))
    }

    /// Every slot's contents as host tensors (for a checkpoint), read where they are:
    /// nothing passes through the device.
    pub fn slots_to_host(&mut self) -> Result<Vec<Tensor>> {
        self.sync()?;
        (0..self.buf.len())
            .map(|k| {
                let spec = self.buf.spec(k);
                self.backend
                    .read_host(&self.buf, k, &[spec.numel])
                    .map_err(failed(|| {
                        format!("reading slot {:?} to the host", spec.name)
                    }))
            })
            .collect()
    }

    /// Writes slot `k` from `t` (restoring a checkpoint of [`Self::slots_to_host`]).
    pub fn restore_slot(&mut self, k: usize, t: &Tensor) -> Result<()> {
        self.sync()?;
        let name = &self.buf.spec(k).name;
        self.backend
            .store(t, &self.buf, k)
            .map_err(failed(|| format!("restoring slot {name:?}")))
    }

    /// Slots in the buffer.
    pub fn slots(&self) -> usize {
        self.buf.len()
    }

    /// The parked optimizer states' step counts and moments, per layer (checkpoints).
    pub fn parked_states(&self) -> &[Option<ParkedState>] {
        &self.parked
    }

    /// Restores [`Self::parked_states`] from a checkpoint.
    pub fn set_parked_states(&mut self, parked: Vec<Option<ParkedState>>) -> Result<()> {
        if parked.len() != self.layers.len() {
            return Err(OffloadError::Store {
                action: "restoring the parked optimizer states".into(),
                message: format!(
                    "{} states for a model of {} layers",
                    parked.len(),
                    self.layers.len()
                ),
            });
        }
        self.parked = parked;
        Ok(())
    }

    /// Bytes of the buffer in host RAM and in the file tier.
    pub fn tiers(&self) -> (u64, u64) {
        self.tiers
    }

    /// Bytes of staging the next phase's optimizer state may take (`offload.staging_bytes`).
    pub fn staging_capacity(&self) -> u64 {
        self.staging.capacity()
    }

    /// Bytes of optimizer state staged now.
    pub fn staged_bytes(&self) -> u64 {
        self.staged.as_ref().map_or(0, |s| s.lease.bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> CounterpartStore {
        let layers = [("a", vec![2, 3]), ("b", vec![4])].map(|(n, s)| LayerSpec {
            name: n.into(),
            shape: s,
        });
        let offload = OffloadConfig {
            host_budget_bytes: 1 << 20,
            file_path: None,
            staging_bytes: 1 << 10,
            threads: 1,
        };
        CounterpartStore::allocate(
            &layers,
            (true, true),
            &Device::Cpu,
            &offload,
            EmaPlacement::Host,
        )
        .unwrap()
    }

    fn t(v: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn layers_park_swap_fold_and_come_back() {
        let mut s = store();
        assert_eq!(s.slots(), 6, "weight, m and v per layer");
        let b0 = t(&[1.0, 2.0, 3.0, 4.0], &[4]);
        s.park_weights(1, &b0).unwrap();
        let live = t(&[10.0, 20.0, 30.0, 40.0], &[4]);
        s.fold_into_parked(vec![(1, live.clone(), 0.5)]);
        // A swap waits for the fold in flight: 0.5 * parked + 0.5 * live comes in.
        s.swap_weights(1, &live).unwrap();
        assert_eq!(live.to_vec1::<f32>().unwrap(), [5.5, 11.0, 16.5, 22.0]);
        // Optimizer state parks and comes back, staged or loaded.
        let st = LayerState {
            step: 7,
            m: Some(t(&[0.5; 4], &[4])),
            v: Some(t(&[0.25; 4], &[4])),
        };
        s.park_state(1, &st).unwrap();
        assert_eq!(s.parked_states()[1], Some((7, true, true)));
        s.stage_states().unwrap();
        assert_eq!(s.staged_bytes(), 32);
        s.finish_staging().unwrap();
        let back = s.unpark_state(1).unwrap().unwrap();
        assert_eq!(back.step, 7);
        assert_eq!(back.v.unwrap().to_vec1::<f32>().unwrap(), [0.25; 4]);
        assert!(s.unpark_state(1).unwrap().is_none());
        // Checkpoint reads: every slot, flat, on the host.
        let host = s.slots_to_host().unwrap();
        assert_eq!(host.len(), 6);
        assert_eq!(host[3].to_vec1::<f32>().unwrap(), [10.0, 20.0, 30.0, 40.0]);
    }

    #[test]
    fn errors_name_the_layer() {
        let mut s = store();
        let wrong = t(&[1.0; 5], &[5]);
        let e = s.swap_weights(1, &wrong).unwrap_err().to_string();
        assert!(e.contains("swapping the counterpart of `b`"), "{e}");
        let e = s.set_parked_states(vec![None; 3]).unwrap_err().to_string();
        assert!(e.contains("3 states for a model of 2 layers"), "{e}");
    }
}
