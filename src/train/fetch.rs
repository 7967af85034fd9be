//! Streamed weights (`offload.params = "stream"`): a unit's working copies (a block's,
//! or with recompute a segment's) are made from the host masters on a copy stream of
//! the offload engine just before the unit runs, and dropped after it, so the device
//! holds the weights of the unit running and of the one being fetched (double
//! buffering) instead of the network's. Layers kept on the device
//! ([`crate::model::NetState::place`]: the trained set, with the optimizer there) are
//! not fetched: the window hands out their resident tensors.
//!
//! A fetch is the device's [`Backend::upload`] run on that stream: on the CPU the
//! copies themselves; on a GPU a conversion into pinned staging and an asynchronous
//! copy on the H2D queue that the compute queue waits for (its waits are checked on the
//! simulated device, `offload/stream_sim.rs`).
//!
//! Ordering, the two waits of a fetch:
//! - a unit's compute waits for its fetch ([`Window::take`] waits the fetch's fence;
//!   the tensors exist only once it completed);
//! - a write of a master waits for every fetch reading it: a [`Window`] waits for its
//!   fetches in flight when it is dropped (every walk ends, returns or fails, before
//!   the step's update), and a fetch holds the masters through a shared reference, so a
//!   write that came too early fails ([`crate::model::NetState::masters_mut`]) instead
//!   of changing a fetch's input.

use crate::config::EmaPlacement;
use crate::model::Fetcher;
use crate::offload::backend::{Backend, Upload};
use crate::offload::order::MIN_HALF_BYTES;
use crate::offload::{CopyEngine, Fence, OffloadConfig, StorageDtype};
use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Device, DeviceLocation, Tensor};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, OnceLock};

/// The copy stream weight fetches run on (one worker, started on first use).
fn engine() -> &'static CopyEngine {
    static ENGINE: OnceLock<CopyEngine> = OnceLock::new();
    ENGINE.get_or_init(|| CopyEngine::new(1))
}

/// The backend that uploads working copies to `device`, one per device for the
/// process (its pinned staging is reused by every walk).
fn uploader(device: &Device) -> Result<Arc<dyn Backend>> {
    static UPLOADERS: OnceLock<Mutex<HashMap<DeviceLocation, Arc<dyn Backend>>>> = OnceLock::new();
    let mut map = UPLOADERS.get_or_init(Default::default).lock();
    if let Some(b) = map.get(&device.location()) {
        return Ok(b.clone());
    }
    // Uploads use no device staging: the smallest area a backend takes (on the CPU the
    // plain `CpuBackend`).
    let offload = OffloadConfig {
        host_budget_bytes: 0,
        file_path: None,
        staging_bytes: 2 * MIN_HALF_BYTES as u64,
        threads: 1,
    };
    let b: Arc<dyn Backend> = Arc::from(crate::offload::store::backend_for(
        device,
        &offload,
        EmaPlacement::Host,
    )?);
    map.insert(device.location(), b.clone());
    Ok(b)
}

/// Working copies of parameters `layers` from `fetcher`'s masters, tracked where
/// `track` says, uploaded by `backend`.
fn fetch(
    backend: &dyn Backend,
    fetcher: &Fetcher,
    layers: &[usize],
    track: &[bool],
) -> Result<Vec<Tensor>> {
    let uploads: Vec<Upload<'_>> = layers
        .iter()
        .zip(track)
        .map(|(&i, &track)| {
            let (values, shape) = fetcher.master(i);
            Upload {
                values,
                shape,
                track,
            }
        })
        .collect();
    let dtype = match fetcher.target().0 {
        DType::F32 => StorageDtype::F32,
        DType::BF16 => StorageDtype::BF16,
        other => bail!("streamed working copies are f32 or bf16, not {other:?}"),
    };
    backend.upload(&uploads, dtype)
}

/// A unit's working copies once its fetch completed.
type Landing = Arc<Mutex<Option<Vec<Tensor>>>>;

/// The fetches of one walk over a streamed network's units (blocks, or their
/// segments), each a range of parameters.
pub struct Window {
    fetcher: Arc<Fetcher>,
    /// The device's uploads.
    backend: Arc<dyn Backend>,
    /// Each unit's parameters.
    units: Vec<Range<usize>>,
    /// Fetches started and not taken: `(unit, tracked, fence, landing)`.
    in_flight: Vec<(usize, bool, Fence, Landing)>,
    /// Which layers a tracked fetch makes `Var`s of.
    trainable: Vec<bool>,
    /// Per layer, its tensor kept on the device (tracked where `trainable`), which no
    /// fetch makes.
    resident: Vec<Option<Tensor>>,
}

impl Window {
    /// A window over `units` (each a range of parameters) fetching with `fetcher`;
    /// tracked fetches make `Var`s of the layers of `trainable`. The layers with a
    /// `resident` tensor (as the forward uses it: tracked where trainable) are not
    /// fetched.
    ///
    /// # Errors
    /// When the device's upload backend cannot start.
    pub fn new(
        fetcher: Fetcher,
        units: Vec<Range<usize>>,
        trainable: &[bool],
        resident: Vec<Option<Tensor>>,
    ) -> Result<Self> {
        Ok(Window {
            backend: uploader(fetcher.target().1)?,
            fetcher: Arc::new(fetcher),
            units,
            in_flight: Vec::new(),
            trainable: trainable.to_vec(),
            resident,
        })
    }

    /// Starts fetching unit `k` (`tracked`: its trained layers record gradients) on the
    /// copy stream; a no-op past the last unit or when that fetch is in flight.
    pub fn start(&mut self, k: usize, tracked: bool) {
        if k >= self.units.len() || self.in_flight.iter().any(|f| f.0 == k && f.1 == tracked) {
            return;
        }
        let layers: Vec<usize> = self.units[k]
            .clone()
            .filter(|&i| self.resident[i].is_none())
            .collect();
        let track: Vec<bool> = layers
            .iter()
            .map(|&i| self.trainable[i] && tracked)
            .collect();
        let landing: Landing = Arc::default();
        let (fetcher, out) = (self.fetcher.clone(), landing.clone());
        let backend = self.backend.clone();
        let fence = engine().submit(0, move || {
            let w = fetch(&*backend, &fetcher, &layers, &track).map_err(|e| format!("{e:#}"))?;
            *out.lock() = Some(w);
            Ok(())
        });
        self.in_flight.push((k, tracked, fence, landing));
    }

    /// Unit `k`'s working copies, its resident layers' tensors among them (detached
    /// unless `tracked`): waits for its fetch (started now if it was not).
    pub fn take(&mut self, k: usize, tracked: bool) -> Result<Vec<Tensor>> {
        self.start(k, tracked);
        let at = self
            .in_flight
            .iter()
            .position(|f| f.0 == k && f.1 == tracked)
            .ok_or_else(|| anyhow!("unit {k} was never fetched"))?;
        let (_, _, fence, landing) = self.in_flight.remove(at);
        fence
            .wait()
            .map_err(|e| anyhow!("fetching the weights of unit {k}: {e}"))?;
        let Some(fetched) = landing.lock().take() else {
            bail!("the fetch of unit {k} completed without its weights");
        };
        let mut fetched = fetched.into_iter();
        self.units[k]
            .clone()
            .map(|i| match &self.resident[i] {
                Some(t) if tracked => Ok(t.clone()),
                Some(t) => Ok(t.detach()),
                None => fetched
                    .next()
                    .ok_or_else(|| anyhow!("the fetch of unit {k} is short of layer {i}")),
            })
            .collect()
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        // No fetch outlives its walk: the masters are written only after this.
        for (_, _, fence, _) in self.in_flight.drain(..) {
            let _ = fence.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{mlp::Mlp, NetState, Network};
    use candle_core::{DType, Device};
    use std::sync::mpsc;
    use std::time::Duration;

    /// A streamed two-block mlp.
    fn streamed() -> (Mlp, NetState) {
        let net = Mlp::new([1, 2, 2], &[3], 2).unwrap();
        let mut rng = crate::rng::Rng::new(1, 2);
        let state = NetState::init(&net, &mut rng, &Device::Cpu).unwrap();
        (net, state.streamed(DType::F32, &Device::Cpu).unwrap())
    }

    /// Holds the copy stream until the returned sender is used (or dropped).
    fn hold_the_copy_stream() -> mpsc::Sender<()> {
        let (tx, rx) = mpsc::channel::<()>();
        engine().submit(0, move || {
            let _ = rx.recv();
            Ok(())
        });
        tx
    }

    /// The first wait: a block's weights exist only once its fetch completed, so a
    /// compute that did not wait would find none; `take` waits and gets the masters.
    #[test]
    fn a_block_waits_for_its_fetch() {
        let (net, state) = streamed();
        let all = vec![true; state.len()];
        let units = net.blocks().iter().map(|b| b.params.clone()).collect();
        let mut w =
            Window::new(state.fetcher().unwrap(), units, &all, vec![None; all.len()]).unwrap();
        let gate = hold_the_copy_stream();
        w.start(1, true);
        std::thread::sleep(Duration::from_millis(20));
        let (_, _, fence, landing) = &w.in_flight[0];
        assert!(!fence.is_done() && landing.lock().is_none(), "nothing yet");
        let opener = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            gate.send(()).unwrap();
        });
        let got = w.take(1, true).unwrap();
        opener.join().unwrap();
        let range = net.blocks()[1].params.clone();
        for (t, i) in got.iter().zip(range) {
            let m = &state.masters.as_ref().unwrap()[i];
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(&v[..], &m[..], "block 1 holds the masters");
            assert!(t.is_variable(), "a tracked fetch records gradients");
        }
    }

    /// Placing layers on the device moves their values exactly (the master freed), the
    /// window hands out the resident tensors themselves (tracked or detached) and fetches
    /// only the others, and streaming a layer back restores its master bit for bit.
    #[test]
    fn resident_layers_are_not_fetched() {
        let (net, mut state) = streamed();
        let before: Vec<Vec<f32>> = state
            .masters
            .as_ref()
            .unwrap()
            .iter()
            .map(|m| m.to_vec())
            .collect();
        let n = state.len();
        let trained: Vec<bool> = (0..n).map(|i| i % 2 == 0).collect();
        state.place(&trained).unwrap();
        for (i, want) in before.iter().enumerate() {
            let m = &state.masters.as_ref().unwrap()[i];
            match state.var(i) {
                Some(v) => {
                    assert!(
                        trained[i] && m.is_empty(),
                        "layer {i}: on the device, no master"
                    );
                    let got = v
                        .as_tensor()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap();
                    assert_eq!(&got, want, "layer {i}: moved exactly");
                }
                None => assert!(!trained[i] && m[..] == want[..], "layer {i} streams"),
            }
        }
        let units: Vec<_> = net.blocks().iter().map(|b| b.params.clone()).collect();
        let resident = state.resident_view(&trained).unwrap();
        let mut w =
            Window::new(state.fetcher().unwrap(), units.clone(), &trained, resident).unwrap();
        for (k, range) in units.iter().enumerate() {
            for tracked in [true, false] {
                let got = w.take(k, tracked).unwrap();
                assert_eq!(got.len(), range.len());
                for (t, i) in got.iter().zip(range.clone()) {
                    let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    assert_eq!(v, before[i], "unit {k} layer {i}");
                    if let (Some(var), true) = (state.var(i), tracked) {
                        assert_eq!(t.id(), var.as_tensor().id(), "layer {i}: the tensor itself");
                    }
                    assert_eq!(t.is_variable(), tracked && trained[i], "layer {i} tracked");
                }
            }
        }
        drop(w);
        state.place(&vec![false; n]).unwrap();
        for (i, want) in before.iter().enumerate() {
            assert!(state.var(i).is_none());
            assert_eq!(
                state.masters.as_ref().unwrap()[i][..],
                want[..],
                "layer {i}"
            );
        }
    }

    /// The second wait: a master is written only after every fetch reading it. A walk
    /// that ends waits for its fetches in flight; a write before that fails instead of
    /// changing what a fetch reads.
    #[test]
    fn masters_are_written_after_the_fetches() {
        let (net, mut state) = streamed();
        let all = vec![true; state.len()];
        let gate = hold_the_copy_stream();
        let units = net.blocks().iter().map(|b| b.params.clone()).collect();
        let mut w =
            Window::new(state.fetcher().unwrap(), units, &all, vec![None; all.len()]).unwrap();
        w.start(0, false);
        let err = match state.masters_mut() {
            Ok(_) => panic!("the masters were writable during a fetch"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("while a weight fetch reads them"), "{err}");
        let opener = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            gate.send(()).unwrap();
        });
        // The gate is still closed when `drop` starts: only a drop that waits for the
        // fetch finds the masters free after it.
        drop(w);
        assert!(
            state.masters_mut().unwrap().is_some(),
            "writable after the walk"
        );
        opener.join().unwrap();
    }
}
