//! Live parameter-state bytes by category for each method and placement, computed from
//! the partition's set sizes: weights, gradients (one backward at a time, so the larger
//! trained set), optimizer state (1 or 2 tensors per trained element), counterparts.

use super::step::{gradients, Batch, GradPlan};
use crate::config::OptimizerPlacement;
use crate::heap;
use crate::metrics::{MemoryReport, PhaseBytes};
use crate::model::{Mode, NetState, Network};
use crate::optim::Grad;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};

/// Measures live parameter-state bytes after each optimizer step and keeps the peak.
#[derive(Clone, Copy, Debug, Default)]
pub struct LiveMeter {
    /// Largest weights + gradients + optimizer-state bytes seen.
    pub peak: u64,
}

impl LiveMeter {
    /// Records one moment: live weight bytes, the step's gradients, live optimizer bytes.
    pub fn observe(&mut self, weights: u64, grads: &[Option<Grad>], optimizer: u64) {
        let g: u64 = grads.iter().flatten().map(Grad::device_bytes).sum();
        self.peak = self.peak.max(weights + g + optimizer);
    }
}

/// Bytes per weight (and gradient) element on the device for `state` updated by an
/// optimizer at `placement`: 2 for bf16 working weights with host masters (resident,
/// or streamed with the host optimizer), else 4 (f32 weights; with the device
/// optimizer a streamed state's trained set stays on the device in f32).
pub fn working_bytes(state: &NetState, placement: OptimizerPlacement) -> u64 {
    match (&state.stream, placement) {
        (Some(s), OptimizerPlacement::Host) => s.dtype.size_in_bytes() as u64,
        (Some(_), OptimizerPlacement::Device) => 4,
        (None, _) if state.masters.is_some() => 2,
        (None, _) => 4,
    }
}

/// Bytes of a network's parameters on the device between uses (a streamed state's:
/// its resident layers').
pub fn weight_bytes(state: &crate::model::NetState) -> u64 {
    let resident = state
        .stream
        .iter()
        .flat_map(|s| s.resident.iter().flatten());
    state
        .params
        .iter()
        .chain(resident)
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

/// The report for `total` weight elements of `wb` bytes each (4, or 2 for bf16 working
/// weights, whose gradients are bf16 too) split into sets of `stable` / `unstable`
/// elements, with `state_per_elem` f32 optimizer tensors per trained element. `Single`
/// stages the incoming branch's optimizer state during the last step of a phase when it
/// fits in `staging_cap` bytes, so its peak phase holds that too.
pub fn report(
    (layout, wb): (Layout, u64),
    (stable, unstable): (u64, u64),
    state_per_elem: u64,
    counterparts: (u64, u64),
    staging_cap: u64,
) -> MemoryReport {
    let b = 4u64;
    let total = stable + unstable;
    let k = state_per_elem;
    // The parameter state of a P and of an A half-step, in elements: weights, the
    // trained sets' weights, gradients, optimizer state, staged state.
    let (p, a) = match layout {
        Layout::Full => {
            let all = (total, total, total, k * total, 0);
            (all, all)
        }
        Layout::Resident => (
            (2 * total, total, stable, k * total, 0),
            (2 * total, total, unstable, k * total, 0),
        ),
        Layout::Single => {
            let phase = |x: u64, y: u64| {
                let staged = if b * k * y <= staging_cap { k * y } else { 0 };
                (total, x, x, k * x, staged)
            };
            (phase(stable, unstable), phase(unstable, stable))
        }
    };
    let bytes = |t: (u64, u64, u64, u64, u64)| PhaseBytes {
        weights: wb * t.0,
        trained: wb * t.1,
        gradients: wb * t.2,
        optimizer: b * t.3,
        staging: b * t.4,
    };
    settle(MemoryReport {
        counterparts_ram: counterparts.0,
        counterparts_file: counterparts.1,
        phases: [bytes(p), bytes(a)],
        ..MemoryReport::default()
    })
}

/// `r` with its parameter-state fields those of its larger phase.
fn settle(mut r: MemoryReport) -> MemoryReport {
    let [p, a] = r.phases;
    let peak = if p.total() >= a.total() { p } else { a };
    r.live_weights = peak.weights;
    r.gradients = peak.gradients;
    r.optimizer = peak.optimizer;
    r.staging = peak.staging;
    r.live_peak = peak.total();
    r
}

/// `r` for gradients that leave the device block by block, released to host memory
/// ([`GradPlan::release`]) or applied ([`GradPlan::update_by_block`]): none stay past
/// their block's backward, and a block's, while it lasts, is part of the probed
/// activations.
pub fn released(mut r: MemoryReport) -> MemoryReport {
    for p in &mut r.phases {
        p.gradients = 0;
    }
    settle(r)
}

/// `r` for streamed weights (`offload.params = "stream"`): no weight stays on the
/// device between uses but, with `trained_kept` (the optimizer on the device), the
/// trained sets' ([`crate::model::NetState::place`]); the fetched segments, while they
/// last, are part of the probed activations.
pub fn streamed(mut r: MemoryReport, trained_kept: bool) -> MemoryReport {
    for p in &mut r.phases {
        p.weights = if trained_kept { p.trained } else { 0 };
    }
    settle(r)
}

/// `r` as the configuration keeps it: gradients released by block where they are, the
/// weights streamed where they are.
pub fn as_configured(mut r: MemoryReport, cfg: &crate::config::Config) -> MemoryReport {
    if !GradPlan::of(cfg).keeps_gradients() {
        r = released(r);
    }
    if cfg.streamed() {
        let device = cfg.offload.optimizer == crate::config::OptimizerPlacement::Device;
        r = streamed(r, device);
    }
    r
}

/// `r` with its activations: `acts[k]` of a half-step of phase P (k = 0) and A (k = 1)
/// (equal where every layer trains); the device peak is the larger phase's parameter
/// state plus its activations.
pub fn with_activations(mut r: MemoryReport, acts: [u64; 2]) -> MemoryReport {
    let (k, peak) = (0..2)
        .map(|k| (k, r.phases[k].total() + acts[k]))
        .max_by_key(|&(_, b)| b)
        .expect("two phases");
    r.activations = acts[k];
    r.device_peak = peak;
    r
}

/// Where the configured method keeps its networks.
pub fn layout_of(cfg: &crate::config::Config) -> Layout {
    use crate::config::{Method, Placement};
    match cfg.train.method {
        Method::Erm | Method::LpFt => Layout::Full,
        Method::LdtS => Layout::Single,
        Method::Ldt | Method::Deft if cfg.ldt.placement == Placement::Swap => Layout::Single,
        Method::Ldt | Method::Deft => Layout::Resident,
    }
}

/// The plan checked against `offload.device_bytes` before stage 1, for `numel` f32
/// parameters and `activations` bytes per step: the partition is not known yet, so the
/// larger trained set is bounded by the whole network.
pub fn before_stage1(cfg: &crate::config::Config, numel: u64, activations: u64) -> MemoryReport {
    let settings = crate::optim::OptimSettings::from(&cfg.optim);
    let k = match cfg.offload.optimizer {
        crate::config::OptimizerPlacement::Device => state_tensors(&settings),
        crate::config::OptimizerPlacement::Host => 0,
    };
    let wb = if cfg.host_masters() { 2 } else { 4 };
    let r = report(
        (layout_of(cfg), wb),
        (numel, 0),
        k,
        (0, 0),
        cfg.offload.staging_bytes,
    );
    let mut r = as_configured(r, cfg);
    r.activations = activations;
    r.device_peak = r.live_peak + activations;
    r
}

/// The error for a plan over `budget` bytes: the consumers, largest first, and what
/// shrinks each.
pub fn over_budget(plan: &MemoryReport, budget: u64, batch_rows: usize) -> String {
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    let mut parts = [
        (
            plan.live_weights,
            "weights",
            "offload.params = \"stream\" with train.recompute = \"blocks\" keeps the trained \
             set only (with offload.optimizer = \"host\", a segment's weights); \
             train.precision = \"bf16\" with offload.optimizer = \"host\" keeps 2 bytes per weight",
        ),
        (
            plan.gradients,
            "gradients",
            "ldt-s trains one set at a time; train.recompute = \"blocks\" keeps one \
             block's (with the optimizer on the device: without train.clip_grad_norm and \
             with train.on_nonfinite = \"stop\", which need all of them)",
        ),
        (
            plan.optimizer,
            "optimizer state",
            "offload.optimizer = \"host\" moves it to host memory",
        ),
        (
            plan.activations,
            "activations",
            "train.recompute = \"blocks\", a smaller train.batch_size, or train.accumulate = 2, 4, ... micro-batches",
        ),
        (plan.staging, "staging", "a smaller offload.staging_bytes"),
    ];
    parts.sort_by_key(|p| std::cmp::Reverse(p.0));
    let lines: Vec<String> = parts
        .iter()
        .filter(|p| p.0 > 0)
        .map(|(b, what, fix)| format!("  {what}: {:.1} MiB ({fix})", mib(*b)))
        .collect();
    format!(
        "the planned device peak {:.1} MiB exceeds offload.device_bytes = {} ({:.1} MiB); \
         by consumer (activations for {batch_rows} examples per micro-batch; before stage 1 \
         the larger trained set is bounded by the whole network):\n{}",
        mib(plan.device_peak),
        budget,
        mib(budget),
        lines.join("\n")
    )
}

/// Optimizer tensors per trained element on the device for `opt` (none when its state
/// lives on the host).
pub fn device_state_tensors(opt: &crate::optim::Optimizer) -> u64 {
    match opt.placement() {
        crate::config::OptimizerPlacement::Device => state_tensors(opt.settings()),
        crate::config::OptimizerPlacement::Host => 0,
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

/// The activation and temporary bytes one forward and backward of `rows` examples
/// needs on top of the weights and the gradients, measured on the heap with batches of
/// zeros (the layers of `trained` trained: frozen layers need no weight gradient and
/// less of their input kept; BatchNorm statistics left untouched): up to 8 rows, a
/// probe of that size; beyond, probes of 4 and 8 rows give the fixed part and the part
/// per example, extrapolated (the growth is linear from a few rows on; below, thread
/// splits and workspaces add a fixed share). On a CPU the heap is the device, so this
/// is what a step adds to the parameter state.
pub fn activations(
    net: &dyn Network,
    state: &NetState,
    trained: &[bool],
    plan: GradPlan,
    rows: usize,
    device: &Device,
) -> Result<u64> {
    let probe = |rows| probe(net, state, trained, plan, rows, device);
    growth(probe, rows, (4, 8)).map(|g| g.at(rows))
}

/// A probe's bytes as the rows grow: measured up to `hi` rows, beyond extrapolated from
/// probes of `lo` and `hi` rows (the growth is linear from enough rows on; below, thread
/// splits and workspaces add a fixed share).
struct Growth {
    /// Rows probed last (the asked rows up to `hi`, else `hi`), and the bytes there.
    rows: usize,
    bytes: u64,
    /// Bytes per row beyond `rows` (0 when the asked rows were probed).
    per_row: f64,
}

impl Growth {
    /// The bytes at `rows` (at least those probed).
    fn at(&self, rows: usize) -> u64 {
        let extra = rows.saturating_sub(self.rows) as f64 * self.per_row;
        (self.bytes as f64 + extra).round() as u64
    }
}

/// Probes `probe` for `rows` rows: directly up to `hi`, else at `lo` and `hi`.
fn growth(
    mut probe: impl FnMut(usize) -> Result<u64>,
    rows: usize,
    (lo, hi): (usize, usize),
) -> Result<Growth> {
    if rows <= hi {
        let bytes = probe(rows)?;
        return Ok(Growth {
            rows,
            bytes,
            per_row: 0.0,
        });
    }
    let (a, b) = (probe(lo)?, probe(hi)?);
    Ok(Growth {
        rows: hi,
        bytes: b,
        per_row: b.saturating_sub(a) as f64 / (hi - lo) as f64,
    })
}

/// The evaluation batch whose plan fits `budget` bytes: the largest up to `wanted` rows
/// for which the parameter state kept through evaluation (`kept`: the plan's weights,
/// optimizer state and staging; gradients are gone) plus one evaluation batch fits 95%
/// of it (5% left for what a probe does not see the same way twice: thread workspaces,
/// allocator rounding), with that batch's bytes; `None` when not even one row fits. A
/// batch is probed on the heap as evaluation runs it: the rows gathered and uploaded,
/// the forward with `weights` in `Eval` mode (streamed weights uploaded segment by
/// segment inside it), the loss.
///
/// A forward's peak is the largest of its layers' (each a fixed part plus a part per
/// row), so it grows faster with more rows and an extrapolation from small batches
/// falls short (resnet50 on 28x28 images: 16 and 32 rows predicted 22.6 MB for 256,
/// which took 69 MB). So batches are measured from 16 rows up, doubling while twice the
/// last measured growth per row still fits, and none is probed that this bound says
/// would not: the full batch when it fits, else the largest the bound fits above the
/// last batch that fitted, measured, down by a tenth to that batch.
pub fn eval_batch(
    net: &dyn Network,
    (weights, buffers): (&crate::model::Weights<'_>, &[Tensor]),
    (kept, budget): (u64, u64),
    wanted: usize,
    scoring: &crate::task::Scoring,
    device: &Device,
) -> Result<Option<(usize, u64)>> {
    let shape = net.input_shape();
    let probe = |rows: usize| -> Result<u64> {
        let (r, peak) = heap::peak_during(|| -> Result<()> {
            let hb = crate::data::HostBatch {
                images: vec![0.0; rows * shape.iter().product::<usize>()],
                truth: zero_truth(net, rows),
            };
            let (x, y) = hb.to_tensors(shape, device)?;
            let mut b = buffers.to_vec();
            let out = weights.forward(net, &mut b, &x, Mode::Eval)?;
            crate::task::Tally::default().add(scoring, &out, &y)?;
            Ok(())
        });
        r?;
        Ok(peak)
    };
    let room = |bytes: u64| 0.95 * budget as f64 - (kept + bytes) as f64;
    // The largest measured batch that fits, and the growth per row up to it.
    let (mut fit, mut slope): (Option<(usize, u64)>, f64) = (None, 0.0);
    let mut rows = wanted.min(16);
    loop {
        let bytes = probe(rows)?;
        if room(bytes) < 0.0 {
            break;
        }
        if rows == wanted {
            return Ok(Some((rows, bytes)));
        }
        slope = match fit {
            Some((r0, b0)) => bytes.saturating_sub(b0) as f64 / (rows - r0) as f64,
            None => bytes as f64 / rows as f64,
        };
        fit = Some((rows, bytes));
        let next = (2 * rows).min(wanted);
        if 2.0 * slope * (next - rows) as f64 > room(bytes) {
            break;
        }
        rows = next;
    }
    let Some((floor, floor_bytes)) = fit else {
        // Not even 16 rows (or the whole of a smaller batch): down by a tenth.
        let mut rows = rows.saturating_sub(1);
        while rows > 0 {
            let bytes = probe(rows)?;
            if room(bytes) >= 0.0 {
                return Ok(Some((rows, bytes)));
            }
            rows = (rows * 9 / 10).min(rows - 1);
        }
        return Ok(None);
    };
    let ceiling = (2 * floor).min(wanted) - 1;
    let bound = match slope > 0.0 {
        true => floor + (room(floor_bytes) / (2.0 * slope)).floor() as usize,
        false => ceiling,
    };
    let mut rows = bound.clamp(floor, ceiling);
    while rows > floor {
        let bytes = probe(rows)?;
        if room(bytes) >= 0.0 {
            return Ok(Some((rows, bytes)));
        }
        rows = (rows * 9 / 10).min(rows - 1).max(floor);
    }
    Ok(Some((floor, floor_bytes)))
}

/// The truth of `rows` zero examples for `net`'s outputs: labels 0 for a classifier,
/// black target images for a network that outputs images.
fn zero_truth(net: &dyn Network, rows: usize) -> crate::data::Truth {
    match net.output_shape()[..] {
        [c, h, w] => crate::data::Truth::Images {
            pixels: vec![0.0; rows * c * h * w],
            shape: [c, h, w],
        },
        _ => crate::data::Truth::Labels(vec![0; rows]),
    }
}

/// The heap's peak above the parameter state during one forward and backward of `rows`
/// zero examples.
fn probe(
    net: &dyn Network,
    state: &NetState,
    trained: &[bool],
    plan: GradPlan,
    rows: usize,
    device: &Device,
) -> Result<u64> {
    let [c, h, w] = net.input_shape();
    let x = Tensor::zeros((rows, c, h, w), DType::F32, device)?;
    let y = zero_truth(net, rows).tensor(device)?;
    let batch = Batch::whole(x, y)?;
    // The weights are shared (a step's forward and backward leave them alone); the
    // buffers are copied so that the probe does not move BatchNorm's running statistics.
    let mut scratch = NetState {
        params: state.params.clone(),
        buffers: state
            .buffers
            .iter()
            .map(|t| t.copy())
            .collect::<candle_core::Result<_>>()?,
        masters: state.stream.as_ref().and(state.masters.clone()),
        stream: state.stream.clone(),
    };
    // Gradients that leave the device by block (released or applied) leave it here too.
    let plan = GradPlan {
        accumulate: 1,
        release: !plan.keeps_gradients(),
        ..plan
    };
    let (grads, peak) = heap::peak_during(|| -> Result<u64> {
        let (_, grads) = gradients(net, &mut scratch, trained, &batch, Mode::Train, plan)?;
        Ok(grads.iter().flatten().map(Grad::device_bytes).sum())
    });
    Ok(peak.saturating_sub(grads?))
}
