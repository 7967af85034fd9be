//! Where LDT's two branches live. [`Resident`]: two live networks. [`Parked`]: one live
//! network, the other branch's weights and optimizer state waiting in the counterpart
//! store. The dual branch and LDT-S are written once over [`Branches`] and compute the
//! same bits on either.

use super::driver::Visitor;
use super::memory::{self, LiveMeter};
use super::step::{Batch, GradPlan, StepStats};
use super::update;
use super::RunContext;
use crate::checkpoint::{Checkpoint, Writer};
use crate::config::{OptimizerPlacement, ProbeNetwork};
use crate::ldt::partition::{Partition, Phase};
use crate::metrics::MemoryReport;
use crate::model::Weights;
use crate::model::{Held, NetState, Network};
use crate::offload::backend::fold_live;
use crate::offload::store::{CounterpartStore, LayerSpec};
use crate::offload::OffloadConfig;
use crate::offload::{fused_ema, EmaTask, HostSlice, HostSliceMut};
use crate::optim::{Grad, OptimSettings, Optimizer};
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde_json::json;
use std::path::Path;

/// The storage of PM and AM: their weights, buffers and optimizers.
pub trait Branches {
    /// The branch whose network is live, or `None` when both are ([`Resident`]).
    fn live(&self) -> Option<Phase>;
    /// Makes `phase` live (a no-op where both are).
    fn switch_to(&mut self, phase: Phase) -> Result<()>;
    /// Starts loading the parked branch's optimizer state for the next switch.
    fn stage_next(&mut self) -> Result<()>;
    /// The network of `phase`, which must be live.
    fn state(&mut self, phase: Phase) -> &mut NetState;
    /// Waits until nothing reads `phase`'s trained weights any more (before their update).
    fn before_update(&mut self) -> Result<()>;
    /// The network and optimizer of live branch `phase`, for its update.
    fn trainer(&mut self, phase: Phase) -> (&mut NetState, &mut Optimizer);
    /// Records the live bytes held at the end of an update with gradients `grads`.
    fn observe(&mut self, grads: &[Option<Grad>]);
    /// The DPU fold of `branch`'s trained set into the other branch's frozen copy, with
    /// every layer's coefficient times `factor`.
    fn fold(&mut self, partition: &Partition, branch: Phase, factor: f64) -> Result<()>;
    /// Calls `f` with the weights and buffers of `view`, where they live: layers of the
    /// parked branch are swapped into the live network and back (bit for bit), never
    /// copied, so no second network is ever held on the device.
    fn visit(&mut self, view: View, partition: &Partition, f: &mut Visitor) -> Result<()>;
    /// Calls `f` with the composite of `partition` as one live network, for work that
    /// changes no weight or buffer (a re-partition's statistics): its layers of the other
    /// branch are swapped into a live network and back, bit for bit, never copied.
    fn with_composite(&mut self, partition: &Partition, f: &mut Lent) -> Result<()>;
    /// Moves `layers` to the other set: for each, PM's and AM's copies trade places and
    /// its optimizer state goes to the other branch's optimizer. The composite stays the
    /// same bit for bit (its copy of a stable layer is AM's, of an unstable one PM's),
    /// and the trained copy continues, with its moments, in the branch that trains the
    /// layer now; the frozen copy becomes the EMA copy of the other branch. Its own
    /// inverse.
    fn move_layers(&mut self, layers: &[usize]) -> Result<()>;
    /// Adds both branches to checkpoint `w`.
    fn save(&mut self, w: &mut Writer, net: &dyn Network) -> Result<()>;
    /// Waits for work in flight.
    fn sync(&mut self) -> Result<()>;
    /// The memory report of this storage for `partition`.
    fn memory(&self, partition: &Partition) -> MemoryReport;
}

/// What [`Branches::with_composite`] calls with the composite as a live network.
pub type Lent<'a> = dyn FnMut(&mut NetState) -> Result<()> + 'a;

/// A network made of the branches' layers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum View {
    /// PM or AM.
    Branch(Phase),
    /// The kept network: stable layers from AM's copy, unstable layers and buffers from
    /// PM's.
    Composite,
    /// Where the composite is heading: each layer from the branch that trains it
    /// (stable layers and buffers from PM, unstable layers from AM); the composite
    /// follows it at the DPU's half-lives.
    Leading,
}

impl From<ProbeNetwork> for View {
    fn from(n: ProbeNetwork) -> View {
        match n {
            ProbeNetwork::Leading => View::Leading,
            ProbeNetwork::Composite => View::Composite,
        }
    }
}

impl View {
    /// The branch layer `i` comes from.
    fn layer(self, partition: &Partition, i: usize) -> Phase {
        match self {
            View::Branch(b) => b,
            View::Composite if partition.is_stable(i) => Phase::A,
            View::Composite => Phase::P,
            View::Leading if partition.is_stable(i) => Phase::P,
            View::Leading => Phase::A,
        }
    }

    /// The branch the buffers come from.
    fn buffers(self) -> Phase {
        match self {
            View::Branch(b) => b,
            View::Composite | View::Leading => Phase::P,
        }
    }
}

/// One optimizer step of live branch `phase` on `batch`: forward and backward of its
/// trained set, the non-finite guard, the update.
pub fn half_step(
    ctx: &mut RunContext,
    b: &mut dyn Branches,
    partition: &Partition,
    phase: Phase,
    step: usize,
    batch: &Batch,
    lrs: &[f64],
) -> Result<StepStats> {
    let mask = partition.mask(phase);
    let at = update::At {
        step,
        branch: phase.branch(),
    };
    // A fold still reading the live trained set must finish before the update: before
    // the backward where it updates block by block, else after it (the fold overlaps it).
    let by_block = GradPlan::of(&ctx.cfg).update_by_block;
    if by_block {
        b.before_update()?;
    }
    let (state, opt) = b.trainer(phase);
    let (stats, mut grads) = update::gradients(ctx, state, opt, &mask, batch, lrs, at)?;
    if !by_block {
        b.before_update()?;
    }
    let (state, opt) = b.trainer(phase);
    update::finish(ctx, state, opt, (&stats, &mut grads), lrs, at)?;
    b.observe(&grads);
    Ok(stats)
}

/// The DPU fold between two host master copies, `dst = w*dst + (1-w)*src`: the
/// arithmetic of [`fold_live`].
fn fold_host(dst: &mut [f32], src: &[f32], w: f64) {
    fused_ema(
        &mut [EmaTask {
            dst: HostSliceMut::F32(dst),
            src: HostSlice::F32(src),
            w,
        }],
        1,
    );
}

/// The DPU fold of layer `i`, `dst = w*dst + (1-w)*src`, wherever each copy lives
/// ([`NetState::held`]): on the device ([`fold_live`]) or in a host master
/// ([`fold_host`], then the working copy refreshed); a copy held elsewhere than the
/// destination is brought to it first. Both folds compute the same bits.
fn fold_layer(dst: &mut NetState, src: &NetState, i: usize, w: f64) -> Result<()> {
    let on_device = |s: &NetState| match s.held(i) {
        Held::Device(v) => Some(v.as_tensor().clone()),
        Held::Master => None,
    };
    let from = on_device(src);
    if let Some(d) = on_device(dst) {
        let s = match from {
            Some(s) => s,
            None => src.weight(i)?,
        };
        return fold_live(&d, &s, w);
    }
    let values = match from {
        Some(s) => s.flatten_all()?.to_vec1::<f32>()?,
        None => match &src.masters {
            Some(m) => m[i].to_vec(),
            None => bail!("layer {i} of the fold's source has no value"),
        },
    };
    let Some(m) = dst.masters_mut()? else {
        bail!("layer {i} of the fold's destination has no value");
    };
    fold_host(&mut m[i], &values, w);
    dst.refresh(i)
}

/// Both branches live: PM and AM each a network with its own optimizer.
pub struct Resident {
    pm: NetState,
    am: NetState,
    opt_p: Optimizer,
    opt_a: Optimizer,
    meter: LiveMeter,
}

impl Resident {
    /// Both branches start as `start`; their optimizers keep state at `placement`.
    pub fn new(
        start: NetState,
        settings: OptimSettings,
        layers: usize,
        placement: OptimizerPlacement,
    ) -> Result<Self> {
        Ok(Resident {
            pm: start.deep_clone()?,
            am: start,
            opt_p: Optimizer::new(settings.clone(), layers).placed(placement)?,
            opt_a: Optimizer::new(settings, layers).placed(placement)?,
            meter: LiveMeter::default(),
        })
    }

    /// The branches saved by [`Branches::save`], in the working layout of `ctx`.
    pub fn resume(
        ck: &Checkpoint,
        ctx: &RunContext,
        settings: OptimSettings,
        placement: OptimizerPlacement,
    ) -> Result<Self> {
        let net = ctx.net.as_ref();
        let n = net.params().len();
        Ok(Resident {
            pm: ctx.restore_net(ck, "pm")?,
            am: ctx.restore_net(ck, "am")?,
            opt_p: ck
                .optimizer("opt_p", settings.clone(), n)?
                .placed(placement)?,
            opt_a: ck.optimizer("opt_a", settings, n)?.placed(placement)?,
            meter: LiveMeter::default(),
        })
    }

    fn branch(&mut self, phase: Phase) -> (&mut NetState, &mut Optimizer) {
        match phase {
            Phase::P => (&mut self.pm, &mut self.opt_p),
            Phase::A => (&mut self.am, &mut self.opt_a),
        }
    }
}

impl Branches for Resident {
    fn live(&self) -> Option<Phase> {
        None
    }

    fn switch_to(&mut self, _: Phase) -> Result<()> {
        Ok(())
    }

    fn stage_next(&mut self) -> Result<()> {
        Ok(())
    }

    fn state(&mut self, phase: Phase) -> &mut NetState {
        self.branch(phase).0
    }

    fn before_update(&mut self) -> Result<()> {
        Ok(())
    }

    fn trainer(&mut self, phase: Phase) -> (&mut NetState, &mut Optimizer) {
        self.branch(phase)
    }

    fn observe(&mut self, grads: &[Option<Grad>]) {
        let weights = memory::weight_bytes(&self.pm) + memory::weight_bytes(&self.am);
        let opt = (self.opt_p.bytes() + self.opt_a.bytes()) as u64;
        self.meter.observe(weights, grads, opt);
    }

    fn fold(&mut self, partition: &Partition, branch: Phase, factor: f64) -> Result<()> {
        let (src, dst) = match branch {
            Phase::P => (&self.pm, &mut self.am),
            Phase::A => (&self.am, &mut self.pm),
        };
        for (i, l) in partition.layers.iter().enumerate() {
            if l.set != branch.trains() {
                continue;
            }
            fold_layer(dst, src, i, l.coefficient * factor)?;
        }
        Ok(())
    }

    fn visit(&mut self, view: View, partition: &Partition, f: &mut Visitor) -> Result<()> {
        let state = |b: Phase| match b {
            Phase::P => &self.pm,
            Phase::A => &self.am,
        };
        let params = (0..self.pm.len())
            .map(|i| state(view.layer(partition, i)).weight_ref(i))
            .collect();
        f(&Weights(params), &state(view.buffers()).buffers)
    }

    fn with_composite(&mut self, partition: &Partition, f: &mut Lent) -> Result<()> {
        // PM holds the composite's unstable layers and buffers; AM lends the stable ones.
        let lent: Vec<usize> = (0..self.pm.len())
            .filter(|&i| View::Composite.layer(partition, i) == Phase::A)
            .collect();
        let exchange =
            |r: &mut Resident| lent.iter().try_for_each(|&i| r.pm.swap_layer(&mut r.am, i));
        exchange(self)?;
        let seen = f(&mut self.pm);
        // An exchange is its own inverse.
        exchange(self)?;
        seen
    }

    fn move_layers(&mut self, layers: &[usize]) -> Result<()> {
        for &i in layers {
            self.pm.swap_layer(&mut self.am, i)?;
            self.opt_p.swap_layer(&mut self.opt_a, i);
        }
        Ok(())
    }

    fn save(&mut self, w: &mut Writer, net: &dyn Network) -> Result<()> {
        w.net("pm", net, &self.pm)?;
        w.net("am", net, &self.am)?;
        w.optimizer("opt_p", &self.opt_p, net)?;
        w.optimizer("opt_a", &self.opt_a, net)?;
        Ok(())
    }

    fn sync(&mut self) -> Result<()> {
        Ok(())
    }

    fn memory(&self, partition: &Partition) -> MemoryReport {
        let k = memory::device_state_tensors(&self.opt_p);
        let mut r = memory::report(
            (
                memory::Layout::Resident,
                memory::working_bytes(&self.pm, self.opt_p.placement()),
            ),
            partition.set_numel(),
            k,
            (0, 0),
            0,
        );
        r.measured_live_peak = self.meter.peak;
        r.host_optimizer = (self.opt_p.host_bytes() + self.opt_a.host_bytes()) as u64
            + self.pm.master_bytes()
            + self.am.master_bytes();
        r
    }
}

/// One live network; the other branch parked in the counterpart store. A phase change
/// swaps every layer's live tensor with its parked copy in place and moves optimizer
/// state out and in. Folds into parked weights run asynchronously and are fenced before
/// the live source changes (the next update) and before any swap.
pub struct Parked {
    live: NetState,
    phase: Phase,
    opt_p: Optimizer,
    opt_a: Optimizer,
    /// The parked branch's buffers (the dual branch; `ldt-s` shares one set).
    parked_buffers: Option<Vec<Tensor>>,
    store: CounterpartStore,
    settings: OptimSettings,
    meter: LiveMeter,
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

/// Allocates the counterpart store of `ctx`'s network (before any training, so that a
/// budget that cannot hold it fails first). A spill file an earlier instance of this
/// run left behind (killed: resumed from a checkpoint, or named in the run directory's
/// `.ldt-spill`) is removed when no live process holds it; every slot it held comes
/// back from the checkpoint or is made anew.
pub fn allocate_store(ctx: &RunContext, resuming: Option<&Checkpoint>) -> Result<CounterpartStore> {
    let offload = offload_config(ctx);
    if let Some(path) = &offload.file_path {
        let marker = ctx.dir.join(".ldt-spill");
        let ours = std::fs::read_to_string(&marker).is_ok_and(|m| Path::new(m.trim()) == path);
        if (ours || resuming.is_some()) && path.exists() {
            let removed = crate::offload::remove_stale_spill(path).with_context(|| {
                format!(
                    "cannot remove the stale counterpart file {}",
                    path.display()
                )
            })?;
            if removed {
                println!(
                    "removed the stale counterpart file {} an interrupted instance of this run left",
                    path.display()
                );
            }
        }
        // Before the file exists: a kill from here on leaves a file this directory names.
        std::fs::write(&marker, format!("{}\n", path.display()))
            .with_context(|| format!("cannot write {}", marker.display()))?;
    }
    let settings = OptimSettings::from(&ctx.cfg.optim);
    // Optimizer state parks here unless it lives on the host anyway.
    let device = ctx.cfg.offload.optimizer == OptimizerPlacement::Device;
    let with_m = device && (settings.betas[0] > 0.0 || settings.momentum > 0.0);
    let with_v = device;
    let layers: Vec<LayerSpec> = ctx
        .net
        .params()
        .iter()
        .map(|p| LayerSpec {
            name: p.name.clone(),
            shape: p.shape.clone(),
        })
        .collect();
    CounterpartStore::allocate(
        &layers,
        (with_m, with_v),
        &ctx.device,
        &offload,
        ctx.cfg.offload.ema,
    )
    .context("setting up the counterpart buffer")
}

impl Parked {
    /// Starts in phase P from `start`; both branches begin equal, so the parked AM copy
    /// is a copy of `start`. `per_branch_buffers`: each branch keeps its own buffers (the
    /// dual branch) instead of sharing the live set (`ldt-s`).
    pub fn new(
        start: NetState,
        mut store: CounterpartStore,
        settings: OptimSettings,
        placement: OptimizerPlacement,
        per_branch_buffers: bool,
    ) -> Result<Self> {
        let n = start.len();
        for i in 0..n {
            match (start.held(i), &start.masters) {
                (Held::Device(v), _) => store.park_weights(i, v.as_tensor())?,
                (Held::Master, Some(m)) => store.park_master(i, &m[i])?,
                (Held::Master, None) => bail!("layer {i} of the start has no value"),
            }
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
        Ok(Parked {
            live: start,
            phase: Phase::P,
            opt_p: Optimizer::new(settings.clone(), n).placed(placement)?,
            opt_a: Optimizer::new(settings.clone(), n).placed(placement)?,
            parked_buffers,
            store,
            settings,
            meter: LiveMeter::default(),
        })
    }

    /// Restores what [`Branches::save`] wrote (the live network comes in through
    /// [`Parked::new`] from the checkpoint's `live`).
    pub fn restore(&mut self, ck: &Checkpoint) -> Result<()> {
        let slots = self.store.slots();
        if let Some(saved) = ck.meta.get("slots").and_then(|v| v.as_u64()) {
            if saved != slots as u64 {
                bail!(
                    "checkpoint {}: its counterpart buffer has {saved} slots, this run's {slots}: \
                     it was written with another offload.optimizer or optimizer (moments \
                     park in the buffer only with offload.optimizer = \"device\"); resume \
                     with the settings of the run that wrote it",
                    ck.dir.display()
                );
            }
        }
        for k in 0..slots {
            self.store
                .restore_slot(k, &ck.tensor(&format!("slot/{k}"))?)?;
        }
        self.phase = match ck.field("phase")?.as_str() {
            Some("P") => Phase::P,
            Some("A") => Phase::A,
            other => bail!("checkpoint {}: unknown phase {other:?}", ck.dir.display()),
        };
        let parked = serde_json::from_value(ck.field("parked_state")?.clone())
            .with_context(|| format!("checkpoint {}: unreadable parked_state", ck.dir.display()))?;
        self.store
            .set_parked_states(parked)
            .with_context(|| format!("checkpoint {}", ck.dir.display()))?;
        if let Some(pb) = &mut self.parked_buffers {
            for (i, t) in pb.iter_mut().enumerate() {
                *t = ck.tensor(&format!("parked_buffer/{i}"))?;
            }
        }
        let n = self.live.len();
        let placement = self.opt_p.placement();
        self.opt_p = ck
            .optimizer("opt_p", self.settings.clone(), n)?
            .placed(placement)?;
        self.opt_a = ck
            .optimizer("opt_a", self.settings.clone(), n)?
            .placed(placement)?;
        Ok(())
    }
}

impl Parked {
    /// Exchanges layers `layers` (and with `buffers` the buffers) of the live network
    /// with their parked counterparts. With host masters the masters are exchanged, and
    /// with `refresh` the working copies follow (a visit reads the masters and swaps
    /// them back, so it leaves the working copies alone).
    fn swap_in(&mut self, layers: &[usize], buffers: bool, refresh: bool) -> Result<()> {
        for &i in layers {
            if let Held::Device(v) = self.live.held(i) {
                self.store.swap_weights(i, v.as_tensor())?;
                continue;
            }
            match self.live.masters_mut()? {
                Some(m) => self.store.swap_master(i, &mut m[i])?,
                None => bail!("layer {i} of the live network has no value"),
            }
        }
        if refresh {
            layers.iter().try_for_each(|&i| self.live.refresh(i))?;
        }
        if let (true, Some(pb)) = (buffers, &mut self.parked_buffers) {
            std::mem::swap(pb, &mut self.live.buffers);
        }
        Ok(())
    }

    /// The layers of `view` that are parked, and whether its buffers are.
    fn parked_in(&self, view: View, partition: &Partition) -> (Vec<usize>, bool) {
        let layers = (0..self.live.len())
            .filter(|&i| view.layer(partition, i) != self.phase)
            .collect();
        let buffers = self.parked_buffers.is_some() && view.buffers() != self.phase;
        (layers, buffers)
    }
}

impl Branches for Parked {
    fn live(&self) -> Option<Phase> {
        Some(self.phase)
    }

    fn switch_to(&mut self, phase: Phase) -> Result<()> {
        if phase == self.phase {
            return Ok(());
        }
        let all: Vec<usize> = (0..self.live.len()).collect();
        self.swap_in(&all, true, true)?;
        let (out_opt, in_opt) = match self.phase {
            Phase::P => (&mut self.opt_p, &mut self.opt_a),
            Phase::A => (&mut self.opt_a, &mut self.opt_p),
        };
        self.store.finish_staging()?;
        for i in 0..self.live.len() {
            if let Some(st) = out_opt.take_state(i) {
                self.store.park_state(i, &st)?;
            } else if let Some(st) = self.store.unpark_state(i)? {
                in_opt.put_state(i, Some(st));
            }
        }
        self.phase = phase;
        Ok(())
    }

    fn stage_next(&mut self) -> Result<()> {
        Ok(self.store.stage_states()?)
    }

    fn state(&mut self, phase: Phase) -> &mut NetState {
        debug_assert_eq!(phase, self.phase, "only the live branch trains");
        &mut self.live
    }

    fn before_update(&mut self) -> Result<()> {
        Ok(self.store.sync()?)
    }

    fn trainer(&mut self, phase: Phase) -> (&mut NetState, &mut Optimizer) {
        debug_assert_eq!(phase, self.phase, "only the live branch trains");
        let opt = match phase {
            Phase::P => &mut self.opt_p,
            Phase::A => &mut self.opt_a,
        };
        (&mut self.live, opt)
    }

    fn observe(&mut self, grads: &[Option<Grad>]) {
        let staged = self.store.staged_bytes();
        let opt = (self.opt_p.bytes() + self.opt_a.bytes()) as u64 + staged;
        self.meter
            .observe(memory::weight_bytes(&self.live), grads, opt);
    }

    fn fold(&mut self, partition: &Partition, branch: Phase, factor: f64) -> Result<()> {
        // Each live layer where it lives: on the device, or a host master (the fold runs
        // there: with host masters, or streamed from them).
        let (mut device, mut host) = (Vec::new(), Vec::new());
        for (i, l) in partition.layers.iter().enumerate() {
            if l.set != branch.trains() {
                continue;
            }
            let w = l.coefficient * factor;
            match self.live.held(i) {
                Held::Device(v) => device.push((i, v.as_tensor().clone(), w)),
                Held::Master => host.push((i, w)),
            }
        }
        if !host.is_empty() {
            let Some(m) = self.live.masters_mut()? else {
                bail!("the live network's layers held in masters have none");
            };
            if branch == self.phase {
                // Source live, destination (the other branch's frozen copy) parked.
                let jobs: Vec<(usize, &[f32], f64)> =
                    host.iter().map(|&(i, w)| (i, &m[i][..], w)).collect();
                self.store.fold_masters_into_parked(&jobs)?;
            } else {
                // Source parked, destination (the live branch's frozen copy) live.
                for &(i, w) in &host {
                    self.store.fold_parked_into_master(i, &mut m[i], w)?;
                }
                host.iter().try_for_each(|&(i, _)| self.live.refresh(i))?;
            }
        }
        if branch == self.phase {
            self.store.fold_into_parked(device);
        } else {
            for (i, live, w) in device {
                self.store.fold_from_parked(i, &live, w)?;
            }
        }
        Ok(())
    }

    fn visit(&mut self, view: View, partition: &Partition, f: &mut Visitor) -> Result<()> {
        let (parked, swap_buffers) = self.parked_in(view, partition);
        self.swap_in(&parked, swap_buffers, false)?;
        let seen = f(&self.live.weight_refs(), &self.live.buffers);
        // A swap is its own inverse: the second one restores the live branch exactly.
        self.swap_in(&parked, swap_buffers, false)?;
        seen
    }

    fn with_composite(&mut self, partition: &Partition, f: &mut Lent) -> Result<()> {
        let (parked, swap_buffers) = self.parked_in(View::Composite, partition);
        // The working copies follow the masters: the forward reads them.
        self.swap_in(&parked, swap_buffers, true)?;
        let seen = f(&mut self.live);
        self.swap_in(&parked, swap_buffers, true)?;
        seen
    }

    fn move_layers(&mut self, layers: &[usize]) -> Result<()> {
        self.swap_in(layers, false, true)?;
        let (live, parked) = match self.phase {
            Phase::P => (&mut self.opt_p, &mut self.opt_a),
            Phase::A => (&mut self.opt_a, &mut self.opt_p),
        };
        if live.placement() == OptimizerPlacement::Host {
            // Both optimizers keep their state on the host, whichever branch is live.
            layers.iter().for_each(|&i| live.swap_layer(parked, i));
            return Ok(());
        }
        // The parked branch's state waits in the store: a layer's state leaves the live
        // optimizer for it, or comes from it. A staged load is taken first, so that no
        // staged copy outlives a state that moved.
        self.store.finish_staging()?;
        for &i in layers {
            if let Some(st) = live.take_state(i) {
                self.store.park_state(i, &st)?;
            } else if let Some(st) = self.store.unpark_state(i)? {
                live.put_state(i, Some(st));
            }
        }
        Ok(())
    }

    fn save(&mut self, w: &mut Writer, net: &dyn Network) -> Result<()> {
        self.store.sync()?;
        w.net("live", net, &self.live)?;
        w.meta("phase", json!(format!("{:?}", self.phase)));
        w.meta(
            "parked_state",
            serde_json::to_value(self.store.parked_states())?,
        );
        if let Some(pb) = &self.parked_buffers {
            for (i, t) in pb.iter().enumerate() {
                w.tensor(format!("parked_buffer/{i}"), t);
            }
        }
        let slots = self.store.slots_to_host()?;
        w.meta("slots", json!(slots.len()));
        for (k, t) in slots.iter().enumerate() {
            w.tensor(format!("slot/{k}"), t);
        }
        w.optimizer("opt_p", &self.opt_p, net)?;
        w.optimizer("opt_a", &self.opt_a, net)?;
        Ok(())
    }

    fn sync(&mut self) -> Result<()> {
        Ok(self.store.sync()?)
    }

    fn memory(&self, partition: &Partition) -> MemoryReport {
        let k = memory::device_state_tensors(&self.opt_p);
        let mut r = memory::report(
            (
                memory::Layout::Single,
                memory::working_bytes(&self.live, self.opt_p.placement()),
            ),
            partition.set_numel(),
            k,
            self.store.tiers(),
            self.store.staging_capacity(),
        );
        r.measured_live_peak = self.meter.peak;
        r.host_optimizer =
            (self.opt_p.host_bytes() + self.opt_a.host_bytes()) as u64 + self.live.master_bytes();
        r
    }
}

/// Where LDT's branches start.
pub enum Opening<'a> {
    /// From a training checkpoint.
    Resume(&'a Checkpoint),
    /// From stage 1, run now on the initial weights (or continued from the run's
    /// stage-1 checkpoint).
    Stage1,
    /// From a network and a partition the search chose.
    Chosen(Box<Choice>),
}

/// What the search opens a run (or one of its probes) with.
pub struct Choice {
    /// The network after stage 1's warm-up.
    pub start: NetState,
    /// The partition.
    pub partition: Partition,
    /// A search probe, which reports nothing.
    pub probe: bool,
}

impl<'a> Opening<'a> {
    /// The training checkpoint, when continuing from one.
    pub fn checkpoint(&self) -> Option<&'a Checkpoint> {
        match self {
            Opening::Resume(ck) => Some(*ck),
            _ => None,
        }
    }

    /// Whether this opens a search probe (which reports nothing: no lag report, no
    /// replica agreement).
    pub fn is_probe(&self) -> bool {
        matches!(self, Opening::Chosen(c) if c.probe)
    }
}

/// LDT's starting point: the partition and both branches — from the checkpoint, stage 1
/// or the search's choice ([`Opening`]) — stored [`Parked`] (with `parked`; the store is
/// allocated before stage 1, so that a budget that cannot hold it fails first) or
/// [`Resident`]. Every rank of a data-parallel run checks it holds rank 0's partition.
pub fn open(
    ctx: &mut RunContext,
    opening: Opening<'_>,
    parked: bool,
    per_branch_buffers: bool,
) -> Result<(Box<dyn Branches>, Partition)> {
    let settings = OptimSettings::from(&ctx.cfg.optim);
    let placement = ctx.cfg.offload.optimizer;
    let store = if parked {
        Some(allocate_store(ctx, opening.checkpoint())?)
    } else {
        None
    };
    let n = ctx.net.params().len();
    let probe = opening.is_probe();
    let (branches, partition): (Box<dyn Branches>, Partition) = match opening {
        Opening::Resume(ck) => {
            let partition = super::stage1::resume_partition(ctx, ck)?;
            super::stage1::summarize(ctx, &partition);
            let mut b: Box<dyn Branches> = match store {
                Some(store) => {
                    let live = ctx.restore_net(ck, "live")?;
                    let mut b = Parked::new(live, store, settings, placement, per_branch_buffers)?;
                    b.restore(ck)?;
                    Box::new(b)
                }
                None => Box::new(Resident::resume(ck, ctx, settings, placement)?),
            };
            let live = b.live().unwrap_or(Phase::P);
            ctx.plan_memory(b.state(live))?;
            let masks = [partition.mask(Phase::P), partition.mask(Phase::A)];
            ctx.refine_activations(b.state(live), &masks)?;
            (b, partition)
        }
        opening => {
            let (start, partition) = match opening {
                Opening::Chosen(c) => (c.start, c.partition),
                _ => {
                    let mut start = ctx.start_state(ctx.stage1_resume.as_ref())?;
                    ctx.plan_memory(&start)?;
                    let partition = super::stage1::run(ctx, &mut start)?;
                    (start, partition)
                }
            };
            let masks = [partition.mask(Phase::P), partition.mask(Phase::A)];
            ctx.refine_activations(&start, &masks)?;
            let b: Box<dyn Branches> = match store {
                Some(store) => Box::new(Parked::new(
                    start,
                    store,
                    settings,
                    placement,
                    per_branch_buffers,
                )?),
                None => Box::new(Resident::new(start, settings, n, placement)?),
            };
            (b, partition)
        }
    };
    if probe {
        return Ok((branches, partition));
    }
    ctx.agree_partition(&partition)?;
    Ok((branches, partition))
}
