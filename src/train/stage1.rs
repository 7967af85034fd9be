//! Stage 1: warm-up on D1, the statistics pass on D2 (forward and backward with every
//! layer trainable, no parameter or buffer change), and the partition — or, for a resumed
//! run, the partition its checkpoint was trained with.
//!
//! Stage 1 is checkpointed like training (`checkpoint.every` counts its warm-up steps and
//! statistics batches together; a signal checkpoints and stops): a `stage1-N` checkpoint
//! holds the network (`start/`), and during the warm-up its optimizer (`warmup_opt/`),
//! during the statistics pass the accumulators (`stats/`). A run resumed from one replays
//! the data order from the seed and ends bit-identical to an uninterrupted run.

use super::driver::Meter;
use super::run::streams;
use super::step::{gradients, GradPlan};
use super::RunContext;
use crate::checkpoint::{Checkpoint, Writer};
use crate::config::{Criterion, CriterionChoice, LdtConfig, Method, RatioChoice, WarmupLayers};
use crate::data::loader::{read_batches, read_ragged, BatchOrder};
use crate::data::Loader;
use crate::ldt::partition::{Partition, Ranking};
use crate::ldt::stats::{LayerAccumulator, LayerStats};
use crate::metrics::{PartitionSummary, Progress, Record, TrainRecord};
use crate::model::{Mode, NetState, Network};
use crate::optim::{OptimSettings, Optimizer};
use crate::rng::Rng;
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use rayon::prelude::*;
use std::ops::RangeInclusive;

/// D1 (warm-up) and D2 (statistics): a seeded split of the source training examples.
fn split(ctx: &RunContext) -> (Vec<usize>, Vec<usize>) {
    let t = &ctx.train_indices;
    let perm = Rng::new(ctx.cfg.seed, streams::SPLIT).permutation(t.len());
    let n1 = ((t.len() as f64) * ctx.cfg.stage1.split_fraction).round() as usize;
    let (a, b) = perm.split_at(n1.min(perm.len()));
    (
        a.iter().map(|&i| t[i]).collect(),
        b.iter().map(|&i| t[i]).collect(),
    )
}

/// Where a stage-1 checkpoint stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Point {
    /// `k` warm-up steps done.
    Warmup(usize),
    /// The warm-up done and `b` statistics batches.
    Stats(usize),
}

impl Point {
    /// Of checkpoint `ck`.
    fn of(ck: &Checkpoint) -> Result<Point> {
        let done = ck.field("done")?.as_u64().unwrap_or(0) as usize;
        match ck.field("phase")?.as_str() {
            Some("warmup") => Ok(Point::Warmup(done)),
            Some("stats") => Ok(Point::Stats(done)),
            other => bail!(
                "checkpoint {}: unknown stage-1 phase {other:?}",
                ck.dir.display()
            ),
        }
    }

    /// Writes the position into a checkpoint.
    fn write(self, w: &mut Writer) {
        let (phase, done) = match self {
            Point::Warmup(k) => ("warmup", k),
            Point::Stats(b) => ("stats", b),
        };
        w.meta("phase", serde_json::json!(phase));
        w.meta("done", serde_json::json!(done));
    }
}

/// Steps of a stage-1 phase already done by checkpoint `ck` (`None`: none); an error
/// naming `key` when the config asks for fewer than were done.
fn done_of(ck: Option<&Checkpoint>, stats: bool, total: usize, key: &str) -> Result<usize> {
    let Some(ck) = ck else { return Ok(0) };
    let done = match (Point::of(ck)?, stats) {
        (Point::Warmup(k), false) => k,
        (Point::Warmup(_), true) => 0,
        (Point::Stats(_), false) => total,
        (Point::Stats(b), true) => b,
    };
    if done > total {
        bail!(
            "checkpoint {} is past {done} steps of stage 1's {}, the config asks for {total} (`{key}`); resume with the config it was written with",
            ck.dir.display(),
            if stats { "statistics pass" } else { "warm-up" }
        );
    }
    Ok(done)
}

/// For a run configured without a warm-up (`key` = 0): an error when the stage-1
/// checkpoint `resume` was written during one (its network is a warm-up's middle).
pub fn no_warmup(resume: Option<&Checkpoint>, key: &str) -> Result<()> {
    done_of(resume, false, 0, key).map(|_| ())
}

/// A warm-up: which layers, how long, with which optimizer and constant rate.
pub struct Fit<'a> {
    /// Layers trained.
    pub mask: &'a [bool],
    /// Optimizer steps.
    pub steps: usize,
    /// Optimizer hyper-parameters.
    pub settings: OptimSettings,
    /// Constant learning rate.
    pub lr: f64,
    /// Stage name in logs.
    pub stage: &'a str,
    /// The config key of `steps` (named when a checkpoint does not fit it).
    pub key: &'a str,
}

/// Trains the layers of `fit.mask` with a fresh optimizer at a constant rate on the
/// batches of `order`: the warm-ups (stage 1's on D1; erm's head-only
/// `train.head_warmup_steps`). Continues from the stage-1 checkpoint `resume` (`state`
/// is already its network) and writes stage-1 checkpoints when due.
pub fn fit_layers(
    ctx: &mut RunContext,
    state: &mut NetState,
    order: BatchOrder,
    fit: Fit<'_>,
    resume: Option<&Checkpoint>,
) -> Result<()> {
    let Fit {
        mask,
        steps,
        settings,
        lr,
        stage,
        key,
    } = fit;
    let n = ctx.net.params().len();
    let done = done_of(resume, false, steps, key)?;
    if done == steps {
        return Ok(());
    }
    let mut opt = match resume {
        Some(ck) if done > 0 => ck.optimizer("warmup_opt", settings, n)?,
        _ => Optimizer::new(settings, n),
    }
    .placed(ctx.cfg.offload.optimizer)?;
    let mut loader = ctx.loader(order, stage, done, steps - done)?;
    let lrs = vec![lr; n];
    let progress = Progress::new(stage, done, steps, ctx.cfg.train.log_every);
    let mut meter = Meter::new(ctx.classifies());
    for step in done + 1..=steps {
        let hb = loader.next_batch()?;
        let batch = ctx.batch(&hb)?;
        let at = super::update::At {
            step,
            branch: stage,
        };
        let (stats, _) = super::update::step(ctx, state, &mut opt, mask, &batch, &lrs, at)?;
        meter.add(&stats);
        ctx.metrics.write(&Record::Train(TrainRecord {
            stage: stage.to_string(),
            step,
            loss: Some(stats.loss),
            acc: ctx.classifies().then(|| stats.acc()),
            lr: Some(lr),
            ..TrainRecord::default()
        }))?;
        progress.update(step, || meter.take().0);
        if ctx.stage1_checkpoint_due(step)? {
            let mut w = Writer::default();
            w.net("start", ctx.net.as_ref(), state)?;
            w.optimizer("warmup_opt", &opt, ctx.net.as_ref())?;
            Point::Warmup(step).write(&mut w);
            ctx.checkpoint_stage1(step, w)?;
        }
    }
    progress.finish();
    Ok(())
}

/// Warm-up: trains the head (or all layers) on D1 for `stage1.warmup_steps`, from the
/// stage-1 checkpoint `resume` if any.
pub fn warmup(
    ctx: &mut RunContext,
    state: &mut NetState,
    resume: Option<&Checkpoint>,
) -> Result<()> {
    let c = ctx.cfg.stage1.clone();
    if c.warmup_steps == 0 {
        return no_warmup(resume, "stage1.warmup_steps");
    }
    let order = match &ctx.cfg.data.schedule {
        Some(p) => BatchOrder::fixed(read_batches(p, "warmup_batches")?),
        None => BatchOrder::shuffle(
            split(ctx).0,
            ctx.cfg.train.batch_size,
            Rng::new(ctx.cfg.seed, streams::WARMUP),
        ),
    };
    let n = ctx.net.params().len();
    let mask: Vec<bool> = match c.warmup_layers {
        WarmupLayers::Head => (0..n).map(|i| ctx.net.is_head(i)).collect(),
        WarmupLayers::All => vec![true; n],
    };
    let settings = OptimSettings {
        betas: c.warmup_betas,
        ..OptimSettings::from(&ctx.cfg.optim)
    };
    let fit = Fit {
        mask: &mask,
        steps: c.warmup_steps,
        settings,
        lr: c.warmup_lr,
        stage: "warmup",
        key: "stage1.warmup_steps",
    };
    fit_layers(ctx, state, order, fit, resume)
}

/// The statistics pass: per-layer streaming statistics of the gradients on D2, from the
/// stage-1 checkpoint `resume` if any; `cross`: a criterion needs `var_cross`.
pub fn statistics(
    ctx: &mut RunContext,
    state: &mut NetState,
    resume: Option<&Checkpoint>,
    cross: bool,
) -> Result<Vec<LayerStats>> {
    let c = ctx.cfg.stage1.clone();
    let order = match &ctx.cfg.data.schedule {
        Some(p) => {
            let b = read_ragged(p, "var_indices", "var_batch_sizes")?;
            if b.len() < c.stat_batches {
                bail!("schedule file {} holds {} statistics batches; `stage1.stat_batches` asks for {}", p.display(), b.len(), c.stat_batches);
            }
            BatchOrder::fixed(b)
        }
        None => BatchOrder::shuffle(
            split(ctx).1,
            c.stat_batch_size,
            Rng::new(ctx.cfg.seed, streams::STATS),
        ),
    };
    let done = done_of(resume, true, c.stat_batches, "stage1.stat_batches")?;
    let n = ctx.net.params().len();
    let cross = c.cross_variance || cross;
    let mut acc: Vec<LayerAccumulator> = match resume {
        Some(ck) if done > 0 => (0..n)
            .map(|i| {
                let t = |part: &str| -> Result<Vec<f64>> {
                    Ok(ck.tensor(&format!("stats/{i}/{part}"))?.to_vec1::<f64>()?)
                };
                LayerAccumulator::restore(
                    ctx.net.params()[i].numel(),
                    cross,
                    &t("scalars")?,
                    t("elem_mean")?,
                    t("elem_m2")?,
                )
                .with_context(|| {
                    format!("checkpoint {}: statistics of layer {i}", ck.dir.display())
                })
            })
            .collect::<Result<_>>()?,
        _ => accumulators(ctx, cross),
    };
    let mut loader = ctx.loader(order, "stats", done, c.stat_batches - done)?;
    let progress = Progress::new("stats", done, c.stat_batches, ctx.cfg.train.log_every);
    let batches = (&mut loader, done + 1..=c.stat_batches);
    accumulate(ctx, state, &mut acc, batches, |ctx, state, acc, b, loss| {
        progress.update(b, || format!("loss {loss:.4}"));
        ctx.metrics.write(&Record::Stats { step: b, loss })?;
        if ctx.stage1_checkpoint_due(c.warmup_steps + b)? {
            let mut w = Writer::default();
            w.net("start", ctx.net.as_ref(), state)?;
            for (i, a) in acc.iter().enumerate() {
                let (scalars, mean, m2) = a.parts();
                let dev = &candle_core::Device::Cpu;
                w.tensor(
                    format!("stats/{i}/scalars"),
                    &Tensor::new(&scalars[..], dev)?,
                );
                w.tensor(format!("stats/{i}/elem_mean"), &Tensor::new(mean, dev)?);
                w.tensor(format!("stats/{i}/elem_m2"), &Tensor::new(m2, dev)?);
            }
            Point::Stats(b).write(&mut w);
            ctx.checkpoint_stage1(c.warmup_steps + b, w)?;
        }
        Ok(())
    })?;
    progress.finish();
    Ok(acc.iter().map(|a| a.finish()).collect())
}

/// Empty per-layer accumulators of the statistics pass (`cross`: with the per-element
/// moments of `var_cross`).
fn accumulators(ctx: &RunContext, cross: bool) -> Vec<LayerAccumulator> {
    ctx.net
        .params()
        .iter()
        .map(|s| LayerAccumulator::new(s.numel(), cross))
        .collect()
}

/// The statistics pass's loop: adds batches `range` of `loader` to `acc` — forward and
/// backward of `state` with every layer trainable, in [`Mode::Stats`] (no parameter or
/// buffer change) — and calls `after(ctx, state, acc, b, loss)` after batch `b`.
fn accumulate(
    ctx: &mut RunContext,
    state: &mut NetState,
    acc: &mut [LayerAccumulator],
    (loader, range): (&mut Loader, RangeInclusive<usize>),
    mut after: impl FnMut(&mut RunContext, &NetState, &[LayerAccumulator], usize, f32) -> Result<()>,
) -> Result<()> {
    let all = vec![true; acc.len()];
    for b in range {
        let hb = loader.next_batch()?;
        let batch = ctx.batch(&hb)?;
        let (st, grads) = gradients(
            ctx.net.as_ref(),
            state,
            &all,
            &batch,
            Mode::Stats,
            GradPlan::of(&ctx.cfg),
        )?;
        // Device gradients are read to the host; released ones are read where they are.
        let read = grads
            .iter()
            .map(|g| match g.as_ref().expect("all layers trainable") {
                crate::optim::Grad::Device(t) => crate::optim::host::grad_vec(t).map(Some),
                crate::optim::Grad::Host(_) => Ok(None),
            })
            .collect::<Result<Vec<_>>>()?;
        let host: Vec<&[f32]> = grads
            .iter()
            .zip(&read)
            .map(|(g, r)| match (g, r) {
                (_, Some(v)) => Ok(&v[..]),
                (Some(crate::optim::Grad::Host(v)), None) => Ok(&v[..]),
                _ => Err(anyhow::anyhow!(
                    "the statistics pass: a layer without a gradient"
                )),
            })
            .collect::<Result<_>>()?;
        acc.par_iter_mut().zip(&host).for_each(|(a, g)| a.add(g));
        after(ctx, state, acc, b, st.loss)?;
    }
    Ok(())
}

/// The statistics of the `k`-th re-partition (`stage1.repartition_every`, k = 1, 2, ...)
/// of `state`: the statistics pass over `stage1.stat_batches` batches of D2 in that
/// re-partition's own order ([`streams::repartition`]), so each sees fresh batches and
/// a resumed run the same ones; without records or checkpoints (`cross`: also the
/// per-element moments of `var_cross`).
pub fn restatistics(
    ctx: &mut RunContext,
    state: &mut NetState,
    cross: bool,
    k: usize,
) -> Result<Vec<LayerStats>> {
    let c = &ctx.cfg.stage1;
    let rng = Rng::new(ctx.cfg.seed, streams::repartition(k));
    let order = BatchOrder::shuffle(split(ctx).1, c.stat_batch_size, rng);
    let n = c.stat_batches;
    let mut loader = ctx.loader(order, "repartition", 0, n)?;
    let mut acc = accumulators(ctx, cross);
    accumulate(
        ctx,
        state,
        &mut acc,
        (&mut loader, 1..=n),
        |_, _, _, _, _| Ok(()),
    )?;
    Ok(acc.iter().map(|a| a.finish()).collect())
}

/// Each layer's score under `criterion` from its statistics (ascending = more stable).
pub fn scores(criterion: Criterion, stats: &[LayerStats]) -> Result<Vec<f64>> {
    stats
        .iter()
        .map(|s| match criterion {
            // The authors sort the f32 value of torch.var.
            Criterion::Var => Ok(s.var as f32 as f64),
            Criterion::VarCross => Ok(s.var_cross),
            Criterion::Mean => Ok(s.mean),
            Criterion::VarOverMean => Ok(s.var_over_mean),
            Criterion::Random | Criterion::Names => {
                bail!("the `{criterion:?}` criterion does not score by statistics")
            }
        })
        .collect()
}

/// Runs stage 1 on `state` (warm-up changes it; the statistics pass does not) and
/// returns the partition, also written to `DIR/partition.json`.
pub fn run(ctx: &mut RunContext, state: &mut NetState) -> Result<Partition> {
    ctx.stages.enter("stage1");
    let p = choose_partition(ctx, state);
    ctx.stages.exit();
    p
}

/// Stage 1 for the search (`auto`): the warm-up and one statistics pass for every
/// criterion of the search; the partitions are the search's to make.
pub fn prepare(ctx: &mut RunContext, state: &mut NetState) -> Result<Evidence> {
    ctx.stages.enter("stage1");
    let resume = ctx.stage1_resume.take();
    let criteria = ctx.cfg.stage1.criteria();
    let evidence = warmup(ctx, state, resume.as_ref())
        .and_then(|()| gather(ctx, state, resume.as_ref(), &criteria));
    ctx.stages.exit();
    evidence
}

/// What stage 1 ranks layers by: the per-layer statistics of the statistics pass (when
/// a criterion needs them) and the seed of the `random` criterion. One pass serves
/// every criterion and ratio the search tries.
pub struct Evidence {
    stats: Option<Vec<LayerStats>>,
    stat_batches: usize,
    seed: u64,
}

impl Evidence {
    /// The evidence of statistics `stats` gathered on `ctx`'s run (a re-partition's).
    pub fn of(ctx: &RunContext, stats: Vec<LayerStats>) -> Evidence {
        Evidence {
            stats: Some(stats),
            stat_batches: ctx.cfg.stage1.stat_batches,
            seed: ctx.cfg.seed,
        }
    }

    /// The partition of `net` by `criterion` (a ranking one, not `names`) with
    /// `unstable_ratio` of the layers unstable.
    pub fn partition(
        &self,
        net: &dyn Network,
        criterion: Criterion,
        unstable_ratio: f64,
        ldt: &LdtConfig,
    ) -> Result<Partition> {
        let (values, stats): (Vec<f64>, _) = match criterion {
            Criterion::Names => bail!("stage 1: the `names` criterion does not rank layers"),
            Criterion::Random => {
                let mut r = Rng::new(self.seed, streams::CRITERION);
                let n = net.params().len();
                ((0..n).map(|_| r.next_f64()).collect(), None)
            }
            c => {
                let stats = self.stats.as_deref().with_context(|| {
                    format!(
                        "stage 1: criterion `{}` without a statistics pass",
                        c.name()
                    )
                })?;
                (scores(c, stats)?, Some(stats))
            }
        };
        let src = Ranking {
            criterion,
            unstable_ratio,
            stats,
            scores: &values,
            stat_batches: stats.map_or(0, |_| self.stat_batches),
        };
        Partition::by_score(net, &src, ldt)
    }
}

/// The evidence for `criteria`: the statistics pass (from the stage-1 checkpoint
/// `resume` if any) when one of them needs it.
fn gather(
    ctx: &mut RunContext,
    state: &mut NetState,
    resume: Option<&Checkpoint>,
    criteria: &[Criterion],
) -> Result<Evidence> {
    let stats = match criteria.iter().any(|c| c.needs_statistics()) {
        true => {
            let cross = criteria.contains(&Criterion::VarCross);
            Some(statistics(ctx, state, resume, cross)?)
        }
        false => None,
    };
    Ok(Evidence {
        stats,
        stat_batches: ctx.cfg.stage1.stat_batches,
        seed: ctx.cfg.seed,
    })
}

/// Stage 1's work (see [`run`]).
fn choose_partition(ctx: &mut RunContext, state: &mut NetState) -> Result<Partition> {
    let c = ctx.cfg.stage1.clone();
    let ldt = ctx.cfg.ldt.clone();
    let resume = ctx.stage1_resume.take();
    warmup(ctx, state, resume.as_ref())?;
    let names = c.criterion == CriterionChoice::Fixed(Criterion::Names);
    let partition = if let Some(p) = &c.partition {
        Partition::load(p, ctx.net.as_ref())?
    } else if names || ctx.cfg.train.method == Method::Deft {
        // DEFT's sets are the backbone (stable) and the head (unstable), whatever
        // `stage1.criterion` says.
        Partition::by_names(ctx.net.as_ref(), &c.stable_names, &c.unstable_names, &ldt)?
    } else {
        let (CriterionChoice::Fixed(criterion), RatioChoice::Fixed(ratio)) =
            (c.criterion, c.unstable_ratio)
        else {
            bail!("stage 1: an `auto` setting is the search's to choose (train::search)");
        };
        let evidence = gather(ctx, state, resume.as_ref(), &[criterion])?;
        evidence.partition(ctx.net.as_ref(), criterion, ratio, &ldt)?
    };
    settle(ctx, &partition)?;
    Ok(partition)
}

/// Makes `partition` the run's: `DIR/partition.json` and `summary.json`.
pub fn settle(ctx: &mut RunContext, partition: &Partition) -> Result<()> {
    partition.save(&ctx.dir.join("partition.json"))?;
    summarize(ctx, partition);
    Ok(())
}

/// Puts the sets of `partition` into `summary.json` (also for a resumed run, whose
/// partition comes from its checkpoint).
pub fn summarize(ctx: &mut RunContext, partition: &Partition) {
    ctx.summary.partition = Some(PartitionSummary {
        criterion: partition.criterion,
        stable: partition.stable.clone(),
        unstable: partition.unstable.clone(),
    });
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
