//! The one training loop. Every method is a [`Stepper`]: it runs one optimizer step and
//! says which networks it holds; the driver does the rest, the same way for all — batch
//! order and learning rates, the step's record and progress, snapshots, evaluation and
//! model selection, checkpoints and stop signals, and at the end the exported files, the
//! final evaluation and the training summary.

use super::step::StepStats;
use super::RunContext;
use crate::checkpoint::Writer;
use crate::config::Config;
use crate::data::{HostBatch, Loader};
use crate::ldt::partition::Phase;
use crate::metrics::MemoryReport;
use crate::metrics::{Progress, Record, TrainRecord};
use crate::model::io;
use crate::optim::schedule;
use anyhow::Result;
use candle_core::Tensor;
use std::time::Instant;

/// A network a method holds, by name (`model`; `pm`, `am`; `composite`), read where it
/// lives.
pub struct Net {
    /// Name in files, logs and `summary.json`.
    pub name: &'static str,
    /// Parameters in model order.
    pub params: Vec<Tensor>,
    /// Buffers in model order.
    pub buffers: Vec<Tensor>,
}

/// Per-layer learning rates at any step: `optim.lr_groups` and the schedule.
pub struct Rates<'a> {
    cfg: &'a Config,
    base: Vec<f64>,
}

impl<'a> Rates<'a> {
    /// The rates of `cfg` for a network with parameters `names`.
    pub fn new(cfg: &'a Config, names: &[String]) -> Self {
        Rates {
            base: schedule::layer_lrs(&cfg.optim, names),
            cfg,
        }
    }

    /// Every layer's rate at optimizer step `step` (1-based).
    pub fn at(&self, step: usize) -> Vec<f64> {
        self.base
            .iter()
            .map(|&b| schedule::lr_at(&self.cfg.optim, b, step, self.cfg.train.steps))
            .collect()
    }

    /// The scheduled base rate `optim.lr` at `step` (the record's `lr`).
    pub fn headline(&self, step: usize) -> f64 {
        schedule::lr_at(
            &self.cfg.optim,
            self.cfg.optim.lr,
            step,
            self.cfg.train.steps,
        )
    }
}

/// Where a step gets its batches and rates. A method usually takes one batch per step;
/// LDT-S with `repeat_batch` takes a whole phase's batches at the first step of a cycle.
pub struct Feed<'a, 'b> {
    loader: &'a mut Loader,
    /// The run's learning rates.
    pub rates: &'a Rates<'b>,
}

impl Feed<'_, '_> {
    /// The next training batch, in the run's order.
    pub fn next_batch(&mut self) -> Result<HostBatch> {
        self.loader.next_batch()
    }
}

/// What one step reports.
#[derive(Default)]
pub struct Outcome {
    /// Stats added to the progress meter (one per trained half-step shown).
    pub meter: Vec<StepStats>,
    /// The loss of the one network (erm, lp-ft).
    pub loss: Option<f32>,
    /// Its accuracy.
    pub acc: Option<f64>,
    /// PM's loss (NaN when PM did not step).
    pub loss_pm: Option<f32>,
    /// AM's loss (NaN when AM did not step).
    pub loss_am: Option<f32>,
    /// The live branch after the step, where one network is live.
    pub phase: Option<Phase>,
}

/// One training method: its step, the networks it holds, its checkpoint state.
pub trait Stepper {
    /// Runs optimizer step `step` (1-based) with batches and rates from `feed`.
    fn step(&mut self, ctx: &mut RunContext, step: usize, feed: &mut Feed) -> Result<Outcome>;
    /// The networks the method trains, read where they live: `model`, or `pm` and `am`.
    fn branches(&mut self) -> Result<Vec<Net>>;
    /// The network that is kept, built from [`Stepper::branches`]: the composite for
    /// LDT; `None` when the one branch is the result.
    fn composite(&self, branches: &[Net]) -> Option<Net>;
    /// Whether a checkpoint now holds everything needed to continue (LDT-S with
    /// `repeat_batch`: not while replayed batches are pending).
    fn can_checkpoint(&self) -> bool {
        true
    }
    /// Adds everything needed to continue to checkpoint `w`.
    fn save(&mut self, ctx: &RunContext, w: &mut Writer) -> Result<()>;
    /// Waits for work in flight after the last step.
    fn finish(&mut self) -> Result<()>;
    /// The memory report of the method and placement.
    fn memory(&self) -> MemoryReport;
}

/// Running loss/accuracy and throughput for progress messages.
#[derive(Default)]
pub struct Meter {
    loss: f64,
    correct: usize,
    n: usize,
    steps: usize,
    examples: usize,
    since: Option<Instant>,
}

impl Meter {
    /// Adds one step.
    pub fn add(&mut self, s: &StepStats) {
        self.since.get_or_insert_with(Instant::now);
        self.loss += s.loss as f64;
        self.correct += s.correct;
        self.n += s.n;
        self.steps += 1;
        self.examples += s.n;
    }

    /// `loss ... acc ... ex/s`, then resets the window.
    pub fn take(&mut self) -> (String, f64) {
        let secs = self
            .since
            .map_or(0.0, |t| t.elapsed().as_secs_f64())
            .max(1e-9);
        let eps = self.examples as f64 / secs;
        let msg = format!(
            "loss {:.4} acc {:.3} {:.0} ex/s",
            self.loss / self.steps.max(1) as f64,
            self.correct as f64 / self.n.max(1) as f64,
            eps
        );
        *self = Meter::default();
        (msg, eps)
    }
}

/// The networks to evaluate, headline first: the composite and then the branches, or
/// the one branch.
fn candidates(m: &mut dyn Stepper) -> Result<Vec<Net>> {
    let branches = m.branches()?;
    Ok(match m.composite(&branches) {
        Some(c) => std::iter::once(c).chain(branches).collect(),
        None => branches,
    })
}

/// The step's `train` record.
fn record(step: usize, lr: f64, o: &Outcome) -> Record {
    Record::Train(TrainRecord {
        stage: "train".into(),
        step,
        loss: o.loss,
        acc: o.acc,
        lr: Some(lr),
        loss_pm: o.loss_pm,
        loss_am: o.loss_am,
        phase: o.phase.map(|p| format!("{p:?}")),
    })
}

/// Evaluation at `step`: the headline network (logged and printed), model selection
/// over every candidate, and with `eval.branches` each branch.
fn evaluate(
    ctx: &mut RunContext,
    m: &mut dyn Stepper,
    step: usize,
    progress: &Progress,
) -> Result<()> {
    let nets = candidates(m)?;
    let head = &nets[0];
    let r = ctx.evaluate(&head.params, &head.buffers)?;
    progress.println(&format!("eval @{step}: {} {}", head.name, r.line()));
    ctx.log_eval(step, head.name, &r)?;
    ctx.select(step, &as_candidates(&nets))?;
    if ctx.cfg.eval.branches {
        for n in &nets[1..] {
            let r = ctx.evaluate(&n.params, &n.buffers)?;
            ctx.log_eval(step, n.name, &r)?;
        }
    }
    Ok(())
}

fn as_candidates(nets: &[Net]) -> Vec<(&str, Vec<Tensor>, Vec<Tensor>)> {
    nets.iter()
        .map(|n| (n.name, n.params.clone(), n.buffers.clone()))
        .collect()
}

/// `step{N}.safetensors` of the one network, or `step{N}_pm` / `_am` of the branches.
fn snapshot(ctx: &RunContext, m: &mut dyn Stepper, step: usize) -> Result<()> {
    let branches = m.branches()?;
    let one = branches.len() == 1;
    for b in &branches {
        let file = if one {
            format!("step{step}.safetensors")
        } else {
            format!("step{step}_{}.safetensors", b.name)
        };
        let named = io::named(ctx.net.as_ref(), &b.params, &b.buffers);
        io::save_tensors(&named, &ctx.dir.join(file))?;
    }
    Ok(())
}

/// After the last step: every network as `NAME.safetensors`, the final evaluation of
/// each (the headline into `summary.json` first), the replica check of a data-parallel
/// run and the last model selection.
fn finish(ctx: &mut RunContext, m: &mut dyn Stepper) -> Result<()> {
    let steps = ctx.cfg.train.steps;
    ctx.stages.enter("export");
    let nets = candidates(m)?;
    // Branches first, the composite last (as the files were always written).
    for n in nets.iter().skip(1).chain(nets.iter().take(1)) {
        let named = io::named(ctx.net.as_ref(), &n.params, &n.buffers);
        io::save_tensors(&named, &ctx.dir.join(format!("{}.safetensors", n.name)))?;
    }
    ctx.stages.exit();
    ctx.stages.enter("eval");
    let head = &nets[0];
    let r = ctx.evaluate(&head.params, &head.buffers)?;
    ctx.log_eval(steps, head.name, &r)?;
    let all = as_candidates(&nets);
    ctx.agree_replicas(&all)?;
    ctx.select(steps, &all)?;
    ctx.summary.eval.insert(head.name.into(), r);
    for n in &nets[1..] {
        let r = ctx.evaluate(&n.params, &n.buffers)?;
        ctx.log_eval(steps, n.name, &r)?;
        ctx.summary.eval.insert(n.name.into(), r);
    }
    ctx.stages.exit();
    Ok(())
}

/// Runs steps `done + 1 ..= train.steps` of `m` and finishes the run: exports, final
/// evaluation, memory and timing in `summary.json`.
pub fn drive(ctx: &mut RunContext, m: &mut dyn Stepper, done: usize) -> Result<()> {
    let cfg = ctx.cfg.clone();
    let steps = cfg.train.steps;
    let names: Vec<String> = ctx.net.params().iter().map(|s| s.name.clone()).collect();
    let rates = Rates::new(&cfg, &names);
    let mut loader = ctx.train_loader(done, steps - done)?;
    let progress = Progress::new(cfg.train.method.name(), steps, cfg.train.log_every);
    let mut meter = Meter::default();
    let t0 = Instant::now();
    ctx.stages.enter("train");
    for step in done + 1..=steps {
        let mut feed = Feed {
            loader: &mut loader,
            rates: &rates,
        };
        let out = m.step(ctx, step, &mut feed)?;
        for s in &out.meter {
            meter.add(s);
        }
        ctx.metrics
            .write(&record(step, rates.headline(step), &out))?;
        if step.is_multiple_of(cfg.train.log_every) || step == steps {
            progress.update(step, &meter.take().0);
        }
        if cfg.snapshots.at_steps.contains(&step) {
            ctx.stages.enter("export");
            snapshot(ctx, m, step)?;
            ctx.stages.exit();
        }
        if cfg.eval.every > 0 && step.is_multiple_of(cfg.eval.every) && step < steps {
            ctx.stages.enter("eval");
            evaluate(ctx, m, step, &progress)?;
            ctx.stages.exit();
        }
        if m.can_checkpoint() && ctx.checkpoint_due(step)? {
            ctx.stages.enter("checkpoint");
            let mut w = Writer::default();
            m.save(ctx, &mut w)?;
            let saved = ctx.checkpoint(step, w);
            ctx.stages.exit();
            saved?;
        }
    }
    progress.finish();
    m.finish()?;
    ctx.stages.exit();
    let train_secs = t0.elapsed().as_secs_f64();
    finish(ctx, m)?;
    ctx.record_training(&m.memory(), train_secs, steps - done);
    Ok(())
}
