//! The one training loop. Every method is a [`Stepper`]: it runs one optimizer step and
//! says which networks it holds; the driver does the rest, the same way for all — batch
//! order and learning rates, the step's record and progress, snapshots, evaluation and
//! model selection, checkpoints and stop signals, and at the end the exported files, the
//! final evaluation and the training summary.

use super::run::Fingerprints;
use super::step::StepStats;
use super::RunContext;
use crate::checkpoint::Writer;
use crate::config::{Config, ProbeNetwork};
use crate::data::{HostBatch, Loader};
use crate::ldt::partition::Phase;
use crate::metrics::MemoryReport;
use crate::metrics::{Progress, Record, TrainRecord};
use crate::model::{io, Weights};
use crate::optim::schedule;
use anyhow::Result;
use candle_core::Tensor;
use std::time::Instant;

/// What [`Stepper::visit`] calls with a network's weights and buffers, in model order.
pub type Visitor<'a> = dyn FnMut(&Weights<'_>, &[Tensor]) -> Result<()> + 'a;

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

impl<'a, 'b> Feed<'a, 'b> {
    /// Batches from `loader`, rates from `rates`.
    pub fn new(loader: &'a mut Loader, rates: &'a Rates<'b>) -> Self {
        Feed { loader, rates }
    }

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
    /// The accuracy on the step's batch of the network that stepped: the one network
    /// (erm, lp-ft), LDT-S's live one (with `ldt_s.repeat_batch`, phase A's half-step).
    pub acc: Option<f64>,
    /// PM's loss (NaN when PM did not step).
    pub loss_pm: Option<f32>,
    /// AM's loss (NaN when AM did not step).
    pub loss_am: Option<f32>,
    /// The live branch after the step, where one network is live.
    pub phase: Option<Phase>,
    /// A line to print after the step's progress (an event, e.g. a re-partition).
    pub note: Option<String>,
}

/// One training method: its step, the networks it holds, its checkpoint state.
pub trait Stepper {
    /// Runs optimizer step `step` (1-based) with batches and rates from `feed`.
    fn step(&mut self, ctx: &mut RunContext, step: usize, feed: &mut Feed) -> Result<Outcome>;
    /// The networks the method holds, by name in files, logs and `summary.json`, the
    /// one that is kept first: `model`, or `composite`, `pm`, `am`.
    fn networks(&self) -> &'static [&'static str];
    /// Calls `f` with network `k` of [`Stepper::networks`], read where it lives: a parked
    /// branch is swapped into the live network's memory and back, never copied whole,
    /// so looking at any network costs no more device memory than training.
    fn visit(&mut self, k: usize, f: &mut Visitor) -> Result<()>;
    /// Calls `f` with the network a search probe is scored by (`stage1.probe_network`):
    /// LDT's leading composite or its composite. Methods without a partition have none.
    fn visit_probe(&mut self, network: ProbeNetwork, f: &mut Visitor) -> Result<()> {
        let _ = (network, f);
        anyhow::bail!("a method without a partition has no probe network")
    }
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
    /// Whether the task has an accuracy (classification).
    classify: bool,
    loss: f64,
    correct: usize,
    n: usize,
    steps: usize,
    examples: usize,
    since: Option<Instant>,
}

impl Meter {
    /// An empty meter; `classify`: the task has an accuracy to show.
    pub fn new(classify: bool) -> Self {
        Meter {
            classify,
            ..Meter::default()
        }
    }

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
        let loss = self.loss / self.steps.max(1) as f64;
        let msg = match self.classify {
            true => format!(
                "loss {loss:.4} acc {:.3} {eps:.0} ex/s",
                self.correct as f64 / self.n.max(1) as f64,
            ),
            false => format!("loss {loss:.4} {eps:.0} ex/s"),
        };
        *self = Meter::new(self.classify);
        (msg, eps)
    }
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

/// Evaluation at `step`, one network at a time: the headline network (logged and
/// printed), model selection over every network, and with `eval.branches` each branch.
fn evaluate(
    ctx: &mut RunContext,
    m: &mut dyn Stepper,
    step: usize,
    progress: &Progress,
) -> Result<()> {
    for (k, &name) in m.networks().iter().enumerate() {
        let report = k == 0 || ctx.cfg.eval.branches;
        if !report && !ctx.selecting() {
            continue;
        }
        m.visit(k, &mut |params, buffers| {
            if report {
                let r = ctx.evaluate(params, buffers)?;
                if k == 0 {
                    progress.println(&format!("eval @{step}: {name} {}", r.line()));
                }
                ctx.log_eval(step, name, &r)?;
            }
            ctx.consider(step, name, params, buffers)
        })?;
    }
    Ok(())
}

/// `step{N}.safetensors` of the one network, or `step{N}_pm` / `_am` of the branches.
fn snapshot(ctx: &RunContext, m: &mut dyn Stepper, step: usize) -> Result<()> {
    let names = m.networks();
    if let [_] = names {
        return m.visit(0, &mut |params, buffers| {
            let named = io::named(ctx.net.as_ref(), &params.all()?, buffers);
            ctx.export(&named, &format!("step{step}.safetensors"))
        });
    }
    // The branches; the composite is made from them.
    for (k, name) in names.iter().enumerate().skip(1) {
        m.visit(k, &mut |params, buffers| {
            let named = io::named(ctx.net.as_ref(), &params.all()?, buffers);
            ctx.export(&named, &format!("step{step}_{name}.safetensors"))
        })?;
    }
    Ok(())
}

/// After the last step, one network at a time: `NAME.safetensors`, the final
/// evaluation (into `summary.json`; super-resolution adds bicubic upsampling's as
/// `bicubic`), model selection and the fingerprint for the replica
/// check of a data-parallel run.
fn finish(ctx: &mut RunContext, m: &mut dyn Stepper) -> Result<()> {
    let steps = ctx.cfg.train.steps;
    let mut prints = Fingerprints::default();
    for (k, &name) in m.networks().iter().enumerate() {
        m.visit(k, &mut |params, buffers| {
            ctx.stages.enter("export");
            // The exported tensors go before the evaluation (for host masters they are
            // copies).
            let saved = params.all().and_then(|all| {
                let named = io::named(ctx.net.as_ref(), &all, buffers);
                ctx.export(&named, &format!("{name}.safetensors"))
            });
            ctx.stages.exit();
            saved?;
            ctx.stages.enter("eval");
            let r = ctx.evaluate(params, buffers)?;
            ctx.log_eval(steps, name, &r)?;
            ctx.consider(steps, name, params, buffers)?;
            ctx.fingerprint(name, params, buffers, &mut prints)?;
            ctx.summary.eval.insert(name.into(), r);
            ctx.stages.exit();
            Ok(())
        })?;
    }
    if ctx.bench.scale.is_some() {
        let r = ctx.bicubic()?;
        ctx.summary.eval.insert("bicubic".into(), r);
    }
    ctx.agree_replicas(&prints)
}

/// Runs steps `done + 1 ..= train.steps` of `m` and finishes the run: exports, final
/// evaluation, memory and timing in `summary.json`.
pub fn drive(ctx: &mut RunContext, m: &mut dyn Stepper, done: usize) -> Result<()> {
    let cfg = ctx.cfg.clone();
    let steps = cfg.train.steps;
    let names: Vec<String> = ctx.net.params().iter().map(|s| s.name.clone()).collect();
    let rates = Rates::new(&cfg, &names);
    let mut loader = ctx.train_loader(done, steps - done)?;
    let progress = Progress::new(cfg.train.method.name(), done, steps, cfg.train.log_every);
    let mut meter = Meter::new(ctx.classifies());
    let t0 = Instant::now();
    // When the first step of this process ended: the warm steps are timed from there.
    let mut warm_from = None;
    ctx.stages.enter("train");
    for step in done + 1..=steps {
        let mut feed = Feed::new(&mut loader, &rates);
        let out = m.step(ctx, step, &mut feed)?;
        ctx.stages.sample();
        for s in &out.meter {
            meter.add(s);
        }
        ctx.metrics
            .write(&record(step, rates.headline(step), &out))?;
        progress.update(step, || meter.take().0);
        if let Some(note) = &out.note {
            progress.println(note);
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
        warm_from.get_or_insert_with(Instant::now);
    }
    progress.finish();
    m.finish()?;
    ctx.stages.exit();
    let train_secs = t0.elapsed().as_secs_f64();
    let warm_secs = warm_from.map(|t| t.elapsed().as_secs_f64());
    finish(ctx, m)?;
    ctx.record_training(&m.memory(), train_secs, warm_secs, steps - done);
    Ok(())
}
