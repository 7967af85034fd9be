//! Live parameter-state bytes by category for each method and placement, computed from
//! the partition's set sizes: weights, gradients (one backward at a time, so the larger
//! trained set), optimizer state (1 or 2 tensors per trained element), counterparts.

use serde::Serialize;

/// Bytes by category.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct MemoryReport {
    /// Live weights (one or two networks).
    pub live_weights: u64,
    /// Gradients at the peak.
    pub gradients: u64,
    /// Live optimizer state at the peak.
    pub optimizer: u64,
    /// Counterpart buffer in host RAM.
    pub counterparts_ram: u64,
    /// Counterpart buffer in the file tier.
    pub counterparts_file: u64,
    /// Staging area (0 on the CPU backend: swaps exchange each layer in place).
    pub staging: u64,
    /// Peak of live weights + gradients + optimizer state + staging.
    pub live_peak: u64,
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
/// elements, with `state_per_elem` optimizer tensors per trained element.
pub fn report(
    layout: Layout,
    total: u64,
    stable: u64,
    unstable: u64,
    state_per_elem: u64,
    counterparts: (u64, u64),
) -> MemoryReport {
    let b = 4u64;
    let (w, g, o) = match layout {
        Layout::Full => (total, total, state_per_elem * total),
        Layout::Resident => (
            2 * total,
            stable.max(unstable),
            state_per_elem * (stable + unstable),
        ),
        Layout::Single => (
            total,
            stable.max(unstable),
            state_per_elem * stable.max(unstable),
        ),
    };
    MemoryReport {
        live_weights: b * w,
        gradients: b * g,
        optimizer: b * o,
        counterparts_ram: counterparts.0,
        counterparts_file: counterparts.1,
        staging: 0,
        live_peak: b * (w + g + o),
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
