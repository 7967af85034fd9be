//! Stage 1: warm-up on D1, the statistics pass on D2 (forward and backward with every
//! layer trainable, no parameter or buffer change), and the partition — or, for a resumed
//! run, the partition its checkpoint was trained with.

use super::driver::Meter;
use super::run::streams;
use super::step::{gradients, GradPlan};
use super::RunContext;
use crate::checkpoint::Checkpoint;
use crate::config::{Criterion, Method, WarmupLayers};
use crate::data::loader::{read_batches, read_ragged, BatchOrder};
use crate::data::Loader;
use crate::ldt::partition::{Partition, Ranking};
use crate::ldt::stats::{LayerAccumulator, LayerStats};
use crate::metrics::{PartitionSummary, Progress, Record, TrainRecord};
use crate::model::{Mode, NetState};
use crate::optim::{OptimSettings, Optimizer};
use crate::rng::Rng;
use anyhow::{bail, Context, Result};
use rayon::prelude::*;

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
}

/// Trains the layers of `fit.mask` with a fresh optimizer at a constant rate: the
/// warm-ups (stage 1's on D1; erm's head-only `train.head_warmup_steps`).
pub fn fit_layers(
    ctx: &mut RunContext,
    state: &mut NetState,
    loader: &mut Loader,
    fit: Fit<'_>,
) -> Result<()> {
    let Fit {
        mask,
        steps,
        settings,
        lr,
        stage,
    } = fit;
    let n = ctx.net.params().len();
    let mut opt = Optimizer::new(settings, n).placed(ctx.cfg.offload.optimizer)?;
    let lrs = vec![lr; n];
    let progress = Progress::new(stage, steps, ctx.cfg.train.log_every);
    let mut meter = Meter::default();
    for step in 1..=steps {
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
            acc: Some(stats.correct as f64 / stats.n as f64),
            lr: Some(lr),
            ..TrainRecord::default()
        }))?;
        if step % ctx.cfg.train.log_every == 0 || step == steps {
            let (msg, _) = meter.take();
            progress.update(step, &msg);
        }
    }
    progress.finish();
    Ok(())
}

/// Warm-up: trains the head (or all layers) on D1 for `stage1.warmup_steps`.
pub fn warmup(ctx: &mut RunContext, state: &mut NetState) -> Result<()> {
    let c = ctx.cfg.stage1.clone();
    if c.warmup_steps == 0 {
        return Ok(());
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
    let mut loader = ctx.loader(order, c.warmup_steps)?;
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
    };
    fit_layers(ctx, state, &mut loader, fit)
}

/// The statistics pass: per-layer streaming statistics of the gradients on D2.
pub fn statistics(ctx: &mut RunContext, state: &mut NetState) -> Result<Vec<LayerStats>> {
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
    let mut loader = ctx.loader(order, c.stat_batches)?;
    let n = ctx.net.params().len();
    let cross = c.cross_variance || c.criterion == Criterion::VarCross;
    let mut acc: Vec<LayerAccumulator> = ctx
        .net
        .params()
        .iter()
        .map(|s| LayerAccumulator::new(s.numel(), cross))
        .collect();
    let all = vec![true; n];
    let progress = Progress::new("stats", c.stat_batches, ctx.cfg.train.log_every);
    for b in 1..=c.stat_batches {
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
                _ => Err(anyhow::anyhow!("stage 1: a layer without a gradient")),
            })
            .collect::<Result<_>>()?;
        acc.par_iter_mut().zip(&host).for_each(|(a, g)| a.add(g));
        progress.update(b, &format!("loss {:.4}", st.loss));
        ctx.metrics.write(&Record::Stats {
            step: b,
            loss: st.loss,
        })?;
    }
    progress.finish();
    Ok(acc.iter().map(|a| a.finish()).collect())
}

/// Runs stage 1 on `state` (warm-up changes it; the statistics pass does not) and
/// returns the partition, also written to `DIR/partition.json`.
pub fn run(ctx: &mut RunContext, state: &mut NetState) -> Result<Partition> {
    ctx.stages.enter("stage1");
    let p = choose_partition(ctx, state)?;
    ctx.stages.exit();
    Ok(p)
}

/// Stage 1's work (see [`run`]).
fn choose_partition(ctx: &mut RunContext, state: &mut NetState) -> Result<Partition> {
    let c = ctx.cfg.stage1.clone();
    let ldt = ctx.cfg.ldt.clone();
    warmup(ctx, state)?;
    let net = ctx.net.as_ref();
    let partition = if let Some(p) = &c.partition {
        Partition::load(p, net)?
    } else if c.criterion == Criterion::Names || ctx.cfg.train.method == Method::Deft {
        // DEFT's sets are the backbone (stable) and the head (unstable), whatever
        // `stage1.criterion` says.
        Partition::by_names(net, &c.stable_names, &c.unstable_names, &ldt)?
    } else if c.criterion == Criterion::Random {
        let mut r = Rng::new(ctx.cfg.seed, streams::CRITERION);
        let scores: Vec<f64> = (0..net.params().len()).map(|_| r.next_f64()).collect();
        let src = Ranking {
            criterion: c.criterion,
            unstable_ratio: c.unstable_ratio,
            stats: None,
            scores: &scores,
            stat_batches: 0,
        };
        Partition::by_score(net, &src, &ldt)?
    } else {
        let stats = statistics(ctx, state)?;
        let scores: Vec<f64> = stats
            .iter()
            .map(|s| match c.criterion {
                // The authors sort the f32 value of torch.var.
                Criterion::Var => s.var as f32 as f64,
                Criterion::VarCross => s.var_cross,
                Criterion::Mean => s.mean,
                Criterion::VarOverMean => s.var_over_mean,
                Criterion::Random | Criterion::Names => unreachable!("handled above"),
            })
            .collect();
        Partition::by_score(
            ctx.net.as_ref(),
            &Ranking {
                criterion: c.criterion,
                unstable_ratio: c.unstable_ratio,
                stats: Some(&stats),
                scores: &scores,
                stat_batches: c.stat_batches,
            },
            &ldt,
        )?
    };
    partition.save(&ctx.dir.join("partition.json"))?;
    ctx.summary.partition = Some(PartitionSummary {
        criterion: partition.criterion,
        stable: partition.stable.clone(),
        unstable: partition.unstable.clone(),
    });
    Ok(partition)
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
