//! Live parameter-state bytes by category for each method and placement, computed from
//! the partition's set sizes: weights, gradients (one backward at a time, so the larger
//! trained set), optimizer state (1 or 2 tensors per trained element), counterparts.

use crate::metrics::MemoryReport;

/// Measures live parameter-state bytes after each optimizer step and keeps the peak.
#[derive(Clone, Copy, Debug, Default)]
pub struct LiveMeter {
    /// Largest weights + gradients + optimizer-state bytes seen.
    pub peak: u64,
}

impl LiveMeter {
    /// Records one moment: live weight bytes, the step's gradients, live optimizer bytes.
    pub fn observe(&mut self, weights: u64, grads: &[Option<candle_core::Tensor>], optimizer: u64) {
        let g: u64 = grads
            .iter()
            .flatten()
            .map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64)
            .sum();
        self.peak = self.peak.max(weights + g + optimizer);
    }
}

/// Bytes of a network's parameters.
pub fn weight_bytes(state: &crate::model::NetState) -> u64 {
    state
        .params
        .iter()
        .map(|v| (v.as_tensor().elem_count() * v.as_tensor().dtype().size_in_bytes()) as u64)
        .sum()
}

/// Where a method keeps its networks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// One network, all layers trained (erm, lp-ft).
    Full,
    /// Two live networks (dual branch, resident).
    Resident,
    /// One live network, the other branch parked (dual swap, ldt-s).
    Single,
}

/// The report for `total` f32 elements split into sets of `stable` / `unstable`
/// elements, with `state_per_elem` optimizer tensors per trained element. `Single` stages
/// the incoming branch's optimizer state during the last step of a phase when it fits in
/// `staging_cap` bytes, so its peak phase holds that too.
pub fn report(
    layout: Layout,
    (stable, unstable): (u64, u64),
    state_per_elem: u64,
    counterparts: (u64, u64),
    staging_cap: u64,
) -> MemoryReport {
    let b = 4u64;
    let total = stable + unstable;
    let k = state_per_elem;
    let (w, g, o, st) = match layout {
        Layout::Full => (total, total, k * total, 0),
        Layout::Resident => (2 * total, stable.max(unstable), k * total, 0),
        Layout::Single => {
            let phase = |x: u64, y: u64| {
                let staged = if b * k * y <= staging_cap { k * y } else { 0 };
                (total, x, k * x, staged)
            };
            let (p, a) = (phase(stable, unstable), phase(unstable, stable));
            let sum = |t: (u64, u64, u64, u64)| t.0 + t.1 + t.2 + t.3;
            if sum(p) >= sum(a) {
                p
            } else {
                a
            }
        }
    };
    MemoryReport {
        live_weights: b * w,
        gradients: b * g,
        optimizer: b * o,
        counterparts_ram: counterparts.0,
        counterparts_file: counterparts.1,
        staging: b * st,
        live_peak: b * (w + g + o + st),
        measured_live_peak: 0,
    }
}

/// Optimizer tensors per trained element: Adam keeps `v` (and `m` when beta1 > 0), SGD
/// keeps a momentum buffer when momentum > 0.
pub fn state_tensors(s: &crate::optim::OptimSettings) -> u64 {
    match s.name {
        crate::config::OptimName::Sgd => u64::from(s.momentum > 0.0),
        _ => 1 + u64::from(s.betas[0] > 0.0),
    }
}
