//! The dual branch (`ldt`, `deft`): every step PM trains the stable set with the unstable
//! set frozen and AM trains the unstable set with the stable set frozen, on the same
//! batch; every `ldt.ema_every` steps the DPU folds `~A^S <- P^S` and `~P^U <- A^U`
//! (and every `stage1.repartition_every` steps the sets are ranked again). One
//! algorithm over either storage (`ldt.placement`): both networks resident, or one live
//! network swapping with the counterpart store (`swap`), bit for bit the same.

use super::branches::{self, half_step, Branches, Opening, View};
use super::driver::{Feed, Outcome, Stepper, Visitor};
use super::repartition;
use super::RunContext;
use crate::checkpoint::Writer;
use crate::config::{Placement, ProbeNetwork};
use crate::ldt::dpu;
use crate::ldt::partition::{Partition, Phase};
use crate::metrics::MemoryReport;
use anyhow::Result;

/// The dual-branch step over a branch storage.
pub struct Dual {
    b: Box<dyn Branches>,
    partition: Partition,
    /// A search probe: it never re-partitions (nothing of a probe is recorded).
    probe: bool,
}

impl Dual {
    /// The branches in `ldt.placement`, opened from `opening` (stage 1, the search's
    /// choice or a checkpoint).
    pub fn start(ctx: &mut RunContext, opening: Opening<'_>) -> Result<Self> {
        let parked = ctx.cfg.ldt.placement == Placement::Swap;
        let probe = opening.is_probe();
        let (b, partition) = branches::open(ctx, opening, parked, true)?;
        if !probe {
            ctx.report_lag(&partition, None)?;
        }
        Ok(Dual {
            b,
            partition,
            probe,
        })
    }
}

impl Stepper for Dual {
    fn step(&mut self, ctx: &mut RunContext, step: usize, feed: &mut Feed) -> Result<Outcome> {
        let hb = feed.next_batch()?;
        let batch = ctx.batch(&hb)?;
        let lrs = feed.rates.at(step);
        // The live branch steps first, so one network swaps once per step.
        let order = match self.b.live() {
            Some(Phase::A) => [Phase::A, Phase::P],
            _ => [Phase::P, Phase::A],
        };
        let mut loss = [0f32; 2];
        let mut meter = Vec::new();
        for (k, phase) in order.into_iter().enumerate() {
            self.b.switch_to(phase)?;
            // The incoming optimizer state loads one half-step ahead of its swap: the
            // step's second branch, and the next step's (after an A half-step).
            if k == 0 || phase == Phase::A {
                self.b.stage_next()?;
            }
            let s = half_step(
                ctx,
                self.b.as_mut(),
                &self.partition,
                phase,
                step,
                &batch,
                &lrs,
            )?;
            loss[phase as usize] = s.loss;
            if phase == Phase::P {
                meter.push(s);
            }
        }
        let ema = ctx.cfg.ldt.ema_every;
        if step.is_multiple_of(ema) {
            let factor = dpu::warmup_factor(&ctx.cfg.ldt, step / ema);
            self.b.fold(&self.partition, Phase::P, factor)?;
            self.b.fold(&self.partition, Phase::A, factor)?;
        }
        let note = match self.probe {
            true => None,
            false => repartition::after_step(ctx, self.b.as_mut(), &mut self.partition, step)?,
        };
        Ok(Outcome {
            meter,
            loss_pm: Some(loss[0]),
            loss_am: Some(loss[1]),
            phase: self.b.live(),
            note,
            ..Outcome::default()
        })
    }

    fn networks(&self) -> &'static [&'static str] {
        &NETWORKS
    }

    fn visit(&mut self, k: usize, f: &mut Visitor) -> Result<()> {
        self.b.visit(VIEWS[k], &self.partition, f)
    }

    fn visit_probe(&mut self, network: ProbeNetwork, f: &mut Visitor) -> Result<()> {
        let v = network.into();
        self.b.visit(v, &self.partition, f)
    }

    fn save(&mut self, ctx: &RunContext, w: &mut Writer) -> Result<()> {
        self.b.save(w, ctx.net.as_ref())?;
        w.meta("partition", serde_json::to_value(&self.partition)?);
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        self.b.sync()
    }

    fn memory(&self) -> MemoryReport {
        self.b.memory(&self.partition)
    }
}

/// The networks of LDT, the composite first.
pub const NETWORKS: [&str; 3] = ["composite", "pm", "am"];

/// The view of each of [`NETWORKS`].
pub const VIEWS: [View; 3] = [
    View::Composite,
    View::Branch(Phase::P),
    View::Branch(Phase::A),
];
