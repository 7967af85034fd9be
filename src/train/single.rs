//! One live network over the counterpart buffer: `ldt-s` (phases P and A alternate over
//! time) and the dual branch in `swap` placement (a P and an A half-step every step).
//!
//! Per layer the buffer holds one weight slot (the copy that is not live: in phase P the
//! AM copy, `A^U` or `~A^S`; in phase A the PM copy) and the optimizer-state slots of
//! that layer's trained copy while its branch is parked. A phase change swaps every
//! layer's live tensor with its slot in place and moves optimizer state out and in.
//! Folds into parked counterparts run asynchronously on the backend and are fenced
//! before the live source changes (the next optimizer step) and before any swap.

use super::erm::Meter;
use super::memory::{Layout, MemoryReport};
use super::stage1;
use super::step::{apply, gradients, Batch, GradPlan};
use super::RunContext;
use crate::checkpoint::{Checkpoint, Writer};
use crate::config::{Method, Placement};
use crate::data::HostBatch;
use crate::ldt::dpu;
use crate::ldt::partition::Partition;
use crate::metrics::Progress;
use crate::model::{io, Mode, NetState, Network};
use crate::offload::backend::{self, Backend};
use crate::offload::{
    CounterpartBuffer, Fence, OffloadConfig, SharedCounterpartBuffer, SlotSpec, StagingArea,
    StagingLease, StorageDtype,
};
use crate::optim::{schedule, LayerState, OptimSettings, Optimizer};
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde_json::json;
use std::sync::Arc;
use std::time::Instant;

/// Which branch is live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// PM: trains the stable set, unstable set frozen.
    P,
    /// AM: trains the unstable set, stable set frozen.
    A,
}

/// Which counterpart-buffer slots hold what: per layer one weight slot (the parked copy)
/// and the optimizer-state slots of its trained copy (`m` only when the optimizer keeps
/// a first moment or momentum).
pub struct SlotLayout {
    /// Slot specs in order.
    pub specs: Vec<SlotSpec>,
    weight_slot: Vec<usize>,
    m_slot: Vec<usize>,
    v_slot: Vec<usize>,
}

impl SlotLayout {
    /// The layout for `net` trained with `settings`.
    pub fn new(net: &dyn Network, settings: &OptimSettings) -> Self {
        let mut specs = Vec::new();
        let (mut weight_slot, mut m_slot, mut v_slot) = (Vec::new(), Vec::new(), Vec::new());
        let with_m = settings.betas[0] > 0.0 || settings.momentum > 0.0;
        let f32_slot = |name: String, numel| SlotSpec {
            name,
            numel,
            dtype: StorageDtype::F32,
        };
        for p in net.params() {
            weight_slot.push(specs.len());
            specs.push(f32_slot(format!("{}:weight", p.name), p.numel()));
            m_slot.push(specs.len());
            if with_m {
                specs.push(f32_slot(format!("{}:m", p.name), p.numel()));
            }
            v_slot.push(specs.len());
            specs.push(f32_slot(format!("{}:v", p.name), p.numel()));
        }
        SlotLayout {
            specs,
            weight_slot,
            m_slot,
            v_slot,
        }
    }

    /// Allocates the counterpart buffer through `backend` (RAM up to the budget, pinned
    /// on a GPU, the file tier beyond); a budget too small is an error with the bytes
    /// needed and the settings to change.
    pub fn allocate(
        &self,
        backend: Box<dyn Backend>,
        offload: &OffloadConfig,
    ) -> Result<Counterparts> {
        let buf = backend
            .allocate(&self.specs, offload)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(Counterparts { buf, backend })
    }
}

/// The counterpart buffer and the backend that moves tensors in and out of it.
pub struct Counterparts {
    buf: CounterpartBuffer,
    backend: Box<dyn Backend>,
}

/// Optimizer state of the next phase, loading early into the staging area.
struct Staged {
    fence: Fence,
    tensors: Arc<parking_lot::Mutex<Vec<Tensor>>>,
    /// `(layer, has m, has v)` in load order.
    layers: Vec<(usize, bool, bool)>,
    lease: StagingLease,
}

/// The single live network and everything parked.
pub struct SingleLive {
    /// The live network's weights (and, for `ldt-s`, the one set of buffers).
    pub live: NetState,
    /// Which branch is live.
    pub phase: Phase,
    /// Optimizer of PM (state live only in phase P).
    pub opt_p: Optimizer,
    /// Optimizer of AM (state live only in phase A).
    pub opt_a: Optimizer,
    /// Per-branch buffers of the parked branch (dual swap only; `ldt-s` shares one set).
    parked_buffers: Option<Vec<Tensor>>,
    partition: Partition,
    buf: Arc<SharedCounterpartBuffer>,
    buf_tiers: (u64, u64),
    backend: Box<dyn Backend>,
    pending: Vec<Fence>,
    parked_state: Vec<Option<(u64, bool, bool)>>,
    meter: super::memory::LiveMeter,
    staging: StagingArea,
    staged: Option<Staged>,
    weight_slot: Vec<usize>,
    m_slot: Vec<usize>,
    v_slot: Vec<usize>,
}

impl SingleLive {
    /// Starts in phase P from `start` (both branches begin equal, so the parked AM copy
    /// is a copy of `start`).
    pub fn new(
        start: NetState,
        partition: Partition,
        settings: OptimSettings,
        layout: SlotLayout,
        counterparts: Counterparts,
        offload: &OffloadConfig,
        per_branch_buffers: bool,
    ) -> Result<Self> {
        let Counterparts { buf, backend } = counterparts;
        let n = start.params.len();
        let SlotLayout {
            weight_slot,
            m_slot,
            v_slot,
            ..
        } = layout;
        let buf_tiers = (buf.bytes_in_ram(), buf.bytes_in_file());
        let buf = Arc::new(SharedCounterpartBuffer::new(buf));
        for (i, p) in start.params.iter().enumerate() {
            backend.store(p.as_tensor(), &buf, weight_slot[i])?;
        }
        let parked_buffers = if per_branch_buffers {
            Some(
                start
                    .buffers
                    .iter()
                    .map(|t| t.copy())
                    .collect::<candle_core::Result<Vec<_>>>()?,
            )
        } else {
            None
        };
        Ok(SingleLive {
            live: start,
            phase: Phase::P,
            opt_p: Optimizer::new(settings.clone(), n),
            opt_a: Optimizer::new(settings, n),
            parked_buffers,
            partition,
            buf,
            buf_tiers,
            backend,
            pending: Vec::new(),
            parked_state: vec![None; n],
            meter: super::memory::LiveMeter::default(),
            staging: StagingArea::new(offload.staging_bytes),
            staged: None,
            weight_slot,
            m_slot,
            v_slot,
        })
    }

    /// Trainable mask of the live branch.
    fn mask(&self) -> Vec<bool> {
        match self.phase {
            Phase::P => self.partition.stable_mask(),
            Phase::A => self.partition.unstable_mask(),
        }
    }

    /// Waits for every fold in flight.
    pub fn sync(&mut self) -> Result<()> {
        for f in self.pending.drain(..) {
            f.wait()
                .map_err(|e| anyhow::anyhow!("counterpart fold failed: {e}"))?;
        }
        Ok(())
    }

    /// One optimizer step of the live branch on `batch`.
    pub fn half_step(
        &mut self,
        ctx: &mut RunContext,
        step: usize,
        batch: &Batch,
        lrs: &[f64],
    ) -> Result<super::step::StepStats> {
        let mask = self.mask();
        let (stats, mut grads) = gradients(
            ctx.net.as_ref(),
            &mut self.live,
            &mask,
            batch,
            Mode::Train,
            GradPlan::of(&ctx.cfg),
        )?;
        // A fold still reading the live trained set must finish before the update.
        self.sync()?;
        let branch = if self.phase == Phase::P { "pm" } else { "am" };
        if ctx.guard(step, branch, &stats, &mut grads)? {
            let opt = match self.phase {
                Phase::P => &mut self.opt_p,
                Phase::A => &mut self.opt_a,
            };
            apply(opt, &self.live, &grads, lrs)?;
        }
        let staged = self.staged.as_ref().map_or(0, |s| s.lease.bytes());
        let opt_bytes = (self.opt_p.bytes() + self.opt_a.bytes()) as u64 + staged;
        self.meter
            .observe(super::memory::weight_bytes(&self.live), &grads, opt_bytes);
        Ok(stats)
    }

    /// The DPU fold of `branch`'s trained set into the other branch's frozen copy.
    /// `factor` scales every coefficient (the DPU warm-up; 1 = the authors' rule).
    pub fn fold(&mut self, branch: Phase, factor: f64) -> Result<()> {
        let trains = |i: usize| self.partition.is_stable(i) == (branch == Phase::P);
        let mut jobs = Vec::new();
        for (i, l) in self.partition.layers.iter().enumerate() {
            if !trains(i) {
                continue;
            }
            let live = self.live.params[i].as_tensor();
            if branch == self.phase {
                // Source live, destination (the other branch's frozen copy) parked.
                jobs.push((self.weight_slot[i], live.clone(), l.coefficient * factor));
            } else {
                // Source parked, destination (the live branch's frozen copy) live.
                self.backend.fold_into_live(
                    live,
                    &self.buf,
                    self.weight_slot[i],
                    l.coefficient * factor,
                )?;
            }
        }
        if !jobs.is_empty() {
            self.pending
                .push(self.backend.fold_into_slots(&self.buf, jobs));
        }
        Ok(())
    }

    /// Starts loading the parked branch's optimizer state for the next phase change, if
    /// it fits in `offload.staging_bytes` (otherwise the change loads it synchronously).
    pub fn stage_next(&mut self) -> Result<()> {
        if self.staged.is_some() {
            return Ok(());
        }
        let (mut slots, mut layers, mut bytes) = (Vec::new(), Vec::new(), 0u64);
        for (i, p) in self.parked_state.iter().enumerate() {
            if let Some((_, has_m, has_v)) = *p {
                let shape = self.live.params[i].as_tensor().dims().to_vec();
                let n = self.live.params[i].as_tensor().elem_count() as u64;
                if has_m {
                    slots.push((self.m_slot[i], shape.clone()));
                    bytes += 4 * n;
                }
                if has_v {
                    slots.push((self.v_slot[i], shape));
                    bytes += 4 * n;
                }
                layers.push((i, has_m, has_v));
            }
        }
        if layers.is_empty() || bytes > self.staging.capacity() {
            return Ok(());
        }
        let Some(lease) = self
            .staging
            .try_acquire(bytes)
            .map_err(|e| anyhow::anyhow!("{e}"))?
        else {
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

    /// Makes `phase` live: swaps every layer with its slot, parks the outgoing branch's
    /// optimizer state and brings the incoming one's back.
    pub fn switch_to(&mut self, phase: Phase) -> Result<()> {
        if phase == self.phase {
            return Ok(());
        }
        self.sync()?;
        for (i, p) in self.live.params.iter().enumerate() {
            self.backend
                .swap(p.as_tensor(), &self.buf, self.weight_slot[i])?;
        }
        let (out_opt, in_opt) = match self.phase {
            Phase::P => (&mut self.opt_p, &mut self.opt_a),
            Phase::A => (&mut self.opt_a, &mut self.opt_p),
        };
        // The incoming state: staged early when it fit, else loaded now.
        let mut staged: std::collections::HashMap<usize, (Option<Tensor>, Option<Tensor>)> =
            Default::default();
        if let Some(s) = self.staged.take() {
            s.fence
                .wait()
                .map_err(|e| anyhow::anyhow!("staging the next phase failed: {e}"))?;
            let mut it = std::mem::take(&mut *s.tensors.lock()).into_iter();
            for (i, has_m, has_v) in s.layers {
                let m = if has_m { it.next() } else { None };
                let v = if has_v { it.next() } else { None };
                staged.insert(i, (m, v));
            }
            drop(s.lease);
        }
        for i in 0..self.live.params.len() {
            if let Some(st) = out_opt.take_state(i) {
                if let Some(m) = &st.m {
                    self.backend.store(m, &self.buf, self.m_slot[i])?;
                }
                if let Some(v) = &st.v {
                    self.backend.store(v, &self.buf, self.v_slot[i])?;
                }
                self.parked_state[i] = Some((st.step, st.m.is_some(), st.v.is_some()));
            } else if let Some((step, has_m, has_v)) = self.parked_state[i].take() {
                if let Some((m, v)) = staged.remove(&i) {
                    in_opt.put_state(i, Some(LayerState { step, m, v }));
                    continue;
                }
                let shape = self.live.params[i].as_tensor().dims().to_vec();
                let m = if has_m {
                    Some(self.backend.load(&self.buf, self.m_slot[i], &shape)?)
                } else {
                    None
                };
                let v = if has_v {
                    Some(self.backend.load(&self.buf, self.v_slot[i], &shape)?)
                } else {
                    None
                };
                in_opt.put_state(i, Some(LayerState { step, m, v }));
            }
        }
        if let Some(pb) = &mut self.parked_buffers {
            std::mem::swap(pb, &mut self.live.buffers);
        }
        self.phase = phase;
        Ok(())
    }

    /// Adds everything needed to continue to a checkpoint: the live network, every
    /// counterpart slot, both optimizers, the phase, the parked state and buffers.
    pub fn save(&mut self, w: &mut Writer, net: &dyn Network) -> Result<()> {
        self.sync()?;
        w.net("live", net, &self.live);
        w.meta("phase", json!(format!("{:?}", self.phase)));
        w.meta("parked_state", serde_json::to_value(&self.parked_state)?);
        w.meta("partition", serde_json::to_value(&self.partition)?);
        if let Some(pb) = &self.parked_buffers {
            for (i, t) in pb.iter().enumerate() {
                w.tensor(format!("parked_buffer/{i}"), t);
            }
        }
        // Through the device one slot at a time: the whole buffer never lands there.
        for k in 0..self.buf.len() {
            let t = self.backend.load(&self.buf, k, &[self.buf.spec(k).numel])?;
            w.tensor(
                format!("slot/{k}"),
                &t.to_device(&candle_core::Device::Cpu)?,
            );
        }
        w.optimizer("opt_p", &self.opt_p);
        w.optimizer("opt_a", &self.opt_a);
        Ok(())
    }

    /// Restores what [`SingleLive::save`] wrote (the live network came in through `new`).
    pub fn restore(&mut self, ck: &Checkpoint) -> Result<()> {
        for k in 0..self.buf.len() {
            self.backend
                .store(&ck.tensor(&format!("slot/{k}"))?, &self.buf, k)?;
        }
        self.phase = match ck.field("phase")?.as_str() {
            Some("P") => Phase::P,
            Some("A") => Phase::A,
            other => bail!("checkpoint {}: unknown phase {other:?}", ck.dir.display()),
        };
        self.parked_state = serde_json::from_value(ck.field("parked_state")?.clone())?;
        if let Some(pb) = &mut self.parked_buffers {
            for (i, t) in pb.iter_mut().enumerate() {
                *t = ck.tensor(&format!("parked_buffer/{i}"))?;
            }
        }
        let n = self.live.params.len();
        self.opt_p = ck.optimizer("opt_p", self.opt_p.settings().clone(), n)?;
        self.opt_a = ck.optimizer("opt_a", self.opt_a.settings().clone(), n)?;
        Ok(())
    }

    /// Weights of `branch` (PM or AM) as detached tensors, wherever they live.
    pub fn branch_params(&mut self, branch: Phase) -> Result<Vec<Tensor>> {
        self.sync()?;
        self.live
            .params
            .iter()
            .enumerate()
            .map(|(i, p)| {
                if branch == self.phase {
                    Ok(p.as_tensor().copy()?)
                } else {
                    self.backend
                        .load(&self.buf, self.weight_slot[i], p.as_tensor().dims())
                }
            })
            .collect()
    }

    /// Buffers of `branch`.
    pub fn branch_buffers(&self, branch: Phase) -> Vec<Tensor> {
        match &self.parked_buffers {
            Some(pb) if branch != self.phase => pb.clone(),
            _ => self.live.buffers.clone(),
        }
    }

    /// The composite: stable layers from AM's copy, unstable from PM's, buffers from PM.
    pub fn composite(&mut self) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
        let pm = self.branch_params(Phase::P)?;
        let am = self.branch_params(Phase::A)?;
        let params = (0..pm.len())
            .map(|i| {
                if self.partition.is_stable(i) {
                    am[i].clone()
                } else {
                    pm[i].clone()
                }
            })
            .collect();
        Ok((params, self.branch_buffers(Phase::P)))
    }

    /// The memory report of this placement.
    pub fn memory(&self) -> MemoryReport {
        let numel = |mask: Vec<bool>| -> u64 {
            self.live
                .params
                .iter()
                .zip(mask)
                .filter(|(_, m)| *m)
                .map(|(p, _)| p.as_tensor().elem_count() as u64)
                .sum()
        };
        let (s, u) = (
            numel(self.partition.stable_mask()),
            numel(self.partition.unstable_mask()),
        );
        let k = super::memory::state_tensors(self.opt_p.settings());
        let mut r = super::memory::report(
            Layout::Single,
            (s, u),
            k,
            self.buf_tiers,
            self.staging.capacity(),
        );
        r.measured_live_peak = self.meter.peak;
        r
    }
}

/// The partition a checkpoint was trained with; a different `stage1.partition` in the
/// config is an error naming both.
pub fn resume_partition(ctx: &RunContext, ck: &Checkpoint) -> Result<Partition> {
    let p: Partition = serde_json::from_value(ck.field("partition")?.clone())
        .with_context(|| format!("checkpoint {}: unreadable partition", ck.dir.display()))?;
    if let Some(path) = &ctx.cfg.stage1.partition {
        let want = Partition::load(path, ctx.net.as_ref())?;
        if want.stable != p.stable || want.unstable != p.unstable {
            bail!(
                "checkpoint {} was trained with another partition than `stage1.partition` = {} (stable sets {:?} vs {:?})",
                ck.dir.display(),
                path.display(),
                p.stable,
                want.stable
            );
        }
    }
    Ok(p)
}

/// Offload settings from the config.
pub fn offload_config(ctx: &RunContext) -> OffloadConfig {
    let o = &ctx.cfg.offload;
    OffloadConfig {
        host_budget_bytes: o.host_bytes,
        file_path: o.path.clone(),
        staging_bytes: o.staging_bytes,
        threads: o.threads,
    }
}

/// Runs `ldt-s`, or the dual branch in swap placement.
pub fn train(ctx: &mut RunContext) -> Result<()> {
    let cfg = ctx.cfg.clone();
    let dual = cfg.train.method != Method::LdtS;
    if dual && cfg.ldt.placement != Placement::Swap {
        bail!("internal: resident placement runs in train::dual");
    }
    let repeat = dual || cfg.ldt_s.repeat_batch;
    if !dual && repeat && cfg.ldt_s.p_steps != cfg.ldt_s.a_steps {
        bail!("config key `ldt_s.repeat_batch`: phase A replays phase P's batches, so `ldt_s.p_steps` must equal `ldt_s.a_steps`");
    }
    let names: Vec<String> = ctx.net.params().iter().map(|s| s.name.clone()).collect();
    let base = schedule::layer_lrs(&cfg.optim, &names);
    let resume = ctx.take_resume()?;
    let settings = OptimSettings::from(&cfg.optim);
    let layout = SlotLayout::new(ctx.net.as_ref(), &settings);
    let offload = offload_config(ctx);
    if let (Some(ck), Some(path)) = (&resume, &offload.file_path) {
        // A killed run leaves its spill file behind; every slot comes back from the
        // checkpoint, so the stale file of this run's offload.path is removed.
        if path.exists() {
            println!(
                "removing the stale counterpart file {} of the run resumed from {}",
                path.display(),
                ck.dir.display()
            );
            std::fs::remove_file(path).with_context(|| {
                format!(
                    "cannot remove the stale counterpart file {}",
                    path.display()
                )
            })?;
        }
    }
    // The buffer comes first: a budget that cannot hold it fails before any training.
    let mover = backend::for_device(&ctx.device, &offload, cfg.offload.ema)?;
    let counterparts = layout.allocate(mover, &offload)?;
    let (start, partition) = match &resume {
        Some(ck) => (
            ck.net("live", ctx.net.as_ref())?,
            resume_partition(ctx, ck)?,
        ),
        None => {
            let mut start = ctx.initial_state()?;
            let p = stage1::run(ctx, &mut start)?;
            (start, p)
        }
    };
    let phases = if repeat {
        None
    } else {
        Some((cfg.ldt_s.p_steps, cfg.ldt_s.a_steps))
    };
    ctx.agree_partition(&partition)?;
    ctx.report_lag(&partition, phases)?;
    let mut m = SingleLive::new(
        start,
        partition,
        settings,
        layout,
        counterparts,
        &offload,
        dual,
    )
    .context("setting up the counterpart buffer")?;
    let (mut n_p, mut n_a, mut step) = (0usize, 0usize, 0usize);
    if let Some(ck) = &resume {
        m.restore(ck)?;
        step = ck.step;
        n_p = ck.field("n_p")?.as_u64().unwrap_or(0) as usize;
        n_a = ck.field("n_a")?.as_u64().unwrap_or(0) as usize;
    }
    let done = step;
    let (p_len, a_len) = if dual {
        (1, 1)
    } else {
        (cfg.ldt_s.p_steps, cfg.ldt_s.a_steps)
    };
    // Batches: one per step; in repeat mode one per P step, replayed by A.
    let mut loader = ctx.train_loader(done, cfg.train.steps - done)?;
    let progress = Progress::new(
        cfg.train.method.name(),
        cfg.train.steps,
        cfg.train.log_every,
    );
    let mut meter = Meter::default();
    let mut replay: Vec<HostBatch> = Vec::new();
    let t0 = Instant::now();
    let ema = cfg.ldt.ema_every;
    while step < cfg.train.steps {
        if repeat {
            // P phase of `p_len` batches, then A replays them; a "step" is one batch.
            let k = p_len.min(cfg.train.steps - step);
            replay.clear();
            if dual && m.phase == Phase::A {
                // Swap placement alternates the order of the half-steps to swap once per step.
                let hb = loader.next_batch()?;
                let batch = ctx.batch(&hb)?;
                let lrs: Vec<f64> = base
                    .iter()
                    .map(|&b| schedule::lr_at(&cfg.optim, b, step + 1, cfg.train.steps))
                    .collect();
                m.stage_next()?;
                let sa = m.half_step(ctx, step + 1, &batch, &lrs)?;
                m.switch_to(Phase::P)?;
                let sp = m.half_step(ctx, step + 1, &batch, &lrs)?;
                meter.add(&sp);
                step += 1;
                n_p += 1;
                n_a += 1;
                if n_p % ema == 0 {
                    let factor = dpu::warmup_factor(&cfg.ldt, n_p / ema);
                    m.fold(Phase::P, factor)?;
                    m.fold(Phase::A, factor)?;
                }
                let pos = Position {
                    step,
                    n_p,
                    n_a,
                    clean: true,
                    loss_p: sp.loss,
                    loss_a: sa.loss,
                };
                after_step(ctx, &mut m, pos, &cfg, &progress, &mut meter)?;
                continue;
            }
            m.switch_to(Phase::P)?;
            let mut p_losses = Vec::new();
            for j in 0..k {
                let hb = loader.next_batch()?;
                let batch = ctx.batch(&hb)?;
                let lrs: Vec<f64> = base
                    .iter()
                    .map(|&b| schedule::lr_at(&cfg.optim, b, step + j + 1, cfg.train.steps))
                    .collect();
                if j + 1 == k {
                    m.stage_next()?;
                }
                let s = m.half_step(ctx, step + j + 1, &batch, &lrs)?;
                meter.add(&s);
                p_losses.push(s.loss);
                replay.push(hb);
            }
            m.switch_to(Phase::A)?;
            for (j, hb) in replay.iter().enumerate() {
                let batch = ctx.batch(hb)?;
                let lrs: Vec<f64> = base
                    .iter()
                    .map(|&b| schedule::lr_at(&cfg.optim, b, step + 1, cfg.train.steps))
                    .collect();
                if j + 1 == replay.len() {
                    m.stage_next()?;
                }
                let sa = m.half_step(ctx, step + 1, &batch, &lrs)?;
                step += 1;
                n_p += 1;
                n_a += 1;
                // Both folds of a step after its A half-step, as the dual branch does.
                if n_p % ema == 0 {
                    let factor = dpu::warmup_factor(&cfg.ldt, n_p / ema);
                    m.fold(Phase::P, factor)?;
                    m.fold(Phase::A, factor)?;
                }
                // A checkpoint only when no replayed batch is pending.
                let clean = j + 1 == replay.len();
                let pos = Position {
                    step,
                    n_p,
                    n_a,
                    clean,
                    loss_p: p_losses[j],
                    loss_a: sa.loss,
                };
                after_step(ctx, &mut m, pos, &cfg, &progress, &mut meter)?;
            }
        } else {
            // Phases P (p_len steps) and A (a_len steps) alternate, starting with P; the
            // position inside the cycle follows from the step, so a resumed run continues
            // mid-phase.
            let pos = step % (p_len + a_len);
            let (phase, last) = if pos < p_len {
                (Phase::P, pos + 1 == p_len)
            } else {
                (Phase::A, pos + 1 == p_len + a_len)
            };
            m.switch_to(phase)?;
            if last || step + 1 == cfg.train.steps {
                m.stage_next()?;
            }
            let hb = loader.next_batch()?;
            let batch = ctx.batch(&hb)?;
            let lrs: Vec<f64> = base
                .iter()
                .map(|&b| schedule::lr_at(&cfg.optim, b, step + 1, cfg.train.steps))
                .collect();
            let s = m.half_step(ctx, step + 1, &batch, &lrs)?;
            meter.add(&s);
            step += 1;
            let n = match phase {
                Phase::P => {
                    n_p += 1;
                    n_p
                }
                Phase::A => {
                    n_a += 1;
                    n_a
                }
            };
            if n % ema == 0 {
                m.fold(phase, dpu::warmup_factor(&cfg.ldt, n / ema))?;
            }
            let (lp, la) = if phase == Phase::P {
                (s.loss, f32::NAN)
            } else {
                (f32::NAN, s.loss)
            };
            let pos = Position {
                step,
                n_p,
                n_a,
                clean: true,
                loss_p: lp,
                loss_a: la,
            };
            after_step(ctx, &mut m, pos, &cfg, &progress, &mut meter)?;
        }
    }
    progress.finish();
    m.sync()?;
    let train_secs = t0.elapsed().as_secs_f64();
    let net = ctx.net.as_ref();
    let (pm, am) = (m.branch_params(Phase::P)?, m.branch_params(Phase::A)?);
    let named = |p: &[Tensor], b: &[Tensor]| -> Vec<(String, Tensor)> {
        net.params()
            .iter()
            .map(|s| s.name.clone())
            .zip(p.iter().cloned())
            .chain(
                net.buffers()
                    .iter()
                    .map(|s| s.name.clone())
                    .zip(b.iter().cloned()),
            )
            .collect()
    };
    io::save_tensors(
        &named(&pm, &m.branch_buffers(Phase::P)),
        &ctx.dir.join("pm.safetensors"),
    )?;
    io::save_tensors(
        &named(&am, &m.branch_buffers(Phase::A)),
        &ctx.dir.join("am.safetensors"),
    )?;
    let (cp, cb) = m.composite()?;
    io::save_tensors(&named(&cp, &cb), &ctx.dir.join("composite.safetensors"))?;
    let r = ctx.evaluate(&cp, &cb)?;
    ctx.log_eval(cfg.train.steps, "composite", &r)?;
    ctx.summary.eval.insert("composite".into(), r);
    let candidates = [
        ("composite", cp.clone(), cb.clone()),
        ("pm", pm.clone(), m.branch_buffers(Phase::P)),
        ("am", am.clone(), m.branch_buffers(Phase::A)),
    ];
    ctx.agree_replicas(&candidates)?;
    ctx.select(cfg.train.steps, &candidates)?;
    for (name, p, b) in [
        ("pm", &pm, m.branch_buffers(Phase::P)),
        ("am", &am, m.branch_buffers(Phase::A)),
    ] {
        let r = ctx.evaluate(p, &b)?;
        ctx.log_eval(cfg.train.steps, name, &r)?;
        ctx.summary.eval.insert(name.into(), r);
    }
    ctx.record_training(&m.memory(), train_secs, cfg.train.steps - done)
}

/// Where the loop stands after a step: counters for checkpoints, and whether the state
/// is complete (no replayed batch pending).
struct Position {
    step: usize,
    n_p: usize,
    n_a: usize,
    clean: bool,
    /// PM's loss of the step (NaN when PM did not step).
    loss_p: f32,
    /// AM's loss of the step (NaN when AM did not step).
    loss_a: f32,
}

fn after_step(
    ctx: &mut RunContext,
    m: &mut SingleLive,
    pos: Position,
    cfg: &crate::config::Config,
    progress: &Progress,
    meter: &mut Meter,
) -> Result<()> {
    let (loss_p, loss_a) = (pos.loss_p, pos.loss_a);
    let step = pos.step;
    let f = |x: f32| if x.is_finite() { json!(x) } else { json!(null) };
    ctx.metrics.write(
        json!({"kind": "train", "stage": "train", "step": step, "phase": format!("{:?}", m.phase),
        "loss_pm": f(loss_p), "loss_am": f(loss_a)}),
    )?;
    if step.is_multiple_of(cfg.train.log_every) || step == cfg.train.steps {
        progress.update(step, &meter.take().0);
    }
    if cfg.snapshots.at_steps.contains(&step) {
        let net = ctx.net.as_ref();
        for (tag, ph) in [("pm", Phase::P), ("am", Phase::A)] {
            let p = m.branch_params(ph)?;
            let b = m.branch_buffers(ph);
            let named: Vec<(String, Tensor)> = net
                .params()
                .iter()
                .map(|s| s.name.clone())
                .zip(p)
                .chain(net.buffers().iter().map(|s| s.name.clone()).zip(b))
                .collect();
            io::save_tensors(
                &named,
                &ctx.dir.join(format!("step{step}_{tag}.safetensors")),
            )?;
        }
    }
    if cfg.eval.every > 0 && step.is_multiple_of(cfg.eval.every) && step < cfg.train.steps {
        let (cp, cb) = m.composite()?;
        let r = ctx.evaluate(&cp, &cb)?;
        progress.println(&format!("eval @{step}: composite {}", r.line()));
        ctx.log_eval(step, "composite", &r)?;
        let (pm, am) = (m.branch_params(Phase::P)?, m.branch_params(Phase::A)?);
        let candidates = [
            ("composite", cp, cb),
            ("pm", pm, m.branch_buffers(Phase::P)),
            ("am", am, m.branch_buffers(Phase::A)),
        ];
        ctx.select(step, &candidates)?;
        if cfg.eval.branches {
            for (name, p, b) in &candidates[1..] {
                let r = ctx.evaluate(p, b)?;
                ctx.log_eval(step, name, &r)?;
            }
        }
    }
    if pos.clean && ctx.checkpoint_due(step)? {
        let mut w = Writer::default();
        m.save(&mut w, ctx.net.as_ref())?;
        w.meta("n_p", json!(pos.n_p));
        w.meta("n_a", json!(pos.n_a));
        ctx.checkpoint(step, w)?;
    }
    Ok(())
}
