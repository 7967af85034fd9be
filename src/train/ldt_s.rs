//! LDT-S: one live network whose phases alternate over time — phase P trains the stable
//! set for `ldt_s.p_steps` steps, phase A the unstable set for `ldt_s.a_steps` — with the
//! other branch parked in the counterpart store, and each branch's DPU fold every
//! `ldt.ema_every` of its own steps. With `ldt_s.repeat_batch` phase A replays phase P's
//! batches ([`Cycle::Replay`]; 1/1 phases compute the dual branch bit for bit).

use super::branches::{self, half_step, Branches, Opening};
use super::driver::{Feed, Outcome, Stepper, Visitor};
use super::dual::{NETWORKS, VIEWS};
use super::repartition;
use super::RunContext;
use crate::checkpoint::Writer;
use crate::config::ProbeNetwork;
use crate::data::HostBatch;
use crate::ldt::dpu;
use crate::ldt::partition::{Partition, Phase};
use crate::metrics::MemoryReport;
use anyhow::{Context, Result};
use serde_json::json;
use std::collections::VecDeque;

/// What both LDT-S steppers hold: the branches, the partition, each branch's step count.
struct Core {
    b: Box<dyn Branches>,
    partition: Partition,
    n_p: usize,
    n_a: usize,
    /// A search probe: it never re-partitions (nothing of a probe is recorded).
    probe: bool,
}

impl Core {
    fn start(
        ctx: &mut RunContext,
        opening: Opening<'_>,
        phases: Option<(usize, usize)>,
    ) -> Result<Core> {
        let resume = opening.checkpoint();
        let probe = opening.is_probe();
        let (b, partition) = branches::open(ctx, opening, true, false)?;
        if !probe {
            ctx.report_lag(&partition, phases)?;
        }
        let (mut n_p, mut n_a) = (0, 0);
        if let Some(ck) = resume {
            let count = |key: &str| -> Result<usize> {
                let v = ck.field(key)?;
                v.as_u64().map(|n| n as usize).with_context(|| {
                    format!(
                        "checkpoint {}: `{key}` = {v} is not a count",
                        ck.dir.display()
                    )
                })
            };
            n_p = count("n_p")?;
            n_a = count("n_a")?;
        }
        Ok(Core {
            b,
            partition,
            n_p,
            n_a,
            probe,
        })
    }

    fn save(&mut self, ctx: &RunContext, w: &mut Writer) -> Result<()> {
        self.b.save(w, ctx.net.as_ref())?;
        w.meta("partition", serde_json::to_value(&self.partition)?);
        w.meta("n_p", json!(self.n_p));
        w.meta("n_a", json!(self.n_a));
        Ok(())
    }
}

/// How phases follow each other.
enum Cycle {
    /// Phases P (`p_steps`) and A (`a_steps`) alternating over time, one batch a step.
    Alternate(usize, usize),
    /// Phase P over `p_steps` batches, then phase A replays them; a step is one replayed
    /// batch (both branches have then trained on it). Holds the batches not yet replayed,
    /// with PM's loss on each.
    Replay(usize, VecDeque<(HostBatch, f32)>),
}

/// The LDT-S step.
pub struct LdtS {
    core: Core,
    cycle: Cycle,
}

impl LdtS {
    /// The counterpart store and the branches, opened from `opening` (stage 1, the
    /// search's choice or a checkpoint).
    pub fn start(ctx: &mut RunContext, opening: Opening<'_>) -> Result<Self> {
        let (p, a) = (ctx.cfg.ldt_s.p_steps, ctx.cfg.ldt_s.a_steps);
        // Config validation made p_steps equal a_steps for repeat_batch.
        let (cycle, phases) = if ctx.cfg.ldt_s.repeat_batch {
            (Cycle::Replay(p, VecDeque::new()), None)
        } else {
            (Cycle::Alternate(p, a), Some((p, a)))
        };
        Ok(LdtS {
            core: Core::start(ctx, opening, phases)?,
            cycle,
        })
    }

    /// Phases P and A alternating over time, one batch per step.
    fn alternate(
        c: &mut Core,
        (p_len, a_len): (usize, usize),
        ctx: &mut RunContext,
        step: usize,
        feed: &mut Feed,
    ) -> Result<Outcome> {
        // The position inside the cycle follows from the step, so a resumed run
        // continues mid-phase.
        let pos = (step - 1) % (p_len + a_len);
        let (phase, last) = if pos < p_len {
            (Phase::P, pos + 1 == p_len)
        } else {
            (Phase::A, pos + 1 == p_len + a_len)
        };
        c.b.switch_to(phase)?;
        if last || step == ctx.cfg.train.steps {
            c.b.stage_next()?;
        }
        let hb = feed.next_batch()?;
        let batch = ctx.batch(&hb)?;
        let lrs = feed.rates.at(step);
        let s = half_step(ctx, c.b.as_mut(), &c.partition, phase, step, &batch, &lrs)?;
        let n = match phase {
            Phase::P => {
                c.n_p += 1;
                c.n_p
            }
            Phase::A => {
                c.n_a += 1;
                c.n_a
            }
        };
        let ema = ctx.cfg.ldt.ema_every;
        if n.is_multiple_of(ema) {
            let factor = dpu::warmup_factor(&ctx.cfg.ldt, n / ema);
            c.b.fold(&c.partition, phase, factor)?;
        }
        let (loss_pm, loss_am) = match phase {
            Phase::P => (s.loss, f32::NAN),
            Phase::A => (f32::NAN, s.loss),
        };
        Ok(Outcome {
            meter: vec![s],
            acc: ctx.classifies().then(|| s.acc()),
            loss_pm: Some(loss_pm),
            loss_am: Some(loss_am),
            phase: Some(phase),
            ..Outcome::default()
        })
    }

    /// Phase P over the cycle's batches, then phase A replays them one per step.
    fn replay(
        c: &mut Core,
        p_len: usize,
        pending: &mut VecDeque<(HostBatch, f32)>,
        ctx: &mut RunContext,
        step: usize,
        feed: &mut Feed,
    ) -> Result<Outcome> {
        let mut meter = Vec::new();
        if pending.is_empty() {
            // Phase P over the cycle's batches (fewer at the end of training).
            let k = p_len.min(ctx.cfg.train.steps - step + 1);
            c.b.switch_to(Phase::P)?;
            for j in 0..k {
                let hb = feed.next_batch()?;
                let batch = ctx.batch(&hb)?;
                let lrs = feed.rates.at(step + j);
                if j + 1 == k {
                    c.b.stage_next()?;
                }
                let s = half_step(
                    ctx,
                    c.b.as_mut(),
                    &c.partition,
                    Phase::P,
                    step + j,
                    &batch,
                    &lrs,
                )?;
                meter.push(s);
                pending.push_back((hb, s.loss));
            }
            c.b.switch_to(Phase::A)?;
        }
        let (hb, loss_pm) = pending.pop_front().expect("phase P left a batch");
        let batch = ctx.batch(&hb)?;
        let lrs = feed.rates.at(step);
        if pending.is_empty() {
            c.b.stage_next()?;
        }
        let sa = half_step(
            ctx,
            c.b.as_mut(),
            &c.partition,
            Phase::A,
            step,
            &batch,
            &lrs,
        )?;
        c.n_p += 1;
        c.n_a += 1;
        // Both folds of a step after its A half-step, as the dual branch does.
        let ema = ctx.cfg.ldt.ema_every;
        if c.n_p.is_multiple_of(ema) {
            let factor = dpu::warmup_factor(&ctx.cfg.ldt, c.n_p / ema);
            c.b.fold(&c.partition, Phase::P, factor)?;
            c.b.fold(&c.partition, Phase::A, factor)?;
        }
        Ok(Outcome {
            meter,
            acc: ctx.classifies().then(|| sa.acc()),
            loss_pm: Some(loss_pm),
            loss_am: Some(sa.loss),
            phase: c.b.live(),
            ..Outcome::default()
        })
    }
}

impl Stepper for LdtS {
    fn step(&mut self, ctx: &mut RunContext, step: usize, feed: &mut Feed) -> Result<Outcome> {
        let mut out = match &mut self.cycle {
            Cycle::Alternate(p, a) => Self::alternate(&mut self.core, (*p, *a), ctx, step, feed),
            Cycle::Replay(p, pending) => Self::replay(&mut self.core, *p, pending, ctx, step, feed),
        }?;
        // Config validation put re-partitions at the end of a cycle.
        let c = &mut self.core;
        if !c.probe {
            out.note = repartition::after_step(ctx, c.b.as_mut(), &mut c.partition, step)?;
        }
        Ok(out)
    }

    fn networks(&self) -> &'static [&'static str] {
        &NETWORKS
    }

    fn visit(&mut self, k: usize, f: &mut Visitor) -> Result<()> {
        self.core.b.visit(VIEWS[k], &self.core.partition, f)
    }

    fn visit_probe(&mut self, network: ProbeNetwork, f: &mut Visitor) -> Result<()> {
        let v = network.into();
        self.core.b.visit(v, &self.core.partition, f)
    }

    fn can_checkpoint(&self) -> bool {
        match &self.cycle {
            Cycle::Alternate(..) => true,
            Cycle::Replay(_, pending) => pending.is_empty(),
        }
    }

    fn save(&mut self, ctx: &RunContext, w: &mut Writer) -> Result<()> {
        self.core.save(ctx, w)
    }

    fn finish(&mut self) -> Result<()> {
        self.core.b.sync()
    }

    fn memory(&self) -> MemoryReport {
        self.core.b.memory(&self.core.partition)
    }
}
